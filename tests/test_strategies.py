"""The math of every aggregation strategy, on matrices small enough to check by hand.

One adapted module ``m`` (in 3, out 2) and a head tensor ``cls`` (2,), LoRA scale 2.0 (the
exporter's alpha = 2 r), unless a test says otherwise. Tensors are the devices' full local
tensors, weighted by example counts n_i.
"""

import numpy as np
import pytest

from core.bundle import Manifest, ParamSpec
from core.errors import BundleError, ConfigError, UpdateRejected
from core.lora import component_norms, pad_a, pad_b, pruned_rank
from core.protocol import BASE_A_PREFIX, frozen_changes
from server.strategies import STRATEGIES, make_strategy
from server.strategies.base import (
    AdapterLayout,
    ClientUpdate,
    GlobalModel,
    LoraModule,
    Partial,
)
from server.strategies.flexlora import svd_factors
from server.strategies.flora import reinit_a, stack
from server.strategies.hetlora import product_norm

M = LoraModule.named("m", in_features=3, out_features=2)
LAYOUT = AdapterLayout((M,), {"cls": (2,)}, scale=2.0)
HEAD0 = np.zeros(2)


def upd(device, n, a=None, b=None, head=HEAD0, rank=None):
    tensors = {"cls": np.asarray(head, np.float32)}
    if a is not None:
        tensors[M.a] = np.asarray(a, np.float32)
    if b is not None:
        tensors[M.b] = np.asarray(b, np.float32)
    if rank is None:
        rank = tensors[M.a].shape[0] if a is not None else tensors[M.b].shape[1]
    return ClientUpdate(device, 1, rank, n, tensors)


def model(rank, a=None, b=None, head=HEAD0, base_delta=None, layout=LAYOUT):
    tensors = {}
    for m in layout.modules:
        tensors[m.a] = np.zeros(m.a_shape(rank), np.float32) if a is None else np.asarray(a, np.float32)
        tensors[m.b] = np.zeros(m.b_shape(rank), np.float32) if b is None else np.asarray(b, np.float32)
    tensors.update({h: np.asarray(head, np.float32) for h in layout.head})
    return GlobalModel(rank, tensors, dict(base_delta or {}))


def run(strategy, glob, updates):
    p = strategy.new_partial()
    for u in updates:
        strategy.check(u)
        strategy.accumulate(p, u)
    return strategy.finalize(p, glob)


def effective(glob_or_tensors, base_w, rank=None, base_delta=None, layout=LAYOUT, m=M):
    """W + base_delta + scale * B @ A for a GlobalModel, or for a device's tensors (A, B given)."""
    if isinstance(glob_or_tensors, GlobalModel):
        t, delta = glob_or_tensors.tensors, glob_or_tensors.base_delta.get(m.base, 0.0)
    else:
        t, delta = glob_or_tensors, 0.0 if base_delta is None else base_delta
    return base_w + delta + layout.scale * t[m.b].astype(np.float64) @ t[m.a].astype(np.float64)


# -- layout ------------------------------------------------------------------------------
def test_layout_from_manifest_groups_factors_by_module_and_takes_scale_from_alpha():
    q = "base_model.model.enc.0.attention.query"
    specs = (
        ParamSpec(f"{q}.lora_A.weight", (4, 8), "lora_A"),
        ParamSpec(f"{q}.lora_B.weight", (6, 4), "lora_B"),
        ParamSpec("base_model.model.classifier.weight", (2, 6), "head"),
    )
    man = Manifest(
        "m",
        "seq-cls",
        rank=4,
        alpha=8.0,
        targets=("query",),
        max_length=8,
        pad_token_id=0,
        trainable=specs,
        input_names=("input_ids",),
        files={},
    )
    layout = AdapterLayout.from_manifest(man)
    assert layout.modules == (
        LoraModule(q, f"{q}.lora_A.weight", f"{q}.lora_B.weight", f"{q}.base_layer.weight", 8, 6),
    )
    assert layout.head == {"base_model.model.classifier.weight": (2, 6)} and layout.scale == 2.0
    assert layout.shapes(2) == {
        f"{q}.lora_A.weight": (2, 8),
        f"{q}.lora_B.weight": (6, 2),
        "base_model.model.classifier.weight": (2, 6),
    }
    assert set(layout.shapes(2, include_a=False)) == {f"{q}.lora_B.weight", "base_model.model.classifier.weight"}
    assert AdapterLayout.from_shapes(man.shapes, scale=2.0) == layout


def test_layout_refuses_a_factor_without_its_pair():
    with pytest.raises(BundleError, match="pairs"):
        AdapterLayout.from_shapes({"x.lora_A.weight": (2, 3)})


# -- FedAvg ------------------------------------------------------------------------------
def test_fedavg_hand_computed():
    s = STRATEGIES["fedavg"](LAYOUT, rank=1)
    new = run(
        s,
        model(1),
        [upd("x", 1, [[1, 2, 0]], [[3], [0]], head=[0, 4]), upd("y", 3, [[5, 6, 4]], [[-1], [4]], head=[4, 0])],
    )
    # A: (1*[1,2,0] + 3*[5,6,4]) / 4 = [4,5,3];  B: (1*[3,0] + 3*[-1,4]) / 4 = [0,3];  head: [3,1]
    np.testing.assert_allclose(new.tensors[M.a], [[4, 5, 3]])
    np.testing.assert_allclose(new.tensors[M.b], [[0], [3]])
    np.testing.assert_allclose(new.tensors["cls"], [3, 1])
    assert new.tensors[M.a].dtype == np.float32 and new.version == 1 and new.base_delta == {}


def test_fedavg_server_lr_steps_part_of_the_way():
    s = STRATEGIES["fedavg"](LAYOUT, rank=1, server_lr=0.5)
    new = run(s, model(1, a=[[2, 2, 2]]), [upd("x", 1, [[4, 0, 2]], [[2], [2]], head=[2, 2])])
    # 2 + 0.5 * (4 - 2) = 3, 2 + 0.5 * (0 - 2) = 1, 2 + 0 = 2;  B: 0 + 0.5 * 2 = 1
    np.testing.assert_allclose(new.tensors[M.a], [[3, 1, 2]])
    np.testing.assert_allclose(new.tensors[M.b], [[1], [1]])
    np.testing.assert_allclose(new.tensors["cls"], [1, 1])


# -- FFA-LoRA ----------------------------------------------------------------------------
def test_ffa_lora_averages_b_only_and_is_exact_because_a_is_shared():
    s = STRATEGIES["ffa-lora"](LAYOUT, rank=1)
    a0 = [[1, 0, 1]]
    new = run(s, model(1, a=a0), [upd("x", 1, b=[[2], [0]]), upd("y", 1, b=[[0], [4]])])
    # B = ([2,0] + [0,4]) / 2 = [1,2]; A untouched
    np.testing.assert_allclose(new.tensors[M.b], [[1], [2]])
    np.testing.assert_allclose(new.tensors[M.a], a0)
    w = np.arange(6.0).reshape(2, 3)
    devices = [effective({M.a: np.array(a0), M.b: np.array(b)}, w) for b in ([[2], [0]], [[0], [4]])]
    np.testing.assert_allclose(effective(new, w), np.mean(devices, axis=0))
    assert set(s.for_device(new, 1)) == {M.b, "cls"}  # A never travels


# -- FedSA-LoRA --------------------------------------------------------------------------
def test_fedsa_lora_averages_a_keeps_b_local_and_ignores_uploaded_b():
    s = STRATEGIES["fedsa-lora"](LAYOUT, rank=1)
    b0 = [[7], [7]]
    new = run(
        s,
        model(1, b=b0),
        [upd("x", 1, a=[[1, 0, 0]], head=[1, 1]), upd("y", 3, a=[[0, 4, 0]], b=[[100], [100]], head=[5, 1])],
    )
    # A = (1*[1,0,0] + 3*[0,4,0]) / 4 = [0.25, 3, 0];  head = (1*[1,1] + 3*[5,1]) / 4 = [4, 1];  B unchanged
    np.testing.assert_allclose(new.tensors[M.a], [[0.25, 3, 0]])
    np.testing.assert_allclose(new.tensors[M.b], b0)
    np.testing.assert_allclose(new.tensors["cls"], [4, 1])
    assert set(s.for_device(new, 1)) == {M.a, "cls"}  # B stays on the device


# -- HetLoRA -----------------------------------------------------------------------------
def test_hetlora_padding_is_exact():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(2, 3)), rng.normal(size=(2, 2))
    pa, pb = pad_a(a, 5), pad_b(b, 5)
    assert pa.shape == (5, 3) and pb.shape == (2, 5)
    assert np.array_equal(pb @ pa, b @ a)  # the zero components add exactly nothing
    assert np.array_equal(pa[:2], a) and np.array_equal(pb[:, :2], b)  # truncation undoes padding
    assert not pa[2:].any() and not pb[:, 2:].any()


def test_hetlora_sparsity_weighted_hand_computed():
    s = STRATEGIES["hetlora"](LAYOUT, rank=2)
    u1 = upd("x", 9, [[1, 0, 0]], [[3], [4]])  # B1 A1 = [[3,0,0],[4,0,0]], norm 5
    u2 = upd("y", 1, [[0, 1, 0], [0, 0, 1]], [[6, 0], [0, 8]])  # B2 A2 = [[0,6,0],[0,0,8]], norm 10
    assert product_norm(u1.tensors[M.a], u1.tensors[M.b]) == pytest.approx(5.0)
    new = run(s, model(2), [u1, u2])
    # weights 5 : 10 (example counts are not used); A = (5*[[1,0,0],[0,0,0]] + 10*[[0,1,0],[0,0,1]]) / 15
    np.testing.assert_allclose(new.tensors[M.a], [[1 / 3, 2 / 3, 0], [0, 0, 2 / 3]], rtol=1e-6)
    # B = (5*[[3,0],[4,0]] + 10*[[6,0],[0,8]]) / 15
    np.testing.assert_allclose(new.tensors[M.b], [[5, 0], [4 / 3, 16 / 3]], rtol=1e-6)
    dev = s.for_device(new, 1)  # top-1 truncation
    np.testing.assert_allclose(dev[M.a], [[1 / 3, 2 / 3, 0]], rtol=1e-6)
    np.testing.assert_allclose(dev[M.b], [[5], [4 / 3]], rtol=1e-6)


def test_hetlora_example_weighted_hand_computed():
    s = STRATEGIES["hetlora"](LAYOUT, rank=2, weighting="examples")
    new = run(
        s, model(2), [upd("x", 1, [[1, 0, 0]], [[3], [4]]), upd("y", 1, [[0, 1, 0], [0, 0, 1]], [[6, 0], [0, 8]])]
    )
    # plain mean of the padded factors: the rank-1 device's zero row halves component 2
    np.testing.assert_allclose(new.tensors[M.a], [[0.5, 0.5, 0], [0, 0, 0.5]])
    np.testing.assert_allclose(new.tensors[M.b], [[4.5, 0], [2, 4]])


def self_prune(a, b, rank, threshold):
    """HetLoRA rank self-pruning of an adapter with one module."""
    return pruned_rank({"m.lora_A.weight": a, "m.lora_B.weight": b}, rank, threshold)


def test_hetlora_self_prune_drops_only_weak_trailing_components():
    a = np.eye(3)
    b = np.array([[4, 2, 0.1], [0, 0, 0]])
    np.testing.assert_allclose(component_norms(a, b), [4, 2, 0.1])  # ||B[:, j]|| * ||A[j]||, A rows unit
    assert self_prune(a, b, 3, 0.1) == 2  # 0.1 < 0.1 * 4
    assert self_prune(a, b, 3, 0.6) == 1  # 2 < 0.6 * 4
    assert self_prune(a, b, 3, 0.0) == 3
    assert self_prune(a, np.array([[4, 0.1, 3], [0, 0, 0]]), 3, 0.5) == 3  # a weak middle one stays
    assert self_prune(a, np.zeros((2, 3)), 3, 0.5) == 1
    assert self_prune(a, b, 2, 0.1) == 2  # looks at the first `rank` components only


# -- FlexLoRA ----------------------------------------------------------------------------
def test_flexlora_hand_computed():
    s = STRATEGIES["flexlora"](LAYOUT, rank=2)
    new = run(s, model(2), [upd("x", 1, [[1, 0, 0]], [[3], [0]]), upd("y", 1, [[0, 1, 0]], [[0], [1]])])
    # dW = scale * mean(B_i A_i) = 2 * 0.5 * ([[3,0,0],[0,0,0]] + [[0,0,0],[0,1,0]]) = diag(3, 1);
    # singular values 3, 1: the rank-2 global holds all of it, a rank-1 device gets 3 e1 e1^T
    np.testing.assert_allclose(effective(new, 0.0), [[3, 0, 0], [0, 1, 0]], atol=1e-6)
    dev = s.for_device(new, 1)
    np.testing.assert_allclose(2.0 * dev[M.b] @ dev[M.a], [[3, 0, 0], [0, 0, 0]], atol=1e-6)
    # even split: scale * b * a = 3 with |a| = |b| = sqrt(3 / 2)
    np.testing.assert_allclose(np.abs(dev[M.a][0, 0]), np.sqrt(1.5), rtol=1e-6)


def test_flexlora_truncation_is_the_best_rank_r_approximation():
    rng = np.random.default_rng(2)
    mod = LoraModule.named("big", in_features=7, out_features=5)
    layout = AdapterLayout((mod,), {}, scale=2.0)
    s = STRATEGIES["flexlora"](layout, rank=4)
    updates, delta = [], np.zeros((5, 7))
    ns = [3, 1, 2, 5]
    for i, (n, r) in enumerate(zip(ns, [1, 2, 3, 4])):
        a, b = rng.normal(size=(r, 7)), rng.normal(size=(5, r))
        updates.append(ClientUpdate(f"d{i}", 1, r, n, {mod.a: a.astype(np.float32), mod.b: b.astype(np.float32)}))
        delta += n / sum(ns) * 2.0 * b.astype(np.float32).astype(np.float64) @ a.astype(np.float32)
    new = run(s, model(4, layout=layout), updates)
    u, sv, vt = np.linalg.svd(delta)
    for r in range(1, 5):
        dev = s.for_device(new, r)
        approx = 2.0 * dev[mod.b].astype(np.float64) @ dev[mod.a]
        best = (u[:, :r] * sv[:r]) @ vt[:r]
        np.testing.assert_allclose(approx, best, atol=1e-5)
        # Eckart-Young: the error is exactly the discarded singular values
        assert np.linalg.norm(delta - approx) == pytest.approx(np.sqrt(np.sum(sv[r:] ** 2)), abs=1e-5)


def test_flexlora_delta_keeps_what_low_rank_devices_could_not_hold():
    # global product diag(3, 1) in SVD form (scale 2: b * a = 1.5 and 0.5)
    a, b = svd_factors(np.diag([3.0, 1.0, 0.0])[:2], rank=2, scale=2.0)
    glob = model(2, a=a, b=b)
    plain, delta = STRATEGIES["flexlora"](LAYOUT, rank=2), STRATEGIES["flexlora-delta"](LAYOUT, rank=2)
    # both devices train nothing: each sends back the slice it received
    echo = [
        upd(f"d{r}", 1, **{k: v for k, v in zip("ab", (t[M.a], t[M.b]))})
        for r in (1, 2)
        for t in [plain.for_device(glob, r)]
    ]
    # FlexLoRA: mean of (3 e1e1^T) and diag(3, 1): the second component halves
    np.testing.assert_allclose(effective(run(plain, glob, echo), 0.0), [[3, 0, 0], [0, 0.5, 0]], atol=1e-6)
    # the variant: nothing changed, nothing moves
    np.testing.assert_allclose(effective(run(delta, glob, echo), 0.0), [[3, 0, 0], [0, 1, 0]], atol=1e-6)


def test_flexlora_delta_devices_compute_with_the_whole_global():
    rng = np.random.default_rng(4)
    s = STRATEGIES["flexlora-delta"](LAYOUT, rank=2)
    glob = model(2, a=rng.normal(size=(2, 3)), b=rng.normal(size=(2, 2)))
    sent = {**s.for_device(glob, 1), **s.frozen_for_device(glob, 1)}
    assert sent[M.a].shape == (1, 3) and sent[BASE_A_PREFIX + M.base].shape == (1, 3)
    folded = frozen_changes(sent)[M.base]  # the scale is in base_b
    np.testing.assert_allclose(effective(sent, folded), effective(glob, 0.0), rtol=1e-6, atol=1e-6)
    assert (
        s.frozen_for_device(glob, 2) == {} and STRATEGIES["flexlora"](LAYOUT, rank=2).frozen_for_device(glob, 1) == {}
    )


def test_flexlora_delta_is_the_global_plus_the_mean_change():
    rng = np.random.default_rng(5)
    mod = LoraModule.named("big", in_features=7, out_features=5)
    layout = AdapterLayout((mod,), {}, scale=2.0)
    s = STRATEGIES["flexlora-delta"](layout, rank=4)
    a, b = svd_factors(rng.normal(size=(5, 7)), rank=4, scale=2.0)
    glob = model(4, a=a, b=b, layout=layout)
    g = effective(glob, 0.0, layout=layout, m=mod)
    updates, want, ns = [], g.copy(), [3, 1, 2, 5]
    for i, (n, r) in enumerate(zip(ns, [1, 2, 4, 2])):
        start = s.for_device(glob, r)
        sent = {k: (v + rng.normal(scale=0.1, size=v.shape)).astype(np.float32) for k, v in start.items()}
        updates.append(ClientUpdate(f"d{i}", 1, r, n, sent))
        want += n / sum(ns) * (effective(sent, 0.0, layout=layout, m=mod) - effective(start, 0.0, layout=layout, m=mod))
    new = run(s, glob, updates)
    u, sv, vt = np.linalg.svd(want)
    np.testing.assert_allclose(effective(new, 0.0, layout=layout, m=mod), (u[:, :4] * sv[:4]) @ vt[:4], atol=1e-5)


def test_flexlora_delta_with_one_rank_is_flexlora():
    rng = np.random.default_rng(6)
    glob = model(2, a=rng.normal(size=(2, 3)), b=rng.normal(size=(2, 2)))
    updates = [
        upd(f"d{i}", i + 1, rng.normal(size=(2, 3)), rng.normal(size=(2, 2)), rng.normal(size=2)) for i in range(3)
    ]
    assert_models_close(
        run(STRATEGIES["flexlora-delta"](LAYOUT, rank=2), glob, updates),
        run(STRATEGIES["flexlora"](LAYOUT, rank=2), glob, updates),
    )


def test_flexlora_delta_rank_norm_hand_computed():
    # global diag(3, 1); the rank-1 device doubles its component (change [[3,0,0],[0,0,0]]), the
    # rank-2 device changes nothing; one example each
    a, b = svd_factors(np.diag([3.0, 1.0, 0.0])[:2], rank=2, scale=2.0)
    glob = model(2, a=a, b=b)
    s = STRATEGIES["flexlora-delta"](LAYOUT, rank=2, rank_norm_power=1.0)
    one, two = s.for_device(glob, 1), s.for_device(glob, 2)
    updates = [upd("r1", 1, one[M.a], 2 * one[M.b]), upd("r2", 1, two[M.a], two[M.b])]
    # tau = 1/2 and 1, tau_eff = 3/4: G + 3/4 * (1/2 * D1 / (1/2) + 1/2 * 0) = G + 0.75 D1
    np.testing.assert_allclose(effective(run(s, glob, updates), 0.0), [[5.25, 0, 0], [0, 1, 0]], atol=1e-5)
    # unnormalized: the plain mean of the changes, G + 0.5 D1
    plain = STRATEGIES["flexlora-delta"](LAYOUT, rank=2)
    np.testing.assert_allclose(effective(run(plain, glob, updates), 0.0), [[4.5, 0, 0], [0, 1, 0]], atol=1e-5)


def test_flexlora_delta_rank_norm_is_the_paced_mean_change():
    rng = np.random.default_rng(7)
    mod = LoraModule.named("big", in_features=7, out_features=5)
    layout = AdapterLayout((mod,), {"cls": (2,)}, scale=2.0)
    s = STRATEGIES["flexlora-delta"](layout, rank=4, rank_norm_power=0.5)
    a, b = svd_factors(rng.normal(size=(5, 7)), rank=4, scale=2.0)
    glob = model(4, a=a, b=b, layout=layout)
    ns, ranks = [3, 1, 2, 5], [1, 2, 4, 2]
    taus = [(r / 4) ** 0.5 for r in ranks]
    tau_eff = sum(n * t for n, t in zip(ns, taus)) / sum(ns)
    updates, want, heads = [], effective(glob, 0.0, layout=layout, m=mod), []
    for i, (n, r, tau) in enumerate(zip(ns, ranks, taus)):
        start = s.for_device(glob, r)
        sent = {k: (v + rng.normal(scale=0.1, size=v.shape)).astype(np.float32) for k, v in start.items()}
        updates.append(ClientUpdate(f"d{i}", 1, r, n, sent))
        change = effective(sent, 0.0, layout=layout, m=mod) - effective(start, 0.0, layout=layout, m=mod)
        want += tau_eff * n / sum(ns) * change / tau
        heads.append(n * sent["cls"].astype(np.float64))
    new = run(s, glob, updates)
    u, sv, vt = np.linalg.svd(want)
    np.testing.assert_allclose(effective(new, 0.0, layout=layout, m=mod), (u[:, :4] * sv[:4]) @ vt[:4], atol=1e-5)
    np.testing.assert_allclose(new.tensors["cls"], sum(heads) / sum(ns), rtol=1e-6)  # the head: example-weighted


def test_flexlora_delta_rank_norm_with_one_rank_changes_nothing():
    rng = np.random.default_rng(8)
    glob = model(2, a=rng.normal(size=(2, 3)), b=rng.normal(size=(2, 2)))
    updates = [
        upd(f"d{i}", i + 1, rng.normal(size=(2, 3)), rng.normal(size=(2, 2)), rng.normal(size=2)) for i in range(3)
    ]
    assert_models_close(
        run(STRATEGIES["flexlora-delta"](LAYOUT, rank=2, rank_norm_power=0.5), glob, updates),
        run(STRATEGIES["flexlora"](LAYOUT, rank=2), glob, updates),
    )
    # devices all below the global rank, but of one rank: every pace is the same and cancels
    low = [upd(f"d{i}", i + 1, rng.normal(size=(1, 3)), rng.normal(size=(2, 1)), rng.normal(size=2)) for i in range(3)]
    assert_models_close(
        run(STRATEGIES["flexlora-delta"](LAYOUT, rank=2, rank_norm_power=0.5), glob, low),
        run(STRATEGIES["flexlora-delta"](LAYOUT, rank=2), glob, low),
    )


@pytest.mark.parametrize("power", [-0.1, 2.5, float("nan")])
def test_flexlora_delta_rank_norm_power_out_of_range_is_refused(power):
    with pytest.raises(ConfigError, match="rank_norm_power"):
        make_strategy("flexlora-delta", LAYOUT, rank=2, rank_norm_power=power)


def test_svd_factors_pads_beyond_the_rank_of_the_matrix():
    a, b = svd_factors(np.array([[2.0, 0, 0], [0, 0, 0]]), rank=3, scale=1.0)
    assert a.shape == (3, 3) and b.shape == (2, 3)
    np.testing.assert_allclose(b @ a, [[2, 0, 0], [0, 0, 0]], atol=1e-12)
    assert not a[2:].any() and not b[:, 2:].any()


# -- FLoRA -------------------------------------------------------------------------------
def test_flora_stacked_product_equals_weighted_sum_of_products_hand_computed():
    a1, b1 = np.array([[1.0, 2, 0]]), np.array([[1.0], [0]])  # B1 A1 = [[1,2,0],[0,0,0]]
    a2, b2 = np.array([[0.0, 0, 1], [1, 0, 0]]), np.array([[0.0, 1], [2, 0]])  # B2 A2 = [[1,0,0],[0,0,2]]
    sa, sb = stack([a1, a2], [b1, b2], [1, 3])
    # A_stack = [1/4 A1; 3/4 A2], B_stack = [B1, B2]
    np.testing.assert_allclose(sa, [[0.25, 0.5, 0], [0, 0, 0.75], [0.75, 0, 0]])
    np.testing.assert_allclose(sb, [[1, 0, 1], [0, 2, 0]])
    # 1/4 [[1,2,0],[0,0,0]] + 3/4 [[1,0,0],[0,0,2]] = [[1, 0.5, 0], [0, 0, 1.5]]
    np.testing.assert_allclose(sb @ sa, [[1, 0.5, 0], [0, 0, 1.5]])
    s = STRATEGIES["flora"](LAYOUT, rank=2)
    new = run(s, model(2), [upd("x", 1, a1, b1), upd("y", 3, a2, b2)])
    np.testing.assert_allclose(new.base_delta[M.base], 2.0 * (sb @ sa))  # scale 2: [[2,1,0],[0,0,3]]
    assert not new.tensors[M.b].any() and new.tensors[M.a].shape == (2, 3)  # adapters reset
    dev = s.for_device(new, 1)
    np.testing.assert_array_equal(dev[M.a], new.tensors[M.a][:1])
    assert dev[M.b].shape == (2, 1) and not dev[M.b].any()


def test_flora_reinit_is_seeded_per_version_and_bounded():
    a = reinit_a(M, 4, seed=0, version=1)
    assert a.shape == (4, 3) and np.abs(a).max() <= 1 / np.sqrt(3)
    np.testing.assert_array_equal(a, reinit_a(M, 4, seed=0, version=1))
    np.testing.assert_array_equal(a[:2], reinit_a(M, 2, seed=0, version=1))  # rank-r slice of one draw
    assert not np.allclose(a, reinit_a(M, 4, seed=0, version=2))


def test_flora_seed_setting_picks_the_fresh_a_and_leaves_the_fold_alone():
    rng = np.random.default_rng(5)
    glob = model(2, a=rng.normal(size=(2, 3)), b=rng.normal(size=(2, 2)))
    updates = [upd("d1", 1, a=rng.normal(size=(2, 3)), b=rng.normal(size=(2, 2)))]
    seeded = {seed: run(make_strategy("flora", LAYOUT, rank=2, init_seed=seed), glob, updates) for seed in (0, 7)}
    np.testing.assert_array_equal(seeded[7].tensors[M.a], reinit_a(M, 2, seed=7, version=1).astype(np.float32))
    assert not np.allclose(seeded[0].tensors[M.a], seeded[7].tensors[M.a])
    np.testing.assert_array_equal(seeded[0].base_delta[M.base], seeded[7].base_delta[M.base])
    with pytest.raises(ConfigError, match="init_seed"):
        make_strategy("flora", LAYOUT, rank=2, init_seed=-1)


@pytest.mark.parametrize("name", ["flora", "fedex-lora"])
def test_folding_strategies_make_effective_weights_the_mean_of_the_devices(name):
    """W + base_delta + scale B A after aggregation == sum_i p_i (W + base_delta_old + scale B_i A_i)."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(2, 3))
    old_delta = rng.normal(size=(2, 3)).astype(np.float32)
    ranks = [1, 2, 2] if name == "flora" else [2, 2, 2]
    s = STRATEGIES[name](LAYOUT, rank=2)
    glob = model(2, a=rng.normal(size=(2, 3)), b=rng.normal(size=(2, 2)), base_delta={M.base: old_delta})
    ns = [2, 5, 1]
    updates = [
        upd(f"d{i}", n, rng.normal(size=(r, 3)), rng.normal(size=(2, r))) for i, (n, r) in enumerate(zip(ns, ranks))
    ]
    target = sum(n * effective(u.tensors, w, base_delta=old_delta) for n, u in zip(ns, updates)) / sum(ns)
    for _ in range(2):  # and again from the new model: base_delta accumulates
        new = run(s, glob, updates)
        np.testing.assert_allclose(effective(new, w), target, atol=1e-5)
        glob, old_delta = new, new.base_delta[M.base]
        target = sum(n * effective(u.tensors, w, base_delta=old_delta) for n, u in zip(ns, updates)) / sum(ns)


# -- FedEx-LoRA --------------------------------------------------------------------------
def test_fedex_lora_hand_computed():
    s = STRATEGIES["fedex-lora"](LAYOUT, rank=1)
    new = run(s, model(1), [upd("x", 1, [[1, 0, 0]], [[1], [0]]), upd("y", 1, [[0, 1, 0]], [[0], [1]])])
    # mean A = [.5,.5,0], mean B = [.5,.5]; mean(B A) = [[.5,0,0],[0,.5,0]]; mean B mean A = [[.25,.25,0],[.25,.25,0]]
    # base_delta = 2 * (mean(B A) - mean B mean A) = [[.5,-.5,0],[-.5,.5,0]]
    np.testing.assert_allclose(new.tensors[M.a], [[0.5, 0.5, 0]])
    np.testing.assert_allclose(new.tensors[M.b], [[0.5], [0.5]])
    np.testing.assert_allclose(new.base_delta[M.base], [[0.5, -0.5, 0], [-0.5, 0.5, 0]])
    # FedAvg alone would give W_eff = 2 * [[.25,.25,0],[.25,.25,0]]; FedEx gives 2 * mean(B A)
    np.testing.assert_allclose(effective(new, 0.0), [[1, 0, 0], [0, 1, 0]])


# -- every strategy ----------------------------------------------------------------------
def random_updates(name, rng, count=5):
    """Updates each strategy accepts: mixed ranks where allowed, no A for FFA, B sometimes for FedSA."""
    cls = STRATEGIES[name]
    out = []
    for i in range(count):
        r = 2 if cls.same_rank else int(rng.integers(1, 3))
        a = rng.normal(size=(r, 3)) if cls.trains_a else None
        b = rng.normal(size=(2, r)) if cls.uploads_b or i % 2 else None
        out.append(upd(f"d{i}", int(rng.integers(1, 9)), a, b, head=rng.normal(size=2), rank=r))
    return out


def assert_models_close(x, y):
    assert x.rank == y.rank and x.version == y.version
    assert set(x.tensors) == set(y.tensors) and set(x.base_delta) == set(y.base_delta)
    for k in x.tensors:
        np.testing.assert_allclose(x.tensors[k], y.tensors[k], rtol=1e-5, atol=1e-6)
    for k in x.base_delta:
        np.testing.assert_allclose(x.base_delta[k], y.base_delta[k], rtol=1e-5, atol=1e-6)


def test_registry_names_every_strategy_and_builds_by_name():
    assert set(STRATEGIES) == {
        "fedavg",
        "ffa-lora",
        "fedsa-lora",
        "hetlora",
        "flexlora",
        "flexlora-delta",
        "flora",
        "fedex-lora",
    }
    assert all(cls.name == key for key, cls in STRATEGIES.items())
    s = make_strategy("hetlora", LAYOUT, rank=2, weighting="examples")
    assert s.name == "hetlora" and s.weighting == "examples" and s.rank == 2
    with pytest.raises(
        ConfigError, match="known: fedavg, ffa-lora, fedsa-lora, hetlora, flexlora, flexlora-delta, flora, fedex-lora"
    ):
        make_strategy("fedprox", LAYOUT, rank=2)
    with pytest.raises(ConfigError, match="flora"):
        make_strategy("flora", LAYOUT, rank=2, weighting="examples")
    with pytest.raises(ConfigError, match="weighting"):
        make_strategy("hetlora", LAYOUT, rank=2, weighting="norm")


@pytest.mark.parametrize(
    "name, params",
    [(name, {}) for name in STRATEGIES] + [("flexlora-delta", {"rank_norm_power": 0.5})],
    ids=[*STRATEGIES, "flexlora-delta-rank-norm"],
)
def test_merge_of_partials_equals_partial_of_all(name, params):
    rng = np.random.default_rng(sum(map(ord, name)))
    s = STRATEGIES[name](LAYOUT, rank=2, **params)
    glob = model(2, a=rng.normal(size=(2, 3)), b=rng.normal(size=(2, 2)))
    updates = random_updates(name, rng)
    whole = s.new_partial()
    parts = [s.new_partial() for _ in range(3)]
    for i, u in enumerate(updates):
        s.check(u)
        s.accumulate(whole, u)
        s.accumulate(parts[i % 3], u)
    before = {k: v.copy() for k, v in parts[0].sums.items()}
    left = s.merge(s.merge(parts[0], parts[1]), parts[2])
    right = s.merge(parts[0], s.merge(parts[1], parts[2]))
    for merged in (left, right):
        assert merged.weight == whole.weight and merged.count == whole.count
        assert sorted(merged.devices) == sorted(whole.devices)
        assert set(merged.sums) == set(whole.sums)
        for k in whole.sums:
            np.testing.assert_allclose(merged.sums[k], whole.sums[k], rtol=1e-12, atol=1e-12)
        assert_models_close(s.finalize(merged, glob), s.finalize(whole, glob))
    assert all(np.array_equal(parts[0].sums[k], v) for k, v in before.items())  # merge leaves inputs alone
    assert_models_close(s.finalize(s.merge(s.new_partial(), whole), glob), s.finalize(whole, glob))


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_empty_round_keeps_the_model(name):
    s = STRATEGIES[name](LAYOUT, rank=2)
    glob = model(2, a=np.ones((2, 3)), b=np.ones((2, 2)), base_delta={M.base: np.ones((2, 3), np.float32)})
    new = s.finalize(Partial(), glob)
    assert_models_close(new, glob)
    assert new.tensors[M.a] is not glob.tensors[M.a]


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_weights_the_head_by_examples(name):
    s = STRATEGIES[name](LAYOUT, rank=1)
    a = None if name == "ffa-lora" else [[1, 0, 0]]
    b = None if name == "fedsa-lora" else [[1], [0]]
    new = run(s, model(1), [upd("x", 1, a, b, head=[0, 8], rank=1), upd("y", 3, a, b, head=[4, 0], rank=1)])
    np.testing.assert_allclose(new.tensors["cls"], [3, 2])  # (1*[0,8] + 3*[4,0]) / 4


def good_tensors(rank=2, a=True, b=True):
    t = {"cls": np.zeros(2, np.float32)}
    if a:
        t[M.a] = np.zeros((rank, 3), np.float32)
    if b:
        t[M.b] = np.zeros((2, rank), np.float32)
    return t


@pytest.mark.parametrize(
    "name, update, reason",
    [
        ("fedavg", ClientUpdate("d", 1, 1, 1, good_tensors(1)), "rank_mismatch"),
        ("fedex-lora", ClientUpdate("d", 1, 1, 1, good_tensors(1)), "rank_mismatch"),
        ("fedsa-lora", ClientUpdate("d", 1, 1, 1, good_tensors(1, b=False)), "rank_mismatch"),
        ("ffa-lora", ClientUpdate("d", 1, 1, 1, good_tensors(1, a=False)), "rank_mismatch"),
        ("ffa-lora", ClientUpdate("d", 1, 2, 1, good_tensors()), "frozen_tensor_sent"),
        ("ffa-lora", ClientUpdate("d", 1, 2, 1, good_tensors(b=False)), "frozen_tensor_sent"),
        ("fedsa-lora", ClientUpdate("d", 1, 2, 1, good_tensors(a=False)), "missing_tensor"),
        ("hetlora", ClientUpdate("d", 1, 3, 1, good_tensors(3)), "rank_out_of_range"),
        ("flexlora", ClientUpdate("d", 1, 0, 1, {"cls": np.zeros(2, np.float32)}), "rank_out_of_range"),
        ("flora", ClientUpdate("d", 1, 1, 1, good_tensors(2)), "wrong_shape"),  # says rank 1, sends rank 2
        ("fedavg", ClientUpdate("d", 1, 2, 0, good_tensors()), "no_examples"),
        (
            "hetlora",
            ClientUpdate("d", 1, 2, 1, {**good_tensors(), M.a: np.full((2, 3), np.nan, np.float32)}),
            "non_finite",
        ),
        (
            "flexlora",
            ClientUpdate("d", 1, 2, 1, {**good_tensors(), "cls": np.array([np.inf, 0], np.float32)}),
            "non_finite",
        ),
        (
            "fedsa-lora",
            ClientUpdate("d", 1, 2, 1, {**good_tensors(), M.b: np.zeros((2, 1), np.float32)}),
            "wrong_shape",
        ),
        (
            "fedex-lora",
            ClientUpdate("d", 1, 2, 1, {**good_tensors(), "extra": np.zeros(1, np.float32)}),
            "unknown_tensor",
        ),
        ("flora", ClientUpdate("d", 1, 2, 1, good_tensors(b=False)), "missing_tensor"),
    ],
)
def test_unusable_updates_are_rejected_with_a_reason(name, update, reason):
    s = STRATEGIES[name](LAYOUT, rank=2)
    with pytest.raises(UpdateRejected) as info:
        s.check(update)
    assert info.value.reason == reason and info.value.detail


@pytest.mark.parametrize("name", ["fedavg", "ffa-lora", "fedsa-lora", "fedex-lora"])
def test_one_rank_strategies_serve_their_rank_only(name):
    s = STRATEGIES[name](LAYOUT, rank=2)
    with pytest.raises(ConfigError, match="rank 2 only"):
        s.for_device(model(2), 1)


@pytest.mark.parametrize("name", ["hetlora", "flexlora", "flexlora-delta", "flora"])
def test_rank_heterogeneous_strategies_serve_every_rank_up_to_the_global(name):
    s = STRATEGIES[name](LAYOUT, rank=2)
    glob = model(2, a=np.arange(6.0).reshape(2, 3), b=np.arange(4.0).reshape(2, 2))
    for r in (1, 2):
        dev = s.for_device(glob, r)
        assert dev[M.a].shape == (r, 3) and dev[M.b].shape == (2, r) and "cls" in dev
        np.testing.assert_array_equal(dev[M.a], glob.tensors[M.a][:r])
    with pytest.raises(ConfigError):
        s.for_device(glob, 3)


@pytest.mark.parametrize(
    "values, finite",
    [
        ([0.5, -2.0, 0.0], True),
        ([3e38, -3e38, 1e30], True),  # finite, but their sum of squares overflows float32
        ([1.0, np.nan, 2.0], False),
        ([np.inf, 0.0], False),
        ([-np.inf, np.inf], False),
        ([], True),
    ],
)
def test_finiteness_check_agrees_with_numpy_even_where_its_shortcut_overflows(values, finite):
    import warnings

    from server.strategies.base import check_same_tensors

    array = np.array(values, np.float32)
    update = ClientUpdate("d", 1, 1, 1, {"x": array})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the shortcut's expected overflow must not warn
        if finite:
            check_same_tensors(update, {"x": array.shape})
        else:
            with pytest.raises(UpdateRejected, match="NaN or infinity"):
                check_same_tensors(update, {"x": array.shape})
    assert bool(np.isfinite(array).all()) == finite
