"""Secure aggregation's core (core/secagg.py): the unmasked sum is the plain sum, bit-exact in
the ring, with and without devices dropping after masking; one masked input looks random and
does not decode to the update; shares open only for their recipient."""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.errors import ProtocolError
from core.secagg import (
    SEALED_BYTES,
    SHARE_BYTES,
    Quantizer,
    combine_secret,
    masked_input,
    new_keys,
    open_shares,
    public_key,
    reveal,
    ring_sum,
    seal_shares,
    split_secret,
    unmask,
)

JOB, ROUND = "job", 7


def seeded_bytes(seed: int):
    rng = np.random.default_rng(seed)
    return lambda n: rng.bytes(n)


def run_round(updates: dict[str, np.ndarray], drop: set[str], threshold: int, quantizer: Quantizer, seed: int = 0):
    """Every step of one round among ``updates``' devices, the ``drop`` ones dropping after
    they sent their shares and before their masked input; returns (masked inputs, unmasked sum)."""
    random_bytes = seeded_bytes(seed)
    devices = sorted(updates)
    keys = {d: new_keys(random_bytes) for d in devices}
    seeds = {d: random_bytes(32) for d in devices}
    # 2. shares: each device seals a pair of shares for every peer; the aggregator forwards them
    held: dict[str, dict] = {d: {} for d in devices}
    for d in devices:
        peers = {p: keys[p].cipher_public for p in devices if p != d}
        for peer, sealed in seal_shares(d, keys[d], seeds[d], peers, threshold, JOB, ROUND, random_bytes).items():
            assert len(sealed) == SEALED_BYTES
            held[peer][d] = open_shares(peer, keys[peer], d, keys[d].cipher_public, sealed, JOB, ROUND)
    # 3. masked inputs, from the survivors only
    rng = np.random.default_rng(seed)
    mask_public = {d: keys[d].mask_public for d in devices}
    masked = {}
    for d in devices:
        if d in drop:
            continue
        codes = quantizer.encode(updates[d], rng)
        masked[d] = masked_input(
            codes, d, keys[d], seeds[d], {p: mask_public[p] for p in devices if p != d}, JOB, ROUND
        )
    # 4. unmasking: survivors reveal one share per peer; the aggregator rebuilds and removes masks
    survivors = sorted(masked)
    revealed = {s: reveal(held[s], survivors, drop) for s in survivors}
    self_seeds = {u: combine_secret((revealed[s][u] for s in survivors if s != u), threshold) for u in survivors}
    mask_secrets = {g: combine_secret((revealed[s][g] for s in survivors), threshold) for g in drop}
    peers_of = {d: [p for p in devices if p != d] for d in devices}
    total = unmask(ring_sum(masked.values()), self_seeds, mask_secrets, peers_of, mask_public, JOB, ROUND)
    return masked, total


def updates_of(n: int, size: int = 2000, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"dev{i:03d}": rng.normal(0, 0.02, size) for i in range(n)}


@pytest.mark.parametrize("dropped", [0, 1, 3])
def test_the_unmasked_sum_is_the_plain_sum_exactly_in_the_ring(dropped):
    updates = updates_of(10)
    drop = set(sorted(updates)[:dropped])
    q = Quantizer(clip=0.1, max_devices=10)
    _, total = run_round(updates, drop, threshold=6, quantizer=q)
    survivors = [d for d in sorted(updates) if d not in drop]
    rng = np.random.default_rng(0)  # the same stream run_round used: the same stochastic rounding
    codes = {d: q.encode(updates[d], rng) for d in sorted(updates) if d not in drop}
    assert np.array_equal(total, ring_sum(codes[d] for d in survivors))  # bit-exact
    plain = sum(updates[d] for d in survivors)
    assert np.max(np.abs(q.decode(total) - plain)) <= len(survivors) / q.scale  # within the quantization bound


def test_too_many_dropouts_cannot_be_unmasked():
    """With fewer survivors than the threshold, the secrets cannot be rebuilt: refused."""
    updates = updates_of(5, size=50)
    with pytest.raises(ProtocolError, match="cannot rebuild a secret split with threshold 3"):
        run_round(updates, drop=set(sorted(updates)[:3]), threshold=3, quantizer=Quantizer(0.1, 5))


def test_one_masked_input_looks_uniformly_random_and_does_not_decode_to_the_update():
    updates = updates_of(4, size=50_000)
    q = Quantizer(clip=0.1, max_devices=4)
    masked, _ = run_round(updates, set(), threshold=2, quantizer=q)
    view = masked["dev001"]
    counts = np.bincount(np.frombuffer(view.tobytes(), np.uint8), minlength=256)
    expected = view.nbytes / 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 255 degrees of freedom: mean 255, sd ~22.6; 400 is beyond the 99.999th percentile
    assert chi2 < 400, chi2
    # its plain codes, by contrast, are far from uniform (small values around 0)
    plain = q.encode(updates["dev001"], np.random.default_rng(0))
    plain_counts = np.bincount(np.frombuffer(plain.tobytes(), np.uint8), minlength=256)
    assert float(((plain_counts - expected) ** 2 / expected).sum()) > 10 * 400
    decoded = q.decode(view)
    corr = np.corrcoef(decoded, updates["dev001"])[0, 1]
    assert abs(corr) < 0.02  # no trace of the update
    assert np.mean(np.abs(decoded - updates["dev001"])) > 5 * np.std(updates["dev001"])  # ~uniform in +-clip * devices


def test_shares_open_only_for_their_recipient_round_and_job():
    rb = seeded_bytes(3)
    a, b, c = new_keys(rb), new_keys(rb), new_keys(rb)
    sealed = seal_shares("a", a, rb(32), {"b": b.cipher_public, "c": c.cipher_public}, 2, JOB, ROUND, rb)
    opened = open_shares("b", b, "a", a.cipher_public, sealed["b"], JOB, ROUND)
    assert opened.owner == "a" and len(opened.mask_secret) == len(opened.self_seed) == SHARE_BYTES
    for who, keys, r, job, data in [
        ("c", c, ROUND, JOB, sealed["b"]),  # another device
        ("b", b, ROUND + 1, JOB, sealed["b"]),  # a replay into another round
        ("b", b, ROUND, "other", sealed["b"]),  # or job
        ("b", b, ROUND, JOB, sealed["b"][:-1] + bytes([sealed["b"][-1] ^ 1])),  # tampered
        ("b", b, ROUND, JOB, sealed["b"][:20]),  # cut
    ]:
        with pytest.raises(ProtocolError):
            open_shares(who, keys, "a", a.cipher_public, data, job, r)


def test_shamir_rebuilds_with_the_threshold_and_not_below():
    secret = bytes(range(32))
    shares = split_secret(secret, 10, 4)
    assert combine_secret(shares[:4], 4) == secret and combine_secret(shares[3:9], 4) == secret
    assert combine_secret(shares[:3], 3) != secret  # Shamir cannot tell: hence the threshold argument
    with pytest.raises(ProtocolError, match="threshold 4"):
        combine_secret(shares[:3], 4)
    with pytest.raises(ValueError):
        split_secret(secret, 2000, 4)
    with pytest.raises(ValueError):
        split_secret(secret[:16], 10, 4)
    with pytest.raises(ProtocolError):
        combine_secret([shares[0], shares[0]], 2)


def test_a_device_never_reveals_both_shares_of_one_peer():
    rb = seeded_bytes(4)
    a, b = new_keys(rb), new_keys(rb)
    sealed = seal_shares("a", a, rb(32), {"b": b.cipher_public, "c": new_keys(rb).cipher_public}, 2, JOB, ROUND, rb)
    held = {"a": open_shares("b", b, "a", a.cipher_public, sealed["b"], JOB, ROUND)}
    assert reveal(held, ["a"], []) == {"a": held["a"].self_seed}
    assert reveal(held, [], ["a"]) == {"a": held["a"].mask_secret}
    with pytest.raises(ProtocolError, match="both surviving and dropped"):
        reveal(held, ["a"], ["a"])


def test_quantizer_sums_do_not_overflow_and_are_unbiased():
    q = Quantizer(clip=1.0, max_devices=100)
    rng = np.random.default_rng(5)
    extremes = [np.full(10, 1.0)] * 100
    assert np.allclose(q.decode(ring_sum(q.encode(x, rng) for x in extremes)), 100.0, atol=100 / q.scale)
    x = np.full(200_000, 0.3 / q.scale)  # a third of a code: rounding must be unbiased
    assert q.decode(q.encode(x, rng)).mean() == pytest.approx(x[0], rel=0.02)
    with pytest.raises(ValueError, match="non-finite"):
        q.encode(np.array([np.nan]))
    with pytest.raises(ValueError):
        Quantizer(clip=0.0, max_devices=1)
    assert math.isclose(q.scale, ((2**31 - 1) // 100 - 1) / 1.0)


def test_bad_public_keys_are_refused():
    keys = new_keys(seeded_bytes(6))
    with pytest.raises(ProtocolError, match="not a usable X25519 key"):
        masked_input(np.zeros(4, np.uint32), "a", keys, b"\0" * 32, {"b": b"\0" * 5}, JOB, ROUND)
    with pytest.raises(ProtocolError, match="not a usable X25519 key"):  # a low-order point: all-zero secret
        masked_input(np.zeros(4, np.uint32), "a", keys, b"\0" * 32, {"b": b"\0" * 32}, JOB, ROUND)
    assert public_key(keys.mask_secret) == keys.mask_public


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=200), owner_key=st.binary(min_size=0, max_size=40))
def test_any_bytes_as_sealed_shares_or_keys_raise_only_protocol_error(data, owner_key):
    keys = new_keys(seeded_bytes(8))
    try:
        open_shares("b", keys, "a", owner_key, data, JOB, ROUND)
    except ProtocolError:
        pass
    try:
        combine_secret([data, data[::-1]], 2)
    except ProtocolError:
        pass
