"""FedAvg over LoRA factors (FedAvg-LoRA): the same-rank baseline.

McMahan, Moore, Ramage, Hampson and Agüera y Arcas, "Communication-Efficient Learning of Deep
Networks from Decentralized Data", AISTATS 2017; applied to LoRA as in Zhang et al., "Towards
Building the Federated GPT: Federated Instruction Tuning" (FedIT), ICASSP 2024.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from server.strategies.base import (
    ClientUpdate,
    GlobalModel,
    Partial,
    Strategy,
    weighted_sum_into,
)
from server.strategies.settings import Range, StrategySettings, setting

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
        server_lr: see ``Settings``.
    """

    name = "fedavg"

    @dataclass(frozen=True)
    class Settings(StrategySettings):
        server_lr: float = setting(
            1.0,
            range=Range(0.0, 10.0, lo_open=True),
            help="server learning rate: step towards the devices' average (1: plain FedAvg)",
        )

    settings: Settings

    @property
    def server_lr(self) -> float:
        return self.settings.server_lr

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
