"""FedSA-LoRA: selective aggregation (A shared, B personal).

Pengxin Guo, Shuang Zeng, Yanran Wang, Huijie Fan, Feifei Wang and Liangqiong Qu, "Selective
Aggregation for Low-Rank Adaptation in Federated Learning", ICLR 2025 (arXiv:2410.01463).
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


class FedSALoRA(Strategy):
    """A matrices learn what is general and are aggregated; B matrices learn what is
    client-specific and stay on each device (personalization).

    New global: ``A = sum_i p_i A_i`` (``p_i = n_i / sum_j n_j``), head = weighted mean; the
    global B is left as it was. The server optimizer's moments are over A and the head. A device loads the global A and head and keeps its own B.
    B tensors in an update are optional and, when present, checked (shape, finite) but not
    aggregated: the server never sends B, so averaging it would make a model no device uses.
    Evaluating the global adapter alone therefore says little: each device's model is the
    global A with its own B.

    Rejected: an update of another rank (``rank_mismatch``): a personal B of rank r only
    fits a shared A of rank r.

    Parameters:
        layout: the adapter (``AdapterLayout``, or a name -> shape mapping).
        rank: required; the one rank every device trains (the bundle manifest's rank).
    """

    name = "fedsa-lora"
    uploads_b = False

    def accumulate_modules(self, sums: dict[str, np.ndarray], update: ClientUpdate, n: float) -> None:
        weighted_sum_into(sums, {m.a: update.tensors[m.a] for m in self.layout.modules}, n)

    def finalize_modules(self, partial: Partial, model: GlobalModel, out: GlobalModel) -> None:
        for m in self.layout.modules:
            out.tensors[m.a] = self.server_step(m.a, model.tensors[m.a], partial.sums[m.a] / partial.weight)
