"""FLoRA: stacking heterogeneous-rank LoRA modules and merging the product into the frozen weights.

Ziyao Wang, Zheyu Shen, Yexiao He, Guoheng Sun, Hongyi Wang, Lingjuan Lyu and Ang Li, "FLoRA:
Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank Adaptations",
NeurIPS 2024 (arXiv:2409.05976).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from core.errors import ConfigError
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


def stack(
    a_list: Sequence[np.ndarray], b_list: Sequence[np.ndarray], weights: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """The paper's stacking: ``A = [p_1 A_1; ...; p_k A_k]`` (sum r_i x in) and
    ``B = [B_1, ..., B_k]`` (out x sum r_i), with ``p_i = w_i / sum_j w_j``; then
    ``B @ A = sum_i p_i B_i @ A_i`` exactly (block matrix product). Ranks may differ.
    The scaling goes on A as in the authors' code."""
    total = float(sum(weights))
    a = np.concatenate([(w / total) * np.asarray(x, dtype=np.float64) for x, w in zip(a_list, weights)], axis=0)
    b = np.concatenate([np.asarray(x, dtype=np.float64) for x in b_list], axis=1)
    return a, b


def reinit_a(module: LoraModule, rank: int, seed: int, version: int) -> np.ndarray:
    """A fresh A (rank x in) for the next round: uniform in +-1/sqrt(in) (the bound of peft's
    ``kaiming_uniform_(a=sqrt(5))``), drawn from a generator seeded by (seed, version,
    crc32 of the module name) so every aggregator replica draws the same. Rows are drawn in
    order, so a device of rank r gets the first r rows: the rank-r slice of one draw."""
    rng = np.random.default_rng([seed, version, zlib.crc32(module.name.encode())])
    bound = 1.0 / np.sqrt(module.in_features)
    return rng.uniform(-bound, bound, size=(rank, module.in_features))


class FLoRA(Strategy):
    """Devices train different ranks r_i <= rank from freshly initialised adapters (B = 0).
    The server stacks their modules, whose product is the weighted sum of their products,
    folds it into the frozen weights and starts the next round with fresh adapters:

        base_delta += scale * B_stack @ A_stack = scale * sum_i p_i B_i @ A_i,  p_i = n_i / sum_j n_j
        A = reinit_a(...) (rank x in),  B = 0

    ``p_i`` by example count follows the paper and the authors' code (the scaling factors
    p_k multiply the stacked A_k). Because the whole product of every device goes into the
    frozen weights, the new effective weight ``W + base_delta + scale * B @ A`` (B = 0)
    equals the weighted mean of the devices' effective weights exactly, whatever their ranks.

    The partial keeps the running sum ``sum_i n_i B_i @ A_i`` (out x in per module), which is
    the stacked product without holding every device's factors: memory independent of the
    number of devices. ``stack`` is the paper's form of the same sum. The paper ships the
    stacked factors down and lets devices multiply; here the aggregator holds the dense
    ``base_delta``; how it is encoded on the downlink is the aggregator's choice.

    ``for_device`` gives the rank-r slice of the fresh A and a zero B; the device must also
    load ``base_delta`` into its frozen weights (W + base_delta) before training.
    Head tensors: the example-weighted mean. The server optimizer's moments are over each
    module's frozen-weight change (dense, out x in: its pseudo-gradient is this round's fold
    ``scale * sum_i p_i B_i @ A_i``) and the head; the fresh A and B are not optimized.

    Parameters:
        layout: the adapter (``AdapterLayout``, or a name -> shape mapping).
        rank: required; the global adapter's rank, the largest a device may train (the top of
            the exported rank ladder).
        init_seed: see ``Settings``.
    """

    name = "flora"
    same_rank = False
    async_unsupported = (
        "each version folds the stacked products into the frozen weights and starts a new adapter, "
        "so an update trained on an older version's adapter belongs to weights that are gone"
    )

    @dataclass(frozen=True)
    class Settings(CommonSettings):
        init_seed: int = setting(
            0,
            range=Range(0, 2**32 - 1),
            help="seed of the fresh A drawn after each fold, combined with the model version so "
            "each round's A differs and a job is reproducible",
        )

    settings: Settings

    @property
    def seed(self) -> int:
        return self.settings.init_seed

    def accumulate_modules(self, sums: dict[str, np.ndarray], update: ClientUpdate, n: float) -> None:
        weighted_sum_into(sums, {m.key("BA"): module_product(update, m) for m in self.layout.modules}, n)

    def finalize_modules(self, partial: Partial, model: GlobalModel, out: GlobalModel) -> None:
        if model.rank != self.rank:
            raise ConfigError(f"flora was set up for rank {self.rank}, the global model holds rank {model.rank}")
        scale = self.layout.scale
        for m in self.layout.modules:
            old = model.base_delta.get(m.base)
            old = np.zeros((m.out_features, m.in_features)) if old is None else old.astype(np.float64)
            target = old + scale * partial.sums[m.key("BA")] / partial.weight
            out.base_delta[m.base] = self.server_step(m.base, old, target)
            out.tensors[m.a] = reinit_a(m, model.rank, self.seed, out.version).astype(np.float32)
            out.tensors[m.b] = np.zeros((m.out_features, model.rank), np.float32)
