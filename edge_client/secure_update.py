"""A device's part in one secure-aggregation round: keys, shares, the masked input, the reveal.

``SecureSession`` is the device side of ``core.secagg`` as a small state machine over the typed
messages of ``core.messages`` (no MQTT, no clock: ``edge_client.device`` publishes what it
returns and feeds it what arrives). One session per round; its secrets live in memory only,
so a device that restarts mid-round drops out of that round's secure sum (the protocol
tolerates dropouts; it never reuses a key or a seed).

The checks here are what keeps an honest device safe from a curious or lying aggregator:
its own keys must be in the key list as it sent them; the Shamir threshold must be a majority
of its peers (so fewer than half of them cannot rebuild its secrets with the aggregator); the
peers it masks with are those whose sealed shares opened, and at least the threshold; and it
reveals, per peer, one share only (seed of a survivor or mask key of a dropped device, never
both), only for a survivor set the threshold can unmask.
"""

from __future__ import annotations

import hashlib
import secrets

import numpy as np

from core.errors import ProtocolError
from core.messages import (
    SecaggForward,
    SecaggKeyList,
    SecaggKeys,
    SecaggReveal,
    SecaggShares,
    SecaggUnmask,
)
from core.protocol import RING_CODEC, Envelope
from core.secagg import (
    DeviceKeys,
    Quantizer,
    RandomBytes,
    Shares,
    flatten,
    masked_input,
    min_threshold,
    new_keys,
    open_shares,
    reveal,
    seal_shares,
    split_words,
)

# What a masked input reports in the clear: nothing about the data (loss and accuracy would be).
PUBLIC_METRICS = ("steps", "step_time_s", "train_seconds", "peak_rss_bytes")


class SecureSession:
    """One device's secure-aggregation round.

    ``keys_message`` first; then ``take_key_list`` (its answer: the sealed shares),
    ``take_forward`` (the shares addressed to this device: from then on it knows its masking
    peers), ``masked_update`` (once it has trained and has the forward) and ``take_unmask``
    (its answer: the reveal). A message for another round or job is refused with a
    ProtocolError; one that would make the device unsafe ends the session (``failed``)."""

    def __init__(self, job: str, round_id: int, me: str, random_bytes: RandomBytes = secrets.token_bytes):
        self.job, self.round, self.me = job, round_id, me
        self.random_bytes = random_bytes
        self.keys: DeviceKeys = new_keys(random_bytes)
        self.self_seed = random_bytes(32)
        self.threshold = 0
        self.clip = 0.0
        self.devices = 0  # in the key list: every code's quantizer is sized for them
        self.cipher_keys: dict[str, bytes] = {}  # peer -> cipher public key (key list, without me)
        self.mask_keys: dict[str, bytes] = {}
        self.held: dict[str, Shares] = {}  # owner -> the shares it gave me (opened)
        self.masking: tuple[str, ...] | None = None  # the peers I mask with, once forwarded
        self.shares_sent: SecaggShares | None = None
        self.revealed: SecaggReveal | None = None
        self.update: Envelope | None = None  # the trained (clipped, noised) change, waiting for the forward
        self.masked = False  # the masked input was built (and handed to the device's pending state)
        self.failed = ""  # why this device left the round's secure sum

    # -- step 1: keys --------------------------------------------------------------------
    def keys_message(self) -> SecaggKeys:
        return SecaggKeys(
            self.job,
            self.round,
            self.me,
            self.keys.cipher_public,
            self.keys.mask_public,
            hashlib.sha256(self.self_seed).digest(),
        )

    def _check_round(self, job: str, round_id: int, what: str) -> None:
        if job != self.job or round_id != self.round:
            raise ProtocolError(f"{what} of job {job!r} round {round_id}, this session is {self.job!r} {self.round}")

    # -- step 2: shares ------------------------------------------------------------------
    def take_key_list(self, msg: SecaggKeyList) -> SecaggShares | None:
        """The sealed shares for the key list's peers; None if this device is not in it."""
        self._check_round(msg.job, msg.round, "key list")
        if self.shares_sent is not None or self.failed:
            return self.shares_sent
        mine = [p for p in msg.devices if p.device == self.me]
        if not mine:
            self.failed = "not in the round's key list (our keys came too late)"
            return None
        if (mine[0].cipher, mine[0].mask) != self.keys.public:
            self.failed = "the key list carries other keys for this device: refusing to share"
            return None
        peers = [p for p in msg.devices if p.device != self.me]
        if msg.threshold < min_threshold(len(peers)) or msg.threshold > len(peers):
            self.failed = f"threshold {msg.threshold} is not a majority of our {len(peers)} peers: refusing to share"
            return None
        self.threshold, self.clip, self.devices = msg.threshold, msg.clip, len(msg.devices)
        self.cipher_keys = {p.device: p.cipher for p in peers}
        self.mask_keys = {p.device: p.mask for p in peers}
        sealed = seal_shares(
            self.me,
            self.keys,
            self.self_seed,
            self.cipher_keys,
            self.threshold,
            self.job,
            self.round,
            self.random_bytes,
        )
        self.shares_sent = SecaggShares(self.job, self.round, self.me, sealed)
        return self.shares_sent

    # -- step 3: the masked input --------------------------------------------------------
    def take_forward(self, msg: SecaggForward) -> None:
        """The shares addressed to this device: their owners are the peers it masks with."""
        self._check_round(msg.job, msg.round, "forwarded shares")
        if self.masking is not None or self.failed:
            return
        if self.shares_sent is None:
            raise ProtocolError("forwarded shares before this device sent its own")
        unknown = set(msg.shares) - set(self.cipher_keys)
        if unknown:
            self.failed = f"forwarded shares from {sorted(unknown)[0]!r}, not a peer of the key list"
            return
        if len(msg.shares) < self.threshold:
            self.failed = f"only {len(msg.shares)} peers sent shares, below the threshold {self.threshold}"
            return
        try:
            held = {
                owner: open_shares(self.me, self.keys, owner, self.cipher_keys[owner], sealed, self.job, self.round)
                for owner, sealed in msg.shares.items()
            }
        except ProtocolError as exc:
            self.failed = f"forwarded shares do not open: {exc}"
            return
        self.held = held
        self.masking = tuple(sorted(held))

    def ready(self) -> bool:
        """Trained and forwarded: the masked input can be built."""
        return self.update is not None and self.masking is not None and not self.masked and not self.failed

    def masked_update(self, rng: np.random.Generator | None = None) -> Envelope:
        """The trained change as a masked envelope: clipped to ``[-clip, clip]`` per value,
        quantized into the ring (stochastic rounding) and masked with the self mask and one
        pairwise mask per masking peer. ``rng``: the rounding's randomness (tests)."""
        if not self.ready():
            raise ProtocolError("the masked input needs the trained change and the forwarded shares")
        assert self.update is not None and self.masking is not None
        update = self.update
        codes = Quantizer(self.clip, self.devices).encode(flatten(update.tensors), rng)
        peers = {p: self.mask_keys[p] for p in self.masking}
        words = masked_input(codes, self.me, self.keys, self.self_seed, peers, self.job, self.round)
        shapes = {k: tuple(v.shape) for k, v in update.tensors.items()}
        self.masked = True
        return Envelope(
            kind="masked",
            job=self.job,
            round=self.round,
            sender=self.me,
            rank=update.rank,
            codec=RING_CODEC,
            tensors=split_words(words, shapes),
            num_examples=0,  # every input weighs 1: the data size is the device's own business
            metrics={k: v for k, v in update.metrics.items() if k in PUBLIC_METRICS},
            base_version=update.base_version,
        )

    # -- step 4: the reveal --------------------------------------------------------------
    def take_unmask(self, msg: SecaggUnmask) -> SecaggReveal | None:
        """Per peer, the one share this device may reveal; None if it is not a survivor."""
        self._check_round(msg.job, msg.round, "unmask request")
        if self.revealed is not None:
            return self.revealed
        if self.masking is None or not self.masked or self.me not in msg.survivors:
            return None
        named = set(msg.survivors) | set(msg.dropped)
        expected = set(self.masking) | {self.me}
        if named != expected:
            self.failed = "the unmask request does not name exactly the round's masking devices: refusing to reveal"
            return None
        if len(msg.survivors) <= self.threshold:
            self.failed = f"{len(msg.survivors)} survivors cannot unmask with threshold {self.threshold}: not revealing"
            return None
        others = [s for s in msg.survivors if s != self.me]
        self.revealed = SecaggReveal(self.job, self.round, self.me, reveal(self.held, others, msg.dropped))
        return self.revealed
