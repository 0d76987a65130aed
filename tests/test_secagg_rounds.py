"""Secure aggregation in real rounds: the real aggregator, a real Mosquitto, ten devices running
the device's own secure session (``devkit.secagg_device``: no trainer, a known change each).

The unmasked sum is the devices' code sum exactly (mod 2^32) and decodes to the plain sum
within the quantization bound, with 0, 1 and 3 of 10 devices dropping after their shares went
out; hostile secure-aggregation messages are refused with a reason and counted while the round
completes; an aggregator restarted mid-round keeps the masked inputs it acknowledged."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from core.bundle import Bundle
from core.messages import SecaggKeys, SecaggReveal
from core.protocol import RING_CODEC, Envelope, Topics, encode_envelope, split_chunks
from core.secagg import Quantizer
from core.transport import BrokerConfig, MqttLink
from devkit.secagg_device import ProtocolDevice, wait_until
from edge_client.runtime import read_parameters
from server.aggregator import Aggregator
from server.config import ServerConfig, TrainSettings
from server.rounds import RoundSettings
from server.secure_rounds import SecureAggregationSettings

JOB = "sa"
DEVICES = [f"d{i}" for i in range(10)]


def server_config(bundle_dir, state_dir, url, min_devices=10, setup_timeout_s=20.0):
    return ServerConfig(
        job=JOB,
        bundle=bundle_dir,
        state_dir=state_dir,
        http_port=0,
        broker=BrokerConfig(url=url, protocol="3.1.1"),
        rounds=RoundSettings(rounds=1, min_devices=min_devices, round_timeout=90, norm_clip_multiple=0),
        train=TrainSettings(local_steps=1),
        secure_aggregation=SecureAggregationSettings(
            enabled=True, value_clip=0.05, setup_timeout_s=setup_timeout_s, unmask_timeout_s=30
        ),
    )


def start(cfg, name="agg"):
    link = MqttLink(cfg.broker, client_id=f"{name}-{JOB}").connect()
    agg = Aggregator(cfg, link)
    stop = threading.Event()
    thread = threading.Thread(target=agg.run, args=(stop,), daemon=True)
    thread.start()
    return agg, stop, thread, link


def changes(bundle: Bundle, seed: int = 1) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {
        d: {p.name: rng.uniform(-0.02, 0.02, p.shape).astype(np.float32) for p in bundle.manifest.trainable}
        for d in DEVICES
    }


def refused(agg, kind: str, reason: str) -> float:
    return agg.metrics.messages_refused.labels(kind, reason)._value.get()


@pytest.mark.parametrize("dropouts", [0, 1, 3])
def test_the_unmasked_sum_is_the_plain_sum_with_devices_dropping_after_masking(
    tmp_path, minilm_bundle, mosquitto, dropouts
):
    bundle = Bundle(minilm_bundle)
    ups = changes(bundle)
    drop = set(DEVICES[1 : 1 + 3 * dropouts : 3])
    assert len(drop) == dropouts
    agg, stop, thread, link = start(server_config(minilm_bundle, tmp_path / "state", mosquitto.url))
    devices = [
        ProtocolDevice(mosquitto.url, JOB, d, lambda r, d=d: ups[d], drop="after_shares" if d in drop else "", seed=i)
        for i, d in enumerate(DEVICES)
    ]
    try:
        for dev in devices:
            dev.start()
        wait_until(lambda: agg.history, 120, "the secure round to close")
        row = agg.history[0]
        assert row["ok"], row
        assert row["secagg"]["survivors"] == 10 - dropouts and sorted(row["secagg"]["dropped"]) == sorted(drop)
        assert row["participants"] == 10 - dropouts
        survivors = [d for d in devices if d.id not in drop]
        # Bit-exact in the ring: the unmasked words are the survivors' codes summed mod 2^32.
        expected = np.zeros_like(agg.secure.last.codes, dtype=np.uint64)
        for dev in survivors:
            expected += dev.codes[1]
        assert np.array_equal((expected % 2**32).astype(np.uint32), agg.secure.last.codes)
        # Decoded: the plain sum of the survivors' changes, within survivors / scale per value.
        q = Quantizer(0.05, 10)
        plain = {k: sum(ups[d.id][k].astype(np.float64) for d in survivors) for k in ups["d0"]}
        bound = len(survivors) / q.scale
        for name, value in agg.secure.last.tensors.items():
            assert np.abs(value - plain[name]).max() <= bound + 1e-12, name
        # ... and the strategy finalized from it: the new global is the start plus the mean change.
        initial = read_parameters(bundle)
        wait_until(lambda: agg.model.version == 1, 30, "the new global version")
        for name in plain:
            want = initial[name].astype(np.float64) + plain[name] / len(survivors)
            assert np.abs(agg.global_adapter[name] - want).max() <= bound + 1e-6, name
        assert all(not d.errors for d in devices), [d.errors for d in devices]
        assert refused(agg, "secagg", "malformed") == 0
    finally:
        stop.set()
        thread.join(15)
        link.close()
        for dev in devices:
            dev.stop()


def test_hostile_secagg_messages_are_refused_with_reasons_and_counted_and_the_round_completes(
    tmp_path, minilm_bundle, mosquitto
):
    """A selected device ``evil`` sends, on its own topics, every kind of bad secure-aggregation
    message; the ten honest devices' round completes, exact, and each bad message is counted."""
    bundle = Bundle(minilm_bundle)
    ups = changes(bundle, seed=2)
    cfg = server_config(minilm_bundle, tmp_path / "state", mosquitto.url, min_devices=11, setup_timeout_s=4.0)
    agg, stop, thread, link = start(cfg)
    topics = Topics(JOB)
    evil = MqttLink(BrokerConfig(url=mosquitto.url, protocol="3.1.1"), client_id="evil").connect()
    evil.subscribe(topics.ack("evil"))
    evil.publish(topics.status("evil"), b'{"state": "online", "rank": 4}', retain=True)
    hold = threading.Event()  # d9's masked input waits: the masked phase stays open for evil's updates
    devices = [
        ProtocolDevice(mosquitto.url, JOB, d, lambda r, d=d: ups[d], seed=i, hold=hold if d == "d9" else None)
        for i, d in enumerate(DEVICES)
    ]
    key = bytes(range(32))
    try:
        for dev in devices:
            dev.start()
        wait_until(lambda: agg.coordinator.open is not None, 60, "the round to open")
        rnd = agg.coordinator.open.round
        hostile = [
            (b"\x00\xffgarbage", "malformed"),
            (b"{" * 10_000, "malformed"),  # deep
            (b'{"v": 1, "step": "keys"' + b" " * (600 * 1024) + b"}", "malformed"),  # oversize
            (SecaggKeys(JOB, rnd, "d1", key, key[::-1], key).to_bytes(), "sender_mismatch"),  # forged sender
            (SecaggKeys(JOB, rnd - 1, "evil", key, key[::-1], key).to_bytes(), "stale_round"),
            (SecaggKeys("other", rnd, "evil", key, key[::-1], key).to_bytes(), "wrong_job"),
            (SecaggKeys(JOB, rnd, "evil", key, key, key).to_bytes(), "bad_keys"),  # cipher == mask
            (SecaggReveal(JOB, rnd, "evil", {}).to_bytes(), "wrong_phase"),
            (SecaggKeys(JOB, rnd, "evil", key, key[::-1], key).to_bytes(), None),  # its real keys: taken
            (SecaggKeys(JOB, rnd, "evil", key[::-1], key, key).to_bytes(), "duplicate"),  # other keys again
        ]
        expected: dict[str, int] = {}
        for payload, reason in hostile:
            evil.publish(topics.secagg("evil"), payload).wait_for_publish(5)
            if reason:
                expected[reason] = expected.get(reason, 0) + 1
        for reason, n in expected.items():
            wait_until(lambda r=reason, n=n: refused(agg, "secagg", r) >= n, 30, f"{n} refusals for {reason}")
        # evil never sends shares: it drops out at the share step; the round goes on without it.
        wait_until(lambda: agg.secure.current() and agg.secure.current().state.phase != "keys", 60, "the key list")
        wait_until(lambda: agg.secure.current() is None or agg.secure.current().state.phase != "shares", 60, "forwards")
        words = {n: np.zeros(v.shape, np.uint32) for n, v in ups["d0"].items()}

        def masked(sender, rnd_id=rnd, tensors=words):
            env = Envelope("masked", JOB, rnd_id, sender, 4, RING_CODEC, tensors)
            return encode_envelope(env)

        bad_updates = [
            (b"FLE1" + b"\xff" * 64, "malformed"),
            (masked("d3"), "sender_mismatch"),
            (masked("evil"), "not_masking"),
            (masked("evil", rnd_id=rnd + 5), "future_round"),
            (encode_envelope(Envelope("update", JOB, rnd, "evil", 4, "fp32", ups["d0"])), "secagg_required"),
        ]
        acks = []
        for payload, _ in bad_updates:
            for chunk in split_chunks(payload, 64 * 1024):
                evil.publish(topics.update("evil"), chunk).wait_for_publish(5)
        wait_until(lambda: _drain(evil, acks) >= len(bad_updates), 30, "answers to the bad updates")
        assert [a["reason"] for a in acks] == [r for _, r in bad_updates], acks
        hold.set()
        wait_until(lambda: agg.history, 120, "the secure round to close")
        row = agg.history[0]
        assert row["ok"] and row["secagg"]["keys"] == 11 and row["secagg"]["masking"] == 10, row
        expected_sum = sum(dev.codes[1].astype(np.uint64) for dev in devices) % 2**32
        assert np.array_equal(expected_sum.astype(np.uint32), agg.secure.last.codes)
        assert all(not d.errors for d in devices)
    finally:
        hold.set()
        stop.set()
        thread.join(15)
        link.close()
        evil.close()
        for dev in devices:
            dev.stop()


def _drain(link: MqttLink, acks: list) -> int:
    import json

    while not link.inbox.empty():
        acks.append(json.loads(link.inbox.get().payload))
    return len(acks)


def test_a_restarted_aggregator_keeps_the_masked_inputs_it_acknowledged(tmp_path, minilm_bundle, mosquitto):
    bundle = Bundle(minilm_bundle)
    ups = changes(bundle, seed=3)
    cfg = server_config(minilm_bundle, tmp_path / "state", mosquitto.url)
    agg, stop, thread, link = start(cfg)
    hold = threading.Event()
    late = set(DEVICES[7:])
    devices = [
        ProtocolDevice(mosquitto.url, JOB, d, lambda r, d=d: ups[d], seed=i, hold=hold if d in late else None)
        for i, d in enumerate(DEVICES)
    ]
    try:
        for dev in devices:
            dev.start()
        wait_until(
            lambda: agg.secure.current() is not None and len(agg.secure.current().state.survivors) == 7,
            120,
            "seven acknowledged masked inputs",
        )
        stop.set()
        thread.join(15)
        link.close()
        assert not agg.history
        agg, stop, thread, link = start(cfg, name="agg2")  # same state dir: resumes the open round
        resumed = agg.secure.current()
        assert resumed is not None and resumed.state.phase == "masked" and len(resumed.state.survivors) == 7
        hold.set()
        wait_until(lambda: agg.history, 120, "the resumed round to close")
        assert agg.history[0]["ok"] and agg.history[0]["secagg"]["survivors"] == 10
        expected_sum = sum(dev.codes[1].astype(np.uint64) for dev in devices) % 2**32
        assert np.array_equal(expected_sum.astype(np.uint32), agg.secure.last.codes)
    finally:
        hold.set()
        stop.set()
        thread.join(15)
        link.close()
        for dev in devices:
            dev.stop()


def test_the_main_loop_answers_while_the_round_unmasks_and_a_restart_mid_unmask_completes_it(
    tmp_path, minilm_bundle, mosquitto, monkeypatch
):
    """Unmasking (Shamir in pure Python: 15-20 s at 100 devices) runs off the main loop. Here it
    is held at its first secret until the test lets it go: meanwhile the aggregator still refuses
    a bad message (counted) and acknowledges an update (answered), and an aggregator stopped
    mid-unmask and restarted on the same state unmasks again from what it saved."""
    import server.secure_rounds as secure_rounds

    bundle = Bundle(minilm_bundle)
    ups = changes(bundle, seed=4)
    cfg = server_config(minilm_bundle, tmp_path / "state", mosquitto.url)
    entered, release = threading.Event(), threading.Event()
    real_combine = secure_rounds.combine_secret

    def held_combine(shares, threshold):  # the real reconstruction, once the test allows it
        entered.set()
        release.wait(20)
        return real_combine(shares, threshold)

    monkeypatch.setattr(secure_rounds, "combine_secret", held_combine)
    agg, stop, thread, link = start(cfg)
    topics = Topics(JOB)
    evil = MqttLink(BrokerConfig(url=mosquitto.url, protocol="3.1.1"), client_id="evil").connect()
    evil.subscribe(topics.ack("evil"))
    devices = [ProtocolDevice(mosquitto.url, JOB, d, lambda r, d=d: ups[d], seed=i) for i, d in enumerate(DEVICES)]
    try:
        for dev in devices:
            dev.start()
        assert entered.wait(120), "unmasking never started"
        rnd = agg.coordinator.open.round
        started = time.monotonic()
        evil.publish(topics.secagg("evil"), b"\x00\xffgarbage").wait_for_publish(5)
        wait_until(lambda: refused(agg, "secagg", "malformed") >= 1, 5, "a refusal while unmasking")
        update = encode_envelope(Envelope("update", JOB, rnd, "evil", 4, "fp32", ups["d0"]))
        for chunk in split_chunks(update, 64 * 1024):
            evil.publish(topics.update("evil"), chunk).wait_for_publish(5)
        acks: list = []
        wait_until(lambda: _drain(evil, acks) >= 1, 5, "an ack while unmasking")
        assert acks[0]["reason"] == "secagg_required" and time.monotonic() - started < 10
        assert not agg.history and agg.secure.current().state.phase == "unmask"
        stop.set()  # stopped mid-unmask: the round was saved with its reveals before unmasking
        thread.join(15)
        link.close()
        assert not thread.is_alive() and not agg.history
        release.set()
        agg, stop, thread, link = start(cfg, name="agg2")
        wait_until(lambda: agg.history, 60, "the round to close after the restart")
        row = agg.history[0]
        assert row["ok"] and row["secagg"]["survivors"] == 10 and row["secagg"]["phase"] == "done", row
        expected_sum = sum(dev.codes[1].astype(np.uint64) for dev in devices) % 2**32
        assert np.array_equal(expected_sum.astype(np.uint32), agg.secure.last.codes)
        assert all(not d.errors for d in devices), [d.errors for d in devices]
    finally:
        release.set()
        stop.set()
        thread.join(15)
        link.close()
        evil.close()
        for dev in devices:
            dev.stop()


def test_real_devices_train_mask_and_unmask_with_distributed_dp_through_mosquitto(tmp_path, minilm_bundle, mosquitto):
    """``fedlora simulate``'s own path: three edge-client processes (ONNX Runtime training) in a
    secure job with distributed DP noise; two rounds, every update masked, every round unmasked.
    The devices run this Python: the torch-free device environment has only the ``edge`` extra,
    and secure aggregation needs the ``secagg`` one (cryptography, pycryptodome) on the device."""
    import json
    import sys

    from simulator.run import SimulateConfig, run_simulation

    cfg = SimulateConfig(
        bundle=minilm_bundle,
        dataset="bbc-news",
        devices=3,
        rounds=2,
        local_steps=3,
        batch_size=4,
        max_train=90,
        eval_max=40,
        out=tmp_path / "run",
        device_python=sys.executable,
        broker=mosquitto.url,
        secure_aggregation={"enabled": True, "value_clip": 0.5, "setup_timeout_s": 60},
        privacy={"mode": "distributed", "noise_multiplier": 0.3, "clip_norm": 0.5},
    )
    history = run_simulation(cfg)["history"]
    assert [h["round"] for h in history] == [1, 2]
    for h in history:
        assert h["ok"] and h["participants"] == 3, h
        assert h["secagg"]["survivors"] == 3 and h["secagg"]["dropped"] == [] and h["secagg"]["threshold"] == 2
        assert h["dp_epsilon"] > 0 and np.isfinite(h["eval"]["loss"])
    events = [json.loads(line) for line in (cfg.out / "aggregator" / "events.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "masked_input_accepted" for e in events) == 6
    assert not any(e["event"] in ("update_accepted", "update_rejected", "secagg_failed") for e in events)
    logs = "".join(p.read_text() for p in (cfg.out / "devices").glob("*/device.log"))
    assert "masked input ready" in logs and "leaving secure aggregation" not in logs
