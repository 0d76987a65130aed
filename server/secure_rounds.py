"""Secure aggregation in the aggregator's rounds: the aggregator learns the round's sum, never one update.

The server side of ``core.secagg`` (SecAgg, Bonawitz et al. CCS 2017; docs/protocol.md has the
messages) as a state machine over one open round, with no MQTT and the clock passed in
(``server.aggregator`` publishes what it returns and persists it first). A secure round goes
through four phases after it opens:

1. ``keys``: each selected device sends its two public keys (and the hash of its self seed);
   the phase ends when every selected device did, or ``setup_timeout_s`` after the round
   opened. The devices that did form the key list (published, retained), with the Shamir
   threshold ``t = floor(threshold_fraction * (n - 1)) + 1`` (a majority of each device's peers).
2. ``shares``: each key-list device sends its sealed shares, one per peer; the phase ends when
   all did, or ``setup_timeout_s`` after the key list. Those that did are the masking set U2;
   each gets the shares addressed to it from the others (``secagg/to/<device>``, retained).
3. ``masked``: each device of U2 sends its masked input (an update envelope of kind ``masked``,
   the ring words); the aggregator adds it to the running sum mod 2^32 (streaming: one adapter
   of memory), persists and acknowledges it. The phase ends when every device of U2 sent one or
   went offline, or at the round's deadline. U3, the survivors, are those whose input counts;
   the rest of U2 dropped after masking.
4. ``unmask``: the aggregator publishes U3 and U2 \\ U3; each survivor reveals, per peer, its
   share of the self seed (survivor) or of the mask key (dropped). As soon as every needed
   secret has ``t`` shares the aggregator rebuilds them, checks each against its commitment
   (the seed's hash, the mask key's public key), removes the masks and decodes the sum; the
   round then closes as any other, through the strategy's ``finalize``. Unmasking waits at most
   ``unmask_timeout_s`` past the masked phase for the shares. Rebuilding the secrets (Shamir in
   pure Python: seconds to tens of seconds at 100 devices) runs on a worker thread, from a
   snapshot of the round (``UnmaskInputs``), so that the aggregator's main loop keeps answering
   meanwhile (acks, refusals, statuses, metrics); the round closes on the first tick after it ends.

A round that cannot go on (too few keys, shares or survivors for the threshold, a secret that
does not match its commitment, the unmask timeout) fails cleanly: no global adapter is made
from it, and the next round starts. Nothing is ever released from a sum that did not unmask
exactly.

Crash safety: the phase, keys, shares, survivors and reveals are stored with the open round
(``OpenRound.secagg``, JSON) and the masked sum with its partial sums (float64 holds every
uint32 exactly), saved before every acknowledgement, before every message the aggregator
publishes, and before unmasking starts (with the reveals it uses); a restarted aggregator
resumes the phase it was in and republishes its retained messages, and one that stopped while
unmasking starts it again from what it saved. Devices resend what was not yet answered.
"""

from __future__ import annotations

import base64
import hashlib
import math
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from core.errors import ConfigError, ProtocolError, UpdateRejected
from core.messages import (
    PeerKeys,
    SecaggForward,
    SecaggKeyList,
    SecaggKeys,
    SecaggReveal,
    SecaggShares,
    SecaggUnmask,
    SecaggUpload,
)
from core.protocol import Envelope
from core.secagg import MAX_PEERS, Quantizer, combine_secret, flatten, min_threshold, split_words, unmask

SECAGG_STRATEGIES = ("fedavg", "ffa-lora", "fedsa-lora")
PHASES = ("keys", "shares", "masked", "unmask", "done", "failed")


@dataclass
class SecureAggregationSettings:
    """Secure aggregation (``secure_aggregation`` in the server config); off by default.

    enabled: the aggregator sees only each round's sum of updates (docs/security.md says what
        that protects and what not). Needs a strategy whose sums are plain sums of the updates
        (fedavg, ffa-lora, fedsa-lora), ``robust.method: mean`` and at least 3 devices a round;
        every update then weighs 1.
    value_clip: each value of a device's change is clipped to ``[-value_clip, value_clip]``
        before it is quantized into the ring; the decoded sum is exact to within
        ``survivors * value_clip / (2^31 / devices)`` per value (about 1e-8 at 10 devices and the default).
    threshold_fraction: the Shamir threshold is ``floor(fraction * (n - 1)) + 1`` of each
        device's n - 1 peers: the aggregator with fewer colluding devices learns nothing of an
        input, and a round survives ``n - 1 - t`` dropouts after masking (4 of 10 at 0.5).
    setup_timeout_s: how long the key step and the share step each wait for devices.
    unmask_timeout_s: how long, after the masked inputs are in, the aggregator waits for the
        survivors' shares before the round fails.
    """

    enabled: bool = False
    value_clip: float = 1.0
    threshold_fraction: float = 0.5
    setup_timeout_s: float = 60.0
    unmask_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if not 0 < self.value_clip <= 1e6:
            raise ConfigError(f"secure_aggregation.value_clip must be in (0, 1e6], got {self.value_clip}")
        if not 0.5 <= self.threshold_fraction < 1:
            raise ConfigError(
                f"secure_aggregation.threshold_fraction must be in [0.5, 1), got {self.threshold_fraction}"
            )
        for key in ("setup_timeout_s", "unmask_timeout_s"):
            if not 1 <= getattr(self, key) <= 86_400:
                raise ConfigError(f"secure_aggregation.{key} must be in [1, 86400] seconds, got {getattr(self, key)}")

    def threshold(self, devices: int) -> int:
        """The Shamir threshold for a key list of ``devices``: never below a majority of the peers."""
        return max(min_threshold(devices - 1), math.floor(self.threshold_fraction * (devices - 1)) + 1)


def check_secure_aggregation(
    settings: SecureAggregationSettings,
    strategy: str,
    robust: str,
    adaptive_clip: bool,
    min_devices: int,
    devices_per_round: int,
    round_timeout: float,
) -> None:
    """Refuse secure aggregation with what needs individual updates, or rounds it cannot finish."""
    if not settings.enabled:
        return
    if strategy not in SECAGG_STRATEGIES:
        raise ConfigError(
            f"secure_aggregation needs a strategy whose sums are plain sums of the updates "
            f"({', '.join(SECAGG_STRATEGIES)}), not {strategy}"
        )
    if robust != "mean":
        raise ConfigError(
            f"secure_aggregation hides each update; robust.method {robust} needs the individual updates "
            "(use norm clipping on the devices: privacy's clip)"
        )
    if adaptive_clip:
        raise ConfigError(
            "secure_aggregation with privacy.adaptive_clip would send each device's clip bit in the clear; "
            "use a fixed clip_norm"
        )
    if min_devices < 3 or (devices_per_round and devices_per_round < 3):
        raise ConfigError("secure_aggregation needs rounds.min_devices (and devices_per_round, if set) of at least 3")
    if devices_per_round > MAX_PEERS:
        raise ConfigError(f"secure_aggregation takes at most {MAX_PEERS} devices a round")
    if 2 * settings.setup_timeout_s >= round_timeout:
        raise ConfigError(
            f"secure_aggregation.setup_timeout_s {settings.setup_timeout_s} leaves no time to train in a "
            f"round of {round_timeout} s (two setup steps must fit before the deadline)"
        )


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _raw(text: str) -> bytes:
    return base64.b64decode(text)


class SecaggRefused(Exception):
    """A device's secure-aggregation message that does not count: a reason code and a detail."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class SecureRoundState:
    """What a secure round has taken so far, as stored with the open round (JSON: base64 bytes).

    keys: device -> [cipher key, mask key, seed hash]; key_list: the devices of the key list;
    shares: owner -> recipient -> sealed shares; masking: U2; survivors: U3, in arrival order;
    dropped: U2 \\ U3; reveals: revealer -> owner -> share."""

    phase: str = "keys"
    phase_started: float = 0.0
    threshold: int = 0
    clip: float = 1.0
    keys: dict[str, list[str]] = field(default_factory=dict)
    key_list: list[str] = field(default_factory=list)
    shares: dict[str, dict[str, str]] = field(default_factory=dict)
    masking: list[str] = field(default_factory=list)
    survivors: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    reveals: dict[str, dict[str, str]] = field(default_factory=dict)
    failure: str = ""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SecureRoundState:
        known = {f for f in cls.__dataclass_fields__}
        state = cls(**{k: v for k, v in data.items() if k in known})
        if state.phase not in PHASES:
            raise ValueError(f"the saved secure round is in an unknown phase {state.phase!r}")
        return state


@dataclass
class Transition:
    """What a phase change asks the aggregator to do, after it persisted the state: publish
    (retained) the key list, the forwards by device, or the unmask request; or close the
    round (``closed``: done, or failed with ``state.failure``)."""

    key_list: SecaggKeyList | None = None
    forwards: dict[str, SecaggForward] = field(default_factory=dict)
    unmask: SecaggUnmask | None = None
    closed: bool = False


@dataclass
class Unmasked:
    """A secure round's result: the survivors' code sum (exact in the ring) and its decoding."""

    codes: np.ndarray
    tensors: dict[str, np.ndarray]  # the float sum of the survivors' changes, by tensor
    survivors: list[str]


@dataclass(frozen=True)
class UnmaskInputs:
    """What unmasking one round needs, copied out of its state (so that it can run while the
    main loop goes on taking messages): the ring sum, each secret's first ``threshold`` revealed
    shares, and the commitments to check them against."""

    job: str
    round: int
    threshold: int
    clip: float
    key_list_size: int
    masking: tuple[str, ...]
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    shares: dict[str, list[bytes]]  # owner -> its first ``threshold`` revealed shares
    seed_hashes: dict[str, bytes]  # survivor -> sha256 of its self seed
    mask_public: dict[str, bytes]  # masking device -> its mask public key
    total: np.ndarray  # the masked sum, flattened (uint32)
    shapes: dict[str, tuple[int, ...]]


def unmask_sum(inputs: UnmaskInputs) -> Unmasked:
    """Rebuild the secrets from their shares, check them against their commitments, remove the
    masks and decode: ProtocolError if any secret is wrong. Pure: reads only ``inputs``."""
    t = inputs.threshold
    seeds, mask_keys = {}, {}
    for owner in inputs.survivors:
        seed = combine_secret(inputs.shares[owner], t)
        if hashlib.sha256(seed).digest() != inputs.seed_hashes[owner]:
            raise ProtocolError(f"the self seed of {owner!r} rebuilt from the revealed shares does not match")
        seeds[owner] = seed
    for gone in inputs.dropped:
        mask_keys[gone] = combine_secret(inputs.shares[gone], t)
    peers_of = {d: [p for p in inputs.masking if p != d] for d in inputs.dropped}
    codes = unmask(inputs.total, seeds, mask_keys, peers_of, inputs.mask_public, inputs.job, inputs.round)
    decoded = Quantizer(inputs.clip, inputs.key_list_size).decode(codes)
    return Unmasked(codes, split_words(decoded, inputs.shapes), list(inputs.survivors))


class SecureRound:
    """The aggregator's side of one secure round (see the module docstring).

    ``state`` is the persisted part; ``masked_sum`` the ring sum by tensor (uint32).
    ``shapes`` are the tensors every masked input must hold: what the round's devices were
    sent (and send a change of)."""

    def __init__(
        self,
        settings: SecureAggregationSettings,
        job: str,
        round_id: int,
        selected: list[str],
        shapes: Mapping[str, tuple[int, ...]],
        state: SecureRoundState,
        masked_sum: dict[str, np.ndarray] | None = None,
    ):
        self.settings, self.job, self.round = settings, job, round_id
        self.selected = list(selected)
        self.shapes = {k: tuple(v) for k, v in shapes.items()}
        self.state = state
        self.masked_sum = masked_sum or {}

    # -- persistence ---------------------------------------------------------------------
    def sums_for_store(self) -> dict[str, np.ndarray]:
        """The masked sum as the open round's partial sums (float64 holds each word exactly)."""
        return {k: v.astype(np.float64) for k, v in self.masked_sum.items()}

    @staticmethod
    def sums_from_store(sums: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        for k, v in sums.items():
            a = np.asarray(v, np.float64)
            if not (np.all(a >= 0) and np.all(a < 2**32) and np.all(a == np.floor(a))):
                raise ValueError(f"the saved masked sum of {k} is not ring words")
            out[k] = a.astype(np.uint32)
        return out

    # -- messages from devices -----------------------------------------------------------
    def take(self, device: str, msg: SecaggUpload) -> bool:
        """Take one device message; True if it changed the state (False: an exact repeat).
        Raises SecaggRefused with the reason otherwise."""
        if msg.sender != device:
            raise SecaggRefused("sender_mismatch", f"message says {msg.sender!r} but came on the topic of {device!r}")
        if msg.job != self.job:
            raise SecaggRefused("wrong_job", f"message for job {msg.job!r}, this aggregator runs {self.job!r}")
        if msg.round != self.round:
            reason = "stale_round" if msg.round < self.round else "future_round"
            raise SecaggRefused(reason, f"{msg.step.value} for round {msg.round}, open round is {self.round}")
        if device not in self.selected:
            raise SecaggRefused("not_selected", f"device {device} was not selected for round {self.round}")
        if isinstance(msg, SecaggKeys):
            return self._take_keys(device, msg)
        if isinstance(msg, SecaggShares):
            return self._take_shares(device, msg)
        return self._take_reveal(device, msg)

    def _expect(self, phase: str, device: str, step: str) -> None:
        if self.state.phase != phase:
            raise SecaggRefused(
                "wrong_phase", f"{step} from {device} while the round is in its {self.state.phase} phase"
            )

    def _first(self, taken: dict, device: str, entry, what: str) -> bool:
        """Whether ``entry`` is ``device``'s first message of its step; False for a resend of the
        same one; refused (``duplicate``) when it differs from what the device sent before."""
        known = taken.get(device)
        if known is None:
            return True
        if known == entry:
            return False  # a resend
        raise SecaggRefused("duplicate", f"{device} already {what} for round {self.round}")

    def _take_keys(self, device: str, msg: SecaggKeys) -> bool:
        entry = [_b64(msg.cipher), _b64(msg.mask), _b64(msg.seed_hash)]
        if not self._first(self.state.keys, device, entry, "sent other keys"):
            return False
        self._expect("keys", device, "keys")
        if msg.cipher == msg.mask or any(entry[:2] == other[:2] for other in self.state.keys.values()):
            raise SecaggRefused("bad_keys", f"{device} sent keys that are not fresh (reused or equal)")
        self.state.keys[device] = entry
        return True

    def _take_shares(self, device: str, msg: SecaggShares) -> bool:
        sealed = {k: _b64(v) for k, v in msg.shares.items()}
        if not self._first(self.state.shares, device, sealed, "sent other shares"):
            return False
        self._expect("shares", device, "shares")
        if device not in self.state.key_list:
            raise SecaggRefused("not_in_key_list", f"{device} is not in round {self.round}'s key list")
        peers = set(self.state.key_list) - {device}
        if set(sealed) != peers:
            raise SecaggRefused(
                "wrong_peers", f"{device} sent shares for {len(sealed)} devices, the key list has {len(peers)} peers"
            )
        self.state.shares[device] = sealed
        return True

    def _take_reveal(self, device: str, msg: SecaggReveal) -> bool:
        revealed = {k: _b64(v) for k, v in msg.shares.items()}
        if not self._first(self.state.reveals, device, revealed, "revealed other shares"):
            return False
        self._expect("unmask", device, "reveal")
        if device not in self.state.survivors:
            raise SecaggRefused("not_a_survivor", f"{device} did not send a masked input in round {self.round}")
        owners = set(self.state.masking) - {device}
        if set(revealed) != owners:
            raise SecaggRefused(
                "wrong_peers", f"{device} revealed shares of {len(revealed)} devices, not {len(owners)}"
            )
        self.state.reveals[device] = revealed
        return True

    # -- the masked inputs ---------------------------------------------------------------
    def judge_masked(self, device: str, env: Envelope) -> dict[str, np.ndarray]:
        """The masked input's words if it may count; UpdateRejected with the reason otherwise."""
        if env.sender != device:
            raise UpdateRejected("sender_mismatch", f"envelope says {env.sender!r} but came on the topic of {device!r}")
        if env.job != self.job:
            raise UpdateRejected("wrong_job", f"update for job {env.job!r}, this aggregator runs {self.job!r}")
        if env.round != self.round:
            reason = "stale_round" if env.round < self.round else "future_round"
            raise UpdateRejected(reason, f"masked input for round {env.round}, open round is {self.round}")
        if device not in self.selected:
            raise UpdateRejected("not_selected", f"device {device} was not selected for round {self.round}")
        if device in self.state.survivors:
            raise UpdateRejected("duplicate", f"device {device} already contributed to round {self.round}")
        if self.state.phase != "masked":
            raise UpdateRejected("wrong_phase", f"masked input while the round is in its {self.state.phase} phase")
        if device not in self.state.masking:
            raise UpdateRejected("not_masking", f"{device} did not share its secrets in round {self.round}")
        missing = sorted(set(self.shapes) - set(env.tensors))
        unknown = sorted(set(env.tensors) - set(self.shapes))
        if missing or unknown:
            reason = "missing_tensor" if missing else "unknown_tensor"
            raise UpdateRejected(reason, f"masked input lacks {missing[:2]} or has extra {unknown[:2]}")
        for name, words in env.tensors.items():
            if tuple(words.shape) != self.shapes[name] or words.dtype != np.uint32:
                raise UpdateRejected(
                    "wrong_shape", f"{name} is {words.dtype} {tuple(words.shape)}, not {self.shapes[name]}"
                )
        return env.tensors

    def add_masked(self, device: str, words: Mapping[str, np.ndarray]) -> Callable[[], None]:
        """Add a judged masked input to the ring sum; returns an undo (if it cannot be persisted)."""
        before = {k: v.copy() for k, v in self.masked_sum.items()}
        for name, w in words.items():
            acc = self.masked_sum.get(name)
            self.masked_sum[name] = w.copy() if acc is None else (acc + w).astype(np.uint32)
        self.state.survivors.append(device)

        def undo() -> None:
            self.masked_sum = before
            self.state.survivors.remove(device)

        return undo

    # -- phases --------------------------------------------------------------------------
    def advance(self, now: float, online: Callable[[str], bool], deadline: float) -> Transition | None:
        """Move to the next phase when the current one is over; the transition to persist and
        publish, or None when nothing changed."""
        s = self.state
        timeout = self.settings.setup_timeout_s
        if s.phase == "keys":
            if any(d not in s.keys and online(d) for d in self.selected) and now < s.phase_started + timeout:
                return None
            return self._publish_key_list(now)
        if s.phase == "shares":
            if any(d not in s.shares and online(d) for d in s.key_list) and now < s.phase_started + timeout:
                return None
            return self._forward_shares(now)
        if s.phase == "masked":
            if any(d not in s.survivors and online(d) for d in s.masking) and now < deadline:
                return None
            return self._request_unmask(now)
        if s.phase == "unmask" and now >= s.phase_started + self.settings.unmask_timeout_s:
            return self.fail(f"the survivors' shares did not arrive within {self.settings.unmask_timeout_s:g} s")
        return None

    def fail(self, why: str) -> Transition:
        self.state.phase, self.state.failure = "failed", why
        return Transition(closed=True)

    def _publish_key_list(self, now: float) -> Transition:
        s = self.state
        devices = sorted(s.keys)
        if len(devices) < 3:
            return self.fail(f"only {len(devices)} devices sent keys (secure aggregation needs 3)")
        s.key_list, s.threshold, s.clip = devices, self.settings.threshold(len(devices)), self.settings.value_clip
        s.phase, s.phase_started = "shares", now
        return Transition(key_list=self.key_list())

    def key_list(self) -> SecaggKeyList:
        s = self.state
        peers = tuple(PeerKeys(d, _raw(s.keys[d][0]), _raw(s.keys[d][1])) for d in s.key_list)
        return SecaggKeyList(self.job, self.round, s.threshold, s.clip, peers)

    def _forward_shares(self, now: float) -> Transition:
        s = self.state
        masking = sorted(s.shares)
        if len(masking) - 1 < s.threshold:
            return self.fail(f"only {len(masking)} devices sent shares, too few for threshold {s.threshold}")
        s.masking, s.phase, s.phase_started = masking, "masked", now
        return Transition(forwards={d: self.forward(d) for d in masking})

    def forward(self, device: str) -> SecaggForward:
        s = self.state
        return SecaggForward(self.job, self.round, {o: _raw(s.shares[o][device]) for o in s.masking if o != device})

    def _request_unmask(self, now: float) -> Transition:
        s = self.state
        s.dropped = sorted(set(s.masking) - set(s.survivors))
        if len(s.survivors) <= s.threshold:
            return self.fail(
                f"only {len(s.survivors)} of {len(s.masking)} masked inputs arrived; unmasking needs more "
                f"than the threshold {s.threshold}"
            )
        s.phase, s.phase_started = "unmask", now
        return Transition(unmask=self.unmask_request())

    def unmask_request(self) -> SecaggUnmask:
        s = self.state
        return SecaggUnmask(self.job, self.round, tuple(sorted(s.survivors)), tuple(s.dropped))

    def republish(self) -> Transition:
        """Every retained message of the current phase, again (after a restart or reconnect)."""
        s = self.state
        out = Transition()
        if s.phase in ("shares", "masked", "unmask"):
            out.key_list = self.key_list()
        if s.phase in ("masked", "unmask"):
            out.forwards = {d: self.forward(d) for d in s.masking}
        if s.phase == "unmask":
            out.unmask = self.unmask_request()
        return out

    # -- unmasking -----------------------------------------------------------------------
    def _shares_of(self, owner: str) -> list[bytes]:
        return [_raw(r[owner]) for _, r in sorted(self.state.reveals.items()) if owner in r]

    def ready_to_unmask(self) -> bool:
        s = self.state
        return s.phase == "unmask" and all(len(self._shares_of(o)) >= s.threshold for o in s.masking)

    def unmask_inputs(self) -> UnmaskInputs:
        """A copy of what unmasking needs (once ``ready_to_unmask``)."""
        s = self.state
        t = s.threshold
        return UnmaskInputs(
            job=self.job,
            round=self.round,
            threshold=t,
            clip=s.clip,
            key_list_size=len(s.key_list),
            masking=tuple(s.masking),
            survivors=tuple(s.survivors),
            dropped=tuple(s.dropped),
            shares={o: self._shares_of(o)[:t] for o in (*s.survivors, *s.dropped)},
            seed_hashes={o: _raw(s.keys[o][2]) for o in s.survivors},
            mask_public={d: _raw(s.keys[d][1]) for d in s.masking},
            total=flatten({k: self.masked_sum[k] for k in self.shapes}).astype(np.uint32),
            shapes=dict(self.shapes),
        )

    def unmask(self) -> Unmasked:
        """Unmask here and now (``unmask_sum`` of ``unmask_inputs``) and mark the round done:
        ProtocolError if any secret is wrong."""
        result = unmask_sum(self.unmask_inputs())
        self.state.phase = "done"
        return result


def _timed(fn: Callable[[UnmaskInputs], Unmasked], inputs: UnmaskInputs) -> tuple[Unmasked, float]:
    start = time.perf_counter()
    return fn(inputs), time.perf_counter() - start


class SecureRounds:
    """Secure aggregation inside the aggregator's rounds: ``server.aggregator.Aggregator``
    calls it where a round opens, ticks, takes a masked input or a ``secagg`` message, and
    closes; it drives the open round's ``SecureRound``, persists through the aggregator's
    store and publishes on its link. Unmasking runs on one worker thread (``unmasking``: the
    round it is for and its future), collected by a later tick. ``last`` is the last unmasked
    result (its exact code sum)."""

    def __init__(self, agg: Any):
        self.agg = agg
        self.settings: SecureAggregationSettings = agg.cfg.secure_aggregation
        self._round: SecureRound | None = None
        self._closing: dict | None = None  # the state of the round being closed, for its report
        self._pool: ThreadPoolExecutor | None = None
        self.unmasking: tuple[int, Future] | None = None  # (round, its unmasking) while it runs
        self.unmask_s = 0.0  # how long the last unmasking took
        self.last: Unmasked | None = None

    # -- the open round ------------------------------------------------------------------
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """What every masked input holds: the tensors of the adapter the devices were sent."""
        from core.protocol import adapter_part

        tensors = adapter_part(self.agg.strategy.for_device(self.agg.model, self.agg.manifest.rank))
        return {k: tuple(v.shape) for k, v in tensors.items()}

    def current(self) -> SecureRound | None:
        """The open round's secure state (rebuilt from the store after a restart)."""
        rnd = self.agg.coordinator.open
        if rnd is None:
            self._round = self.unmasking = None
            return None
        if self.unmasking is not None and self.unmasking[0] != rnd.round:
            self.unmasking = None  # of a round that is gone: its result is not wanted
        if self._round is None or self._round.round != rnd.round:
            if rnd.secagg is None:  # opened by an aggregator without secure aggregation
                rnd.secagg = SecureRoundState(phase_started=rnd.opened_at).to_json()
                rnd.partial = self.agg.strategy.new_partial()
            self._round = SecureRound(
                self.settings,
                self.agg.cfg.job,
                rnd.round,
                rnd.selected,
                self.shapes(),
                SecureRoundState.from_json(rnd.secagg),
                SecureRound.sums_from_store(rnd.partial.sums),
            )
        return self._round

    def opened(self, rnd: Any) -> None:
        """A round opened: it starts in the key phase (saved with the round by the caller)."""
        rnd.secagg = SecureRoundState(phase_started=rnd.opened_at).to_json()
        self._round = self.unmasking = None

    def persist(self) -> None:
        """Save the secure state and the masked sum with the open round (raises StoreUnavailable)."""
        from server.strategies.base import Partial

        sr, rnd = self._round, self.agg.coordinator.open
        assert sr is not None and rnd is not None
        rnd.secagg = sr.state.to_json()
        rnd.partial = Partial(sr.sums_for_store(), 0.0, len(sr.state.survivors), list(sr.state.survivors))
        self.agg._save()

    # -- messages ------------------------------------------------------------------------
    def handle(self, device: str, payload: bytes) -> None:
        """A device's keys, shares or reveal (``secagg/<device>``); refused with a reason and
        counted under ``fedlora_messages_refused_total{kind="secagg"}`` unless it counts."""
        from core.messages import parse_secagg_upload

        msg = parse_secagg_upload(payload)  # ProtocolError: the caller refuses it as malformed
        sr = self.current()
        if sr is None:
            self.agg.refuse("secagg", "no_open_round", f"{msg.step.value} from {device} while no round is open")
            return
        try:
            sr.take(device, msg)
        except SecaggRefused as exc:
            self.agg.refuse("secagg", exc.reason, f"from {device} (round {msg.round}): {exc.detail}")

    def accept(self, device: str, env: Envelope, nbytes: int) -> None:
        """A masked input: judged, added to the ring sum, persisted, then acknowledged."""
        from core.messages import AckResult
        from server.store import StoreUnavailable

        if env.kind != "masked":
            raise UpdateRejected("secagg_required", "this job runs secure aggregation: send a masked input")
        sr = self.current()
        if sr is None:
            raise UpdateRejected("no_open_round", f"masked input of round {env.round} while no round is open")
        undo = sr.add_masked(device, sr.judge_masked(device, env))
        try:
            self.persist()
        except StoreUnavailable as exc:
            undo()
            self.agg.metrics.store_errors.inc()
            raise UpdateRejected("retry_later", f"the aggregator cannot persist updates now ({exc})") from None
        agg = self.agg
        agg._round_metrics.append(env.metrics)
        agg.metrics.updates.labels("accepted", "ok").inc()
        raw = 4 * sum(v.size for v in env.tensors.values())
        agg._round_bytes["raw"] += raw
        agg.metrics.bytes_in.labels("raw").inc(raw)
        agg._event("masked_input_accepted", round=env.round, device=device, bytes=nbytes)
        agg.ack(device, env.round, AckResult.ACCEPTED)

    # -- phases --------------------------------------------------------------------------
    def tick(self) -> Any:
        """Advance the open secure round; the round's outcome once it closes (else None)."""
        from server.store import StoreUnavailable

        sr = self.current()
        if sr is None:
            return None
        agg = self.agg
        before = sr.state.to_json()
        if self.unmasking is not None:
            transition = self._collect(sr)
        else:
            online = set(agg.coordinator.online())
            transition = sr.advance(agg.clock(), online.__contains__, agg.coordinator.open.deadline)
            if transition is None and sr.ready_to_unmask():
                self._start_unmasking(sr)
                return None
        if isinstance(transition, Unmasked):
            return self._finish(sr, transition)
        if transition is None:
            return None
        try:
            self.persist()  # before anything goes out: a restart resumes this phase
        except StoreUnavailable as exc:
            sr.state = SecureRoundState.from_json(before)
            agg.metrics.store_errors.inc()
            agg.refusals.refuse("secagg", "store_unavailable", f"round {sr.round}: {exc}")
            return None
        self.publish(transition)
        if transition.closed:
            agg._event("secagg_failed", round=sr.round, reason=sr.state.failure)
            self._closing = sr.state.to_json()
            return agg.coordinator.close_now(failure=f"secagg_failed: {sr.state.failure}")
        return None

    def _start_unmasking(self, sr: SecureRound) -> None:
        """Persist the round with the reveals it unmasks from (a restart starts unmasking again
        from them), then unmask on the worker thread."""
        from server.store import StoreUnavailable

        try:
            self.persist()
        except StoreUnavailable as exc:  # the next tick tries again
            self.agg.metrics.store_errors.inc()
            self.agg.refusals.refuse("secagg", "store_unavailable", f"round {sr.round}: {exc}")
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="fedlora-unmask")
        self.unmasking = (sr.round, self._pool.submit(_timed, unmask_sum, sr.unmask_inputs()))
        self.agg._event("unmask_started", round=sr.round, survivors=len(sr.state.survivors))

    def _collect(self, sr: SecureRound) -> Unmasked | Transition | None:
        """The unmasked sum once the worker is done (None while it runs); a failed round's
        transition if a secret did not match its commitment."""
        assert self.unmasking is not None
        future = self.unmasking[1]
        if not future.done():
            return None
        self.unmasking = None
        try:
            result, self.unmask_s = future.result()
        except ProtocolError as exc:
            return sr.fail(f"unmasking failed: {exc}")
        sr.state.phase = "done"
        return result

    def _finish(self, sr: SecureRound, result: Unmasked) -> Any:
        """Hand the unmasked sum to the strategy as the round's partial and close the round."""
        from server.strategies.base import ClientUpdate

        agg = self.agg
        rank = agg.manifest.rank
        downlink = agg._downlinks.get(rank)
        base = downlink.adapter if downlink is not None and downlink.adapter is not None else {}
        n = len(result.survivors)
        # Every input weighs 1: the strategy's weighted sum of the devices' full tensors is
        # n * (what they started from) + the sum of their changes; a mean update of weight n gives it.
        full = {k: np.asarray(base.get(k, 0.0), np.float64) + v / n for k, v in result.tensors.items()}
        partial = agg.strategy.accumulate(
            agg.strategy.new_partial(), ClientUpdate("secagg", sr.round, rank, n, full, {})
        )
        partial.count, partial.devices = n, list(result.survivors)
        rnd = agg.coordinator.open
        rnd.partial, rnd.accepted, rnd.norms = partial, {d: 1 for d in result.survivors}, []
        rnd.secagg = self._closing = sr.state.to_json()
        self.last = result
        return agg.coordinator.close_now()

    def publish(self, transition: Transition) -> None:
        link, topics = self.agg.link, self.agg.topics
        if transition.key_list is not None:
            link.publish(topics.secagg_round("keys"), transition.key_list.to_bytes(), retain=True)
        for device, forward in transition.forwards.items():
            link.publish(topics.secagg_to(device), forward.to_bytes(), retain=True)
        if transition.unmask is not None:
            link.publish(topics.secagg_round("unmask"), transition.unmask.to_bytes(), retain=True)

    def republish(self) -> None:
        sr = self.current()
        if sr is not None:
            self.publish(sr.republish())

    def closed(self, entry: dict) -> None:
        """A secure round closed: its report in the history row, its retained messages cleared."""
        state, self._closing = self._closing, None
        if state is None:
            return
        s = SecureRoundState.from_json(state)
        entry["secagg"] = {
            "phase": s.phase,
            "keys": len(s.key_list) or len(s.keys),
            "threshold": s.threshold,
            "masking": len(s.masking),
            "survivors": len(s.survivors),
            "dropped": list(s.dropped),
            **({"unmask_s": round(self.unmask_s, 3)} if s.phase == "done" else {}),
            **({"failure": s.failure} if s.failure else {}),
        }
        link, topics = self.agg.link, self.agg.topics
        link.publish(topics.secagg_round("keys"), b"", retain=True)
        link.publish(topics.secagg_round("unmask"), b"", retain=True)
        for device in s.masking:
            link.publish(topics.secagg_to(device), b"", retain=True)
        self._round = None
