import json

import pytest

from core.config import load
from core.errors import ConfigError, ProtocolError
from core.transport import BrokerConfig
from edge_client.device import DeviceConfig, load_device_config
from server.config import ServerConfig, TrainSettings, load_server_config


def test_file_then_env_then_overrides(tmp_path, monkeypatch):
    path = tmp_path / "server.yaml"
    path.write_text("job: j1\nbundle: /b\nrounds:\n  rounds: 5\n  min_devices: 3\nbroker:\n  url: mqtt://h:1883\n")
    monkeypatch.setenv("FEDLORA_ROUNDS_ROUNDS", "7")
    monkeypatch.setenv("FEDLORA_BROKER_USERNAME", "agg")
    cfg = load_server_config(path, overrides={"job": "j2"})
    assert (cfg.job, cfg.rounds.rounds, cfg.rounds.min_devices, cfg.broker.url, cfg.broker.username) == (
        "j2",
        7,
        3,
        "mqtt://h:1883",
        "agg",
    )


@pytest.mark.parametrize(
    "values, message",
    [
        ({"bundle": "/b", "strategy": "nope"}, "strategy"),
        ({"bundle": "/b", "rounds": {"rounds": "many"}}, "rounds.rounds"),
        ({"bundle": "/b", "http_port": 70000}, "http_port"),
        ({"bundle": "/b", "codec": "zip"}, "codec"),
        ({"bundle": "/b", "typo": 1}, "unknown key"),
        ({}, "bundle is required"),
        ({"bundle": "/b", "broker": {"url": "http://x"}}, "broker url"),
        ({"bundle": "/b", "train": {"lr": 5}}, "lr"),
        ({"bundle": "/b", "strategy": "hetlora", "strategy_settings": {"prune_threshold": 1.0}}, "prune_threshold"),
        (
            {"bundle": "/b", "strategy": "fedavg", "strategy_settings": {"prune_threshold": 0.5}},
            "HetLoRA's rank self-pruning",
        ),
        (
            {"bundle": "/b", "strategy": "flexlora-delta", "strategy_settings": {"rank_norm_power": 3}},
            "rank_norm_power must be in",
        ),
        (
            {"bundle": "/b", "strategy": "flexlora", "strategy_settings": {"rank_norm_power": 0.5}},
            "flexlora-delta's rank normalization",
        ),
        ({"bundle": "/b", "strategy": "fedavg", "strategy_settings": {"server_lr": "fast"}}, "server_lr"),
        ({"bundle": "/b", "strategy": "fedavg", "strategy_settings": {"serverlr": 0.5}}, "fedavg has no such setting"),
        ({"bundle": "/b", "strategy": "fedavg", "strategy_settings": [0.5]}, "strategy_settings"),
        ({"bundle": "/b", "chunk_repair_after_s": 0.1}, "chunk_repair_after_s must be 0"),
        ({"bundle": "/b", "chunk_repair_after_s": -1}, "chunk_repair_after_s must be 0"),
    ],
)
def test_bad_server_values_fail_with_the_key(tmp_path, values, message):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(values))
    with pytest.raises(ConfigError, match=message):
        load(ServerConfig, path)


def test_device_config_checks(tmp_path):
    with pytest.raises(ConfigError, match="device_id"):
        load_device_config(overrides={"bundle": "b", "data": "d"})
    with pytest.raises(ConfigError, match="device id"):
        load_device_config(overrides={"device_id": "a/b", "bundle": "b", "data": "d"})
    with pytest.raises(ConfigError, match="does not exist"):
        load_device_config(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="invalid JSON"):
        load_device_config(tmp_path / "bad.json")
    cfg = load_device_config(overrides={"device_id": "d1", "bundle": "b", "data": "d", "threads": "2"})
    assert isinstance(cfg, DeviceConfig) and cfg.threads == 2


def test_broker_config_validation():
    assert BrokerConfig(url="mqtts://h").port == 8883
    for kw in ({"url": "h:1"}, {"protocol": "4"}, {"max_packet_size": 10}):
        with pytest.raises(ConfigError):
            BrokerConfig(**kw)


def test_rank_dependent_learning_rate_is_checked_on_both_sides():
    from core.messages import parse_announcement
    from edge_client.device import round_lr

    with pytest.raises(ConfigError, match="lr_rank_power"):
        TrainSettings(lr_rank_power=3)
    with pytest.raises(ConfigError, match="lr_rank_power"):
        TrainSettings(lr_rank_power=-0.5)
    from core.messages import TrainInfo

    def info(lr, power=0.0):
        return TrainInfo(local_steps=1, batch_size=1, lr=lr, lr_rank_power=power)

    assert round_lr(info(0.002), 16, 2) == 0.002
    assert round_lr(info(0.002, 0.5), 16, 4) == pytest.approx(0.004)
    assert round_lr(info(0.002, 1.0), 16, 16) == pytest.approx(0.002)
    for bad in (info(0.002, 5), info(2.0), info(-1)):
        with pytest.raises(ProtocolError, match="out of range"):
            round_lr(bad, 16, 4)
    # and the parser refuses them before round_lr sees them
    ann = {
        "v": 1,
        "job": "j",
        "state": "open",
        "round": 1,
        "global_version": 0,
        "rank": 16,
        "deadline": 1.0,
        "selected": ["d"],
        "strategy": {"name": "fedavg"},
        "train": {"local_steps": 1, "batch_size": 1, "lr": 0.1},
    }
    for train in ({"lr_rank_power": 5}, {"lr": 2.0}, {"lr": -1}):
        with pytest.raises(ProtocolError, match="outside"):
            parse_announcement(json.dumps({**ann, "train": {**ann["train"], **train}}).encode())


def test_the_learning_rate_defaults_to_the_bundle_tasks_rate():
    from core.bundle import DEFAULT_LR

    assert TrainSettings().lr == 0  # 0: resolved per task by the aggregator
    assert TrainSettings().for_task("seq-cls").lr == DEFAULT_LR["seq-cls"] == 5e-3
    assert TrainSettings().for_task("causal-lm").lr == DEFAULT_LR["causal-lm"] == 1e-3
    assert TrainSettings(lr=3e-4).for_task("seq-cls").lr == 3e-4  # a configured rate stays
    for bad in (-1e-3, 1.0, 2.0):
        with pytest.raises(ConfigError, match=r"train.lr must be in \[0, 1\)"):
            TrainSettings(lr=bad)


def test_simulate_defaults_devices_rate_and_the_centralized_references_rate_per_task():
    from simulator.run import SimulateConfig

    cls = SimulateConfig()
    assert (cls.lr, cls.centralized_lr) == (5e-3, 2e-3)
    llm = SimulateConfig(task="causal-lm")
    assert (llm.lr, llm.centralized_lr) == (1e-3, 1e-3)
    assert SimulateConfig(lr=1e-2, centralized_lr=1e-4).centralized_lr == 1e-4
    for bad in (0.0, -1.0, 1.5):
        with pytest.raises(ConfigError, match="centralized_lr"):
            SimulateConfig(centralized_lr=bad)
