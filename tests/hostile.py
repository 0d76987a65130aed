"""Hostile messages in every format of docs/protocol.md, for tests that publish them with a real
MQTT client: JSON messages that are deep, huge, non-finite, mistyped or not JSON; chunks with
forged counts and sizes; envelopes whose headers lie; topics that are not topics of the job."""

from __future__ import annotations

import hashlib
import json
import struct
import zlib

from core.protocol import CHUNK_HEADER, CHUNK_MAGIC, ENVELOPE_MAGIC, HEADER_ZLIB, split_chunks


def hostile_json() -> list[bytes]:
    """Payloads for the JSON topics (status, round, ack): each must be refused, none may crash."""
    deep_list = b"[" * 5000 + b"]" * 5000
    deep_obj = b'{"a":' * 3000 + b"1" + b"}" * 3000
    return [
        b'{"state":"online","rank":1e999}',
        b'{"state":"online","rank":1e999,"num_examples":1e999}',
        b'{"state":"online","num_examples":NaN}',
        b'{"state":"online","num_examples":-Infinity}',
        b'{"state":"online","rank":' + b"9" * 5000 + b"}",
        b'{"state":"online","rank":"4"}',
        b'{"state":"online","rank":[4]}',
        b'{"state":"online","rank":true}',
        b'{"state":"online","model_id":"' + b"x" * 100_000 + b'"}',
        b'{"state":"dancing"}',
        b'{"state":"online","extra":{"a":{"b":{"c":{"d":{"e":{"f":{"g":1}}}}}}}}',
        deep_list,
        deep_obj,
        b'{"state":"online"' + b',"k":1' * 20_000 + b"}",
        b"null",
        b"[]",
        b'"online"',
        b"4",
        b"",
        b"\xff\xfe\x00garbage",
        b"{" * 10,
        b'{"state":"online"',
        json.dumps({"round": 1, "result": "accepted", "detail": "x" * 100_000}).encode(),
        b'{"round":1e999,"result":"accepted"}',
        b'{"round":1,"result":"incomplete","msg_id":"00","count":0,"missing":[1]}',
        b'{"round":1,"result":"incomplete","msg_id":"' + b"0" * 32 + b'","count":3,"missing":[7,-1,"x"]}',
        b'{"round":1,"result":"incomplete","msg_id":"'
        + b"0" * 32
        + b'","count":4294967295,"missing":'
        + json.dumps(list(range(200_000))).encode()
        + b"}",
        b'{"v":1,"job":"hostile","state":"open","round":1,"global_version":0,"rank":4,"deadline":1e999,'
        b'"selected":["dev1"],"strategy":{"name":"fedavg"},"train":{"local_steps":1,"batch_size":4,"lr":0.001}}',
        b'{"v":1,"job":"hostile","state":"open","round":1,"global_version":0,"rank":4,"deadline":1.0,'
        b'"selected":["dev1"],"strategy":{"name":"fedavg"},"train":{"local_steps":1e12,"batch_size":4,"lr":0.001}}',
        b'{"v":1,"job":"hostile","state":"open","round":1,"global_version":0,"rank":4,"deadline":1.0,'
        b'"selected":' + json.dumps([f"d{i}" for i in range(150_000)]).encode() + b',"strategy":{"name":"fedavg"},'
        b'"train":{"local_steps":1,"batch_size":4,"lr":0.001}}',
        b'{"v":2,"job":"hostile","state":"waiting","round":0,"global_version":0,"rank":4}',
        b'{"v":1,"job":"hostile","state":"waiting","round":0,"global_version":0,"rank":4,"codec":"int99"}',
    ]


def _chunk(mid: bytes, index: int, count: int, total: int, data: bytes) -> bytes:
    return CHUNK_HEADER.pack(CHUNK_MAGIC, mid, index, count, total) + data


def _envelope(header: dict | bytes, body: bytes = b"", compress: bool = False) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    if compress:
        packed = zlib.compress(raw, 9)
        return ENVELOPE_MAGIC + struct.pack("<I", len(packed) | HEADER_ZLIB) + packed + body
    return ENVELOPE_MAGIC + struct.pack("<I", len(raw)) + raw + body


def hostile_envelopes(job: str, sender: str, tensor: str) -> list[bytes]:
    """Whole envelopes (before chunking) whose headers lie about what the body holds."""
    body = bytes(64)
    sha = hashlib.sha256(body).hexdigest()

    def header(**change) -> dict:
        h = {
            "v": 1,
            "kind": "update",
            "job": job,
            "round": 1,
            "sender": sender,
            "rank": 4,
            "codec": "fp32",
            "tensors": [{"name": tensor, "shape": [4, 4], "dtype": "float32", "nbytes": 64, "meta": {}}],
            "num_examples": 10,
            "metrics": {},
            "base_version": 0,
            "body_sha256": sha,
        }
        h.update(change)
        return h

    spec = header()["tensors"][0]
    return [
        _envelope(header(tensors=[{**spec, "nbytes": -1_000_000}])),  # rewinds the body, once
        _envelope(header(tensors=[{**spec, "shape": [1 << 20, 1 << 20]}]), body),
        _envelope(header(tensors=[{**spec, "shape": [65536, 4096], "nbytes": 64}]), body),
        _envelope(header(tensors=[{**spec, "name": "not.a.tensor.of.this.job"}]), body),
        _envelope(header(tensors=[spec] * 2), body + body),
        _envelope(header(num_examples=10**15), body),
        _envelope(header(rank=10**9), body),
        _envelope(header(metrics={"x": 1e308, **{f"m{i}": i for i in range(100)}}), body),
        _envelope(header(codec="int8-b0"), body),
        _envelope(header(codec="topk9+int8"), body),
        _envelope(header(body_sha256="00" * 32), body),
        _envelope(json.dumps(header()).replace('"round": 1', '"round": 1e999').encode(), body),
        _envelope(b'{"v":1,' * 1 + b'"x":' + b"[" * 4000 + b"]" * 4000 + b"}", body),
        _envelope(zlib.decompress(zlib.compress(b" " * (2 << 20))), body),  # a 2 MiB header
        ENVELOPE_MAGIC + struct.pack("<I", HEADER_ZLIB | 1000) + zlib.compress(b"{" + b" " * (50 << 20))[:1000],
        ENVELOPE_MAGIC + struct.pack("<I", 0xFFFFFFFF),
        b"FLE1",
    ]


def hostile_chunks(job: str, sender: str, tensor: str) -> list[bytes]:
    """Chunk messages for an update topic: forged headers, and chunked hostile envelopes."""
    mid = bytes(16)
    out = [
        b"",
        b"FLC1",
        b"\x00" * 8,
        b"not a chunk at all" * 10,
        _chunk(mid, 0, 0, 10, b"x"),  # no chunks
        _chunk(mid, 5, 2, 10, b"x"),  # index beyond count
        _chunk(mid, 0, 1 << 31, 10, b"x"),  # more chunks than bytes
        _chunk(mid, 0, 1, (1 << 64) - 1, b"x"),  # an exabyte announced
        _chunk(mid, 0, 2, 4, b"xxxxxxxxxxxx"),  # more bytes than announced
        _chunk(bytes(range(16)), 0, 1, 3, b"abc"),  # fails its hash
    ]
    for envelope in hostile_envelopes(job, sender, tensor):
        out.extend(split_chunks(envelope, 4096))
    return out


def hostile_topics(base: str) -> list[str]:
    """Topic names under the job's prefix that are not topics of protocol v1."""
    return [
        f"{base}/updates/a/b",
        f"{base}/status/",
        f"{base}/status/x/y",
        f"{base}/global/x/1",
        f"{base}/global/4/notanumber",
        f"{base}/global/0/0",
        f"{base}/gdelta/4/-1",
        f"{base}/ack/",
        f"{base}/nonsense",
        f"{base}/round/extra",
    ]
