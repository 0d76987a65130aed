"""HetLoRA: heterogeneous ranks by zero-padding, sparsity-weighted aggregation, truncation.

Yae Jee Cho, Luyang Liu, Zheng Xu, Aldi Fahrezi and Gauri Joshi, "Heterogeneous LoRA for
Federated Fine-tuning of On-Device Foundation Models", EMNLP 2024 (arXiv:2401.06432).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.errors import ConfigError
from core.lora import pad_a, pad_b
from server.strategies.base import (
    ClientUpdate,
    CommonSettings,
    GlobalModel,
    Partial,
    Strategy,
    weighted_sum_into,
)
from server.strategies.settings import Range, setting

WEIGHTINGS = ("sparsity", "examples")


class HetLoRA(Strategy):
    """Devices train different ranks r_i <= rank; the global adapter lives at ``rank``.

    Per module, with ``pad`` appending zero rows to A_i (r_i x in -> rank x in) and zero
    columns to B_i (out x r_i -> out x rank), which leaves ``B_i @ A_i`` unchanged:

        A = sum_i w_i pad(A_i) / sum_i w_i,      B = sum_i w_i pad(B_i) / sum_i w_i

    Weights ``w_i``:
      * ``"sparsity"`` (the paper's sparsity-weighted aggregation): ``w_i = ||B_i A_i||_F``,
        taken per adapted module (the paper's Delta W_k), so devices whose update is larger
        count more; example counts are not used, as in the paper. A module whose updates all
        have a zero product keeps its global A and B.
      * ``"examples"``: ``w_i = n_i`` (zero-padding with FedAvg's weights, no reweighting).

    As in the paper the padded zeros count in the mean: components that only high-rank
    devices train are shrunk by the weight of the low-rank ones. A device of rank r receives
    the top-r truncation ``A[:r]``, ``B[:, :r]`` (``for_device``). Head tensors: the
    example-weighted mean. The server optimizer's moments are over the padded A and B (at
    ``rank``) and the head; a module no update touched this round keeps its moments.

    Rank self-pruning happens on the device (the ``prune_threshold`` setting, sent in the round
    announcement): after local training it gives up trailing components that carry little
    of its update (``core.lora.pruned_rank``), zeroes them, announces the smaller rank
    and from then on downloads, trains and sends that truncation. Its last update at the old
    rank carries the zeroed tail, which under zero-padding is the same as the truncation.

    Parameters:
        layout: the adapter (``AdapterLayout``, or a name -> shape mapping).
        rank: required; the global adapter's rank, the largest a device may train (the top of
            the exported rank ladder).
        weighting, prune_threshold: see ``Settings``.
    """

    name = "hetlora"
    same_rank = False

    @dataclass(frozen=True)
    class Settings(CommonSettings):
        weighting: str = setting(
            "sparsity",
            choices=WEIGHTINGS,
            help="how updates are weighted: sparsity (the paper's ||B_i A_i||_F per module) or "
            "examples (n_i, plain zero-padding)",
        )
        prune_threshold: float = setting(
            0.0,
            range=Range(0.0, 1.0, hi_open=True),
            device=True,
            help="HetLoRA's rank self-pruning: devices give up trailing rank components weaker than this "
            "fraction of their strongest (0: off)",
        )

    settings: Settings

    @property
    def weighting(self) -> str:
        return self.settings.weighting

    def accumulate_modules(self, sums: dict[str, np.ndarray], update: ClientUpdate, n: float) -> None:
        for m in self.layout.modules:
            a, b = update.tensors[m.a], update.tensors[m.b]
            w = product_norm(a, b) if self.weighting == "sparsity" else n
            weighted_sum_into(
                sums, {m.a: pad_a(a, self.rank), m.b: pad_b(b, self.rank), m.key("weight"): np.array(1.0)}, w
            )

    def finalize_modules(self, partial: Partial, model: GlobalModel, out: GlobalModel) -> None:
        if model.rank != self.rank:
            raise ConfigError(f"hetlora was set up for rank {self.rank}, the global model holds rank {model.rank}")
        for m in self.layout.modules:
            w = float(partial.sums[m.key("weight")])
            if w > 0:
                out.tensors[m.a] = self.server_step(m.a, model.tensors[m.a], partial.sums[m.a] / w)
                out.tensors[m.b] = self.server_step(m.b, model.tensors[m.b], partial.sums[m.b] / w)


def product_norm(a: np.ndarray, b: np.ndarray) -> float:
    """||B @ A||_F without forming the (out x in) product: trace((B^T B)(A A^T)), r x r."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.sqrt(max(0.0, float(np.sum((b.T @ b) * (a @ a.T))))))
