"""The aggregator process: MQTT in, decisions by the Coordinator, global adapters out.

Where an update goes: chunk on ``updates/<device>`` -> Reassembler (size limit, hash) ->
decode_envelope -> Coordinator.judge (job, round, selection, duplicate, strategy checks,
norm) -> Strategy.accumulate into the round's partial -> state saved -> ack to the device.
When the Coordinator closes the round: Strategy.finalize -> state saved -> new global
adapter published (retained) -> next round announced (retained).
"""

from __future__ import annotations

import json
import logging
import statistics
import threading
import time
from typing import Callable

import numpy as np

from edge_client.bundle import Bundle
from edge_client.errors import PayloadTooLarge, ProtocolError, UpdateRejected
from edge_client.protocol import PROTOCOL_VERSION, Envelope, Reassembler, Topics, decode_envelope, encode_envelope
from edge_client.runtime import read_parameters
from edge_client.transport import MqttLink
from server.config import ServerConfig
from server.strategies.fedavg import FedAvg
from server.metrics import Metrics
from server.rounds import Coordinator, RoundOutcome
from server.store import StateStore
from server.strategies.base import ClientUpdate, Strategy

log = logging.getLogger("fedlora.aggregator")

Evaluator = Callable[[dict[str, np.ndarray]], dict]


def make_strategy(cfg: ServerConfig, bundle: Bundle) -> Strategy:
    m = bundle.manifest
    if cfg.strategy == "fedavg":
        return FedAvg(m.shapes, rank=m.rank, server_lr=cfg.server_lr)
    raise AssertionError(cfg.strategy)  # ServerConfig validated the name


class Aggregator:
    def __init__(self, cfg: ServerConfig, link: MqttLink, metrics: Metrics | None = None,
                 evaluator: Evaluator | None = None, clock=time.time):
        self.cfg = cfg
        self.link = link
        self.metrics = metrics or Metrics()
        self.evaluator = evaluator
        self.clock = clock
        self.topics = Topics(cfg.job)
        self.bundle = Bundle(cfg.bundle)
        self.manifest = self.bundle.manifest
        self.strategy = make_strategy(cfg, self.bundle)
        self.store = StateStore(cfg.state_dir)
        self.reassembler = Reassembler(cfg.max_update_bytes)
        self._round_bytes = {"wire": 0, "raw": 0}
        self._round_metrics: list[dict] = []
        self._published_chunks = 0
        saved = self.store.load()
        if saved is None:
            self.global_adapter = read_parameters(self.bundle)
            self.history: list[dict] = []
            self.coordinator = Coordinator(cfg.rounds, self.strategy, cfg.job, clock, seed=cfg.seed)
            self._save(global_changed=True)
            self.store.event("job_started", job=cfg.job, strategy=self.strategy.name)
        else:
            if saved["job"] != cfg.job:
                raise ProtocolError(f"state dir {cfg.state_dir} belongs to job {saved['job']!r}, not {cfg.job!r}")
            self.global_adapter = saved["global"]
            self.history = saved["history"]
            self.coordinator = Coordinator(cfg.rounds, self.strategy, cfg.job, clock, seed=cfg.seed + saved["next_round"],
                                           next_round=saved["next_round"], completed=saved["completed"],
                                           version=saved["version"])
            if saved["open_round"] is not None:
                self.coordinator.resume(saved["open_round"])
            log.info("resumed job %s: %d rounds completed, global version %d", cfg.job, saved["completed"], saved["version"])
            self.store.event("job_resumed", completed=saved["completed"], version=saved["version"])

    # -- persistence and publishing ------------------------------------------------------
    def _save(self, global_changed: bool = False) -> None:
        c = self.coordinator
        self.store.save(job=self.cfg.job, next_round=c.next_round, completed=c.completed, version=c.version,
                        history=self.history, global_adapter=self.global_adapter if global_changed else None,
                        open_round=c.open)

    def publish_global(self) -> int:
        env = Envelope(kind="global", job=self.cfg.job, round=self.coordinator.version, sender="aggregator",
                       rank=self.manifest.rank, codec=self.cfg.codec, tensors=self.global_adapter)
        payload = encode_envelope(env)
        rank = self.manifest.rank
        count = self.link.publish_chunked(self.topics.global_chunk(rank, 0), payload,
                                          retain_topic=lambda i: self.topics.global_chunk(rank, i))
        for stale in range(count, self._published_chunks):  # clear chunks a larger earlier version left
            self.link.publish(self.topics.global_chunk(rank, stale), b"", retain=True)
        self._published_chunks = count
        self.metrics.bytes_out.labels("wire").inc(len(payload))
        self.metrics.bytes_out.labels("raw").inc(sum(v.nbytes for v in self.global_adapter.values()))
        return len(payload)

    def announcement(self) -> dict:
        c = self.coordinator
        base = {"v": PROTOCOL_VERSION, "job": self.cfg.job, "global_version": c.version, "rank": self.manifest.rank,
                "completed": c.completed, "rounds": self.cfg.rounds.rounds}
        if c.open is not None:
            return {**base, "state": "open", "round": c.open.round, "deadline": c.open.deadline,
                    "selected": c.open.selected, "codec": self.cfg.uplink_codec,
                    "train": {"local_steps": self.cfg.train.local_steps, "batch_size": self.cfg.train.batch_size,
                              "lr": self.cfg.train.lr}}
        return {**base, "state": "finished" if c.finished else "waiting", "round": c.next_round - 1}

    def announce(self) -> None:
        self.link.publish(self.topics.round, json.dumps(self.announcement()).encode(), retain=True)

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        self.link.subscribe(self.topics.status_filter)
        self.link.subscribe(self.topics.update_filter)
        self.link.on_connect_hooks.append(self.announce)
        self.publish_global()
        self.announce()

    def run(self, stop: threading.Event, poll: float = 0.2) -> None:
        self.start()
        while not stop.is_set() and not self.coordinator.finished:
            self.step(poll)
        self.step(0)
        self.announce()

    def step(self, timeout: float) -> None:
        """Handle what arrived within ``timeout`` seconds, then open or close rounds."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                msg = self.link.inbox.get(timeout=max(0.0, remaining)) if remaining > 0 else self.link.inbox.get_nowait()
            except Exception:
                break
            self.handle(msg.topic, msg.payload)
        self.tick()

    def tick(self) -> None:
        outcome = self.coordinator.maybe_close()
        if outcome is not None:
            self.close_round(outcome)
        if self.open_next():
            self.announce()
        self.metrics.devices_online.set(len(self.coordinator.online()))

    def open_next(self) -> bool:
        opened = self.coordinator.maybe_open()
        if opened is None:
            return False
        self._round_bytes = {"wire": 0, "raw": 0}
        self._round_metrics = []
        self.metrics.round.set(opened.round)
        self._save()
        self.store.event("round_opened", round=opened.round, selected=opened.selected, base_version=opened.base_version)
        log.info("round %d open: %d devices selected", opened.round, len(opened.selected))
        return True

    # -- messages ------------------------------------------------------------------------
    def handle(self, topic: str, payload: bytes) -> None:
        if topic.startswith(self.topics.base + "/status/"):
            self.handle_status(self.topics.device_of(topic), payload)
        elif topic.startswith(self.topics.base + "/updates/"):
            self.handle_chunk(self.topics.device_of(topic), payload)

    def handle_status(self, device: str, payload: bytes) -> None:
        if not payload:
            return
        try:
            status = json.loads(payload)
            online = status.get("state") == "online"
            self.coordinator.device_status(device, online, rank=int(status.get("rank", 0)),
                                           num_examples=int(status.get("num_examples", 0)))
        except (ValueError, TypeError, AttributeError) as exc:
            log.warning("ignoring malformed status from %s: %s", device, exc)

    def handle_chunk(self, device: str, message: bytes) -> None:
        self.metrics.bytes_in.labels("wire").inc(len(message))
        self._round_bytes["wire"] += len(message)
        try:
            payload = self.reassembler.add(device, message)
            if payload is None:
                return
            env = decode_envelope(payload)
            if env.kind != "update":
                raise ProtocolError(f"expected an update envelope, got {env.kind!r}")
            if env.sender != device:
                raise UpdateRejected("sender_mismatch", f"envelope says {env.sender!r} but came on the topic of {device!r}")
        except PayloadTooLarge as exc:
            self.reject(device, None, UpdateRejected("too_large", str(exc)))
            return
        except ProtocolError as exc:
            self.reject(device, None, UpdateRejected("malformed", str(exc)))
            return
        except UpdateRejected as exc:
            self.reject(device, None, exc)
            return
        update = ClientUpdate(device=device, round=env.round, rank=env.rank, num_examples=env.num_examples,
                              tensors=env.tensors, metrics=env.metrics)
        try:
            self.coordinator.judge(env.job, update)
        except UpdateRejected as exc:
            self.reject(device, env.round, exc)
            return
        self.coordinator.accept(update)
        self._save()  # persisted before the ack
        raw = sum(v.size * 4 for v in env.tensors.values())
        self._round_bytes["raw"] += raw
        self.metrics.bytes_in.labels("raw").inc(raw)
        self._round_metrics.append(env.metrics)
        self._observe_device(env.metrics)
        self.metrics.updates.labels("accepted", "ok").inc()
        self.store.event("update_accepted", round=env.round, device=device, num_examples=env.num_examples,
                         bytes=len(payload), metrics=env.metrics)
        self.ack(device, env.round, "accepted")

    def _observe_device(self, metrics: dict) -> None:
        if isinstance(metrics.get("step_time_s"), (int, float)):
            self.metrics.device_step_seconds.observe(metrics["step_time_s"])
        if isinstance(metrics.get("peak_rss_bytes"), (int, float)):
            self.metrics.device_peak_rss.observe(metrics["peak_rss_bytes"])

    def reject(self, device: str, round_id: int | None, exc: UpdateRejected) -> None:
        if exc.reason == "duplicate":
            # The device missed our ack and resent: confirm again, change nothing.
            self.metrics.updates.labels("duplicate", exc.reason).inc()
            self.ack(device, round_id, "accepted", "duplicate")
            return
        log.warning("rejected update from %s (round %s): %s", device, round_id, exc)
        self.metrics.updates.labels("rejected", exc.reason).inc()
        self.store.event("update_rejected", round=round_id, device=device, reason=exc.reason, detail=exc.detail)
        self.ack(device, round_id, "rejected", exc.reason, exc.detail)

    def ack(self, device: str, round_id: int | None, result: str, reason: str = "", detail: str = "") -> None:
        body = {"round": round_id, "result": result, "reason": reason, "detail": detail}
        self.link.publish(self.topics.ack(device), json.dumps(body).encode())

    # -- closing -------------------------------------------------------------------------
    def close_round(self, outcome: RoundOutcome) -> None:
        for device in outcome.selected:
            self.reassembler.drop_source(device)  # partial uploads of a closed round
        entry = {"round": outcome.round, "ok": outcome.ok, "reason": outcome.reason,
                 "selected": len(outcome.selected), "participants": len(outcome.accepted),
                 "examples": int(sum(outcome.accepted.values())), "duration_s": round(outcome.duration, 3),
                 "uplink_bytes_wire": self._round_bytes["wire"], "uplink_bytes_raw": self._round_bytes["raw"]}
        entry.update(_summarize(self._round_metrics))
        self.metrics.round_duration.observe(outcome.duration)
        if outcome.ok:
            start = time.perf_counter()
            self.global_adapter = self.strategy.finalize(outcome.partial, self.global_adapter)
            entry["aggregation_s"] = round(time.perf_counter() - start, 4)
            self.metrics.aggregation_seconds.observe(entry["aggregation_s"])
            self.metrics.rounds_completed.inc()
            self.metrics.participants.set(len(outcome.accepted))
        else:
            self.metrics.rounds_failed.inc()
        self.history.append(entry)
        self._save(global_changed=outcome.ok)
        if outcome.ok:
            down = self.publish_global()
            entry["downlink_bytes_wire"] = down * len(outcome.selected)
        self.store.event("round_closed", **entry)
        log.info("round %d closed (%s): %d/%d updates", outcome.round, outcome.reason, len(outcome.accepted),
                 len(outcome.selected))
        if outcome.ok and self.evaluator is not None:
            # Let devices start the next round while the aggregator evaluates this one.
            self.open_next()
            self.announce()
            result = self.evaluator(self.global_adapter)
            entry["eval"] = result
            if "loss" in result:
                self.metrics.eval_loss.set(result["loss"])
            if "accuracy" in result:
                self.metrics.eval_accuracy.set(result["accuracy"])
            self._save()


def _summarize(device_metrics: list[dict]) -> dict:
    """Weighted view of what the devices reported for one round."""
    out: dict = {}
    for key in ("train_loss", "eval_loss", "eval_accuracy", "step_time_s", "peak_rss_bytes", "train_seconds"):
        values = [m[key] for m in device_metrics if isinstance(m.get(key), (int, float))]
        if values:
            out[f"device_{key}_median"] = statistics.median(values)
            if key == "peak_rss_bytes":
                out["device_peak_rss_bytes_max"] = max(values)
    return out
