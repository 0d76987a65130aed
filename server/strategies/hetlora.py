"""HetLoRA: heterogeneous ranks by zero-padding, sparsity-weighted aggregation, truncation.

Yae Jee Cho, Luyang Liu, Zheng Xu, Aldi Fahrezi and Gauri Joshi, "Heterogeneous LoRA for
Federated Fine-tuning of On-Device Foundation Models", EMNLP 2024 (arXiv:2401.06432).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from edge_client.errors import ConfigError
from server.strategies.base import (
    AdapterLayout,
    ClientUpdate,
    GlobalModel,
    Partial,
    Strategy,
    pad_a,
    pad_b,
    weighted_sum_into,
)

WEIGHTINGS = ("sparsity", "examples")


class HetLoRA(Strategy):
    """Devices train different ranks r_i <= rank; the global adapter lives at ``rank``.

    Per module, with ``pad`` appending zero rows to A_i (r_i x in -> rank x in) and zero
    columns to B_i (out x r_i -> out x rank), which leaves ``B_i @ A_i`` unchanged:

        A = sum_i w_i pad(A_i) / sum_i w_i,      B = sum_i w_i pad(B_i) / sum_i w_i

    Weights ``w_i``:
      * ``"sparsity"`` (the paper's sparsity-weighted aggregation): ``w_i = ||B_i A_i||_F``,
        taken per adapted module (the paper's Delta W_k), so devices whose update is larger
        count more; example counts are not used, as in the paper. A module whose updates all
        have a zero product keeps its global A and B.
      * ``"examples"``: ``w_i = n_i`` (zero-padding with FedAvg's weights, no reweighting).

    As in the paper the padded zeros count in the mean: components that only high-rank
    devices train are shrunk by the weight of the low-rank ones. A device of rank r receives
    the top-r truncation ``A[:r]``, ``B[:, :r]`` (``for_device``). Head tensors: the
    example-weighted mean.

    Rank self-pruning happens on the device between rounds: ``self_prune`` below decides
    the new rank; the device then reports the smaller rank and trains the truncation.

    Parameters:
        layout: the adapter (``AdapterLayout``, or a name -> shape mapping).
        rank: required; the global adapter's rank, the largest a device may train (the top of
            the exported rank ladder).
        weighting: ``"sparsity"`` (default) or ``"examples"``, as above.
    """

    name = "hetlora"
    same_rank = False

    def __init__(self, layout: AdapterLayout | Mapping[str, tuple[int, ...]], rank: int, weighting: str = "sparsity"):
        super().__init__(layout, rank)
        if weighting not in WEIGHTINGS:
            raise ConfigError(f"hetlora: weighting must be one of {WEIGHTINGS}, not {weighting!r}")
        self.weighting = weighting

    def accumulate_modules(self, sums: dict[str, np.ndarray], update: ClientUpdate, n: float) -> None:
        for m in self.layout.modules:
            a, b = update.tensors[m.a], update.tensors[m.b]
            w = product_norm(a, b) if self.weighting == "sparsity" else n
            weighted_sum_into(sums, {m.a: pad_a(a, self.rank), m.b: pad_b(b, self.rank), m.key("weight"): np.array(1.0)}, w)

    def finalize_modules(self, partial: Partial, model: GlobalModel, out: GlobalModel) -> None:
        if model.rank != self.rank:
            raise ConfigError(f"hetlora was set up for rank {self.rank}, the global model holds rank {model.rank}")
        for m in self.layout.modules:
            w = float(partial.sums[m.key("weight")])
            if w > 0:
                out.tensors[m.a] = (partial.sums[m.a] / w).astype(np.float32)
                out.tensors[m.b] = (partial.sums[m.b] / w).astype(np.float32)


def product_norm(a: np.ndarray, b: np.ndarray) -> float:
    """||B @ A||_F without forming the (out x in) product: trace((B^T B)(A A^T)), r x r."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.sqrt(max(0.0, float(np.sum((b.T @ b) * (a @ a.T))))))


def component_norms(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """||B[:, j]|| * ||A[j]|| for every rank component j: the Frobenius norm of its rank-one
    contribution ``B[:, j] A[j]`` to ``B @ A``."""
    return np.linalg.norm(b, axis=0) * np.linalg.norm(a, axis=1)


def self_prune(a: np.ndarray, b: np.ndarray, rank: int, threshold: float) -> int:
    """The rank a device keeps: ``rank`` less the trailing components of its A (r x in) and
    B (out x r) whose norm (``component_norms``) is below ``threshold`` x the largest.

    Only trailing components are dropped, so the kept adapter is the truncation
    ``A[:new]``, ``B[:, :new]`` that HetLoRA's padding and truncation assume. Never below 1.
    Pure numpy: the device may call it after local training.

    The paper prunes with a decay rule on a regularised tail norm (Cho et al., Sec. 3);
    this threshold rule is a simpler, deterministic stand-in with the same effect: ranks
    the device's data does not use are given up.
    """
    if not 0 <= threshold <= 1:
        raise ConfigError(f"self_prune: threshold must be in [0, 1], got {threshold}")
    norms = component_norms(a[:rank], b[:, :rank])
    top = float(norms.max()) if norms.size else 0.0
    if top == 0.0:
        return 1
    keep = np.nonzero(norms >= threshold * top)[0]
    return max(1, int(keep[-1]) + 1)
