"""FedAvg over LoRA factors (FedAvg-LoRA): the same-rank baseline.

McMahan, Moore, Ramage, Hampson and Agüera y Arcas, "Communication-Efficient Learning of Deep
Networks from Decentralized Data", AISTATS 2017; applied to LoRA as in Zhang et al., "Towards
Building the Federated GPT: Federated Instruction Tuning" (FedIT), ICASSP 2024.
"""

from __future__ import annotations

import numpy as np

from server.strategies.base import (
    ClientUpdate,
    GlobalModel,
    Partial,
    Strategy,
    weighted_sum_into,
)

__all__ = ["FedAvg", "weighted_sum_into"]


class FedAvg(Strategy):
    """A, B and the head averaged separately, weighted by the devices' example counts.

    With ``p_i = n_i / sum_j n_j``:  ``A = sum_i p_i A_i``,  ``B = sum_i p_i B_i``; the server
    optimizer then steps each towards its mean (``server_lr`` 1 under sgd: the mean itself;
    ``x + server_lr * (mean - x)`` otherwise). Its moments are over A, B and the head. Note
    that ``mean(B) @ mean(A) != mean(B @ A)``: the product the devices trained is not what the
    server gets (FedEx-LoRA and FLoRA fix that). All devices must train one rank; an update of
    another rank is rejected with ``rank_mismatch``.

    Parameters:
        layout: the adapter (``AdapterLayout``, or a name -> shape mapping).
        rank: required; the one rank every device trains (the bundle manifest's rank).
        **settings: ``CommonSettings`` (the server optimizer, FedProx).
    """

    name = "fedavg"

    @property
    def server_lr(self) -> float:
        return self.optimizer.lr

    def accumulate_modules(self, sums: dict[str, np.ndarray], update: ClientUpdate, n: float) -> None:
        weighted_sum_into(sums, {t: update.tensors[t] for m in self.layout.modules for t in (m.a, m.b)}, n)

    def finalize_modules(self, partial: Partial, model: GlobalModel, out: GlobalModel) -> None:
        for m in self.layout.modules:
            for t in (m.a, m.b):
                out.tensors[t] = self.server_step(t, model.tensors[t], partial.sums[t] / partial.weight)
