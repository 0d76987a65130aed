"""The aggregator process: MQTT in, decisions by the Coordinator, global adapters out.

Where an update goes: chunk on ``updates/<device>`` -> Reassembler (size limit, hash) ->
decode_envelope -> Coordinator.judge (job, round, selection, duplicate, strategy checks,
norm) -> Strategy.accumulate into the round's partial -> the batch of updates the inbox held
committed in one transaction (group commit: ``StateStore.append``, or a checkpoint) -> an ack
to each device of the batch.
When the Coordinator closes the round: Strategy.finalize -> state saved -> new global
adapter published (retained) -> next round announced (retained).
"""

from __future__ import annotations

import functools
import logging
import queue
import shutil
import statistics
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.bundle import Bundle, choose_bundle
from core.errors import BundleError, PayloadTooLarge, ProtocolError, UpdateRejected
from core.guard import Refusals, SenderLimits
from core.messages import (
    RETRY_REASONS,
    Ack,
    AckResult,
    Announcement,
    Presence,
    PrivacyInfo,
    RepairRequest,
    RoundMode,
    RoundState,
    SecaggChannel,
    SecaggInfo,
    StrategyInfo,
    TopicKind,
    TopicRef,
    TrainInfo,
    parse_status,
)
from core.protocol import (
    BASE_DELTA_PREFIX,
    Envelope,
    EnvelopeLimits,
    Reassembler,
    ReassemblyBusy,
    Topics,
    adapter_part,
    decode_envelope,
    encode_envelope,
    parse_chunk,
)
from core.transport import MqttLink
from edge_client.runtime import read_parameters
from server.async_rounds import ASYNC, AsyncCoordinator, buffer_summary
from server.config import ServerConfig
from server.metrics import Metrics
from server.peft_adapter import write_peft_adapter
from server.privacy import DifferentialPrivacy, below_clip_bits, linear_keys
from server.robust import RobustStrategy, with_robust
from server.rounds import Accepted, Bounded, Coordinator, RoundOutcome
from server.secure_rounds import SecureRounds
from server.shards import ShardedRounds
from server.store import StaleTerm, StateStore, StoreUnavailable
from server.strategies import make_strategy as build_strategy
from server.strategies.base import AdapterLayout, ClientUpdate, GlobalModel, Partial, Strategy

log = logging.getLogger("fedlora.aggregator")

Evaluator = Callable[[dict[str, np.ndarray]], dict]
STEP_OVERRUN_S = 1.0  # how long past its timeout one step goes on draining a busy inbox
AGGREGATOR_TOPICS = (TopicKind.SHARDS, TopicKind.GLOBAL)  # what the aggregator tier publishes for itself


def make_strategy(cfg: ServerConfig, bundle: Bundle) -> Strategy:
    """The configured strategy over the adapter of ``bundle`` (the top of the rank ladder)."""
    m = bundle.manifest
    strategy = build_strategy(cfg.strategy, AdapterLayout.from_manifest(m), rank=m.rank, **cfg.strategy_settings)
    return with_robust(strategy, cfg.robust)


def downlink_tensors(strategy: Strategy, model: GlobalModel, rank: int) -> dict[str, np.ndarray]:
    """What a device of ``rank`` loads: its adapter slice, the cumulative change to frozen
    weights (FLoRA, FedEx-LoRA) under ``base_delta/<name>``, and the strategy's factored
    frozen changes (``Strategy.frozen_for_device``)."""
    tensors = strategy.for_device(model, rank)
    tensors.update({BASE_DELTA_PREFIX + name: value for name, value in model.base_delta.items()})
    tensors.update(strategy.frozen_for_device(model, rank))
    return tensors


class Aggregator:
    def __init__(
        self,
        cfg: ServerConfig,
        link: MqttLink,
        metrics: Metrics | None = None,
        evaluator: Evaluator | None = None,
        clock=time.time,
        on_round_closed: Callable[[dict], None] | None = None,
        claim_term: bool = False,
        evaluate_every: int = 1,
    ):
        """``evaluator`` scores the global adapter of every ``evaluate_every``-th completed round
        (async: version), and of the last one."""
        if evaluate_every < 1:
            raise ValueError(f"evaluate_every must be >= 1, got {evaluate_every}")
        self.evaluate_every = evaluate_every
        self.cfg = cfg
        self.on_round_closed = on_round_closed  # called with each closed round's history entry
        self.link = link
        self.metrics = metrics or Metrics()
        self.evaluator = evaluator
        self._eval_pool: ThreadPoolExecutor | None = None  # one worker: evaluations run in round order
        # (history entry, its evaluation, the evaluated version as a GlobalModel) not yet collected
        self._evaluations: list[tuple[dict, Future, GlobalModel]] = []
        self.clock = clock
        self.topics = Topics(cfg.job)
        assert cfg.bundle is not None  # AggregatorConfig refuses a config without one
        self.bundle = Bundle(choose_bundle(cfg.bundle))  # a ladder: its largest rank
        self.manifest = self.bundle.manifest
        self.train = cfg.train.for_task(self.manifest.task)  # lr 0: the task's default rate
        self.strategy = make_strategy(cfg, self.bundle)
        self.store = StateStore(cfg.state_dir)
        if claim_term:  # a new leader: writes of any older one are refused from now on
            self.store.claim_term()
        limits = cfg.device_limits
        self.reassembler = Reassembler(
            cfg.max_update_bytes,
            max_pending=limits.max_partials,
            per_source=limits.partials_per_device,
            max_buffered=limits.max_buffered_bytes,
        )
        self.update_limits = EnvelopeLimits.for_update(self.manifest.shapes)
        self.global_limits = EnvelopeLimits.for_global(self.manifest.shapes)
        self.senders = SenderLimits(
            limits.messages_per_s,
            limits.message_burst,
            limits.bytes_per_s,
            limits.byte_burst or 2 * cfg.max_update_bytes,
        )
        self.refusals = Refusals(log)
        self.last_step = time.monotonic()  # the main loop's heartbeat (/healthz)
        self._resync = False  # set on a reconnect: republish everything retained
        self._announced, self._announced_at = b"", -float("inf")
        self._foreign_announcement = False
        self._answered = AnsweredUpdates(lambda device, ack: self.link.publish(self.topics.ack(device), ack.to_bytes()))
        self._round_bytes = {"wire": 0, "raw": 0}
        self._round_metrics: list[dict] = []
        self._downlinks: dict[int, RankDownlink] = {}  # rank -> what the broker holds for its devices
        self._batch: list[PendingUpdate] = []  # accepted into the round, not yet committed nor acknowledged
        self._batch_devices: set[str] = set()
        self._batch_undo: Callable[[], None] | None = None  # back to the round before the batch
        self._since_checkpoint = 0  # bytes of updates committed since the open round's last checkpoint
        saved = self.store.load()
        self.asynchronous = cfg.rounds.mode == ASYNC
        coordinator = AsyncCoordinator if self.asynchronous else Coordinator
        self.privacy: DifferentialPrivacy | None = None
        if saved is None:
            self.model = GlobalModel(self.manifest.rank, read_parameters(self.bundle), {}, 0)
            self.history: list[dict] = []
            if cfg.privacy.enabled:
                self.privacy = DifferentialPrivacy(cfg.privacy, self.history, self.manifest.adapter_size)
                self.metrics.dp_epsilon.set(0.0)
            self.coordinator = coordinator(
                cfg.rounds,
                self.strategy,
                cfg.job,
                clock,
                seed=cfg.seed,
                norm_prior=self.norm_prior(),
                privacy=self.privacy,
            )
            self._save(global_changed=True)
            self._event("job_started", job=cfg.job, strategy=self.strategy.name)
        else:
            if saved["job"] != cfg.job:
                raise ProtocolError(f"state dir {cfg.state_dir} belongs to job {saved['job']!r}, not {cfg.job!r}")
            self.model = GlobalModel(self.manifest.rank, saved["global"], saved["base_delta"], saved["version"])
            self.strategy.optimizer.load_state(*saved["server_optimizer"])  # its moments continue
            self.history = saved["history"]
            if cfg.privacy.enabled:
                self.privacy = DifferentialPrivacy(cfg.privacy, self.history, self.manifest.adapter_size)
            self.coordinator = coordinator(
                cfg.rounds,
                self.strategy,
                cfg.job,
                clock,
                seed=cfg.seed + saved["next_round"],
                next_round=saved["next_round"],
                completed=saved["completed"],
                version=saved["version"],
                norm_prior=self.norm_prior(),
                median_norm=next(
                    (h["median_norm"] for h in reversed(self.history) if h.get("ok") and h.get("median_norm")), 0.0
                ),
                privacy=self.privacy,
            )
            if saved["open_round"] is not None:
                self.coordinator.resume(saved["open_round"], saved["replay"])
                self._since_checkpoint = sum(r.update_bytes for r in saved["replay"])
            if self.privacy is not None:
                self.metrics.dp_epsilon.set(self.privacy.epsilons()[0])
            log.info(
                "resumed job %s: %d rounds completed, global version %d", cfg.job, saved["completed"], saved["version"]
            )
            self._event("job_resumed", completed=saved["completed"], version=saved["version"])
        # Secure aggregation: the round's sum only (server/secure_rounds.py); None when off.
        self.secure = SecureRounds(self) if cfg.secure_aggregation.enabled else None
        # Sharded aggregation: workers take the updates, this coordinator merges (server/shards.py).
        self.shards = ShardedRounds(self) if cfg.shards.sharded and cfg.shards.role == "coordinator" else None

    def norm_prior(self) -> float:
        """The first round's update norm bound: under AdamW each value moves at most about
        ``lr`` a step, so an honest change is at most ``lr * steps * sqrt(values)`` long. With
        ``lr_rank_power`` p a rank-r device trains at ``lr * (R / r) ** p`` on about r / R of
        the values: up to ``R ** (p - 1/2)`` times more, for p above 1/2."""
        t = self.train
        boost = self.manifest.rank ** max(0.0, t.lr_rank_power - 0.5)
        return t.lr * boost * t.local_steps * self.manifest.adapter_size**0.5

    @property
    def global_adapter(self) -> dict[str, np.ndarray]:
        """The global adapter at the largest rank (and the head)."""
        return self.model.tensors

    # -- persistence and publishing ------------------------------------------------------
    def _save(self, global_changed: bool = False) -> None:
        """A full save: every value, and the open round's checkpoint."""
        if self._batch:  # never reached: batches are committed before anything else saves
            raise RuntimeError("a full save while a batch of updates waits for its commit")
        c = self.coordinator
        self.store.save(
            job=self.cfg.job,
            next_round=c.next_round,
            completed=c.completed,
            version=c.version,
            history=self.history,
            global_adapter=self.model.tensors if global_changed else None,
            base_delta=self.model.base_delta if global_changed else None,
            server_optimizer=self.strategy.optimizer.state() if global_changed else None,
            open_round=c.open,
        )
        self._since_checkpoint = 0

    def write_adapter(self) -> Path | None:
        """The global adapter of this version as a PEFT folder, ``<state_dir>/adapters/v<version>``
        (``server.peft_adapter``), keeping the latest ``cfg.adapter_versions``. A failure (a full
        disk) is logged and counted with the state volume's errors, never fatal: ``state.db``
        holds the adapter, and ``fedlora-server --export-adapter`` writes it again."""
        keep = self.cfg.adapter_versions
        if not keep:
            return None
        root = Path(self.cfg.state_dir) / "adapters"
        try:
            folder = write_peft_adapter(
                root / f"v{self.model.version:06d}",
                self.manifest,
                self.model.tensors,
                self.model.base_delta,
                about={"job": self.cfg.job, "version": self.model.version, "strategy": self.strategy.name},
            )
            for old in sorted(p for p in root.glob("v*") if p.is_dir())[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
            return folder
        except (OSError, BundleError) as exc:
            self.metrics.store_errors.inc()
            log.error("could not write the PEFT adapter of version %d under %s: %s", self.model.version, root, exc)
            return None

    def ranks_served(self) -> list[int]:
        """The largest rank, and the ranks of devices that announced themselves."""
        ranks = {self.manifest.rank}
        ranks.update(info.rank for info in self.coordinator.devices.values() if info.rank)
        return sorted(r for r in ranks if self._rank_ok(r))

    def _rank_ok(self, rank: int) -> bool:
        return 1 <= rank <= self.manifest.rank and (not self.strategy.same_rank or rank == self.manifest.rank)

    def _global_envelope(
        self, version: int, rank: int, codec: str, tensors: dict[str, np.ndarray], base_version: int = 0
    ) -> bytes:
        """One encoded global envelope: the full copy, or with ``base_version`` a delta from it."""
        return encode_envelope(
            Envelope(
                kind="global",
                job=self.cfg.job,
                round=version,
                sender="aggregator",
                rank=rank,
                codec=codec,
                tensors=tensors,
                base_version=base_version,
            )
        )

    def publish_global(self) -> int:
        """Publish the current version for every served rank not yet holding it; bytes sent.

        Per rank: a full copy (retained, ``cfg.codec``) for devices that are new or behind and,
        with ``downlink_codec``, the change from the previous version (retained) for the rest.
        ``RankDownlink.adapter`` is exactly what devices hold afterwards (decoded, not intended),
        so the aggregator rebuilds their local adapters from their deltas without error.
        """
        sent = 0
        version = self.coordinator.version
        for rank in self.ranks_served():
            d = self._downlinks.setdefault(rank, RankDownlink())
            if d.version == version:
                continue
            target = downlink_tensors(self.strategy, self.model, rank)
            view = d.view
            if (
                self.cfg.downlink_codec
                and view is not None
                and d.version is not None
                and set(view) == set(target)
                and all(view[k].shape == target[k].shape for k in target)
            ):
                delta = {k: target[k] - view[k] for k in target}
                payload = self._global_envelope(version, rank, self.cfg.downlink_codec, delta, base_version=d.version)
                decoded = decode_envelope(payload, self.global_limits).tensors
                target = {k: (view[k] + decoded[k]).astype(np.float32) for k in target}
                d.delta_chunks = self._publish_retained(
                    functools.partial(self.topics.delta_chunk, rank), payload, d.delta_chunks
                )
                d.delta_bytes = len(payload)
                self.metrics.bytes_out.labels("wire").inc(len(payload))
                sent += len(payload)
            full = self._global_envelope(version, rank, self.cfg.codec, target)
            d.view = decode_envelope(full, self.global_limits).tensors
            d.adapter = adapter_part(d.view)
            d.full_chunks = self._publish_retained(
                functools.partial(self.topics.global_chunk, rank), full, d.full_chunks
            )
            d.version, d.full_bytes = version, len(full)
            self.metrics.bytes_out.labels("wire").inc(len(full))
            self.metrics.bytes_out.labels("raw").inc(sum(v.nbytes for v in target.values()))
            sent += len(full)
        return sent

    def _publish_retained(self, topic_of: Callable[[int], str], payload: bytes, previous_chunks: int) -> int:
        count = self.link.publish_chunked(topic_of(0), payload, retain_topic=topic_of)
        for stale in range(count, previous_chunks):  # chunks a larger earlier version left behind
            self.link.publish(topic_of(stale), b"", retain=True)
        return count

    def announcement(self) -> Announcement:
        c = self.coordinator
        base: dict[str, Any] = dict(
            mode=RoundMode(self.cfg.rounds.mode),
            job=self.cfg.job,
            global_version=c.version,
            rank=self.manifest.rank,
            completed=c.completed,
            rounds=self.cfg.rounds.rounds,
        )
        if c.open is None:
            return Announcement(
                **base,
                state=RoundState.FINISHED if c.finished else RoundState.WAITING,
                round=c.next_round - 1,
                shards=self.cfg.shards.count,
            )
        t = self.train
        return Announcement(
            **base,
            state=RoundState.OPEN,
            round=c.open.round,
            deadline=c.open.deadline,
            selected=tuple(c.open.selected),
            codec=self.cfg.uplink_codec,
            head_codec=self.cfg.uplink_head_codec,
            strategy=StrategyInfo(self.strategy.name, self.strategy.trains_a, self.strategy.device_settings()),
            train=TrainInfo(t.local_steps, t.batch_size, t.lr, t.lr_rank_power),
            privacy=self.round_privacy(),
            secagg=SecaggInfo(self.cfg.secure_aggregation.value_clip) if self.secure is not None else None,
            shards=self.cfg.shards.count,
        )

    def round_privacy(self) -> PrivacyInfo | None:
        """What devices do for DP in the open round: clip to its bound, add their noise share."""
        rnd = self.coordinator.open
        if self.privacy is None or rnd is None:
            return None
        # Devices clip to C itself; the round's bound (max_norm) leaves room for their noise.
        return PrivacyInfo(min(rnd.max_norm, self.privacy.clip), self.privacy.device_noise_std(len(rnd.selected)))

    def announce(self) -> None:
        self._announced = self.announcement().to_bytes()
        self._announced_at = time.monotonic()
        self.link.publish(self.topics.round, self._announced, retain=True)

    def check_announcement(self, payload: bytes) -> None:
        """What the broker holds on the round topic must be our announcement: anything else (a
        client that may write there, a broker that lost it) is replaced, at most once a second."""
        if payload != self._announced:
            self.refuse("round", "foreign_announcement", f"{len(payload)} bytes on the round topic are not ours")
            self._foreign_announcement = True  # replaced by the next tick, at most once a second

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        self.link.subscribe(self.topics.status_filter)
        if self.shards is not None:
            self.shards.subscribe()  # the workers take the updates
        else:
            self.link.subscribe(self.topics.update_filter)
        self.link.subscribe(self.topics.round)  # to notice a foreign or lost announcement
        if self.secure is not None:
            self.link.subscribe(self.topics.secagg_filter)
        self.link.on_connect_hooks.append(self._on_reconnect)
        self.publish_global()
        if self.shards is not None:
            self.shards.republish()  # a resumed round: the workers' plan before the devices' announcement
        self.announce()
        if self.secure is not None:
            self.secure.republish()  # a resumed secure round: its retained messages again
        self.metrics.last_progress.set_to_current_time()

    def _on_reconnect(self) -> None:
        # paho's network thread: publishing (and waiting for PUBACKs) here would deadlock it.
        self._resync = True

    def republish(self) -> None:
        """After a reconnect the broker may have lost its retained messages (restarted without
        persistence): publish the announcement and every served global adapter again."""
        self._resync = False
        for downlink in self._downlinks.values():
            downlink.version = None  # a full copy again (the broker may hold no base for a delta)
        self.publish_global()
        if self.shards is not None:
            self.shards.republish()
        self.announce()
        if self.secure is not None:
            self.secure.republish()
        log.info("reconnected: republished the round announcement and %d global adapters", len(self._downlinks))

    def run(
        self,
        stop: threading.Event | None = None,
        poll: float = 0.2,
        *,
        leading: Callable[[], bool] = lambda: True,
        exit_when_finished: bool = True,
        on_step: Callable[[], None] | None = None,
    ) -> bool:
        """The aggregator's one main loop (the server command and the simulator both run it):
        start, then step until ``stop`` is set, ``leading()`` turns false (leadership lost) or,
        with ``exit_when_finished``, the job is done; a finished job that keeps running still
        answers late updates and reconnects. ``on_step`` runs after every step. Unless deposed,
        it ends with a last step and a current announcement. Returns whether the job is done."""
        stop = stop or threading.Event()
        self.start()
        while not stop.is_set() and leading():
            finished = self.coordinator.finished
            self.metrics.job_finished.set(int(finished))
            if finished and exit_when_finished:
                break
            self.step(poll)
            if on_step is not None:
                on_step()
        if leading():  # stopped or done, not deposed: handle what arrived, leave the announcement current
            self.step(0)
            self.announce()
            while self._evaluations:  # the evaluations still running, each reported as it ends
                self._evaluations[0][1].exception()  # waits; an exception is raised by collect_evaluations
                self.collect_evaluations()
                if on_step is not None:
                    on_step()
        return self.coordinator.finished

    def step(self, timeout: float) -> None:
        """Handle what arrived within ``timeout`` seconds, then open or close rounds."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                if remaining > 0 and not self._batch:
                    msg = self.link.inbox.get(timeout=remaining)
                else:  # past the deadline, or a batch waits: take only what is there
                    msg = self.link.inbox.get_nowait()
            except queue.Empty:
                if not self._batch:
                    break
                self.commit_batch()  # the inbox is drained: commit what it held, acknowledge it
                continue
            self.handle(msg.topic, msg.payload)
            if self.coordinator.buffer_full():
                break  # async: apply the buffer (tick) before it takes another update
            if remaining < -STEP_OVERRUN_S:
                break  # a stream that never pauses still gets its ticks (deadlines, repairs)
        self.commit_batch()
        self.tick()
        self.collect_evaluations()
        self.last_step = time.monotonic()

    def evaluation_pending(self, entry: dict) -> bool:
        """Whether the evaluation of this history entry's global adapter is still running."""
        return any(e is entry for e, _, _ in self._evaluations)

    def collect_evaluations(self, wait: bool = False) -> None:
        """Put finished evaluations (all of them, with ``wait``) into their history entries, in
        round order, and commit; an evaluator's exception is raised here, in the main loop."""
        while self._evaluations and (wait or self._evaluations[0][1].done()):
            entry, future, evaluated = self._evaluations.pop(0)
            result = future.result()
            best = self.best_score()
            entry["eval"] = result
            if "loss" in result:
                self.metrics.eval_loss.set(result["loss"])
            if "accuracy" in result:
                self.metrics.eval_accuracy.set(result["accuracy"])
            self._save()
            score = eval_score(result)
            if score is not None and (best is None or score > best):
                self.write_best_adapter(evaluated, result)

    def best_score(self) -> float | None:
        """The best evaluation in the round history so far (``eval_score``; None: none yet)."""
        scores = [s for h in self.history if (s := eval_score(h.get("eval") or {})) is not None]
        return max(scores, default=None)

    def write_best_adapter(self, model: GlobalModel, result: dict) -> None:
        """The best-evaluated global adapter as a PEFT folder, ``<state_dir>/adapters/best``
        (the global of async rounds, or of rounds under drift, is not monotone: the last version
        need not be the best). Written when an evaluation beats every earlier one in the history,
        so a restart keeps it; with ``adapter_versions`` 0, none is written. A failure is logged
        and counted, never fatal, as ``write_adapter``'s."""
        if not self.cfg.adapter_versions:
            return
        folder = Path(self.cfg.state_dir) / "adapters" / "best"
        scores = {k: result[k] for k in ("accuracy", "loss") if k in result}
        about = {"job": self.cfg.job, "version": model.version, "strategy": self.strategy.name, **scores}
        try:
            write_peft_adapter(folder, self.manifest, model.tensors, model.base_delta, about=about)
            log.info("version %d is the best evaluated so far (%s): %s", model.version, scores, folder)
        except (OSError, BundleError) as exc:
            self.metrics.store_errors.inc()
            log.error("could not write the best adapter (version %d) under %s: %s", model.version, folder, exc)

    def tick(self) -> None:
        if self._resync:
            self.republish()
        if self._foreign_announcement and time.monotonic() - self._announced_at >= 1.0:
            self._foreign_announcement = False
            self.announce()
        self.request_missing_chunks()
        if self.secure is not None:
            outcome = self.secure.tick()
        elif self.shards is not None:
            outcome = self.shards.tick()
        else:
            outcome = self.coordinator.maybe_close()
        if outcome is not None:
            self.close_round(outcome)
        if self.open_next() or outcome is not None:
            # the new round; or, when none opens, waiting or finished: never the closed one as open
            self.announce()
        self.metrics.devices_online.set(len(self.coordinator.online()))

    def open_next(self) -> bool:
        stopped = self.coordinator.stopped
        opened = self.coordinator.maybe_open()
        if self.coordinator.stopped and not stopped:
            log.warning("job stopped: %s", self.coordinator.stopped)
            self._event("job_stopped", reason=self.coordinator.stopped)
        if opened is None:
            return False
        self._round_bytes = {"wire": 0, "raw": 0}
        self._round_metrics = []
        self.metrics.round.set(opened.round)
        if self.secure is not None:
            self.secure.opened(opened)
        self._save()
        if self.shards is not None:
            self.shards.opened()
        self._event(
            "round_opened",
            round=opened.round,
            selected=opened.selected,
            base_version=opened.base_version,
            max_weight=opened.max_weight,
            max_norm=round(opened.max_norm, 6),
        )
        log.info("round %d open: %d devices selected", opened.round, len(opened.selected))
        return True

    # -- messages ------------------------------------------------------------------------
    def handle(self, topic: str, payload: bytes) -> None:
        """One message, contained: whatever it holds, the process goes on. A refused message is
        counted in ``fedlora_messages_refused_total{kind,reason}`` and logged (throttled)."""
        kind = "unknown"
        try:
            ref = self.topics.parse(topic)
            kind = ref.kind.value
            # The aggregator tier's own topics (a worker's reports, the global adapter a worker
            # follows) are not a device's: the broker's ACL guards them, not a device's rate.
            if ref.kind not in AGGREGATOR_TOPICS and not self.senders.allow(ref.device, len(payload)):
                self.refuse(kind, "rate_limited", f"{ref.device} exceeds its message or byte rate")
            else:
                self.dispatch(ref, topic, payload)
        except ProtocolError as exc:
            self.refuse(kind, "malformed", str(exc))
        except StaleTerm:
            raise  # another replica leads now: this one must stop, not carry on
        except Exception as exc:  # a bug or an input nobody foresaw: refuse the message, keep serving
            self.refuse(kind, "internal_error", f"{type(exc).__name__}: {exc}", unexpected=True)

    def dispatch(self, ref: TopicRef, topic: str, payload: bytes) -> None:
        """One parsed message to its handler (a sharded worker has its own, ``server.shard_worker``)."""
        if ref.kind is TopicKind.STATUS:
            self.handle_status(ref.device, payload)
        elif ref.kind is TopicKind.UPDATES and ref.shard < 0 and self.shards is None:
            self.handle_chunk(ref.device, payload)
        elif ref.kind is TopicKind.ROUND:
            self.check_announcement(payload)
        elif ref.kind is TopicKind.SECAGG and ref.channel is SecaggChannel.UP and self.secure is not None:
            self.secure.handle(ref.device, payload)
        elif ref.kind is TopicKind.SHARDS and self.shards is not None:
            self.shards.handle(ref, payload)
        else:
            self.refuse(ref.kind.value, "unexpected_topic", f"nothing is handled on {topic[:120]}")

    def refuse(self, kind: str, reason: str, detail: str, unexpected: bool = False) -> None:
        self.metrics.messages_refused.labels(kind, reason).inc()
        self.refusals.refuse(kind, reason, detail, unexpected)

    def handle_status(self, device: str, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained status
        status = parse_status(payload)
        online = status.state is Presence.ONLINE
        self.coordinator.device_status(device, online, rank=status.rank, num_examples=status.num_examples)
        served = self._downlinks.get(status.rank or self.manifest.rank)
        if online and (served is None or served.version != self.coordinator.version):
            self.publish_global()  # a rank no one held before gets its slice now (a pass over every device)

    def handle_chunk(self, device: str, message: bytes) -> None:
        self.metrics.bytes_in.labels("wire").inc(len(message))
        self._round_bytes["wire"] += len(message)
        msg_id: bytes | None = None
        try:
            msg_id = parse_chunk(message).msg_id
            if self._answered.again(device, msg_id):
                return  # a resend of an update we already answered: the answer went out again
            payload = self.reassembler.add(device, message)
            if payload is None:
                return
            t0 = time.perf_counter()
            env = decode_envelope(payload, self.update_limits, reassembled=True)
            decode_ms = 1000 * (time.perf_counter() - t0)
        except ReassemblyBusy as exc:
            self.refuse("updates", "busy", str(exc))  # the device resends; an ack per chunk would be a flood
            return
        except PayloadTooLarge as exc:
            self.reject(device, None, UpdateRejected("too_large", str(exc)))
            return
        except ProtocolError as exc:
            self.reject(device, None, UpdateRejected("malformed", str(exc)), msg_id)
            return
        try:
            if self.secure is not None or env.kind == "masked":
                self.accept_masked(device, env, len(payload))  # persisted and acknowledged at once
                self._answered.remember(device, msg_id, Ack(env.round, AckResult.ACCEPTED))
            else:
                self.accept(device, env, len(payload), decode_ms, msg_id)  # acknowledged at the batch's commit
        except UpdateRejected as exc:
            self.reject(device, env.round, exc, msg_id)

    def admit(self, device: str, env: Envelope) -> tuple[Bounded, dict[str, np.ndarray]]:
        """Every check an update passes before it counts, in one place: an update envelope from
        the device of its topic, for this job's open round and a device selected for it, not
        a duplicate, usable by the strategy, within the round's bounds (``Coordinator.judge``),
        and computed from the version this round started from. Returns the bounded update and
        the adapter its device started from; raises UpdateRejected with the reason."""
        if env.kind != "update":
            raise UpdateRejected("malformed", f"expected an update envelope, got {env.kind!r}")
        if env.sender != device:
            raise UpdateRejected("sender_mismatch", f"envelope says {env.sender!r} but came on the topic of {device!r}")
        delta = ClientUpdate(
            device=device,
            round=env.round,
            rank=env.rank,
            num_examples=env.num_examples,
            tensors=env.tensors,
            metrics=env.metrics,
        )
        bounded = self.coordinator.judge(env.job, delta, env.base_version)
        downlink = self._downlinks.get(env.rank)
        if downlink is None or downlink.adapter is None or not self.coordinator.starts_from(env.base_version):
            raise UpdateRejected(
                "wrong_base",
                f"update starts from version {env.base_version} at rank {env.rank}; "
                f"the round started from version {self.coordinator.version}",
            )
        return bounded, downlink.adapter

    def accept(self, device: str, env: Envelope, nbytes: int, decode_ms: float, msg_id: bytes | None = None) -> None:
        """Admit a decoded update and add it to the round; it is committed with the batch the
        inbox holds (``commit_batch``), and acknowledged only then."""
        bounded, base = self.admit(device, env)
        kept = bounded.update
        # Strategies combine the devices' full local tensors: what we sent plus the delta (async:
        # what we hold now plus the delta scaled by its staleness weight, server.async_rounds).
        full = {name: base[name] + value if name in base else value for name, value in kept.tensors.items()}
        if not self._batch:
            self._batch_undo = self.coordinator.savepoint()
        record = self.coordinator.add(
            ClientUpdate(device, env.round, env.rank, kept.num_examples, full, env.metrics),
            bounded.norm,
            bounded.staleness,
        )
        self._batch.append(PendingUpdate(device, env, nbytes, decode_ms, bounded, record, msg_id))
        self._batch_devices.add(device)
        if len(self._batch) >= self.cfg.commit.batch or self.coordinator.buffer_full():
            self.commit_batch()

    def commit_batch(self) -> None:
        """Group commit: make the batch of accepted updates durable in one transaction, then
        acknowledge each. The commit (``StateStore.append``) writes each update's place, weight
        and norm, and either their tensors or, when those would take more room than the round's
        partial sums (a large batch) or ``commit.checkpoint_bytes`` of tensors were written since
        the sums last were, the sums instead: O(min(batch, model)) bytes, never the O(devices)
        round. If it fails, the round goes back to before the batch and every update of it is
        answered ``retry_later`` (the devices send again; nothing counts twice)."""
        batch, undo = self._batch, self._batch_undo
        if not batch:
            return
        self._batch, self._batch_devices, self._batch_undo = [], set(), None
        rnd = self.coordinator.open
        assert rnd is not None and undo is not None
        size = sum(p.record.update_bytes for p in batch)
        sums = sum(v.nbytes for v in rnd.partial.sums.values())
        try:
            if self.asynchronous:
                self._save()  # the whole buffer (its staleness and each device's last round), not a log
            elif size >= sums or self._since_checkpoint + size > self.cfg.commit.checkpoint_bytes:
                self.store.append(rnd.round, [p.record for p in batch], rnd.partial)  # the sums, not the tensors
                self._since_checkpoint = 0
            else:
                self.store.append(rnd.round, [p.record for p in batch])
                self._since_checkpoint += size
        except StoreUnavailable as exc:
            undo()  # memory back to the last commit
            self.metrics.store_errors.inc()
            for p in batch:
                retry = UpdateRejected("retry_later", f"the aggregator cannot persist updates now ({exc})")
                self.reject(p.device, p.env.round, retry, p.msg_id)
            return
        self._events([self.counted(p) for p in batch])  # logged, then acknowledged
        for p in batch:
            self.ack(p.device, p.env.round, AckResult.ACCEPTED)

    def counted(self, p: PendingUpdate) -> tuple[str, dict]:
        """A committed update in the metrics and the answers to resends; returns its event."""
        env, bounded, device = p.env, p.bounded, p.device
        kept = bounded.update
        if p.msg_id is not None:
            self._answered.remember(device, p.msg_id, Ack(env.round, AckResult.ACCEPTED))
        raw = raw_bytes(env)
        self._round_bytes["raw"] += raw
        self.metrics.bytes_in.labels("raw").inc(raw)
        self._round_metrics.append(env.metrics)
        self._observe_device(env.metrics)
        self.metrics.updates.labels("accepted", "ok").inc()
        if bounded.clipped:
            self.metrics.updates_bounded.labels("norm_clipped").inc()
        if bounded.weight_capped:
            self.metrics.updates_bounded.labels("weight_capped").inc()
        staleness = {}
        if self.asynchronous:
            self.metrics.buffer_updates.set(len(self.coordinator.open.accepted) if self.coordinator.open else 0)
            staleness = {"staleness": bounded.staleness, "staleness_weight": round(bounded.staleness_weight, 6)}
        return "update_accepted", dict(
            round=env.round,
            device=device,
            rank=env.rank,
            num_examples=env.num_examples,
            weight=kept.num_examples,
            norm=round(bounded.norm, 6),
            clipped=bounded.clipped,
            bytes=p.nbytes,
            raw_bytes=raw,
            codec=env.codec,
            decode_ms=round(p.decode_ms, 3),
            metrics=env.metrics,
            **staleness,
        )

    def took_elsewhere(self, wire: int, raw: int, metrics: list[dict]) -> None:
        """The open round's updates as other processes took them (a sharded coordinator's
        workers): their bytes on the wire and decoded, and their devices' metrics, in the order
        of the round's norms, for its history row."""
        self._round_bytes = {"wire": wire, "raw": raw}
        self._round_metrics = metrics

    def accept_masked(self, device: str, env: Envelope, nbytes: int) -> None:
        """Under secure aggregation every update is a masked input (``SecureRounds.accept``)."""
        if self.secure is None:
            raise UpdateRejected("malformed", "a masked input, but this job does not run secure aggregation")
        self.secure.accept(device, env, nbytes)

    def add_privacy_noise(self, outcome: RoundOutcome, entry: dict) -> Partial:
        """DP: the round's sums with their Gaussian noise, the clip bound of the next round, and
        the privacy spent in the history row and the metrics (``server.privacy``)."""
        assert self.privacy is not None
        metrics = self._round_metrics + [{}] * (len(outcome.norms) - len(self._round_metrics))  # after a restart
        bits = below_clip_bits(metrics, outcome.norms, self.privacy.clip)
        partial, noise = self.privacy.noised(
            outcome.partial, linear_keys(outcome.partial.sums), len(outcome.selected), bits
        )
        entry.update(self.privacy.record(outcome.sampling_rate, noise))
        self.metrics.dp_epsilon.set(entry["dp_epsilon"])
        self.metrics.dp_clip.set(noise.next_clip)
        return partial

    def _observe_device(self, metrics: dict) -> None:
        if isinstance(metrics.get("step_time_s"), (int, float)):
            self.metrics.device_step_seconds.observe(metrics["step_time_s"])
        if isinstance(metrics.get("peak_rss_bytes"), (int, float)):
            self.metrics.device_peak_rss.observe(metrics["peak_rss_bytes"])

    def reject(self, device: str, round_id: int | None, exc: UpdateRejected, msg_id: bytes | None = None) -> None:
        """Refuse an update with its reason. ``msg_id``: the update's message id, so a resend of
        the same bytes gets the same answer without being decoded again, except after a
        ``retry_later``: then the resend is reassembled and judged anew."""
        if exc.reason == "duplicate" and device in self._batch_devices:
            self.commit_batch()  # its first copy waits for the commit: confirm only what is durable
            rnd = self.coordinator.open
            if rnd is None or device not in rnd.accepted:
                exc = UpdateRejected("retry_later", "the aggregator could not persist this update's first copy")
        if exc.reason == "duplicate":
            # The device missed our ack and resent: confirm again, change nothing.
            self.metrics.updates.labels("duplicate", exc.reason).inc()
            self.ack(device, round_id, AckResult.ACCEPTED, "duplicate")
            if msg_id is not None:
                self._answered.remember(device, msg_id, Ack(round_id, AckResult.ACCEPTED, "duplicate"))
            return
        if msg_id is not None:
            if exc.reason in RETRY_REASONS:
                self.reassembler.forget(device, msg_id)
            else:
                self._answered.remember(device, msg_id, Ack(round_id, AckResult.REJECTED, exc.reason, exc.detail))
        self.refusals.refuse("update", exc.reason, f"from {device} (round {round_id}): {exc.detail}")
        self.metrics.updates.labels("rejected", exc.reason).inc()
        self._event("update_rejected", round=round_id, device=device, reason=exc.reason, detail=exc.detail)
        self.ack(device, round_id, AckResult.REJECTED, exc.reason, exc.detail)

    def _event(self, kind: str, **fields) -> None:
        """Log an event; the log is best effort (a full disk must not stop rounds)."""
        self._events([(kind, fields)])

    def _events(self, events: list[tuple[str, dict]]) -> None:
        """Log events in one write (best effort, as ``_event``)."""
        try:
            self.store.events_append(events)
        except StoreUnavailable as exc:
            self.metrics.store_errors.inc()
            self.refusals.refuse("event", "store_unavailable", str(exc))

    def request_missing_chunks(self) -> None:
        """Ask each device whose update stopped arriving part way for the chunks still missing."""
        if not self.cfg.chunk_repair_after_s:
            return
        rnd = self.coordinator.open
        for stall in self.reassembler.stalled(self.cfg.chunk_repair_after_s):
            if rnd is None or not self.coordinator.expects_update_from(stall.source):
                continue  # dropped when its round closes
            request = RepairRequest(rnd.round, stall.msg_id.hex(), stall.count, tuple(stall.missing))
            self.link.publish(self.topics.ack(stall.source), request.to_bytes())
            self.metrics.chunk_repairs.inc()
            self.metrics.chunks_requested.inc(len(stall.missing))
            log.info("asked %s for %d missing chunks of %d", stall.source, len(stall.missing), stall.count)

    def ack(self, device: str, round_id: int | None, result: AckResult, reason: str = "", detail: str = "") -> None:
        self.link.publish(self.topics.ack(device), Ack(round_id, result, reason, detail).to_bytes())

    # -- closing -------------------------------------------------------------------------
    def close_round(self, outcome: RoundOutcome) -> None:
        for device in outcome.selected:
            self.reassembler.drop_source(device)  # partial uploads of a closed round
        entry = {
            "round": outcome.round,
            "ok": outcome.ok,
            "reason": outcome.reason,
            "selected": len(outcome.selected),
            "participants": len(outcome.accepted),
            "examples": int(sum(outcome.accepted.values())),
            "duration_s": round(outcome.duration, 3),
            "closed_at": round(self.clock(), 3),
            "uplink_bytes_wire": self._round_bytes["wire"],
            "uplink_bytes_raw": self._round_bytes["raw"],
            "median_norm": round(outcome.median_norm, 6),
        }
        if self.asynchronous:
            entry.update(buffer_summary(outcome))
            self.metrics.buffer_updates.set(0)
            self.metrics.buffer_staleness.labels("mean").set(entry["staleness_mean"])
            self.metrics.buffer_staleness.labels("max").set(entry["staleness_max"])
        entry.update(_summarize(self._round_metrics))
        if self.secure is not None:
            self.secure.closed(entry)
        self.metrics.round_duration.observe(outcome.duration)
        self.metrics.selected.set(len(outcome.selected))
        self.metrics.participants.set(len(outcome.accepted))  # failed rounds too: the gauge is "last closed round"
        self.metrics.last_progress.set_to_current_time()
        if outcome.ok:
            start = time.perf_counter()
            partial = outcome.partial
            if self.privacy is not None:
                partial = self.add_privacy_noise(outcome, entry)
            self.model = self.strategy.finalize(partial, self.model)
            if isinstance(self.strategy, RobustStrategy) and self.strategy.robust.method == "median_filter":
                entry["robust_dropped"] = list(self.strategy.last_dropped)
            self.model.version = self.coordinator.version  # versions are the round ids that made them
            entry["aggregation_s"] = round(time.perf_counter() - start, 4)
            self.metrics.aggregation_seconds.observe(entry["aggregation_s"])
            self.metrics.rounds_completed.inc()
        else:
            self.metrics.rounds_failed.inc()
        self.history.append(entry)
        self._save(global_changed=outcome.ok)
        if outcome.ok:
            self.write_adapter()
            self.publish_global()
            ranks = {d: info.rank for d, info in self.coordinator.devices.items()}
            deltas = bool(self.cfg.downlink_codec) and any(d.delta_bytes for d in self._downlinks.values())
            entry["downlink_bytes_wire"] = sum(
                self._downlinks.get(ranks.get(d) or self.manifest.rank, RankDownlink()).sent_bytes(deltas)
                for d in outcome.selected
            )
        self._event("round_closed", **entry)
        log.info(
            "round %d closed (%s): %d/%d updates",
            outcome.round,
            outcome.reason,
            len(outcome.accepted),
            len(outcome.selected),
        )
        if outcome.ok and self.evaluator is not None:
            # Devices start the next round while a worker thread evaluates this one: an evaluation
            # (minutes for an LLM) must not hold up acks, or devices resend their updates. The
            # evaluator must not hold the GIL while it computes (ONNX Runtime's training API does:
            # the simulator's runs in a child process, simulator.run.EvaluatorProcess).
            self.open_next()
            self.announce()
            if self.coordinator.completed % self.evaluate_every == 0 or self.coordinator.finished:
                tensors = downlink_tensors(self.strategy, self.model, self.manifest.rank)
                tensors = {k: v.copy() for k, v in tensors.items()}
                if self._eval_pool is None:
                    self._eval_pool = ThreadPoolExecutor(1, thread_name_prefix="fedlora-eval")
                future = self._eval_pool.submit(self.evaluator, tensors)
                self._evaluations.append((entry, future, self.model.copy()))
        if self.on_round_closed is not None:
            self.on_round_closed(entry)


def eval_score(result: dict) -> float | None:
    """How good an evaluation is, higher better: its accuracy, else its negative loss (a causal
    LM scored by loss alone); None when it has neither or they are not finite."""
    for key, sign in (("accuracy", 1.0), ("loss", -1.0)):
        value = result.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
            return sign * float(value)
    return None


@dataclass
class PendingUpdate:
    """An update added to the open round, waiting for its batch's commit before its ack."""

    device: str
    env: Envelope
    nbytes: int
    decode_ms: float
    bounded: Bounded
    record: Accepted
    msg_id: bytes | None


@dataclass
class RankDownlink:
    """What the broker holds for the devices of one rank.

    version: the global version published to them (None: nothing yet, or publish a full copy
        again, e.g. after a reconnect).
    full_chunks / delta_chunks: retained chunks of the full copy and of the last delta.
    view: what its devices hold (decoded as sent, not as intended); adapter: its adapter
        tensors, the base every update of that rank is a change from.
    full_bytes / delta_bytes: the size of the last full copy and delta.
    """

    version: int | None = None
    full_chunks: int = 0
    delta_chunks: int = 0
    view: dict[str, np.ndarray] | None = None
    adapter: dict[str, np.ndarray] | None = None
    full_bytes: int = 0
    delta_bytes: int = 0

    def sent_bytes(self, deltas: bool) -> int:
        """What one device of this rank downloaded for the last version."""
        return self.delta_bytes if deltas else self.full_bytes


class AnsweredUpdates:
    """The answers to the last ``capacity`` updates, by (device, message id). A device that
    missed its ack resends the same bytes (its pending update): the answer goes out again, at
    most once per ``every_s`` (a resend is many chunks), without reassembling or judging it."""

    def __init__(self, publish: Callable[[str, Ack], object], capacity: int = 100_000, every_s: float = 5.0):
        self.publish = publish
        self.capacity = capacity
        self.every_s = every_s
        self._answers: OrderedDict[tuple[str, bytes], tuple[Ack, float]] = OrderedDict()

    def remember(self, device: str, msg_id: bytes, ack: Ack) -> None:
        self._answers[(device, msg_id)] = (ack, time.monotonic())
        self._answers.move_to_end((device, msg_id))
        if len(self._answers) > self.capacity:
            self._answers.popitem(last=False)

    def again(self, device: str, msg_id: bytes) -> bool:
        """True if this message was answered; the answer is sent again unless it just was."""
        known = self._answers.get((device, msg_id))
        if known is None:
            return False
        ack, sent_at = known
        if time.monotonic() - sent_at >= self.every_s:
            self.publish(device, ack)
            self._answers[(device, msg_id)] = (ack, time.monotonic())
        return True


def raw_bytes(env: Envelope) -> int:
    """An update's size decoded (float32), as the round's history and metrics count it."""
    return sum(v.size * 4 for v in env.tensors.values())


# What a round's history row summarizes of the devices' own metrics (a sharded worker sends
# the coordinator these of each update).
SUMMARIZED_METRICS = (
    "train_loss",
    "eval_loss",
    "eval_accuracy",
    "eval_perplexity",
    "step_time_s",
    "peak_rss_bytes",
    "train_seconds",
)


def _summarize(device_metrics: list[dict]) -> dict:
    """Weighted view of what the devices reported for one round."""
    out: dict = {}
    for key in SUMMARIZED_METRICS:
        values = [m[key] for m in device_metrics if isinstance(m.get(key), (int, float))]
        if values:
            out[f"device_{key}_median"] = statistics.median(values)
            if key == "peak_rss_bytes":
                out["device_peak_rss_bytes_max"] = max(values)
    return out
