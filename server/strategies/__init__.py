"""LoRA-aware aggregation strategies: one module per method, one interface (``base.Strategy``).

``STRATEGIES`` maps the configuration name of each method to its class;
``make_strategy(name, layout, rank=..., **params)`` builds one.
"""

from __future__ import annotations

from core.errors import ConfigError
from server.strategies.base import AdapterLayout, Strategy
from server.strategies.fedavg import FedAvg
from server.strategies.fedex_lora import FedExLoRA
from server.strategies.fedsa_lora import FedSALoRA
from server.strategies.ffa_lora import FFALoRA
from server.strategies.flexlora import FlexLoRA, FlexLoRADelta
from server.strategies.flora import FLoRA
from server.strategies.hetlora import HetLoRA

STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "ffa-lora": FFALoRA,
    "fedsa-lora": FedSALoRA,
    "hetlora": HetLoRA,
    "flexlora": FlexLoRA,
    "flexlora-delta": FlexLoRADelta,
    "flora": FLoRA,
    "fedex-lora": FedExLoRA,
}


def make_strategy(name: str, layout: AdapterLayout, **params) -> Strategy:
    """The strategy registered as ``name``; ``params`` go to its constructor (``rank`` is
    required by all; see each class for the rest)."""
    cls = STRATEGIES.get(name)
    if cls is None:
        raise ConfigError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
    try:
        return cls(layout, **params)
    except TypeError as exc:  # a parameter this strategy does not take, or rank missing
        raise ConfigError(f"strategy {name!r}: {exc}") from exc
