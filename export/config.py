"""Export settings, validated at construction so a wrong option fails before any work starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from core.errors import ConfigError

# LoRA targets per architecture when the user names none: attention query and value, the
# choice of the LoRA paper and the usual default of peft for these models.
DEFAULT_TARGETS = {
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "distilbert": ("q_lin", "v_lin"),
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "gpt2": ("c_attn",),
}


@dataclass
class ExportConfig:
    """What to export and how.

    model_dir: local Hugging Face model folder (config.json + weights, or a .gguf file).
    output_dir: where the bundles go; one sub-folder ``r<rank>`` per rank of the ladder.
    task: ``seq-cls``, ``causal-lm`` or ``auto`` (from the model's architecture).
    labels: class names for ``seq-cls`` (their order defines the label ids).
    targets: module names that get LoRA adapters; default per architecture.
    ranks: the rank ladder, one bundle each.
    alpha: LoRA alpha; default 2 x rank, which keeps the scale alpha/r = 2 on every rank
        so adapters of different ranks are comparable and zero-padding between them is exact.
    max_length: sequence length the device tokenizes to.
    opset: ONNX opset (16: opset 17's LayerNormalization breaks ORT's gradient builder).
    cpu_gradient_ops: replace ORT's single-threaded CPU gradient kernels (LayerNorm, GELU,
        softmax) in the training graph by the same math in standard ops that use every
        core (docs/benchmarks.md); False keeps generate_artifacts' graph as it is.
    verify: run one training step in PyTorch and ORT and compare the losses.
    verify_tolerance: relative loss difference allowed by the self-check.
    measure: record each rank's peak memory and step time for one training step at
        ``measure_batch`` x ``max_length`` (a fresh process, one thread), for devices to
        choose a rank against their memory budget.
    """

    model_dir: Path
    output_dir: Path
    task: str = "auto"
    labels: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    ranks: tuple[int, ...] = (8,)
    alpha: float | None = None
    max_length: int = 128
    opset: int = 16
    seed: int = 0
    cpu_gradient_ops: bool = True
    verify: bool = True
    verify_tolerance: float = 1e-4
    verify_lr: float = 1e-3
    measure: bool = True
    measure_batch: int = 8
    gguf_file: str | None = None
    model_id: str | None = None
    extra_trainable: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        self.model_dir = Path(self.model_dir).resolve()
        self.output_dir = Path(self.output_dir).resolve()
        if not self.model_dir.is_dir():
            raise ConfigError(f"model_dir {self.model_dir} is not a folder (a local Hugging Face model folder is needed)")
        if self.task not in ("auto", "seq-cls", "causal-lm"):
            raise ConfigError(f"task must be auto, seq-cls or causal-lm, not {self.task!r}")
        self.ranks = tuple(int(r) for r in self.ranks)
        if not self.ranks or any(r < 1 for r in self.ranks) or len(set(self.ranks)) != len(self.ranks):
            raise ConfigError(f"ranks must be distinct positive integers, got {list(self.ranks)}")
        if self.alpha is not None and self.alpha <= 0:
            raise ConfigError(f"alpha must be positive, got {self.alpha}")
        if not 8 <= self.max_length <= 8192:
            raise ConfigError(f"max_length must be in [8, 8192], got {self.max_length}")
        if not 14 <= self.opset <= 16:
            raise ConfigError(f"opset must be 14..16 (ORT's gradient builder needs opset <= 16), got {self.opset}")
        if self.task == "seq-cls" and len(self.labels) == 1:
            raise ConfigError("a classifier needs at least 2 labels")
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError(f"labels must be distinct, got {list(self.labels)}")
        if self.verify_tolerance <= 0:
            raise ConfigError("verify_tolerance must be positive")

    def alpha_for(self, rank: int) -> float:
        return float(self.alpha) if self.alpha is not None else 2.0 * rank
