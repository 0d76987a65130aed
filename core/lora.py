"""LoRA adapter shapes on the device: rank truncation, zero-padding and HetLoRA rank self-pruning.

Pure numpy over name -> array dicts, shared by the device and the aggregator's HetLoRA. A
module's ``A`` is (rank x in) and its ``B`` is (out x rank), named with peft's
``...lora_A.weight`` / ``...lora_B.weight``; component ``j`` of the module is the rank-one
product ``B[:, j] A[j]``. Other tensors (the classifier head) have no rank and pass through.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from core.errors import ConfigError

A_SUFFIX = "lora_A.weight"
B_SUFFIX = "lora_B.weight"
# FedProx's frozen parameters in a bundle's checkpoint (``export.proximal``): the weight mu
# (a float32 scalar) and one centre per trainable tensor, ``PROXIMAL_CENTER_PREFIX + name``.
PROXIMAL_MU = "fedprox.mu"
PROXIMAL_CENTER_PREFIX = "fedprox.center."


def lora_pairs(names) -> list[tuple[str, str]]:
    """The (A, B) name pairs among ``names``, in the order of the A names."""
    names = set(names)
    return [
        (n, n[: -len(A_SUFFIX)] + B_SUFFIX)
        for n in sorted(names)
        if n.endswith(A_SUFFIX) and n[: -len(A_SUFFIX)] + B_SUFFIX in names
    ]


def truncate_rank(tensors: Mapping[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
    """The top-``rank`` components: ``A[:rank]``, ``B[:, :rank]``; other tensors unchanged."""
    out = dict(tensors)
    for a, b in lora_pairs(tensors):
        out[a], out[b] = np.ascontiguousarray(tensors[a][:rank]), np.ascontiguousarray(tensors[b][:, :rank])
    return out


def rank_shapes(shapes: Mapping[str, tuple[int, ...]], rank: int) -> dict[str, tuple[int, ...]]:
    """The tensor shapes of the same adapter at rank ``rank`` (at most the rank of ``shapes``)."""
    out = dict(shapes)
    for a, b in lora_pairs(shapes):
        out[a] = (min(rank, shapes[a][0]), *shapes[a][1:])
        out[b] = (shapes[b][0], min(rank, shapes[b][1]))
    return out


def pad_a(a: np.ndarray, rank: int) -> np.ndarray:
    """A (r x in) with zero rows appended up to ``rank``: the extra components contribute nothing."""
    return np.pad(a, ((0, rank - a.shape[0]), (0, 0)))


def pad_b(b: np.ndarray, rank: int) -> np.ndarray:
    """B (out x r) with zero columns appended up to ``rank``."""
    return np.pad(b, ((0, 0), (0, rank - b.shape[1])))


def pad_rank(tensors: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Zero rows of A and zero columns of B up to ``shapes`` (a larger rank). ``B @ A`` is
    unchanged, and under training the padded components stay exactly zero: each one's A-row
    gradient is a multiple of its B column and vice versa."""
    out = dict(tensors)
    for name, value in tensors.items():
        have, want = tuple(value.shape), tuple(shapes.get(name, value.shape))
        if have == want:
            continue
        if name.endswith(A_SUFFIX) and len(have) == len(want) == 2 and have[1] == want[1] and have[0] <= want[0]:
            out[name] = pad_a(value, want[0])
        elif name.endswith(B_SUFFIX) and len(have) == len(want) == 2 and have[0] == want[0] and have[1] <= want[1]:
            out[name] = pad_b(value, want[1])
        else:
            raise ConfigError(f"cannot pad {name} of shape {have} to {want}")
    return out


def component_norms(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """||B[:, j]|| * ||A[j]|| for every rank component j: the Frobenius norm of its rank-one
    contribution ``B[:, j] A[j]`` to ``B @ A``."""
    return np.linalg.norm(b, axis=0) * np.linalg.norm(a, axis=1)


def _keep(norms: np.ndarray, threshold: float) -> int:
    if not 0 <= threshold <= 1:
        raise ConfigError(f"prune threshold must be in [0, 1], got {threshold}")
    top = float(norms.max()) if norms.size else 0.0
    if top == 0.0:
        return 1
    keep = np.nonzero(norms >= threshold * top)[0]
    return max(1, int(keep[-1]) + 1)


def pruned_rank(tensors: Mapping[str, np.ndarray], rank: int, threshold: float) -> int:
    """HetLoRA rank self-pruning for a whole adapter (Cho et al., EMNLP 2024, Sec. 3): the
    device's rank is one number (it picks its downlink by it), so component j's strength is
    its energy over all modules, ``sqrt(sum_m (||B_m[:, j]|| ||A_m[j]||)^2)``, and trailing
    components weaker than ``threshold`` x the strongest are given up. Only trailing ones go,
    so the kept adapter is the truncation HetLoRA's padding assumes; never below 1.

    The paper decays the rank when a regularised tail norm stops shrinking; this threshold rule
    is a deterministic stand-in with the same effect: ranks the device's data does not use are
    given up, and its updates and downloads get smaller."""
    pairs = lora_pairs(tensors)
    if not pairs:
        return rank
    energy = np.zeros(rank)
    for a, b in pairs:
        energy += component_norms(tensors[a][:rank].astype(np.float64), tensors[b][:, :rank].astype(np.float64)) ** 2
    return _keep(np.sqrt(energy), threshold)
