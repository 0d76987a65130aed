"""LoRA-aware aggregation strategies: one module per method, one interface (``base.Strategy``).

``STRATEGIES`` maps the configuration name of each method to its class;
``make_strategy(name, layout, rank=..., **settings)`` builds one. Each class declares its own
settings (``Strategy.Settings``; see ``server.strategies.settings``) on top of those every
strategy has (``CommonSettings``: the server optimizer, ``server_optimizer.py``, and FedProx).
"""

from __future__ import annotations

import sys

from core.errors import ConfigError
from server.strategies.base import AdapterLayout, CommonSettings, Strategy
from server.strategies.fedavg import FedAvg
from server.strategies.fedex_lora import FedExLoRA
from server.strategies.fedsa_lora import FedSALoRA
from server.strategies.ffa_lora import FFALoRA
from server.strategies.flexlora import FlexLoRA, FlexLoRADelta
from server.strategies.flora import FLoRA
from server.strategies.hetlora import HetLoRA
from server.strategies.settings import SettingInfo, StrategySettings, all_settings

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
    required by all; the rest are its declared settings)."""
    cls = STRATEGIES.get(name)
    if cls is None:
        raise ConfigError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
    rank = params.pop("rank", None)
    if rank is None:
        raise ConfigError(f"strategy {name!r}: rank is required")
    settings = strategy_settings(name, params)
    return cls(layout, rank=rank, **settings.values())


def strategy_settings(name: str, values: dict) -> StrategySettings:
    """The settings of strategy ``name`` from ``values``, checked against its declaration."""
    cls = STRATEGIES.get(name)
    if cls is None:
        raise ConfigError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
    return cls.Settings.build(values, name, others={n: c.Settings for n, c in STRATEGIES.items() if n != name})


def declared_settings() -> dict[str, SettingInfo]:
    """Every setting any strategy declares, by name (one command-line flag each)."""
    return all_settings(STRATEGIES)


def describe_strategies() -> str:
    """Each strategy and its settings, as ``fedlora-server --strategies`` prints them."""
    common = {info.name for info in CommonSettings.declared()}

    def describe(info) -> str:
        return f"    {info.describe()}{' [sent to devices]' if info.device else ''}"

    lines = ["every strategy:"] + [describe(info) for info in CommonSettings.declared()]
    for name, cls in STRATEGIES.items():
        doc = (sys.modules[cls.__module__].__doc__ or "").strip()
        lines.append(f"{name}: {doc.splitlines()[0] if doc else cls.__name__}")
        lines.extend(describe(info) for info in cls.Settings.declared() if info.name not in common)
    return "\n".join(lines)
