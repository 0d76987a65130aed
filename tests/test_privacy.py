"""Client-level differential privacy: the accountant, the budget, the noise, adaptive clipping,
the device's clipping (with error feedback), the announcement field, and the coordinator."""

import math
import random
from pathlib import Path

import numpy as np
import pytest

from core.errors import ConfigError, ProtocolError
from core.messages import (
    Announcement,
    PrivacyInfo,
    RoundState,
    StrategyInfo,
    TrainInfo,
    parse_announcement,
)
from core.protocol import Envelope, EnvelopeLimits, decode_envelope
from edge_client.feedback import ErrorFeedback, encode_with_feedback
from edge_client.privacy import Privatizer, clip_to_norm, l2_norm
from server.config import ServerConfig
from server.privacy import (
    DifferentialPrivacy,
    PrivacySettings,
    below_clip_bits,
    check_budget,
    epsilon,
    linear_keys,
    rounds_within,
)
from server.rounds import Coordinator, RoundSettings
from server.strategies import make_strategy
from server.strategies.base import AdapterLayout, ClientUpdate, LoraModule, Partial

M = LoraModule.named("m", in_features=40, out_features=30)
LAYOUT = AdapterLayout((M,), {"cls": (3,)}, scale=2.0)


# -- the accountant ------------------------------------------------------------------------
def test_epsilon_grows_with_rounds_and_sampling_and_shrinks_with_noise():
    d = 1e-5
    assert epsilon([], d) == 0.0
    one, ten = epsilon([(1.0, 1.0)], d), epsilon([(1.0, 1.0)] * 10, d)
    assert 0 < one < ten
    assert epsilon([(0.1, 1.0)] * 10, d) < ten  # amplification by sampling
    assert epsilon([(1.0, 2.0)] * 10, d) < ten
    assert epsilon({(1.0, 1.0): 10}, d) == pytest.approx(ten)


def test_gaussian_mechanism_epsilon_is_in_the_known_range():
    """One Gaussian mechanism at z = 1, delta 1e-5: the exact epsilon is about 4.4 (Balle and
    Wang's analytic Gaussian); RDP conversion gives an upper bound a little above it."""
    eps = epsilon([(1.0, 1.0)], 1e-5)
    assert 4.3 < eps < 5.5


def test_rounds_within_is_the_last_round_under_the_budget():
    n = rounds_within(8.0, 0.2, 1.0, 1e-5)
    assert epsilon({(0.2, 1.0): n}, 1e-5) <= 8.0 < epsilon({(0.2, 1.0): n + 1}, 1e-5)
    assert rounds_within(0.01, 1.0, 1.0, 1e-5) == 0


def test_a_job_whose_rounds_exceed_the_budget_refuses_to_start():
    s = PrivacySettings(mode="central", noise_multiplier=1.0, epsilon_budget=8.0)
    with pytest.raises(ConfigError, match=r"100 rounds .* over the budget 8; \d+ rounds fit"):
        check_budget(s, rounds=100, devices_per_round=0, min_devices=2)
    check_budget(s, rounds=2, devices_per_round=0, min_devices=2)  # fits
    with pytest.raises(ConfigError, match="over the budget"):
        ServerConfig(bundle=Path("b"), privacy=s, rounds=RoundSettings(rounds=100))


@pytest.mark.parametrize(
    "values, message",
    [
        ({"mode": "local"}, "privacy.mode must be one of"),
        ({"accounting": "pld"}, "privacy.accounting must be one of"),
        ({"noise_multiplier": 0}, "noise_multiplier must be in"),
        ({"clip_norm": -1}, "clip_norm must be in"),
        ({"target_quantile": 1.0}, "target_quantile must be in"),
        ({"clip_learning_rate": 0}, "clip_learning_rate must be in"),
        (
            {"adaptive_clip": True, "noise_multiplier": 2.0, "clip_count_stddev": 0.5},
            "must exceed noise_multiplier / 2",
        ),
        ({"delta": 0.5}, "delta must be in"),
        ({"epsilon_budget": -1}, "epsilon_budget must be >= 0"),
    ],
)
def test_bad_privacy_settings_are_refused(values, message):
    with pytest.raises(ConfigError, match=message):
        PrivacySettings(**values)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"strategy": "flexlora"}, "linear in each update"),
        ({"strategy": "hetlora"}, "hetlora with weighting sparsity"),
        ({"robust": {"method": "median"}}, "robust.method median has no such sum"),
        ({"rounds": {"norm_bound": "reject"}}, "norm_bound: clip"),
    ],
)
def test_privacy_refuses_strategies_and_settings_without_a_sensitivity_bound(config, message):
    from core.config import build

    with pytest.raises(ConfigError, match=message):
        build(ServerConfig, {"bundle": "b", "privacy": {"mode": "central"}, **config}, where="test")
    build(ServerConfig, {"bundle": "b", "privacy": {"mode": "central"}, "strategy": "hetlora",
                         "strategy_settings": {"weighting": "examples"}}, where="test")  # fmt: skip


# -- the aggregator's noise and clip -------------------------------------------------------
def partial_of(count: int, value: float = 0.0) -> Partial:
    sums = {M.a: np.full((2, 40), value * count), M.b: np.full((30, 2), value * count), "cls": np.zeros(3)}
    sums[M.key("weight")] = np.array(float(count))
    return Partial(sums, float(count), count, [f"d{i}" for i in range(count)])


def test_central_noise_has_std_z_times_clip_on_the_update_sums_only():
    dp = DifferentialPrivacy(
        PrivacySettings(mode="central", noise_multiplier=1.5, clip_norm=0.2), [], rng=np.random.default_rng(0)
    )
    p = partial_of(10)
    noised, noise = dp.noised(p, linear_keys(p.sums), selected=10, below=[1.0] * 10)
    values = np.concatenate([noised.sums[M.a].ravel(), noised.sums[M.b].ravel()])
    assert noise.noise_std == pytest.approx(0.3)
    assert np.std(values) == pytest.approx(0.3, rel=0.1)
    assert float(noised.sums[M.key("weight")]) == 10.0  # a strategy's count is not an update sum
    assert np.all(p.sums[M.a] == 0)  # the input is not changed
    assert noised.weight == 10.0 and noised.count == 10


def test_distributed_noise_is_topped_up_for_devices_that_did_not_report():
    s = PrivacySettings(mode="distributed", noise_multiplier=1.0, clip_norm=1.0)
    dp = DifferentialPrivacy(s, [], values=10_000, rng=np.random.default_rng(1))
    assert dp.device_noise_std(16) == pytest.approx(1.0 / 4)  # K devices' shares sum to z C
    _, all_reported = dp.noised(partial_of(16), {M.a}, selected=16, below=[])
    _, half = dp.noised(partial_of(8), {M.a}, selected=16, below=[])
    assert all_reported.noise_std == 0.0
    assert half.noise_std == pytest.approx(math.sqrt(0.5))  # 8 device shares + this = variance (z C)^2


def test_under_distributed_dp_the_aggregator_bound_leaves_room_for_honest_noise():
    """Clipping a noised update back to C would scale its noise down: less noise than accounted."""
    s = PrivacySettings(mode="distributed", noise_multiplier=1.0, clip_norm=0.1)
    dp = DifferentialPrivacy(s, [], values=50_000)
    info = PrivacyInfo(clip=dp.clip, noise_std=dp.device_noise_std(4))
    rng = np.random.default_rng(7)
    for _ in range(20):
        sent = Privatizer(info, rng=rng)({"w": rng.normal(0, 1, 50_000).astype(np.float32)})
        assert 0.1 < l2_norm(sent) <= dp.norm_bound(4)
    assert dp.norm_bound(4) < 0.1 + info.noise_std * math.sqrt(50_000) * 1.05  # and not much more
    with pytest.raises(ConfigError, match="number of values"):
        DifferentialPrivacy(s, [])
    assert DifferentialPrivacy(PrivacySettings(mode="central", clip_norm=0.1), []).norm_bound(4) == 0.1


def test_adaptive_clip_moves_towards_the_target_quantile():
    s = PrivacySettings(mode="central", noise_multiplier=0.1, clip_norm=1.0, adaptive_clip=True, clip_count_stddev=0.06)
    dp = DifferentialPrivacy(s, [], rng=np.random.default_rng(2))
    _, all_below = dp.noised(partial_of(100), {M.a}, 100, [1.0] * 100)
    _, none_below = dp.noised(partial_of(100), {M.a}, 100, [0.0] * 100)
    assert all_below.next_clip == pytest.approx(math.exp(-0.2 * 0.5), rel=1e-3)  # shrinks
    assert none_below.next_clip == pytest.approx(math.exp(0.2 * 0.5), rel=1e-3)  # grows
    # the update noise pays for the clip-count release: z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2
    assert all_below.noise_multiplier == pytest.approx((0.1**-2 - 0.12**-2) ** -0.5)


def test_record_spends_the_round_and_a_restart_resumes_from_the_history():
    s = PrivacySettings(mode="central", noise_multiplier=1.0, adaptive_clip=True, clip_norm=0.5)
    dp = DifferentialPrivacy(s, [], rng=np.random.default_rng(3))
    history = []
    for q in (0.5, 0.5, 0.25):
        _, noise = dp.noised(partial_of(4), {M.a}, 4, [1.0] * 4)
        history.append({"ok": True, **dp.record(q, noise)})
    row = history[-1]
    assert row["dp_epsilon"] == pytest.approx(epsilon([(0.5, 1.0), (0.5, 1.0), (0.25, 1.0)], 1e-5), rel=1e-5)
    assert row["dp_epsilon_every_round"] >= row["dp_epsilon"] and row["dp_delta"] == 1e-5
    resumed = DifferentialPrivacy(s, history + [{"ok": False}])
    assert resumed.spent == dp.spent and resumed.clip == dp.clip == row["dp_next_clip"]


def test_under_sampled_accounting_selection_is_poisson_sampling_the_accountant_assumes():
    # PoissonSampledDpEvent(q) holds for a sample that takes each device independently with
    # probability q: the round's size varies and every device is in about q of the rounds.
    s = PrivacySettings(mode="central", noise_multiplier=1.0, clip_norm=0.5)
    c = Coordinator(
        RoundSettings(rounds=0, min_devices=2, devices_per_round=10),
        make_strategy("fedavg", LAYOUT, rank=2),
        "j",
        lambda: 0.0,
        privacy=DifferentialPrivacy(s, []),
    )
    for i in range(50):
        c.device_status(f"d{i:02d}", True, rank=2, num_examples=10)
    sizes, times = [], dict.fromkeys(c.online(), 0)
    for _ in range(400):
        rnd = c.maybe_open()
        assert rnd is not None and rnd.sampling_rate == 0.2 and rnd.selected == sorted(set(rnd.selected))
        sizes.append(len(rnd.selected))
        for d in rnd.selected:
            times[d] += 1
        c.open = None
    # Binomial(50, 0.2): mean 10, sd 2.83; over 400 rounds the mean is within 0.5 of 10 (4 sd)
    assert abs(np.mean(sizes) - 10) < 0.5 and len(set(sizes)) > 5
    assert all(40 <= n <= 120 for n in times.values())  # each about 80 (sd 8)
    # the fixed-size sample stays where the accountant does not amplify (every_round) and without DP
    every = Coordinator(
        RoundSettings(rounds=0, min_devices=2, devices_per_round=10),
        make_strategy("fedavg", LAYOUT, rank=2),
        "j",
        lambda: 0.0,
        privacy=DifferentialPrivacy(PrivacySettings(mode="central", accounting="every_round"), []),
    )
    for i in range(50):
        every.device_status(f"d{i:02d}", True, rank=2, num_examples=10)
    assert all(len(every.select(every.online(), 10)) == 10 for _ in range(50))


def test_an_empty_poisson_sample_fails_its_round_at_once_instead_of_waiting_for_the_deadline():
    c = Coordinator(
        RoundSettings(rounds=0, min_devices=1, min_updates=1), make_strategy("fedavg", LAYOUT, rank=2), "j", lambda: 0.0
    )
    c.device_status("d0", True, rank=2, num_examples=10)
    rnd = c.maybe_open()
    assert rnd is not None
    rnd.selected = []  # what a Poisson sample drew
    out = c.maybe_close()
    assert out is not None and not out.ok and out.reason.startswith("quorum_not_met")


def test_below_clip_bits_are_clamped_and_fall_back_to_the_norm_as_sent():
    bits = below_clip_bits(
        [{"dp_below_clip": 1.0}, {"dp_below_clip": 7.0}, {"dp_below_clip": -3.0}, {}], [0, 0, 0, 0.5], 1.0
    )
    assert bits == [1.0, 1.0, 0.0, 1.0]


def test_the_coordinator_under_privacy_weighs_each_update_once_clips_to_c_and_stops_at_the_budget():
    s = PrivacySettings(mode="central", noise_multiplier=1.0, clip_norm=0.5, epsilon_budget=5.0)
    dp = DifferentialPrivacy(s, [])
    strategy = make_strategy("fedavg", LAYOUT, rank=2)
    c = Coordinator(
        RoundSettings(rounds=0, min_devices=4, devices_per_round=20), strategy, "j", lambda: 0.0, privacy=dp
    )
    for i in range(40):  # a Poisson sample at q = 0.5: empty with probability 2^-40
        c.device_status(f"d{i}", True, rank=2, num_examples=1000)
    rnd = c.maybe_open()
    assert rnd is not None and rnd.max_norm == 0.5 and rnd.sampling_rate == 0.5
    assert isinstance(c.rng, random.SystemRandom)  # a secret random sample, not the seeded selection
    big = {M.a: np.ones((2, 40), np.float32), M.b: np.ones((30, 2), np.float32), "cls": np.ones(3, np.float32)}
    bounded = c.judge("j", ClientUpdate(rnd.selected[0], rnd.round, 2, 1000, big))
    assert bounded.update.num_examples == 1 and bounded.clipped
    assert l2_norm(bounded.update.tensors) == pytest.approx(0.5, rel=1e-5)
    rounds = 1
    c.open = None
    while c.maybe_open() is not None:  # as if each round completed: spend it
        _, noise = dp.noised(partial_of(2), set(), 2, [])
        dp.record(0.5, noise)
        c.open = None
        rounds += 1
        assert rounds < 1000
    assert c.stopped.startswith("privacy budget") and c.finished
    assert rounds > 1 and dp.epsilons()[0] <= 5.0 < dp.epsilons(extra_q=0.5)[0]


# -- the device's side ---------------------------------------------------------------------
def test_clip_to_norm_scales_only_what_exceeds_the_bound():
    t = {"a": np.full(4, 3.0, np.float32), "b": np.full(9, 4.0 / 3, np.float32)}  # norm sqrt(36 + 16) = 7.2
    clipped, below = clip_to_norm(t, 1.0)
    assert not below and l2_norm(clipped) == pytest.approx(1.0, rel=1e-6)
    assert np.allclose(clipped["a"] / clipped["a"][0], 1.0)  # direction kept
    same, below = clip_to_norm(t, 100.0)
    assert below and all(np.array_equal(same[k], t[k]) for k in t)


def test_privatizer_adds_noise_of_the_announced_std_after_clipping():
    change = {"w": np.full(20_000, 1.0, np.float32)}
    private = Privatizer(PrivacyInfo(clip=1.0, noise_std=0.05), rng=np.random.default_rng(4))(change)
    assert np.std(private["w"]) == pytest.approx(0.05, rel=0.05)
    assert np.mean(private["w"]) == pytest.approx(1.0 / math.sqrt(20_000), abs=0.002)


def test_with_a_lossy_codec_the_residual_holds_only_the_codec_error_of_the_clipped_change():
    """Error feedback adds the residual before clipping; what is clipped off is dropped, so the
    next round's residual is what the codec lost from the clipped update, never the excess."""
    rng = np.random.default_rng(5)
    fb = ErrorFeedback()
    clip = 0.5
    for _ in range(3):
        change = {"w": rng.normal(0, 1.0, (64, 64)).astype(np.float32)}  # norm ~64, far above the clip
        privatize = Privatizer(PrivacyInfo(clip=clip), rng=rng)
        sent = privatize(fb.compensate(change))
        assert l2_norm(sent) == pytest.approx(clip, rel=1e-5) and privatize.below_clip is False
        env = Envelope(kind="update", job="j", round=1, sender="d", rank=1, codec="int8", tensors=sent)
        payload = encode_with_feedback(env, fb, compensated=True)
        decoded = decode_envelope(payload, EnvelopeLimits.for_update({"w": (64, 64)})).tensors
        assert l2_norm(decoded) < clip * 1.05
        assert fb.norm() < 0.05 * clip  # only int8's rounding of the clipped change


# -- the announcement ----------------------------------------------------------------------
def open_announcement(privacy):
    return Announcement(
        job="j",
        state=RoundState.OPEN,
        round=2,
        global_version=1,
        rank=4,
        deadline=10.0,
        selected=("d1",),
        strategy=StrategyInfo("fedavg"),
        train=TrainInfo(5, 4, 0.001),
        privacy=privacy,
    )


def test_the_announcement_carries_privacy_only_when_it_is_on():
    on = parse_announcement(open_announcement(PrivacyInfo(0.25, 0.01)).to_bytes())
    assert on.privacy == PrivacyInfo(0.25, 0.01)
    off = open_announcement(None).to_bytes()
    assert b"privacy" not in off and parse_announcement(off).privacy is None


@pytest.mark.parametrize(
    "privacy, message",
    [
        ({"clip": 0}, "clip"),
        ({"clip": -1.0}, "clip"),
        ({"clip": 1e300}, "clip"),
        ({"clip": 1.0, "noise_std": -0.1}, "noise_std"),
        ({"clip": 1.0, "noise_std": "x"}, "noise_std"),
        ({"clip": 1.0, "epsilon": 3}, "unknown field"),
        ({}, "clip"),
        ([1, 2], "is not an object"),
    ],
)
def test_bad_privacy_fields_are_refused_with_a_protocol_error(privacy, message):
    import json

    body = json.loads(open_announcement(PrivacyInfo(1.0)).to_bytes())
    body["privacy"] = privacy
    with pytest.raises(ProtocolError, match=message):
        parse_announcement(json.dumps(body).encode())


# -- a real round through Mosquitto --------------------------------------------------------
def test_a_private_round_through_a_real_broker_clips_noises_and_reports_epsilon(tmp_path, minilm_bundle, mosquitto):
    from test_aggregator import FakeDevice, start_aggregator, update_payload, wait_for

    from core.bundle import Bundle
    from edge_client.runtime import read_parameters

    bundle = Bundle(minilm_bundle)
    settings = PrivacySettings(mode="central", noise_multiplier=0.5, clip_norm=0.05)
    agg, stop, thread, link = start_aggregator(
        minilm_bundle, tmp_path / "state", mosquitto.url, job="dp", privacy=settings
    )
    dev = FakeDevice(mosquitto.url, "dp", "d1")
    try:
        dev.online()
        announced = wait_for(dev.open_round, timeout=120, what="round 1 to open")  # generous: a loaded machine
        assert announced["privacy"] == {"clip": 0.05, "noise_std": 0.0}
        dev.send(update_payload(bundle, "dp", "d1", announced["round"]))  # 0.01 everywhere: far above the clip
        # the round counts as completed before finalize runs: wait for the version it makes
        wait_for(lambda: agg.model.version == 1 and agg.history, timeout=120, what="round 1's global")
        row = agg.history[0]
        assert row["dp_epsilon"] == pytest.approx(epsilon([(1.0, 0.5)], 1e-5), rel=1e-5)
        assert row["dp_clip"] == 0.05 and row["examples"] == 1  # one vote, whatever it claimed
        assert agg.metrics.dp_epsilon._value.get() == row["dp_epsilon"]
        initial = read_parameters(bundle)
        sent = {p.name: np.full(p.shape, 0.01, np.float32) for p in bundle.manifest.trainable}
        clipped, _ = clip_to_norm(sent, 0.05)
        residual = np.concatenate(
            [(agg.global_adapter[n].astype(np.float64) - initial[n] - clipped[n]).ravel() for n in sent]
        )
        assert np.std(residual) == pytest.approx(0.5 * 0.05, rel=0.05)  # the noise: z * C on one update
        events = [e for e in agg.store.events() if e["event"] == "update_accepted"]
        assert events[-1]["clipped"] is True
    finally:
        stop.set()
        thread.join(10)
        link.close()
        dev.link.close()


# -- fedlora simulate's flags --------------------------------------------------------------
def test_every_robust_and_privacy_setting_has_a_simulate_flag_that_reaches_the_server_config(monkeypatch):
    import dataclasses

    from server.robust import RobustSettings
    from simulator import cli, run

    seen = []
    monkeypatch.setattr(run, "run_simulation", lambda cfg: seen.append(cfg))
    robust = ["simulate", "--robust-method", "bucket_median", "--robust-trim-fraction", "0.2", "--robust-buckets", "7"]
    dp = ["simulate", "--dp-mode", "distributed", "--dp-noise-multiplier", "1.5", "--dp-clip-norm", "0.3"]
    dp += ["--dp-adaptive-clip", "true", "--dp-target-quantile", "0.7", "--dp-clip-learning-rate", "0.1"]
    dp += ["--dp-clip-count-stddev", "2", "--dp-delta", "1e-6", "--dp-epsilon-budget", "0"]
    dp += ["--dp-accounting", "every_round", "--devices-per-round", "4"]
    flags = {a for a in robust + dp if a.startswith("--")}
    for group, cls in (("robust", RobustSettings), ("dp", PrivacySettings)):
        assert {f"--{group}-{f.name.replace('_', '-')}" for f in dataclasses.fields(cls)} <= flags
    assert cli.main(robust) == 0 and cli.main(dp) == 0
    broker = run.BrokerConfig(url="mqtt://x:1")
    assert seen[0].robust == {"method": "bucket_median", "trim_fraction": 0.2, "buckets": 7}
    assert run.server_config(seen[0], "job", Path("b"), broker, Path("s")).robust.buckets == 7
    assert seen[1].privacy["mode"] == "distributed" and seen[1].privacy["adaptive_clip"] is True
    assert seen[1].round_settings == {"devices_per_round": 4}
    server = run.server_config(seen[1], "job", Path("b"), broker, Path("s"))
    assert server.privacy.accounting == "every_round" and server.privacy.delta == 1e-6
    assert server.rounds.devices_per_round == 4


def test_bad_simulate_privacy_settings_fail_before_any_work(capsys, monkeypatch):
    from simulator import cli, run

    monkeypatch.setattr(run, "run_simulation", lambda cfg: pytest.fail("the run started"))
    assert cli.main(["simulate", "--dp-mode", "central", "--strategy", "flora"]) == 2
    assert "linear in each update" in capsys.readouterr().err
    assert cli.main(["simulate", "--dp-mode", "central", "--robust-method", "median"]) == 2
    assert "has no such sum" in capsys.readouterr().err
    assert cli.main(["simulate", "--dp-mode", "loud"]) == 2
    assert "privacy.mode must be one of" in capsys.readouterr().err
