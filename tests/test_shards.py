"""Sharded aggregation (server/shards.py, server/shard_worker.py): the shard of a device, the
coordinator/worker messages, the merge of partials, the configurations refused, and a coordinator
with two workers as real processes through a real Mosquitto, one worker SIGKILLed mid-round."""

from __future__ import annotations

import time

import numpy as np
import pytest

from core.errors import ConfigError, ProtocolError
from core.messages import (
    Announcement,
    PartialHeader,
    PartialTensor,
    PlanState,
    RoundState,
    ShardAccepted,
    ShardChannel,
    ShardPlan,
    ShardProgress,
    TopicKind,
    parse_announcement,
    parse_shard_plan,
    parse_shard_progress,
    parse_topic,
    shard_of,
)
from core.protocol import Topics, decode_partial, encode_partial, split_chunks
from server.rounds import RoundSettings
from server.shards import ShardSettings, check_shards, merge_partials
from server.strategies import make_strategy
from server.strategies.base import AdapterLayout, ClientUpdate

BASE = "fedlora/job1"


# -- the shard of a device, and its topic --------------------------------------------------
def test_shard_of_is_a_stable_hash_spread_evenly():
    # Fixed values: a device and every worker must agree across processes, machines and releases.
    assert [shard_of(f"d{i}", 2) for i in range(8)] == [1, 0, 0, 0, 0, 1, 1, 1]
    assert shard_of("dev00000", 4) == 2 and shard_of("anything", 1) == 0
    counts = np.bincount([shard_of(f"dev{i:05d}", 4) for i in range(10_000)], minlength=4)
    assert counts.min() > 2300 and counts.max() < 2700, counts
    with pytest.raises(ProtocolError):
        shard_of("d0", 0)


def test_update_topics_of_a_sharded_job_are_parsed_not_prefix_matched():
    t = Topics("job1")
    assert t.update_for("d0", 1) == f"{BASE}/updates/d0"  # one aggregator: the topic old devices use
    assert t.update_for("d0", 2) == f"{BASE}/updates/1/d0"
    ref = parse_topic(f"{BASE}/updates/3/dev-a", BASE)
    assert (ref.kind, ref.shard, ref.device) == (TopicKind.UPDATES, 3, "dev-a")
    assert parse_topic(f"{BASE}/updates/dev-a", BASE).shard == -1
    ref = parse_topic(f"{BASE}/shards/partial/2", BASE)
    assert (ref.kind, ref.channel, ref.shard) == (TopicKind.SHARDS, ShardChannel.PARTIAL, 2)
    assert parse_topic(f"{BASE}/shards/plan", BASE).channel is ShardChannel.PLAN
    for bad in ("updates/256/d0", "updates/x1/d0", "updates/²/d0", "updates/1/d0/x", "shards/partial", "shards/x/1"):
        with pytest.raises(ProtocolError):
            parse_topic(f"{BASE}/{bad}", BASE)


def test_announcement_of_a_sharded_job_is_version_3_and_unsharded_stays_as_it_was():
    plain = Announcement(job="job1", state=RoundState.WAITING, round=1, global_version=0, rank=8)
    assert b'"v": 1' in plain.to_bytes() and b"shards" not in plain.to_bytes()
    sharded = Announcement(job="job1", state=RoundState.WAITING, round=1, global_version=0, rank=8, shards=4)
    assert b'"v": 3' in sharded.to_bytes()
    assert parse_announcement(sharded.to_bytes()).shards == 4
    assert parse_announcement(plain.to_bytes()).shards == 1
    with pytest.raises(ProtocolError):  # a shard count is a version-3 field
        parse_announcement(plain.to_bytes().replace(b'"v": 1', b'"v": 1, "shards": 2'))


# -- coordinator <-> worker messages ------------------------------------------------------
def test_plan_and_progress_round_trip_and_refuse_what_is_malformed():
    plan = ShardPlan("job1", PlanState.SEAL, 7, 4, 6, ("d0", "d1"), 30, 1.5, 100.0, 700.0)
    assert parse_shard_plan(plan.to_bytes()) == plan
    progress = ShardProgress("job1", 2, 7, (ShardAccepted("d0", 3, 0.25),))
    assert parse_shard_progress(progress.to_bytes()) == progress
    for bad in (
        plan.to_bytes().replace(b'"seal"', b'"sealed"'),
        plan.to_bytes().replace(b'"shards": 4', b'"shards": 0'),
        plan.to_bytes().replace(b'"v": 1', b'"v": 2'),
        plan.to_bytes()[:-1] + b', "extra": 1}',
    ):
        with pytest.raises(ProtocolError):
            parse_shard_plan(bad)
    for bad in (
        progress.to_bytes().replace(b'["d0", 3, 0.25]', b'["d0", -3, 0.25]'),
        progress.to_bytes().replace(b'["d0", 3, 0.25]', b'["d/0", 3, 0.25]'),
        progress.to_bytes().replace(b'["d0", 3, 0.25]', b'["d0", 3]'),
        progress.to_bytes().replace(b'"shard": 2', b'"shard": 256'),
    ):
        with pytest.raises(ProtocolError):
            parse_shard_progress(bad)


def partial_message(sums: dict, accepted=(("d0", 2, 0.5), ("d1", 3, 0.25))) -> bytes:
    acc = tuple(ShardAccepted(*a) for a in accepted)
    header = PartialHeader(
        "job1",
        1,
        5,
        float(sum(a.weight for a in acc)),
        len(acc),
        acc,
        tuple(PartialTensor(k, v.shape) for k, v in sums.items()),
    )
    return encode_partial(header, sums)


def test_a_sealed_partial_reports_each_updates_bytes_and_metrics_for_the_history_and_bounds_them():
    sums = {"x": np.arange(4.0)}
    reported = (("d0", 2, 0.5, 300_000, 302_612, {"train_loss": 0.7, "peak_rss_bytes": 2.5e8}), ("d1", 3, 0.25))
    header, _ = decode_partial(partial_message(sums, reported), max_values=100)
    first, second = header.accepted
    assert (first.wire_bytes, first.raw_bytes, dict(first.metrics)) == (300_000, 302_612, reported[0][5])
    assert (second.wire_bytes, second.raw_bytes, dict(second.metrics)) == (0, 0, {})  # e.g. before a restart
    for bad in (
        ("d0", 2, 0.5, -1, 0, {}),  # negative bytes
        ("d0", 2, 0.5, 1, True, {}),  # a bool is not a count
        ("d0", 2, 0.5, 1, 1, {"train_loss": "high"}),  # metrics are numbers
        ("d0", 2, 0.5, 1, 1, {f"m{i}": 1.0 for i in range(65)}),  # at most MAX_METRICS of them
    ):
        with pytest.raises(ProtocolError):
            decode_partial(partial_message(sums, (bad,)), max_values=100)


def test_partial_round_trips_float64_exactly_and_is_bounded():
    sums = {"x": np.array([[0.1, 1e-300], [1 / 3, -7.0]]), "m:BA": np.arange(3.0)}
    header, back = decode_partial(partial_message(sums), max_values=100)
    assert header.count == 2 and header.weight == 5.0 and [a.device for a in header.accepted] == ["d0", "d1"]
    for k in sums:
        assert back[k].dtype == np.float64 and np.array_equal(back[k], sums[k])  # bit for bit
    good = partial_message(sums)
    with pytest.raises(ProtocolError):
        decode_partial(good, max_values=6)  # 7 values
    with pytest.raises(ProtocolError):
        decode_partial(good[:-8], max_values=100)  # body short by one value
    with pytest.raises(ProtocolError):
        decode_partial(b"FLE1" + good[4:], max_values=100)
    nan = partial_message({"x": np.array([np.nan])})
    with pytest.raises(ProtocolError):
        decode_partial(nan, max_values=100)
    with pytest.raises(ProtocolError):  # a device twice
        decode_partial(partial_message(sums, (("d0", 2, 0.5), ("d0", 3, 0.25))), max_values=100)


# -- the merge -----------------------------------------------------------------------------
LAYOUT = AdapterLayout.from_shapes(
    {"m.lora_A.weight": (4, 6), "m.lora_B.weight": (5, 4), "head.weight": (3, 5)}, scale=2.0
)


@pytest.mark.parametrize("name", ["fedavg", "flexlora", "fedex-lora", "hetlora", "flora"])
def test_merged_shard_partials_finalize_to_what_one_aggregator_makes(name):
    rng = np.random.default_rng(0)
    strategy = make_strategy(name, LAYOUT, rank=4)
    updates = [
        ClientUpdate(
            f"d{i}",
            1,
            4,
            1 + i,
            {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in LAYOUT.shapes(4).items()},
        )
        for i in range(9)
    ]
    one = strategy.new_partial()
    for u in updates:
        one = strategy.accumulate(one, u)
    shards = [strategy.new_partial() for _ in range(3)]
    for u in updates:
        k = shard_of(u.device, 3)
        shards[k] = strategy.accumulate(shards[k], u)
    merged = merge_partials(strategy, shards)
    assert merged.weight == one.weight and merged.count == one.count and set(merged.sums) == set(one.sums)
    for k in one.sums:  # sums in another order: equal to float64 rounding
        np.testing.assert_allclose(merged.sums[k], one.sums[k], rtol=1e-12, atol=1e-15)
    from server.strategies.base import GlobalModel

    model = GlobalModel(4, {k: np.zeros(s, np.float32) for k, s in LAYOUT.shapes(4).items()}, {}, 0)
    a = make_strategy(name, LAYOUT, rank=4).finalize(one, model)
    b = make_strategy(name, LAYOUT, rank=4).finalize(merged, model)
    for k in a.tensors:
        np.testing.assert_allclose(a.tensors[k], b.tensors[k], rtol=1e-5, atol=1e-7)
    assert merge_partials(strategy, [strategy.new_partial(), shards[0]]).count == shards[0].count  # an empty shard


# -- configuration -------------------------------------------------------------------------
def test_settings_refuse_what_cannot_be_sharded_yet():
    sync = RoundSettings()
    check_shards(ShardSettings(count=4), sync, "mean", False, False)
    check_shards(ShardSettings(count=1), RoundSettings(mode="async"), "median", True, True)  # unsharded: anything
    for args, words in (
        ((RoundSettings(mode="async"), "mean", False, False), "rounds.mode sync"),
        ((sync, "trimmed_mean", False, False), "robust.method mean"),
        ((sync, "mean", True, False), "secure_aggregation"),
        ((sync, "mean", False, True), "adaptive_clip"),
    ):
        with pytest.raises(ConfigError, match=words):
            check_shards(ShardSettings(count=2), *args)
    with pytest.raises(ConfigError):
        ShardSettings(count=1, role="worker")
    with pytest.raises(ConfigError):
        ShardSettings(count=2, index=2)
    with pytest.raises(ConfigError):
        ShardSettings(count=2, role="leader")


def test_a_worker_finds_its_shard_in_its_pod_name():
    assert ShardSettings(count=4, role="worker").shard_index("rel-fedlora-aggregator-worker-3") == 3
    assert ShardSettings(count=4, role="worker", index=1).shard_index("whatever-3") == 1
    with pytest.raises(ConfigError, match="shards.index"):
        ShardSettings(count=4, role="worker").shard_index("worker-4")
    with pytest.raises(ConfigError, match="shards.index"):
        ShardSettings(count=4, role="worker").shard_index("worker")


def test_simulate_refuses_shards_it_cannot_run_before_any_work():
    from simulator.run import SimulateConfig

    with pytest.raises(ConfigError, match=r"shards must be in \[1, "):
        SimulateConfig(shards=0)
    with pytest.raises(ConfigError, match="secure"):
        SimulateConfig(shards=2, secure_aggregation={"enabled": True})
    assert SimulateConfig(shards=2, embedded_broker="amqtt").shards == 2  # per-shard topics: any MQTT 3.1.1 broker


# -- a coordinator and two workers through Mosquitto, one of them SIGKILLed mid-round ------
def sharded_job(tmp_path, bundle_dir, url: str, job: str):
    """A coordinator and 2 workers (real ``fedlora-server`` processes, not started) and 8
    hand-driven devices d0..d7 (weights 1, 10, ..., 1e7; 4 of each shard)."""
    from tests.faultkit import HandDevice, Server, bundle_of

    for name in ("coordinator", "worker0", "worker1"):
        (tmp_path / name).mkdir()
    shards = {"count": 2, "resend_s": 1.0}
    common = dict(commit={"batch": 4})
    coordinator = Server(
        tmp_path / "coordinator", bundle_dir, url, job, shards=shards, rounds={"min_devices": 8}, **common
    )
    workers = [
        Server(tmp_path / f"worker{k}", bundle_dir, url, job, shards={**shards, "role": "worker", "index": k}, **common)
        for k in range(2)
    ]
    bundle = bundle_of(bundle_dir)
    devices = [HandDevice(url, job, f"d{i}", bundle, value=1e-4 * (i + 1), weight=10**i) for i in range(8)]
    return coordinator, workers, devices


def start_sharded(coordinator, workers, devices):
    from tests.faultkit import wait_for

    for w in workers:
        w.start()
    # Subscribed before any device sends: a message to a topic nobody subscribes to is gone.
    wait_for(lambda: all("started" in w.text() for w in workers), 60, "the workers", workers)
    coordinator.start()
    for d in devices:
        d.online()
    ann = wait_for(devices[0].open_round, 60, "round 1 to open", [coordinator, *workers])
    assert ann["v"] == 3 and ann["shards"] == 2 and len(ann["selected"]) == 8
    return {k: v.copy() for k, v in coordinator.load()["global"].items()}


def check_exact_round(coordinator, devices, g0) -> None:
    """One completed round: every device counted once, the global their exact weighted mean."""
    from tests.faultkit import multiplicities

    saved = coordinator.load()
    (entry,) = saved["history"]
    assert entry["ok"] and entry["participants"] == len(devices), entry
    # the workers' reports of what they took (those committed before a worker's restart have none)
    values = sum(v.size for v in g0.values())
    assert entry["uplink_bytes_wire"] > 0 and entry["uplink_bytes_raw"] % (4 * values) == 0, entry
    assert entry["uplink_bytes_raw"] // (4 * values) >= len(devices) // 2, entry
    assert multiplicities(entry["examples"], len(devices)) == [1] * len(devices)  # each device once
    assert all(1 in d.accepted_rounds() for d in devices)
    total = sum(d.weight for d in devices)
    for name, base in g0.items():
        acc = np.zeros(base.shape, np.float64)
        for d in devices:
            acc += d.weight * (base + d.value).astype(np.float64)  # the worker adds in float32 first
        want = (acc / total).astype(np.float32)
        error = np.abs(saved["global"][name].astype(np.float64) - want)
        assert np.all(error <= 2 * np.spacing(np.abs(want))), f"{name}: off by up to {error.max():.3g}"


@pytest.mark.integration
def test_sigkilled_worker_loses_no_acknowledged_update(tmp_path, minilm_bundle, mosquitto):
    from tests.faultkit import HandDevice, bundle_of, wait_for

    job = "sharded"
    coordinator, workers, devices = sharded_job(tmp_path, minilm_bundle, mosquitto.url, job)
    bundle = bundle_of(minilm_bundle)
    by_shard = {k: [d for d in devices if shard_of(d.id, 2) == k] for k in range(2)}
    assert all(len(v) == 4 for v in by_shard.values())
    victim = workers[0]
    procs = [coordinator, *workers]
    try:
        g0 = start_sharded(coordinator, workers, devices)

        # Two updates of each shard acknowledged, then the worker of shard 0 SIGKILLed.
        first = by_shard[0][:2] + by_shard[1][:2]
        for d in first:
            d.send(1, 0)
        wait_for(lambda: all(1 in d.accepted_rounds() for d in first), 30, "the first acks", procs)
        victim.kill()
        # While it is down: shard 1 goes on; shard 0's updates wait in the broker (its session).
        for d in by_shard[0][2:] + by_shard[1][2:]:
            d.send(1, 0)
        running = [coordinator, workers[1]]
        wait_for(lambda: all(1 in d.accepted_rounds() for d in by_shard[1]), 30, "shard 1's acks", running)
        assert not any(1 in d.accepted_rounds() for d in by_shard[0][2:]), "acked by a dead worker"
        # A device on the wrong shard's topic is refused with its reason.
        name = next(f"x{i}" for i in range(100) if shard_of(f"x{i}", 2) == 0)
        intruder = HandDevice(mosquitto.url, job, name, bundle, value=1.0, weight=1)
        chunk = split_chunks(b"not an update", 100)[0]
        intruder.link.publish(f"fedlora/{job}/updates/1/{name}", chunk).wait_for_publish(5)
        wait_for(lambda: any(a.get("reason") == "wrong_shard" for a in intruder.acks), 20, "wrong_shard", running)
        intruder.close()

        victim.start()
        # Acknowledged before the kill, sent again: "accepted" (duplicate), and counted once. Sent
        # until the restarted worker has read its plan (before that it answers retry_later).
        again = by_shard[0][0]

        def duplicate() -> bool:
            return any(a.get("reason") == "duplicate" for a in again.acks_for(1))

        for _ in range(50):
            answered = len(again.acks_for(1))
            again.send(1, 0)
            wait_for(lambda n=answered: len(again.acks_for(1)) > n, 20, "an answer to the resend", procs)
            if duplicate():
                break
            time.sleep(0.2)
        assert duplicate() and again.acks_for(1)[-1]["result"] == "accepted"
        for d in devices:
            d.auto.set()  # what was not acknowledged is resent
        assert coordinator.wait(90) == 0, coordinator.tail()
        for w in workers:
            assert w.wait(30) == 0, w.tail()

        check_exact_round(coordinator, devices, g0)
        resumed = [e for e in victim.events() if e["event"] == "job_resumed"]
        assert resumed, "the restarted worker must resume from its own state store"
        assert "Traceback" not in coordinator.text() + workers[1].text(), coordinator.tail()
    finally:
        for proc in procs:
            proc.kill()
        for d in devices:
            d.close()


@pytest.mark.integration
def test_sigkilled_coordinator_resumes_the_round_from_its_workers_reports(tmp_path, minilm_bundle, mosquitto):
    from tests.faultkit import wait_for

    coordinator, workers, devices = sharded_job(tmp_path, minilm_bundle, mosquitto.url, "sharded-c")
    try:
        g0 = start_sharded(coordinator, workers, devices)
        for d in devices[:7]:
            d.send(1, 0)
        wait_for(lambda: all(1 in d.accepted_rounds() for d in devices[:7]), 30, "7 acks", [coordinator, *workers])
        coordinator.kill()  # its view of the round (the workers' reports) is gone
        coordinator.start()
        started = time.monotonic()
        devices[7].auto.set()
        # The workers report their updates again when the restarted coordinator republishes the
        # plan, so the round closes once d7 is in, not at its deadline (120 s).
        assert coordinator.wait(60) == 0, coordinator.tail()
        assert time.monotonic() - started < 60
        for w in workers:
            assert w.wait(30) == 0, w.tail()
        check_exact_round(coordinator, devices, g0)
    finally:
        for proc in (coordinator, *workers):
            proc.kill()
        for d in devices:
            d.close()
