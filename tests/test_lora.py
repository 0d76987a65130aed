"""Rank truncation, zero-padding and HetLoRA self-pruning on the device (core.lora)."""

import numpy as np
import pytest

from core.errors import ConfigError
from core.lora import lora_pairs, pad_rank, pruned_rank, rank_shapes, truncate_rank

A, B = "m.q.lora_A.weight", "m.q.lora_B.weight"
A2, B2 = "m.v.lora_A.weight", "m.v.lora_B.weight"
HEAD = "classifier.weight"


def _adapter(rank=4, seed=0):
    rng = np.random.default_rng(seed)
    return {
        A: rng.normal(size=(rank, 6)).astype(np.float32),
        B: rng.normal(size=(5, rank)).astype(np.float32),
        A2: rng.normal(size=(rank, 6)).astype(np.float32),
        B2: rng.normal(size=(6, rank)).astype(np.float32),
        HEAD: rng.normal(size=(3, 6)).astype(np.float32),
    }


def test_pairs_truncate_and_pad_round_trip():
    t = _adapter()
    assert lora_pairs(t) == [(A, B), (A2, B2)]
    small = truncate_rank(t, 2)
    assert small[A].shape == (2, 6) and small[B].shape == (5, 2) and small[HEAD] is t[HEAD]
    assert rank_shapes({k: v.shape for k, v in t.items()}, 2) == {k: v.shape for k, v in small.items()}
    back = pad_rank(small, {k: v.shape for k, v in t.items()})
    np.testing.assert_array_equal(back[A][:2], t[A][:2])
    assert not back[A][2:].any() and not back[B][:, 2:].any()
    # B @ A of the padded adapter is that of the truncation: padding changes nothing
    np.testing.assert_allclose(back[B] @ back[A], small[B] @ small[A], rtol=1e-6)


def test_pad_refuses_what_is_not_a_smaller_rank():
    t = _adapter()
    shapes = {k: v.shape for k, v in t.items()}
    with pytest.raises(ConfigError, match="cannot pad"):
        pad_rank({A: np.zeros((2, 5), np.float32)}, shapes)  # another in_features
    with pytest.raises(ConfigError, match="cannot pad"):
        pad_rank({A: np.zeros((6, 6), np.float32)}, shapes)  # a larger rank
    with pytest.raises(ConfigError, match="cannot pad"):
        pad_rank({HEAD: np.zeros((2, 6), np.float32)}, shapes)  # not a LoRA factor


def test_pruned_rank_weighs_each_component_over_all_modules():
    t = {
        A: np.eye(3, 4, dtype=np.float32),
        B: np.diag([4.0, 2.0, 0.1]).astype(np.float32)[:2],
        A2: np.eye(3, 4, dtype=np.float32),
        B2: np.zeros((2, 3), np.float32),
    }
    # component energies: sqrt(4^2 + 0), sqrt(2^2), 0 (B's third column is zero in the first two rows)
    assert pruned_rank(t, 3, 0.4) == 2
    assert pruned_rank(t, 3, 0.6) == 1
    assert pruned_rank(t, 3, 0.0) == 3  # threshold 0 keeps every component, a zero one too
    t[B2] = np.array([[0, 0, 3.0], [0, 0, 0]], np.float32)  # the third component is strong in module v
    assert pruned_rank(t, 3, 0.6) == 3
    assert pruned_rank({k: np.zeros_like(v) for k, v in t.items()}, 3, 0.5) == 1  # never below 1
    with pytest.raises(ConfigError, match="threshold"):
        pruned_rank(t, 3, 1.5)
