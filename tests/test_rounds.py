import numpy as np
import pytest

from core.errors import ConfigError, UpdateRejected
from server.rounds import Coordinator, RoundSettings
from server.strategies.base import ClientUpdate, GlobalModel
from server.strategies.fedavg import FedAvg

SHAPES = {"A": (2,)}


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def make(settings=None, **kw):
    clock = Clock()
    c = Coordinator(
        settings or RoundSettings(rounds=3, min_devices=2, round_timeout=60), FedAvg(SHAPES, rank=1), "job", clock, **kw
    )
    return c, clock


def update(device, rnd, value=1.0, n=1):
    return ClientUpdate(device, rnd, 1, n, {"A": np.full(2, value, np.float32)})


def test_opens_only_with_enough_devices_online_and_selects_among_them():
    c, _ = make(RoundSettings(rounds=2, min_devices=2, devices_per_round=2))
    c.device_status("a", True)
    assert c.maybe_open() is None
    c.device_status("b", False)
    c.device_status("c", True)
    c.device_status("d", True)
    rnd = c.maybe_open()
    assert rnd.round == 1 and len(rnd.selected) == 2 and set(rnd.selected) <= {"a", "c", "d"}
    assert c.maybe_open() is None  # one round at a time


def test_judge_gives_each_reason():
    c, _ = make(RoundSettings(rounds=3, min_devices=2, round_timeout=60, norm_bound="reject", max_update_norm=1e4))
    for d in ("a", "b", "x"):
        c.device_status(d, True)
    c.settings.devices_per_round = 0
    rnd = c.maybe_open()
    c.open.selected = ["a", "b"]
    cases = [
        ("other", update("a", rnd.round), "wrong_job"),
        ("job", update("a", 0), "stale_round"),
        ("job", update("a", 5), "future_round"),
        ("job", update("x", rnd.round), "not_selected"),
        ("job", update("a", rnd.round, value=1e6), "norm_too_large"),
    ]
    for job, u, reason in cases:
        with pytest.raises(UpdateRejected) as info:
            c.judge(job, u)
        assert info.value.reason == reason
    c.judge("job", update("a", rnd.round))
    c.accept(update("a", rnd.round))
    with pytest.raises(UpdateRejected, match="duplicate"):
        c.judge("job", update("a", rnd.round))


def test_closes_when_all_selected_reported():
    c, _ = make()
    c.device_status("a", True)
    c.device_status("b", True)
    rnd = c.maybe_open()
    c.accept(update("a", rnd.round, 1.0, n=1))
    assert c.maybe_close() is None
    c.accept(update("b", rnd.round, 3.0, n=3))
    out = c.maybe_close()
    assert out.ok and out.reason == "all_reported" and out.accepted == {"a": 1, "b": 3}
    assert c.completed == 1 and c.version == rnd.round
    model = c.strategy.finalize(out.partial, GlobalModel(1, {"A": np.zeros(2, np.float32)}))
    np.testing.assert_allclose(model.tensors["A"], [2.5, 2.5])


def test_dropout_closes_early_and_deadline_closes_with_quorum():
    c, clock = make()
    for d in "abc":
        c.device_status(d, True)
    rnd = c.maybe_open()
    c.accept(update("a", rnd.round))
    c.device_status("b", False)  # last will: dropped out
    assert c.maybe_close() is None  # c still online
    clock.t += 61
    out = c.maybe_close()
    assert out.ok and out.reason == "deadline" and list(out.accepted) == ["a"]


def test_round_fails_without_quorum_and_next_round_gets_a_new_id():
    c, clock = make(RoundSettings(rounds=3, min_devices=2, min_updates=2, round_timeout=10))
    c.device_status("a", True)
    c.device_status("b", True)
    r1 = c.maybe_open()
    c.accept(update("a", r1.round))
    clock.t += 11
    out = c.maybe_close()
    assert not out.ok and out.reason.startswith("quorum_not_met") and c.completed == 0 and c.version == 0
    assert c.maybe_open().round == r1.round + 1


def test_finishes_after_configured_rounds():
    c, _ = make(RoundSettings(rounds=1, min_devices=1))
    c.device_status("a", True)
    rnd = c.maybe_open()
    c.accept(update("a", rnd.round))
    assert c.maybe_close().ok and c.finished and c.maybe_open() is None


@pytest.mark.parametrize(
    "kw",
    [
        dict(rounds=-1),
        dict(min_devices=0),
        dict(min_updates=0),
        dict(round_timeout=0),
        dict(devices_per_round=2, min_updates=3),
        dict(max_update_norm=-1),
    ],
)
def test_bad_settings_are_refused(kw):
    with pytest.raises(ConfigError):
        RoundSettings(**kw)


def test_norm_bound_clips_by_default_and_weights_are_capped_by_the_median_claim():
    c, _ = make(RoundSettings(rounds=3, min_devices=2, round_timeout=60, max_update_norm=2.0, max_weight_ratio=3.0))
    for d, n in (("a", 10), ("b", 20), ("c", 30), ("liar", 10**12)):
        c.device_status(d, True, num_examples=n)
    rnd = c.maybe_open()
    assert rnd.max_weight == 3 * 25  # the median of 10, 20, 30 and the liar's claim, times 3
    honest = c.judge("job", update("a", rnd.round, value=0.5, n=10))
    assert not honest.clipped and not honest.weight_capped and honest.update.num_examples == 10
    liar = c.judge("job", update("liar", rnd.round, value=1e6, n=10**12))
    assert liar.clipped and liar.weight_capped and liar.update.num_examples == 75
    assert np.linalg.norm(liar.update.tensors["A"]) == pytest.approx(2.0, rel=1e-6)
    assert liar.norm == pytest.approx(1e6 * np.sqrt(2))
    # The liar's share of the aggregate is bounded: 75 of 10 + 75.
    c.accept(honest.update)
    c.accept(liar.update)
    assert c.open.partial.weight == 85


def test_accept_can_be_undone():
    c, _ = make()
    for d in ("a", "b"):
        c.device_status(d, True)
    rnd = c.maybe_open()
    c.accept(update("a", rnd.round, value=1.0, n=2))
    before = {k: v.copy() for k, v in c.open.partial.sums.items()}
    undo = c.accept(update("b", rnd.round, value=5.0, n=3))
    undo()
    assert c.open.accepted == {"a": 2} and c.open.partial.weight == 2
    np.testing.assert_array_equal(c.open.partial.sums["A"], before["A"])


def test_the_norm_bound_follows_the_previous_rounds_median():
    settings = RoundSettings(rounds=3, min_devices=2, round_timeout=60, norm_clip_multiple=3.0)
    c, _ = make(settings, norm_prior=5.0)
    for d in ("a", "b", "c"):
        c.device_status(d, True)
    rnd = c.maybe_open()
    assert rnd.max_norm == 5.0  # no history: the prior
    for d, v in (("a", 1.0), ("b", 2.0), ("c", 100.0)):
        b = c.judge("job", update(d, rnd.round, value=v))
        c.accept(b.update, b.norm)
    outcome = c.maybe_close()
    assert outcome.median_norm == pytest.approx(2.0 * np.sqrt(2))  # norms as sent: the outlier is not clipped away
    assert c.maybe_open().max_norm == pytest.approx(3 * 2.0 * np.sqrt(2))
    settings.max_update_norm = 1.0  # an absolute bound below: the smaller one holds
    assert c.norm_cap() == 1.0
