"""Export settings, validated at construction so a wrong option fails before any work starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from core.errors import ConfigError


@dataclass
class ExportConfig:
    """What to export and how.

    model_dir: local Hugging Face model folder (config.json + weights, or a .gguf file), or a
        .gguf file itself (taken as its folder and ``gguf_file``).
    output_dir: where the bundles go; one sub-folder ``r<rank>`` per rank of the ladder.
    task: ``seq-cls``, ``causal-lm`` or ``auto`` (from the model's architecture; a GGUF file is
        a causal LM).
    labels: class names for ``seq-cls`` (their order defines the label ids); for ``causal-lm``
        the label words of a classification-as-instruction task. Non-empty, one line each.
    targets: LoRA targets: ``default``, ``attention``, ``mlp``, ``all`` (from the architecture's
        table in export/architectures.py) or module names, mixed freely; empty: ``default``.
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
    gguf_file: str | None = None  # the .gguf file in model_dir to load (needed when it holds several)
    model_id: str | None = None  # recorded in manifests; default: the GGUF file's stem, else the folder's name
    extra_trainable: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        self.model_dir = Path(self.model_dir).resolve()
        self.output_dir = Path(self.output_dir).resolve()
        if self.model_dir.is_file() and self.model_dir.suffix.lower() == ".gguf":
            if self.gguf_file and self.gguf_file != self.model_dir.name:
                raise ConfigError(
                    f"model_dir is the GGUF file {self.model_dir.name} but gguf_file names {self.gguf_file}"
                )
            self.model_dir, self.gguf_file = self.model_dir.parent, self.model_dir.name
        elif not self.model_dir.is_dir():
            raise ConfigError(
                f"model_dir {self.model_dir} is not a folder and not a .gguf file (a local Hugging Face "
                f"model folder or a GGUF file is needed)"
            )
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
        self.labels = tuple(self.labels)
        self.targets = tuple(str(t).strip() for t in self.targets)
        check_labels(self.labels)
        if "" in self.targets:
            raise ConfigError(f"targets must be non-empty names, got {list(self.targets)}")
        if self.verify_tolerance <= 0:
            raise ConfigError("verify_tolerance must be positive")

    @property
    def model_path(self) -> Path:
        """What is loaded: the GGUF file, or the model folder."""
        return self.model_dir / self.gguf_file if self.gguf_file else self.model_dir

    def alpha_for(self, rank: int) -> float:
        return float(self.alpha) if self.alpha is not None else 2.0 * rank


def check_labels(labels: tuple[str, ...]) -> None:
    """Labels name classes (seq-cls) or are the words a causal LM answers with: each a non-empty
    string of one line, all distinct, at least two."""
    for label in labels:
        if not isinstance(label, str) or not label.strip():
            raise ConfigError(f"labels must be non-empty text, got {label!r} in {list(labels)}")
        if "\n" in label or "\r" in label:
            raise ConfigError(f"each label must be a single line, got {label!r}")
    if len(labels) == 1:
        raise ConfigError(f"a classification needs at least 2 labels, got {list(labels)}")
    if len(set(labels)) != len(labels):
        raise ConfigError(f"labels must be distinct, got {list(labels)}")
