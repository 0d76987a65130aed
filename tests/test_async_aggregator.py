"""Async rounds (FedBuff) in the real aggregator against a real Mosquitto: hand-driven devices
report at different times, a version is made every ``buffer_size`` updates, stale updates count
by the staleness formula, updates beyond the bound are refused with the reason, and a restart in
the middle of a buffer resumes it exactly."""

import re
import threading

import numpy as np
import pytest
from test_aggregator import FakeDevice, update_payload, wait_for

from core.bundle import Bundle
from core.transport import BrokerConfig, MqttLink
from edge_client.runtime import read_parameters
from server.aggregator import Aggregator
from server.async_rounds import staleness_weight
from server.config import ServerConfig, TrainSettings
from server.rounds import RoundSettings

JOB = "async"


def start(bundle_dir, state_dir, url, **rounds):
    cfg = ServerConfig(
        job=JOB,
        bundle=bundle_dir,
        state_dir=state_dir,
        http_port=0,
        broker=BrokerConfig(url=url, protocol="3.1.1"),
        rounds=RoundSettings(
            **{
                "rounds": 3,
                "min_devices": 1,
                "round_timeout": 600,
                "norm_clip_multiple": 0,
                "mode": "async",
                "buffer_size": 2,
                "max_staleness": 1,
                **rounds,
            }
        ),
        train=TrainSettings(local_steps=1),
    )
    link = MqttLink(cfg.broker, client_id=f"agg-{JOB}").connect()
    agg = Aggregator(cfg, link)
    stop = threading.Event()
    thread = threading.Thread(target=agg.run, args=(stop,), daemon=True)
    thread.start()
    return agg, stop, thread, link


def stop_aggregator(stop, thread, link):
    stop.set()
    thread.join(20)
    assert not thread.is_alive()
    link.close()


def test_versions_every_k_updates_staleness_weights_refusals_and_a_restart_mid_buffer(
    tmp_path, minilm_bundle, mosquitto
):
    bundle = Bundle(minilm_bundle)
    m = bundle.manifest
    state = tmp_path / "state"
    agg, stop, thread, link = start(minilm_bundle, state, mosquitto.url)
    devices = {d: FakeDevice(mosquitto.url, JOB, d) for d in ("d1", "d2", "d3", "d4")}
    rng = np.random.default_rng(0)
    changes = {}

    def change(key):
        changes[key] = {p.name: (0.01 * rng.standard_normal(p.shape)).astype(np.float32) for p in m.trainable}
        return changes[key]

    def send(device, rnd, base):
        dev = devices[device]
        before = dev.ack_count()
        tensors = changes[(device, rnd)] if (device, rnd) in changes else change((device, rnd))
        dev.send(update_payload(bundle, JOB, device, rnd, tensors=tensors, base_version=base))
        wait_for(lambda: dev.ack_count() > before, what=f"the ack of {device}'s round {rnd}")
        return dev.acks[-1]

    try:
        for dev in devices.values():
            dev.online()
        ann = wait_for(devices["d1"].open_round, what="the first buffer")
        assert ann["v"] == 2 and ann["mode"] == "async" and ann["round"] == 1 and ann["global_version"] == 0
        assert ann["selected"] == []  # every device may train
        v0 = read_parameters(bundle)

        # d1 and d2 are fast: version 1 from their two updates
        assert send("d1", 1, 0)["result"] == "accepted"
        assert agg.coordinator.version == 0  # one update is not a buffer of two
        assert send("d2", 1, 0)["result"] == "accepted"
        wait_for(lambda: agg.coordinator.version == 1, what="version 1")
        ann = wait_for(lambda: (a := devices["d1"].open_round()) and a["round"] == 2 and a, what="buffer 2")
        assert ann["global_version"] == 1
        # d3 is slow: it trained on version 0 and reports now, one version behind
        assert send("d3", 1, 0)["result"] == "accepted"
        assert send("d1", 2, 1)["result"] == "accepted"
        wait_for(lambda: agg.coordinator.version == 2, what="version 2")
        # d4 is slower: two versions behind, beyond max_staleness 1
        refused = send("d4", 1, 0)
        assert refused["result"] == "rejected" and refused["reason"] == "too_stale"
        assert "2 versions behind 2" in refused["detail"]
        assert send("d2", 2, 1)["result"] == "accepted"  # one behind: into buffer 3
        assert agg.coordinator.open.round == 3 and agg.coordinator.open.staleness == [1]
        stop_aggregator(stop, thread, link)

        # a restart in the middle of buffer 3 resumes it and the version exactly
        agg, stop, thread, link = start(minilm_bundle, state, mosquitto.url)
        assert agg.coordinator.version == 2 and agg.coordinator.open.round == 3
        assert list(agg.coordinator.open.accepted) == ["d2/2"] and agg.coordinator.open.staleness == [1]
        again = send("d2", 2, 1)  # a resend of what counted before the restart changes nothing
        assert again["result"] == "accepted" and again["reason"] == "duplicate"
        assert send("d3", 3, 2)["result"] == "accepted"
        wait_for(lambda: agg.coordinator.finished, what="version 3, the last")

        w = staleness_weight(1, "polynomial", 0.5, 4)  # the defaults: 1 / sqrt(2)
        expected = {}
        for name, value in v0.items():
            x = value.astype(np.float64)
            x = x + (changes[("d1", 1)][name] + changes[("d2", 1)][name]) / 2  # equal weights (10 examples)
            x = x + (w * changes[("d3", 1)][name] + changes[("d1", 2)][name]) / 2
            x = x + (w * changes[("d2", 2)][name] + changes[("d3", 3)][name]) / 2
            expected[name] = x
        for name, x in expected.items():
            np.testing.assert_allclose(agg.global_adapter[name], x, rtol=1e-5, atol=1e-6, err_msg=name)
        rows = [
            {k: h[k] for k in ("round", "version", "buffer_updates", "staleness_mean", "staleness_max")}
            for h in agg.history
        ]
        assert rows == [
            {"round": 1, "version": 1, "buffer_updates": 2, "staleness_mean": 0.0, "staleness_max": 0},
            {"round": 2, "version": 2, "buffer_updates": 2, "staleness_mean": 0.5, "staleness_max": 1},
            {"round": 3, "version": 3, "buffer_updates": 2, "staleness_mean": 0.5, "staleness_max": 1},
        ]
        assert all(h["reason"] == "buffer_full" for h in agg.history)
        events = agg.store.events()
        accepted = [e for e in events if e["event"] == "update_accepted"]
        assert [(e["device"], e["round"], e["staleness"]) for e in accepted] == [
            ("d1", 1, 0),
            ("d2", 1, 0),
            ("d3", 1, 1),
            ("d1", 2, 0),
            ("d2", 2, 1),
            ("d3", 3, 0),
        ]
        assert any(e["event"] == "update_rejected" and e["reason"] == "too_stale" for e in events)
        from prometheus_client import generate_latest

        text = generate_latest(agg.metrics.registry).decode()
        assert 'fedlora_buffer_staleness{stat="mean"} 0.5' in text  # buffer 3, applied since the restart
        assert 'fedlora_buffer_staleness{stat="max"} 1.0' in text
        assert "fedlora_buffer_updates 0.0" in text

        def finished_announcement():
            devices["d1"].pump()
            last = devices["d1"].rounds[-1]
            return last if last["state"] == "finished" else None

        finished = wait_for(finished_announcement, what="the finished announcement")
        assert finished["mode"] == "async" and finished["global_version"] == 3
    finally:
        stop_aggregator(stop, thread, link)
        for dev in devices.values():
            dev.link.close()


def test_real_devices_of_different_speeds_make_a_version_every_k_updates(
    tmp_path, minilm_bundle, edge_python, mosquitto
):
    """Three real device processes on the small bundle; one is a straggler whose updates go out
    only after a newer version exists, so they arrive stale and count by the formula."""
    import json
    from pathlib import Path

    from simulator.run import SimulateConfig, run_simulation

    straggler = [edge_python, str(Path(__file__).with_name("straggler_device.py"))]
    cfg = SimulateConfig(
        bundle=minilm_bundle,
        dataset="bbc-news",
        devices=3,
        rounds=3,
        local_steps=2,
        batch_size=4,
        max_train=60,
        eval_max=20,
        split="iid",
        out=tmp_path / "run",
        broker=mosquitto.url,
        device_python=edge_python,
        round_settings={"mode": "async", "buffer_size": 2},
        device_commands={2: straggler},
    )
    result = run_simulation(cfg)
    history = result["history"]
    assert [h["version"] for h in history] == [1, 2, 3]
    assert all(h["ok"] and h["reason"] == "buffer_full" and h["buffer_updates"] == 2 for h in history)
    assert all(0.0 <= h["eval"]["accuracy"] <= 1.0 for h in history)
    events = [json.loads(line) for line in (cfg.out / "aggregator" / "events.jsonl").read_text().splitlines()]
    accepted = [e for e in events if e["event"] == "update_accepted"]
    assert len(accepted) == 6
    late = [e for e in accepted if e["device"] == "dev002"]
    assert late and all(e["staleness"] >= 1 for e in late)  # the straggler's, stale by construction
    for e in accepted:
        assert e["staleness_weight"] == pytest.approx((1 + e["staleness"]) ** -0.5, abs=1e-6)
    assert max(h["staleness_max"] for h in history) >= 1
    report = (cfg.out / "report.md").read_text()
    assert "## Asynchronous rounds: staleness per version" in report
    assert re.search(r"^\| 3 \| [\d.]+ \| [\d.]+ \| 2 \|", report, re.M)  # version, wall time, accuracy, updates


def test_a_burst_of_updates_never_overfills_a_buffer(tmp_path, minilm_bundle, mosquitto):
    """Three updates arrive together (one batch for the group commit): the buffer of two is
    applied after the second, and the third goes into the next buffer, one version stale."""
    bundle = Bundle(minilm_bundle)
    agg, stop, thread, link = start(minilm_bundle, tmp_path / "state", mosquitto.url, rounds=0)
    devices = [FakeDevice(mosquitto.url, JOB, d) for d in ("b1", "b2", "b3")]
    try:
        for dev in devices:
            dev.online()
        wait_for(devices[0].open_round, what="the first buffer")
        for dev in devices:
            dev.send(update_payload(bundle, JOB, dev.id, 1, base_version=0))
        for dev in devices:
            wait_for(lambda d=dev: d.ack_count() >= 1, what=f"the ack of {dev.id}")
            assert dev.acks[-1]["result"] == "accepted"
        assert agg.history[0]["buffer_updates"] == 2 and agg.coordinator.version == 1
        assert len(agg.coordinator.open.accepted) == 1 and agg.coordinator.open.staleness == [1]
    finally:
        stop_aggregator(stop, thread, link)
        for dev in devices:
            dev.link.close()
