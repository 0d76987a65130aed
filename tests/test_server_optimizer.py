"""Server optimizers (FedAvgM, FedAdam, FedYogi, FedAdagrad) over every strategy: the update rules
against a plain re-derivation of the papers' formulas, the identity of plain sgd, what each
strategy's moments are over, bad settings, and state that survives a restart bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from core.errors import ConfigError
from server.config import ServerConfig
from server.store import StateStore
from server.strategies import STRATEGIES, make_strategy
from server.strategies.base import AdapterLayout, ClientUpdate, GlobalModel, LoraModule
from server.strategies.server_optimizer import ADAPTIVE, OPTIMIZERS, ServerOptimizer, ServerOptimizerSettings

M1 = LoraModule.named("m1", in_features=5, out_features=4)
M2 = LoraModule.named("m2", in_features=3, out_features=6)
LAYOUT = AdapterLayout((M1, M2), {"cls": (3,)})
RANK = 2


def global_model(seed: int = 0) -> GlobalModel:
    rng = np.random.default_rng(seed)
    tensors = {name: rng.normal(0, 0.1, shape).astype(np.float32) for name, shape in LAYOUT.shapes(RANK).items()}
    return GlobalModel(RANK, tensors)


def round_updates(rnd: int, model: GlobalModel, devices: int = 3) -> list[ClientUpdate]:
    """Devices' local tensors: the global plus a change that depends on the round and device."""
    out = []
    for d in range(devices):
        rng = np.random.default_rng([rnd, d])
        tensors = {k: (v + rng.normal(0, 0.02, v.shape)).astype(np.float32) for k, v in model.tensors.items()}
        out.append(ClientUpdate(f"d{d}", rnd, RANK, 10 + 5 * d, tensors))
    return out


def run_rounds(strategy, model: GlobalModel, rounds: range) -> GlobalModel:
    for rnd in rounds:
        partial = strategy.new_partial()
        for u in round_updates(rnd, model):
            if not strategy.trains_a:
                u.tensors = {k: v for k, v in u.tensors.items() if ".lora_A." not in k}
            strategy.accumulate(partial, u)
        model = strategy.finalize(partial, model)
    return model


def reference(kind: str, deltas: list[np.ndarray], lr=0.01, momentum=0.5, b1=0.9, b2=0.99, tau=1e-3) -> np.ndarray:
    """The total step after these rounds' pseudo-gradients, written out from the formulas
    (Reddi et al. 2021, Algorithm 2, with Adam's bias correction; Hsu et al. 2019)."""
    total = np.zeros_like(deltas[0])
    m = np.zeros_like(deltas[0])
    v = np.zeros_like(deltas[0])
    for t, d in enumerate(deltas, start=1):
        if kind == "fedavgm":
            m = momentum * m + d
            total += lr * m
            continue
        if kind == "fedadagrad":
            v = v + d**2
            total += lr * d / (np.sqrt(v) + tau)
            continue
        m = b1 * m + (1 - b1) * d
        if kind == "fedadam":
            v = b2 * v + (1 - b2) * d**2
        else:
            v = v - (1 - b2) * d**2 * np.sign(v - d**2)
        total += lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + tau)
    return total


@pytest.mark.parametrize("kind", ["fedavgm", *ADAPTIVE])
def test_each_optimizer_follows_its_formula(kind):
    rng = np.random.default_rng(7)
    deltas = [rng.normal(0, 0.01, (4, 3)) for _ in range(4)]
    opt = ServerOptimizer(ServerOptimizerSettings(server_optimizer=kind, server_lr=0.01))
    x = np.zeros((4, 3))
    for d in deltas:  # the pseudo-gradient is the change of the target from where x is now
        opt.begin_round()
        x = opt.step("w", x, x + d, np.float64)
    np.testing.assert_allclose(x, reference(kind, deltas), rtol=1e-12, atol=1e-15)
    assert opt.t == 4 and set(opt.m) == {"w"}


def test_adaptive_first_step_moves_each_entry_by_about_lr_and_defaults_apply():
    opt = ServerOptimizer(ServerOptimizerSettings(server_optimizer="fedadam", server_tau=1e-9))
    assert opt.lr == 0.01  # server_lr 0: the optimizer's default
    opt.begin_round()
    step = opt.step("w", np.zeros(3), np.array([1e-3, -0.5, 2.0]), np.float64)
    np.testing.assert_allclose(step, [0.01, -0.01, 0.01], rtol=1e-5)
    assert ServerOptimizer(ServerOptimizerSettings()).lr == 1.0


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_plain_sgd_returns_exactly_what_the_strategy_computes(name):
    """The default (sgd, lr 0 -> 1) and an explicit sgd at lr 1 give bit-identical globals, and
    keep no moments."""
    a = make_strategy(name, LAYOUT, rank=RANK)
    b = make_strategy(name, LAYOUT, rank=RANK, server_optimizer="sgd", server_lr=1.0)
    ga, gb = run_rounds(a, global_model(), range(1, 3)), run_rounds(b, global_model(), range(1, 3))
    for k in ga.tensors:
        assert np.array_equal(ga.tensors[k], gb.tensors[k]), k
    assert a.optimizer.state() == (2, {})


# What each strategy's moments are over (``server_step`` names), as its docstring says.
MOMENTS = {
    "fedavg": {M1.a, M1.b, M2.a, M2.b, "cls"},
    "ffa-lora": {M1.b, M2.b, "cls"},
    "fedsa-lora": {M1.a, M2.a, "cls"},
    "hetlora": {M1.a, M1.b, M2.a, M2.b, "cls"},
    "flexlora": {M1.key("product"), M2.key("product"), "cls"},
    "flexlora-delta": {M1.key("product"), M2.key("product"), "cls"},
    "flora": {M1.base, M2.base, "cls"},
    "fedex-lora": {M1.a, M1.b, M2.a, M2.b, M1.base, M2.base, "cls"},
}


@pytest.mark.parametrize("kind", ["fedavgm", *ADAPTIVE])
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_composes_with_every_optimizer(name, kind):
    assert set(MOMENTS) == set(STRATEGIES)
    plain = run_rounds(make_strategy(name, LAYOUT, rank=RANK), global_model(), range(1, 3))
    s = make_strategy(name, LAYOUT, rank=RANK, server_optimizer=kind)
    out = run_rounds(s, global_model(), range(1, 3))
    assert set(s.optimizer.m) == MOMENTS[name]
    assert all(np.isfinite(v).all() for v in [*out.tensors.values(), *out.base_delta.values()])
    changed = [k for k in out.tensors if not np.array_equal(out.tensors[k], plain.tensors[k])]
    changed += [k for k in out.base_delta if not np.array_equal(out.base_delta[k], plain.base_delta[k])]
    assert "cls" in changed and len(changed) > 1


def test_fedavg_with_sgd_steps_part_of_the_way():
    s = make_strategy("fedavg", LAYOUT, rank=RANK, server_lr=0.25)
    g = global_model()
    updates = round_updates(1, g)
    partial = s.new_partial()
    for u in updates:
        s.accumulate(partial, u)
    out = s.finalize(partial, g)
    n = np.array([u.num_examples for u in updates], dtype=np.float64)
    for k in g.tensors:
        mean = sum(w * u.tensors[k].astype(np.float64) for w, u in zip(n, updates)) / n.sum()
        np.testing.assert_allclose(out.tensors[k], g.tensors[k] + 0.25 * (mean - g.tensors[k]), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"server_optimizer": "adam"}, "server_optimizer must be one of"),
        ({"server_lr": -0.1}, r"server_lr must be in \[0, 10\]"),
        ({"server_beta2": 1.0}, "server_beta2"),
        ({"server_tau": 0.0}, "server_tau"),
        ({"server_momentum": -1}, "server_momentum"),
        ({"fedprox_mu": -0.01}, "fedprox_mu"),
    ],
)
def test_bad_optimizer_settings_are_refused_by_name(settings, message):
    with pytest.raises(ConfigError, match=message):
        ServerConfig(bundle="/b", strategy="flexlora", strategy_settings=settings)


@pytest.mark.parametrize("kind", OPTIMIZERS)
@pytest.mark.parametrize("name", ["fedavg", "flexlora-delta", "fedex-lora"])
def test_a_strategy_rebuilt_from_saved_state_continues_bit_identically(tmp_path, name, kind):
    """Two rounds, the state through the real store (SQLite) into a new strategy object, a third
    round: the same global as three rounds in one object."""
    settings = {"server_optimizer": kind}
    straight = make_strategy(name, LAYOUT, rank=RANK, **settings)
    want = run_rounds(straight, global_model(), range(1, 4))

    first = make_strategy(name, LAYOUT, rank=RANK, **settings)
    mid = run_rounds(first, global_model(), range(1, 3))
    store = StateStore(tmp_path)
    store.save(
        job="j",
        next_round=3,
        completed=2,
        version=2,
        history=[],
        global_adapter=mid.tensors,
        base_delta=mid.base_delta,
        server_optimizer=first.optimizer.state(),
        open_round=None,
    )
    store.close()
    saved = StateStore(tmp_path).load()
    assert saved is not None
    second = make_strategy(name, LAYOUT, rank=RANK, **settings)
    second.optimizer.load_state(*saved["server_optimizer"])
    got = run_rounds(second, GlobalModel(RANK, saved["global"], saved["base_delta"], saved["version"]), range(3, 4))
    for k in want.tensors:
        assert np.array_equal(got.tensors[k], want.tensors[k]), k
    for k in want.base_delta:
        assert np.array_equal(got.base_delta[k], want.base_delta[k]), k
    if kind != "sgd":  # without the saved moments the third round differs: the test can fail
        fresh = make_strategy(name, LAYOUT, rank=RANK, **settings)
        fresh.optimizer.t = 2
        other = run_rounds(fresh, GlobalModel(RANK, saved["global"], saved["base_delta"], 2), range(3, 4))
        assert any(not np.array_equal(other.tensors[k], want.tensors[k]) for k in want.tensors)


def test_an_older_database_without_optimizer_state_loads_as_a_fresh_optimizer(tmp_path):
    store = StateStore(tmp_path)
    store.save(
        job="j", next_round=2, completed=1, version=1, history=[], global_adapter={"x": np.ones(2)}, open_round=None
    )
    assert StateStore(tmp_path).load()["server_optimizer"] == (0, {})
    with pytest.raises(ConfigError, match="unknown array"):
        ServerOptimizer(ServerOptimizerSettings()).load_state(1, {"q/x": np.ones(1)})
