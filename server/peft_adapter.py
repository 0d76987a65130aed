"""The trained global adapter out, as the PEFT adapter folder people serve.

``adapter_config.json`` + ``adapter_model.safetensors``: what ``PeftModel.from_pretrained``
loads onto the original model (``docs/operations.md``). The bundle's graph names already
are PEFT's saved names (``export.exporter.peft_key``): ``<module>.lora_A.weight`` and
``lora_B.weight``, and a head tensor ``<module>.weight`` / ``.bias`` for the modules in
``modules_to_save`` (the classifier of a classification model).

Strategies that fold products into the frozen weights (FLoRA, FedEx-LoRA) hold a dense change
``base_delta`` per adapted layer besides A and B. PEFT has no slot for a dense change, so it
goes into the LoRA factors exactly: ``D = U S V^T`` (its numerical rank k), A gets the rows
``V^T[:k]`` and B the columns ``U[:, :k] S[:k] / scale``, so that module's rank becomes
``r + k`` (PEFT's ``rank_pattern``) and its alpha ``scale * (r + k)`` (``alpha_pattern``),
keeping ``scale * B @ A = scale * B_0 @ A_0 + D``.

No torch: the aggregator's image writes this with numpy and ``safetensors``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from core.bundle import Manifest
from core.errors import BundleError
from server.strategies.base import AdapterLayout

ADAPTER_CONFIG = "adapter_config.json"
LABELS_METADATA = "fedlora_labels"  # in the safetensors metadata: the manifest's labels, as JSON
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_TASK_TYPES = {"seq-cls": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}
PREFIX = "base_model.model."
# Singular values of a folded change below this fraction of its largest are float32 noise.
FOLD_RTOL = 1e-6


def module_path(name: str) -> str:
    """The module's name inside the original model: PEFT's wrapper prefix removed."""
    return name[len(PREFIX) :] if name.startswith(PREFIX) else name


def head_modules(head: dict[str, tuple[int, ...]]) -> list[str]:
    """``modules_to_save``: the modules whose head tensors the adapter carries whole."""
    return sorted({module_path(name).rsplit(".", 1)[0] for name in head})


def fold_change(delta: np.ndarray, scale: float, rtol: float = FOLD_RTOL) -> tuple[np.ndarray, np.ndarray]:
    """Factors ``(A_extra, B_extra)`` with ``scale * B_extra @ A_extra == delta`` (to float32
    precision), of the change's numerical rank."""
    u, s, vt = np.linalg.svd(delta.astype(np.float64), full_matrices=False)
    k = int((s > rtol * s[0]).sum()) if s.size and s[0] > 0 else 0
    return vt[:k].astype(np.float32), (u[:, :k] * (s[:k] / scale)).astype(np.float32)


def peft_adapter(
    manifest: Manifest, tensors: dict[str, np.ndarray], base_delta: dict[str, np.ndarray] | None = None
) -> tuple[dict, dict[str, np.ndarray]]:
    """The adapter's config and tensors for the global ``tensors`` (A, B at the manifest's
    rank and the head) and the strategy's ``base_delta`` (by frozen weight name)."""
    layout = AdapterLayout.from_manifest(manifest)
    missing = sorted(set(layout.shapes(manifest.rank)) - set(tensors))
    if missing:
        raise BundleError(f"the global adapter lacks {len(missing)} tensors of the bundle, e.g. {missing[0]}")
    out: dict[str, np.ndarray] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    deltas = dict(base_delta or {})
    for m in layout.modules:
        a, b = np.asarray(tensors[m.a], np.float32), np.asarray(tensors[m.b], np.float32)
        delta = deltas.pop(m.base, None)
        if delta is not None and np.any(delta):
            a_extra, b_extra = fold_change(np.asarray(delta), layout.scale)
            a, b = np.concatenate([a, a_extra]), np.concatenate([b, b_extra], axis=1)
            rank_pattern[module_path(m.name)] = int(a.shape[0])
            alpha_pattern[module_path(m.name)] = layout.scale * a.shape[0]
        out[m.a], out[m.b] = np.ascontiguousarray(a), np.ascontiguousarray(b)
    if deltas:
        raise BundleError(
            f"changes to {len(deltas)} frozen weights that no adapted layer owns, e.g. {next(iter(deltas))}"
        )
    for name in layout.head:
        out[name] = np.ascontiguousarray(tensors[name], dtype=np.float32)
    config = {
        "peft_type": "LORA",
        "task_type": PEFT_TASK_TYPES[manifest.task],
        "base_model_name_or_path": manifest.model_id,
        "r": manifest.rank,
        "lora_alpha": manifest.alpha,
        "target_modules": sorted(manifest.targets),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": head_modules(layout.head) or None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
    }
    return config, out


def write_peft_adapter(
    folder: str | Path,
    manifest: Manifest,
    tensors: dict[str, np.ndarray],
    base_delta: dict[str, np.ndarray] | None = None,
    about: dict | None = None,
) -> Path:
    """Write the PEFT adapter folder (atomically: a half-written folder never has the final
    name); ``about`` (job, round, strategy, ...) goes into the safetensors metadata."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    config, weights = peft_adapter(manifest, tensors, base_delta)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        metadata = {"format": "pt", **{f"fedlora_{k}": str(v) for k, v in (about or {}).items()}}
        if manifest.labels:  # the class names (or label words) a merged model's config gets
            metadata[LABELS_METADATA] = json.dumps(list(manifest.labels))
        save_file(weights, str(tmp / ADAPTER_WEIGHTS), metadata=metadata)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
