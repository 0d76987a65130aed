"""Property tests of every codec and combination, and of error feedback.

Round trip within each codec's stated bound (bit-exact for lossless pipelines), shapes kept,
sizes as promised, stochastic rounding unbiased, hostile bytes refused with ProtocolError, and
error feedback's accumulated error equal to its residual and bounded over many rounds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import sys
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from core.codecs import (
    CODECS,
    MAX_ELEMENTS,
    BFloat16,
    BlockQuant,
    Entropy,
    Float16,
    Float32,
    RandK,
    ScaledSign,
    TopK,
    get_codec,
    parse_codec,
)
from core.errors import ProtocolError
from core.protocol import Envelope, decode_envelope, encode_envelope
from edge_client.feedback import ErrorFeedback, encode_with_feedback

HAS_ZSTD = importlib.util.find_spec("zstandard") is not None
SPECS = sorted(
    set(CODECS)
    | {
        "zlib",
        "bf16+lzma",
        "fp16+zlib",
        "int8-b8",
        "int4-b8",
        "int8-b1000",
        "int4-b128-sr",
        "int8-sr+lzma",
        "topk0.3+fp16",
        "topk0.5+bf16+zlib",
        "topk0.2+int4-b8-sr",
        "topk0.001+int8",
        "topk0.9",
        "topk1e-2+int4+lzma",
        "randk0.3+int8",
        "randk0.9+fp16+zlib",
        "randk0.01",
        "int2",
        "int2-b8-sr",
        "int2-b128",
        "randk0.7+int2+zlib",
    }
    | ({"int8+zstd", "topk0.05+int4+zstd"} if HAS_ZSTD else set())
)
LOSSY = [s for s in SPECS if not get_codec(s).lossless]
PROPERTY = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

finite = st.floats(width=32, allow_nan=False, allow_infinity=False)
typical = st.floats(-10, 10, width=32)
tensors = hnp.arrays(
    np.float32, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=12), elements=st.one_of(typical, finite)
)


def round_trip(codec, x):
    data, meta = codec.encode(x)
    return codec.decode(data, meta, x.shape), data


def inner(codec):
    return codec.inner if isinstance(codec, Entropy) else codec


# -- round trip ----------------------------------------------------------------------------
@pytest.mark.parametrize("spec", SPECS)
@PROPERTY
@given(x=tensors)
def test_round_trip_is_within_the_stated_bound(spec, x):
    codec = get_codec(spec)
    y, _ = round_trip(codec, x)
    assert y.dtype == np.float32 and y.shape == x.shape
    if codec.lossless:
        assert y.tobytes() == x.tobytes()  # bit-exact, -0.0 included
        assert codec.bound(x) == 0
        return
    err = np.abs(y.astype(np.float64) - x.astype(np.float64))
    bound = codec.elementwise_bound(x)
    assert bound.shape == x.shape
    assert np.all(err <= bound), f"{spec}: error {err.max()} exceeds its bound"
    assert (err.max() if err.size else 0) <= codec.bound(x)
    if np.isfinite(err).all():
        assert np.linalg.norm(err.ravel()) <= codec.bound(x, 2) * (1 + 1e-12)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("shape", [(0,), (3, 0), (), (1,), (7,), (1, 1), (3, 5), (65,), (2, 63)])
def test_edge_shapes_round_trip(spec, shape):
    x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    y, data = round_trip(get_codec(spec), x)
    assert y.shape == x.shape and y.dtype == np.float32
    assert np.all(np.abs(y - x) <= get_codec(spec).elementwise_bound(x))
    if not x.size:
        assert len(data) <= 16


@PROPERTY
@given(
    x=hnp.arrays(np.float32, st.integers(1, 300), elements=typical),
    fraction=st.sampled_from(["0.01", "0.1", "0.37", "0.5"]),
)
def test_topk_keeps_the_largest_and_drops_the_rest(x, fraction):
    codec = get_codec(f"topk{fraction}")
    y, _ = round_trip(codec, x)
    k = codec.k(x.size)
    assert k == min(x.size, max(1, math.ceil(float(fraction) * x.size - 1e-9)))
    kept = y != 0
    np.testing.assert_array_equal(y[kept], x[kept])  # fp32 values: kept ones are exact
    assert np.count_nonzero(kept) <= k
    mags = np.sort(np.abs(x))[::-1]
    dropped = np.abs(x[~kept])
    if dropped.size and k < x.size:
        assert dropped.max() <= mags[k]  # nothing larger than the (k+1)-th magnitude was dropped
    # the L2 bound is the norm of the dropped part, and top-k is a (k/n)-contraction
    assert codec.bound(x, 2) == pytest.approx(float(np.linalg.norm(x.astype(np.float64) - y)), rel=1e-6, abs=1e-30)
    assert np.linalg.norm(x - y) <= math.sqrt(1 - k / x.size) * np.linalg.norm(x) * (1 + 1e-5) + 1e-30


@PROPERTY
@given(x=hnp.arrays(np.float32, st.integers(1, 300), elements=typical), fraction=st.sampled_from(["0.1", "0.5", "0.7"]))
def test_randk_keeps_the_entries_its_seed_names_exactly(x, fraction):
    codec = get_codec(f"randk{fraction}")
    data, _ = codec.encode(x)
    y = codec.decode(data, {}, x.shape)
    # the mask is SHAKE-128 of the leading seed, one little-endian 16-bit draw per entry
    stream = hashlib.shake_128(data[:8]).digest(2 * x.size)
    keep = np.array(
        [int.from_bytes(stream[2 * i : 2 * i + 2], "little") < round(float(fraction) * 65536) for i in range(x.size)]
    )
    assert len(data) == 8 + 4 * int(keep.sum())
    np.testing.assert_array_equal(y[keep], x[keep])
    assert not y[~keep].any()
    assert data == codec.encode(x.copy())[0]  # the seed is a hash of the tensor: reproducible


def test_randk_draws_new_positions_per_tensor_and_keeps_its_fraction_on_average():
    rng = np.random.default_rng(5)
    codec = get_codec("randk0.7")
    kept, dropped_energy, masks = [], [], set()
    for _ in range(200):
        x = rng.normal(size=1000).astype(np.float32)
        y = codec.decode(codec.encode(x)[0], {}, x.shape)
        kept.append(np.count_nonzero(y) / x.size)
        dropped_energy.append(float(np.sum((x - y).astype(np.float64) ** 2) / np.sum(x.astype(np.float64) ** 2)))
        masks.add(np.packbits(y != 0).tobytes())
    assert len(masks) == 200  # every update its own positions: error feedback sends each entry in turn
    # Binomial(1000, 0.7) per tensor: the mean of 200 lies within 0.005 of 0.7 with overwhelming probability
    assert abs(np.mean(kept) - 0.7) < 0.005
    assert abs(np.mean(dropped_energy) - 0.3) < 0.01  # E||x - C(x)||^2 = (1 - p) ||x||^2


@pytest.mark.parametrize("p", [0.5, 0.7])
def test_error_feedback_residual_under_randk_settles_where_theory_puts_it(p):
    # r' = (1 - mask) (u + r) with independent updates: E||r||^2 -> (1 - p) / p E||u||^2, not growing
    rng = np.random.default_rng(0)
    fb, norms = ErrorFeedback(), []
    for t in range(60):
        u = {"w": rng.normal(size=(64, 64)).astype(np.float32)}
        env = Envelope(kind="update", job="j", round=t, sender="d", rank=4, codec=f"randk{p}", tensors=u)
        encode_with_feedback(env, fb)
        norms.append(float(np.linalg.norm(fb.residual["w"])) / 64)  # ||u|| is about 64
    settled = np.mean(norms[30:])
    assert settled == pytest.approx(math.sqrt((1 - p) / p), rel=0.15)
    assert max(norms[30:]) < 1.5 * math.sqrt((1 - p) / p)


def test_lossless_pipelines_are_exact_on_special_values():
    x = np.array([0.0, -0.0, 1e-45, -3.4028235e38, np.inf, -np.inf, np.nan, 1.5], np.float32)
    for spec in ("fp32", "zlib", "fp32+lzma") + (("fp32+zstd",) if HAS_ZSTD else ()):
        y, _ = round_trip(get_codec(spec), x)
        assert y.tobytes() == x.tobytes()


def test_float_codecs_keep_non_finite_values_for_the_aggregator_to_refuse():
    x = np.array([np.nan, np.inf, -np.inf, 1e6], np.float32)
    for spec in ("fp16", "bf16"):
        y, _ = round_trip(get_codec(spec), x)
        assert np.isnan(y[0]) and y[1] == np.inf and y[2] == -np.inf
    assert np.isinf(round_trip(get_codec("fp16"), x)[0][3]) and get_codec("fp16").bound(x[3:]) == np.inf
    for spec in ("int8", "int4", "topk0.5", "topk0.1+int8+zlib"):
        with pytest.raises(ProtocolError, match="non-finite"):
            get_codec(spec).encode(x)


# -- sizes ---------------------------------------------------------------------------------
def encoded_size(spec, x):
    return len(get_codec(spec).encode(x)[0])


def test_compressed_sizes_are_as_promised():
    x = np.random.default_rng(0).normal(scale=1e-3, size=(64, 1024)).astype(np.float32)
    fp32 = encoded_size("fp32", x)
    assert fp32 == 4 * x.size
    assert encoded_size("fp16", x) == encoded_size("bf16", x) == fp32 // 2
    assert encoded_size("int8", x) == x.size + 2 * x.size // 64  # codes + one bf16 scale per block
    assert encoded_size("int4", x) == x.size // 2 + 2 * x.size // 64
    assert encoded_size("int2", x) == x.size // 4 + 2 * x.size // 64
    assert get_codec("int2").max_nbytes(7) == 2 + 2 and get_codec("int4").max_nbytes(7) == 4 + 2
    assert fp32 / encoded_size("int8", x) > 3.8 and fp32 / encoded_size("int8-b1024", x) > 3.99
    assert fp32 / encoded_size("int4", x) > 7.5 and fp32 / encoded_size("int4-b256", x) > 7.8
    assert fp32 / encoded_size("topk0.1", x) > 7
    assert fp32 / encoded_size("topk0.1+int8", x) > 19  # k values + k one-byte gaps + scales
    assert fp32 / encoded_size("topk0.1+int8+lzma", x) > 25  # entropy coding squeezes the gaps
    assert fp32 / encoded_size("topk0.01+int8", x) > 150
    assert fp32 / encoded_size("topk0.01+int4+zlib", x) > 200
    assert fp32 / encoded_size("randk0.5+sign", x) > 55  # positions cost 8 bytes a tensor; one bit per kept value
    assert encoded_size("int4+zlib", x) <= encoded_size("int4", x) * 1.01 + 64
    # lossless stages pay off on structured tensors (a zero-initialised B factor, say)
    assert encoded_size("zlib", np.zeros((384, 8), np.float32)) < 100
    assert encoded_size("fp32+lzma", np.zeros((384, 8), np.float32)) < 100


def test_topk_index_coding_picks_the_smallest():
    n = 4096
    x = np.zeros(n, np.float32)
    dense = get_codec("topk0.5")
    x[::2] = 1.0  # every other element: a bitmap (n/8 bytes) beats any list of k = n/2 gaps
    data = dense.encode(x)[0]
    assert data[0] == 0 and len(data) == 1 + n // 8 + 4 * n // 2
    sparse = get_codec("topk0.01")
    x = np.zeros(n, np.float32)
    x[np.arange(41) * 100] = 1.0  # k = 41 gaps of 99: one byte each
    data = sparse.encode(x)[0]
    assert len(data) == 1 + 41 + 4 * 41
    np.testing.assert_array_equal(sparse.decode(data, {}, (n,)), x)
    x = np.zeros(n, np.float32)
    x[np.arange(41) * 97 + 7] = np.arange(1, 42)
    y = sparse.decode(sparse.encode(x)[0], {}, (n,))
    np.testing.assert_array_equal(y, x)


# -- stochastic rounding -------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["int8-sr", "int4-sr", "int4-b8-sr"])
def test_stochastic_rounding_is_unbiased(spec):
    rng = np.random.default_rng(7)
    x = rng.normal(size=256).astype(np.float32)
    codec = parse_codec(spec, seed=3)
    draws = 2000
    total = np.zeros(x.size)
    for _ in range(draws):
        total += codec.decode(*codec.encode(x), x.shape)
    scale = codec.elementwise_bound(x)  # about one block scale
    mean_err = total / draws - x
    # each draw's error lies in (-s, s) with variance <= s^2 / 4: 6 standard errors of the mean
    assert np.all(np.abs(mean_err) <= 6 * scale / (2 * math.sqrt(draws)))
    nearest = get_codec(spec.replace("-sr", ""))
    biased = np.abs(nearest.decode(*nearest.encode(x), x.shape) - x)
    assert np.abs(mean_err).mean() < biased.mean() / 4  # nearest rounding's error does not average out


def test_stochastic_rounding_is_seeded_and_decoding_is_deterministic():
    x = np.random.default_rng(0).normal(size=500).astype(np.float32)
    a, b = parse_codec("int4-sr", seed=11), parse_codec("int4-sr", seed=11)
    da, db = a.encode(x)[0], b.encode(x)[0]
    assert da == db and a.encode(x)[0] != da  # same seed, same draws; the next call draws anew
    np.testing.assert_array_equal(a.decode(da, {}, x.shape), get_codec("int4-sr").decode(da, {}, x.shape))


# -- specs ---------------------------------------------------------------------------------
def test_specs_parse_to_canonical_names():
    assert get_codec("fp32").name == "fp32" and get_codec("fp16").name == "fp16"
    assert get_codec("int8-b64").name == "int8" and get_codec("int4-sr-b32").name == "int4-b32-sr"
    assert get_codec("topk0.050+fp32").name == "topk0.05" and get_codec("topk1e-2+int8").name == "topk0.01+int8"
    assert get_codec("zlib").name == "fp32+zlib" and get_codec("zlib").lossless
    assert isinstance(get_codec("topk0.05+int8+zlib").inner, TopK)
    assert isinstance(get_codec("int4-b32"), BlockQuant) and get_codec("int4-b32").block == 32
    assert get_codec("topk0.1000000000000000000001").name == "topk0.1"  # one float, one k(n)
    assert get_codec("topk0.1").k(10) == 1 and get_codec("topk0.1").k(11) == 2 and get_codec("topk0.5").k(1) == 1
    assert isinstance(get_codec("fp16"), Float16) and isinstance(get_codec("bf16"), BFloat16)
    assert get_codec("topk0.05+int4+zlib") is get_codec("topk0.05+int4+zlib")  # parsed once
    for name, codec in CODECS.items():
        assert codec.name == name and get_codec(codec.name).name == name


@pytest.mark.parametrize(
    "spec, message",
    [
        ("zzzz", "unknown codec"),
        ("int16", "unknown codec"),
        ("topk", "unknown codec"),
        ("topk0.1+", "unknown codec"),
        ("", "unknown codec"),
        ("x" * 200, "unknown codec"),
        ("topk0", "fraction"),
        ("topk1", "fraction"),
        ("topk1.5", "fraction"),
        ("randk0", "randk fraction"),
        ("randk1", "randk fraction"),
        ("topk-0.1", "unknown codec"),
        ("topknan", "unknown codec"),
        ("topk1e-400", "fraction"),
        ("int8-b7", "block size"),
        ("int8-b70000", "block size"),
        ("int8-b064", "block size"),
        ("int8-bx", "unknown codec"),
        ("int8-sr-sr", "repeated"),
        ("int8-b8-b16", "repeated"),
        ("int8+fp16", "one value stage"),
        ("zlib+int8", "before any entropy"),
        ("fp16+topk0.1", "must come first"),
        ("topk0.1+topk0.2", "must come first"),
        ("randk0.5+topk0.1", "must come first"),
        ("zlib+lzma", "at most one entropy"),
    ],
)
def test_invalid_specs_are_refused_clearly(spec, message):
    with pytest.raises(ProtocolError, match=message):
        get_codec(spec)


def test_zstd_without_the_package_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "zstandard", None)  # as on a device without it
    with pytest.raises(ProtocolError, match="zstandard"):
        parse_codec("int8+zstd")


def test_non_string_spec_is_refused():
    with pytest.raises(ProtocolError, match="unknown codec"):
        get_codec(None)  # type: ignore[arg-type]


# -- hostile input -------------------------------------------------------------------------
@pytest.mark.parametrize("spec", SPECS)
def test_truncated_and_extended_payloads_are_refused(spec):
    codec = get_codec(spec)
    x = np.random.default_rng(2).normal(size=(13, 9)).astype(np.float32)
    data, meta = codec.encode(x)
    for bad in (data[:-1], data[: len(data) // 2], data + b"\0", data + b"\xff" * 3, b""):
        with pytest.raises(ProtocolError):
            codec.decode(bad, meta, x.shape)
    if not isinstance(inner(codec), (TopK, RandK)):  # a sparse payload fits any shape with the same k
        for shape in ((13, 10), (12, 9), (1,)):
            with pytest.raises(ProtocolError):
                codec.decode(data, meta, shape)


@pytest.mark.parametrize("spec", SPECS)
@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=600), n=st.integers(0, 400))
def test_garbage_decodes_to_the_shape_or_raises_protocol_error(spec, data, n):
    try:
        y = get_codec(spec).decode(data, {}, (n,))
    except ProtocolError:
        return
    assert y.shape == (n,) and y.dtype == np.float32


@pytest.mark.parametrize("method", ["zlib", "lzma"] + (["zstd"] if HAS_ZSTD else []))
def test_decompression_bombs_are_refused(method):
    codec = get_codec(f"int8+{method}")
    n = 4096
    limit = codec.inner.nbytes(n)
    bomb = {
        "zlib": lambda b: zlib.compress(b),
        "lzma": lambda b: __import__("lzma").compress(
            b,
            format=__import__("lzma").FORMAT_RAW,
            filters=[{"id": __import__("lzma").FILTER_LZMA2, "dict_size": 1 << 20}],
        ),
        "zstd": lambda b: __import__("zstandard").ZstdCompressor().compress(b),
    }[method](b"\0" * (limit + 1))
    with pytest.raises(ProtocolError, match="expands beyond|announces"):
        codec.decode(bomb, {}, (n,))
    huge = bomb if method != "zlib" else zlib.compress(b"\0" * (64 << 20))  # 64 MiB of zeros in ~64 KiB
    with pytest.raises(ProtocolError):
        codec.decode(huge, {}, (n,))


def test_hostile_scales_codes_and_indices_are_refused():
    int8, int4 = get_codec("int8-b8"), get_codec("int4-b8")
    good8 = bytearray(int8.encode(np.ones(8, np.float32))[0])
    for bits in (b"\xc0\x7f", b"\x80\x7f", b"\x80\xbf"):  # NaN, inf, -1.0 as bf16
        with pytest.raises(ProtocolError, match="scale"):
            int8.decode(bits + bytes(good8[2:]), {}, (8,))
    with pytest.raises(ProtocolError, match="code outside"):
        int8.decode(bytes(good8[:2]) + b"\x80" + bytes(good8[3:]), {}, (8,))
    good4 = int4.encode(np.ones(7, np.float32))[0]
    with pytest.raises(ProtocolError, match="padding"):
        int4.decode(good4[:-1] + bytes([good4[-1] | 0x10]), {}, (7,))
    with pytest.raises(ProtocolError, match="code outside"):
        int4.decode(good4[:2] + b"\x88" + good4[3:], {}, (7,))
    int2 = get_codec("int2-b8")
    good2 = int2.encode(np.float32([1, -1, 0, 1, 1, -1]))[0]  # codes 01 11 00 01 | 01 11 + padding
    assert good2[2:] == bytes([0b01_00_11_01, 0b00_00_11_01])
    np.testing.assert_array_equal(int2.decode(good2, {}, (6,)), [1, -1, 0, 1, 1, -1])
    with pytest.raises(ProtocolError, match="padding"):
        int2.decode(good2[:-1] + bytes([good2[-1] | 0x40]), {}, (6,))
    with pytest.raises(ProtocolError, match="code outside"):
        int2.decode(good2[:2] + bytes([0b10]) + good2[3:], {}, (6,))
    topk = get_codec("topk0.25")  # n = 8 -> k = 2 values of 4 bytes
    values = np.float32([1, 2]).tobytes()
    assert topk.decode(b"\x02\x01\x03" + values, {}, (8,))[[1, 5]].tolist() == [1, 2]
    for index_part, message in [
        (b"\x02\x01\x07", "needs 2 indices below 8"),  # u8 gaps: 1 then 7 -> index 9
        (b"\x02\x09\x00", "gap out of range"),
        (b"\x02\x01", "index list"),
        (b"\x00\x03", "needs 2 indices"),  # bitmap with 2 bits... of a wrong count: 0b11 is fine, see next
        (b"\x00\x07", "needs 2 indices"),  # three bits set
        (b"\x01\x81\x81\x81\x81\x01\x00", "longer than"),  # varint of 5 bytes
        (b"\x01\x01", "complete values"),  # one varint, two wanted
        (b"\x01\x01\x80", "complete values"),  # unterminated varint
        (b"\x09\x01\x01", "unknown index coding"),
    ]:
        if index_part == b"\x00\x03":
            assert topk.decode(index_part + values, {}, (8,))[[0, 1]].tolist() == [1, 2]
            continue
        with pytest.raises(ProtocolError, match=message):
            topk.decode(index_part + values, {}, (8,))
    with pytest.raises(ProtocolError, match="past the end"):  # n = 9: k = 3, bitmap of 2 bytes
        topk.decode(b"\x00\x03\x80" + np.float32([1, 2, 3]).tobytes(), {}, (9,))
    for shape in ((MAX_ELEMENTS + 1,), (-1, 4), (1 << 20, 1 << 20)):
        with pytest.raises(ProtocolError, match="shape"):
            topk.decode(b"\x00", {}, shape)


# -- through the envelope ------------------------------------------------------------------
def test_envelope_carries_any_spec():
    rng = np.random.default_rng(5)
    tensors = {"a": rng.normal(size=(8, 24)).astype(np.float32), "b": rng.normal(size=(5,)).astype(np.float32)}
    for spec in ("topk0.05+int8+zlib", "int4-b32-sr+lzma", "bf16"):
        env = Envelope(kind="update", job="j", round=1, sender="d", rank=8, codec=spec, tensors=tensors)
        back = decode_envelope(encode_envelope(env))
        assert back.codec == spec
        codec = get_codec(spec)
        for name, x in tensors.items():
            assert np.all(np.abs(back.tensors[name] - x) <= codec.elementwise_bound(x))


# -- error feedback ------------------------------------------------------------------------
SHAPES = {"lora_A": (4, 24), "lora_B": (24, 4), "head.bias": (5,)}


def contraction(codec, n):
    """``(rho, a, ord)`` with ``||x - C(x)|| <= rho ||x|| + a`` for every x of n elements, from
    the stated bounds. With rho < 1, error feedback's residual provably stays below
    ``(rho max||u|| + a) / (1 - rho)`` (induction on ``r <- C's error on u + r``)."""
    codec = inner(codec)
    if isinstance(codec, Float16):
        return 2.0**-11, 2.0**-25, np.inf
    if isinstance(codec, BFloat16):
        return 2.0**-8, 2.0**-134, np.inf
    if isinstance(codec, BlockQuant):  # error <= step * s per element, s <= max|block| / qmax * (1 + 2**-7)
        rho = _quant_factor(codec, 1)  # >= 1 for int2-sr (its error may reach max|block|): none in the worst case
        return (rho, 2.0**-148, np.inf) if rho < 1 else (None, None, np.inf)
    if isinstance(codec, ScaledSign):
        return _sign_factor(codec, n), 2.0**-140, 2
    if isinstance(codec, RandK):  # positions are pseudo-random: no worst-case contraction, only in expectation
        return None, None, 2
    if isinstance(codec, TopK):  # ||err||^2 <= ||dropped||^2 + q^2 ||kept||^2 and ||kept||^2 >= (k/n) ||x||^2
        k, v = codec.k(n), codec.values
        q, a = {Float16: (2.0**-11, 2.0**-25), BFloat16: (2.0**-8, 2.0**-134), Float32: (0.0, 0.0)}.get(
            type(v), (None, None)
        )
        if isinstance(v, BlockQuant):
            q, a = _quant_factor(v, math.sqrt(min(v.block, k))), 2.0**-148
        if isinstance(v, ScaledSign):
            q, a = _sign_factor(v, k), 2.0**-140
        if q >= 1:
            return None, None, 2
        return math.sqrt(1 - k / n * (1 - q * q)), a * math.sqrt(k), 2
    raise AssertionError(codec)


def _sign_factor(v, n):
    """Per block of m elements with s = mean|x|: ||x - s sign(x)||^2 = ||x||^2 - (sum|x|)^2 / m
    <= (1 - 1/m) ||x||^2; s rounded to bf16 (relative error d <= 2**-8) adds d^2 m s^2 <= d^2 ||x||^2."""
    m = max(1, min(v.block, n))
    return math.sqrt(1 - 1 / m + (2.0**-8 + 2.0**-22) ** 2) * (1 + 2.0**-20)


def _quant_factor(v, sqrt_block):
    return sqrt_block * ((1.0 if v.stochastic else 0.5) + v.qmax * 2.0**-23) * (1 + 2.0**-7) * (1 + 2.0**-22) / v.qmax


def norm(tensors, ord):
    flat = np.concatenate([np.ravel(t) for t in tensors.values()]).astype(np.float64)
    return float(np.linalg.norm(flat, ord))


@pytest.mark.parametrize("spec", LOSSY)
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), scale=st.sampled_from([1e-4, 1e-2, 1.0]))
def test_error_feedback_accumulated_error_is_the_residual_and_stays_bounded(spec, seed, scale):
    rng = np.random.default_rng(seed)
    codec = get_codec(spec)
    fb = ErrorFeedback()
    sum_true = {n: np.zeros(s) for n, s in SHAPES.items()}
    sum_sent = {n: np.zeros(s) for n, s in SHAPES.items()}
    rounds, worst, biggest_update, biggest_sent = 40, 0.0, 0.0, 0.0
    # per tensor (top-k's k depends on its size); the largest rho and the summed a hold for the update
    bounds = [contraction(codec, math.prod(s)) for s in SHAPES.values()]
    ord = bounds[0][2]
    rho = None if any(b[0] is None for b in bounds) else max(b[0] for b in bounds)
    a = None if rho is None else (sum(b[1] for b in bounds) if ord == 2 else max(b[1] for b in bounds))
    for t in range(rounds):
        update = {n: (rng.normal(size=s) * scale * rng.uniform(0.1, 1)).astype(np.float32) for n, s in SHAPES.items()}
        compensated = fb.compensate(update)
        env = Envelope(kind="update", job="j", round=t, sender="d", rank=4, codec=spec, tensors=update)
        decoded = decode_envelope(encode_with_feedback(env, fb)).tensors
        for n in SHAPES:
            sum_true[n] += update[n]
            sum_sent[n] += decoded[n]
            # this round's residual is exactly what the codec dropped, within its stated bound
            assert np.all(np.abs(fb.residual[n]) <= codec.elementwise_bound(compensated[n]) * (1 + 1e-6))
        worst = max(worst, norm(fb.residual, ord))
        biggest_update = max(biggest_update, norm(update, ord))
        biggest_sent = max(biggest_sent, norm(compensated, np.inf))
    # telescoping: the aggregator's total differs from the device's true total by the residual
    # (up to float32 rounding of one addition and one subtraction per round)
    for n in SHAPES:
        np.testing.assert_allclose(
            sum_true[n] - sum_sent[n], fb.residual[n], rtol=0, atol=rounds * 2.0**-22 * biggest_sent
        )
    if rho is not None:
        assert worst <= (rho * biggest_update + a) / (1 - rho) * (1 + 1e-4)


def test_error_feedback_recovers_what_top_k_drops():
    rng = np.random.default_rng(0)
    drift = rng.normal(size=(16, 64)).astype(np.float32)  # a consistent direction, as in training
    codec_spec = "topk0.05+int8"
    with_ef, without = ErrorFeedback(), np.zeros(drift.shape)
    got_ef = np.zeros(drift.shape)
    rounds = 300
    for t in range(rounds):
        u = {"w": drift + rng.normal(scale=0.5, size=drift.shape).astype(np.float32)}
        env = Envelope(kind="update", job="j", round=t, sender="d", rank=1, codec=codec_spec, tensors=u)
        got_ef += decode_envelope(encode_with_feedback(env, with_ef)).tensors["w"]
        without += decode_envelope(encode_envelope(env)).tensors["w"]
    target = drift * rounds
    # without feedback 95% of the coordinates are mostly lost; with it only the residual is missing
    assert np.linalg.norm(got_ef - target) < 0.15 * np.linalg.norm(without - target)


def test_error_feedback_survives_a_restart(tmp_path):
    path = tmp_path / "state" / "residual.npz"
    rng = np.random.default_rng(3)
    updates = [
        {"a/b.weight": rng.normal(size=(8, 3)).astype(np.float32), "file": rng.normal(size=5).astype(np.float32)}
        for _ in range(6)
    ]

    def run(fb_of_round):
        payloads = []
        for t, u in enumerate(updates):
            fb = fb_of_round(t)
            env = Envelope(kind="update", job="j", round=t, sender="d", rank=8, codec="topk0.2+int4", tensors=u)
            payloads.append(encode_with_feedback(env, fb))
            fb.save(path)
        return payloads

    steady = ErrorFeedback()
    uninterrupted = run(lambda t: steady)
    path.unlink()
    restarted = run(lambda t: ErrorFeedback.load(path))  # a fresh process every round
    assert restarted == uninterrupted
    loaded = ErrorFeedback.load(path)
    assert set(loaded.residual) == {"a/b.weight", "file"}
    for name, r in steady.residual.items():
        assert loaded.residual[name].dtype == np.float32
        np.testing.assert_array_equal(loaded.residual[name], r)
    assert [p.name for p in path.parent.iterdir()] == ["residual.npz"]  # no temporary files left


def test_error_feedback_tolerates_missing_corrupt_and_mismatched_state(tmp_path, caplog):
    assert ErrorFeedback.load(tmp_path / "none.npz").residual == {}
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    assert ErrorFeedback.load(bad).residual == {}
    assert "ignoring unreadable" in caplog.text
    fb = ErrorFeedback({"w": np.ones((2, 2), np.float32), "other": np.ones(3, np.float32)})
    out = fb.compensate({"w": np.zeros((4, 2), np.float32)})  # the adapter's shape changed: old residual unusable
    np.testing.assert_array_equal(out["w"], 0)
    fb.record({"w": np.array([1.0, np.inf], np.float32)}, {"w": np.array([0.5, 0.0], np.float32)})
    np.testing.assert_array_equal(fb.residual["w"], [0.5, 0.0])  # non-finite residual is not carried
    assert "other" in fb.residual  # tensors not sent this round keep their residual
    empty = ErrorFeedback()
    empty.save(tmp_path / "empty.npz")
    assert ErrorFeedback.load(tmp_path / "empty.npz").residual == {}


def test_scaled_sign_is_the_l2_best_one_bit_code_and_refuses_bad_bits():
    x = np.array([3.0, -1.0, 0.0, 2.0, -2.0], np.float32)
    codec = get_codec("sign-b8")
    data, meta = codec.encode(x)
    assert len(data) == 2 + 1  # one bf16 scale, five sign bits in one byte
    s = 1.6015625  # mean|x| = 1.6, to the nearest bfloat16
    np.testing.assert_array_equal(codec.decode(data, meta, x.shape), np.float32([s, -s, s, s, -s]))
    np.testing.assert_allclose(codec.elementwise_bound(x), [3 - s, s - 1, s, 2 - s, 2 - s], rtol=1e-5)
    with pytest.raises(ProtocolError, match="padding bits"):
        codec.decode(data[:2] + bytes([data[2] | 0x80]), meta, x.shape)
    with pytest.raises(ProtocolError, match="block scale"):
        codec.decode(b"\x80\xbf" + data[2:], meta, x.shape)  # bf16 -1.0
