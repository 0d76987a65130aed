"""The interface every aggregation strategy implements.

A strategy sees the weighted client updates of one round and produces the next global
adapter. It is written as ``accumulate(partial, update)`` + ``merge(partial, partial)`` +
``finalize(partial, global)`` over partial sums, so the aggregator holds O(adapter) memory
however many devices report, and the same code can run split across aggregator replicas.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edge_client.errors import UpdateRejected


@dataclass
class ClientUpdate:
    """One device's decoded update for one round: ``tensors`` are deltas (local - global)."""

    device: str
    round: int
    rank: int
    num_examples: int
    tensors: dict[str, np.ndarray]
    metrics: dict = field(default_factory=dict)


@dataclass
class Partial:
    """Running weighted sums of one round: ``sums[name] = sum_i w_i * x_i``, ``weight = sum_i w_i``."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    weight: float = 0.0
    count: int = 0
    devices: list[str] = field(default_factory=list)


class Strategy:
    """Base class. Subclasses define how updates are weighted, checked and combined."""

    name = ""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self.shapes = dict(shapes)

    def new_partial(self) -> Partial:
        return Partial()

    def check(self, update: ClientUpdate) -> None:
        """Raise UpdateRejected if this strategy cannot use the update."""
        raise NotImplementedError

    def accumulate(self, partial: Partial, update: ClientUpdate) -> Partial:
        raise NotImplementedError

    def merge(self, a: Partial, b: Partial) -> Partial:
        raise NotImplementedError

    def finalize(self, partial: Partial, global_adapter: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError


def check_same_tensors(update: ClientUpdate, shapes: dict[str, tuple[int, ...]]) -> None:
    """The update must carry exactly the adapter's tensors, with the right shapes, all finite."""
    names = set(update.tensors)
    missing = sorted(set(shapes) - names)
    extra = sorted(names - set(shapes))
    if missing:
        raise UpdateRejected("missing_tensor", f"{len(missing)} tensors missing, e.g. {missing[0]}")
    if extra:
        raise UpdateRejected("unknown_tensor", f"{len(extra)} unknown tensors, e.g. {extra[0]}")
    for name, value in update.tensors.items():
        if tuple(value.shape) != tuple(shapes[name]):
            raise UpdateRejected("wrong_shape", f"{name} has shape {tuple(value.shape)}, expected {tuple(shapes[name])}")
        if not np.isfinite(value).all():
            raise UpdateRejected("non_finite", f"{name} contains NaN or infinity")
