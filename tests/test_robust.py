"""Robust aggregation (server/robust.py): poisoned updates against the plain mean and the
robust centers, on a small adapter whose honest updates are known."""

import random

import numpy as np
import pytest

from core.errors import ConfigError
from server.robust import RobustSettings, RobustStrategy, robust_partial, trimmed_mean, with_robust
from server.rounds import Coordinator, RoundSettings, update_norm
from server.strategies import make_strategy
from server.strategies.base import AdapterLayout, ClientUpdate, GlobalModel, LoraModule

M = LoraModule.named("m", in_features=6, out_features=5)
LAYOUT = AdapterLayout((M,), {"cls": (3,)}, scale=2.0)
RANK = 2


def start_model() -> GlobalModel:
    rng = np.random.default_rng(0)
    return GlobalModel(
        RANK,
        {
            M.a: rng.normal(size=(RANK, 6)).astype(np.float32),
            M.b: np.zeros((5, RANK), np.float32),
            "cls": np.zeros(3, np.float32),
        },
    )


HONEST_CHANGE = {
    M.a: np.full((RANK, 6), 0.05, np.float32),
    M.b: np.full((5, RANK), 0.1, np.float32),
    "cls": np.array([0.2, -0.1, 0.0], np.float32),
}


def honest_deltas(k: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    """k honest changes: a shared direction plus small device noise."""
    rng = np.random.default_rng(seed)
    return [
        {n: (v + rng.normal(0, 0.01, v.shape)).astype(np.float32) for n, v in HONEST_CHANGE.items()} for _ in range(k)
    ]


def poisoned(delta: dict[str, np.ndarray], attack: str) -> dict[str, np.ndarray]:
    factor = -1.0 if attack == "sign_flip" else 100.0
    return {n: (factor * v).astype(np.float32) for n, v in delta.items()}


def aggregate(strategy, glob, deltas, names=None):
    """Full local tensors (what strategies see) from changes to ``glob``; then one round."""
    partial = strategy.new_partial()
    for i, delta in enumerate(deltas):
        tensors = {n: glob.tensors[n] + d for n, d in delta.items()}
        update = ClientUpdate(names[i] if names else f"dev{i:02d}", 1, RANK, 10 + i, tensors)
        strategy.check(update)
        strategy.accumulate(partial, update)
    return strategy.finalize(partial, glob)


def distance(a: GlobalModel, b: GlobalModel) -> float:
    return update_norm({n: a.tensors[n].astype(np.float64) - b.tensors[n] for n in a.tensors})


@pytest.mark.parametrize("attack", ["sign_flip", "scaled"])
@pytest.mark.parametrize("attackers", [1, 3])
@pytest.mark.parametrize(
    "settings",
    [
        RobustSettings("median"),
        RobustSettings("trimmed_mean", trim_fraction=0.3),
        RobustSettings("bucket_median", buckets=7),
        RobustSettings("median_filter"),
    ],
    ids=["median", "trimmed_mean", "bucket_median", "median_filter"],
)
def test_robust_center_stays_near_the_honest_mean_while_the_plain_mean_does_not(settings, attackers, attack):
    glob = start_model()
    deltas = honest_deltas(10)
    clean = aggregate(make_strategy("fedavg", LAYOUT, rank=RANK), glob, deltas)
    attacked = [poisoned(d, attack) if i < attackers else d for i, d in enumerate(deltas)]
    plain = aggregate(make_strategy("fedavg", LAYOUT, rank=RANK), glob, attacked)
    strategy = RobustStrategy(make_strategy("fedavg", LAYOUT, rank=RANK), settings, rng=random.Random(0))
    robust = aggregate(strategy, glob, attacked)
    step = update_norm(HONEST_CHANGE)
    damage, kept_off = distance(plain, clean), distance(robust, clean)
    assert damage > 0.12 * step  # one flipped device of ten: two tenths of its weight share
    assert kept_off < 0.15 * step and kept_off < damage / 2  # what is left: the honest devices' own spread


def test_without_attackers_the_robust_centers_are_close_to_the_mean():
    glob = start_model()
    deltas = honest_deltas(9)
    clean = aggregate(make_strategy("fedavg", LAYOUT, rank=RANK), glob, deltas)
    for s in (RobustSettings("median"), RobustSettings("trimmed_mean"), RobustSettings("bucket_median", buckets=3)):
        robust = aggregate(
            RobustStrategy(make_strategy("fedavg", LAYOUT, rank=RANK), s, random.Random(1)), glob, deltas
        )
        assert distance(robust, clean) < 0.05 * update_norm(HONEST_CHANGE), s.method


def test_robust_center_applies_to_products_under_flexlora():
    """FlexLoRA sums products B_i A_i: the median is taken over the products, not the factors."""
    glob = start_model()
    deltas = honest_deltas(7)
    attacked = [poisoned(d, "scaled") if i < 2 else d for i, d in enumerate(deltas)]
    clean = aggregate(make_strategy("flexlora", LAYOUT, rank=RANK), glob, deltas)
    plain = aggregate(make_strategy("flexlora", LAYOUT, rank=RANK), glob, attacked)
    robust = aggregate(
        RobustStrategy(make_strategy("flexlora", LAYOUT, rank=RANK), RobustSettings("median")), glob, attacked
    )

    def product(g):
        return g.tensors[M.b].astype(np.float64) @ g.tensors[M.a]

    honest = np.linalg.norm(product(clean))
    assert np.linalg.norm(product(plain) - product(clean)) > honest
    assert np.linalg.norm(product(robust) - product(clean)) < 0.2 * honest


def test_median_partial_is_the_coordinate_median_scaled_by_the_total_weight():
    strategy = RobustStrategy(make_strategy("fedavg", LAYOUT, rank=RANK), RobustSettings("median"))
    glob = start_model()
    values = [1.0, 2.0, 100.0]
    partial = strategy.new_partial()
    for i, v in enumerate(values):
        tensors = {n: np.full(glob.tensors[n].shape, v, np.float32) for n in glob.tensors}
        strategy.accumulate(partial, ClientUpdate(f"d{i}", 1, RANK, i + 1, tensors))
    plain = robust_partial(partial, "median")
    assert plain.weight == 6.0 and plain.count == 3 and plain.devices == ["d0", "d1", "d2"]
    assert np.allclose(plain.sums["cls"], 6.0 * 2.0)
    out = strategy.finalize(partial, glob)
    assert np.allclose(out.tensors[M.a], 2.0) and out.version == glob.version + 1


def test_trimmed_mean_drops_the_extremes_per_coordinate():
    values = np.array([[0.0, 10.0], [1.0, -50.0], [2.0, 11.0], [3.0, 12.0], [400.0, 13.0]])
    assert np.allclose(trimmed_mean(values, 0.2), [2.0, 11.0])
    assert np.allclose(trimmed_mean(values, 0.1), values.mean(axis=0))  # floor(0.5) = 0: nothing dropped


def test_bucket_median_keeps_bounded_memory_and_balances_buckets():
    strategy = RobustStrategy(
        make_strategy("fedavg", LAYOUT, rank=RANK), RobustSettings("bucket_median", buckets=5), rng=random.Random(3)
    )
    glob = start_model()
    partial = strategy.new_partial()
    for i, d in enumerate(honest_deltas(40)):
        strategy.accumulate(partial, ClientUpdate(f"d{i}", 1, RANK, 5, {n: glob.tensors[n] + d[n] for n in d}))
    groups = {name.split("|")[0] for name in partial.sums}
    assert groups == {f"b{j}" for j in range(5)}  # 40 devices, 5 buckets of sums
    counts = [float(partial.sums[f"b{j}|#count"]) for j in range(5)]
    assert counts == [8.0] * 5
    assert partial.count == 40 and partial.weight == 200.0


def test_merge_of_disjoint_device_partials_is_their_union():
    strategy = RobustStrategy(make_strategy("fedavg", LAYOUT, rank=RANK), RobustSettings("median"))
    glob = start_model()
    deltas = honest_deltas(6)
    halves = []
    for part in (range(0, 3), range(3, 6)):
        p = strategy.new_partial()
        for i in part:
            strategy.accumulate(
                p, ClientUpdate(f"d{i}", 1, RANK, 4, {n: glob.tensors[n] + deltas[i][n] for n in glob.tensors})
            )
        halves.append(p)
    merged = strategy.merge(*halves)
    whole = aggregate(strategy, glob, deltas, names=[f"d{i}" for i in range(6)])
    assert distance(strategy.finalize(merged, glob), whole) < 1e-6


def test_robust_round_through_the_coordinator_with_norm_clipping_first():
    """The coordinator's norm bound clips the attackers first; the median then ignores them."""
    clock = [0.0]
    strategy = with_robust(make_strategy("fedavg", LAYOUT, rank=RANK), {"method": "median"})
    c = Coordinator(RoundSettings(rounds=1, min_devices=5, max_update_norm=2.0), strategy, "job", lambda: clock[0])
    names = [f"dev{i}" for i in range(5)]
    for name in names:
        c.device_status(name, True, rank=RANK, num_examples=10)
    rnd = c.maybe_open()
    assert rnd is not None and rnd.max_norm == 2.0
    glob = start_model()
    for i, (name, delta) in enumerate(zip(names, honest_deltas(5))):
        sent = poisoned(delta, "scaled") if i == 0 else delta
        bounded = c.judge("job", ClientUpdate(name, rnd.round, RANK, 10, sent))
        assert bounded.clipped == (i == 0)
        full = {n: glob.tensors[n] + bounded.update.tensors[n] for n in glob.tensors}
        c.accept(ClientUpdate(name, rnd.round, RANK, 10, full), bounded.norm)
    outcome = c.maybe_close()
    assert outcome is not None and outcome.ok
    robust = strategy.finalize(outcome.partial, glob)
    honest = aggregate(make_strategy("fedavg", LAYOUT, rank=RANK), glob, honest_deltas(5)[1:])
    assert distance(robust, honest) < 0.2 * update_norm(HONEST_CHANGE)


def test_with_robust_leaves_mean_alone_and_keeps_the_inner_strategy_visible():
    fedavg = make_strategy("fedavg", LAYOUT, rank=RANK, server_lr=0.5)
    assert with_robust(fedavg, None) is fedavg and with_robust(fedavg, RobustSettings()) is fedavg
    wrapped = with_robust(fedavg, {"method": "trimmed_mean", "trim_fraction": 0.2})
    assert isinstance(wrapped, RobustStrategy)
    assert wrapped.name == "fedavg" and wrapped.server_lr == 0.5 and wrapped.trains_a
    assert wrapped.for_device(start_model(), RANK).keys() == fedavg.for_device(start_model(), RANK).keys()


@pytest.mark.parametrize(
    "values, message",
    [
        ({"method": "krum"}, "robust.method must be one of"),
        ({"method": "trimmed_mean", "trim_fraction": 0.5}, "trim_fraction must be in"),
        ({"method": "bucket_median", "buckets": 2}, "buckets must be in"),
    ],
)
def test_bad_robust_settings_are_refused(values, message):
    with pytest.raises(ConfigError, match=message):
        RobustSettings(**values)


def test_a_robust_round_survives_a_restart_through_the_state_store(tmp_path):
    """The per-device sums are ordinary partial sums: the store persists them, and a restarted
    aggregator finalizes the same robust result (sampling_rate and the other fields too)."""
    from server.rounds import OpenRound
    from server.store import StateStore

    strategy = RobustStrategy(make_strategy("fedavg", LAYOUT, rank=RANK), RobustSettings("median"))
    glob = start_model()
    partial = strategy.new_partial()
    for i, d in enumerate(honest_deltas(3)):
        strategy.accumulate(partial, ClientUpdate(f"dev-{i}.x", 1, RANK, 5, {n: glob.tensors[n] + d[n] for n in d}))
    rnd = OpenRound(1, ["dev-0.x", "dev-1.x", "dev-2.x"], 0.0, 60.0, 0, partial=partial, sampling_rate=0.75)
    StateStore(tmp_path).save(
        job="j", next_round=2, completed=0, version=0, history=[], global_adapter=glob.tensors, open_round=rnd
    )
    back = StateStore(tmp_path).load()["open_round"]
    assert back.sampling_rate == 0.75 and sorted(back.partial.sums) == sorted(partial.sums)
    assert distance(strategy.finalize(back.partial, glob), strategy.finalize(partial, glob)) == 0.0


def test_median_filter_drops_the_sign_flipped_devices_whole_and_keeps_every_honest_one():
    glob = start_model()
    deltas = honest_deltas(10)
    attacked = [poisoned(d, "sign_flip") if i < 3 else d for i, d in enumerate(deltas)]
    strategy = RobustStrategy(make_strategy("fedavg", LAYOUT, rank=RANK), RobustSettings("median_filter"))
    partial = strategy.new_partial()
    for i, d in enumerate(attacked):
        strategy.accumulate(
            partial, ClientUpdate(f"dev{i:02d}", 1, RANK, 10 + i, {n: glob.tensors[n] + d[n] for n in d})
        )
    kept, dropped = strategy.filtered_partial(partial, glob)
    assert sorted(dropped) == ["dev00", "dev01", "dev02"] and kept.count == 7 and kept.weight == sum(range(13, 20))
    fedavg = make_strategy("fedavg", LAYOUT, rank=RANK)
    honest = fedavg.new_partial()
    for i in range(3, 10):  # the honest devices, with their weights
        tensors = {n: glob.tensors[n] + deltas[i][n] for n in glob.tensors}
        fedavg.accumulate(honest, ClientUpdate(f"dev{i:02d}", 1, RANK, 10 + i, tensors))
    # the honest devices' mean, but for the honest changes above the median norm (clipped to it)
    assert distance(strategy.finalize(partial, glob), fedavg.finalize(honest, glob)) < 0.02 * update_norm(HONEST_CHANGE)
    assert sorted(strategy.last_dropped) == ["dev00", "dev01", "dev02"]  # the round's history row names them
