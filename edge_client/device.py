"""The device loop: join, wait for a round, train the adapter locally, send the update.

State that must survive a restart lives in ``state_dir``: the last round whose update was
acknowledged, the encoded pending update (resent until acknowledged, so a crash between
training and acknowledgement loses nothing), and the local adapter.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import statistics
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from core.bundle import Bundle, choose_bundle
from core.codecs import get_codec
from core.config import load
from core.errors import ConfigError, FedloraError, ProtocolError
from core.guard import Refusals
from core.lora import pad_rank, pruned_rank, rank_shapes, truncate_rank
from core.messages import (
    BELOW_CLIP_METRIC,
    MAX_HEADER_BYTES,
    RETRY_REASONS,
    AckResult,
    Announcement,
    Presence,
    PrivacyInfo,
    RepairRequest,
    RoundState,
    SecaggChannel,
    Status,
    TopicKind,
    TopicRef,
    TrainInfo,
    parse_ack,
    parse_announcement,
    parse_secagg_forward,
    parse_secagg_key_list,
    parse_secagg_unmask,
)
from core.protocol import (
    Envelope,
    EnvelopeLimits,
    Reassembler,
    Topics,
    adapter_part,
    check_device_id,
    decode_envelope,
    encode_envelope,
    frozen_changes,
    message_id,
)
from core.transport import BrokerConfig, MqttLink
from edge_client.availability import OnlineSchedule
from edge_client.data import EncodedDataset, TextEncoder, encode_classification, read_records
from edge_client.device_state import DeviceState
from edge_client.feedback import ErrorFeedback, encode_with_feedback
from edge_client.instruct import encode_causal_lm_file
from edge_client.privacy import Privatizer
from edge_client.runtime import RuntimeOptions, Trainer, peak_rss_bytes
from edge_client.secure_update import SecureSession
from edge_client.trainer_process import TrainerProcess, TrainerProcessDied

log = logging.getLogger("fedlora.device")

RESEND_AFTER_S = 30.0
# A broker may drop a QoS 1 delivery to a busy device (amqtt does after a PUBACK timeout,
# and ORT's training step holds the GIL, so paho's thread answers late). Round and global
# state are retained, so an idle device re-subscribes now and then to fetch them again.
RESYNC_AFTER_S = 20.0
ANNOUNCED_AGAIN_RESEND_S = 5.0
# Secure aggregation: a step's message is sent again until the aggregator's next step shows it arrived.
SECAGG_RESEND_S = 10.0


@dataclass
class DeviceConfig:
    """One device's settings.

    device_id: unique id; also the MQTT topic segment a broker ACL pins the device to.
    bundle: artifact bundle folder, or an exporter output with a rank ladder: then the device
        takes ``rank`` if set, else the largest rank whose measured training peak memory fits
        ``memory_budget_mb`` (0: no budget, the largest rank).
    data: local training data (.csv/.tsv/.jsonl/.json) with ``text_column`` and ``label_column``.
    eval_data: optional local test data; else ``eval_fraction`` of ``data`` is held out.
    state_dir: where the device keeps its round, pending update and local adapter.
    threads: ONNX Runtime intra-op threads (0: all cores).
    max_local_steps: cap on the announced local steps (0: no cap), for slow devices.
    exit_when_finished: stop when the aggregator announces the job finished.
    train_window: local time span ``"HH:MM-HH:MM"`` in which to train (may cross midnight:
        ``"22:00-06:00"``); outside it an open round waits, pending updates are still sent.
        Empty: any time.
    slowdown: a simulated straggler (the simulator's availability traces): hold each trained
        update for ``(slowdown - 1)`` times its training time before sending it, as a device
        this many times slower would; 1: send at once. The hold is a wait, not work: the
        machine's cores stay free for the other simulated devices, and the update leaves when a
        device this many times slower would have sent it (its staleness grows meanwhile).
    online_schedule: a simulated availability schedule (``edge_client.availability``:
        ``origin``, ``horizon_s``, ``periods``); empty: always online. Outside its periods the
        device says it is offline and does not train, and an update it was offline for at any
        moment between the start of its training and its sending is lost.
    isolate_training: train in a child process (``edge_client.trainer_process``) so the MQTT
        connection keeps answering while a step runs (ONNX Runtime holds the GIL for a whole
        step); false: train in this process (one interpreter less, about 20 MiB, for a device
        whose steps are short and whose broker waits).
    """

    device_id: str = ""
    job: str = "default"
    bundle: Path | None = None
    data: Path | None = None
    text_column: str = "text"
    label_column: str = "label"
    eval_data: Path | None = None
    eval_fraction: float = 0.1
    state_dir: Path = Path("fedlora-device")
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    threads: int = 0
    max_local_steps: int = 0
    memory_budget_mb: int = 0
    rank: int = 0
    seed: int = 0
    exit_when_finished: bool = False
    train_window: str = ""
    isolate_training: bool = True
    slowdown: float = 1.0
    online_schedule: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.device_id:
            raise ConfigError("device_id is required")
        try:
            check_device_id(self.device_id)
        except ProtocolError as exc:
            raise ConfigError(str(exc)) from None
        if self.bundle is None or self.data is None:
            raise ConfigError("bundle and data are required")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.threads < 0 or self.max_local_steps < 0 or self.memory_budget_mb < 0 or self.rank < 0:
            raise ConfigError("threads, max_local_steps, memory_budget_mb and rank must be >= 0")
        if self.train_window:
            parse_train_window(self.train_window)
        if not 1.0 <= self.slowdown <= 1000.0:
            raise ConfigError(f"slowdown must be in [1, 1000], got {self.slowdown}")
        if self.online_schedule:
            OnlineSchedule.from_dict(self.online_schedule)


def parse_train_window(window: str) -> tuple[int, int]:
    """``"HH:MM-HH:MM"`` as (start, end) minutes after local midnight; the end is exclusive."""
    m = re.fullmatch(r"\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*", window)
    start, end = (int(m[1]) * 60 + int(m[2]), int(m[3]) * 60 + int(m[4])) if m else (-1, -1)
    if not m or int(m[2]) > 59 or int(m[4]) > 59 or start >= 24 * 60 or end > 24 * 60 or start == end:
        raise ConfigError(f"train_window must look like 22:00-06:00 (local time, start != end), not {window!r}")
    return start, end


def in_train_window(window: str, now: datetime) -> bool:
    if not window:
        return True
    start, end = parse_train_window(window)
    minute = now.hour * 60 + now.minute
    return start <= minute < end if start < end else (minute >= start or minute < end)


def load_device_config(path: str | Path | None = None, overrides: dict | None = None) -> DeviceConfig:
    return load(DeviceConfig, path, env_prefix="FEDLORA_DEVICE", overrides=overrides)


@functools.lru_cache(maxsize=4)
def _text_encoder(tokenizer: Path, max_length: int, pad_token_id: int) -> TextEncoder:
    """One tokenizer per bundle in a process, however many (virtual) devices encode with it."""
    return TextEncoder(tokenizer, max_length, pad_token_id)


@dataclass
class LocalData:
    train: EncodedDataset
    test: EncodedDataset | None


def load_local_data(cfg: DeviceConfig, bundle: Bundle) -> LocalData:
    """The device's training data and its test data (``eval_data``, else a held-out fraction).

    A causal-LM bundle takes instruction data (chats, Alpaca rows, or text and label as
    classification as instruction with the bundle's label words) or plain text, whichever the
    file holds (``edge_client.instruct``)."""
    m = bundle.manifest

    def encode(path: Path) -> EncodedDataset:
        if m.task == "causal-lm":
            return encode_causal_lm_file(path, bundle, cfg.text_column, cfg.label_column)
        encoder = _text_encoder(bundle.path(m.tokenizer), m.max_length, m.pad_token_id)
        return encode_classification(read_records(path, cfg.text_column, cfg.label_column), encoder, m.labels)

    assert cfg.data is not None  # DeviceConfig refuses a config without it
    train = encode(cfg.data)
    if cfg.eval_data is not None:
        return LocalData(train, encode(cfg.eval_data))
    n_eval = int(len(train) * cfg.eval_fraction)
    if n_eval == 0:
        return LocalData(train, None)
    order = np.random.default_rng(cfg.seed).permutation(len(train))
    return LocalData(train.subset(np.sort(order[n_eval:])), train.subset(np.sort(order[:n_eval])))


def round_lr(train: TrainInfo, global_rank: int, rank: int) -> float:
    """The announced learning rate for a device of ``rank``: ``lr * (global_rank / rank) **
    lr_rank_power`` (``server.config.TrainSettings``; no power: ``lr``)."""
    lr, power = train.lr, train.lr_rank_power
    if not 0 < lr < 1 or not 0 <= power <= 2:
        raise ProtocolError(f"announced lr {lr} or lr_rank_power {power} is out of range")
    return lr * (max(global_rank, rank) / rank) ** power


def update_delta(local: dict[str, np.ndarray], start_from: dict[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
    """The change from exactly what the aggregator sent, at ``rank``: a personal B (FedSA-LoRA)
    or a frozen A (FFA-LoRA) is not in ``start_from`` and is not sent back."""
    return truncate_rank({name: local[name] - start_from[name] for name in start_from}, rank)


@dataclass
class SharedTrainer:
    """One loaded bundle and training session that many virtual devices take turns on (the
    simulator's fleet workers): before each device trains, the adapter is reset to ``initial``
    (the bundle's) and the device's own saved adapter loaded over it. The optimizer's moments
    stay the session's."""

    bundle: Bundle
    trainer: Trainer | TrainerProcess
    initial: dict[str, np.ndarray]


class Device:
    """One device. ``link``: a connection to use instead of its own; ``shared``: a session to
    take turns on instead of its own (``SharedTrainer``)."""

    def __init__(self, cfg: DeviceConfig, link: MqttLink | None = None, shared: SharedTrainer | None = None):
        self.cfg = cfg
        self.shared = shared
        if shared is not None:
            self.bundle = shared.bundle
        else:
            assert cfg.bundle is not None  # DeviceConfig refuses a config without one
            self.bundle = Bundle(choose_bundle(cfg.bundle, cfg.memory_budget_mb * 2**20, cfg.rank))
        self.manifest = self.bundle.manifest
        self.topics = Topics(cfg.job)
        self.data = load_local_data(cfg, self.bundle)
        options = RuntimeOptions(intra_op_threads=cfg.threads)
        self.trainer: Trainer | TrainerProcess
        if shared is not None:
            self.trainer = shared.trainer
        elif cfg.isolate_training:
            self.trainer = TrainerProcess(self.bundle, options=options)
        else:
            self.trainer = Trainer(self.bundle, options=options)
        self.state = DeviceState(Path(cfg.state_dir), cfg.job)
        if shared is None:
            self.state.restore_adapter(self.trainer)
        # The rank this device downloads, trains and sends: the bundle's, or less once HetLoRA
        # self-pruning gave components up (they stay zero in the bundle's larger tensors).
        self.rank = self.state.rank if self.state.rank and self.state.rank <= self.manifest.rank else self.manifest.rank
        self.feedback = ErrorFeedback.load(self.state.feedback_path)
        will = (self.topics.status(cfg.device_id), Status(Presence.OFFLINE).to_bytes())
        self.link = link or MqttLink(cfg.broker, client_id=f"fedlora-{cfg.job}-{cfg.device_id}", will=will)
        # A global envelope holds at most this rank's adapter and changes to the adapted
        # weights; nothing on the downlink may make the device buffer or decode more.
        self.global_limits = EnvelopeLimits.for_global(self.manifest.shapes)
        max_bytes = 8 + MAX_HEADER_BYTES + 9 * self.global_limits.max_elements
        self.reassembler = Reassembler(max_bytes=max_bytes, max_pending=4, per_source=2, max_buffered=2 * max_bytes)
        self.refusals = Refusals(log)
        self.announcement: Announcement | None = None
        self.global_version: int | None = None
        self.global_tensors: dict[str, np.ndarray] | None = None
        self._sent_at: float | None = None
        self._sent_whole_at: float | None = None  # when the broker had acked every chunk of the update
        self._hold_until = 0.0  # a simulated straggler sends its update no earlier (monotonic)
        self.schedule = OnlineSchedule.from_dict(cfg.online_schedule) if cfg.online_schedule else None
        self._online = self.online_now()  # the presence last published
        self._trained_since: float | None = None  # unix time the pending update's training began, until it is sent
        self._last_progress = time.monotonic()
        self.rounds_trained = 0
        self._window_wait_round: int | None = None
        self.secure: SecureSession | None = None  # this device's part in a secure round
        self._secure_sent_at: float | None = None

    # -- messages ------------------------------------------------------------------------
    def status_payload(self, state: Presence = Presence.ONLINE) -> bytes:
        return Status(state, self.rank, len(self.data.train), self.manifest.model_id[:256]).to_bytes()

    def announce_presence(self) -> None:
        presence = Presence.ONLINE if self._online else Presence.OFFLINE  # a simulated schedule may say offline
        self.link.publish(self.topics.status(self.cfg.device_id), self.status_payload(presence), retain=True)
        self._sent_at = None  # after a reconnect, resend a pending update at once

    def handle(self, topic: str, payload: bytes, received_at: float | None = None) -> None:
        """One message, contained: a malformed or hostile one is refused with a (throttled) log
        line and never ends the device. ``received_at`` (time.monotonic) is when it arrived, if
        it waited in the inbox."""
        self._last_progress = time.monotonic()
        kind = "unknown"
        try:
            ref = self.topics.parse(topic)
            kind = ref.kind.value
            if not payload:
                return  # a cleared retained message
            if ref.kind is TopicKind.ROUND:
                self._handle_announcement(payload)
            elif ref.kind in (TopicKind.GLOBAL, TopicKind.GDELTA):
                self._handle_global_chunk(payload, delta=ref.kind is TopicKind.GDELTA)
            elif ref.kind is TopicKind.ACK and ref.device == self.cfg.device_id:
                self._handle_ack(payload, self._last_progress if received_at is None else received_at)
            elif ref.kind is TopicKind.SECAGG:
                self._handle_secagg(ref, payload)
            # else: a well-formed topic of the job this device does not handle (amqtt sometimes
            # delivers other devices' status): nothing to do
        except ProtocolError as exc:
            self.refusals.refuse(kind, "malformed", str(exc))
        except Exception as exc:  # an input nobody foresaw: refuse it, keep the device running
            self.refusals.refuse(kind, "internal_error", f"{type(exc).__name__}: {exc}", unexpected=True)

    def _handle_announcement(self, payload: bytes) -> None:
        ann = parse_announcement(payload)
        if ann.job != self.cfg.job:
            raise ProtocolError(f"announcement for job {ann.job!r} on the topic of job {self.cfg.job!r}")
        if ann.is_open:
            assert ann.train is not None
            round_lr(ann.train, ann.rank, self.rank)
            if (
                ann.round == self.state.pending_round
                and self._sent_at is not None
                and time.monotonic() - self._sent_at > ANNOUNCED_AGAIN_RESEND_S
            ):
                # Our round announced again: the aggregator restarted or reconnected (maybe to a
                # broker that lost what we sent). Resend now rather than at the 30 s timer.
                self._sent_at = None
        self.announcement = ann
        self._start_secure(ann)

    def _handle_global_chunk(self, payload: bytes, delta: bool) -> None:
        """A chunk of the full global copy, or of the change from the previous version."""
        complete = self.reassembler.add("delta" if delta else "full", payload)
        if complete is None:
            return
        env = self._decode_global(complete)
        if delta:
            self._apply_global_delta(env)
        elif self.global_version is None or env.round >= self.global_version:
            self.global_version, self.global_tensors = env.round, env.tensors

    def _decode_global(self, payload: bytes) -> Envelope:
        """A global envelope of this job whose adapter has this device's shapes at its rank; else
        ProtocolError."""
        env = decode_envelope(payload, self.global_limits, reassembled=True)
        frozen_changes(env.tensors)  # factored changes to frozen weights must pair up
        if env.kind != "global" or env.job != self.cfg.job:
            raise ProtocolError(f"a {env.kind} envelope of job {env.job!r} on a global topic of job {self.cfg.job!r}")
        shapes = rank_shapes(self.manifest.shapes, self.rank)
        adapter = adapter_part(env.tensors)
        if any(k not in shapes or tuple(v.shape) != shapes[k] for k, v in adapter.items()):
            raise ProtocolError(
                f"global adapter version {env.round} (rank {env.rank}) does not match this bundle's "
                f"tensors at rank {self.rank}"
            )
        return env

    def _apply_global_delta(self, env: Envelope) -> None:
        """Add a change to the global copy we hold; one that is not against it is dropped, and if
        it is newer we fetch the full copy again."""
        held = self.global_tensors
        if held is None or env.base_version != self.global_version or set(env.tensors) != set(held):
            if self.global_version is None or env.round > self.global_version:
                self.link.subscribe(self.topics.global_filter(self.rank))  # behind: fetch the full copy
            return
        self.global_version = env.round
        self.global_tensors = {k: (held[k] + env.tensors[k]).astype(np.float32) for k in held}
        # Deltas work for us: stop downloading full copies until we fall behind again.
        self.link.unsubscribe(self.topics.global_filter(self.rank))

    def adopt_downlink(self, other: Device) -> None:
        """Take the announcement and global adapter that ``other``, a device of the same job and
        rank on the same connection, received (the simulator's fleet workers decode them once)."""
        ann = other.announcement
        if ann is not None and ann is not self.announcement:
            if (
                ann.is_open
                and ann.round == self.state.pending_round
                and self._sent_at is not None
                and time.monotonic() - self._sent_at > ANNOUNCED_AGAIN_RESEND_S
            ):
                self._sent_at = None  # our round announced again: resend now (see _handle_announcement)
            self.announcement = ann
        self.global_version, self.global_tensors = other.global_version, other.global_tensors
        self._last_progress = other._last_progress

    def _handle_ack(self, payload: bytes, received_at: float) -> None:
        ack = parse_ack(payload)
        if isinstance(ack, RepairRequest):
            self._repair(ack, received_at)
            return
        if self.state.pending_round is None or ack.round != self.state.pending_round:
            return
        if ack.result is AckResult.ACCEPTED:
            log.info("round %s: update accepted", ack.round)
        elif ack.reason in RETRY_REASONS:
            log.warning(
                "round %s: the aggregator cannot take the update now (%s); sending it again in %.0fs",
                ack.round,
                ack.detail[:200],
                RESEND_AFTER_S,
            )
            self._sent_at = time.monotonic()
            return
        else:
            log.error("round %s: update rejected (%s: %s)", ack.round, ack.reason, ack.detail[:200])
        self.state.clear_pending(ack.round)

    # -- work ----------------------------------------------------------------------------
    def due_round(self) -> Announcement | None:
        """The open round this device should train now, if any."""
        ann = self.announcement
        if not ann or not ann.is_open or not self._online:
            return None
        if ann.is_async:
            if self.state.pending_round is not None:
                return None  # async: one update in flight; the next trains on the version after its ack
        elif self.cfg.device_id not in ann.selected:
            return None
        if ann.round <= self.state.last_round or self.state.pending_round == ann.round:
            return None
        if self.global_version != ann.global_version:
            return None  # wait for the matching global adapter
        if ann.secagg is not None and (
            self.secure is None or self.secure.round != ann.round or self.secure.update is not None
        ):
            return None  # secure round: trained once, or not ours (no session: we restarted mid-round)
        if not in_train_window(self.cfg.train_window, datetime.now()):
            if self._window_wait_round != ann.round:
                self._window_wait_round = ann.round
                log.info("round %s is open; waiting for the training window %s", ann.round, self.cfg.train_window)
            return None
        return ann

    def train_round(self, ann: Announcement) -> bytes | None:
        """Train on the announced global adapter and return the encoded update envelope (None
        in a secure round: the session holds the change until it can be masked)."""
        train, strategy = ann.train, ann.strategy
        assert train is not None and strategy is not None
        steps = self._local_steps(train)
        lr = round_lr(train, ann.rank, self.rank)
        log.info("round %s: training %d local steps (batch %s, lr %g)", ann.round, steps, train.batch_size, lr)
        start = time.perf_counter()
        start_from = self._start_from_global()
        mu = self._proximal(ann.round, strategy.fedprox_mu)
        try:
            losses, times = self._train_local_steps(
                ann.round, train.batch_size, steps, lr, keep_a=not strategy.trains_a
            )
        finally:
            self.trainer.set_proximal(0.0)  # evaluation and later rounds score the plain loss
        sent_rank = self.rank
        local, new_rank = self._prune_rank(self.trainer.get_adapter(), strategy.prune_threshold)
        self.state.save_adapter(local)
        metrics = self._round_metrics(losses, times, steps, start, train.batch_size)
        if mu:
            metrics["fedprox_mu"] = mu
        env = self._update_envelope(ann, update_delta(local, start_from, sent_rank), sent_rank, metrics)
        log.info(
            "round %s: %d steps, loss %.4f, %.2fs", ann.round, steps, metrics["train_loss"], metrics["train_seconds"]
        )
        self.rounds_trained += 1
        payload = None
        if ann.secagg is not None:
            self._hold_for_masking(env, ann.privacy)  # sent masked once the peers' shares are in
        else:
            payload = self._encode_update(env, ann.privacy)
        if new_rank < sent_rank:
            self._switch_rank(new_rank)
        return payload

    def _proximal(self, round_no: int, mu: float) -> float:
        """FedProx: centre the proximal term on the adapter this round starts from (the global)
        with the announced ``mu``; returns the mu in effect. A bundle exported without the term
        trains the plain loss, and says so."""
        if mu <= 0:
            return 0.0
        if not self.trainer.has_proximal:
            log.warning(
                "round %s asks for FedProx (fedprox_mu %g) but this device's bundle was exported without "
                "the proximal term: training without it; re-export the model and reflash to use it",
                round_no,
                mu,
            )
            return 0.0
        self.trainer.set_proximal(mu)
        return mu

    def _local_steps(self, train: TrainInfo) -> int:
        """The announced local steps, capped by ``max_local_steps`` for a slow device."""
        return min(train.local_steps, self.cfg.max_local_steps) if self.cfg.max_local_steps else train.local_steps

    def _start_from_global(self) -> dict[str, np.ndarray]:
        """Load the received global adapter (padded to the bundle's rank) into the trainer; returns
        what the update's delta is taken against."""
        assert self.global_tensors is not None
        if self.shared is not None:  # our turn on a shared session: our own adapter first
            self.trainer.set_adapter(self.shared.initial)
            self.state.restore_adapter(self.trainer)
        return self.trainer.apply_global(pad_rank(self.global_tensors, self.manifest.shapes))

    def _train_local_steps(
        self, round_no: int, batch_size: int, steps: int, lr: float, keep_a: bool
    ) -> tuple[list[float], list[float]]:
        """``steps`` optimizer steps on local batches (drawn with the device's seed and the round);
        returns each step's loss and seconds."""
        # FFA-LoRA (keep_a) keeps A at its initial value: restore it after every step (cheap: A is small).
        frozen = (
            {
                p.name: v
                for p, v in zip(self.manifest.trainable, self.trainer.get_adapter().values())
                if p.role == "lora_A"
            }
            if keep_a
            else {}
        )
        self.trainer.set_learning_rate(lr)
        rng = np.random.default_rng([self.cfg.seed, round_no])
        losses, times = [], []
        for batch in self.data.train.sample_batches(batch_size, steps, rng):
            t0 = time.perf_counter()
            losses.append(self.trainer.train_step(batch))
            if frozen:
                self.trainer.set_adapter(frozen)
            times.append(time.perf_counter() - t0)
        return losses, times

    def _prune_rank(self, local: dict[str, np.ndarray], threshold: float) -> tuple[dict[str, np.ndarray], int]:
        """HetLoRA self-pruning (``threshold`` > 0): the rank this device keeps, and the adapter
        with the given-up components zeroed (also in the trainer)."""
        new_rank = pruned_rank(local, self.rank, threshold) if threshold > 0 else self.rank
        if new_rank < self.rank:
            # This update, at the old rank, carries the zeroed tail: under HetLoRA's
            # zero-padding that is the same as sending the truncation.
            local = pad_rank(truncate_rank(local, new_rank), self.manifest.shapes)
            self.trainer.set_adapter(local)
        return local, new_rank

    def _round_metrics(
        self, losses: list[float], times: list[float], steps: int, start: float, batch_size: int
    ) -> dict:
        """What the update reports: training loss and time, local evaluation, peak memory."""
        metrics = {
            "train_loss": float(np.mean(losses[-max(1, len(losses) // 2) :])),
            "steps": steps,
            "step_time_s": statistics.median(times),
            "train_seconds": time.perf_counter() - start,
        }
        metrics.update(self._evaluate(batch_size))
        # isolated training: the device's memory is this process's and the training process's
        isolated = self.trainer.peak_rss_bytes() if isinstance(self.trainer, TrainerProcess) else 0
        metrics["peak_rss_bytes"] = peak_rss_bytes() + isolated
        return metrics

    def _evaluate(self, batch_size: int) -> dict:
        """Loss and accuracy on the local test data (none: no metrics)."""
        if self.data.test is None:
            return {}
        # Evaluate at the training batch size: a larger batch would raise the peak memory
        # above what the rank was chosen for.
        result = self.trainer.evaluate(self.data.test, batch_size=batch_size)
        out = {"eval_loss": result["loss"], "eval_accuracy": result["accuracy"], "eval_examples": result["examples"]}
        if "perplexity" in result:  # a causal LM: over the local test data's response tokens
            out["eval_perplexity"] = result["perplexity"]
        return out

    def _update_envelope(self, ann: Announcement, delta: dict[str, np.ndarray], rank: int, metrics: dict) -> Envelope:
        """The update of round ``ann``, in the announced codecs (the head's own, if announced)."""
        head_codec = ann.head_codec
        head = {p.name for p in self.manifest.trainable if p.role == "head"}
        return Envelope(
            kind="update",
            job=self.cfg.job,
            round=ann.round,
            sender=self.cfg.device_id,
            rank=rank,
            codec=ann.codec,
            tensors=delta,
            num_examples=len(self.data.train),
            metrics=metrics,
            base_version=ann.global_version,
            tensor_codecs={name: head_codec for name in delta if name in head} if head_codec else {},
        )

    def _encode_update(self, env: Envelope, privacy: PrivacyInfo | None = None) -> bytes:
        # What a lossy codec drops this round is kept and added to the next update.
        lossless = all(get_codec(c).lossless for c in {env.codec, *env.tensor_codecs.values()})
        if privacy is not None:
            env = self._privatize(env, privacy, lossless)
        if lossless:
            return encode_envelope(env)
        return encode_with_feedback(env, self.feedback, compensated=privacy is not None)

    def _privatize(self, env: Envelope, privacy: PrivacyInfo, lossless: bool) -> Envelope:
        """Differential privacy (``edge_client.privacy``): the change, with the error-feedback
        residual added first under a lossy codec, clipped and noised; the clip bit in the metrics."""
        privatize = Privatizer(privacy)
        tensors = privatize(env.tensors if lossless else self.feedback.compensate(env.tensors))
        metrics = {**env.metrics, BELOW_CLIP_METRIC: float(bool(privatize.below_clip))}
        return dataclasses.replace(env, tensors=tensors, metrics=metrics)

    # -- secure aggregation (edge_client/secure_update.py) ---------------------------------
    def _start_secure(self, ann: Announcement) -> None:
        """A secure round that selected us and that we have not answered: a session, our keys."""
        if (
            ann.secagg is None
            or not ann.is_open
            or self.cfg.device_id not in ann.selected
            or ann.round <= self.state.last_round
            or self.state.pending_round == ann.round
            or (self.secure is not None and self.secure.round >= ann.round)
        ):
            return
        try:
            self.secure = SecureSession(self.cfg.job, ann.round, self.cfg.device_id)
        except ImportError as exc:  # cryptography / pycryptodome: the secagg extra is not installed
            log.error(
                "round %s runs secure aggregation, but this device lacks its libraries (%s): install the "
                "secagg extra (pip install 'fedlora[secagg]'); skipping the round",
                ann.round,
                exc,
            )
            self._skip_round(ann.round)
            return
        self._secure_send(self.secure.keys_message().to_bytes())

    def _secure_send(self, payload: bytes) -> None:
        self._secure_sent_at = time.monotonic()
        if self.link.connected.is_set():
            self.link.publish(self.topics.secagg(self.cfg.device_id), payload)

    def _handle_secagg(self, ref: TopicRef, payload: bytes) -> None:
        """The key list, the shares forwarded to us, the unmask request: parsed, then for our session only."""
        s = self.secure
        if ref.channel is SecaggChannel.KEYS:
            key_list = parse_secagg_key_list(payload)
            if s is not None and (key_list.job, key_list.round) == (s.job, s.round):
                shares = s.take_key_list(key_list)
                if shares is not None:
                    self._secure_send(shares.to_bytes())
        elif ref.channel is SecaggChannel.TO and ref.device == self.cfg.device_id:
            forward = parse_secagg_forward(payload)
            if s is not None and (forward.job, forward.round) == (s.job, s.round):
                s.take_forward(forward)
        elif ref.channel is SecaggChannel.UNMASK:
            request = parse_secagg_unmask(payload)
            if s is not None and (request.job, request.round) == (s.job, s.round):
                revealed = s.take_unmask(request)
                if revealed is not None:
                    self._secure_send(revealed.to_bytes())
        if s is not None and s.failed:
            self._secure_failed(s)

    def _hold_for_masking(self, env: Envelope, privacy: PrivacyInfo | None) -> None:
        """The trained change, privatized (DP's clip and noise, on the device), kept by the session."""
        if privacy is not None:
            env = self._privatize(env, privacy, lossless=True)
        assert self.secure is not None  # due_round trains a secure round only with its session
        self.secure.update = env

    def _secure_step(self) -> None:
        """Mask and queue the update once trained and forwarded; resend the step's message until
        the aggregator's next step shows it arrived; forget a session whose round is over."""
        s, ann = self.secure, self.announcement
        if s is None or s.failed:
            return
        if ann is not None and (ann.round > s.round or not ann.is_open):
            self.secure = None
            return
        if s.ready():
            payload = encode_envelope(s.masked_update())
            self.state.set_pending(s.round, payload)
            self._sent_at = None
            log.info("round %s: masked input ready (%d peers)", s.round, len(s.masking or ()))
        if self._secure_sent_at is not None and time.monotonic() - self._secure_sent_at < SECAGG_RESEND_S:
            return
        if s.shares_sent is None:
            self._secure_send(s.keys_message().to_bytes())
        elif s.masking is None:
            self._secure_send(s.shares_sent.to_bytes())
        elif s.revealed is not None:
            self._secure_send(s.revealed.to_bytes())

    def _secure_failed(self, s: SecureSession) -> None:
        """This device leaves the round's secure sum (the protocol tolerates it): skip the round."""
        log.warning("round %s: leaving secure aggregation: %s", s.round, s.failed)
        if self.state.pending_round != s.round and s.round > self.state.last_round:
            self._skip_round(s.round)
        self.secure = None

    def _switch_rank(self, rank: int) -> None:
        """HetLoRA self-pruning gave components up: from now on download, train and send rank
        ``rank``. The aggregator learns it from our status message and publishes that slice."""
        log.info("rank self-pruning: rank %d -> %d", self.rank, rank)
        self.link.unsubscribe(self.topics.global_filter(self.rank))
        self.link.unsubscribe(self.topics.delta_filter(self.rank))
        self.rank = self.state.rank = rank
        self.state.save()
        self.feedback.residual = truncate_rank(self.feedback.residual, rank)
        self.global_version, self.global_tensors = None, None  # wait for the full copy at the new rank
        self.link.subscribe(self.topics.global_filter(rank))
        self.link.subscribe(self.topics.delta_filter(rank))
        self.announce_presence()

    def update_topic(self) -> str:
        """Where this device's update goes: ``updates/<device>``, or in a sharded job (the
        announcement's ``shards``) its shard's topic, the same for every resend."""
        shards = self.announcement.shards if self.announcement is not None else 1
        return self.topics.update_for(self.cfg.device_id, shards)

    def send_pending(self) -> None:
        if self.state.pending_round is None or time.monotonic() < self._hold_until or not self._online:
            return
        if self._sent_at is not None and time.monotonic() - self._sent_at < RESEND_AFTER_S:
            return
        if not self.link.connected.is_set():
            return
        payload = self.state.pending_payload()
        if payload is None:
            return
        self._sent_at = time.monotonic()
        try:
            n = self.link.publish_chunked(self.update_topic(), payload)
            self._sent_whole_at = time.monotonic()
            self._trained_since = None  # sent: going offline now loses nothing
            log.info("round %s: update sent (%d bytes, %d chunks)", self.state.pending_round, len(payload), n)
        except FedloraError as exc:
            log.warning("sending the update failed, will retry: %s", exc)
            self._sent_at = None

    def _repair(self, request: RepairRequest, received_at: float) -> None:
        """The aggregator holds part of our pending update: resend the chunks it names."""
        payload = self.state.pending_payload()
        if payload is None or request.msg_id != message_id(payload).hex() or not self.link.connected.is_set():
            return  # not (or no longer) what we are sending
        if self._sent_whole_at is not None and received_at < self._sent_whole_at:
            return  # asked while our whole update was still going out (a slow link): it may be complete now
        topic = self.update_topic()
        indices = None  # our chunking changed (another packet limit): the aggregator starts over
        if request.count == self.link.chunk_count(topic, len(payload)):
            indices = set(request.missing)  # each below count: the parser checked
            if not indices:
                return
        try:
            n = self.link.publish_chunked(topic, payload, indices=indices)
            self._sent_at = time.monotonic()
            log.info("round %s: resent %d chunks the aggregator was missing", self.state.pending_round, n)
        except FedloraError as exc:
            log.warning("resending missing chunks failed, will retry: %s", exc)

    def step(self) -> None:
        self.follow_schedule()
        self._drop_stale_pending()
        due = self.due_round()
        if due is not None and not self._take_round(due):
            return
        self.follow_schedule()  # training took time: the device may have gone offline meanwhile
        self._secure_step()
        self.send_pending()
        self.resync_if_stale()

    # -- simulated availability ----------------------------------------------------------
    def online_now(self) -> bool:
        """Whether the device is online now by its simulated schedule (always, without one)."""
        return self.schedule is None or self.schedule.online_at(time.time())

    def follow_schedule(self) -> None:
        """Publish the presence the schedule gives when it changes, and lose an update not yet
        sent whose device went offline after its training began (``DeviceConfig.online_schedule``)."""
        if self.schedule is None:
            return
        now = time.time()
        online = self.schedule.online_at(now)
        if online != self._online:
            self._online = online
            log.info("schedule: %s", "online" if online else "offline")
            self.announce_presence()
        since = self._trained_since
        if (
            since is not None
            and self.state.pending_round is not None
            and not self.schedule.online_throughout(since, now)
        ):
            log.warning(
                "round %s: went offline before the update was sent; the update is lost", self.state.pending_round
            )
            self._trained_since = None
            self.state.clear_pending(None)  # trains again once online (sync: if its round is still open)

    def _drop_stale_pending(self) -> None:
        """A later round is open: the pending update's round closed and will never take it."""
        ann = self.announcement
        if ann and ann.is_async:
            # Async rounds take an update of an older round until it is too stale (then reject it);
            # once the job is finished nothing will take it.
            if self.state.pending_round is not None and ann.state is RoundState.FINISHED:
                log.info("job finished before our update of round %s was taken; dropping it", self.state.pending_round)
                self.state.clear_pending(None)
            return
        if self.state.pending_round is not None and ann and ann.is_open and ann.round > self.state.pending_round:
            log.warning("round %s closed before our update was acknowledged; dropping it", self.state.pending_round)
            self.state.clear_pending(None)

    def _take_round(self, due: Announcement) -> bool:
        """Train the due round and keep its update as pending (persisted before it is sent), or skip
        the round if its deadline passed. False when training failed (the round is skipped too)."""
        if not due.is_async and time.time() > due.deadline:
            log.warning("round %s: deadline passed before training started; skipping", due.round)
            self._skip_round(due.round)
            return True
        started = time.monotonic()
        began = time.time()
        try:
            payload = self.train_round(due)
        except TrainerProcessDied:
            raise  # not the round's fault: the device exits and its supervisor restarts it
        except Exception:  # what an announcement made training do must not crash-loop the device
            log.exception("round %s: training failed; skipping the round", due.round)
            self._skip_round(due.round)
            return False
        if payload is None:
            return True  # a secure round: masked and sent by _secure_step
        self.state.set_pending(due.round, payload)
        self.feedback.save(self.state.feedback_path)  # after the payload it belongs to
        self._sent_at = None
        self._trained_since = began if self.schedule is not None else None
        if self.cfg.slowdown > 1:
            trained = time.monotonic() - started
            self._hold_until = time.monotonic() + (self.cfg.slowdown - 1) * trained
        return True

    def _skip_round(self, round_no: int) -> None:
        self.state.last_round = round_no
        self.state.save()

    def resync_if_stale(self) -> None:
        if time.monotonic() - self._last_progress < RESYNC_AFTER_S or not self.link.connected.is_set():
            return
        self._last_progress = time.monotonic()
        self.link.resubscribe(self.topics.round)
        ann = self.announcement
        if ann is None or ann.global_version != self.global_version:
            self.link.resubscribe(self.topics.global_filter(self.rank))

    def finished(self) -> bool:
        ann = self.announcement
        return bool(ann and ann.state is RoundState.FINISHED and self.state.pending_round is None)

    def run(self, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        self.link.on_connect_hooks.append(self.announce_presence)
        self._subscribe()
        if not self.link.connected.is_set():
            self.link.connect_retrying(stop)
            if stop.is_set():
                return
        log.info("device %s online: %d training examples, rank %d", self.cfg.device_id, len(self.data.train), self.rank)
        try:
            while not stop.is_set():
                self._handle_inbox(timeout=0.5)
                self.step()
                if self.cfg.exit_when_finished and self.finished():
                    log.info("job %s finished", self.cfg.job)
                    break
        finally:
            self._go_offline()

    def _subscribe(self) -> None:
        """The job's round, the global adapter at this device's rank (full and delta), our acks."""
        self.link.subscribe(self.topics.round)
        self.link.subscribe(self.topics.global_filter(self.rank))
        self.link.subscribe(self.topics.delta_filter(self.rank))
        self.link.subscribe(self.topics.ack(self.cfg.device_id))
        self.link.subscribe(self.topics.secagg_round("keys"))
        self.link.subscribe(self.topics.secagg_round("unmask"))
        self.link.subscribe(self.topics.secagg_to(self.cfg.device_id))

    def _handle_inbox(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for a message, then handle it and whatever else arrived."""
        try:
            msg = self.link.inbox.get(timeout=timeout)
            self.handle(msg.topic, msg.payload, msg.received_at)
            while not self.link.inbox.empty():
                msg = self.link.inbox.get_nowait()
                self.handle(msg.topic, msg.payload, msg.received_at)
        except Exception as exc:  # queue.Empty, or a handler bug we log and survive
            if type(exc).__name__ != "Empty":
                log.exception("error handling a message")

    def _go_offline(self) -> None:
        try:
            self.link.publish(
                self.topics.status(self.cfg.device_id), self.status_payload(Presence.OFFLINE), retain=True
            )
            time.sleep(0.1)
        finally:
            self.link.close()
            self.close()

    def close(self) -> None:
        """End the training process (if training is isolated); the device is of no further use."""
        if self.shared is None and isinstance(self.trainer, TrainerProcess):
            self.trainer.close()
