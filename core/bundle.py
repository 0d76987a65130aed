"""The artifact bundle a device trains: ONNX Runtime training artifacts plus ``manifest.json``.

The manifest is the contract between the exporter, the device and the aggregator: which
parameters are trainable (and their shapes), the LoRA rank and alpha, the task, the labels,
the tokenizer, and the sha256 of every file so a device refuses a corrupted bundle.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import BundleError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
TASKS = ("seq-cls", "causal-lm")
# The devices' AdamW rate when a job does not set one, per task (docs/benchmarks.md, "Server
# optimizers and FedProx under label skew"): a classifier's LoRA factors and new head take 5e-3
# (2e-3 left label-skewed jobs at the majority class after the first round), an LLM's 1e-3.
DEFAULT_LR = {"seq-cls": 5e-3, "causal-lm": 1e-3}
REQUIRED_FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ParamSpec:
    """One trainable tensor: its graph name, shape and role (lora_A, lora_B or head)."""

    name: str
    shape: tuple[int, ...]
    role: str

    @property
    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Manifest:
    model_id: str
    task: str
    rank: int
    alpha: float
    targets: tuple[str, ...]
    max_length: int
    pad_token_id: int
    trainable: tuple[ParamSpec, ...]
    input_names: tuple[str, ...]
    files: dict[str, str]
    labels: tuple[str, ...] = ()
    tokenizer: str = "tokenizer/tokenizer.json"
    extra: dict = field(default_factory=dict)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {p.name: p.shape for p in self.trainable}

    @property
    def adapter_size(self) -> int:
        return sum(p.size for p in self.trainable)

    def to_json(self) -> dict:
        return {
            "format_version": MANIFEST_FORMAT,
            "model_id": self.model_id,
            "task": self.task,
            "labels": list(self.labels),
            "lora": {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)},
            "max_length": self.max_length,
            "pad_token_id": self.pad_token_id,
            "input_names": list(self.input_names),
            "tokenizer": self.tokenizer,
            "trainable": [{"name": p.name, "shape": list(p.shape), "role": p.role} for p in self.trainable],
            "files": dict(sorted(self.files.items())),
            **self.extra,
        }

    @classmethod
    def from_json(cls, data: dict, where: str = "manifest") -> Manifest:
        try:
            if data.get("format_version") != MANIFEST_FORMAT:
                raise BundleError(
                    f"{where}: format_version {data.get('format_version')!r} is not supported (expected {MANIFEST_FORMAT})"
                )
            if data["task"] not in TASKS:
                raise BundleError(f"{where}: unknown task {data['task']!r} (known: {', '.join(TASKS)})")
            known = {
                "format_version",
                "model_id",
                "task",
                "labels",
                "lora",
                "max_length",
                "pad_token_id",
                "input_names",
                "tokenizer",
                "trainable",
                "files",
            }
            return cls(
                model_id=str(data["model_id"]),
                task=data["task"],
                rank=int(data["lora"]["rank"]),
                alpha=float(data["lora"]["alpha"]),
                targets=tuple(data["lora"]["targets"]),
                max_length=int(data["max_length"]),
                pad_token_id=int(data["pad_token_id"]),
                trainable=tuple(
                    ParamSpec(p["name"], tuple(int(d) for d in p["shape"]), p["role"]) for p in data["trainable"]
                ),
                input_names=tuple(data["input_names"]),
                files=dict(data["files"]),
                labels=tuple(data.get("labels") or ()),
                tokenizer=data.get("tokenizer", "tokenizer/tokenizer.json"),
                extra={k: v for k, v in data.items() if k not in known},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{where}: malformed manifest ({type(exc).__name__}: {exc})") from exc


class Bundle:
    """A bundle directory on disk, checked against its manifest."""

    def __init__(self, root: str | Path, verify: bool = True):
        self.root = Path(root)
        manifest_path = self.root / MANIFEST_NAME
        if not manifest_path.is_file():
            raise BundleError(f"{self.root}: no {MANIFEST_NAME}; is this an artifact bundle from fedlora-export?")
        try:
            data = json.loads(manifest_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise BundleError(f"{manifest_path}: not valid JSON ({exc.msg})") from exc
        self.manifest = Manifest.from_json(data, where=str(manifest_path))
        for name in REQUIRED_FILES + (self.manifest.tokenizer,):
            if name not in self.manifest.files:
                raise BundleError(f"{manifest_path}: lists no hash for required file {name}")
        if verify:
            self.verify()

    def path(self, name: str) -> Path:
        return self.root / name

    def verify(self) -> None:
        """Check every file's sha256; raise BundleError naming the first bad or missing file."""
        for name, expected in sorted(self.manifest.files.items()):
            path = self.root / name
            if not path.is_file():
                raise BundleError(f"{self.root}: file {name} listed in the manifest is missing")
            actual = sha256_file(path)
            if actual != expected:
                raise BundleError(
                    f"{self.root}: {name} is corrupted (sha256 {actual[:12]}..., manifest says {expected[:12]}...)"
                )


def choose_bundle(path: str | Path, memory_budget_bytes: int = 0, rank: int = 0) -> Path:
    """The bundle folder a device should train.

    ``path`` is a bundle (has manifest.json) or an exporter output with a rank ladder
    (``ladder.json`` and ``r<rank>/`` folders). From a ladder: the given ``rank``; else the
    largest rank whose measured peak memory fits ``memory_budget_bytes``; else the largest.
    """
    root = Path(path)
    if (root / MANIFEST_NAME).is_file():
        return root
    ladder_path = root / "ladder.json"
    if not ladder_path.is_file():
        raise BundleError(f"{root}: neither a bundle (manifest.json) nor a rank ladder (ladder.json)")
    try:
        ranks = {int(r): info for r, info in json.loads(ladder_path.read_text(encoding="utf-8"))["ranks"].items()}
    except (KeyError, ValueError, AttributeError) as exc:
        raise BundleError(f"{ladder_path}: malformed ladder ({exc})") from exc
    if rank:
        if rank not in ranks:
            raise BundleError(f"{root}: rank {rank} is not in the ladder {sorted(ranks)}")
        chosen = rank
    elif memory_budget_bytes:
        fitting = [r for r, info in ranks.items() if info.get("peak_rss_bytes", 0) <= memory_budget_bytes]
        if not fitting:
            need = min(info.get("peak_rss_bytes", 0) for info in ranks.values())
            raise BundleError(
                f"{root}: no rank fits the memory budget of {memory_budget_bytes / 2**20:.0f} MiB "
                f"(the smallest needs {need / 2**20:.0f} MiB)"
            )
        chosen = max(fitting)
    else:
        chosen = max(ranks)
    return root / ranks[chosen].get("path", f"r{chosen}")
