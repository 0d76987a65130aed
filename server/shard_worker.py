"""A sharded aggregation worker: the updates of one shard's devices, into one persisted partial.

A ``ShardWorker`` is an ``Aggregator`` that takes updates exactly as one aggregator does
(reassembly, ``admit``, group commit into its own state store, acks) but decides no round: the
coordinator's retained ``ShardPlan`` opens and seals them (``server.shards`` has the protocol).
It reads only ``updates/<k>/+``, the plan and the global adapter (each rank's retained full
copy, decoded as the devices decode it, so a device's change is added to the very adapter the
device started from); it announces nothing and publishes no adapter.
"""

from __future__ import annotations

import logging
import time

from core.errors import ProtocolError, UpdateRejected
from core.messages import (
    PartialHeader,
    PartialTensor,
    PlanState,
    ShardAccepted,
    ShardChannel,
    ShardPlan,
    ShardProgress,
    TopicKind,
    TopicRef,
    parse_shard_plan,
    shard_of,
)
from core.protocol import Envelope, Reassembler, adapter_part, decode_envelope, encode_partial, parse_chunk
from core.transport import MqttLink
from server.aggregator import SUMMARIZED_METRICS, Aggregator, RankDownlink, raw_bytes
from server.config import ServerConfig
from server.metrics import Metrics
from server.rounds import OpenRound

log = logging.getLogger("fedlora.shard_worker")


class ShardWorker(Aggregator):
    """Worker ``shard`` of ``cfg.shards.count`` (see the module doc)."""

    def __init__(self, cfg: ServerConfig, link: MqttLink, shard: int, metrics: Metrics | None = None, clock=time.time):
        super().__init__(cfg, link, metrics, clock=clock)
        self.shard = shard
        self.count = cfg.shards.count
        self.plan: ShardPlan | None = None  # the coordinator's latest, once read (none: take no update)
        self.sealed: int | None = None  # the round this worker sealed (it takes no new update of it)
        self.globals = Reassembler(8 * cfg.max_update_bytes, max_pending=64, per_source=2)
        # the open round's updates committed by this process: (wire bytes, raw bytes, metrics)
        self._reports: dict[str, tuple[int, int, dict[str, float]]] = {}

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        # The plan first: the broker sends retained messages in the order of the subscriptions.
        self.link.subscribe(self.topics.shard_plan)
        self.link.subscribe(self.topics.global_all_filter)
        self.link.subscribe(self.topics.shard_update_filter(self.shard))
        self.link.on_connect_hooks.append(self._on_reconnect)
        self.metrics.last_progress.set_to_current_time()
        log.info("worker of shard %d of %d started", self.shard, self.count)

    def republish(self) -> None:
        self._resync = False  # the broker sends the retained plan and adapters again on resubscription

    def announce(self) -> None:
        """Workers announce nothing: the coordinator does."""

    def publish_global(self) -> int:
        """Workers publish no adapter: they follow the coordinator's."""
        return 0

    def tick(self) -> None:
        if self._resync:
            self.republish()
        self.request_missing_chunks()

    # -- messages ------------------------------------------------------------------------------
    def dispatch(self, ref: TopicRef, topic: str, payload: bytes) -> None:
        if ref.kind is TopicKind.UPDATES and ref.shard == self.shard:
            self.shard_chunk(ref.device, payload)
        elif ref.kind is TopicKind.SHARDS and ref.channel is ShardChannel.PLAN:
            if payload:  # empty: a plan of an earlier run, cleared
                self.take_plan(parse_shard_plan(payload))
        elif ref.kind is TopicKind.GLOBAL:
            self.follow_global(ref.rank, payload)
        else:
            self.refuse(ref.kind.value, "unexpected_topic", f"shard {self.shard}'s worker does not read {topic[:120]}")

    def shard_chunk(self, device: str, message: bytes) -> None:
        """A chunk on this shard's topic: refused (once per update) unless the device is ours."""
        if shard_of(device, self.count) == self.shard:
            self.handle_chunk(device, message)
            return
        msg_id = parse_chunk(message).msg_id
        if not self._answered.again(device, msg_id):
            exc = UpdateRejected(
                "wrong_shard",
                f"{device} belongs to shard {shard_of(device, self.count)} of {self.count}, not {self.shard}",
            )
            self.reject(device, None, exc, msg_id)

    def follow_global(self, rank: int, message: bytes) -> None:
        """A chunk of a rank's full global adapter (retained): once whole, it is the base of that
        rank's updates, decoded exactly as the coordinator decoded what it published."""
        if not message:
            return  # a cleared chunk of a larger earlier version
        payload = self.globals.add(f"rank-{rank}", message)
        if payload is None:
            return
        env = decode_envelope(payload, self.global_limits, reassembled=True)
        if env.kind != "global" or env.rank != rank or env.job != self.cfg.job:
            raise ProtocolError(f"global/{rank} holds a {env.kind} envelope of job {env.job!r} at rank {env.rank}")
        d = self._downlinks.setdefault(rank, RankDownlink())
        if d.version is None or env.round >= d.version:
            d.version, d.view, d.adapter = env.round, env.tensors, adapter_part(env.tensors)

    # -- rounds, as the coordinator plans them ---------------------------------------------------
    def take_plan(self, plan: ShardPlan) -> None:
        if plan.job != self.cfg.job or plan.shards != self.count:
            self.refuse(
                "shards", "wrong_plan", f"plan of job {plan.job!r} for {plan.shards} shards; this worker: {self.count}"
            )
            return
        self.plan = plan
        c = self.coordinator
        if plan.state is PlanState.FINISHED:
            self.commit_batch()
            c.stopped = "the coordinator finished the job"
            return
        if c.open is not None and c.open.round > plan.round:
            return  # an older plan, delivered late
        if c.open is None or c.open.round < plan.round:
            self.open_round(plan)
        elif plan.state is PlanState.OPEN:
            self.report(self.accepted_so_far())  # the plan again: the coordinator may have restarted
        if plan.state is PlanState.SEAL:
            self.seal()

    def open_round(self, plan: ShardPlan) -> None:
        """Take updates of ``plan.round``. A round this worker still holds was sealed and merged:
        the coordinator plans the next one only after every worker's partial is in."""
        self.commit_batch()
        c = self.coordinator
        if c.open is not None:
            log.info(
                "round %d merged by the coordinator; shard %d opens round %d", c.open.round, self.shard, plan.round
            )
        c.open = OpenRound(
            plan.round,
            list(plan.selected),
            plan.opened_at,
            plan.deadline,
            plan.base_version,
            partial=self.strategy.new_partial(),
            max_weight=plan.max_weight,
            max_norm=plan.max_norm,
        )
        c.version = plan.base_version
        c.next_round = plan.round + 1
        self.sealed = None
        self._round_bytes = {"wire": 0, "raw": 0}
        self._round_metrics = []
        self._reports = {}
        self.metrics.round.set(plan.round)
        self._save()
        self._event("round_opened", round=plan.round, shard=self.shard, base_version=plan.base_version)

    def seal(self) -> None:
        """Stop taking the open round and publish its partial (again, when asked again)."""
        self.commit_batch()
        rnd = self.coordinator.open
        assert rnd is not None
        if self.sealed != rnd.round:
            self.sealed = rnd.round
            self._event("round_sealed", round=rnd.round, shard=self.shard, updates=len(rnd.accepted))
            log.info("round %d sealed on shard %d: %d updates", rnd.round, self.shard, len(rnd.accepted))
        p = rnd.partial
        header = PartialHeader(
            job=self.cfg.job,
            shard=self.shard,
            round=rnd.round,
            weight=float(p.weight),
            count=len(rnd.accepted),
            accepted=tuple(self.accepted_so_far(reported=True)),
            tensors=tuple(PartialTensor(k, tuple(v.shape)) for k, v in p.sums.items()),
        )
        self.link.publish_chunked(self.topics.shard_partial(self.shard), encode_partial(header, p.sums))

    # -- updates -------------------------------------------------------------------------------
    def admit(self, device: str, env: Envelope):
        rnd = self.coordinator.open
        if self.plan is None:
            raise UpdateRejected("retry_later", f"shard {self.shard}'s worker has not read its coordinator's plan yet")
        if rnd is not None and env.round == rnd.round:
            if self.sealed == rnd.round and device not in rnd.accepted:
                raise UpdateRejected("no_open_round", f"round {rnd.round} is closed: it is being merged")
            d = self._downlinks.get(env.rank)
            if env.base_version == rnd.base_version and (d is None or d.version != rnd.base_version):
                raise UpdateRejected(
                    "retry_later", f"shard {self.shard} has not received global version {rnd.base_version} yet"
                )
        return super().admit(device, env)

    def commit_batch(self) -> None:
        """Group commit as one aggregator's, then the coordinator hears what was acknowledged."""
        batch = self._batch
        super().commit_batch()
        rnd = self.coordinator.open
        if not batch or rnd is None:
            return
        for p in batch:  # for the round's history, with the sealed partial
            if p.device in rnd.accepted and p.env.round == rnd.round:
                metrics = {k: v for k, v in p.env.metrics.items() if k in SUMMARIZED_METRICS}
                self._reports[p.device] = (p.nbytes, raw_bytes(p.env), metrics)
        self.report(
            [
                ShardAccepted(p.device, p.record.update.num_examples, p.bounded.norm)
                for p in batch
                if p.device in rnd.accepted and p.env.round == rnd.round
            ]
        )

    def report(self, accepted: list[ShardAccepted]) -> None:
        """Tell the coordinator these updates of the open round are committed (and acknowledged)."""
        rnd = self.coordinator.open
        if accepted and rnd is not None:
            progress = ShardProgress(self.cfg.job, self.shard, rnd.round, tuple(accepted))
            self.link.publish(self.topics.shard_progress(self.shard), progress.to_bytes())

    def accepted_so_far(self, reported: bool = False) -> list[ShardAccepted]:
        """The open round's updates; ``reported``: with their bytes and metrics (the sealed
        partial's; those committed before a restart of this worker have none)."""
        rnd = self.coordinator.open
        assert rnd is not None
        if len(rnd.norms) != len(rnd.accepted):
            raise RuntimeError(f"round {rnd.round}: {len(rnd.accepted)} updates but {len(rnd.norms)} norms")
        if not reported:
            return [ShardAccepted(d, w, n) for (d, w), n in zip(rnd.accepted.items(), rnd.norms)]
        return [
            ShardAccepted(d, w, n, *self._reports.get(d, (0, 0, {})))
            for (d, w), n in zip(rnd.accepted.items(), rnd.norms)
        ]
