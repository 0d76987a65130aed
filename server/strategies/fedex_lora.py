"""FedEx-LoRA: exact aggregation by folding the averaging error into the frozen weights.

Raghav Singhal, Kaustubh Ponkshe and Praneeth Vepakomma, "FedEx-LoRA: Exact Aggregation for
Federated and Efficient Fine-Tuning of Large Language Models" (arXiv:2410.09432, "...of
Foundation Models"), ACL 2025.
"""

from __future__ import annotations

import numpy as np

from server.strategies.base import (
    ClientUpdate,
    GlobalModel,
    Partial,
    Strategy,
    module_product,
    weighted_sum_into,
)


class FedExLoRA(Strategy):
    """FedAvg of A and B, plus the residual that FedAvg loses, added to the frozen weights.

    Per module, with ``p_i = n_i / sum_j n_j``:

        A = sum_i p_i A_i,   B = sum_i p_i B_i
        base_delta += scale * (sum_i p_i B_i @ A_i - B @ A)

    so ``W + base_delta + scale * B @ A`` after aggregation equals
    ``sum_i p_i (W + base_delta_old + scale * B_i @ A_i)``, the weighted mean of the devices'
    effective weights, exactly (up to float rounding; the residual is computed against the
    float32 A and B that are stored, so rounding does not accumulate across rounds). Devices
    continue from the averaged A and B and must load ``base_delta`` into their frozen weights.

    The partial holds the sums of A, B and of the products (a dense out x in float64 per
    module: memory independent of the number of devices). All devices must train one rank,
    as in the paper; another rank is rejected with ``rank_mismatch``. Head tensors: the
    example-weighted mean.

    The server optimizer steps A, B, the head and each module's frozen-weight change (its
    pseudo-gradient is this round's residual ``scale * (mean(B_i A_i) - B A)``); its moments
    are over all four. Under anything but plain sgd the exactness above holds for the targets,
    not for the stepped global.

    Parameters:
        layout: the adapter (``AdapterLayout``, or a name -> shape mapping).
        rank: required; the one rank every device trains (the bundle manifest's rank).
    """

    name = "fedex-lora"
    async_unsupported = (
        "its residual mean(B A) - mean(B) mean(A) is folded into the frozen weights from the products of "
        "one set of devices that started from the same version; updates of different versions have none"
    )

    def accumulate_modules(self, sums: dict[str, np.ndarray], update: ClientUpdate, n: float) -> None:
        terms = {}
        for m in self.layout.modules:
            terms[m.a] = update.tensors[m.a]
            terms[m.b] = update.tensors[m.b]
            terms[m.key("BA")] = module_product(update, m)
        weighted_sum_into(sums, terms, n)

    def finalize_modules(self, partial: Partial, model: GlobalModel, out: GlobalModel) -> None:
        scale = self.layout.scale
        for m in self.layout.modules:
            a = (partial.sums[m.a] / partial.weight).astype(np.float32)
            b = (partial.sums[m.b] / partial.weight).astype(np.float32)
            residual = partial.sums[m.key("BA")] / partial.weight - b.astype(np.float64) @ a.astype(np.float64)
            old = model.base_delta.get(m.base)
            old = np.zeros((m.out_features, m.in_features)) if old is None else old.astype(np.float64)
            out.base_delta[m.base] = self.server_step(m.base, old, old + scale * residual)
            out.tensors[m.a] = self.server_step(m.a, model.tensors[m.a], a)
            out.tensors[m.b] = self.server_step(m.b, model.tensors[m.b], b)
