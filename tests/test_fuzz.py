"""A bounded sample of bench/fuzz_bench.py (the same generators, a fixed seed, a few thousand
inputs over every target) and property tests: hostile bytes and JSON reach every parser and
decoder, and the only exception that may come out is ProtocolError.

The full run (a million inputs, the rare largest-shape "amplify" inputs included) is
``.venv/bin/python bench/fuzz_bench.py --inputs 1000000 --write-docs``; docs/benchmarks.md has
its numbers.
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.errors import ConfigError, ProtocolError
from core.messages import (
    parse_ack,
    parse_announcement,
    parse_header,
    parse_json,
    parse_secagg_forward,
    parse_secagg_key_list,
    parse_secagg_unmask,
    parse_secagg_upload,
    parse_shard_plan,
    parse_shard_progress,
    parse_status,
    parse_topic,
)
from core.protocol import (
    ENVELOPE_MAGIC,
    HEADER_ZLIB,
    Reassembler,
    decode_envelope,
    decode_partial,
    parse_chunk,
)

ROOT = Path(__file__).resolve().parent.parent


def _load_fuzz_bench():
    if "fuzz_bench" in sys.modules:
        return sys.modules["fuzz_bench"]
    spec = importlib.util.spec_from_file_location("fuzz_bench", ROOT / "bench" / "fuzz_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_bench"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


fb = _load_fuzz_bench()

# Findings of a full run that are reported and not fixed yet: (target, type, text in where or
# message), each with a strict xfail test that turns red once it is fixed. None at present.
KNOWN: tuple[tuple[str, str, str], ...] = ()


def _unknown(findings: list[dict]) -> list[dict]:
    return [
        f
        for f in findings
        if not any(
            f["target"] == target and f["type"] == kind and (text in f["where"] or text in f["message"])
            for target, kind, text in KNOWN
        )
    ]


def test_fuzz_sample_over_every_target_raises_only_protocol_error():
    t0 = time.perf_counter()
    names = set(fb.make_targets(fb.Corpus()))
    results = fb.run(
        inputs=300 * len(names),
        seed=1234,
        slow_s=2.0,
        alarm_s=10,
        trace_every=0,
        bomb_mb=8,
        amplify=False,
        full=False,
        quiet=True,
    )
    assert set(results["targets"]) == names
    for name, s in results["targets"].items():
        assert s["inputs"] == 300, name
        assert s["refused"] > 0, f"{name}: nothing was refused; the generators do not reach the parser"
    assert results["targets"]["envelope"]["accepted"] > 0  # valid and resealed envelopes decode
    unknown = _unknown(results["findings"])
    assert not unknown, "\n".join(
        f"{f['target']} {f['kind']} {f['type']} at {f['where']}: {f['message']}; input {f['input_repr']}"
        for f in unknown
    )
    assert time.perf_counter() - t0 < 60


def test_generators_are_deterministic():
    def sample(seed):
        corpus = fb.Corpus(0, bomb_mb=1, full=False)
        targets = fb.make_targets(corpus, amplify=False)
        out = []
        for name in ("status", "announcement", "envelope", "codec", "topic", "chunk", "reassembler"):
            rng = random.Random(f"{seed}:{name}")
            out += [repr(targets[name].generate(rng)) for _ in range(30)]
        return out

    first = sample(7)
    assert first == sample(7)  # a fresh corpus: its seed envelopes and encodings are the same too
    assert first != sample(8)


# -- the harness must be able to fail --------------------------------------------------------
def _planted(call, weight=1.0):
    return fb.Target("planted", weight, lambda rng: ("random", rng.randbytes(rng.randint(1, 8))), call)


def test_harness_reports_a_planted_foreign_exception():
    def call(data: bytes):
        if data[0] < 16:
            return {}[data]  # KeyError: the kind of bug the fuzzer is for
        if data[0] < 32:
            raise ConfigError("a FedloraError, but not a ProtocolError: still a finding")
        raise ProtocolError("refused")

    results = fb.run(
        inputs=400,
        targets=["planted"],
        extra={"planted": _planted(call)},
        trace_every=0,
        alarm_s=0,
        bomb_mb=1,
        amplify=False,
        quiet=True,
    )
    s = results["targets"]["planted"]
    types = {f["type"]: f for f in results["findings"]}
    assert set(types) == {"KeyError", "ConfigError"}
    assert types["KeyError"]["target"] == "planted" and types["KeyError"]["kind"] == "exception"
    assert types["KeyError"]["where"].startswith("test_fuzz.py")
    assert types["KeyError"]["input_repr"].startswith("b'")
    assert s["refused"] + sum(f["count"] for f in results["findings"]) == s["inputs"] == 400
    assert 0 < types["KeyError"]["count"] < 100 and s["findings"] == sum(f["count"] for f in results["findings"])


def test_harness_reports_slow_inputs_and_cuts_off_hangs():
    inputs = iter([b"a", b"b", b"slow", b"c", b"hang", b"d", b"e", b"f"])

    def call(data: bytes):
        if data == b"slow":
            time.sleep(0.3)  # slow on every run: also on the harness's second timing
        if data == b"hang":
            while True:  # a hang: the alarm ends it
                pass
        raise ProtocolError("refused")

    planted = fb.Target("planted", 1, lambda rng: ("fixed", next(inputs)), call)
    results = fb.run(
        inputs=8,
        targets=["planted"],
        extra={"planted": planted},
        slow_s=0.2,
        alarm_s=1,
        trace_every=0,
        bomb_mb=1,
        amplify=False,
        quiet=True,
    )
    found = {f["kind"]: f for f in results["findings"]}
    assert set(found) == {"slow", "hang"}
    assert found["slow"]["input_repr"] == "b'slow'" and found["hang"]["input_repr"] == "b'hang'"
    s = results["targets"]["planted"]
    assert s["inputs"] == 8 and s["refused"] == 7 and s["over_slow"] == 1  # the hang is not also "slow"


def test_harness_counts_memory_and_invariant_findings():
    import numpy as np

    with pytest.raises(fb.MemoryBound):
        fb._check_decoded({"a": np.zeros(1 << 20, np.float32)}, bound=1 << 20)
    r = Reassembler(max_bytes=1 << 10, max_buffered=1 << 12)
    fb.ReassemblyGen.check(r)
    r.buffered += 1  # accounting drift
    with pytest.raises(fb.InvariantViolation):
        fb.ReassemblyGen.check(r)


# -- findings of the first full run, fixed: each stays as a regression test --------------------
def test_a_topic_with_a_unicode_digit_is_refused():
    """str.isdigit() accepts '²', which int() refuses."""
    with pytest.raises(ProtocolError):
        parse_topic("fedlora/job1/global/\u00b2/0", "fedlora/job1")


def test_frozen_changes_with_disagreeing_shapes_are_refused():
    import numpy as np

    from core.protocol import (
        Envelope,
        EnvelopeLimits,
        encode_envelope,
        frozen_changes,
    )

    weight = "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.weight"
    env = Envelope(
        "global",
        "job1",
        9,
        "aggregator",
        8,
        "fp32",
        {
            "base_delta/" + weight: np.zeros((2, 2), np.float32),
            "base_a/" + weight: np.zeros((1, 3), np.float32),
            "base_b/" + weight: np.zeros((2, 1), np.float32),
        },
    )  # all within for_global's (384, 384); B @ A is (2, 3)
    tensors = decode_envelope(encode_envelope(env), EnvelopeLimits.for_global(fb.SHAPES)).tensors
    with pytest.raises(ProtocolError, match="disagrees"):
        frozen_changes(tensors)


def test_the_reassembler_never_exceeds_max_buffered():
    """Evicting one idle partial may free less room than a new chunk takes: evict more, or refuse."""
    from core.protocol import split_chunks

    now = [0.0]
    r = Reassembler(max_bytes=1 << 16, max_pending=16, max_buffered=4096, evict_idle_s=120, clock=lambda: now[0])
    for i in range(8):  # eight sources, one small partial message each
        r.add(f"dev{i}", split_chunks(bytes([i]) * 200, 100)[0])
    now[0] = 200.0  # now idle
    for i in range(8):  # each 4 KB chunk evicts one idle partial, then is buffered anyway
        try:
            r.add(f"dev{i}", split_chunks(bytes([100 + i]) * 8000, 4000)[0])
        except ProtocolError:
            pass
    assert r.buffered <= r.max_buffered, f"{r.buffered} bytes buffered, max_buffered {r.max_buffered}"


def test_an_envelope_without_limits_cannot_amplify():
    """Without a job's limits, all tensors together may hold at most one tensor's limit."""
    import hashlib

    one = bytes([2, 0]) + b"\0\0\x80?"  # topk1e-9 of 2**26 values: k = 1, a u8 gap of 0, the value 1.0
    count = 8
    header = {
        "v": 1,
        "kind": "global",
        "job": "job1",
        "round": 1,
        "sender": "aggregator",
        "rank": 8,
        "codec": "topk1e-9",
        "num_examples": 0,
        "metrics": {},
        "base_version": 0,
        "tensors": [
            {"name": f"t{i}", "shape": [1 << 26], "dtype": "float32", "nbytes": len(one), "meta": {}}
            for i in range(count)
        ],
        "body_sha256": hashlib.sha256(one * count).hexdigest(),
    }
    raw = json.dumps(header).encode()
    payload = ENVELOPE_MAGIC + len(raw).to_bytes(4, "little") + raw + one * count
    try:
        tensors = decode_envelope(payload).tensors
    except ProtocolError:
        return
    held = sum(t.nbytes for t in tensors.values())  # calloc'd: virtual until something reads them
    del tensors
    assert held <= 64 * len(payload) + (64 << 20), f"{len(payload)} bytes decode to {held >> 20} MiB"


# -- properties --------------------------------------------------------------------------------
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FIELD_NAMES = (
    "v",
    "state",
    "rank",
    "num_examples",
    "model_id",
    "round",
    "result",
    "reason",
    "detail",
    "msg_id",
    "count",
    "missing",
    "job",
    "global_version",
    "completed",
    "rounds",
    "deadline",
    "selected",
    "codec",
    "head_codec",
    "strategy",
    "train",
    "name",
    "trains_a",
    "prune_threshold",
    "fedprox_mu",
    "privacy",
    "clip",
    "noise_std",
    "local_steps",
    "batch_size",
    "lr",
    "lr_rank_power",
    "kind",
    "sender",
    "tensors",
    "shape",
    "dtype",
    "nbytes",
    "meta",
    "metrics",
    "base_version",
    "body_sha256",
    "mode",
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=40)
    | st.sampled_from(
        ["online", "offline", "accepted", "incomplete", "open", "update", "float32", "fp32", "int8", "async"]
    ),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=8), children, max_size=8)
    ),
    max_leaves=20,
)
json_objects = st.dictionaries(st.sampled_from(FIELD_NAMES), json_values, max_size=14)


def _only_protocol_error(fn, *args):
    try:
        fn(*args)
    except ProtocolError:
        pass


def _header(payload: bytes):
    return parse_header(parse_json(payload, "envelope header", 1 << 20))


@PROPERTY
@given(payload=st.binary(max_size=3000))
def test_any_bytes_reach_every_parser_and_only_protocol_error_comes_out(payload):
    for fn in (
        parse_status,
        parse_ack,
        parse_announcement,
        _header,
        parse_chunk,
        decode_envelope,
        parse_secagg_upload,
        parse_secagg_key_list,
        parse_secagg_forward,
        parse_secagg_unmask,
        parse_shard_plan,
        parse_shard_progress,
        lambda b: decode_partial(b, 1 << 16),
        lambda b: decode_envelope(b, fb.LIMITS_UPDATE),
        lambda b: decode_envelope(b, fb.LIMITS_GLOBAL),
    ):
        _only_protocol_error(fn, payload)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(obj=json_objects, extra=st.sampled_from([b"", b" ", b"x", b"\xff"]))
def test_any_json_object_is_parsed_or_refused_with_protocol_error(obj, extra):
    payload = json.dumps(obj).encode() + extra
    for fn in (
        parse_status,
        parse_ack,
        parse_announcement,
        _header,
        parse_secagg_upload,
        parse_secagg_key_list,
        parse_secagg_forward,
        parse_secagg_unmask,
        parse_shard_plan,
        parse_shard_progress,
    ):
        _only_protocol_error(fn, payload)


@PROPERTY
@given(word=st.integers(0, 2**32 - 1), rest=st.binary(max_size=400), compressed=st.booleans())
def test_envelopes_with_any_length_word_raise_only_protocol_error(word, rest, compressed):
    payload = ENVELOPE_MAGIC + (word | (HEADER_ZLIB if compressed else 0)).to_bytes(4, "little") + rest
    for limits in (None, fb.LIMITS_UPDATE, fb.LIMITS_GLOBAL):
        _only_protocol_error(decode_envelope, payload, limits)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    spec=st.sampled_from(fb.SPECS),
    data=st.binary(max_size=700),
    shape=st.lists(st.integers(0, 70), max_size=3).map(tuple),
)
def test_any_bytes_to_any_codec_raise_only_protocol_error(spec, data, shape):
    from core.codecs import get_codec

    _only_protocol_error(get_codec(spec).decode, data, {}, shape)


def test_frozen_changes_refuses_a_product_beyond_a_tensors_limit_before_building_it():
    import numpy as np

    from core.protocol import BASE_A_PREFIX, BASE_B_PREFIX, frozen_changes

    # 16 GiB if it were built: refused from the shapes alone.
    tensors = {
        BASE_A_PREFIX + "w": np.ones((1, 1 << 16), np.float32),
        BASE_B_PREFIX + "w": np.ones((1 << 16, 1), np.float32),
    }
    with pytest.raises(ProtocolError, match="exceeds"):
        frozen_changes(tensors)
