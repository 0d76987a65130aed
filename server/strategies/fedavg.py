"""FedAvg over LoRA factors (FedAvg-LoRA).

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data"
(AISTATS 2017), applied to LoRA as in Zhang et al., "Towards Building the Federated GPT:
Federated Instruction Tuning" (FedIT, ICASSP 2024): A and B (and the head) are averaged
separately, weighted by the number of local examples.

Parameters:
    shapes: name -> shape of every trainable tensor (from the bundle's manifest).
    server_lr: step size applied to the averaged delta (default 1.0: plain FedAvg).

All devices must share one rank: averaging factors of different ranks is undefined, so
mixed-rank updates are rejected (rank-aware strategies handle that case).
"""

from __future__ import annotations

import numpy as np

from edge_client.errors import UpdateRejected
from server.strategies.base import ClientUpdate, Partial, Strategy, check_same_tensors


def weighted_sum_into(sums: dict[str, np.ndarray], tensors: dict[str, np.ndarray], weight: float) -> None:
    """sums[name] += weight * tensors[name], in place (float64 to keep long sums exact)."""
    for name, value in tensors.items():
        acc = sums.get(name)
        if acc is None:
            sums[name] = weight * value.astype(np.float64)
        else:
            acc += weight * value


class FedAvg(Strategy):
    name = "fedavg"

    def __init__(self, shapes: dict[str, tuple[int, ...]], rank: int, server_lr: float = 1.0):
        super().__init__(shapes)
        self.rank = rank
        self.server_lr = server_lr

    def check(self, update: ClientUpdate) -> None:
        if update.rank != self.rank:
            raise UpdateRejected("rank_mismatch", f"rank {update.rank} cannot be averaged with rank {self.rank} (fedavg needs one rank)")
        if update.num_examples <= 0:
            raise UpdateRejected("no_examples", f"num_examples is {update.num_examples}")
        check_same_tensors(update, self.shapes)

    def accumulate(self, partial: Partial, update: ClientUpdate) -> Partial:
        weighted_sum_into(partial.sums, update.tensors, float(update.num_examples))
        partial.weight += update.num_examples
        partial.count += 1
        partial.devices.append(update.device)
        return partial

    def merge(self, a: Partial, b: Partial) -> Partial:
        out = Partial(sums={k: v.copy() for k, v in a.sums.items()}, weight=a.weight, count=a.count,
                      devices=a.devices + b.devices)
        weighted_sum_into(out.sums, b.sums, 1.0)
        out.weight += b.weight
        out.count += b.count
        return out

    def finalize(self, partial: Partial, global_adapter: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if partial.weight <= 0:
            return {k: v.copy() for k, v in global_adapter.items()}
        scale = self.server_lr / partial.weight
        return {name: (value + scale * partial.sums[name]).astype(np.float32) for name, value in global_adapter.items()}
