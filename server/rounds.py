"""Round orchestration as a plain state machine: no sockets, no files, the clock passed in.

The aggregator feeds it device status changes and decoded updates, and asks it on every
tick whether a round should open or close. Every decision (which devices, accept or
reject an update and why, when to close) is made here, so tests drive it directly.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from core.errors import ConfigError, UpdateRejected
from server.strategies.base import ClientUpdate, Partial, Strategy

if TYPE_CHECKING:
    from server.privacy import PrivacySettings

NORM_BOUNDS = ("clip", "reject")
ROUND_MODES = ("sync", "async")
STALENESS_WEIGHTINGS = ("constant", "polynomial", "hinge")


class RoundPrivacy(Protocol):
    """What the coordinator asks of differential privacy (``server.privacy.DifferentialPrivacy``)."""

    settings: PrivacySettings

    def norm_bound(self, selected: int) -> float:
        """The L2 bound of a round's updates as sent, with ``selected`` devices."""
        ...

    def refuses(self, selected: int, online: int) -> str:
        """Why a round of ``selected`` of ``online`` devices must not open ('' : it may)."""
        ...


@dataclass
class RoundSettings:
    """When rounds open and close.

    rounds: rounds to run, then the job is finished (0: run forever).
    min_devices: devices that must be online before a round opens.
    devices_per_round: devices selected per round among those online (0: all of them).
    min_updates: accepted updates needed to close a round at its deadline; fewer fails it.
    round_timeout: seconds from opening to the deadline.
    max_update_norm: absolute bound on an update's L2 norm (the change a device sends; 0: none).
    norm_clip_multiple: the bound of each round after the first is also this multiple of the
        median norm of the previous completed round's updates (robust while fewer than half of
        them lie; 0: off). The first round's bound, with no history, is what AdamW can move the
        adapter honestly: ``lr * local_steps * sqrt(adapter values)`` (the aggregator's
        ``norm_prior``). The smallest bound that applies is the round's ``norm_bound``.
    norm_bound: what happens to an update above the round's bound: ``clip`` scales it down to
        the bound (DP-FedAvg's clipping: one device's pull is bounded, its data still counts),
        ``reject`` refuses it (reason ``norm_too_large``).
    max_weight_ratio: a device's aggregation weight (its claimed ``num_examples``) is capped at
        this multiple of the median ``num_examples`` the round's selected devices announced in
        their status (0: no cap). A device that lies about its data size then moves the global
        by at most its bounded share: ``ratio / (ratio + others)`` of the weight.
    max_num_examples: absolute cap on a device's weight (0: none).
    mode: ``sync`` (rounds: selected devices train the same version, the round closes when they
        reported or at its deadline) or ``async`` (FedBuff, Nguyen et al. 2022: every online
        device trains whenever it can on the latest version it holds; a new version is made
        every ``buffer_size`` accepted updates, each weighted down by its staleness;
        ``server.async_rounds``). In async mode ``rounds`` counts versions, ``min_devices``
        is needed only before the first buffer opens, ``round_timeout`` is how long a buffer
        holding at least ``min_updates`` updates waits before it is applied short of
        ``buffer_size``, and ``devices_per_round`` must be 0.
    buffer_size: async: accepted updates per new global version (FedBuff's K).
    staleness_weighting: async: how an update ``s`` versions behind counts: ``polynomial``
        ``(1 + s) ** -a``, ``hinge`` 1 up to ``b`` versions behind then ``1 / (1 + a (s - b))``
        (Xie et al. 2019), ``constant`` 1.
    staleness_exponent: async: ``a`` above (the polynomial's exponent, the hinge's slope).
    staleness_hinge: async: ``b`` above, the versions behind that still count fully (hinge).
    max_staleness: async: an update more versions behind than this is refused (``too_stale``;
        the device drops it and trains on the latest version).
    """

    rounds: int = 10
    min_devices: int = 2
    devices_per_round: int = 0
    min_updates: int = 1
    round_timeout: float = 600.0
    max_update_norm: float = 0.0
    norm_clip_multiple: float = 3.0
    norm_bound: str = "clip"
    max_weight_ratio: float = 3.0
    max_num_examples: int = 0
    mode: str = "sync"
    buffer_size: int = 10
    staleness_weighting: str = "polynomial"
    staleness_exponent: float = 0.5
    staleness_hinge: int = 4
    max_staleness: int = 10

    def __post_init__(self) -> None:
        if self.rounds < 0:
            raise ConfigError("rounds must be >= 0")
        if self.min_devices < 1:
            raise ConfigError("min_devices must be >= 1")
        if self.devices_per_round < 0:
            raise ConfigError("devices_per_round must be >= 0 (0 selects every online device)")
        if self.min_updates < 1:
            raise ConfigError("min_updates must be >= 1")
        if self.devices_per_round and self.min_updates > self.devices_per_round:
            raise ConfigError(f"min_updates {self.min_updates} exceeds devices_per_round {self.devices_per_round}")
        if self.round_timeout <= 0:
            raise ConfigError("round_timeout must be positive")
        if self.max_update_norm < 0:
            raise ConfigError("max_update_norm must be >= 0")
        if self.norm_clip_multiple != 0 and not 1 <= self.norm_clip_multiple <= 1e6:
            raise ConfigError(f"norm_clip_multiple must be 0 (off) or in [1, 1e6], got {self.norm_clip_multiple}")
        if self.norm_bound not in NORM_BOUNDS:
            raise ConfigError(f"norm_bound must be one of {', '.join(NORM_BOUNDS)}, not {self.norm_bound!r}")
        if self.max_weight_ratio != 0 and not 1 <= self.max_weight_ratio <= 1e6:
            raise ConfigError(f"max_weight_ratio must be 0 (off) or in [1, 1e6], got {self.max_weight_ratio}")
        if self.max_num_examples < 0:
            raise ConfigError("max_num_examples must be >= 0 (0: no cap)")
        self._check_async()

    def _check_async(self) -> None:
        if self.mode not in ROUND_MODES:
            raise ConfigError(f"rounds.mode must be one of {', '.join(ROUND_MODES)}, not {self.mode!r}")
        if self.staleness_weighting not in STALENESS_WEIGHTINGS:
            raise ConfigError(
                f"rounds.staleness_weighting must be one of {', '.join(STALENESS_WEIGHTINGS)}, "
                f"not {self.staleness_weighting!r}"
            )
        if not 1 <= self.buffer_size <= 100_000:
            raise ConfigError(f"rounds.buffer_size must be in [1, 100000], got {self.buffer_size}")
        if not 0 <= self.staleness_exponent <= 100:
            raise ConfigError(f"rounds.staleness_exponent must be in [0, 100], got {self.staleness_exponent}")
        if not 0 <= self.staleness_hinge <= 1_000_000:
            raise ConfigError(f"rounds.staleness_hinge must be in [0, 1000000], got {self.staleness_hinge}")
        if not 0 <= self.max_staleness <= 1_000_000:
            raise ConfigError(f"rounds.max_staleness must be in [0, 1000000], got {self.max_staleness}")
        if self.mode == "async":
            if self.devices_per_round:
                raise ConfigError(
                    "rounds.devices_per_round must be 0 in async mode: every online device trains when it can"
                )
            if self.min_updates > self.buffer_size:
                raise ConfigError(
                    f"rounds.min_updates {self.min_updates} exceeds rounds.buffer_size {self.buffer_size}"
                )


@dataclass
class DeviceInfo:
    device: str
    online: bool = False
    rank: int = 0
    num_examples: int = 0
    last_seen: float = 0.0


@dataclass
class OpenRound:
    round: int
    selected: list[str]
    opened_at: float
    deadline: float
    base_version: int
    accepted: dict[str, int] = field(default_factory=dict)  # device -> the weight it was given
    partial: Partial = field(default_factory=Partial)
    max_weight: int = 0  # a device's weight cap this round (0: none), fixed when the round opens
    max_norm: float = 0.0  # the update norm bound of this round (0: none), fixed when the round opens
    norms: list[float] = field(default_factory=list)  # norms of the accepted updates, as sent
    sampling_rate: float = 1.0  # devices selected / devices online when the round opened
    # async mode (server.async_rounds): each accepted update's staleness in versions, and per
    # device the last round whose update was accepted (kept across buffers: a resend is a duplicate)
    staleness: list[int] = field(default_factory=list)
    contributed: dict[str, int] = field(default_factory=dict)
    secagg: dict | None = None  # a secure round's state (server.secure_rounds.SecureRoundState, as JSON)


@dataclass
class Accepted:
    """One update as the open round took it: ``seq``, its place in the round (1, 2, ...), the
    update exactly as ``Strategy.accumulate`` added it (weight capped, clipped, the devices' full
    tensors), and its norm as sent. What the state store commits per update, and replays onto
    the round's last checkpoint after a restart."""

    seq: int
    update: ClientUpdate
    norm: float

    @property
    def update_bytes(self) -> int:
        """What its tensors take in the state store."""
        return sum(int(np.asarray(v).nbytes) for v in self.update.tensors.values())


@dataclass
class Bounded:
    """An update after the round's bounds: ``update`` carries the capped weight and clipped
    tensors; ``norm`` is its norm as sent."""

    update: ClientUpdate
    norm: float
    clipped: bool = False
    weight_capped: bool = False
    staleness: int = 0  # async: versions behind the current global
    staleness_weight: float = 1.0  # async: the factor its change was scaled by


def update_norm(tensors: dict[str, np.ndarray]) -> float:
    """The L2 norm over all tensors, summed in float64."""
    total = 0.0
    for v in tensors.values():
        flat = np.asarray(v, dtype=np.float64).reshape(-1)
        total += float(np.dot(flat, flat))
    return math.sqrt(total)


@dataclass
class RoundOutcome:
    round: int
    ok: bool
    reason: str
    selected: list[str]
    accepted: dict[str, int]
    partial: Partial
    duration: float
    median_norm: float = 0.0  # of the accepted updates, as sent: the next round's clipping reference
    sampling_rate: float = 1.0
    norms: list[float] = field(default_factory=list)
    staleness: list[int] = field(default_factory=list)  # async: of each update in the buffer


class Coordinator:
    """Selects devices, opens rounds, judges updates, and says when a round is over."""

    def __init__(
        self,
        settings: RoundSettings,
        strategy: Strategy,
        job: str,
        clock,
        seed: int = 0,
        next_round: int = 1,
        completed: int = 0,
        version: int = 0,
        norm_prior: float = 0.0,
        median_norm: float = 0.0,
        privacy: RoundPrivacy | None = None,
    ):
        self.settings = settings
        self.strategy = strategy
        self.job = job
        self.clock = clock
        # Differential privacy: each round's bound is the clip C, every update weighs 1, the
        # selection is a secret uniform sample, and a round that would exceed the budget never opens.
        self.privacy = privacy
        self.rng: random.Random = random.SystemRandom() if privacy is not None else random.Random(seed)
        self.stopped = ""  # why the job ended before its rounds (the privacy budget)
        self.devices: dict[str, DeviceInfo] = {}
        self.open: OpenRound | None = None
        self.next_round = next_round
        self.completed = completed
        self.version = version  # round id that produced the current global adapter (0: initial)
        self.norm_prior = norm_prior  # the first round's norm bound (see RoundSettings)
        self.median_norm = median_norm  # of the last completed round's updates (0: none yet)

    # -- devices -------------------------------------------------------------------------
    def device_status(self, device: str, online: bool, rank: int = 0, num_examples: int = 0) -> None:
        info = self.devices.setdefault(device, DeviceInfo(device))
        info.online = online
        info.last_seen = self.clock()
        if online:
            info.rank = rank or info.rank
            info.num_examples = num_examples or info.num_examples

    def online(self) -> list[str]:
        return sorted(d for d, info in self.devices.items() if info.online)

    @property
    def finished(self) -> bool:
        return bool(self.stopped) or (self.settings.rounds > 0 and self.completed >= self.settings.rounds)

    # -- opening -------------------------------------------------------------------------
    def maybe_open(self) -> OpenRound | None:
        if self.open is not None or self.finished:
            return None
        online = self.online()
        if len(online) < self.settings.min_devices:
            return None
        k = min(self.settings.devices_per_round or len(online), len(online))
        if self.privacy is not None:
            self.stopped = self.privacy.refuses(k, len(online))
            if self.stopped:
                return None
        selected = self.select(online, k)
        now = self.clock()
        self.open = OpenRound(
            self.next_round,
            selected,
            now,
            now + self.settings.round_timeout,
            self.version,
            partial=self.strategy.new_partial(),
            max_weight=self.weight_cap(selected),
            max_norm=self.norm_cap(len(selected)),
            sampling_rate=k / len(online),
        )
        self.next_round += 1
        return self.open

    def select(self, online: list[str], k: int) -> list[str]:
        """The round's devices: a uniform sample of ``k`` of ``online``. Under DP with
        amplification by sampling (``privacy.accounting: sampled``), Poisson sampling instead:
        each online device independently with probability ``q = k / online``, the sampling the
        accountant's ``PoissonSampledDpEvent`` composes (a fixed-size sample would need the
        replace-one analysis, at a far larger epsilon); so the round's size varies around ``k``
        and may be 0 (the round then fails at once, its quorum unmet)."""
        if self.privacy is not None and self.privacy.settings.accounting == "sampled" and k < len(online):
            q = k / len(online)
            return [d for d in online if self.rng.random() < q]
        return sorted(self.rng.sample(online, k))

    def weight_cap(self, selected: list[str]) -> int:
        """The most weight one device of ``selected`` may get (0: no cap): ``max_weight_ratio``
        times the median of the data sizes they announced, and at most ``max_num_examples``."""
        caps = []
        claimed = [
            self.devices[d].num_examples for d in selected if d in self.devices and self.devices[d].num_examples > 0
        ]
        if self.settings.max_weight_ratio and claimed:
            caps.append(max(1, int(self.settings.max_weight_ratio * float(np.median(claimed)))))
        if self.settings.max_num_examples:
            caps.append(self.settings.max_num_examples)
        return min(caps) if caps else 0

    def norm_cap(self, selected: int = 0) -> float:
        """This round's update norm bound (0: none): the smallest of ``max_update_norm``, and
        ``norm_clip_multiple`` times the last round's median norm or, before any round, the prior.
        Under differential privacy, DP's own bound alone (the clip, plus the devices' noise)."""
        if self.privacy is not None:
            return self.privacy.norm_bound(selected)
        s = self.settings
        caps = [s.max_update_norm] if s.max_update_norm else []
        if s.norm_clip_multiple:
            if self.median_norm > 0:
                caps.append(s.norm_clip_multiple * self.median_norm)
            elif self.norm_prior > 0:
                caps.append(self.norm_prior)
        return min(caps) if caps else 0.0

    def resume(self, state: OpenRound, replay: Iterable[Accepted] = ()) -> None:
        """Re-install a round persisted before a restart (its deadline is kept): its last
        checkpoint, then the updates committed after it (``StateStore.load``'s ``replay``), added
        again in their order, so the partial sums come out as they were."""
        self.open = state
        self.next_round = max(self.next_round, state.round + 1)
        for record in replay:
            if record.seq != len(state.accepted) + 1:
                raise ValueError(
                    f"round {state.round}: committed update {record.seq} follows {len(state.accepted)}; "
                    "the state store lost a row"
                )
            self.add(record.update, record.norm)

    # -- updates -------------------------------------------------------------------------
    def buffer_full(self) -> bool:
        """Whether the open round must close before it takes another update (async mode's
        buffer; a sync round closes on its own schedule, in ``maybe_close``)."""
        return False

    def expects_update_from(self, device: str) -> bool:
        """Whether the open round waits for an update of ``device`` (its missing chunks are asked for)."""
        return self.open is not None and device in self.open.selected

    def starts_from(self, base_version: int) -> bool:
        """Whether an update computed from ``base_version`` may count (sync: the round's own)."""
        return base_version == self.version

    def judge(self, job: str, update: ClientUpdate, base_version: int | None = None) -> Bounded:
        """Raise UpdateRejected unless the update belongs in the open round; else the update as
        it may count (``bounded``). ``base_version``: the version it was computed from (async
        mode weighs it by its staleness; sync mode checks it in ``starts_from``)."""
        rnd = self.open
        if job != self.job:
            raise UpdateRejected("wrong_job", f"update for job {job!r}, this aggregator runs {self.job!r}")
        if rnd is None:
            raise UpdateRejected(
                "no_open_round", f"round {update.round} from {update.device} arrived while no round is open"
            )
        if update.round != rnd.round:
            reason = "stale_round" if update.round < rnd.round else "future_round"
            raise UpdateRejected(reason, f"update for round {update.round}, open round is {rnd.round}")
        if update.device not in rnd.selected:
            raise UpdateRejected("not_selected", f"device {update.device} was not selected for round {rnd.round}")
        if update.device in rnd.accepted:
            raise UpdateRejected("duplicate", f"device {update.device} already contributed to round {rnd.round}")
        self.strategy.check(update)
        return self.bounded(update)

    def bounded(self, update: ClientUpdate) -> Bounded:
        """The update as it may count: its weight capped (``OpenRound.max_weight``) and its
        tensors clipped to ``OpenRound.max_norm`` (or UpdateRejected under ``norm_bound: reject``)."""
        rnd = self.open
        assert rnd is not None
        weight = min(update.num_examples, rnd.max_weight) if rnd.max_weight else update.num_examples
        if self.privacy is not None:
            weight = 1  # DP bounds each device's share, whatever data it claims
        norm = update_norm(update.tensors)
        bound = rnd.max_norm
        tensors = update.tensors
        if bound and norm > bound:
            if self.settings.norm_bound == "reject":
                raise UpdateRejected("norm_too_large", f"update norm {norm:.3g} exceeds {bound:g}")
            scale = np.float32(bound / norm)
            tensors = {k: v * scale for k, v in update.tensors.items()}
        return Bounded(
            ClientUpdate(update.device, update.round, update.rank, weight, tensors, update.metrics),
            norm,
            clipped=tensors is not update.tensors,
            weight_capped=weight < update.num_examples,
        )

    def accept(self, update: ClientUpdate, norm: float = 0.0, staleness: int = 0) -> Callable[[], None]:
        """Add the update (``norm``: its norm as sent) to the open round; returns an undo (to
        the state before this call), for when the update cannot be persisted."""
        undo = self.savepoint()
        self.add(update, norm, staleness)
        return undo

    def savepoint(self) -> Callable[[], None]:
        """An undo back to the open round as it is now: the aggregator takes one before a batch
        of updates and calls it if the batch cannot be committed (one copy of the partial per
        batch, not per update)."""
        rnd = self.open
        assert rnd is not None
        before = (
            Partial(
                {k: np.array(v, copy=True) for k, v in rnd.partial.sums.items()},
                rnd.partial.weight,
                rnd.partial.count,
                list(rnd.partial.devices),
            ),
            dict(rnd.accepted),
            list(rnd.norms),
        )

        def undo() -> None:
            rnd.partial, rnd.accepted, rnd.norms = before

        return undo

    def add(self, update: ClientUpdate, norm: float = 0.0, staleness: int = 0) -> Accepted:
        """Add a judged update to the open round (no undo); returns what the state store keeps
        of it to replay it (``Accepted``). ``staleness``: async mode's (``server.async_rounds``)."""
        rnd = self.open
        assert rnd is not None
        rnd.partial = self.strategy.accumulate(rnd.partial, update)
        rnd.accepted[update.device] = update.num_examples
        rnd.norms.append(norm)
        return Accepted(len(rnd.accepted), update, norm)

    # -- closing -------------------------------------------------------------------------
    def maybe_close(self) -> RoundOutcome | None:
        """Close when every selected device reported or dropped out, or at the deadline."""
        waiting = self.close_due()
        return None if waiting is None else self.close(waiting)

    def close_due(self) -> list[str] | None:
        """Whether the open round is over (every selected device reported or dropped out, or its
        deadline passed): None while it goes on, else the selected devices still online that have
        not reported. A sharded coordinator asks this, seals the round on its workers, and closes
        it (``close``) once their partials are merged (``server.shards``)."""
        rnd = self.open
        if rnd is None:
            return None
        now = self.clock()
        waiting = [d for d in rnd.selected if d not in rnd.accepted and self.devices.get(d, DeviceInfo(d)).online]
        enough = len(rnd.accepted) >= self.settings.min_updates
        if waiting and now < rnd.deadline:
            return None
        if not waiting and not enough and now < rnd.deadline and rnd.selected:
            return None  # everyone left: wait for the deadline, someone may come back
        return waiting

    def close(self, waiting: list[str]) -> RoundOutcome:
        """Close the open round as it is now; ``waiting``: its devices that never reported."""
        assert self.open is not None
        return self._close(self.open, self.clock(), waiting)

    def close_now(self, failure: str = "") -> RoundOutcome | None:
        """Close the open round now: a secure round once its sum is unmasked (its devices can
        add nothing more), or, with ``failure``, as failed for that reason."""
        rnd = self.open
        if rnd is None:
            return None
        if failure:
            rnd.accepted = {}
        return self._close(rnd, self.clock(), [], failure)

    def _close(self, rnd: OpenRound, now: float, waiting: list[str], failure: str = "") -> RoundOutcome:
        enough = len(rnd.accepted) >= self.settings.min_updates
        self.open = None
        ok = enough and not failure
        median_norm = float(np.median(rnd.norms)) if rnd.norms else 0.0
        if ok:
            self.completed += 1
            self.version = rnd.round
            self.median_norm = median_norm or self.median_norm
            reason = "all_reported" if not waiting else "deadline"
        else:
            reason = failure or f"quorum_not_met ({len(rnd.accepted)}/{self.settings.min_updates})"
        return RoundOutcome(
            rnd.round,
            ok,
            reason,
            rnd.selected,
            dict(rnd.accepted),
            rnd.partial,
            now - rnd.opened_at,
            median_norm,
            rnd.sampling_rate,
            list(rnd.norms),
        )
