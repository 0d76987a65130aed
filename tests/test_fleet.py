"""Many virtual devices over a Ray worker pool: a real run through a real Mosquitto with a real
exported bundle, client sampling, an availability trace and stragglers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from core.errors import ConfigError
from simulator.fleet import FleetSettings, availability_trace, straggler_slowdowns
from simulator.run import SimulateConfig, run_simulation


def test_two_hundred_virtual_devices_on_two_ray_workers(tmp_path, minilm_bundle, mosquitto):
    pytest.importorskip("ray", reason="the worker pool needs Ray (scripts/setup.sh installs it)")
    fleet = {"workers": 2, "participation": 0.05, "availability": 0.5, "stragglers": 0.2, "straggler_slowdown": 2.0}
    cfg = SimulateConfig(
        bundle=minilm_bundle,
        devices=200,
        split="iid",
        rounds=2,
        local_steps=2,
        batch_size=4,
        max_train=1000,
        eval_max=20,
        broker=mosquitto.url,
        out=tmp_path / "run",
        fleet=fleet,
    )
    result = run_simulation(cfg)
    history = result["history"]
    assert [h["round"] for h in history] == [1, 2]
    assert all(h["ok"] and h["selected"] == 10 and h["participants"] == 10 for h in history)
    assert all(h["online"] >= 10 and h["participation"] == 0.05 for h in history)
    events = [json.loads(x) for x in (cfg.out / "aggregator" / "events.jsonl").read_text().splitlines()]
    accepted = [(e["device"], e["round"]) for e in events if e["event"] == "update_accepted"]
    assert len(accepted) == 20
    # Each device that reported has its own persisted state: its round acknowledged, its adapter.
    for device, rnd in accepted:
        folder = cfg.out / "devices" / device / "state"
        assert json.loads((folder / "state.json").read_text())["last_round"] >= rnd
        assert (folder / "adapter.npz").stat().st_size > 0
    reported = {d for d, _ in accepted}
    untouched = [d for d in (cfg.out / "devices").iterdir() if d.name not in reported]
    assert len(untouched) == 200 - len(reported)
    assert not any((d / "state" / "adapter.npz").exists() for d in untouched)  # no one else trained
    report = (cfg.out / "report.md").read_text()
    assert "## Participation" in report and "workers 2" in report
    assert len(list((cfg.out / "workers").glob("worker*.log"))) == 2


def test_the_availability_trace_keeps_enough_devices_online_to_sample():
    trace = availability_trace(100, 20, 0.3, least=40, seed=0)
    assert trace.shape == (100, 21) and (trace.sum(axis=0) >= 40).all()
    assert 0.3 <= trace.mean() <= 0.5  # mostly 30% online, topped up where a round had too few
    slow = straggler_slowdowns(100, FleetSettings(stragglers=0.2, straggler_slowdown=5.0), seed=0)
    assert sorted(np.unique(slow)) == [1.0, 5.0] and (slow == 5.0).sum() == 20


def test_fleet_settings_refuse_what_cannot_run():
    with pytest.raises(ConfigError, match="participation"):
        FleetSettings(participation=0)
    assert FleetSettings(availability=0.5).resolved(10).workers >= 1  # a trace needs the pool
    assert FleetSettings().resolved(1000).workers >= 1 and FleetSettings().resolved(10).workers == 0
    with pytest.raises(ConfigError, match="mixed ranks"):
        SimulateConfig(devices=10, ranks=(2, 4), fleet={"workers": 2})


def test_simulate_flags_reach_the_fleet_settings_and_the_round_settings(monkeypatch):
    from pathlib import Path

    from simulator import cli, run

    seen = []
    monkeypatch.setattr(run, "run_simulation", lambda cfg: seen.append(cfg))
    argv = ["simulate", "--devices", "1000", "--participation", "0.05", "--availability", "0.3"]
    argv += ["--stragglers", "0.2", "--straggler-slowdown", "5", "--ray-address", "ray://head:10001"]
    assert cli.main(argv) == 0
    assert seen[0].fleet == {
        "participation": 0.05,
        "availability": 0.3,
        "stragglers": 0.2,
        "straggler_slowdown": 5.0,
        "ray_address": "ray://head:10001",
    }
    fleet = run.fleet_settings(seen[0])
    assert fleet.workers >= 1 and fleet.sampled(1000) == 50  # the pool, decided for 1,000 devices
    server = run.server_config(seen[0], "job", Path("b"), run.BrokerConfig(url="mqtt://x:1"), Path("s"))
    assert server.rounds.devices_per_round == 50 and server.rounds.min_devices == 50
    assert cli.main(["simulate", "--participation", "0"]) == 2  # refused before any work


def test_under_privacy_the_first_round_samples_from_the_whole_population():
    """Amplification by sampling counts the round's rate ``selected / online``: opening when the
    first ``sampled`` devices are online would sample from them alone (rate 1 in the worst case)."""
    from pathlib import Path

    from simulator import run

    fleet = {"workers": 2, "participation": 0.05}
    private = {"mode": "central", "noise_multiplier": 0.7, "clip_norm": 0.5}
    broker = run.BrokerConfig(url="mqtt://x:1")
    for privacy, least in (({}, 50), (private, 1000)):
        cfg = run.SimulateConfig(devices=1000, strategy="ffa-lora", fleet=fleet, privacy=privacy)
        server = run.server_config(cfg, "job", Path("b"), broker, Path("s"))
        assert server.rounds.devices_per_round == 50 and server.rounds.min_devices == least
    trace = run.SimulateConfig(devices=1000, strategy="ffa-lora", fleet={**fleet, "availability": 0.5}, privacy=private)
    assert run.server_config(trace, "job", Path("b"), broker, Path("s")).rounds.min_devices == 50  # the trace decides


def test_virtual_devices_sharing_a_session_each_train_from_their_own_adapter(tmp_path, minilm_bundle):
    """FedSA-LoRA's personal B, say: what the aggregator does not send stays each device's own."""
    from core.bundle import Bundle
    from edge_client.device import Device, DeviceConfig, SharedTrainer
    from edge_client.runtime import RuntimeOptions, Trainer

    bundle = Bundle(minilm_bundle)
    trainer = Trainer(bundle, options=RuntimeOptions(intra_op_threads=1))
    shared = SharedTrainer(bundle, trainer, trainer.get_adapter())
    data = tmp_path / "local.csv"
    data.write_text("text,label\n" + "".join(f"story {i},business\n" for i in range(10)))
    a, b = (
        Device(DeviceConfig(device_id=n, bundle=minilm_bundle, data=data, state_dir=tmp_path / n), shared=shared)
        for n in ("a", "b")
    )
    personal = {p.name for p in bundle.manifest.trainable if p.role != "lora_A"}
    own = {k: v + 0.5 for k, v in shared.initial.items()}
    a.state.save_adapter(own)  # a trained before; b never did
    sent = {k: v for k, v in shared.initial.items() if k not in personal}  # the global: the A factors only
    for device in (a, b):
        device.global_tensors = sent
    a._start_from_global()
    held = trainer.get_adapter()
    assert all(np.array_equal(held[k], own[k]) for k in personal)
    b._start_from_global()  # b's turn: the bundle's adapter, not a's
    held = trainer.get_adapter()
    assert all(np.array_equal(held[k], shared.initial[k]) for k in personal)
    assert all(np.array_equal(held[k], sent[k]) for k in sent)
