"""ONNX Runtime on-device training, torch-free.

``onnxruntime.training``'s package ``__init__`` imports torch (through its optim module), which
a device does not have. We register a bare package object for ``onnxruntime.training`` whose
``__path__`` points at the real folder, so ``onnxruntime.training.api`` imports alone.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import resource
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.bundle import Bundle
from core.errors import BundleError
from core.lora import PROXIMAL_CENTER_PREFIX, PROXIMAL_MU
from core.protocol import adapter_part, frozen_changes
from edge_client.data import IGNORE_INDEX, Batch, EncodedDataset


def training_api():
    """Import ``onnxruntime.training.api`` without importing torch."""
    if "onnxruntime.training" not in sys.modules:
        spec = importlib.util.find_spec("onnxruntime")
        if spec is None or spec.submodule_search_locations is None:
            raise BundleError("onnxruntime is not installed; install onnxruntime-training-cpu==1.19.2")
        folder = Path(list(spec.submodule_search_locations)[0]) / "training"
        if not (folder / "api").is_dir():
            raise BundleError(
                "this onnxruntime has no training API: install onnxruntime-training-cpu "
                "(and not plain onnxruntime, which shares its folder)"
            )
        package = types.ModuleType("onnxruntime.training")
        package.__path__ = [str(folder)]
        sys.modules["onnxruntime.training"] = package
    if "onnxruntime" not in sys.modules:
        # onnxruntime's own __init__ probes onnxruntime.training.ortmodule to name its build, and
        # that imports torch wherever torch is installed (build host, simulator: ~300 MiB of RSS
        # per client). A None entry makes the probe fail as it does on a device; we never use
        # ORTModule. (typeshed types sys.modules without the None that blocks an import.)
        sys.modules["onnxruntime.training.ortmodule"] = None  # type: ignore[assignment]
        try:
            importlib.import_module("onnxruntime")
        finally:
            del sys.modules["onnxruntime.training.ortmodule"]
    return importlib.import_module("onnxruntime.training.api")


def peak_rss_bytes() -> int:
    # Linux: VmHWM, this process's own peak. ru_maxrss also holds the parent's RSS at fork (kept
    # across exec), so a probe started by the exporter (torch loaded) would report ~1.4 GB.
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


@dataclass(frozen=True)
class RuntimeOptions:
    """Session knobs that decide the device's step time and memory."""

    intra_op_threads: int = 0  # 0: ORT picks (all cores)
    inter_op_threads: int = 1
    graph_optimization: str = "all"  # none | basic | extended | all
    # ORT's planner that makes tensors share buffers raises the training step's peak RSS by a
    # quarter (MiniLM, batch 8 x 128: 400 -> 322 MiB) at no gain in time; without it, freed
    # tensors go back to the arena, which hands them out again (docs/benchmarks.md).
    reuse_buffers: bool = False


def _session_options(opts: RuntimeOptions):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3  # warnings about unused initializers are noise on a device
    so.intra_op_num_threads = opts.intra_op_threads
    so.inter_op_num_threads = opts.inter_op_threads
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.enable_mem_reuse = opts.reuse_buffers
    so.graph_optimization_level = {
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[opts.graph_optimization]
    return so


class Trainer:
    """One bundle loaded into ONNX Runtime: train steps, evaluation, adapter get/set."""

    def __init__(
        self, bundle: Bundle, checkpoint: str | Path | None = None, options: RuntimeOptions = RuntimeOptions()
    ):
        api = training_api()
        self.bundle = bundle
        self.manifest = bundle.manifest
        ckpt = Path(checkpoint) if checkpoint is not None else bundle.path("checkpoint")
        try:
            self.state = api.CheckpointState.load_checkpoint(str(ckpt))
            so = _session_options(options)
            self.module = api.Module(
                str(bundle.path("training_model.onnx")),
                self.state,
                str(bundle.path("eval_model.onnx")),
                device="cpu",
                session_options=so,
            )
            self.optimizer = api.Optimizer(str(bundle.path("optimizer_model.onnx")), self.module)
        except Exception as exc:  # ORT raises its own types; name the bundle in the message
            raise BundleError(f"{bundle.root}: ONNX Runtime could not load the artifacts: {exc}") from exc
        self._names = [p.name for p in self.manifest.trainable]
        self._frozen_original: dict[str, np.ndarray] = {}

    # -- adapter state -------------------------------------------------------------------
    def get_adapter(self) -> dict[str, np.ndarray]:
        params = self.state.parameters
        return {name: np.array(params[name].data, dtype=np.float32, copy=True) for name in self._names}

    def set_adapter(self, tensors: dict[str, np.ndarray]) -> None:
        shapes = self.manifest.shapes
        params = self.state.parameters
        for name, value in tensors.items():
            if name not in shapes:
                raise BundleError(f"adapter tensor {name} is not trainable in this bundle")
            if tuple(value.shape) != shapes[name]:
                raise BundleError(f"adapter tensor {name} has shape {value.shape}, bundle expects {shapes[name]}")
            params[name].data = np.ascontiguousarray(value, dtype=np.float32)

    def set_base_delta(self, name: str, delta: np.ndarray) -> None:
        """Make frozen weight ``name`` equal its exported value plus ``delta`` (strategies that
        fold the aggregate into base weights send the cumulative change)."""
        params = self.state.parameters
        if name not in params:
            raise BundleError(f"frozen weight {name} is not in the checkpoint")
        original = self._frozen_original.get(name)
        if original is None:
            original = self._frozen_original[name] = np.array(params[name].data, dtype=np.float32, copy=True)
        if delta.shape != original.shape:
            raise BundleError(f"change to {name} has shape {delta.shape}, the weight is {original.shape}")
        params[name].data = np.ascontiguousarray(original + delta, dtype=np.float32)

    def apply_global(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Load what the aggregator sent: adapter tensors, and changes to frozen weights
        (``core.protocol.frozen_changes``). Tensors it did not send (a personal B, a
        frozen A) stay as they are. Returns the adapter part."""
        adapter = adapter_part(tensors)
        self.set_adapter(adapter)
        for name, change in frozen_changes(tensors).items():
            self.set_base_delta(name, change)
        return adapter

    @property
    def has_proximal(self) -> bool:
        """Whether the bundle's loss has FedProx's proximal term (exported by a fedlora with
        ``export.proximal``; older bundles train the plain loss only)."""
        return PROXIMAL_MU in self.state.parameters

    def set_proximal(self, mu: float, center: dict[str, np.ndarray] | None = None) -> None:
        """FedProx: from the next step the loss is ``loss + mu / 2 * sum ||w - c||^2`` over the
        trainable tensors, with the centre ``c`` = ``center`` (name -> tensor; default: the
        adapter as it is now). ``mu`` 0 turns it off (the centres are then left alone). A
        bundle without the term refuses ``mu`` > 0 with a BundleError."""
        if not self.has_proximal:
            if mu > 0:
                raise BundleError(
                    f"{self.bundle.root}: exported without FedProx's proximal term; re-export the "
                    "model with this fedlora to train with fedprox_mu > 0"
                )
            return
        params = self.state.parameters
        if mu > 0:
            center = self.get_adapter() if center is None else center
            shapes = self.manifest.shapes
            for name, value in center.items():
                if tuple(value.shape) != shapes.get(name):
                    raise BundleError(f"FedProx centre {name} {value.shape} is not a trainable tensor of this bundle")
                params[PROXIMAL_CENTER_PREFIX + name].data = np.ascontiguousarray(value, dtype=np.float32)
        params[PROXIMAL_MU].data = np.array(mu, dtype=np.float32)

    def save(self, path: str | Path) -> None:
        training_api().CheckpointState.save_checkpoint(self.state, str(path))

    # -- compute -------------------------------------------------------------------------
    def set_learning_rate(self, lr: float) -> None:
        self.optimizer.set_learning_rate(float(lr))

    def _inputs(self, batch: Batch):
        if self.manifest.task == "causal-lm":
            return batch.input_ids, batch.attention_mask, batch.labels.reshape(-1)
        return batch.input_ids, batch.attention_mask, batch.labels

    def train_step(self, batch: Batch) -> float:
        self.module.train()
        outputs = self.module(*self._inputs(batch))
        self.optimizer.step()
        self.module.lazy_reset_grad()
        loss = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
        return float(loss)

    def eval_batch(self, batch: Batch) -> tuple[float, np.ndarray]:
        """Mean loss and logits of one batch (no parameter change). Classification: logits
        [batch, classes]. Causal LM: the logits of the labeled positions only (labels not
        ``IGNORE_INDEX``), [labeled, vocabulary] in row-major order: label the positions whose
        next-token logits you want (any token id) and leave the rest ``IGNORE_INDEX``."""
        self.module.eval()
        loss, logits = self.module(*self._inputs(batch))
        if self.manifest.task == "causal-lm":
            keep = batch.labels.reshape(-1) != IGNORE_INDEX
            if len(logits) == keep.size and len(logits) != int(keep.sum()):
                logits = logits[keep]  # a bundle exported before the graph selected the labeled rows
        return float(loss), logits

    def evaluate(self, data: EncodedDataset, batch_size: int = 32) -> dict[str, float]:
        """Loss and accuracy over a data set. Classification: per example. Causal LM: per
        labeled token (the response tokens of instruction data), next-token accuracy, and
        perplexity (exp of the loss)."""
        causal = self.manifest.task == "causal-lm"
        total_loss = 0.0
        correct = 0
        counted = 0
        for batch in data.batches(batch_size):
            if causal:
                labels = batch.labels.reshape(-1)
                keep = labels != IGNORE_INDEX
                n = int(keep.sum())
                if n == 0:  # nothing to predict in this batch: no forward pass
                    continue
                loss, logits = self.eval_batch(batch)
                correct += int((logits.argmax(axis=-1) == labels[keep]).sum())
            else:
                loss, logits = self.eval_batch(batch)
                n = len(batch.labels)
                correct += int((logits.argmax(axis=-1) == batch.labels).sum())
            total_loss += loss * n
            counted += n
        nan = float("nan")
        result = (
            {"loss": total_loss / counted, "accuracy": correct / counted, "examples": len(data)}
            if counted
            else {"loss": nan, "accuracy": nan, "examples": 0}
        )
        if causal:  # exp(700) is near the largest float
            result["perplexity"] = math.exp(min(result["loss"], 700.0)) if counted else nan
        return result


def read_parameters(bundle: Bundle, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Read parameters from the bundle's checkpoint without building a session (the
    aggregator's initial global adapter); default: the trainable ones."""
    api = training_api()
    state = api.CheckpointState.load_checkpoint(str(bundle.path("checkpoint")))
    wanted = names if names is not None else [p.name for p in bundle.manifest.trainable]
    params = state.parameters
    missing = [n for n in wanted if n not in params]
    if missing:
        raise BundleError(f"{bundle.root}: checkpoint lacks parameters {missing[:3]}")
    return {n: np.array(params[n].data, dtype=np.float32, copy=True) for n in wanted}
