"""The aggregator against a real broker, fed by a hand-driven device: every bad update gets a
clear reason, nothing is lost, and a restart resumes from the persisted round."""

import json
import threading
import time

import numpy as np
import pytest

from core.bundle import Bundle
from core.protocol import Envelope, Topics, encode_envelope, split_chunks
from core.transport import BrokerConfig, MqttLink
from edge_client.runtime import read_parameters
from server.aggregator import Aggregator
from server.config import ServerConfig, TrainSettings
from server.rounds import RoundSettings


def wait_for(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class FakeDevice:
    """A device driven by the test: publishes status and hand-made updates, collects acks."""

    def __init__(self, url, job, device_id):
        self.topics = Topics(job)
        self.id = device_id
        self.link = MqttLink(BrokerConfig(url=url, protocol="3.1.1"), client_id=f"t-{device_id}").connect()
        self.link.subscribe(self.topics.ack(device_id))
        self.link.subscribe(self.topics.round)
        self.acks, self.rounds = [], []

    def online(self):
        self.link.publish(self.topics.status(self.id), json.dumps({"state": "online", "rank": 4}).encode(), retain=True)

    def pump(self):
        while not self.link.inbox.empty():
            m = self.link.inbox.get()
            (self.acks if "/ack/" in m.topic else self.rounds).append(json.loads(m.payload))

    def send(self, payload: bytes, chunk=50_000):
        for c in split_chunks(payload, chunk):
            self.link.publish(self.topics.update(self.id), c).wait_for_publish(5)

    def ack_count(self):
        self.pump()
        return len(self.acks)

    def open_round(self):
        self.pump()
        opened = [r for r in self.rounds if r.get("state") == "open"]
        return opened[-1] if opened else None


def start_aggregator(bundle_dir, state_dir, url, job="faults", rounds=2, max_update_bytes=64 << 20, **settings):
    cfg = ServerConfig(
        job=job,
        bundle=bundle_dir,
        state_dir=state_dir,
        http_port=0,
        broker=BrokerConfig(url=url, protocol="3.1.1"),
        max_update_bytes=max_update_bytes,
        # hand-made updates are not AdamW's: no norm bound unless a test sets one
        rounds=RoundSettings(rounds=rounds, min_devices=1, round_timeout=60, norm_clip_multiple=0),
        train=TrainSettings(local_steps=1),
        **settings,
    )
    link = MqttLink(cfg.broker, client_id=f"agg-{job}").connect()
    agg = Aggregator(cfg, link)
    stop = threading.Event()
    thread = threading.Thread(target=agg.run, args=(stop,), daemon=True)
    thread.start()
    return agg, stop, thread, link


def update_payload(bundle, job, device, rnd, *, tensors=None, codec="fp32", sender=None, base_version=None):
    m = bundle.manifest
    tensors = tensors if tensors is not None else {p.name: np.full(p.shape, 0.01, np.float32) for p in m.trainable}
    return encode_envelope(
        Envelope(
            kind="update",
            job=job,
            round=rnd,
            sender=sender or device,
            rank=m.rank,
            codec=codec,
            tensors=tensors,
            num_examples=10,
            base_version=rnd - 1 if base_version is None else base_version,
        )
    )


def test_bad_updates_are_rejected_with_reasons_and_the_round_still_completes(tmp_path, minilm_bundle, amqtt_broker):
    bundle = Bundle(minilm_bundle)
    m = bundle.manifest
    fp32_size = len(update_payload(bundle, "faults", "d1", 1))
    agg, stop, thread, link = start_aggregator(
        minilm_bundle, tmp_path / "state", amqtt_broker.url, max_update_bytes=fp32_size - 1000
    )
    dev = FakeDevice(amqtt_broker.url, "faults", "d1")
    try:
        dev.online()
        rnd = wait_for(dev.open_round, what="round 1 to open")["round"]
        good = {p.name: np.full(p.shape, 0.01, np.float32) for p in m.trainable}
        name0 = m.trainable[0].name
        wrong_shape = {**good, name0: np.zeros((1, 1), np.float32)}
        nan = {**good, name0: np.full(m.trainable[0].shape, np.nan, np.float32)}
        cases = [
            (b"\x00garbage" * 10, "malformed"),
            (update_payload(bundle, "faults", "d1", rnd, tensors=wrong_shape, codec="fp16"), "wrong_shape"),
            (update_payload(bundle, "faults", "d1", rnd, tensors=nan, codec="fp16"), "non_finite"),
            (update_payload(bundle, "faults", "d1", rnd - 1, codec="fp16", base_version=0), "stale_round"),
            (update_payload(bundle, "faults", "d1", rnd, codec="fp16", base_version=rnd + 3), "wrong_base"),
            (update_payload(bundle, "other-job", "d1", rnd, codec="fp16"), "wrong_job"),
            (update_payload(bundle, "faults", "d1", rnd, codec="fp16", sender="d2"), "sender_mismatch"),
            (update_payload(bundle, "faults", "d1", rnd), "too_large"),  # fp32 is over max_update_bytes
        ]
        for i, (payload, reason) in enumerate(cases, start=1):
            if payload[:4] == b"\x00gar":
                dev.link.publish(dev.topics.update("d1"), payload).wait_for_publish(5)
            else:
                dev.send(payload)
            wait_for(lambda n=i: dev.ack_count() >= n, what=f"ack for {reason}")
            assert dev.acks[-1]["result"] == "rejected" and dev.acks[-1]["reason"] == reason, dev.acks[-1]
        assert "exceeds the limit" in dev.acks[-1]["detail"]
        assert agg.coordinator.open is not None and agg.coordinator.completed == 0  # still waiting, unharmed
        dev.send(update_payload(bundle, "faults", "d1", rnd, codec="fp16"))
        wait_for(lambda: agg.coordinator.completed == 1, what="round 1 to complete")
        wait_for(lambda: dev.ack_count() >= len(cases) + 1, what="ack of the good update")
        assert dev.acks[-1]["result"] == "accepted"
        events = agg.store.events()
        reasons = [e["reason"] for e in events if e["event"] == "update_rejected"]
        assert reasons[: len(cases)] == [r for _, r in cases]
        initial = read_parameters(bundle)
        np.testing.assert_allclose(agg.global_adapter[name0], initial[name0] + np.float16(0.01), rtol=1e-5)
    finally:
        stop.set()
        thread.join(10)
        link.close()
        dev.link.close()


def test_restart_resumes_from_last_completed_round(tmp_path, minilm_bundle, mosquitto):
    bundle = Bundle(minilm_bundle)
    state = tmp_path / "state"
    agg, stop, thread, link = start_aggregator(minilm_bundle, state, mosquitto.url, job="resume", rounds=3)
    dev = FakeDevice(mosquitto.url, "resume", "d1")
    dev.online()
    rnd = wait_for(dev.open_round, what="round 1")["round"]
    dev.send(update_payload(bundle, "resume", "d1", rnd))
    wait_for(lambda: agg.coordinator.completed == 1, what="round 1 to complete")
    saved_global = {k: v.copy() for k, v in agg.global_adapter.items()}
    stop.set()
    thread.join(10)
    link.close()

    agg2, stop2, thread2, link2 = start_aggregator(minilm_bundle, state, mosquitto.url, job="resume", rounds=3)
    try:
        assert agg2.coordinator.completed == 1 and agg2.coordinator.version == 1
        for name, value in saved_global.items():
            np.testing.assert_array_equal(agg2.global_adapter[name], value)
        # the round open at shutdown (round 2) resumes; the device finishes it
        wait_for(lambda: (agg2.coordinator.open or None) and agg2.coordinator.open.round == 2, what="round 2 resumed")
        dev.send(update_payload(bundle, "resume", "d1", 2))
        wait_for(lambda: agg2.coordinator.completed == 2, what="round 2 to complete")
        assert [h["round"] for h in agg2.history] == [1, 2]
    finally:
        stop2.set()
        thread2.join(10)
        link2.close()
        dev.link.close()


def test_downlink_delta_plus_previous_version_equals_the_full_copy(tmp_path, minilm_bundle, mosquitto):
    from core.protocol import Reassembler, decode_envelope

    bundle = Bundle(minilm_bundle)
    cfg = ServerConfig(
        job="down",
        bundle=minilm_bundle,
        state_dir=tmp_path / "state",
        http_port=0,
        broker=BrokerConfig(url=mosquitto.url),
        downlink_codec="int8",
        rounds=RoundSettings(rounds=2, min_devices=1, round_timeout=60),
        train=TrainSettings(local_steps=1),
    )
    link = MqttLink(cfg.broker, client_id="agg-down").connect()
    agg = Aggregator(cfg, link)
    stop = threading.Event()
    thread = threading.Thread(target=agg.run, args=(stop,), daemon=True)
    thread.start()
    dev = FakeDevice(mosquitto.url, "down", "d1")
    rank = bundle.manifest.rank
    watcher = MqttLink(BrokerConfig(url=mosquitto.url), client_id="watch").connect()
    watcher.subscribe(dev.topics.global_filter(rank))
    watcher.subscribe(dev.topics.delta_filter(rank))
    fulls, deltas, r = {}, {}, Reassembler(1 << 26)
    try:
        dev.online()
        rnd = wait_for(dev.open_round, what="round 1")["round"]
        rng = np.random.default_rng(0)
        tensors = {p.name: rng.normal(0, 0.01, p.shape).astype(np.float32) for p in bundle.manifest.trainable}
        dev.send(update_payload(bundle, "down", "d1", rnd, tensors=tensors))

        def collect():
            while not watcher.inbox.empty():
                m = watcher.inbox.get()
                if not m.payload:
                    continue
                payload = r.add(m.topic.split("/")[2], m.payload)
                if payload is not None:
                    env = decode_envelope(payload)
                    (deltas if "/gdelta/" in m.topic else fulls)[env.round] = env
            return 1 in fulls and 1 in deltas and 0 in fulls

        wait_for(collect, what="versions 0 and 1 and the delta between them")
        d = deltas[1]
        assert d.codec == "int8" and d.base_version == 0
        for name, full in fulls[1].tensors.items():
            np.testing.assert_array_equal(full, (fulls[0].tensors[name] + d.tensors[name]).astype(np.float32))
        # the aggregator rebuilds device tensors from exactly what they hold
        for name, held in agg._downlinks[rank].adapter.items():
            np.testing.assert_array_equal(held, fulls[1].tensors[name])
    finally:
        stop.set()
        thread.join(10)
        link.close()
        dev.link.close()
        watcher.close()


def test_a_replica_whose_term_was_claimed_stops_writing(tmp_path, minilm_bundle, mosquitto):
    """A deposed leader that still runs (a pause, a partition) must not write: the new leader's
    claimed term fences it off, and the error ends its term instead of being contained."""
    import pytest

    from server.store import StaleTerm, StateStore

    bundle = Bundle(minilm_bundle)
    state = tmp_path / "state"
    cfg = ServerConfig(
        job="fence",
        bundle=minilm_bundle,
        state_dir=state,
        http_port=0,
        broker=BrokerConfig(url=mosquitto.url, protocol="3.1.1"),
        rounds=RoundSettings(rounds=2, min_devices=1, round_timeout=60, norm_clip_multiple=0),
    )
    link = MqttLink(cfg.broker, client_id="agg-old").connect()
    try:
        old = Aggregator(cfg, link, claim_term=True)
        old.coordinator.device_status("d1", True, rank=4, num_examples=10)
        old.publish_global()
        assert old.open_next()
        StateStore(state).claim_term()  # another replica becomes leader
        old.handle(old.topics.update("d1"), split_chunks(update_payload(bundle, "fence", "d1", 1), 1 << 20)[0])
        assert old._batch, "the update waits for its batch's commit"
        with pytest.raises(StaleTerm):
            old.commit_batch()
        assert StateStore(state).load()["open_round"].accepted == {}  # nothing of the old leader's landed
    finally:
        link.close()


def test_healthz_fails_on_a_stalled_loop_and_says_degraded_on_store_errors():
    import urllib.error
    import urllib.request

    from server.metrics import HealthServer, Metrics

    state = {"health": True}
    server = HealthServer(Metrics(), "127.0.0.1", 0, ready=lambda: True, health=lambda: state["health"]).start()

    def get():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5) as r:
                return r.status, r.read().decode().strip()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode().strip()

    try:
        assert get() == (200, "ok")
        state["health"] = "main loop made no progress for 130s"
        assert get() == (503, "main loop made no progress for 130s")
        state["health"] = "degraded: the state volume is full"
        assert get() == (200, "degraded: the state volume is full")
    finally:
        server.stop()


def test_a_slow_evaluation_does_not_hold_up_the_next_rounds_acks(tmp_path, minilm_bundle, mosquitto):
    """The global adapter is evaluated on a worker thread: while round 1's evaluation runs, round
    2 opens and its update is acknowledged; the result lands in round 1's history entry."""
    bundle = Bundle(minilm_bundle)
    release = threading.Event()
    evaluated = []

    def slow_evaluator(tensors):
        release.wait(30)
        evaluated.append(sorted(tensors))
        return {"accuracy": 0.5, "loss": 1.0}

    cfg = ServerConfig(
        job="slow-eval",
        bundle=minilm_bundle,
        state_dir=tmp_path / "state",
        http_port=0,
        broker=BrokerConfig(url=mosquitto.url, protocol="3.1.1"),
        rounds=RoundSettings(rounds=2, min_devices=1, round_timeout=60, norm_clip_multiple=0),
        train=TrainSettings(local_steps=1),
    )
    link = MqttLink(cfg.broker, client_id="agg-slow-eval").connect()
    agg = Aggregator(cfg, link, evaluator=slow_evaluator)
    stop = threading.Event()
    thread = threading.Thread(target=agg.run, args=(stop,), daemon=True)
    thread.start()
    dev = FakeDevice(mosquitto.url, "slow-eval", "d1")
    try:
        dev.online()
        for rnd in (1, 2):
            wait_for(lambda r=rnd: (dev.open_round() or {}).get("round") == r, what=f"round {rnd}")
            dev.send(update_payload(bundle, "slow-eval", "d1", rnd))
            wait_for(lambda r=rnd: dev.ack_count() >= r, what=f"the ack of round {rnd}")
        assert not evaluated and agg.evaluation_pending(agg.history[0])  # round 2 went by during round 1's evaluation
        assert "eval" not in agg.history[0]
        release.set()
        thread.join(30)
        assert not thread.is_alive()
        assert [h.get("eval") for h in agg.history] == [
            {"accuracy": 0.5, "loss": 1.0}
        ] * 2  # collected before run() ends
        assert len(evaluated) == 2 and not agg.evaluation_pending(agg.history[1])
    finally:
        release.set()
        stop.set()
        thread.join(10)
        link.close()
        dev.link.close()


def test_eval_score_prefers_accuracy_then_a_lower_loss():
    from server.aggregator import eval_score

    assert eval_score({"accuracy": 0.5, "loss": 9.0}) == 0.5
    assert eval_score({"loss": 2.0}) > eval_score({"loss": 3.0})
    for bad in ({}, {"accuracy": float("nan")}, {"accuracy": True}, {"loss": "1"}):
        assert eval_score(bad) is None


def test_the_best_evaluated_version_is_kept_as_a_peft_adapter(tmp_path, minilm_bundle, mosquitto):
    """Evaluations of 0.5, 0.7 and 0.6: ``adapters/best`` is version 2's adapter, the same files
    as ``adapters/v000002``, and an aggregator restarted on the state knows 0.7 is the bar."""
    from safetensors import safe_open

    bundle = Bundle(minilm_bundle)
    scores = iter([0.5, 0.7, 0.6])
    state = tmp_path / "state"
    agg, stop, thread, link = start_aggregator(minilm_bundle, state, mosquitto.url, job="best", rounds=3)
    agg.evaluator = lambda tensors: {"accuracy": next(scores)}
    dev = FakeDevice(mosquitto.url, "best", "d1")
    try:
        dev.online()
        for rnd in (1, 2, 3):
            wait_for(lambda r=rnd: (dev.open_round() or {}).get("round") == r, what=f"round {rnd}")
            rng = np.random.default_rng(rnd)
            tensors = {q.name: rng.normal(0, 0.01, q.shape).astype(np.float32) for q in bundle.manifest.trainable}
            dev.send(update_payload(bundle, "best", "d1", rnd, tensors=tensors))
            wait_for(lambda r=rnd: dev.ack_count() >= r, what=f"the ack of round {rnd}")
        thread.join(30)
        assert not thread.is_alive() and [h["eval"]["accuracy"] for h in agg.history] == [0.5, 0.7, 0.6]
    finally:
        stop.set()
        thread.join(10)
        link.close()
        dev.link.close()
    best, second = state / "adapters" / "best", state / "adapters" / "v000002"
    with safe_open(str(best / "adapter_model.safetensors"), framework="np") as f:
        assert f.metadata()["fedlora_version"] == "2" and float(f.metadata()["fedlora_accuracy"]) == 0.7
        kept = {k: f.get_tensor(k) for k in f.keys()}
    with safe_open(str(second / "adapter_model.safetensors"), framework="np") as f:
        assert kept.keys() == set(f.keys()) and all(np.array_equal(kept[k], f.get_tensor(k)) for k in kept)
    assert (best / "adapter_config.json").read_text() == (second / "adapter_config.json").read_text()
    again, stop, thread, link = start_aggregator(minilm_bundle, state, mosquitto.url, job="best", rounds=3)
    try:
        assert again.best_score() == 0.7  # from the restored history: a worse version will not replace it
    finally:
        stop.set()
        thread.join(10)
        link.close()


def run_fedadam_job(bundle_dir, state, url, job, rounds, restart_after=()):
    """``rounds`` rounds of FedAdam fed by one hand-driven device with round-dependent updates;
    after each round in ``restart_after`` the aggregator is abandoned mid-job (its thread
    stopped, its connection dropped, nothing flushed) and a new one is built from the state
    directory. Returns the last aggregator's global adapter and optimizer."""
    bundle = Bundle(bundle_dir)
    settings = {"strategy_settings": {"server_optimizer": "fedadam", "server_lr": 0.005}}
    agg, stop, thread, link = start_aggregator(bundle_dir, state, url, job=job, rounds=rounds, **settings)
    dev = FakeDevice(url, job, "d1")
    dev.online()
    try:
        for rnd in range(1, rounds + 1):
            wait_for(lambda a=agg, r=rnd: a.coordinator.open is not None and a.coordinator.open.round == r, what="open")
            rng = np.random.default_rng(rnd)
            tensors = {p.name: rng.normal(0, 0.01, p.shape).astype(np.float32) for p in bundle.manifest.trainable}
            dev.send(update_payload(bundle, job, "d1", rnd, tensors=tensors))
            # the round counts as completed before finalize runs: wait for the version it makes
            wait_for(lambda a=agg, r=rnd: a.model.version == r, what=f"round {rnd}'s global")
            if rnd in restart_after:
                stop.set()
                thread.join(30)
                assert not thread.is_alive()
                link.close()
                agg, stop, thread, link = start_aggregator(bundle_dir, state, url, job=job, rounds=rounds, **settings)
        return {k: v.copy() for k, v in agg.global_adapter.items()}, agg.strategy.optimizer
    finally:
        stop.set()
        thread.join(10)
        link.close()
        dev.link.close()


def test_a_restarted_aggregator_resumes_the_server_optimizer_bit_identically(tmp_path, minilm_bundle, mosquitto):
    want, straight = run_fedadam_job(minilm_bundle, tmp_path / "a", mosquitto.url, "adam-a", rounds=3)
    got, resumed = run_fedadam_job(
        minilm_bundle, tmp_path / "b", mosquitto.url, "adam-b", rounds=3, restart_after=(1, 2)
    )
    assert resumed.t == straight.t == 3 and set(resumed.m) == set(straight.m) and straight.m
    for name, value in want.items():
        assert np.array_equal(got[name], value), name
    for name in straight.m:
        assert np.array_equal(resumed.m[name], straight.m[name]) and np.array_equal(resumed.v[name], straight.v[name])


def test_an_unset_learning_rate_is_announced_as_the_bundle_tasks_default(tmp_path, minilm_bundle):
    from core.bundle import DEFAULT_LR

    cfg = ServerConfig(
        job="lr", bundle=minilm_bundle, state_dir=tmp_path / "state", http_port=0, rounds=RoundSettings(min_devices=1)
    )
    agg = Aggregator(cfg, link=None)  # no round runs: only what it would announce
    assert cfg.train.lr == 0 and agg.train.lr == DEFAULT_LR["seq-cls"]
    agg.coordinator.device_status("dev0", online=True)
    assert agg.coordinator.maybe_open() is not None
    assert agg.announcement().train.lr == DEFAULT_LR["seq-cls"]
    # the first round's norm bound follows the rate devices actually train at
    assert agg.norm_prior() == pytest.approx(
        DEFAULT_LR["seq-cls"] * cfg.train.local_steps * agg.manifest.adapter_size**0.5
    )
    configured = ServerConfig(
        job="lr2", bundle=minilm_bundle, state_dir=tmp_path / "state2", http_port=0, train=TrainSettings(lr=3e-4)
    )
    assert Aggregator(configured, link=None).train.lr == 3e-4
