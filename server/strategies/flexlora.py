"""FlexLoRA: full-size aggregation of heterogeneous-rank LoRA, redistributed by SVD.

Jiamu Bai, Daoyuan Chen, Bingchen Qian, Liuyi Yao and Yaliang Li, "Federated Fine-tuning of
Large Language Models under Heterogeneous Tasks and Client Resources", NeurIPS 2024
(arXiv:2402.11505).
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
    module_product,
    weighted_sum_into,
)


def svd_factors(delta: np.ndarray, rank: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """A (rank x in) and B (out x rank) with ``scale * B @ A`` the best rank-``rank``
    approximation of ``delta`` (out x in) in Frobenius and spectral norm (Eckart-Young).

    ``delta = U S V^T``; ``B = U_r sqrt(S_r) / sqrt(scale)``, ``A = sqrt(S_r) V_r^T / sqrt(scale)``:
    the singular values split evenly so A and B have comparable norms. Components come in
    decreasing singular value, so ``A[:k]``, ``B[:, :k]`` is the best rank-k approximation
    for every k <= rank. Beyond the rank of ``delta`` the factors are zero.
    """
    u, s, vt = np.linalg.svd(np.asarray(delta, dtype=np.float64), full_matrices=False)
    k = min(rank, s.size)
    root = np.sqrt(s[:k] / scale)
    a = np.zeros((rank, delta.shape[1]))
    b = np.zeros((delta.shape[0], rank))
    a[:k] = root[:, None] * vt[:k]
    b[:, :k] = u[:, :k] * root[None, :]
    return a, b


class FlexLoRA(Strategy):
    """Devices train different ranks r_i <= rank. Per module the server forms the full-size
    weighted update and redistributes its SVD truncations:

        dW = sum_i p_i * scale * B_i @ A_i         (p_i = n_i / sum_j n_j, as in the paper)
        dW = U S V^T;  global B, A = ``svd_factors(dW, rank, scale)``

    A device of rank r receives ``A[:r]``, ``B[:, :r]`` (``for_device``), whose
    ``scale * B @ A`` is the best rank-r approximation of ``dW``. The global adapter keeps the
    top ``rank`` components, so server-side evaluation sees the best rank-``rank``
    approximation; what lies beyond (dW has rank up to sum_i r_i) is dropped, as in the paper.
    The new global replaces the old one (it is not added to it): devices start from the
    global, so their products already contain it.

    The partial holds one dense (out x in) float64 sum per module: memory independent of
    the number of devices, but the size of the adapted frozen weights, not of the adapter.
    Head tensors: the example-weighted mean.

    Parameters:
        layout: the adapter (``AdapterLayout``, or a name -> shape mapping).
        rank: required; the global adapter's rank, the largest a device may train (the top of
            the exported rank ladder).
    """

    name = "flexlora"
    same_rank = False

    def __init__(self, layout: AdapterLayout | Mapping[str, tuple[int, ...]], rank: int):
        super().__init__(layout, rank)

    def accumulate_modules(self, sums: dict[str, np.ndarray], update: ClientUpdate, n: float) -> None:
        weighted_sum_into(sums, {m.key("BA"): module_product(update, m) for m in self.layout.modules}, n)

    def finalize_modules(self, partial: Partial, model: GlobalModel, out: GlobalModel) -> None:
        if model.rank != self.rank:
            raise ConfigError(f"flexlora was set up for rank {self.rank}, the global model holds rank {model.rank}")
        scale = self.layout.scale
        for m in self.layout.modules:
            delta = scale * partial.sums[m.key("BA")] / partial.weight
            a, b = svd_factors(delta, self.rank, scale)
            out.tensors[m.a] = a.astype(np.float32)
            out.tensors[m.b] = b.astype(np.float32)
