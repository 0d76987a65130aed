"""Asynchronous rounds (FedBuff) without a network: the staleness weighting, the buffered
aggregate against a NumPy reference, refusals with their reasons, the state a restart resumes,
the announcement of protocol version 2, and configurations refused before any work."""

import numpy as np
import pytest

from core.config import build
from core.errors import ConfigError, ProtocolError, UpdateRejected
from core.messages import (
    Announcement,
    RoundMode,
    RoundState,
    StrategyInfo,
    TrainInfo,
    parse_announcement,
)
from server.async_rounds import AsyncCoordinator, buffer_summary, staleness_weight
from server.config import ServerConfig
from server.rounds import RoundSettings
from server.store import StateStore
from server.strategies import STRATEGIES, make_strategy
from server.strategies.base import AdapterLayout, ClientUpdate, GlobalModel

A, B, HEAD = "m.lora_A.weight", "m.lora_B.weight", "head"
SHAPES = {A: (2, 3), B: (4, 2), HEAD: (5,)}


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def make(strategy="fedavg", clock=None, **settings):
    rounds = RoundSettings(
        **{"rounds": 0, "min_devices": 1, "round_timeout": 60, "norm_clip_multiple": 0, "mode": "async", **settings}
    )
    clock = clock or Clock()
    c = AsyncCoordinator(rounds, make_strategy(strategy, AdapterLayout.from_shapes(SHAPES), rank=2), "job", clock)
    return c, clock


def delta(seed, scale=0.1):
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}


def offer(c, model, device, rnd, base, change, n=10):
    """What the aggregator does with an update: judge, add the (scaled) change to what it holds
    now, accumulate. Returns the Bounded."""
    bounded = c.judge("job", ClientUpdate(device, rnd, 2, n, change), base)
    full = {k: model.tensors[k] + v for k, v in bounded.update.tensors.items()}
    c.accept(ClientUpdate(device, rnd, 2, bounded.update.num_examples, full), bounded.norm, bounded.staleness)
    return bounded


# -- the weighting -----------------------------------------------------------------------
@pytest.mark.parametrize("s", [0, 1, 2, 3, 7, 50])
def test_staleness_weights_follow_their_formulas(s):
    assert staleness_weight(s, "constant", 0.5, 4) == 1.0
    assert staleness_weight(s, "polynomial", 0.5, 4) == pytest.approx(1 / np.sqrt(1 + s))
    assert staleness_weight(s, "polynomial", 2.0, 4) == pytest.approx((1 + s) ** -2.0)
    expected_hinge = 1.0 if s <= 4 else 1 / (1 + 10 * (s - 4))
    assert staleness_weight(s, "hinge", 10.0, 4) == pytest.approx(expected_hinge)
    assert staleness_weight(s, "polynomial", 0.0, 4) == 1.0


def test_staleness_weights_never_grow_with_staleness():
    for weighting in ("polynomial", "hinge"):
        weights = [staleness_weight(s, weighting, 0.7, 2) for s in range(30)]
        assert weights[0] == 1.0 and all(a >= b for a, b in zip(weights, weights[1:]))
        assert weights[-1] < 0.25
    with pytest.raises(ValueError):
        staleness_weight(-1, "polynomial", 0.5, 4)


# -- the buffered aggregate --------------------------------------------------------------
@pytest.mark.parametrize("weighting, exponent", [("polynomial", 0.5), ("hinge", 1.0), ("constant", 0.5)])
def test_a_buffer_of_stale_updates_matches_the_numpy_reference(weighting, exponent):
    """FedBuff with example weights: new = current + sum_i n_i w(s_i) delta_i / sum_i n_i."""
    c, _ = make(buffer_size=3, staleness_weighting=weighting, staleness_exponent=exponent, staleness_hinge=1)
    c.device_status("d0", True)
    model = GlobalModel(2, {k: np.full(s, 0.5, np.float32) for k, s in SHAPES.items()})
    # advance to version 3 with three one-update buffers... from other devices
    strategy = c.strategy
    for v in range(3):
        c.maybe_open()
        for i in range(3):
            offer(c, model, f"warm{v}{i}", c.open.round, c.version, delta(100 + 10 * v + i))
        outcome = c.maybe_close()
        model = strategy.finalize(outcome.partial, model)
    assert c.version == 3 and c.open.round == 4 and c.maybe_open().round == 4
    current = {k: v.copy() for k, v in model.tensors.items()}
    plan = [("a", 4, 3, 10), ("b", 2, 1, 30), ("c", 3, 2, 5)]  # device, its round, base version, examples
    changes = {d: delta(i) for i, (d, *_rest) in enumerate(plan)}
    for device, rnd, base, n in plan:
        b = offer(c, model, device, rnd, base, changes[device], n=n)
        assert b.staleness == 3 - base
        assert b.staleness_weight == pytest.approx(staleness_weight(3 - base, weighting, exponent, 1))
    outcome = c.maybe_close()
    assert outcome is not None and outcome.reason == "buffer_full" and outcome.round == 4
    new = strategy.finalize(outcome.partial, model)
    total = sum(n for *_r, n in plan)
    for k in SHAPES:
        expected = (
            current[k].astype(np.float64)
            + sum(
                n * staleness_weight(3 - base, weighting, exponent, 1) * changes[d][k].astype(np.float64)
                for d, _r, base, n in plan
            )
            / total
        )
        np.testing.assert_allclose(new.tensors[k], expected, rtol=1e-5, atol=1e-6)
    assert buffer_summary(outcome) == {
        "version": 4,
        "buffer_updates": 3,
        "staleness_mean": round((0 + 2 + 1) / 3, 4),
        "staleness_max": 2,
    }
    assert c.version == 4 and c.open.round == 5 and c.open.base_version == 4  # the next buffer is open


def test_a_stale_buffer_moves_the_global_less_than_a_fresh_one():
    results = []
    for base in (5, 1):
        c, _ = make(buffer_size=1)
        c.version = 5
        c.next_round = 6
        c.device_status("d", True)
        c.maybe_open()
        model = GlobalModel(2, {k: np.zeros(s, np.float32) for k, s in SHAPES.items()})
        offer(c, model, "d", 6, base, {k: np.ones(s, np.float32) for k, s in SHAPES.items()})
        results.append(c.strategy.finalize(c.maybe_close().partial, model).tensors[HEAD])
    np.testing.assert_allclose(results[0], 1.0)
    np.testing.assert_allclose(results[1], 1 / np.sqrt(5), rtol=1e-6)


# -- refusals ------------------------------------------------------------------------------
def test_updates_beyond_the_bound_are_refused_with_the_reason():
    c, _ = make(buffer_size=5, max_staleness=2)
    c.version, c.next_round = 6, 7
    c.device_status("d", True)
    c.maybe_open()
    model = GlobalModel(2, {k: np.zeros(s, np.float32) for k, s in SHAPES.items()})
    with pytest.raises(UpdateRejected) as exc:
        c.judge("job", ClientUpdate("d", 4, 2, 10, delta(1)), 3)
    assert exc.value.reason == "too_stale" and "3 versions behind 6" in exc.value.detail
    offer(c, model, "d", 5, 4, delta(1))  # 2 behind: the bound itself is accepted
    cases = [
        (ClientUpdate("d", 5, 2, 10, delta(1)), 4, "duplicate"),  # a resend of what counted
        (ClientUpdate("d", 3, 2, 10, delta(1)), 2, "duplicate"),  # older than what counted
        (ClientUpdate("e", 8, 2, 10, delta(1)), 6, "future_round"),
        (ClientUpdate("e", 7, 2, 10, delta(1)), 7, "wrong_base"),  # a version that does not exist yet
        (ClientUpdate("e", 7, 2, 0, delta(1)), 6, "no_examples"),
    ]
    for update, base, reason in cases:
        with pytest.raises(UpdateRejected) as exc:
            c.judge("job", update, base)
        assert exc.value.reason == reason, (update, exc.value)
    with pytest.raises(UpdateRejected) as exc:
        c.judge("other", ClientUpdate("e", 7, 2, 10, delta(1)), 6)
    assert exc.value.reason == "wrong_job"
    offer(c, model, "d", 7, 6, delta(2))  # the same device, now from the latest version
    assert sorted(c.open.accepted) == ["d/5", "d/7"] and c.open.staleness == [2, 0]


def test_the_first_buffer_waits_for_min_devices_and_a_deadline_applies_a_partial_buffer():
    c, clock = make(buffer_size=4, min_devices=2, min_updates=2, round_timeout=30)
    c.device_status("a", True)
    assert c.maybe_open() is None
    c.device_status("b", True)
    assert c.maybe_open().round == 1
    model = GlobalModel(2, {k: np.zeros(s, np.float32) for k, s in SHAPES.items()})
    offer(c, model, "a", 1, 0, delta(1))
    clock.t += 31
    assert c.maybe_close() is None  # one update is below min_updates: keep waiting
    offer(c, model, "b", 1, 0, delta(2))
    outcome = c.maybe_close()
    assert outcome.reason == "buffer_deadline" and len(outcome.accepted) == 2
    c.device_status("a", False)
    c.device_status("b", False)
    assert c.maybe_open().round == 2  # later buffers do not wait for devices


def test_the_job_finishes_after_its_versions():
    c, _ = make(buffer_size=1, rounds=2)
    c.device_status("a", True)
    model = GlobalModel(2, {k: np.zeros(s, np.float32) for k, s in SHAPES.items()})
    for rnd in (1, 2):
        assert c.maybe_open().round == rnd
        offer(c, model, "a", rnd, rnd - 1, delta(rnd))
        assert c.maybe_close() is not None
    assert c.finished and c.open is None and c.maybe_open() is None
    with pytest.raises(UpdateRejected) as exc:
        c.judge("job", ClientUpdate("a", 3, 2, 10, delta(1)), 2)
    assert exc.value.reason == "no_open_round"


def test_undo_restores_the_buffer():
    c, _ = make(buffer_size=5)
    c.device_status("a", True)
    c.maybe_open()
    model = GlobalModel(2, {k: np.zeros(s, np.float32) for k, s in SHAPES.items()})
    offer(c, model, "a", 1, 0, delta(1))
    before = ({k: v.copy() for k, v in c.open.partial.sums.items()}, dict(c.open.contributed))
    b = c.judge("job", ClientUpdate("b", 1, 2, 10, delta(2)), 0)
    undo = c.accept(ClientUpdate("b", 1, 2, 10, b.update.tensors), b.norm, b.staleness)
    undo()
    assert c.open.contributed == before[1] and c.open.staleness == [0] and list(c.open.accepted) == ["a/1"]
    for k, v in before[0].items():
        np.testing.assert_array_equal(c.open.partial.sums[k], v)


def test_the_buffer_survives_the_store_exactly(tmp_path):
    """A restart mid-buffer: the saved buffer, its staleness and every device's last
    contribution come back, and the resumed coordinator applies the same aggregate."""
    c, clock = make(buffer_size=3)
    c.version, c.next_round = 2, 3
    c.device_status("a", True)
    c.maybe_open()
    model = GlobalModel(2, {k: np.full(s, 0.25, np.float32) for k, s in SHAPES.items()})
    offer(c, model, "a", 3, 2, delta(1), n=7)
    offer(c, model, "b", 2, 1, delta(2), n=9)
    store = StateStore(tmp_path)
    store.save(
        job="job",
        next_round=c.next_round,
        completed=2,
        version=2,
        history=[],
        global_adapter=model.tensors,
        open_round=c.open,
    )
    store.close()
    saved = StateStore(tmp_path).load()
    r, _ = make(buffer_size=3, clock=clock)
    r.version, r.next_round, r.completed = saved["version"], saved["next_round"], saved["completed"]
    r.resume(saved["open_round"])
    assert r.open.staleness == [0, 1] and r.open.contributed == {"a": 3, "b": 2}
    assert r.maybe_open() is None  # resumed, not a new buffer
    with pytest.raises(UpdateRejected) as exc:
        r.judge("job", ClientUpdate("b", 2, 2, 10, delta(2)), 1)
    assert exc.value.reason == "duplicate"
    for coordinator in (c, r):
        offer(coordinator, model, "c", 3, 2, delta(3), n=4)
    a, b = c.maybe_close(), r.maybe_close()
    for k in SHAPES:
        np.testing.assert_array_equal(
            c.strategy.finalize(a.partial, model).tensors[k], r.strategy.finalize(b.partial, model).tensors[k]
        )
    assert r.open.contributed == {"a": 3, "b": 2, "c": 3}  # carried into the next buffer


# -- the announcement ------------------------------------------------------------------------
def announcement(mode):
    return Announcement(
        job="j",
        state=RoundState.OPEN,
        round=4,
        global_version=3,
        rank=8,
        deadline=1e9,
        strategy=StrategyInfo("fedavg"),
        train=TrainInfo(5, 8, 0.005),
        mode=mode,
    )


def test_an_async_announcement_is_protocol_version_2_and_round_trips():
    ann = announcement(RoundMode.ASYNC)
    body = ann.to_json()
    assert body["v"] == 2 and body["mode"] == "async" and body["selected"] == []
    parsed = parse_announcement(ann.to_bytes())
    assert parsed == ann and parsed.is_async
    sync = announcement(RoundMode.SYNC)
    assert "mode" not in sync.to_json() and sync.to_json()["v"] == 1
    assert not parse_announcement(sync.to_bytes()).is_async
    waiting = Announcement(job="j", state=RoundState.FINISHED, round=4, global_version=4, rank=8, mode=RoundMode.ASYNC)
    assert parse_announcement(waiting.to_bytes()) == waiting


@pytest.mark.parametrize(
    "change, message",
    [
        ({"mode": "async"}, "unknown field 'mode'"),  # v1 has no mode
        ({"v": 2}, "field 'mode' is missing"),
        ({"v": 2, "mode": "sync"}, "is not one of async"),
        ({"v": 2, "mode": ["async"]}, "must be a string"),
        ({"v": 4, "mode": "async"}, "protocol version 4"),
        ({"v": 3, "shards": 2, "mode": "async"}, "unknown field 'mode'"),  # sharded rounds are sync
    ],
)
def test_malformed_mode_fields_are_refused(change, message):
    import json

    body = {**announcement(RoundMode.SYNC).to_json(), **change}
    with pytest.raises(ProtocolError, match=message):
        parse_announcement(json.dumps(body).encode())


# -- configuration ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "rounds, message",
    [
        ({"mode": "fedbuff"}, "rounds.mode must be one of sync, async"),
        ({"buffer_size": 0}, "rounds.buffer_size must be in"),
        ({"staleness_weighting": "linear"}, "rounds.staleness_weighting must be one of"),
        ({"staleness_exponent": -1}, "rounds.staleness_exponent must be in"),
        ({"staleness_hinge": -1}, "rounds.staleness_hinge must be in"),
        ({"max_staleness": -1}, "rounds.max_staleness must be in"),
        ({"mode": "async", "devices_per_round": 3}, "devices_per_round must be 0 in async mode"),
        ({"mode": "async", "buffer_size": 2, "min_updates": 3}, "min_updates 3 exceeds rounds.buffer_size 2"),
    ],
)
def test_bad_round_settings_are_refused(rounds, message):
    with pytest.raises(ConfigError, match=message):
        RoundSettings(**rounds)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_each_strategy_is_allowed_or_refused_in_async_mode_with_the_reason(name):
    raw = {"bundle": "b", "strategy": name, "rounds": {"mode": "async"}}
    refused = {"flexlora", "flexlora-delta", "flora", "fedex-lora"}
    if name in refused:
        with pytest.raises(ConfigError, match=f"cannot use strategy {name}: .+; use fedavg"):
            build(ServerConfig, raw, where="test")
    else:
        assert build(ServerConfig, raw, where="test").rounds.mode == "async"


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"privacy": {"mode": "central"}}, "does not work with privacy"),
        ({"robust": {"method": "median"}}, "robust.method mean only"),
        (
            {"secure_aggregation": {"enabled": True}, "rounds": {"mode": "async", "min_devices": 3}},
            "secure_aggregation",
        ),
    ],
)
def test_async_mode_refuses_privacy_and_robust_methods(extra, message):
    with pytest.raises(ConfigError, match=message):
        build(ServerConfig, {"bundle": "b", "rounds": {"mode": "async"}, **extra}, where="test")


def test_async_settings_come_from_the_environment(monkeypatch):
    from server.config import load_server_config

    monkeypatch.setenv("FEDLORA_BUNDLE", "b")
    monkeypatch.setenv("FEDLORA_ROUNDS_MODE", "async")
    monkeypatch.setenv("FEDLORA_ROUNDS_BUFFER_SIZE", "4")
    monkeypatch.setenv("FEDLORA_ROUNDS_STALENESS_WEIGHTING", "hinge")
    monkeypatch.setenv("FEDLORA_ROUNDS_MAX_STALENESS", "3")
    r = load_server_config().rounds
    assert (r.mode, r.buffer_size, r.staleness_weighting, r.max_staleness) == ("async", 4, "hinge", 3)


def test_simulate_flags_reach_the_round_settings(monkeypatch, tmp_path):
    from simulator import cli, run

    seen = {}
    monkeypatch.setattr(run, "run_simulation", lambda cfg: seen.setdefault("cfg", cfg))
    argv = ["simulate", "--round-mode", "async", "--buffer-size", "3", "--staleness-weighting", "hinge"]
    argv += ["--staleness-exponent", "2", "--staleness-hinge", "1", "--max-staleness", "6"]
    assert cli.main(argv) == 0
    cfg = seen["cfg"]
    assert cfg.round_settings == {
        "mode": "async",
        "buffer_size": 3,
        "staleness_weighting": "hinge",
        "staleness_exponent": 2.0,
        "staleness_hinge": 1,
        "max_staleness": 6,
    }
    from core.transport import BrokerConfig

    server = run.server_config(cfg, "j", tmp_path, BrokerConfig(), tmp_path / "state")
    assert server.rounds.mode == "async" and server.rounds.buffer_size == 3 and server.rounds.max_staleness == 6
    seen.clear()
    assert cli.main(["simulate", "--round-mode", "async", "--strategy", "flora"]) == 2  # refused with a message


def test_a_device_keeps_one_update_in_flight_across_versions_in_async_mode():
    """due_round and _drop_stale_pending in async mode: no selection needed, no second update
    while one is pending, a pending update of an older round kept until answered, and dropped
    once the job is finished."""
    import types

    import edge_client.device as device

    def fake(ann, pending):
        cleared = []
        state = types.SimpleNamespace(last_round=1, pending_round=pending, clear_pending=cleared.append)
        return types.SimpleNamespace(
            announcement=ann,
            cfg=types.SimpleNamespace(device_id="d", train_window=""),
            state=state,
            global_version=3,
            _window_wait_round=None,
            _online=True,
        ), cleared

    ann = announcement(RoundMode.ASYNC)  # round 4 from version 3, nobody selected
    free, _ = fake(ann, None)
    assert device.Device.due_round(free) == ann  # every device of an async job may train
    busy, cleared = fake(ann, 2)
    assert device.Device.due_round(busy) is None  # its round-2 update is still pending
    device.Device._drop_stale_pending(busy)
    assert cleared == []  # kept: the aggregator takes it until it is too stale
    sync, cleared = fake(announcement(RoundMode.SYNC), 2)
    assert device.Device.due_round(sync) is None  # sync: not selected
    device.Device._drop_stale_pending(sync)
    assert cleared == [None]  # sync: a later round is open, the pending update is dropped
    done = Announcement(job="j", state=RoundState.FINISHED, round=6, global_version=6, rank=8, mode=RoundMode.ASYNC)
    ended, cleared = fake(done, 5)
    device.Device._drop_stale_pending(ended)
    assert cleared == [None]
