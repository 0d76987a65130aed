"""Configuration loading shared by the device and the aggregator.

One dataclass per role, filled from (lowest to highest precedence) its defaults, a JSON or
YAML file, environment variables ``<PREFIX>_<FIELD>`` (``<PREFIX>_BROKER_<FIELD>`` for the
nested broker settings, ``<PREFIX>_<FIELD>_<KEY>`` for a key of a mapping field) and explicit
overrides. Values are converted to the field's type
here, and the dataclass's own ``__post_init__`` validates ranges, so a bad value fails with
a message naming the key before any work starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from core.errors import ConfigError

T = TypeVar("T")


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as exc:
            raise ConfigError(f"{path}: YAML needs pyyaml; use a .json config on the device") from exc
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML ({exc})") from exc
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def _convert(key: str, value: Any, kind: Any) -> Any:
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin is typing.Union or origin is types.UnionType:
        if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _convert(key, value, inner[0]) if len(inner) == 1 else value
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if kind in (int, float, str):
            if kind is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return kind(value)
        if kind is Path:
            return Path(value)
        if kind is dict or origin is dict:
            if not isinstance(value, dict):
                raise ValueError(value)
            return dict(value)
        if origin is tuple:
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(_convert(key, v.strip() if isinstance(v, str) else v, args[0]) for v in items if v != "")
    except (TypeError, ValueError):
        raise ConfigError(f"config key {key!r}: {value!r} is not a valid {getattr(kind, '__name__', kind)}") from None
    return value


def _is_section(kind: Any) -> bool:
    """A nested settings dataclass (``broker``, ``rounds``, ...)."""
    return isinstance(kind, type) and dataclasses.is_dataclass(kind)


def build(cls: type[T], values: dict, where: str = "config") -> T:
    """Build dataclass ``cls`` from a mapping, converting types and rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(typing.cast(Any, cls))}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} (known: {sorted(fields)})")
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        kind: Any = hints[name]
        if _is_section(kind) and isinstance(value, dict):
            kwargs[name] = build(kind, value, f"{where}.{name}")
        elif _is_section(kind) and dataclasses.is_dataclass(value):
            kwargs[name] = value
        else:
            kwargs[name] = _convert(f"{where}.{name}", value, kind)
    return cls(**kwargs)


def _env_values(cls: type, prefix: str) -> dict:
    hints = typing.get_type_hints(cls)
    out: dict = {}
    for f in dataclasses.fields(cls):
        kind: Any = hints[f.name]
        if _is_section(kind):
            nested = _env_values(kind, f"{prefix}_{f.name.upper()}")
            if nested:
                out[f.name] = nested
        elif kind is dict or typing.get_origin(kind) is dict:
            start = f"{prefix}_{f.name.upper()}_"
            keys = {
                k[len(start) :].lower(): v for k, v in os.environ.items() if k.startswith(start) and len(k) > len(start)
            }
            if keys:
                out[f.name] = keys
        else:
            env = os.environ.get(f"{prefix}_{f.name.upper()}")
            if env is not None:
                out[f.name] = env
    return out


def _deep_merge(base: dict, top: dict) -> dict:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load(
    cls: type[T], path: str | Path | None = None, env_prefix: str | None = None, overrides: dict | None = None
) -> T:
    values: dict = read_config_file(path) if path else {}
    if env_prefix:
        values = _deep_merge(values, _env_values(cls, env_prefix))
    if overrides:
        values = _deep_merge(values, {k: v for k, v in overrides.items() if v is not None})
    return build(cls, values, where=str(path) if path else cls.__name__)


def to_dict(obj) -> dict:
    """JSON-able dict of a config dataclass (paths as strings; secrets are the caller's concern)."""

    def convert(v):
        if dataclasses.is_dataclass(v):
            return {f.name: convert(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, tuple):
            return [convert(x) for x in v]
        return v

    return convert(obj)
