"""FlexLoRA: full-size aggregation of heterogeneous-rank LoRA, redistributed by SVD.

Jiamu Bai, Daoyuan Chen, Bingchen Qian, Liuyi Yao and Yaliang Li, "Federated Fine-tuning of
Large Language Models under Heterogeneous Tasks and Client Resources", NeurIPS 2024
(arXiv:2402.11505).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.errors import ConfigError
from core.protocol import BASE_A_PREFIX, BASE_B_PREFIX
from server.strategies.base import (
    ClientUpdate,
    CommonSettings,
    GlobalModel,
    LoraModule,
    Partial,
    Strategy,
    module_product,
    weighted_sum_into,
)
from server.strategies.settings import Range, setting


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

    The server optimizer steps each module's dense product from the global's
    ``scale * B @ A`` towards ``dW`` before the SVD; its moments are over those products
    (out x in per module, like the partial) and the head.

    Parameters:
        layout: the adapter (``AdapterLayout``, or a name -> shape mapping).
        rank: required; the global adapter's rank, the largest a device may train (the top of
            the exported rank ladder).
    """

    name = "flexlora"
    same_rank = False
    async_unsupported = (
        "each version is a new SVD factorization of the products, so a change computed against an "
        "older version's factors cannot be added to the current ones"
    )

    def accumulate_modules(self, sums: dict[str, np.ndarray], update: ClientUpdate, n: float) -> None:
        weighted_sum_into(sums, {m.key("BA"): module_product(update, m) for m in self.layout.modules}, n)

    def finalize_modules(self, partial: Partial, model: GlobalModel, out: GlobalModel) -> None:
        if model.rank != self.rank:
            raise ConfigError(f"{self.name} was set up for rank {self.rank}, the global model holds rank {model.rank}")
        scale = self.layout.scale
        for m in self.layout.modules:
            product = scale * model.tensors[m.b].astype(np.float64) @ model.tensors[m.a].astype(np.float64)
            target = self.server_step(m.key("product"), product, self.module_delta(partial, model, m), np.float64)
            a, b = svd_factors(target, self.rank, scale)
            out.tensors[m.a] = a.astype(np.float32)
            out.tensors[m.b] = b.astype(np.float32)

    def module_delta(self, partial: Partial, model: GlobalModel, m: LoraModule) -> np.ndarray:
        """The new global product of module ``m`` before truncation: the weighted mean."""
        return self.layout.scale * partial.sums[m.key("BA")] / partial.weight


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
    it holds afterwards is ``(G - T_r(G)) + P_i``. Its change is ``D_i = P_i - T_{r_i}(G)``,
    and the server adds the mean change to the global:

        dW = G + tau_eff * sum_i p_i D_i / tau_i,    tau_i = (r_i / rank) ** rank_norm_power,
                                                     tau_eff = sum_i p_i tau_i

    and redistributes ``dW`` by SVD as FlexLoRA does. With ``rank_norm_power`` 0 (the default) every
    tau is 1 and this is the plain example-weighted mean of the changes.

    ``rank_norm_power`` > 0 normalizes each device's change by its rank's pace, as FedNova
    (Jianyu Wang, Qinghua Liu, Hao Liang, Gauri Joshi and H. Vincent Poor, "Tackling the
    Objective Inconsistency Problem in Heterogeneous Federated Optimization", NeurIPS 2020)
    normalizes by the number of local steps. Under Adam every trained entry moves by about the
    learning rate per step, so a rank-r device's product moves about ``sqrt(r)`` as far as a
    rank-1 device's in the same steps (hence 0.5). Unnormalized, the mean points where the high-rank
    devices' data points, which under label skew means towards their classes; normalized,
    each device's direction counts by its examples alone, and ``tau_eff`` keeps the step as
    long as the plain mean's. The device's learning rate is untouched (compare
    ``train.lr_rank_power``, which speeds up the low-rank devices' local training instead).

    A round in which no device changes anything leaves the global as it was; with one rank
    for all every tau is the same and it is FlexLoRA. The partial adds, per module, the weight
    of the devices of each rank and the sum of ``n_i tau_i``, so it stays a plain sum. The
    downlink carries the whole global adapter to every device (the tail as factors, not
    dense): a rank-16 adapter's bytes instead of the device's slice.

    Parameters:
        layout: the adapter (``AdapterLayout``, or a name -> shape mapping).
        rank: required; the global adapter's rank, the largest a device may train.
        rank_norm_power: see ``Settings``.
    """

    name = "flexlora-delta"

    @dataclass(frozen=True)
    class Settings(CommonSettings):
        rank_norm_power: float = setting(
            0.0,
            range=Range(0.0, 2.0),
            help="flexlora-delta's rank normalization: each device's change counts divided by "
            "(rank / top rank) ** this, its rank's pace (0: off; 0.5 matches Adam)",
        )

    settings: Settings

    @property
    def rank_norm_power(self) -> float:
        return self.settings.rank_norm_power

    def pace(self, rank: int) -> float:
        """tau of a device of ``rank``: ``(rank / self.rank) ** rank_norm_power``."""
        return (rank / self.rank) ** self.rank_norm_power

    def accumulate_modules(self, sums: dict[str, np.ndarray], update: ClientUpdate, n: float) -> None:
        tau = self.pace(update.rank)
        weighted_sum_into(sums, {m.key("BA"): module_product(update, m) for m in self.layout.modules}, n / tau)
        one = np.array(1.0)
        weighted_sum_into(sums, {m.key(f"weight_r{update.rank}"): one for m in self.layout.modules}, n / tau)
        weighted_sum_into(sums, {m.key("pace"): one for m in self.layout.modules}, n * tau)

    def module_delta(self, partial: Partial, model: GlobalModel, m: LoraModule) -> np.ndarray:
        scale = self.layout.scale
        a, b = model.tensors[m.a].astype(np.float64), model.tensors[m.b].astype(np.float64)
        change = scale * partial.sums[m.key("BA")]  # sum_i (n_i / tau_i) P_i, minus the starts:
        for r in range(1, self.rank + 1):
            w = partial.sums.get(m.key(f"weight_r{r}"))
            if w is not None and float(w) > 0:
                change -= float(w) * scale * (b[:, :r] @ a[:r])
        pace = float(partial.sums[m.key("pace")]) / partial.weight  # tau_eff
        return scale * (b @ a) + (pace / partial.weight) * change

    def frozen_for_device(self, model: GlobalModel, rank: int) -> dict[str, np.ndarray]:
        if rank >= model.rank:
            return {}
        out: dict[str, np.ndarray] = {}
        for m in self.layout.modules:
            out[BASE_A_PREFIX + m.base] = model.tensors[m.a][rank:].copy()
            out[BASE_B_PREFIX + m.base] = (self.layout.scale * model.tensors[m.b][:, rank:]).astype(np.float32)
        return out
