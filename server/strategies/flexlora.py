"""FlexLoRA: full-size aggregation of heterogeneous-rank LoRA, redistributed by SVD.

Jiamu Bai, Daoyuan Chen, Bingchen Qian, Liuyi Yao and Yaliang Li, "Federated Fine-tuning of
Large Language Models under Heterogeneous Tasks and Client Resources", NeurIPS 2024
(arXiv:2402.11505).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from edge_client.errors import ConfigError
from edge_client.protocol import BASE_A_PREFIX, BASE_B_PREFIX
from server.strategies.base import (
    AdapterLayout,
    ClientUpdate,
    GlobalModel,
    LoraModule,
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

    With mixed ranks this shrinks the global's weaker components every round: a device of
    rank r starts from the top-r truncation and sends a product without the components
    beyond r, so component k keeps only the weight of the devices of rank >= k, before any
    learning. ``FlexLoRADelta`` keeps them.

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
            raise ConfigError(f"{self.name} was set up for rank {self.rank}, the global model holds rank {model.rank}")
        scale = self.layout.scale
        for m in self.layout.modules:
            delta = scale * partial.sums[m.key("BA")] / partial.weight
            self.add_tails(delta, partial, model, m)
            a, b = svd_factors(delta, self.rank, scale)
            out.tensors[m.a] = a.astype(np.float32)
            out.tensors[m.b] = b.astype(np.float32)

    def add_tails(self, delta: np.ndarray, partial: Partial, model: GlobalModel, m: LoraModule) -> None:
        """FlexLoRA as published adds nothing: what no device sent is dropped."""


class FlexLoRADelta(FlexLoRA):
    """FlexLoRA in which every device computes with the whole global adapter (fedlora's variant).

    In FlexLoRA a device of rank r starts from the truncation ``T_r(G)`` of the global product
    ``G = scale * B @ A`` and sends ``P_i = scale * B_i @ A_i``; the server replaces G by the
    mean of the P_i. Two things go wrong when ranks differ:

    * the device trains a model without ``G - T_r(G)``, the global's components beyond r,
      and spends its steps re-learning them within rank r;
    * the mean counts that tail as zero for every device of rank r: under ranks 2/4/8/16
      each round keeps 3/4 of components 3-4, 1/2 of 5-8 and 1/4 of 9-16 before any learning.

    Here the device of rank r also receives the tail as frozen factors (``base_a``/``base_b``
    = ``A[r:]``, ``scale * B[:, r:]``; ``frozen_for_device``), adds it to its frozen weights
    and trains the top-r slice on top, so its effective weight is exactly ``W + G`` and what
    it holds afterwards is ``(G - T_r(G)) + P_i``. The server averages that:

        dW = sum_i p_i ((G - T_{r_i}(G)) + P_i) = G + sum_i p_i (P_i - T_{r_i}(G))

    and redistributes ``dW`` by SVD as FlexLoRA does. A round in which no device changes
    anything leaves the global as it was; with one rank for all (r_i = rank) the tails are
    empty and it is FlexLoRA. The partial adds one scalar per module and device rank (the
    weight of the devices of that rank), so it stays a plain sum. The downlink carries the
    whole global adapter to every device (the tail as factors, not dense): a rank-16
    adapter's bytes instead of the device's slice.
    """

    name = "flexlora-delta"

    def accumulate_modules(self, sums: dict[str, np.ndarray], update: ClientUpdate, n: float) -> None:
        super().accumulate_modules(sums, update, n)
        if update.rank < self.rank:
            weighted_sum_into(sums, {m.key(f"weight_r{update.rank}"): np.array(1.0) for m in self.layout.modules}, n)

    def add_tails(self, delta: np.ndarray, partial: Partial, model: GlobalModel, m: LoraModule) -> None:
        a, b = model.tensors[m.a].astype(np.float64), model.tensors[m.b].astype(np.float64)
        for r in range(1, self.rank):
            w = partial.sums.get(m.key(f"weight_r{r}"))
            if w is not None and float(w) > 0:
                delta += (float(w) / partial.weight) * self.layout.scale * (b[:, r:] @ a[r:])

    def frozen_for_device(self, model: GlobalModel, rank: int) -> dict[str, np.ndarray]:
        if rank >= model.rank:
            return {}
        out: dict[str, np.ndarray] = {}
        for m in self.layout.modules:
            out[BASE_A_PREFIX + m.base] = model.tensors[m.a][rank:].copy()
            out[BASE_B_PREFIX + m.base] = (self.layout.scale * model.tensors[m.b][:, rank:]).astype(np.float32)
        return out
