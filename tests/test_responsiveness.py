"""The device answers MQTT while it trains, and a run leaves nothing retained on a broker it
does not own; real brokers (Mosquitto and amqtt) and a real exported bundle."""

from __future__ import annotations

import queue
import threading
import time

import numpy as np
import pytest

from core.bundle import Bundle
from core.transport import BrokerConfig, MqttLink
from edge_client.data import Batch
from edge_client.runtime import RuntimeOptions, Trainer
from edge_client.trainer_process import TrainerProcess, TrainerProcessDied
from simulator.broker import MosquittoBroker, clear_retained, mosquitto_binary, retained_topics

STEPS = 4


def _batch(bundle: Bundle, size: int = 48) -> Batch:
    length = bundle.manifest.max_length
    ids = np.random.default_rng(0).integers(5, 1000, (size, length)).astype(np.int64)
    return Batch(ids, np.ones_like(ids), np.zeros(size, dtype=np.int64))


def _messages_during_steps(trainer, batch: Batch, url: str, protocol: str) -> int:
    """Train STEPS steps while another client publishes QoS 1 messages to a topic this
    process subscribes to; how many arrived in (were read off the socket during) the middle
    half of a step."""
    cfg = BrokerConfig(url=url, protocol=protocol)
    listener = MqttLink(cfg, persistent=False).connect()
    sender = MqttLink(cfg, persistent=False).connect()
    listener.subscribe("probe/t")
    stop = threading.Event()

    def publish() -> None:
        while not stop.is_set():
            sender.publish("probe/t", b"x").wait_for_publish(timeout=30)
            time.sleep(0.005)

    thread = threading.Thread(target=publish, daemon=True)
    try:
        trainer.train_step(batch)  # warm: the first step allocates
        thread.start()
        windows = []
        for _ in range(STEPS):
            t0 = time.monotonic()
            trainer.train_step(batch)
            t1 = time.monotonic()
            windows.append((t0 + (t1 - t0) / 4, t1 - (t1 - t0) / 4))
    finally:
        stop.set()
        thread.join(timeout=30)
        sender.close()
        listener.close()
    arrived = []
    while True:
        try:
            arrived.append(listener.inbox.get_nowait().received_at)
        except queue.Empty:
            break
    return sum(1 for t in arrived for lo, hi in windows if lo < t < hi)


@pytest.fixture(params=["mosquitto", "amqtt"])
def any_broker(request, tmp_path):
    if request.param == "amqtt":
        yield request.getfixturevalue("amqtt_broker"), "3.1.1"
    else:
        yield request.getfixturevalue("mosquitto"), "auto"


def test_the_network_thread_runs_while_the_isolated_trainer_steps(any_broker, minilm_bundle):
    broker, protocol = any_broker
    bundle = Bundle(minilm_bundle)
    batch = _batch(bundle)
    isolated = TrainerProcess(bundle, options=RuntimeOptions(intra_op_threads=1))
    try:
        assert _messages_during_steps(isolated, batch, broker.url, protocol) > 0
    finally:
        isolated.close()
    # The premise: in one process ONNX Runtime's step holds the GIL, and paho's thread reads nothing.
    in_process = Trainer(bundle, options=RuntimeOptions(intra_op_threads=1))
    assert _messages_during_steps(in_process, batch, broker.url, protocol) == 0


def test_the_isolated_trainer_computes_what_the_trainer_computes(minilm_bundle):
    bundle = Bundle(minilm_bundle)
    batch = _batch(bundle, size=4)
    isolated = TrainerProcess(bundle, options=RuntimeOptions(intra_op_threads=1))
    local = Trainer(bundle, options=RuntimeOptions(intra_op_threads=1))
    try:
        start = {k: v + 0.01 for k, v in local.get_adapter().items()}
        for t in (isolated, local):
            t.apply_global(start)
            t.set_learning_rate(1e-3)
        losses = [(isolated.train_step(batch), local.train_step(batch)) for _ in range(2)]
        assert losses[0][0] == pytest.approx(losses[0][1], rel=1e-5)
        assert losses[1][0] == pytest.approx(losses[1][1], rel=1e-5)
        a, b = isolated.get_adapter(), local.get_adapter()
        assert all(np.allclose(a[k], b[k], atol=1e-6) for k in b) and any(not np.array_equal(a[k], start[k]) for k in a)
        assert isolated.peak_rss_bytes() > 50 * 2**20
        with pytest.raises(Exception, match="not trainable"):  # the child's BundleError, raised here
            isolated.set_adapter({"nope": np.zeros(1, np.float32)})
    finally:
        isolated.close()
    with pytest.raises(TrainerProcessDied):
        isolated.get_adapter()


def test_clear_retained_removes_the_jobs_retained_topics_only(tmp_path):
    if mosquitto_binary() is None:
        pytest.fail("mosquitto is not installed: apt-get install mosquitto (.ci/run does)")
    with MosquittoBroker(tmp_path) as broker:
        cfg = BrokerConfig(url=broker.url)
        link = MqttLink(cfg, persistent=False).connect()
        ours = ["fedlora/job1/round", "fedlora/job1/global/8/0", "fedlora/job1/status/dev0"]
        theirs = ["fedlora/job2/round"]
        for topic in ours + theirs:
            link.publish(topic, b"state", retain=True).wait_for_publish(timeout=10)
        link.close()
        assert clear_retained(cfg, "job1") == len(ours)
        assert retained_topics(cfg, "fedlora/#") == set(theirs)


def test_a_training_process_whose_device_is_gone_exits_quietly(minilm_bundle, capfd):
    """A device killed mid-call (a restart, the OOM killer) leaves its training process a
    broken pipe: it must exit without printing a traceback into the device's log."""
    import multiprocessing

    from edge_client.trainer_process import _trainer_main

    ctx = multiprocessing.get_context("spawn")
    device_end, child_end = ctx.Pipe()
    device_end.send(("peak_rss_bytes", ()))
    device_end.close()  # the device is gone before its training process answers anything
    proc = ctx.Process(target=_trainer_main, args=(child_end, str(minilm_bundle), None, RuntimeOptions()))
    proc.start()
    child_end.close()
    proc.join(120)
    assert proc.exitcode == 0
    assert "Traceback" not in capfd.readouterr().err
