"""Each strategy declares its settings once (``Strategy.Settings``); the config file, the
environment, ``fedlora simulate``'s flags and the round announcement follow from that
declaration. These tests walk every declared setting, so a new one is covered without
touching this file (the Helm chart's part is in test_helm.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from core.errors import ConfigError, ProtocolError
from core.messages import DEVICE_SETTINGS, Announcement, RoundState, StrategyInfo, TrainInfo, parse_announcement
from server.config import ServerConfig, load_server_config
from server.strategies import STRATEGIES, declared_settings, describe_strategies, make_strategy, strategy_settings
from server.strategies.base import AdapterLayout, LoraModule
from server.strategies.settings import Range, SettingInfo, StrategySettings, setting

LAYOUT = AdapterLayout((LoraModule.named("m", in_features=3, out_features=2),), {"cls": (2,)})
DECLARED = [(name, info) for name, cls in STRATEGIES.items() for info in cls.Settings.declared()]
IDS = [f"{name}.{info.name}" for name, info in DECLARED]


def other_value(info: SettingInfo):
    """A valid value other than the default."""
    if info.kind is bool:
        return not info.default
    if info.choices:
        return next(c for c in info.choices if c != info.default)
    lo, hi = info.range.lo if info.range else -1e3, info.range.hi if info.range else 1e3
    lo, hi = max(lo, -1e3), min(hi, 1e3)
    value = (lo + hi) / 2 if (lo + hi) / 2 != info.default else (lo + 3 * hi) / 4
    return int(value) if info.kind is int else float(value)


def bad_values(info: SettingInfo) -> list:
    out: list = [[1, 2], {"x": 1}]
    if info.range is not None:
        out += [
            v
            for v in (info.range.lo, info.range.hi)
            if math.isfinite(v) and (info.range.lo_open if v == info.range.lo else info.range.hi_open)
        ]
        out += [info.range.lo - 1] if math.isfinite(info.range.lo) else []
        out += [info.range.hi + 1] if math.isfinite(info.range.hi) else []
        out += [float("nan")] if info.kind is float else []
    if info.choices:
        out.append("no-such-choice")
    return out


def test_some_strategies_declare_settings():
    assert {name for name, _ in DECLARED} >= {"fedavg", "hetlora", "flexlora-delta"}


@pytest.mark.parametrize("name, info", DECLARED, ids=IDS)
def test_each_setting_is_declared_with_help_and_a_valid_default(name, info):
    assert info.help and len(info.help) > 20
    assert info.kind in (bool, int, float, str)
    assert info.range is None or info.kind in (int, float)
    assert not info.choices or info.kind is str
    defaults = STRATEGIES[name].Settings()
    assert getattr(defaults, info.name) == info.default  # the default passes its own checks
    s = make_strategy(name, LAYOUT, rank=4)
    assert getattr(s.settings, info.name) == info.default


@pytest.mark.parametrize("name, info", DECLARED, ids=IDS)
def test_each_setting_reaches_the_strategy_from_file_env_and_overrides(name, info, tmp_path, monkeypatch):
    value = other_value(info)
    path = tmp_path / "server.json"
    path.write_text(json.dumps({"bundle": "/b", "strategy": name, "strategy_settings": {info.name: value}}))
    assert load_server_config(path).strategy_settings[info.name] == value

    monkeypatch.setenv(
        f"FEDLORA_STRATEGY_SETTINGS_{info.name.upper()}", str(value).lower() if info.kind is bool else str(value)
    )
    cfg = load_server_config(overrides={"bundle": "/b", "strategy": name})
    assert cfg.strategy_settings[info.name] == value  # converted from the environment's string
    s = make_strategy(name, LAYOUT, rank=4, **cfg.strategy_settings)
    assert getattr(s.settings, info.name) == value

    cfg = load_server_config(
        overrides={"bundle": "/b", "strategy": name, "strategy_settings": {info.name: info.default}}
    )
    assert cfg.strategy_settings[info.name] == info.default  # overrides beat the environment


@pytest.mark.parametrize("name, info", DECLARED, ids=IDS)
def test_each_setting_refuses_bad_values_naming_itself(name, info):
    for bad in bad_values(info):
        with pytest.raises(ConfigError, match=info.name):
            ServerConfig(bundle="/b", strategy=name, strategy_settings={info.name: bad})
        with pytest.raises(ConfigError, match=info.name):
            make_strategy(name, LAYOUT, rank=4, **{info.name: bad})


@pytest.mark.parametrize("name, info", DECLARED, ids=IDS)
def test_a_setting_given_to_another_strategy_is_refused_naming_its_owner(name, info):
    for other, cls in STRATEGIES.items():
        if info.name in {i.name for i in cls.Settings.declared()}:
            continue
        with pytest.raises(ConfigError, match=f"setting of {name}"):
            ServerConfig(bundle="/b", strategy=other, strategy_settings={info.name: other_value(info)})


@pytest.mark.parametrize("name, info", DECLARED, ids=IDS)
def test_each_setting_has_a_simulate_flag(name, info, monkeypatch):
    from simulator import cli, run

    seen = {}
    monkeypatch.setattr(run, "run_simulation", lambda cfg: seen.setdefault("cfg", cfg))
    value = other_value(info)
    text = str(value).lower() if info.kind is bool else str(value)
    assert cli.main(["simulate", "--strategy", name, info.flag, text]) == 0
    assert seen["cfg"].strategy_settings == {info.name: value}
    assert info.flag in describe_flags()


def describe_flags() -> str:
    import contextlib
    import io

    from simulator import cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli.main(["simulate", "--help"])
    return out.getvalue()


@pytest.mark.parametrize("name, info", DECLARED, ids=IDS)
def test_device_settings_travel_in_the_announcement_within_the_devices_bounds(name, info):
    s = make_strategy(name, LAYOUT, rank=4, **{info.name: other_value(info)})
    sent = s.device_settings()
    if not info.device:
        assert info.name not in sent  # the aggregator's own business
        return
    assert info.name in DEVICE_SETTINGS, f"{info.name} is sent to devices, but core.messages does not know it"
    lo, hi, default = DEVICE_SETTINGS[info.name]
    assert default == info.default and info.range is not None and lo <= info.range.lo and info.range.hi <= hi
    ann = Announcement(
        "j",
        RoundState.OPEN,
        1,
        0,
        4,
        deadline=10.0,
        selected=("d1",),
        strategy=StrategyInfo(name, s.trains_a, sent),
        train=TrainInfo(1, 1, 0.001),
    )
    assert parse_announcement(ann.to_bytes()).strategy.settings == {info.name: other_value(info)}
    assert make_strategy(name, LAYOUT, rank=4).device_settings() == {}  # defaults are not sent


def test_the_device_refuses_unknown_or_out_of_range_strategy_settings():
    def announce(strategy: dict) -> bytes:
        ann = Announcement(
            "j",
            RoundState.OPEN,
            1,
            0,
            4,
            deadline=10.0,
            selected=("d1",),
            strategy=StrategyInfo("hetlora"),
            train=TrainInfo(1, 1, 0.001),
        )
        body = ann.to_json()
        body["strategy"].update(strategy)
        return json.dumps(body).encode()

    assert parse_announcement(announce({"prune_threshold": 0.25})).strategy.prune_threshold == 0.25
    with pytest.raises(ProtocolError, match="prune_threshold"):
        parse_announcement(announce({"prune_threshold": 7.0}))
    with pytest.raises(ProtocolError, match="unknown field"):
        parse_announcement(announce({"rank_norm_power": 0.5}))  # not a device setting


def test_one_flag_serves_a_name_two_strategies_declare_alike_and_different_kinds_are_refused():
    from dataclasses import dataclass

    from server.strategies.settings import all_settings

    @dataclass(frozen=True)
    class A(StrategySettings):
        mix: float = setting(0.5, range=Range(0, 1), help="how much of one thing and the other")

    @dataclass(frozen=True)
    class B(StrategySettings):
        mix: str = setting("x", choices=("x", "y"), help="the same name, another kind of value")

    class SA:
        Settings = A

    class SB:
        Settings = B

    assert list(all_settings({"a": SA, "a2": SA})) == ["mix"]
    with pytest.raises(ConfigError, match="declared as float and str"):
        all_settings({"a": SA, "b": SB})


def test_ranges_print_and_contain_as_written():
    r = Range(0.0, 1.0, hi_open=True)
    assert str(r) == "[0, 1)" and 0.0 in r and 0.999 in r and 1.0 not in r and -0.1 not in r
    assert str(Range(0.0, math.inf, lo_open=True)) == "(0, inf]" and 0.0 not in Range(0.0, lo_open=True)


def test_the_server_lists_every_strategy_and_setting():
    text = describe_strategies()
    for name in STRATEGIES:
        assert f"\n{name}: " in f"\n{text}"
    for info in declared_settings().values():
        assert info.name in text and info.help in text


def test_strategy_settings_are_completed_with_defaults_and_checked_before_any_work():
    from server.strategies.base import CommonSettings

    common = CommonSettings().values()
    cfg = ServerConfig(bundle="/b", strategy="flexlora-delta")
    assert cfg.strategy_settings == {**common, "rank_norm_power": 0.0}
    assert strategy_settings("fedavg", {"server_lr": "0.5"}).values() == {**common, "server_lr": 0.5}
    with pytest.raises(ConfigError, match="unknown strategy"):
        strategy_settings("fedprox", {})
    from simulator.run import SimulateConfig

    with pytest.raises(ConfigError, match="rank_norm_power"):
        SimulateConfig(strategy="flexlora-delta", strategy_settings={"rank_norm_power": 9})


def test_fedavg_server_lr_setting_moves_the_global_part_of_the_way():
    from server.strategies.base import ClientUpdate, GlobalModel

    m = LAYOUT.modules[0]
    glob = GlobalModel(
        1, {m.a: np.zeros((1, 3), np.float32), m.b: np.zeros((2, 1), np.float32), "cls": np.zeros(2, np.float32)}
    )
    update = ClientUpdate(
        "d",
        1,
        1,
        1,
        {m.a: np.ones((1, 3), np.float32), m.b: np.ones((2, 1), np.float32), "cls": np.ones(2, np.float32)},
    )
    cfg = load_server_config(overrides={"bundle": "/b", "strategy": "fedavg", "strategy_settings": {"server_lr": 0.25}})
    s = make_strategy("fedavg", LAYOUT, rank=1, **cfg.strategy_settings)
    out = s.finalize(s.accumulate(s.new_partial(), update), glob)
    np.testing.assert_allclose(out.tensors[m.a], 0.25)
