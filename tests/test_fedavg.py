"""FedAvg through the call shapes server/aggregator.py and server/rounds.py use today: a name ->
shape mapping for the layout, updates as deltas, and ``finalize(partial, dict)`` returning a
dict (``global + server_lr * mean(delta)``). The GlobalModel interface and every other
strategy are tested in test_strategies.py; this file goes when the aggregator switches.
"""

import numpy as np
import pytest

from edge_client.errors import UpdateRejected
from server.strategies.base import ClientUpdate, GlobalModel
from server.strategies.fedavg import FedAvg

SHAPES = {"A": (1, 2), "B": (2, 1)}


def upd(device, n, a, b, rank=1):
    return ClientUpdate(device, 1, rank, n, {"A": np.array([a], dtype=np.float32), "B": np.array(b, dtype=np.float32).reshape(2, 1)})


def test_weighted_average_by_examples_hand_computed():
    s = FedAvg(SHAPES, rank=1)
    p = s.new_partial()
    s.accumulate(p, upd("x", 1, [1.0, 2.0], [3.0, 0.0]))
    s.accumulate(p, upd("y", 3, [5.0, 6.0], [-1.0, 4.0]))
    glob = {"A": np.zeros((1, 2), np.float32), "B": np.ones((2, 1), np.float32)}
    new = s.finalize(p, glob)
    # (1*[1,2] + 3*[5,6]) / 4 = [4, 5];  1 + (1*[3,0] + 3*[-1,4]) / 4 = 1 + [0, 3]
    np.testing.assert_allclose(new["A"], [[4.0, 5.0]])
    np.testing.assert_allclose(new["B"], [[1.0], [4.0]])
    assert new["A"].dtype == np.float32


def test_merge_of_partials_equals_partial_of_all():
    rng = np.random.default_rng(0)
    s = FedAvg(SHAPES, rank=1)
    updates = [upd(f"d{i}", int(rng.integers(1, 9)), rng.normal(size=2), rng.normal(size=2)) for i in range(6)]
    whole = s.new_partial()
    left, right = s.new_partial(), s.new_partial()
    for i, u in enumerate(updates):
        s.accumulate(whole, u)
        s.accumulate(left if i % 2 else right, u)
    merged = s.merge(left, right)
    glob = {"A": np.zeros((1, 2), np.float32), "B": np.zeros((2, 1), np.float32)}
    for name in SHAPES:
        np.testing.assert_allclose(s.finalize(merged, glob)[name], s.finalize(whole, glob)[name], rtol=1e-6)
    assert merged.weight == whole.weight and sorted(merged.devices) == sorted(whole.devices)


def test_empty_round_keeps_global():
    s = FedAvg(SHAPES, rank=1)
    glob = {"A": np.ones((1, 2), np.float32), "B": np.ones((2, 1), np.float32)}
    assert all(np.array_equal(v, glob[k]) for k, v in s.finalize(s.new_partial(), glob).items())


@pytest.mark.parametrize("make, reason", [
    (lambda: upd("d", 1, [1, 2], [1, 2], rank=2), "rank_mismatch"),
    (lambda: upd("d", 0, [1, 2], [1, 2]), "no_examples"),
    (lambda: upd("d", 1, [np.nan, 2], [1, 2]), "non_finite"),
    (lambda: upd("d", 1, [np.inf, 2], [1, 2]), "non_finite"),
    (lambda: ClientUpdate("d", 1, 1, 1, {"A": np.zeros((2, 1), np.float32), "B": np.zeros((2, 1), np.float32)}), "wrong_shape"),
    (lambda: ClientUpdate("d", 1, 1, 1, {"A": np.zeros((1, 2), np.float32)}), "missing_tensor"),
    (lambda: ClientUpdate("d", 1, 1, 1, {"A": np.zeros((1, 2), np.float32), "B": np.zeros((2, 1), np.float32),
                                          "C": np.zeros(1, np.float32)}), "unknown_tensor"),
])
def test_unusable_updates_are_rejected_with_reason(make, reason):
    with pytest.raises(UpdateRejected) as info:
        FedAvg(SHAPES, rank=1).check(make())
    assert info.value.reason == reason


def test_delta_path_matches_full_tensor_path_when_full_is_global_plus_delta():
    rng = np.random.default_rng(4)
    glob = {"x.lora_A.weight": rng.normal(size=(1, 2)).astype(np.float32),
            "x.lora_B.weight": rng.normal(size=(2, 1)).astype(np.float32)}
    shapes = {k: v.shape for k, v in glob.items()}
    deltas = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in glob.items()} for _ in range(3)]
    s = FedAvg(shapes, rank=1, server_lr=0.7)
    by_delta, by_full = s.new_partial(), s.new_partial()
    for i, d in enumerate(deltas):
        s.accumulate(by_delta, ClientUpdate(f"d{i}", 1, 1, i + 1, d))
        s.accumulate(by_full, ClientUpdate(f"d{i}", 1, 1, i + 1, {k: glob[k] + v for k, v in d.items()}))
    old = s.finalize(by_delta, glob)
    new = s.finalize(by_full, GlobalModel(1, glob))
    for k in glob:
        np.testing.assert_allclose(new.tensors[k], old[k], rtol=1e-5, atol=1e-6)
