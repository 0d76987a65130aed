"""How a strategy declares its settings: once, with type, default, range and help text.

Each ``Strategy`` subclass names a frozen dataclass ``Settings`` (a ``StrategySettings``)
whose fields are made with ``setting(...)``. Everything else follows from that declaration:

* the aggregator's config: ``strategy_settings`` (a mapping, in the file, as
  ``FEDLORA_STRATEGY_SETTINGS_<NAME>`` environment variables, or in the Helm values) is
  built into the chosen strategy's ``Settings``, which converts and range-checks each value
  and refuses a key the strategy does not declare (naming the strategy that does, if any);
* ``fedlora simulate`` has one flag per declared setting (``--rank-norm-power``);
* ``fedlora-server --strategies`` prints every strategy's settings;
* settings marked ``device=True`` travel in the round announcement's ``strategy`` object
  (``Strategy.device_settings``), where ``core.messages`` bounds them.

Adding a knob to a strategy is a field in its ``Settings`` and a test.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from core.config import build
from core.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """An interval of allowed values; ``lo_open`` / ``hi_open`` exclude an end."""

    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below

    def __str__(self) -> str:
        def end(x: float) -> str:
            return "inf" if x == math.inf else "-inf" if x == -math.inf else f"{x:g}"

        return f"{'(' if self.lo_open else '['}{end(self.lo)}, {end(self.hi)}{')' if self.hi_open else ']'}"


def setting(
    default: Any, *, help: str, range: Range | None = None, choices: tuple[str, ...] = (), device: bool = False
) -> Any:
    """One declared setting: ``default``, a one-line ``help``, and for numbers an allowed
    ``range``, for strings the allowed ``choices``. ``device``: the devices need it, so it is
    sent in the round announcement (``core.messages`` must know it and bound it)."""
    return dataclasses.field(
        default=default, metadata={"help": help, "range": range, "choices": tuple(choices), "device": device}
    )


@dataclass(frozen=True)
class SettingInfo:
    """A declared setting as the config, the command lines and the docs see it."""

    name: str
    kind: type
    default: Any
    help: str
    range: Range | None
    choices: tuple[str, ...]
    device: bool

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def describe(self) -> str:
        allowed = f" in {self.range}" if self.range else f", one of {', '.join(self.choices)}" if self.choices else ""
        return f"{self.name} ({self.kind.__name__}{allowed}; default {self.default!r}): {self.help}"


@dataclass(frozen=True)
class StrategySettings:
    """Base of every strategy's ``Settings``: validates each declared field on construction."""

    def __post_init__(self) -> None:
        for info in self.declared():
            value = getattr(self, info.name)
            if info.kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                object.__setattr__(self, info.name, value)
            if not isinstance(value, info.kind) or (info.kind is not bool and isinstance(value, bool)):
                raise ConfigError(f"{info.name} must be a {info.kind.__name__}, got {value!r}")
            if info.range is not None and not (isinstance(value, (int, float)) and value in info.range):
                raise ConfigError(f"{info.name} must be in {info.range}, got {value!r}")
            if info.choices and value not in info.choices:
                raise ConfigError(f"{info.name} must be one of {info.choices}, got {value!r}")

    @classmethod
    def declared(cls) -> tuple[SettingInfo, ...]:
        hints = typing.get_type_hints(cls)
        return tuple(
            SettingInfo(
                f.name,
                hints[f.name],
                f.default,
                f.metadata.get("help", ""),
                f.metadata.get("range"),
                f.metadata.get("choices", ()),
                f.metadata.get("device", False),
            )
            for f in dataclasses.fields(cls)
        )

    @classmethod
    def build(
        cls, values: Mapping[str, Any], strategy: str, others: Mapping[str, type[StrategySettings]] | None = None
    ) -> StrategySettings:
        """``strategy``'s settings from a mapping (strings are converted, as from environment
        variables). A key it does not declare is refused; when another strategy declares it
        (``others``: name -> Settings), the message says which and what it does."""
        names = {info.name for info in cls.declared()}
        known = ", ".join(sorted(names)) or "none"
        for key in values:
            if key in names:
                continue
            owners = [(name, info) for name, s in (others or {}).items() for info in s.declared() if info.name == key]
            if owners:
                name, info = owners[0]
                raise ConfigError(
                    f"strategy_settings.{key} is a setting of {name}, not of {strategy} "
                    f"({info.help}); {strategy}'s settings: {known}"
                )
            raise ConfigError(f"strategy_settings.{key}: {strategy} has no such setting; its settings: {known}")
        try:
            return build(cls, dict(values), where=f"strategy_settings ({strategy})")
        except ConfigError as exc:
            raise ConfigError(f"{strategy}: {exc}") from None

    def values(self) -> dict[str, Any]:
        return {info.name: getattr(self, info.name) for info in self.declared()}

    def device_values(self) -> dict[str, Any]:
        """The settings devices need, where they differ from the default (an absent one is the
        default on the device too)."""
        return {
            i.name: getattr(self, i.name) for i in self.declared() if i.device and getattr(self, i.name) != i.default
        }


def all_settings(strategies: Mapping[str, Any]) -> dict[str, SettingInfo]:
    """Every declared setting over ``strategies`` (name -> Strategy class), by setting name.
    Two strategies may declare the same name only with the same type (one flag serves both)."""
    out: dict[str, SettingInfo] = {}
    for cls in strategies.values():
        for info in cls.Settings.declared():
            seen = out.get(info.name)
            if seen is not None and seen.kind is not info.kind:
                raise ConfigError(f"setting {info.name!r} is declared as {seen.kind.__name__} and {info.kind.__name__}")
            out.setdefault(info.name, info)
    return out
