"""FedAvg over LoRA factors (FedAvg-LoRA): the same-rank baseline.

McMahan, Moore, Ramage, Hampson and Agüera y Arcas, "Communication-Efficient Learning of Deep
Networks from Decentralized Data", AISTATS 2017; applied to LoRA as in Zhang et al., "Towards
Building the Federated GPT: Federated Instruction Tuning" (FedIT), ICASSP 2024.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from server.strategies.base import (
    AdapterLayout,
    ClientUpdate,
    GlobalModel,
    Partial,
    Strategy,
    weighted_sum_into,
)

__all__ = ["FedAvg", "weighted_sum_into"]


class FedAvg(Strategy):
    """A, B and the head averaged separately, weighted by the devices' example counts.

    With ``p_i = n_i / sum_j n_j``:  ``A = sum_i p_i A_i``,  ``B = sum_i p_i B_i``, and then
    ``x_new = x_global + server_lr * (x_mean - x_global)`` for every tensor. Note that
    ``mean(B) @ mean(A) != mean(B @ A)``: the product the devices trained is not what the
    server gets (FedEx-LoRA and FLoRA fix that). All devices must train one rank; an update
    of another rank is rejected with ``rank_mismatch``.

    Parameters:
        layout: the adapter (``AdapterLayout``, or a name -> shape mapping).
        rank: required; the one rank every device trains (the bundle manifest's rank).
        server_lr: step size towards the average (default 1.0: plain FedAvg).
    """

    name = "fedavg"

    def __init__(self, layout: AdapterLayout | Mapping[str, tuple[int, ...]], rank: int, server_lr: float = 1.0):
        super().__init__(layout, rank)
        self.server_lr = float(server_lr)

    def accumulate_modules(self, sums: dict[str, np.ndarray], update: ClientUpdate, n: float) -> None:
        weighted_sum_into(sums, {t: update.tensors[t] for m in self.layout.modules for t in (m.a, m.b)}, n)

    def finalize_modules(self, partial: Partial, model: GlobalModel, out: GlobalModel) -> None:
        for m in self.layout.modules:
            out.tensors[m.a] = (partial.sums[m.a] / partial.weight).astype(np.float32)
            out.tensors[m.b] = (partial.sums[m.b] / partial.weight).astype(np.float32)

    def finalize(self, partial: Partial, model: GlobalModel) -> GlobalModel:
        out = super().finalize(partial, model)
        if self.server_lr != 1.0 and partial.weight > 0:
            for name, value in out.tensors.items():
                old = model.tensors[name].astype(np.float64)
                out.tensors[name] = (old + self.server_lr * (value - old)).astype(np.float32)
        return out
