"""Sharded aggregation: N aggregator workers share the update stream, a coordinator merges.

Partitioned by device, not by a shared subscription. Each device of a sharded job sends its
update to ``updates/<shard>/<device>``, ``shard = shard_of(device, N)`` (sha256 of the device
id, modulo the ``shards`` of the round announcement, protocol version 3), and worker ``k``
subscribes to ``updates/k/+`` only. So every chunk of an update, and every resend of it, reaches
the same worker: that worker alone judges the device (duplicates included) and no claim between
workers is needed. A shared subscription (``$share/<group>/...``) cannot do this on Mosquitto
2.0, which hands consecutive messages of one topic to different members (chunks 0, 2, 4 to one
worker and 1, 3, 5 to another; docs/benchmarks.md); EMQX's ``hash_topic`` strategy would keep a
device's chunks together, but a worker that restarts or leaves makes EMQX rehash, and a resend
then reaches a worker that never saw the first copy.

One round, coordinator (``ShardedRounds``, in the Lease holder's ``Aggregator``) and workers
(``server.shard_worker.ShardWorker``):

1. The coordinator opens the round as one aggregator does (selection, weight cap, norm bound),
   publishes the retained ``ShardPlan`` (state ``open``) on ``shards/plan``, then announces.
2. Worker ``k`` takes its devices' updates exactly as one aggregator takes all of them (the
   same ``Aggregator.handle_chunk`` / ``admit`` / group commit / ack), from the global adapter
   it follows on the retained ``global/<rank>/<i>`` topics, and after every group commit sends
   ``ShardProgress`` (the updates it just acknowledged) on ``shards/progress/k``.
3. The coordinator counts progress into its open round and decides the close exactly as today
   (``Coordinator.close_due``). Then it seals: ``ShardPlan`` state ``seal``. Each worker commits
   what it holds, stops taking the round (a later update is refused ``no_open_round``; a resend
   of one it took is still acknowledged ``duplicate``) and publishes its partial sums
   (``shards/partial/k``, float64, ``core.protocol.encode_partial``), again whenever the seal is
   published again; the coordinator republishes it every ``resend_s`` while a partial is missing.
4. With all N partials the coordinator merges them (``Strategy.merge``), takes the round's
   accepted set and norms from them (not from progress: those are only for deciding the close),
   and closes the round as one aggregator does (DP noise, ``finalize``, save, publish).

Exact acknowledgements: a worker acknowledges an update only after its group commit, into its
own state store, which replays it after a SIGKILL; a sealed round is never reopened; and the
coordinator merges only after every worker sealed. A worker that restarts takes no update until
it has read the retained plan (a ``retry_later`` until then), so a sealed round stays sealed.

What cannot be sharded yet is refused when the configuration loads (``check_shards``).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from core.errors import ConfigError, ProtocolError
from core.messages import (
    MAX_SHARD_MESSAGE_BYTES,
    MAX_SHARDS,
    PartialHeader,
    PlanState,
    ShardChannel,
    ShardPlan,
    ShardProgress,
    TopicRef,
    parse_shard_progress,
    shard_of,
)
from core.protocol import Reassembler, decode_partial
from server.rounds import RoundOutcome, RoundSettings
from server.strategies.base import ClientUpdate, Partial, Strategy

if TYPE_CHECKING:
    from server.aggregator import Aggregator

log = logging.getLogger("fedlora.shards")

COORDINATOR = "coordinator"
WORKER = "worker"
ROLES = (COORDINATOR, WORKER)
# A partial holds the adapter's sums plus a strategy's extra sums per module (products, residuals):
# the coordinator accepts at most this many times what its own strategy makes of one update, and
# at least this many times the adapter's values.
PARTIAL_VALUES_SLACK = 4


@dataclass
class ShardSettings:
    """Sharded aggregation (``server.shards``).

    count: aggregator workers that share the update stream (1: none; one process takes every
        update and the protocol is exactly that of an unsharded job). Devices of a job with
        ``count`` > 1 send to ``updates/<shard>/<device>``.
    role: ``coordinator`` (runs the rounds: selection, close, merge of the workers' partials,
        the global adapter; with leader election, only the Lease holder) or ``worker`` (takes the
        updates of shard ``index``, with its own state directory).
    index: a worker's shard, 0 .. count - 1 (-1: the number that ends the pod's name, a
        StatefulSet's ordinal, from ``POD_NAME`` or the host name).
    resend_s: while a worker's sealed partial is missing, the coordinator asks again this often.
    """

    count: int = 1
    role: str = COORDINATOR
    index: int = -1
    resend_s: float = 5.0

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_SHARDS:
            raise ConfigError(f"shards.count must be in [1, {MAX_SHARDS}], got {self.count}")
        if self.role not in ROLES:
            raise ConfigError(f"shards.role must be one of {', '.join(ROLES)}, not {self.role!r}")
        if self.role == WORKER and self.count < 2:
            raise ConfigError("shards.role worker needs shards.count >= 2 (one aggregator takes every update)")
        if not -1 <= self.index < self.count:
            raise ConfigError(f"shards.index must be -1 (the pod's ordinal) or in [0, {self.count}), got {self.index}")
        if not 0.5 <= self.resend_s <= 3600:
            raise ConfigError(f"shards.resend_s must be in [0.5, 3600], got {self.resend_s}")

    @property
    def sharded(self) -> bool:
        return self.count > 1

    def shard_index(self, name: str = "") -> int:
        """This worker's shard: ``index``, or the ordinal at the end of ``name`` (default: the pod's)."""
        if self.index >= 0:
            return self.index
        name = name or os.environ.get("POD_NAME") or socket.gethostname()
        match = re.search(r"-(\d+)$", name)
        if match is None or int(match.group(1)) >= self.count:
            raise ConfigError(
                f"shards.index is -1 but {name!r} does not end in -<ordinal> below shards.count {self.count}; "
                "set shards.index"
            )
        return int(match.group(1))


def check_shards(
    settings: ShardSettings, rounds: RoundSettings, robust: str, secure: bool, adaptive_clip: bool
) -> None:
    """Refuse, at configuration time, what sharded aggregation cannot do yet."""
    if not settings.sharded:
        return
    if secure:
        raise ConfigError(
            "shards.count > 1 does not work with secure_aggregation: its key agreement, shares and "
            "unmasking span all of a round's devices, not one shard's; use shards.count 1"
        )
    if rounds.mode != "sync":
        raise ConfigError(
            "shards.count > 1 needs rounds.mode sync: an async buffer closes after a count of updates, "
            "which the coordinator learns only after workers acknowledged more; use shards.count 1"
        )
    if robust != "mean":
        raise ConfigError(
            f"shards.count > 1 supports robust.method mean only, not {robust!r}: the robust methods keep "
            "every device's terms until the round closes, which is not a sum the workers can merge"
        )
    if adaptive_clip:
        raise ConfigError(
            "shards.count > 1 does not work with privacy.adaptive_clip: the next clip is estimated from each "
            "update's below-clip bit, which stays on the worker; use a fixed clip or shards.count 1"
        )


def partial_values_bound(strategy: Strategy, shapes: dict[str, tuple[int, ...]], rank: int) -> int:
    """The most float64 values a worker's partial may hold: what ``strategy`` sums for one
    update of the full adapter (its products and residuals included), with slack."""
    zeros = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
    one = strategy.accumulate(strategy.new_partial(), ClientUpdate("bound", 0, rank, 1, zeros))
    values = sum(int(np.asarray(v).size) for v in one.sums.values())
    return PARTIAL_VALUES_SLACK * max(values, sum(int(np.prod(s)) for s in shapes.values()))


def merge_partials(strategy: Strategy, parts: list[Partial]) -> Partial:
    """The round's partial from its shards' partials (``Strategy.merge``, in shard order)."""
    out = strategy.new_partial()
    for part in parts:
        out = strategy.merge(out, part)
    return out


@dataclass
class SealedShard:
    """A worker's sealed partial of one round, as the coordinator took it."""

    header: PartialHeader
    partial: Partial


@dataclass
class Sealing:
    """A round the coordinator decided to close and waits to merge: the devices it was still
    waiting for when it decided, the partials in so far, when it last asked for them."""

    round: int
    waiting: list[str]
    started: float
    asked_at: float
    partials: dict[int, SealedShard] = field(default_factory=dict)


class ShardedRounds:
    """The coordinator's side of sharded aggregation, wired into its ``Aggregator``: the plan
    to the workers, their progress into the open round, the seal, the merge (see the module doc)."""

    def __init__(self, aggregator: Aggregator):
        self.agg = aggregator
        self.settings: ShardSettings = aggregator.cfg.shards
        self.count = self.settings.count
        self.topics = aggregator.topics
        m = aggregator.manifest
        self.max_values = partial_values_bound(aggregator.strategy, dict(m.shapes), m.rank)
        self.partials = Reassembler(8 * self.max_values + MAX_SHARD_MESSAGE_BYTES, max_pending=2 * self.count)
        self.sealing: Sealing | None = None
        self._finished_sent = False

    # -- to the workers --------------------------------------------------------------------
    def subscribe(self) -> None:
        self.agg.link.subscribe(self.topics.shard_progress_filter)
        self.agg.link.subscribe(self.topics.shard_partial_filter)

    def plan(self, state: PlanState) -> ShardPlan:
        c = self.agg.coordinator
        rnd = c.open
        if rnd is None:
            return ShardPlan(self.agg.cfg.job, state, c.next_round - 1, self.count, base_version=c.version)
        return ShardPlan(
            self.agg.cfg.job,
            state,
            rnd.round,
            self.count,
            base_version=rnd.base_version,
            selected=tuple(rnd.selected),
            max_weight=rnd.max_weight,
            max_norm=rnd.max_norm,
            opened_at=rnd.opened_at,
            deadline=rnd.deadline,
        )

    def publish(self, state: PlanState):
        return self.agg.link.publish(self.topics.shard_plan, self.plan(state).to_bytes(), retain=True)

    def opened(self) -> None:
        """A round opened: the workers take its updates from now on."""
        for k in range(self.count):
            self.agg.metrics.shard_updates.labels(str(k)).set(0)
        self.publish(PlanState.OPEN)

    def republish(self) -> None:
        """The plan as it stands (a restart, a reconnect): workers report their open round's
        updates again (a restarted coordinator lost the reports) and change nothing else. With
        no round yet, a plan an earlier run of the job left on the broker is cleared."""
        if self.sealing is not None:
            self.publish(PlanState.SEAL)
        elif self.agg.coordinator.open is not None:
            self.publish(PlanState.OPEN)
        elif self.agg.coordinator.finished:
            self.publish(PlanState.FINISHED)
        else:
            self.agg.link.publish(self.topics.shard_plan, b"", retain=True)

    # -- from the workers ------------------------------------------------------------------
    def handle(self, ref: TopicRef, payload: bytes) -> None:
        if ref.shard >= self.count:
            raise ProtocolError(f"shard {ref.shard} of a job with {self.count} shards")
        if ref.channel is ShardChannel.PROGRESS:
            self.progress(parse_shard_progress(payload))
        elif ref.channel is ShardChannel.PARTIAL:
            whole = self.partials.add(f"shard-{ref.shard}", payload)
            if whole is not None:
                header, sums = decode_partial(whole, self.max_values)
                self.take_partial(ref.shard, header, sums)
        else:
            self.agg.refuse("shards", "unexpected_topic", f"the coordinator does not read {ref.channel}")

    def progress(self, msg: ShardProgress) -> None:
        """A worker's group commit: its updates count toward closing the open round."""
        rnd = self.agg.coordinator.open
        if msg.job != self.agg.cfg.job or rnd is None or msg.round != rnd.round or self.sealing is not None:
            return  # a late report of a round being merged or closed: the partial says it all
        for a in msg.accepted:
            if a.device not in rnd.accepted and shard_of(a.device, self.count) == msg.shard:
                rnd.accepted[a.device] = a.weight
                rnd.norms.append(a.norm)
        counted = sum(1 for d in rnd.accepted if shard_of(d, self.count) == msg.shard)
        self.agg.metrics.shard_updates.labels(str(msg.shard)).set(counted)

    def take_partial(self, shard: int, header: PartialHeader, sums: dict) -> None:
        s = self.sealing
        if header.job != self.agg.cfg.job or header.shard != shard:
            raise ProtocolError(f"a partial of job {header.job!r}, shard {header.shard} on shard {shard}'s topic")
        if s is None or header.round != s.round:
            return  # an answer to an earlier seal (asked again): that round is closed
        rnd = self.agg.coordinator.open
        assert rnd is not None
        selected = set(rnd.selected)
        for a in header.accepted:
            if a.device not in selected or shard_of(a.device, self.count) != shard:
                self.agg.refuse("shards", "wrong_shard", f"shard {shard}'s partial holds {a.device}, not its device")
                return
        if shard not in s.partials:
            partial = Partial(sums, header.weight, header.count, [a.device for a in header.accepted])
            s.partials[shard] = SealedShard(header, partial)
            log.info("round %d: partial of shard %d in (%d updates)", s.round, shard, header.count)
        self.agg.metrics.shard_partials_waiting.set(self.count - len(s.partials))

    # -- closing ---------------------------------------------------------------------------
    def tick(self) -> RoundOutcome | None:
        """Seal the open round when it is due; close it once every worker's partial is in."""
        c = self.agg.coordinator
        if self.sealing is None:
            if c.open is None:
                if c.finished and not self._finished_sent:
                    # The last message of a finished job: out before the coordinator disconnects.
                    self.publish(PlanState.FINISHED).wait_for_publish(5)
                    self._finished_sent = True
                return None
            waiting = c.close_due()
            if waiting is None:
                return None
            now = time.monotonic()
            self.sealing = Sealing(c.open.round, waiting, now, now)
            self.agg.metrics.shard_partials_waiting.set(self.count)
            self.publish(PlanState.SEAL)
            log.info("round %d: sealing it on %d workers", c.open.round, self.count)
        s = self.sealing
        if len(s.partials) < self.count:
            if time.monotonic() - s.asked_at >= self.settings.resend_s:
                missing = [k for k in range(self.count) if k not in s.partials]
                log.warning(
                    "round %d: waiting %.0fs for the partials of shards %s; asking again",
                    s.round,
                    time.monotonic() - s.started,
                    ", ".join(map(str, missing)),
                )
                s.asked_at = time.monotonic()
                self.publish(PlanState.SEAL)
            return None
        return self.close(s)

    def close(self, s: Sealing) -> RoundOutcome:
        """Merge the sealed partials into the open round (its sums, accepted set and norms) and close it."""
        c = self.agg.coordinator
        rnd = c.open
        assert rnd is not None
        shards = [s.partials[k] for k in range(self.count)]
        rnd.partial = merge_partials(self.agg.strategy, [p.partial for p in shards])
        rnd.accepted = {a.device: a.weight for p in shards for a in p.header.accepted}
        rnd.norms = [a.norm for p in shards for a in p.header.accepted]
        reports = [a for p in shards for a in p.header.accepted]
        self.agg.took_elsewhere(
            sum(a.wire_bytes for a in reports), sum(a.raw_bytes for a in reports), [dict(a.metrics) for a in reports]
        )
        self.sealing = None
        self.agg.metrics.shard_partials_waiting.set(0)
        log.info(
            "round %d: merged %d partials (%d updates) in %.2fs after sealing",
            s.round,
            self.count,
            len(rnd.accepted),
            time.monotonic() - s.started,
        )
        return c.close([d for d in s.waiting if d not in rnd.accepted])
