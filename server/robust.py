"""Robust aggregation against poisoned updates, for when secure aggregation is off.

A strategy turns each update into terms that it sums (``Strategy.accumulate``: factors A and
B, products B A, head tensors, each weighted). Plain aggregation is the weighted mean of those
terms, which one device can drag anywhere its norm bound allows. ``RobustStrategy`` wraps any
strategy and replaces every sum by ``W * center_g(x_g)``: the unweighted coordinate-wise
*center* of the groups' per-example terms ``x_g = (sum of the group's terms) / (its weight)``,
scaled back by the total weight ``W``; the wrapped strategy's ``finalize`` (and whatever it
does there: server learning rates, optimizers) then runs on that partial unchanged. So the
robust step applies to exactly what the strategy aggregates (factors for FedAvg, FFA-LoRA and
FedSA-LoRA, products for FlexLoRA and FLoRA, both for FedEx-LoRA).

Methods (``RobustSettings.method``):

* ``trimmed_mean`` (Yin, Chen, Ramchandran and Bartlett, "Byzantine-Robust Distributed
  Learning: Towards Optimal Statistical Rates", ICML 2018): per coordinate, drop the
  ``floor(trim_fraction * k)`` largest and smallest of the k devices' values and average the
  rest. Tolerates fewer than ``trim_fraction * k`` attackers per coordinate.
* ``median`` (same paper): the coordinate-wise median; tolerates fewer than half.
* ``bucket_median`` (streaming, bounded memory; median of means, as in Karimireddy, He and
  Jaggi, "Byzantine-Robust Learning on Heterogeneous Datasets via Bucketing", ICLR 2022):
  each update is added to one of ``buckets`` running sums (the least-filled bucket, ties
  broken at random, so an attacker cannot choose its bucket or crowd one), and the result
  is the coordinate-wise median of the bucket means. An attacker spoils at most its own
  bucket, so fewer than ``buckets / 2`` attackers cannot move the median outside the range
  of honest bucket means.

* ``median_filter``: the weighted mean of the devices whose change (their terms minus the
  current global's) points the same way as the coordinate-wise median change (cosine > 0),
  each change clipped to the median change norm; the others are dropped whole. The median is the trusted direction FLTrust (Cao et al., NDSS
  2021) takes from a server data set, without one. Sign-flipped updates point against it
  while fewer than half of the devices flip; the coordinate-wise median alone only shrinks
  towards them, and with non-IID devices (per-coordinate spread much larger than the mean)
  that shrinkage is large: it is the method for sign flips. Same-rank strategies only.

Memory. ``trimmed_mean``, ``median`` and ``median_filter`` are not streaming: the round's partial keeps every
device's terms, O(devices x model) (float64, persisted with the open round on every accepted
update: with 100 devices and a 1 M-value adapter, 800 MB written per update), and ``finalize``
stacks one tensor's values over all devices at a time. ``bucket_median`` keeps
O(buckets x model) however many devices report, and merging two partials adds bucket by bucket
(the least-filled rule only balances within one worker).

What it does not do. The center is per coordinate and unweighted (each device one vote, as in
the papers); example weights only scale the result. Coordinates are judged independently, so
an attack spread thinly over many coordinates within the honest range is not detected.
Strategies whose terms depend on the rank a device trains (hetlora, flexlora-delta: zero-padded
or per-rank keys) get a center in which minority ranks can be outvoted: use them with ``mean``.
Secure aggregation hides individual terms, so only ``mean`` composes with it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.errors import ConfigError
from server.strategies.base import ClientUpdate, GlobalModel, Partial, Strategy

ROBUST_METHODS = ("mean", "trimmed_mean", "median", "bucket_median", "median_filter")
GROUP_SEP = "|"  # between a group and a term's key; device ids and bucket names never contain it
WEIGHT_KEY = "#weight"
COUNT_KEY = "#count"


@dataclass
class RobustSettings:
    """How the round's updates are combined (``robust`` in the server config).

    method: ``mean`` (the strategy's own weighted mean, streaming), ``trimmed_mean`` or
        ``median`` (coordinate-wise, O(devices x model) memory), ``bucket_median`` (median of
        ``buckets`` bucket means: streaming, O(buckets x model)), ``median_filter`` (the mean
        of the devices that agree in direction with the median; O(devices x model)).
    trim_fraction: ``trimmed_mean`` drops this fraction of the devices at each end, per coordinate.
    buckets: ``bucket_median``'s number of buckets (odd is best: the median is then one bucket's
        mean); at least twice the attackers it should tolerate plus one.
    """

    method: str = "mean"
    trim_fraction: float = 0.1
    buckets: int = 5

    def __post_init__(self) -> None:
        if self.method not in ROBUST_METHODS:
            raise ConfigError(f"robust.method must be one of {', '.join(ROBUST_METHODS)}, not {self.method!r}")
        if not 0 <= self.trim_fraction < 0.5:
            raise ConfigError(f"robust.trim_fraction must be in [0, 0.5), got {self.trim_fraction}")
        if not 3 <= self.buckets <= 1000:
            raise ConfigError(f"robust.buckets must be in [3, 1000], got {self.buckets}")

    @property
    def enabled(self) -> bool:
        return self.method != "mean"


def trimmed_mean(values: np.ndarray, trim_fraction: float) -> np.ndarray:
    """Coordinate-wise mean over axis 0 without the ``floor(trim_fraction * k)`` largest and
    smallest values of each coordinate (k = ``len(values)``); all values when that is 0."""
    k = len(values)
    cut = int(math.floor(trim_fraction * k))
    if cut == 0:
        return values.mean(axis=0)
    ordered = np.sort(values, axis=0)
    return ordered[cut : k - cut].mean(axis=0)


def robust_center(values: np.ndarray, method: str, trim_fraction: float = 0.1) -> np.ndarray:
    """The coordinate-wise center of ``values`` (groups x ...) by ``method``."""
    if method == "trimmed_mean":
        return trimmed_mean(values, trim_fraction)
    if method in ("median", "bucket_median"):
        return np.median(values, axis=0)
    if method == "mean":
        return values.mean(axis=0)
    raise ConfigError(f"unknown robust method {method!r}")


def group_terms(partial: Partial) -> dict[str, dict[str, np.ndarray]]:
    """``{group: {key: terms}}`` from a robust partial's ``"<group>|<key>"`` sums."""
    groups: dict[str, dict[str, np.ndarray]] = {}
    for name, value in partial.sums.items():
        group, sep, key = name.partition(GROUP_SEP)
        if not sep:
            raise ConfigError(f"partial sum {name!r} belongs to no group: not a robust partial")
        groups.setdefault(group, {})[key] = value
    return groups


def robust_partial(partial: Partial, method: str, trim_fraction: float = 0.1) -> Partial:
    """The plain partial the wrapped strategy finalizes: every key's sum replaced by
    ``W * center_g(terms_g / weight_g)`` over the groups (a group without a key adds 0 to it,
    as in a sum). Weight, count and devices are the round's."""
    groups = {g: t for g, t in group_terms(partial).items() if float(t.get(WEIGHT_KEY, 0.0)) > 0}
    if not groups:
        return Partial(weight=0.0, count=partial.count, devices=list(partial.devices))
    weights = {g: float(t[WEIGHT_KEY]) for g, t in groups.items()}
    total = sum(weights.values())
    keys = sorted({k for t in groups.values() for k in t if k not in (WEIGHT_KEY, COUNT_KEY)})
    sums: dict[str, np.ndarray] = {}
    for key in keys:
        shape = next(np.shape(t[key]) for t in groups.values() if key in t)
        stacked = np.stack(
            [
                np.asarray(t[key], np.float64) / weights[g] if key in t else np.zeros(shape, np.float64)
                for g, t in groups.items()
            ]
        )
        sums[key] = np.asarray(total * robust_center(stacked, method, trim_fraction))
    return Partial(sums, total, partial.count, list(partial.devices))


class RobustStrategy(Strategy):
    """``inner`` with its sums replaced by a robust center (see the module docstring).

    Everything but ``accumulate`` and ``finalize`` is the inner strategy's: checks, what
    devices receive, their settings, the name in the round announcement.
    """

    def __init__(self, inner: Strategy, settings: RobustSettings, rng: random.Random | None = None):
        if not settings.enabled:
            raise ConfigError("RobustStrategy needs a robust method other than mean")
        # Not Strategy.__init__: the inner strategy already validated its settings.
        self.inner = inner
        self.robust = settings
        self.name = inner.name
        self.trains_a = inner.trains_a
        self.uploads_b = inner.uploads_b
        self.same_rank = inner.same_rank
        self.layout = inner.layout
        self.rank = inner.rank
        self.settings = inner.settings
        self.rng = rng or random.SystemRandom()
        self.last_dropped: list[str] = []  # the devices median_filter dropped in the last finalize

    def __getattr__(self, name: str) -> Any:  # the inner strategy's own helpers and properties
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def device_settings(self) -> dict[str, Any]:
        return self.inner.device_settings()

    def check(self, update: ClientUpdate) -> None:
        self.inner.check(update)

    def new_partial(self) -> Partial:
        return Partial()

    def group_of(self, partial: Partial, update: ClientUpdate) -> str:
        """The device itself, or for ``bucket_median`` the least-filled bucket (ties at random)."""
        if self.robust.method != "bucket_median":
            if GROUP_SEP in update.device:
                raise ConfigError(f"device id {update.device!r} contains {GROUP_SEP!r}")
            return update.device
        counts = [float(partial.sums.get(f"b{j}{GROUP_SEP}{COUNT_KEY}", 0.0)) for j in range(self.robust.buckets)]
        fewest = min(counts)
        return f"b{self.rng.choice([j for j, c in enumerate(counts) if c == fewest])}"

    def accumulate(self, partial: Partial, update: ClientUpdate) -> Partial:
        """Add the update's terms (as the inner strategy computes them) to its group's sums."""
        own = self.inner.accumulate(self.inner.new_partial(), update)
        group = self.group_of(partial, update)
        terms = dict(own.sums)
        terms[WEIGHT_KEY] = np.array(own.weight, np.float64)
        terms[COUNT_KEY] = np.array(1.0)
        for key, value in terms.items():
            name = f"{group}{GROUP_SEP}{key}"
            acc = partial.sums.get(name)
            if acc is None:
                partial.sums[name] = np.array(value, np.float64, copy=True)
            else:
                acc += value
        partial.weight += own.weight
        partial.count += 1
        partial.devices.append(update.device)
        return partial

    def accumulate_modules(self, sums: dict[str, np.ndarray], update: ClientUpdate, n: float) -> None:
        """The wrapped strategy's plain sums (``accumulate`` keeps each device's terms apart)."""
        self.inner.accumulate_modules(sums, update, n)

    def finalize(self, partial: Partial, model: GlobalModel) -> GlobalModel:
        if partial.weight <= 0:
            return model.copy()
        if self.robust.method == "median_filter":
            kept, self.last_dropped = self.filtered_partial(partial, model)
            return self.inner.finalize(kept, model)
        return self.inner.finalize(robust_partial(partial, self.robust.method, self.robust.trim_fraction), model)

    def filtered_partial(self, partial: Partial, model: GlobalModel) -> tuple[Partial, list[str]]:
        """``median_filter``: the plain partial of the groups whose change agrees in direction
        with the coordinate-wise median change, and the groups dropped."""
        groups = {g: t for g, t in group_terms(partial).items() if float(t.get(WEIGHT_KEY, 0.0)) > 0}
        start = self.inner.for_device(model, model.rank)
        reference = self.inner.accumulate(self.inner.new_partial(), ClientUpdate("global", 0, model.rank, 1, start))
        keys = sorted(k for k in reference.sums if any(k in t for t in groups.values()))
        changes = {
            g: {k: np.asarray(t[k], np.float64) / float(t[WEIGHT_KEY]) - reference.sums[k] for k in keys if k in t}
            for g, t in groups.items()
        }
        median = {k: np.median(np.stack([c[k] for c in changes.values() if k in c]), axis=0) for k in keys}
        scale = math.sqrt(sum(float(np.square(v).sum()) for v in median.values()))
        kept: list[str] = []
        dropped: list[str] = []
        for g, change in changes.items():
            dot = sum(float(np.vdot(change[k], median[k])) for k in change)
            (kept if scale == 0 or dot > 0 else dropped).append(g)
        norms = {g: math.sqrt(sum(float(np.square(v).sum()) for v in c.values())) for g, c in changes.items()}
        bound = float(np.median(list(norms.values())))
        sums: dict[str, np.ndarray] = {}
        for g in kept:
            w = float(groups[g][WEIGHT_KEY])
            shrink = min(1.0, bound / norms[g]) if norms[g] > 0 else 1.0
            for key, value in groups[g].items():
                if key in (WEIGHT_KEY, COUNT_KEY):
                    continue
                term = w * (reference.sums[key] + shrink * changes[g][key]) if key in changes[g] else value
                sums[key] = sums[key] + term if key in sums else np.array(term, np.float64, copy=True)
        weight = sum(float(groups[g][WEIGHT_KEY]) for g in kept)
        return Partial(sums, weight, len(kept), kept), dropped

    def finalize_modules(self, partial: Partial, model: GlobalModel, out: GlobalModel) -> None:
        """The wrapped strategy's (``finalize`` hands it the robust partial)."""
        self.inner.finalize_modules(partial, model, out)

    def for_device(self, model: GlobalModel, rank: int) -> dict[str, np.ndarray]:
        return self.inner.for_device(model, rank)

    def frozen_for_device(self, model: GlobalModel, rank: int) -> dict[str, np.ndarray]:
        return self.inner.frozen_for_device(model, rank)


def with_robust(strategy: Strategy, settings: RobustSettings | Mapping[str, Any] | None) -> Strategy:
    """``strategy`` wrapped by ``RobustStrategy`` when ``settings`` name a robust method."""
    if settings is None:
        return strategy
    if not isinstance(settings, RobustSettings):
        settings = RobustSettings(**settings)
    return RobustStrategy(strategy, settings) if settings.enabled else strategy
