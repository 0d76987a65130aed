"""The interface every aggregation strategy implements, and the types it speaks.

A strategy sees the weighted client updates of one round and produces the next global
model. It is written as ``accumulate(partial, update)`` + ``merge(partial, partial)`` +
``finalize(partial, model)`` over partial sums, so the aggregator holds O(model) memory
however many devices report, and the same code can run split across aggregator replicas.

Conventions shared by every strategy:

* A LoRA module adapts one frozen linear layer ``W`` (out x in) with ``A`` (rank x in) and
  ``B`` (out x rank). The weight a device computes with is its *effective weight*
  ``W_eff = W + base_delta + scale * B @ A``, where ``base_delta`` is what strategies that
  fold products into the frozen weights (FLoRA, FedEx-LoRA) have added so far.
* ``ClientUpdate.tensors`` are the device's full local tensors after training, at its own
  rank (not deltas). Updates are weighted by ``num_examples`` (``p_i = n_i / sum_j n_j``)
  unless a strategy says otherwise; head tensors (classifier etc.) are always the
  example-weighted mean.
* A ``Partial`` is nothing but sums: every field adds, so ``merge`` is plain addition
  (associative, and ``merge(partial(a), partial(b)) == partial(a + b)``), and
  ``StateStore`` persists any strategy's partial as its ``sums`` arrays plus ``weight``.
  Besides tensor names, ``sums`` may hold strategy keys ``f"{module.name}:{what}"`` (a
  colon never occurs in a graph name), e.g. ``"...query:BA"`` for a sum of products.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import numpy as np

from core.errors import BundleError, ConfigError, UpdateRejected
from server.strategies.server_optimizer import ServerOptimizer, ServerOptimizerSettings
from server.strategies.settings import Range, setting


@dataclass(frozen=True)
class LoraModule:
    """One adapted linear layer and the names of its tensors.

    name: module path, e.g. ``"base_model.model.bert.encoder.layer.0.attention.self.query"``.
    a: graph name of A, shape (rank, in_features): ``f"{name}.lora_A.weight"``.
    b: graph name of B, shape (out_features, rank): ``f"{name}.lora_B.weight"``.
    base: name of the frozen weight in the checkpoint, (out, in): ``f"{name}.base_layer.weight"``.
    """

    name: str
    a: str
    b: str
    base: str
    in_features: int
    out_features: int

    @classmethod
    def named(cls, name: str, in_features: int, out_features: int) -> LoraModule:
        """The module at ``name`` with peft's tensor names."""
        return cls(
            name,
            f"{name}.lora_A.weight",
            f"{name}.lora_B.weight",
            f"{name}.base_layer.weight",
            in_features,
            out_features,
        )

    def a_shape(self, rank: int) -> tuple[int, int]:
        return (rank, self.in_features)

    def b_shape(self, rank: int) -> tuple[int, int]:
        return (self.out_features, rank)

    def key(self, what: str) -> str:
        """Name of a strategy's extra sum for this module in ``Partial.sums``."""
        return f"{self.name}:{what}"


@dataclass(frozen=True)
class AdapterLayout:
    """What the trainable adapter of a bundle looks like, independent of the rank.

    modules: the adapted linear layers.
    head: other trainable tensors (e.g. the classifier) -> shape; they do not depend on the rank.
    scale: LoRA's ``alpha / rank``; fedlora exports ``alpha = 2 * rank``, so the same 2.0 at
        every rank of a ladder, which is what lets factors of different ranks be combined.
    """

    modules: tuple[LoraModule, ...]
    head: dict[str, tuple[int, ...]] = field(default_factory=dict)
    scale: float = 2.0

    def shapes(self, rank: int, include_a: bool = True, include_b: bool = True) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every trainable tensor at ``rank`` (optionally without A or B)."""
        out: dict[str, tuple[int, ...]] = {}
        for m in self.modules:
            if include_a:
                out[m.a] = m.a_shape(rank)
            if include_b:
                out[m.b] = m.b_shape(rank)
        out.update(self.head)
        return out

    @classmethod
    def from_manifest(cls, manifest) -> AdapterLayout:
        """From an ``core.bundle.Manifest``: its trainable specs by role; scale = alpha / rank."""
        roles = {p.name: p.role for p in manifest.trainable}
        return cls._build(manifest.shapes, roles, float(manifest.alpha) / int(manifest.rank))

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[int, ...]], scale: float = 2.0) -> AdapterLayout:
        """From name -> shape alone: names containing ``.lora_A.`` / ``.lora_B.`` are LoRA factors
        (the exporter's own rule), everything else is head."""
        roles = {n: "lora_A" if ".lora_A." in n else "lora_B" if ".lora_B." in n else "head" for n in shapes}
        return cls._build(shapes, roles, scale)

    @classmethod
    def _build(cls, shapes: Mapping[str, tuple[int, ...]], roles: dict[str, str], scale: float) -> AdapterLayout:
        a_names = {n.split(".lora_A.")[0]: n for n, r in roles.items() if r == "lora_A"}
        b_names = {n.split(".lora_B.")[0]: n for n, r in roles.items() if r == "lora_B"}
        if set(a_names) != set(b_names):
            odd = sorted(set(a_names) ^ set(b_names))
            raise BundleError(f"LoRA factors come in pairs; {len(odd)} modules have only one, e.g. {odd[0]}")
        modules = []
        for name in sorted(a_names):
            a_shape, b_shape = tuple(shapes[a_names[name]]), tuple(shapes[b_names[name]])
            if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
                raise BundleError(f"{name}: A {a_shape} and B {b_shape} are not (r, in) and (out, r)")
            modules.append(
                LoraModule(
                    name,
                    a_names[name],
                    b_names[name],
                    f"{name}.base_layer.weight",
                    in_features=a_shape[1],
                    out_features=b_shape[0],
                )
            )
        head = {n: tuple(shapes[n]) for n, r in roles.items() if r == "head"}
        return cls(tuple(modules), head, float(scale))


@dataclass
class GlobalModel:
    """The aggregator's model state between rounds.

    rank: the largest rank the global adapter holds (devices of smaller rank get a slice).
    tensors: A (rank x in) and B (out x rank) of every module at ``rank``, plus head tensors.
    base_delta: ``LoraModule.base`` -> the change folded into that frozen weight so far
        (FLoRA, FedEx-LoRA); empty for strategies that never touch frozen weights. A device's
        frozen weight is ``W + base_delta``.
    version: bumped by every ``finalize`` that aggregated at least one update.
    """

    rank: int
    tensors: dict[str, np.ndarray]
    base_delta: dict[str, np.ndarray] = field(default_factory=dict)
    version: int = 0

    def copy(self) -> GlobalModel:
        return GlobalModel(
            self.rank,
            {k: v.copy() for k, v in self.tensors.items()},
            {k: v.copy() for k, v in self.base_delta.items()},
            self.version,
        )


@dataclass
class ClientUpdate:
    """One device's decoded update for one round.

    tensors: the device's full local tensors after training, at its own ``rank`` (not deltas:
        the aggregator adds the received delta to what it sent). Under FFA-LoRA they hold no A;
        under FedSA-LoRA B may be absent.
    """

    device: str
    round: int
    rank: int
    num_examples: int
    tensors: dict[str, np.ndarray]
    metrics: dict = field(default_factory=dict)


@dataclass
class Partial:
    """Running sums of one round: ``sums[key] = sum_i w_i * x_i``, ``weight = sum_i n_i``.

    Every field adds under ``merge``; ``devices`` concatenates.
    """

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    weight: float = 0.0
    count: int = 0
    devices: list[str] = field(default_factory=list)


def weighted_sum_into(sums: dict[str, np.ndarray], tensors: Mapping[str, np.ndarray], weight: float) -> None:
    """sums[name] += weight * tensors[name], in place, in float64 (under NumPy 2 a Python float
    times a float32 array stays float32, so the cast comes before the product)."""
    for name, value in tensors.items():
        term = np.asarray(weight * np.asarray(value, dtype=np.float64))  # 0-d stays an array: += in place
        acc = sums.get(name)
        if acc is None:
            sums[name] = term
        else:
            acc += term


def check_same_tensors(
    update: ClientUpdate, shapes: Mapping[str, tuple[int, ...]], optional: Mapping[str, tuple[int, ...]] | None = None
) -> None:
    """The update must carry exactly the tensors in ``shapes`` (and may carry those in
    ``optional``), with the right shapes, all finite."""
    optional = optional or {}
    names = set(update.tensors)
    missing = sorted(set(shapes) - names)
    extra = sorted(names - set(shapes) - set(optional))
    if missing:
        raise UpdateRejected("missing_tensor", f"{len(missing)} tensors missing, e.g. {missing[0]}")
    if extra:
        raise UpdateRejected("unknown_tensor", f"{len(extra)} unknown tensors, e.g. {extra[0]}")
    with np.errstate(over="ignore", invalid="ignore"):  # all_finite's overflow is expected
        for name, value in update.tensors.items():
            expected = tuple(shapes[name] if name in shapes else optional[name])
            if tuple(value.shape) != expected:
                raise UpdateRejected("wrong_shape", f"{name} has shape {tuple(value.shape)}, expected {expected}")
            if not all_finite(value):
                raise UpdateRejected("non_finite", f"{name} contains NaN or infinity")


def all_finite(value: np.ndarray) -> bool:
    """``np.isfinite(value).all()``, four times faster for the small tensors of an update (one
    call, no boolean array): a sum of squares is finite only if every value is, and one that
    overflows (finite values near float32's limit) falls back to the exact test. Call it under
    ``np.errstate(over="ignore", invalid="ignore")``: the overflow is expected."""
    flat = value.reshape(-1)
    return math.isfinite(float(np.dot(flat, flat))) or bool(np.isfinite(flat).all())


@dataclass(frozen=True)
class CommonSettings(ServerOptimizerSettings):
    """The settings every strategy has: the server optimizer's (``server.strategies.server_optimizer``)
    and FedProx's. A strategy's own ``Settings`` subclasses this."""

    fedprox_mu: float = setting(
        0.0,
        range=Range(0.0, 10.0),
        device=True,
        help="FedProx (Li et al. 2020): devices add mu/2 * ||w - w_global||^2 over the trained adapter "
        "to their loss (0: off; needs a bundle exported with the proximal term)",
    )


class Strategy(abc.ABC):
    """Base class: the checks, the partial sums and their merge that every strategy shares.

    Parameters:
        layout: the adapter's modules, head tensors and LoRA scale (``AdapterLayout``; a plain
            name -> shape mapping is read with ``AdapterLayout.from_shapes``).
        rank: required. The one rank every device trains (strategies with ``same_rank``) or the
            largest rank a device may train and the rank of the global adapter (the others).
        **settings: the strategy's settings, as declared in its ``Settings`` (see
            ``server.strategies.settings``; every strategy has ``CommonSettings``: the server
            optimizer and FedProx's mu); validated here, kept as ``self.settings``.

    The server optimizer (``self.optimizer``) turns each aggregated quantity's change into
    the global's step: ``finalize`` and ``finalize_modules`` pass every new value through
    ``server_step``. Its moments are state across rounds (``ServerOptimizer.state``).

    Class attributes a subclass sets: ``name`` (registry key), ``Settings`` (its declared
    settings; none by default), ``trains_a`` (False: the device's A stays at its initial value
    and is never sent), ``uploads_b`` (False: B stays on the device), ``same_rank`` (True:
    updates of another rank are rejected), ``async_unsupported`` (why asynchronous rounds,
    ``server.async_rounds``, cannot use it; empty: they can).
    """

    name = ""
    Settings: ClassVar[type[CommonSettings]] = CommonSettings
    trains_a = True
    uploads_b = True
    same_rank = True
    async_unsupported: ClassVar[str] = ""

    def __init__(self, layout: AdapterLayout | Mapping[str, tuple[int, ...]], rank: int, **settings: Any):
        if not isinstance(layout, AdapterLayout):
            layout = AdapterLayout.from_shapes(layout)
        if int(rank) < 1:
            raise ConfigError(f"{self.name}: rank must be >= 1, got {rank}")
        self.layout = layout
        self.rank = int(rank)
        self.settings = cast(CommonSettings, self.Settings.build(settings, self.name))
        self.optimizer = ServerOptimizer(self.settings)

    def device_settings(self) -> dict[str, Any]:
        """What the round announcement tells devices about this strategy's settings."""
        return self.settings.device_values()

    # -- checks --------------------------------------------------------------------------
    def check(self, update: ClientUpdate) -> None:
        """Raise UpdateRejected (with a reason code) if this strategy cannot use the update."""
        if update.num_examples <= 0:
            raise UpdateRejected("no_examples", f"num_examples is {update.num_examples}")
        if self.same_rank and update.rank != self.rank:
            raise UpdateRejected(
                "rank_mismatch",
                f"rank {update.rank} cannot be combined with rank {self.rank} "
                f"({self.name} needs one rank; use hetlora, flexlora or flora)",
            )
        if not 1 <= update.rank <= self.rank:
            raise UpdateRejected(
                "rank_out_of_range",
                f"rank {update.rank} is outside 1..{self.rank}, the ranks the global adapter of {self.name} holds",
            )
        if not self.trains_a:
            sent = sorted(m.a for m in self.layout.modules if m.a in update.tensors)
            if sent:
                raise UpdateRejected(
                    "frozen_tensor_sent",
                    f"{len(sent)} A tensors sent, e.g. {sent[0]}; under "
                    f"{self.name} A is frozen at its initial value and is never sent",
                )
        required = self.layout.shapes(update.rank, include_a=self.trains_a, include_b=self.uploads_b)
        optional = {} if self.uploads_b else {m.b: m.b_shape(update.rank) for m in self.layout.modules}
        check_same_tensors(update, required, optional)

    # -- partial sums --------------------------------------------------------------------
    def new_partial(self) -> Partial:
        return Partial()

    def accumulate(self, partial: Partial, update: ClientUpdate) -> Partial:
        """Add one checked update to ``partial`` (in place; returned for convenience)."""
        n = float(update.num_examples)
        weighted_sum_into(partial.sums, {h: update.tensors[h] for h in self.layout.head}, n)
        self.accumulate_modules(partial.sums, update, n)
        partial.weight += n
        partial.count += 1
        partial.devices.append(update.device)
        return partial

    @abc.abstractmethod
    def accumulate_modules(self, sums: dict[str, np.ndarray], update: ClientUpdate, n: float) -> None:
        """Add the update's LoRA terms, weighted by ``n`` (its example count), to ``sums``."""

    def merge(self, a: Partial, b: Partial) -> Partial:
        """The partial of both sets of updates; neither input is changed."""
        sums = {k: v.copy() for k, v in a.sums.items()}
        weighted_sum_into(sums, b.sums, 1.0)
        return Partial(sums, a.weight + b.weight, a.count + b.count, a.devices + b.devices)

    # -- results -------------------------------------------------------------------------
    def finalize(self, partial: Partial, model: GlobalModel) -> GlobalModel:
        """The next global model; an empty partial returns a copy of ``model`` unchanged. A
        non-empty one advances the server optimizer by a round (call it once per round)."""
        if partial.weight <= 0:
            return model.copy()
        out = model.copy()
        out.version += 1
        self.optimizer.begin_round()
        for h in self.layout.head:
            out.tensors[h] = self.server_step(h, model.tensors[h], partial.sums[h] / partial.weight)
        self.finalize_modules(partial, model, out)
        return out

    @abc.abstractmethod
    def finalize_modules(self, partial: Partial, model: GlobalModel, out: GlobalModel) -> None:
        """Set ``out``'s module tensors (and base_delta) from a non-empty ``partial``, each new
        value through ``server_step``."""

    def server_step(self, name: str, x: np.ndarray, target: np.ndarray, dtype=np.float32) -> np.ndarray:
        """The new value of quantity ``name`` (now ``x``) whose aggregate is ``target``: the
        server optimizer's step (``target`` itself, as ``dtype``, under plain sgd)."""
        return self.optimizer.step(name, x, target, dtype)

    def for_device(self, model: GlobalModel, rank: int) -> dict[str, np.ndarray]:
        """The adapter tensors a device of ``rank`` loads: the rank-``rank`` slice of the global
        A and B (those the device trains and may receive), and the head.

        Frozen-weight changes are not adapter tensors: devices also need ``model.base_delta``.
        """
        if self.same_rank and rank != self.rank:
            raise ConfigError(f"{self.name} serves rank {self.rank} only, not {rank}")
        if not 1 <= rank <= model.rank:
            raise ConfigError(f"rank {rank} is outside 1..{model.rank}, the ranks the global adapter holds")
        out: dict[str, np.ndarray] = {}
        for m in self.layout.modules:
            if self.trains_a:
                out[m.a] = model.tensors[m.a][:rank].copy()
            if self.uploads_b:
                out[m.b] = model.tensors[m.b][:, :rank].copy()
        out.update({h: model.tensors[h].copy() for h in self.layout.head})
        return out

    def frozen_for_device(self, model: GlobalModel, rank: int) -> dict[str, np.ndarray]:
        """Factored changes to frozen weights a device of ``rank`` also loads, as
        ``base_a/<LoraModule.base>`` (k x in) and ``base_b/<LoraModule.base>`` (out x k, LoRA
        scale included): the device adds ``base_b @ base_a`` to that weight. None by default."""
        return {}


def module_product(update: ClientUpdate, m: LoraModule) -> np.ndarray:
    """B_i @ A_i of one module of one update, in float64 (out x in)."""
    return update.tensors[m.b].astype(np.float64) @ update.tensors[m.a].astype(np.float64)
