"""FFA-LoRA: Federated Freeze-A LoRA.

Youbang Sun, Zitao Li, Yaliang Li and Bolin Ding, "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024.
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


class FFALoRA(Strategy):
    """A stays frozen at its (shared, seeded) initial value and is never sent; only B and the
    head are trained, uploaded and averaged.

    Because every device holds the same A, averaging B is exact:
    ``sum_i p_i B_i @ A = (sum_i p_i B_i) @ A``, so the global effective weight is the
    example-weighted mean of the devices' effective weights (``p_i = n_i / sum_j n_j``).
    New global: ``B = sum_i p_i B_i``, ``A`` unchanged, head = weighted mean (each through the
    server optimizer, whose moments are over B and the head).

    Rejected: an update carrying any A (``frozen_tensor_sent``: a device that trained A
    would break the exactness above), an update of another rank (``rank_mismatch``).

    Parameters:
        layout: the adapter (``AdapterLayout``, or a name -> shape mapping).
        rank: required; the one rank every device trains (the bundle manifest's rank).

    The paper also recommends a larger LoRA alpha (scale) because A is not trained; that is
    the exporter's choice (the manifest's alpha), not the aggregator's.
    """

    name = "ffa-lora"
    trains_a = False

    def accumulate_modules(self, sums: dict[str, np.ndarray], update: ClientUpdate, n: float) -> None:
        weighted_sum_into(sums, {m.b: update.tensors[m.b] for m in self.layout.modules}, n)

    def finalize_modules(self, partial: Partial, model: GlobalModel, out: GlobalModel) -> None:
        for m in self.layout.modules:
            out.tensors[m.b] = self.server_step(m.b, model.tensors[m.b], partial.sums[m.b] / partial.weight)
