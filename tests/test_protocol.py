import hashlib
import json
import struct
import zlib

import numpy as np
import pytest

from core.errors import PayloadTooLarge, ProtocolError
from core.messages import TopicKind, TopicRef
from core.protocol import (
    BASE_A_PREFIX,
    BASE_B_PREFIX,
    BASE_DELTA_PREFIX,
    CHUNK_HEADER,
    CHUNK_MAGIC,
    ENVELOPE_MAGIC,
    HEADER_ZLIB,
    MAX_HEADER_BYTES,
    Envelope,
    Reassembler,
    ReassemblyBusy,
    Topics,
    adapter_part,
    check_device_id,
    decode_envelope,
    encode_envelope,
    frozen_changes,
    message_id,
    split_chunks,
)


def _env(**kw):
    base = dict(
        kind="update",
        job="j",
        round=3,
        sender="d1",
        rank=4,
        codec="fp32",
        tensors={"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, dtype=np.float32)},
        num_examples=17,
        metrics={"train_loss": 0.5},
    )
    base.update(kw)
    return Envelope(**base)


def test_envelope_round_trip_is_exact():
    env = _env()
    back = decode_envelope(encode_envelope(env))
    assert (back.kind, back.job, back.round, back.sender, back.rank, back.num_examples) == (
        "update",
        "j",
        3,
        "d1",
        4,
        17,
    )
    assert back.metrics == {"train_loss": 0.5}
    for name in env.tensors:
        np.testing.assert_array_equal(back.tensors[name], env.tensors[name])


def test_fp16_codec_is_within_half_precision():
    x = np.random.default_rng(0).normal(size=(50,)).astype(np.float32)
    back = decode_envelope(encode_envelope(_env(codec="fp16", tensors={"x": x})))
    np.testing.assert_allclose(back.tensors["x"], x, rtol=2**-10, atol=1e-4)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b"XXXX" + b[4:], "bad magic"),
        (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "sha256"),
        (lambda b: b[:10], "exceeds the payload"),
    ],
)
def test_corrupted_envelopes_are_refused(mutate, message):
    with pytest.raises(ProtocolError, match=message):
        decode_envelope(mutate(encode_envelope(_env())))


def _plain_header(payload: bytes) -> tuple[bytes, bytes]:
    """An envelope's header as plain JSON bytes, and its body."""
    word = struct.unpack_from("<I", payload, 4)[0]
    hlen = word & ~HEADER_ZLIB
    raw = payload[8 : 8 + hlen]
    return (zlib.decompress(raw) if word & HEADER_ZLIB else raw), payload[8 + hlen :]


def _with_header(header: bytes, body: bytes, compressed: bool = False) -> bytes:
    if compressed:
        header = zlib.compress(header)
        return ENVELOPE_MAGIC + struct.pack("<I", len(header) | HEADER_ZLIB) + header + body
    return ENVELOPE_MAGIC + struct.pack("<I", len(header)) + header + body


def test_tensors_can_have_their_own_codec():
    x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8)
    env = _env(codec="sign", tensors={"lora_A": x, "head": x}, tensor_codecs={"head": "fp32"})
    payload = encode_envelope(env)
    header, _ = _plain_header(payload)
    specs = {t["name"]: t for t in json.loads(header)["tensors"]}
    assert "codec" not in specs["lora_A"] and specs["head"]["codec"] == "fp32"  # only exceptions are named
    back = decode_envelope(payload)
    np.testing.assert_array_equal(back.tensors["head"], x)
    assert np.unique(np.abs(back.tensors["lora_A"])).size == 1  # one scale: sign
    assert back.tensor_codecs == {"head": "fp32"}
    for bad in (b'"codec":"zzz"', b'"codec":7'):
        with pytest.raises(ProtocolError, match="codec"):
            decode_envelope(_with_header(header.replace(b'"codec":"fp32"', bad), _plain_header(payload)[1]))


def test_header_is_compressed_and_plain_headers_still_decode():
    env = _env(
        tensors={
            f"base_model.model.layer.{i}.attention.self.query.lora_A.weight": np.ones((2, 3), np.float32)
            for i in range(12)
        }
    )
    payload = encode_envelope(env)
    assert struct.unpack_from("<I", payload, 4)[0] & HEADER_ZLIB
    header, body = _plain_header(payload)
    assert len(payload) < 8 + len(header) + len(body) - 500  # the names repeat: compression pays
    plain = decode_envelope(_with_header(header, body))
    assert plain.tensors.keys() == env.tensors.keys()
    assert all(np.array_equal(plain.tensors[k], v) for k, v in env.tensors.items())


@pytest.mark.parametrize("compressed", [False, True])
def test_unknown_codec_and_version_are_refused(compressed):
    header, body = _plain_header(encode_envelope(_env()))
    with pytest.raises(ProtocolError, match="unknown codec"):
        decode_envelope(_with_header(header.replace(b'"codec":"fp32"', b'"codec":"zzzz"'), body, compressed))
    with pytest.raises(ProtocolError, match="protocol version"):
        decode_envelope(_with_header(header.replace(b'"v":1', b'"v":9'), body, compressed))


def test_compressed_header_bombs_and_garbage_are_refused():
    header, body = _plain_header(encode_envelope(_env()))
    bomb = zlib.compress(b"[" * (MAX_HEADER_BYTES + 1), 9)
    with pytest.raises(ProtocolError, match="inflates beyond"):
        decode_envelope(ENVELOPE_MAGIC + struct.pack("<I", len(bomb) | HEADER_ZLIB) + bomb + body)
    junk = b"not zlib at all"
    with pytest.raises(ProtocolError, match="not valid zlib"):
        decode_envelope(ENVELOPE_MAGIC + struct.pack("<I", len(junk) | HEADER_ZLIB) + junk + body)
    cut = zlib.compress(header)[:-6]
    with pytest.raises(ProtocolError, match="truncated"):
        decode_envelope(ENVELOPE_MAGIC + struct.pack("<I", len(cut) | HEADER_ZLIB) + cut + body)


def test_chunks_reassemble_in_any_order_with_duplicates():
    payload = bytes(range(256)) * 40
    chunks = split_chunks(payload, 1000)
    assert len(chunks) == 11 and all(len(c) <= 1000 + CHUNK_HEADER.size for c in chunks)
    r = Reassembler(max_bytes=1 << 20)
    order = [5, 0, 0, 10, 3, 5, 1, 2, 4, 6, 7, 8]
    results = [r.add("dev", chunks[i]) for i in order]
    assert all(x is None for x in results)
    assert r.add("dev", chunks[9]) == payload
    assert r.add("dev", chunks[2]) is None  # a late duplicate after completion
    assert r.pending_count() == 0


def test_reassembler_refuses_oversize_before_buffering():
    chunks = split_chunks(b"x" * 5000, 1000)
    r = Reassembler(max_bytes=4096)
    with pytest.raises(PayloadTooLarge, match="exceeds the limit"):
        r.add("dev", chunks[0])
    assert r.pending_count() == 0
    assert r.add("dev", chunks[1]) is None  # refused once, later chunks are dropped quietly


def test_reassembler_detects_tampered_chunk():
    chunks = split_chunks(b"abcdefgh" * 100, 300)
    bad = chunks[1][:-1] + b"!"
    r = Reassembler(max_bytes=1 << 20)
    r.add("dev", chunks[0])
    r.add("dev", bad)
    with pytest.raises(ProtocolError, match="hash"):
        r.add("dev", chunks[2])


def test_reassembler_bounds_pending_messages_per_source():
    r = Reassembler(max_bytes=1 << 20, max_pending=3, per_source=2)
    for i in range(5):
        r.add("flood", split_chunks(bytes([i]) * 100, 10)[0])
    assert r.pending_count() == 2 and r.dropped_partials == 3  # the flooding source drops its own


def test_one_source_cannot_evict_another_sources_upload():
    clock = FakeClock()
    r = Reassembler(max_bytes=1 << 20, max_pending=2, per_source=2, clock=clock, evict_idle_s=60)
    honest = split_chunks(b"honest update" * 40, 100)
    r.add("honest", honest[0])
    r.add("flood", split_chunks(b"x" * 100, 10)[0])
    with pytest.raises(ReassemblyBusy):
        r.add("flood2", split_chunks(b"y" * 100, 10)[0])  # full: refused, nobody evicted
    for c in honest[1:-1]:
        r.add("honest", c)
    assert r.add("honest", honest[-1]) == b"honest update" * 40
    clock.now += 61  # an idle partial makes room once it has been idle long enough
    r.add("late", split_chunks(b"z" * 100, 10)[0])
    assert r.pending_count() == 2


def test_reassembler_bounds_buffered_bytes():
    r = Reassembler(max_bytes=1 << 20, max_buffered=3000, evict_idle_s=1e9)
    first = split_chunks(bytes(5000), 1000)
    r.add("a", first[0])
    r.add("a", first[1])
    with pytest.raises(ReassemblyBusy):
        r.add("b", split_chunks(bytes(2000), 1000)[0])
    r.drop_source("a")
    assert r.buffered == 0


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_stalled_messages_list_their_missing_chunks_once_per_pause():
    clock = FakeClock()
    r = Reassembler(max_bytes=1 << 20, clock=clock)
    chunks = split_chunks(bytes(range(256)) * 40, 1000)  # 11 chunks
    for i in (0, 2, 3, 7):
        r.add("dev", chunks[i])
    clock.now += 4.9
    assert r.stalled(5.0) == []  # still arriving
    clock.now += 0.2
    [stall] = r.stalled(5.0)
    assert (stall.source, stall.msg_id, stall.count) == ("dev", message_id(bytes(range(256)) * 40), 11)
    assert stall.missing == [1, 4, 5, 6, 8, 9, 10]
    clock.now += 3.0
    assert r.stalled(5.0) == []  # asked already: wait another pause before asking again
    r.add("dev", chunks[4])  # a resent chunk resets the pause
    clock.now += 4.0
    assert r.stalled(5.0) == []
    clock.now += 1.0
    assert r.stalled(5.0, max_missing=2)[0].missing == [1, 5]  # capped, lowest first


def test_a_slow_link_gets_a_longer_pause_before_it_is_asked():
    clock = FakeClock()
    r = Reassembler(max_bytes=1 << 20, clock=clock)
    chunks = split_chunks(bytes(range(256)) * 40, 1000)
    for i in range(3):  # a chunk every 4 s
        r.add("dev", chunks[i])
        clock.now += 4.0
    clock.now += 7.0  # 11 s since the last chunk: less than 3 x 4 s
    assert r.stalled(5.0) == []
    clock.now += 1.0
    assert r.stalled(5.0)[0].missing == list(range(3, 11))


def test_a_message_resent_with_another_chunk_size_starts_over():
    payload = bytes(range(256)) * 40
    r = Reassembler(max_bytes=1 << 20)
    for c in split_chunks(payload, 1000)[:6]:
        assert r.add("dev", c) is None
    resent = split_chunks(payload, 3000)  # the device reconnected under a smaller packet limit
    assert [r.add("dev", c) for c in resent] == [None, None, None, payload]
    assert r.pending_count() == 0


def test_chunks_that_disagree_on_the_size_or_claim_too_many_parts_are_refused():
    payload = b"abcdefgh" * 100
    r = Reassembler(max_bytes=1 << 20)
    r.add("dev", split_chunks(payload, 300)[0])
    forged = CHUNK_HEADER.pack(CHUNK_MAGIC, message_id(payload), 1, 3, len(payload) + 1) + b"x" * 300
    with pytest.raises(ProtocolError, match="message size"):
        r.add("dev", forged)
    too_many = CHUNK_HEADER.pack(CHUNK_MAGIC, message_id(b"ab"), 0, 1 << 30, 2) + b"a"
    with pytest.raises(ProtocolError, match="cannot carry"):
        Reassembler(1 << 20).add("dev", too_many)


def test_chunk_garbage_is_refused():
    with pytest.raises(ProtocolError):
        Reassembler(1 << 20).add("dev", b"short")
    with pytest.raises(ProtocolError, match="magic"):
        Reassembler(1 << 20).add("dev", b"ABCD" + bytes(CHUNK_HEADER.size))


def test_topics_and_ids():
    t = Topics("job1")
    assert t.update("d7") == "fedlora/job1/updates/d7"
    assert t.parse(t.update("d7")) == TopicRef(TopicKind.UPDATES, device="d7")
    assert t.global_chunk(8, 2) == "fedlora/job1/global/8/2"
    assert t.parse(t.global_chunk(8, 2)) == TopicRef(TopicKind.GLOBAL, rank=8, index=2)
    assert t.parse(t.round) == TopicRef(TopicKind.ROUND)
    # parsed, not matched by prefix: extra levels, other jobs and bad ids are refused
    for topic in (
        "fedlora/job1/updates/d7/x",
        "fedlora/job10/updates/d7",
        "fedlora/job1/updates/",
        "fedlora/job1/global/0/1",
        "fedlora/job1/global/8/x",
        "fedlora/job1/round/x",
        "fedlora/job1/other/d",
        "fedlora/job1/status/" + "d" * 129,
    ):
        with pytest.raises(ProtocolError):
            t.parse(topic)
    for bad in ("", "a/b", "a+b", "x#"):
        with pytest.raises(ProtocolError):
            Topics(bad)
        with pytest.raises(ProtocolError):
            check_device_id(bad)


def test_message_id_is_payload_hash_prefix():
    payload = b"hello" * 100
    chunk = split_chunks(payload, 64)[0]
    assert chunk[4:20] == hashlib.sha256(payload).digest()[:16]


def test_frozen_changes_sum_dense_and_factored_changes_per_weight():
    a, b = np.arange(6, dtype=np.float32).reshape(2, 3), np.ones((4, 2), np.float32)
    tensors = {
        "x.lora_A.weight": np.zeros((2, 3), np.float32),
        BASE_DELTA_PREFIX + "w": np.ones((4, 3), np.float32),
        BASE_A_PREFIX + "w": a,
        BASE_B_PREFIX + "w": b,
        BASE_A_PREFIX + "v": a[:1],
        BASE_B_PREFIX + "v": b[:, :1],
    }
    changes = frozen_changes(tensors)
    assert set(changes) == {"w", "v"} and set(adapter_part(tensors)) == {"x.lora_A.weight"}
    np.testing.assert_allclose(changes["w"], 1 + b @ a)
    np.testing.assert_allclose(changes["v"], b[:, :1] @ a[:1])


@pytest.mark.parametrize(
    "tensors, match",
    [
        ({BASE_A_PREFIX + "w": np.ones((2, 3), np.float32)}, "pairs"),
        ({BASE_B_PREFIX + "w": np.ones((4, 2), np.float32)}, "pairs"),
        (
            {BASE_A_PREFIX + "w": np.ones((2, 3), np.float32), BASE_B_PREFIX + "w": np.ones((4, 3), np.float32)},
            "product",
        ),
        ({BASE_A_PREFIX + "w": np.ones(3, np.float32), BASE_B_PREFIX + "w": np.ones((4, 1), np.float32)}, "product"),
    ],
)
def test_frozen_changes_refuse_unpaired_or_misshaped_factors(tensors, match):
    with pytest.raises(ProtocolError, match=match):
        frozen_changes(tensors)


# -- the decoder's fast paths: each must refuse exactly what the full path refuses ------------
def test_a_remembered_tensor_list_does_not_admit_a_list_that_is_equal_but_typed_otherwise():
    """The header parser remembers tensor lists it accepted; ``true == 1`` and ``4.0 == 4`` in
    Python, so a list that compares equal to a remembered one must still be parsed on its own."""
    payload = encode_envelope(_env())
    header, body = _plain_header(payload)
    assert decode_envelope(payload).tensors  # the list is now remembered
    for typed_otherwise in (b'"nbytes":true', b'"nbytes":24.0'):
        obj = json.loads(header)
        obj["tensors"][0]["nbytes"] = 1  # placeholder, replaced below as raw JSON
        raw = json.dumps(obj, separators=(",", ":")).encode().replace(b'"nbytes":1', typed_otherwise, 1)
        assert json.loads(raw)["tensors"][0]["nbytes"] == (1 if typed_otherwise.endswith(b"true") else 24)
        with pytest.raises(ProtocolError, match="nbytes"):
            decode_envelope(_with_header(raw, body))


def test_a_remembered_layout_is_checked_again_against_other_limits():
    from core.protocol import EnvelopeLimits

    env = _env()
    payload = encode_envelope(env)
    wide = EnvelopeLimits.for_update({"a": (2, 3), "b": (4,)})
    narrow = EnvelopeLimits.for_update({"a": (2, 2), "b": (4,)})
    assert decode_envelope(payload, wide).tensors["a"].shape == (2, 3)
    with pytest.raises(ProtocolError, match="beyond"):
        decode_envelope(payload, narrow)
    with pytest.raises(ProtocolError, match="not part of this job"):
        decode_envelope(payload, EnvelopeLimits.for_update({"b": (4,)}))


def test_fp32_tensors_are_read_only_views_of_the_payload_with_the_right_values():
    rng = np.random.default_rng(3)
    tensors = {f"t{i}": rng.normal(size=(3, 5)).astype(np.float32) for i in range(4)}
    back = decode_envelope(encode_envelope(_env(tensors=tensors)))
    for name, value in tensors.items():
        np.testing.assert_array_equal(back.tensors[name], value)
        assert back.tensors[name].dtype == np.float32 and not back.tensors[name].flags.writeable
    # mixed codecs take the per-tensor path, and agree with it
    mixed = decode_envelope(encode_envelope(_env(tensors=tensors, tensor_codecs={"t1": "fp16"})))
    np.testing.assert_array_equal(mixed.tensors["t0"], tensors["t0"])
    np.testing.assert_allclose(mixed.tensors["t1"], tensors["t1"], rtol=2**-10)


def test_a_reassembled_envelope_is_hashed_once_and_a_tampered_one_still_fails():
    payload = encode_envelope(_env())
    header, body = _plain_header(payload)
    forged = json.loads(header)
    forged["body_sha256"] = "0" * 64  # the sender's own wrong body hash, inside what it hashed whole
    lying = _with_header(json.dumps(forged, separators=(",", ":")).encode(), body)
    with pytest.raises(ProtocolError, match="sha256"):
        decode_envelope(lying)  # not through a reassembler: the body hash is checked
    assert decode_envelope(lying, reassembled=True).sender == "d1"  # the message id covered it
    r = Reassembler(max_bytes=1 << 20)
    chunks = split_chunks(payload, 64)
    bad = bytearray(chunks[-1])
    bad[-1] ^= 1
    for c in chunks[:-1]:
        assert r.add("d1", c) is None
    with pytest.raises(ProtocolError, match="hash check"):
        r.add("d1", bytes(bad))


@pytest.mark.parametrize("field", ["tensors", "metrics"])
def test_a_deeply_nested_header_is_refused_as_malformed_without_the_depth_walk(field):
    """The envelope header skips the generic depth walk (its typed fields bound the depth): a
    list nested 900 deep, within the JSON decoder's recursion limit, is still a ProtocolError."""
    payload = encode_envelope(_env())
    header, body = _plain_header(payload)
    obj = json.loads(header)
    raw = json.dumps(obj, separators=(",", ":")).encode()
    deep = b"[" * 900 + b"]" * 900
    hostile = (
        raw.replace(b'"metrics":{"train_loss":0.5}', b'"metrics":{"x":' + deep + b"}")
        if field == "metrics"
        else (raw.replace(b'"tensors":[', b'"tensors":[' + deep + b",", 1))
    )
    assert hostile != raw
    with pytest.raises(ProtocolError):
        decode_envelope(_with_header(hostile, body))
