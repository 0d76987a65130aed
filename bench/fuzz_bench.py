"""Fuzz every wire parser and decoder of protocol v1 with generated and mutated hostile input.

Targets (each input is processed in this one process, one call per input):

    status, ack, announcement   messages.parse_status / parse_ack / parse_announcement (bytes)
    header                      messages.parse_header(parse_json(bytes)) (an envelope header)
    envelope                    protocol.decode_envelope(bytes), then frozen_changes (the device's path)
    envelope_update             decode_envelope(bytes, EnvelopeLimits.for_update(MiniLM-like adapter))
    envelope_global             decode_envelope(bytes, EnvelopeLimits.for_global(...)), then frozen_changes
    chunk                       protocol.parse_chunk(bytes)
    reassembler                 Reassembler.add(source, chunk): streams of mutated chunks from several
                                sources into long-lived reassemblers, with its accounting checked
    codec                       get_codec(spec).decode(data, {}, shape) for every spec the grammar builds
                                from {-, topk, randk} x {fp32 .. int2-sr, sign} x {-, zlib, lzma, zstd}
    topic                       messages.parse_topic(topic, base)
    secagg_upload               messages.parse_secagg_upload(bytes): a device's keys, shares or reveal
    secagg_key_list, secagg_forward, secagg_unmask
                                messages.parse_secagg_key_list / _forward / _unmask (bytes): what
                                the aggregator sends in a secure round
    shard_plan, shard_progress  messages.parse_shard_plan / parse_shard_progress (bytes): sharded
                                aggregation's coordinator -> worker plan and worker -> coordinator report
    shard_partial               protocol.decode_partial(bytes): a worker's sealed float64 partial sums

Inputs come from three families: (a) structure-aware generation from valid messages (JSON values
replaced by huge, negative, fractional or non-finite literals, nesting thousands of levels deep,
long strings, wrong types, unknown, missing and repeated fields, lists of 100,000 items; envelope
headers mutated and then "resealed", their byte counts and body hash recomputed, so the decoder
gets past the hash into the codecs; tensors re-encoded in other codecs or given other shapes),
(b) byte-level mutation of valid encodings (bit flips, truncation, splicing, repeated blocks,
length-word and chunk-header corruption, the header-length's zlib bit flipped, zlib bombs such as
100 MB of zeros), and (c) random bytes. A ``ProtocolError`` (or a subclass) is the expected
refusal; anything else is a finding, and so is an input that takes over ``--slow-s`` (a hang;
``signal.alarm`` cuts one off after ``--alarm-s``; on a shared machine an input
over the mark is timed a second time and counts only if that run is slow too), a decode that holds more than
``--memory-bound-mb`` (decoded tensors, or the ``B @ A`` products ``frozen_changes`` would
allocate), or a reassembler whose byte and partial-message accounting drifts from its limits.
One input in ``--trace-every`` runs under tracemalloc for its allocation peak; peak RSS (VmHWM,
reset per target where the kernel allows) is recorded per target. The process runs under an
address-space limit (``--max-memory-gb``) so that a runaway allocation fails as a MemoryError
(a finding) instead of taking the machine down.

    .venv/bin/python bench/fuzz_bench.py --inputs 1000000 --write-docs [--seed 0] [--targets a,b] [--out r.json]

The generators are importable (tests/test_fuzz.py runs a bounded sample of them).
"""

from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import json
import lzma
import math
import os
import platform
import random
import resource
import signal
import struct
import sys
import time
import traceback
import tracemalloc
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.codecs import MAX_ELEMENTS, get_codec, parse_codec
from core.errors import ProtocolError
from core.lora import A_SUFFIX, rank_shapes
from core.messages import (
    MAX_HEADER_BYTES,
    Ack,
    AckResult,
    Announcement,
    PeerKeys,
    Presence,
    PrivacyInfo,
    RepairRequest,
    RoundMode,
    RoundState,
    SecaggForward,
    SecaggInfo,
    SecaggKeyList,
    SecaggKeys,
    SecaggReveal,
    SecaggShares,
    SecaggUnmask,
    Status,
    StrategyInfo,
    TrainInfo,
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
    BASE_A_PREFIX,
    BASE_B_PREFIX,
    BASE_DELTA_PREFIX,
    CHUNK_HEADER,
    CHUNK_MAGIC,
    CHUNK_OVERHEAD,
    ENVELOPE_MAGIC,
    HEADER_ZLIB,
    PARTIAL_MAGIC,
    RING_CODEC,
    Envelope,
    EnvelopeLimits,
    Reassembler,
    Topics,
    decode_envelope,
    decode_partial,
    encode_envelope,
    frozen_changes,
    message_id,
    parse_chunk,
    split_chunks,
)
from devkit.docsection import DocSection, command_line
from devkit.memory import peak_rss_bytes, reset_peak_rss

DOC_SECTION = DocSection("fuzz_bench", "bench/fuzz_bench.py", "## Fuzzing: hostile input to every parser and decoder")
BASE = "fedlora/job1"
MIN_PER_TARGET = 20_000


class Hang(BaseException):
    """Raised by the alarm guard: a BaseException, so no parser's ``except Exception`` hides it."""


class MemoryBound(Exception):
    """An input made a parser hold (or set out to allocate) more than the memory bound."""

    def __init__(self, where: str, message: str):
        super().__init__(message)
        self.where = where


class InvariantViolation(Exception):
    """A parser's own bookkeeping broke one of its documented limits."""

    def __init__(self, where: str, message: str):
        super().__init__(message)
        self.where = where


# -- JSON with raw literals ----------------------------------------------------------------
class Raw(str):
    """JSON text inserted verbatim (``1e999``, ``NaN``, deep nesting, a 100,000-item list)."""


class DupKey(str):
    """A key that repeats another key of the same object (equal text, distinct dict key)."""

    __hash__ = object.__hash__

    def __eq__(self, other):
        return self is other


def dump(value: Any) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, dict):
        return "{" + ",".join(dump(k) + ":" + dump(v) for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dump(v) for v in value) + "]"
    return json.dumps(value)


def to_bytes(value: Any) -> bytes:
    return dump(value).encode("utf-8", "surrogatepass")


INTERESTING_INTS = (
    0,
    1,
    2,
    3,
    7,
    8,
    9,
    15,
    16,
    31,
    32,
    63,
    64,
    65,
    127,
    128,
    255,
    256,
    383,
    384,
    385,
    511,
    512,
    513,
    1023,
    1024,
    1025,
    4095,
    4096,
    4097,
    65535,
    65536,
    65537,
    999_999,
    1_000_000,
    1_000_001,
    2**26 - 1,
    2**26,
    2**26 + 1,
    2**31 - 1,
    2**31,
    2**31 + 1,
    2**32 - 1,
    2**32,
    2**34,
    2**34 + 1,
    2**53 - 1,
    2**53,
    2**53 + 1,
    10**12,
    10**12 + 1,
    2**63 - 1,
    2**63,
    2**64 - 1,
    2**64,
    10**19,
    10**20 - 1,
    10**20,
)
RAW_NUMBERS = (
    "1e999",
    "-1e999",
    "NaN",
    "-NaN",
    "Infinity",
    "-Infinity",
    "1e308",
    "1.7976931348623157e308",
    "-0",
    "-0.0",
    "0.0",
    "5e-324",
    "1e-999",
    "1E400",
    "0e0",
    "1.0",
    "1.5",
    "-1.5",
    "0.5",
    "1e-12",
    "9.99e-13",
    "2.0000001",
    "123456789012345678901234567890",
    "-123456789012345678901",
    "99999999999999999999",
    "00",
    "01",
    "1.",
    ".5",
    "+1",
    "0x10",
    "1e",
    "--1",
    "1_000",
    "９",
    "9" * 5000,
    "1" + "0" * 400 + ".0",
)
CODEC_SPECS_BAD = (
    "",
    "+",
    "fp32+",
    "+fp32",
    "fp64",
    "int16",
    "int3",
    "int8-b7",
    "int8-b0064",
    "int8-b65537",
    "int8-b64-b64",
    "int8-sr-sr",
    "sign-sr",
    "topk0",
    "topk1",
    "topk1.0",
    "topk0.5+topk0.5",
    "zstd+int8",
    "int8+zstd+zlib",
    "fp32+fp16",
    "topk0.\u0665",
    "int8-b\u0666\u0664",
    "topk1e-400",
    "topk0.99999999999999999999",
    "randk-0.5",
    "topk" + "0" * 80,
    "topk0.1+int4+lzma+",
    "TOPK0.1",
    " fp32",
    "fp32 ",
    "fp32\0",
    "randk1e-9+sign",
)
STRINGS = (
    "",
    " ",
    "a",
    "online",
    "offline",
    "accepted",
    "rejected",
    "incomplete",
    "open",
    "waiting",
    "finished",
    "update",
    "global",
    "float32",
    "float64",
    "aggregator",
    "dev0",
    "dev/0",
    "dev+",
    "dev#",
    "dev 0",
    "dev\0",
    "\u00b2",
    "\u0663",
    "\uff11",
    "\u2460",
    "\ud800",
    "\udfff",
    "\ufeff",
    "\u200b",
    "\U0001f600",
    "é" * 100,
    "NaN",
    "Infinity",
    "1e999",
    "null",
    "true",
    "0",
    "-1",
    "0" * 32,
    "0" * 64,
    "a" * 31,
    "A" * 32,
    "g" * 64,
    "0123456789abcdef" * 2,
    "0123456789abcdef" * 4,
    "0123456789ABCDEF" * 4,
    "x" * 65,
    "x" * 81,
    "x" * 129,
    "x" * 257,
    "x" * 513,
    "x" * 4097,
    "x" * 100_000,
    "base_delta/x",
    "base_a/x",
    "base_b/x",
    "classifier.weight",
) + CODEC_SPECS_BAD
TOKENS = (
    b'"',
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"\\",
    b"\\u0000",
    b"\\ud800",
    b"\xff",
    b"\xc3",
    b"\xed\xa0\x80",
    b"\x00",
    b"1e999",
    b"NaN",
    b"-Infinity",
    b"-",
    b"null",
    b"true",
    b" " * 64,
    b"[" * 64,
    b'{"a":' * 16,
    b"9" * 30,
    b'"x":1,',
    b"FLE1",
    b"FLC1",
    b"\x80\x00\x00\x00",
)
DEPTHS = (6, 7, 8, 64, 1000, 5000, 100_000)
TRICKY_CHARS = (
    "\u00b2\u00b3\u00b9\u2070\u2074\u2080\u2082\u2460\u2473\u24ea\u0660\u0663\u06f3\u0966\u0e53\uff10\uff11"
    "\U0001d7d8\u00bd\u2155\u216b\u3007\u0000\u200b\u00a0\u3000\n\t /#+\u00e9\ufeff\ud800\U0001f600"
)

_BIG_CACHE: dict[str, Raw] = {}


def big_list(rng: random.Random) -> Raw:
    """A JSON list of 100,000 items (cached: building one costs more than parsing it)."""
    kind = rng.choice(("ints", "ids", "nulls", "objects", "floats"))
    if kind not in _BIG_CACHE:
        item = {
            "ints": lambda i: str(i),
            "ids": lambda i: f'"dev{i}"',
            "nulls": lambda i: "null",
            "objects": lambda i: "{}",
            "floats": lambda i: f"{i}.5e3",
        }[kind]
        _BIG_CACHE[kind] = Raw("[" + ",".join(item(i) for i in range(100_000)) + "]")
    return _BIG_CACHE[kind]


def deep(rng: random.Random) -> Raw:
    d = rng.choice(DEPTHS)
    if rng.random() < 0.5:
        return Raw("[" * d + "1" + "]" * d)
    return Raw('{"a":' * d + "1" + "}" * d)


def random_json(rng: random.Random, depth: int = 0) -> Any:
    r = rng.random()
    if depth > 3 or r < 0.5:
        return rng.choice((None, True, False, 0, -1, 1.5, "", "x", rng.randint(-(10**9), 10**9), rng.random()))
    if r < 0.75:
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(("a", "name", "v", "x" * 3)): random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def interesting_value(rng: random.Random) -> Any:
    r = rng.random()
    if r < 0.25:
        v = rng.choice(INTERESTING_INTS)
        return -v if rng.random() < 0.15 else v
    if r < 0.42:
        return Raw(rng.choice(RAW_NUMBERS))
    if r < 0.60:
        return rng.choice(STRINGS)
    if r < 0.70:
        return rng.choice((None, True, False, [], {}, 0.5, -0.0, 1e300, -1e-300, 1e-12, 2.5, [1], ["a"], {"a": 1}))
    if r < 0.78:
        return deep(rng)
    if r < 0.81:
        return big_list(rng)
    if r < 0.86:
        return rng.randint(-(2**70), 2**70)
    if r < 0.90:
        return rng.uniform(-1e6, 1e6)
    return random_json(rng)


def _slots(root: Any) -> list[tuple[Any, Any]]:
    """Every (container, key) in a JSON tree (not descending into raw text)."""
    out, stack = [], [root]
    while stack:
        node = stack.pop()
        if isinstance(node, Raw):
            continue
        if isinstance(node, dict):
            for k, v in node.items():
                out.append((node, k))
                stack.append(v)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                out.append((node, i))
                stack.append(v)
    return out


def _near_key(rng: random.Random, key: str) -> str:
    return rng.choice(
        (
            key.upper(),
            key + " ",
            " " + key,
            key + "\0",
            key[:-1] or "x",
            key + "s",
            "__proto__",
            "extra",
            key + "_",
            key.replace("_", "-"),
            "\ufeff" + key,
        )
    )


def mutate_json(rng: random.Random, root: Any, ops: int | None = None) -> Any:
    """1-4 structure-aware mutations of a parsed JSON message (in place where it can)."""
    for _ in range(ops or rng.choice((1, 1, 1, 2, 2, 3, 4))):
        r = rng.random()
        if r < 0.04:
            return rng.choice((random_json(rng), interesting_value(rng), [root], Raw("[" * 100 + "]" * 100)))
        slots = _slots(root)
        containers = [root] + [c[k] for c, k in slots if isinstance(c[k], (dict, list)) and not isinstance(c[k], Raw)]
        if not slots or r < 0.14:  # add a field or item
            node = rng.choice(containers)
            if isinstance(node, dict):
                keys = list(node)
                key = (
                    _near_key(rng, rng.choice(keys))
                    if keys and rng.random() < 0.6
                    else rng.choice(("x", "meta", "v2", "a" * 300))
                )
                node[key] = interesting_value(rng)
            elif isinstance(node, list):
                item = rng.choice(node) if node and rng.random() < 0.7 else interesting_value(rng)
                node.insert(
                    rng.randint(0, len(node)), json.loads(json.dumps(item)) if not isinstance(item, Raw) else item
                )
            continue
        node, key = rng.choice(slots)
        if r < 0.55:  # replace a value
            node[key] = interesting_value(rng)
        elif r < 0.70:  # delete
            del node[key]
        elif r < 0.76 and isinstance(node, dict):  # repeat a key (the later one wins in Python's json)
            node[DupKey(key)] = interesting_value(rng) if rng.random() < 0.7 else node[key]
        elif r < 0.82:  # many copies of an item or value, at most ~2 MB of them
            text = dump(node[key])
            reps = min(rng.choice((2, 10, 1000, 100_000)), max(1, (2 << 20) // (len(text) + 1)))
            node[key] = Raw("[" + ",".join([text] * reps) + "]")
        elif r < 0.88:  # swap with another slot's value (copies: one may hold the other)
            other, okey = rng.choice(slots)
            try:
                mine, theirs = copy.deepcopy(node[key]), copy.deepcopy(other[okey])
                node[key] = theirs
                other[okey] = mine
            except (KeyError, IndexError):
                pass
        elif r < 0.94:  # a number nudged across its bound
            value = node[key]
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                node[key] = rng.choice(
                    (
                        value + 1,
                        value - 1,
                        -value,
                        value * 2,
                        value * 1e6,
                        float(value),
                        int(value) if math.isfinite(value) else 0,
                    )
                )
            else:
                node[key] = interesting_value(rng)
        else:  # wrap in a container
            node[key] = rng.choice(([node[key]], {"value": node[key]}))
    return root


def serialize(root: Any) -> bytes:
    return to_bytes(root)


# -- byte-level mutation -------------------------------------------------------------------
def havoc(
    rng: random.Random, data: bytes, pool: list[bytes] = (), max_len: int = 4 << 20, ops: int | None = None
) -> bytes:
    """1-8 byte-level mutations: bit flips, random bytes, insertions, deletions, truncation,
    repeated blocks, splices with another input, interesting integers, tokens."""
    b = bytearray(data)
    for _ in range(ops or rng.choice((1, 1, 1, 2, 2, 3, 4, 8))):
        n = len(b)
        op = rng.randrange(12)
        if op == 0 and n:
            for _ in range(rng.choice((1, 1, 2, 4))):
                i = rng.randrange(n)
                b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:
            b[rng.randrange(n)] = rng.randrange(256)
        elif op == 2:
            i = rng.randint(0, n)
            b[i:i] = rng.randbytes(rng.choice((1, 2, 4, 8, rng.randint(1, 64))))
        elif op == 3 and n:
            i = rng.randrange(n)
            del b[i : i + rng.randint(1, max(1, min(rng.choice((1, 4, 64, 4096)), n - i)))]
        elif op == 4 and n:
            del b[rng.randrange(n) :]
        elif op == 5 and n:
            i = rng.randrange(n)
            j = min(n, i + rng.choice((1, 2, 4, 16, 256)))
            block = bytes(b[i:j]) * rng.choice((2, 3, 16, 1000, 100_000))
            b[j:j] = block[: max(0, max_len - n)]
        elif op == 6 and pool:
            other = rng.choice(pool)
            i, j = rng.randint(0, n), rng.randint(0, len(other))
            b = bytearray(bytes(b[:i]) + other[j:]) if rng.random() < 0.5 else bytearray(other[:j] + bytes(b[i:]))
        elif op == 7 and n:
            width = rng.choice((1, 2, 4, 8))
            i = rng.randrange(max(1, n - width + 1))
            value = (rng.choice(INTERESTING_INTS) + rng.choice((0, 0, -1, 1))) % (1 << (8 * width))
            b[i : i + width] = value.to_bytes(width, "little")
        elif op == 8:
            i = rng.randint(0, n)
            b[i:i] = rng.choice(TOKENS)
        elif op == 9 and n:
            i = rng.randrange(n)
            b[i : i + rng.randint(1, 32)] = bytes([rng.choice((0, 0xFF, 0x7F, 0x80))]) * rng.randint(1, 32)
        elif op == 10 and n > 2:
            i, j = sorted(rng.sample(range(n), 2))
            k = rng.randint(1, min(64, j - i))
            b[i : i + k], b[j : j + k] = b[j : j + k], b[i : i + k]
        elif op == 11 and n:
            i = rng.randrange(n)
            b[i] = (b[i] + rng.choice((-1, 1, -16, 16, 128))) % 256
    if len(b) > max_len:
        del b[max_len:]
    return bytes(b)


def random_bytes(rng: random.Random, prefix: bytes = b"") -> bytes:
    n = rng.choice((0, 1, 3, 7, 8, 16, 35, 36, 37, 64, 200, rng.randint(0, 600), rng.randint(0, 5000)))
    r = rng.random()
    if r < 0.6:
        body = rng.randbytes(n)
    elif r < 0.8:  # JSON-ish character soup
        body = bytes(rng.choice(b'{}[]",:0123456789.eE-+ntrufalsNIy\\ ') for _ in range(min(n, 600)))
    else:
        body = bytes([rng.randrange(256)]) * n
    return (prefix if rng.random() < 0.5 else b"") + body


def mutate_message(rng: random.Random, seeds: list[bytes]) -> tuple[str, bytes]:
    """A JSON message input: structure-aware (a), byte-level (b) or random (c)."""
    r = rng.random()
    if r < 0.07:
        return "valid", rng.choice(seeds)
    if r < 0.55:
        root = json.loads(rng.choice(seeds))
        out = serialize(mutate_json(rng, root))
        if rng.random() < 0.1:
            out = havoc(rng, out, seeds, ops=1)
        return "json", out
    if r < 0.90:
        return "bytes", havoc(rng, rng.choice(seeds), seeds)
    return "random", random_bytes(rng, b"{")


# -- the adapter, its limits and seed messages ---------------------------------------------
def minilm_shapes(rank: int = 8) -> dict[str, tuple[int, ...]]:
    """A MiniLM-L6-like adapter as peft names it: A (rank, 384), B (384, rank) on query and value
    of 6 layers (12 modules), and the classifier head (5 classes)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(6):
        for proj in ("query", "value"):
            prefix = f"base_model.model.bert.encoder.layer.{layer}.attention.self.{proj}."
            shapes[prefix + "lora_A.weight"] = (rank, 384)
            shapes[prefix + "lora_B.weight"] = (384, rank)
    shapes["classifier.weight"] = (5, 384)
    shapes["classifier.bias"] = (5,)
    return shapes


SHAPES = minilm_shapes(8)
LIMITS_UPDATE = EnvelopeLimits.for_update(SHAPES)
LIMITS_GLOBAL = EnvelopeLimits.for_global(SHAPES)


def codec_specs() -> list[str]:
    """Every codec to fuzz, built from the grammar: [sparsify+] values [+entropy]."""
    values = (
        "fp32",
        "fp16",
        "bf16",
        "int8",
        "int4",
        "int2",
        "int8-sr",
        "int4-sr",
        "int2-sr",
        "int4-b32",
        "int8-b8",
        "int2-b65536-sr",
        "sign",
        "sign-b64",
    )
    sparsify = ("", "topk0.1+", "topk0.01+", "topk0.5+", "randk0.5+", "randk0.05+")
    entropy = ("", "+zlib", "+lzma", "+zstd")
    specs = [f"{s}{v}{e}" for s in sparsify for v in values for e in entropy]
    specs += [f"{s[:-1]}{e}" for s in sparsify if s for e in entropy]  # sparsifier alone: fp32 values
    specs += ["zlib", "lzma", "zstd"]
    return specs


SPECS = codec_specs()
# (no "-sr" here: encode_envelope's stochastic rounding draws from an unseeded generator; the codec
# target covers "-sr" decoding, which is the same as without it)
ENVELOPE_CODECS = (
    "fp32",
    "fp16",
    "bf16",
    "int8",
    "int4",
    "int2",
    "int2-b16",
    "int4-b32",
    "sign",
    "sign-b64",
    "topk0.1+int8",
    "topk0.05",
    "topk0.01+int4+zlib",
    "topk0.5+bf16",
    "randk0.5+sign",
    "randk0.7+sign+zstd",
    "randk0.1+int8",
    "int4+lzma",
    "fp32+zlib",
    "int8+zstd",
    "topk0.1+sign",
)


def _adapter(rng: np.random.Generator, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    out = {}
    for name, shape in shapes.items():
        x = rng.normal(scale=rng.uniform(1e-3, 1e-2), size=shape)
        if name.endswith("lora_B.weight"):
            x[rng.random(shape[0]) < 0.25] *= 1e-3
        out[name] = x.astype(np.float32)
    return out


@dataclass
class EnvSeed:
    header: dict  # plain header JSON object
    parts: list[bytes]  # each tensor's encoded bytes, in header order
    tensors: dict[str, np.ndarray]
    payload: bytes  # as a sender encodes it


def _split_envelope(payload: bytes) -> tuple[dict, bytes]:
    (word,) = struct.unpack_from("<I", payload, 4)
    hlen = word & ~HEADER_ZLIB
    raw = payload[8 : 8 + hlen]
    return json.loads(zlib.decompress(raw) if word & HEADER_ZLIB else raw), payload[8 + hlen :]


def make_env_seed(env: Envelope) -> EnvSeed:
    payload = encode_envelope(env)
    header, body = _split_envelope(payload)
    parts, offset = [], 0
    for spec in header["tensors"]:
        parts.append(body[offset : offset + spec["nbytes"]])
        offset += spec["nbytes"]
    return EnvSeed(header, parts, dict(env.tensors), payload)


def pack_envelope(header: Any, body: bytes, compress: bool) -> bytes:
    raw = serialize(header)
    if compress:
        raw = zlib.compress(raw, 6)
        return ENVELOPE_MAGIC + struct.pack("<I", (len(raw) & 0x7FFFFFFF) | HEADER_ZLIB) + raw + body
    return ENVELOPE_MAGIC + struct.pack("<I", len(raw) & 0xFFFFFFFF) + raw + body


def reseal(header: Any, parts: list[bytes]) -> None:
    """Make byte counts and the body hash agree with ``parts`` (where the header still has them)."""
    if not isinstance(header, dict):
        return
    tensors = header.get("tensors")
    if isinstance(tensors, list):
        for spec, part in zip(tensors, parts):
            if isinstance(spec, dict):
                spec["nbytes"] = len(part)
    header["body_sha256"] = hashlib.sha256(b"".join(parts)).hexdigest()


class Corpus:
    """Valid messages, envelopes and encodings the mutators start from (built once, lazily)."""

    def __init__(self, seed: int = 0, bomb_mb: int = 100, full: bool = True):
        self.seed, self.bomb_mb, self.full = seed, bomb_mb, full
        self._cache: dict[str, Any] = {}

    def _get(self, key: str, build: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def prepare(self, amplify: bool) -> None:
        """Build the costly inputs up front, so no target's peak RSS includes building them."""
        self.zlib_bomb, self.lzma_bomb, self.zstd_bombs  # noqa: B018
        rng = random.Random(0)
        for _ in range(40):
            big_list(rng)
        if amplify:
            self.randk_kept()

    def randk_kept(self) -> int:
        """How many of 2**26 values ``randk1e-9`` keeps for the all-zero seed."""
        return self._get("randk-kept", lambda: int(np.count_nonzero(get_codec("randk1e-9")._mask(b"\0" * 8, 1 << 26))))

    # JSON messages
    @property
    def status(self) -> list[bytes]:
        return self._get(
            "status",
            lambda: [
                Status(Presence.ONLINE, 8, 1234, "minilm-l6").to_bytes(),
                Status(Presence.OFFLINE).to_bytes(),
                Status(Presence.ONLINE, 4096, 10**12, "m" * 256).to_bytes(),
                b'{"state":"online"}',
                b'{"state":"online","rank":null,"num_examples":null,"model_id":null}',
            ],
        )

    @property
    def ack(self) -> list[bytes]:
        return self._get(
            "ack",
            lambda: [
                Ack(3, AckResult.ACCEPTED).to_bytes(),
                Ack(None, AckResult.REJECTED, "stale_round", "round 2 is closed").to_bytes(),
                RepairRequest(5, "0123456789abcdef" * 2, 10, (1, 3, 9)).to_bytes(),
                RepairRequest(2**53, "f" * 32, 2**32 - 1, tuple(range(0, 2048, 2))).to_bytes(),
                b'{"result":"accepted"}',
            ],
        )

    @property
    def announcement(self) -> list[bytes]:
        def build():
            open_ann = Announcement(
                job="job1",
                state=RoundState.OPEN,
                round=4,
                global_version=3,
                rank=8,
                completed=3,
                rounds=10,
                deadline=1795554900.0,
                selected=("dev000", "dev003"),
                codec="topk0.1+int8",
                head_codec="fp16",
                strategy=StrategyInfo("hetlora", True, {"prune_threshold": 0.1}),
                train=TrainInfo(20, 8, 0.002, 0.5),
                privacy=PrivacyInfo(0.25, 0.003),
            )
            many = Announcement(
                job="job1",
                state=RoundState.OPEN,
                round=1,
                global_version=0,
                rank=4,
                deadline=1.0,
                selected=tuple(f"dev{i:04d}" for i in range(300)),
                codec="randk0.7+sign",
                strategy=StrategyInfo("ffa", False),
                train=TrainInfo(1, 1, 1e-12),
                secagg=SecaggInfo(0.05),
            )
            return [
                a.to_bytes()
                for a in (
                    open_ann,
                    many,
                    Announcement(job="job1", state=RoundState.WAITING, round=5, global_version=4, rank=8),
                    replace(open_ann, mode=RoundMode.ASYNC, selected=(), privacy=None),
                    replace(open_ann, shards=4),  # version 3: sharded aggregation
                    Announcement(
                        job="job1",
                        state=RoundState.FINISHED,
                        round=10,
                        global_version=10,
                        rank=2,
                        completed=10,
                        rounds=10,
                    ),
                )
            ]

        return self._get("announcement", build)

    # secure aggregation
    @property
    def secagg_upload(self) -> list[bytes]:
        def build():
            k = bytes(range(32))
            peers = {f"dev{i:03d}": bytes([i]) * 96 for i in range(12)}
            return [
                SecaggKeys("job1", 4, "dev001", k, k[::-1], bytes(32)).to_bytes(),
                SecaggShares("job1", 4, "dev001", peers).to_bytes(),
                SecaggShares("job1", 4, "d" * 128, {f"p{i}": bytes(96) for i in range(200)}).to_bytes(),
                SecaggReveal("job1", 4, "dev002", {p: v[:34] for p, v in peers.items()}).to_bytes(),
            ]

        return self._get("secagg_upload", build)

    @property
    def secagg_down(self) -> list[bytes]:
        def build():
            k = bytes(range(32))
            devices = tuple(PeerKeys(f"dev{i:03d}", k, k[::-1]) for i in range(12))
            return [
                SecaggKeyList("job1", 4, 7, 0.05, devices).to_bytes(),
                SecaggForward("job1", 4, {f"dev{i:03d}": bytes([i]) * 96 for i in range(11)}).to_bytes(),
                SecaggUnmask("job1", 4, tuple(f"dev{i:03d}" for i in range(9)), ("dev010", "dev011")).to_bytes(),
            ]

        return self._get("secagg_down", build)

    @property
    def shard_messages(self) -> list[bytes]:
        """Sharded aggregation's plan (each state) and progress reports."""

        def build():
            from core.messages import PlanState, ShardAccepted, ShardPlan, ShardProgress

            devices = tuple(f"dev{i:03d}" for i in range(12))
            return [
                ShardPlan("job1", PlanState.OPEN, 4, 4, 3, devices, 30, 1.5, 1e9, 1e9 + 600).to_bytes(),
                ShardPlan("job1", PlanState.SEAL, 4, 4, 3, devices, 0, 0.0, 1e9, 1e9 + 600).to_bytes(),
                ShardPlan("job1", PlanState.FINISHED, 9, 2).to_bytes(),
                ShardProgress(
                    "job1", 3, 4, tuple(ShardAccepted(d, i + 1, 0.1 * i) for i, d in enumerate(devices))
                ).to_bytes(),
                ShardProgress("job1", 0, 4, ()).to_bytes(),
            ]

        return self._get("shard_messages", build)

    @property
    def partials(self) -> list[tuple[bytes, bytes]]:
        """Sealed partials as (header JSON, float64 body), valid ones."""

        def build():
            from core.messages import PartialHeader, PartialTensor, ShardAccepted
            from core.protocol import encode_partial

            rng = np.random.default_rng(self.seed)
            out = []
            for count in (0, 3):
                accepted = tuple(
                    ShardAccepted(f"dev{i:03d}", i + 1, 0.5, *((1200, 4096, {"train_loss": 0.5}) if i == 0 else ()))
                    for i in range(count)
                )  # the first with its report for the history (the long form), the rest without
                sums = {"a.lora_A.weight": rng.normal(size=(4, 16)), "a:BA": rng.normal(size=(8, 16))}
                header = PartialHeader(
                    "job1",
                    1,
                    4,
                    float(sum(a.weight for a in accepted)),
                    count,
                    accepted,
                    tuple(PartialTensor(k, v.shape) for k, v in sums.items()),
                )
                payload = encode_partial(header, sums)
                hlen = struct.unpack_from("<I", payload, 4)[0]
                out.append((payload[8 : 8 + hlen], payload[8 + hlen :]))
            return out

        return self._get("partials", build)

    # envelopes
    def _envelopes(self, kind: str) -> list[EnvSeed]:
        def build():
            rng = np.random.default_rng(self.seed)
            seeds = []
            if kind in ("update", "all"):
                specs = ENVELOPE_CODECS if self.full else ENVELOPE_CODECS[::4]
                for i, spec in enumerate(specs):
                    rank = (8, 4, 2)[i % 3]
                    tensors = _adapter(rng, rank_shapes(SHAPES, rank))
                    head = {"classifier.weight": "fp16", "classifier.bias": "fp32"} if i % 4 == 1 else {}
                    seeds.append(
                        make_env_seed(
                            Envelope(
                                "update",
                                "job1",
                                7,
                                f"dev{i:03d}",
                                rank,
                                spec,
                                tensors,
                                num_examples=120 + i,
                                metrics={"train_loss": 0.5, "step_time_s": 0.61},
                                base_version=6,
                                tensor_codecs=head,
                            )
                        )
                    )
                words = {k: rng.integers(0, 2**32, v, dtype=np.uint32) for k, v in rank_shapes(SHAPES, 4).items()}
                seeds.append(
                    make_env_seed(Envelope("masked", "job1", 7, "dev100", 4, RING_CODEC, words, base_version=6))
                )
            if kind in ("global", "all"):
                for i, spec in enumerate(("fp16", "int8", "topk0.1+int8+zlib", "fp32") if self.full else ("int8",)):
                    tensors = _adapter(rng, SHAPES)
                    for layer in (0, 3):
                        a = f"base_model.model.bert.encoder.layer.{layer}.attention.self.query.lora_A.weight"
                        base = a[: -len(A_SUFFIX)] + "base_layer.weight"
                        k = 2 + i
                        tensors[BASE_A_PREFIX + base] = rng.normal(size=(k, 384)).astype(np.float32) * 1e-2
                        tensors[BASE_B_PREFIX + base] = rng.normal(size=(384, k)).astype(np.float32) * 1e-2
                        if layer == 0:
                            tensors[BASE_DELTA_PREFIX + base] = rng.normal(size=(384, 384)).astype(np.float32) * 1e-3
                    seeds.append(
                        make_env_seed(
                            Envelope(
                                "global", "job1", 9, "aggregator", 8, spec, tensors, base_version=8 if i % 2 else 0
                            )
                        )
                    )
            if kind in ("small", "all"):
                for i, spec in enumerate(ENVELOPE_CODECS):
                    shapes = [(), (0,), (1,), (3,), (2, 3), (9,), (65,), (4, 0, 2), (17, 3)][i % 9 :][:3]
                    tensors = {f"t{j}": rng.normal(size=s).astype(np.float32) for j, s in enumerate(shapes)}
                    seeds.append(make_env_seed(Envelope("update", "job1", 1, "d1", 2, spec, tensors)))
            return seeds

        return self._get(f"env-{kind}", build)

    def envelopes(self, which: str) -> list[EnvSeed]:
        if which == "update":
            return self._envelopes("update") + self._envelopes("small")
        if which == "global":
            return self._envelopes("global") + self._envelopes("small")[:4]
        return self._envelopes("update") + self._envelopes("global") + self._envelopes("small")

    @property
    def headers(self) -> list[bytes]:
        return self._get("headers", lambda: [to_bytes(s.header) for s in self.envelopes("all")])

    @property
    def zlib_bomb(self) -> bytes:
        """zlib of ``bomb_mb`` MB of zeros (about a thousandth of that)."""

        def build():
            c, block = zlib.compressobj(9), bytes(1 << 20)
            return b"".join(c.compress(block) for _ in range(self.bomb_mb)) + c.flush()

        return self._get("zlib_bomb", build)

    @property
    def lzma_bomb(self) -> bytes:
        return self._get(
            "lzma_bomb",
            lambda: lzma.compress(
                bytes(min(16, self.bomb_mb) << 20),
                format=lzma.FORMAT_RAW,
                filters=[{"id": lzma.FILTER_LZMA2, "preset": 6, "dict_size": 1 << 20}],
            ),
        )

    @property
    def zstd_bombs(self) -> list[bytes]:
        def build():
            import zstandard

            out = [zstandard.ZstdCompressor(level=3).compress(bytes(min(16, self.bomb_mb) << 20))]
            out.append(zstandard.ZstdCompressor(level=3, write_content_size=False).compress(bytes(1 << 20)))
            small = zstandard.ZstdCompressor(level=3).compress(bytes(64))
            out.append(small[:5] + b"\x00" + small[6:])  # content size field tampered
            return out

        return self._get("zstd_bombs", build)

    # codec encodings
    def encodings(self, spec: str, rng: random.Random) -> list[tuple[tuple[int, ...], bytes]]:
        def build():
            nrng = np.random.default_rng(
                int.from_bytes(hashlib.sha256(f"{self.seed}:{spec}".encode()).digest()[:8], "little")
            )
            codec = parse_codec(spec, seed=int(nrng.integers(0, 2**32)))
            out = []
            for shape in ((), (1,), (7,), (64,), (65,), (3, 5), (100,), (8, 384), (384, 8), (5, 384), (0,), (2, 0))[
                nrng.integers(0, 12) :
            ][:2] + ((8, 384),):
                x = nrng.normal(scale=nrng.choice([1e-3, 1.0, 1e30]), size=shape).astype(np.float32)
                if x.size and nrng.random() < 0.2:
                    x.reshape(-1)[nrng.integers(0, x.size, 3)] = 0.0
                out.append((shape, codec.encode(x)[0]))
            return out

        return self._get(f"enc-{spec}", build)


# -- targets -------------------------------------------------------------------------------
@dataclass
class Target:
    """``generate(rng) -> (family, input)``; ``call(input)`` runs the parser (and any checks)."""

    name: str
    weight: float
    generate: Callable[[random.Random], tuple[str, Any]]
    call: Callable[[Any], Any]
    stateless: bool = True  # an input may be run again (to re-time it)


def describe(value: Any, limit: int = 200) -> str:
    """A repr of an input, bytes cut to ``limit``."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        b = bytes(value)
        return repr(b[:limit]) + (f" ... ({len(b):,} bytes)" if len(b) > limit else "")
    if isinstance(value, str):
        return repr(value[:limit]) + (f" ... ({len(value):,} characters)" if len(value) > limit else "")
    if isinstance(value, tuple):
        return "(" + ", ".join(describe(v, limit) for v in value) + ")"
    return repr(value)[:limit]


def input_size(value: Any) -> int:
    if isinstance(value, (bytes, bytearray, str)):
        return len(value)
    if isinstance(value, tuple):
        return sum(input_size(v) for v in value)
    return 0


def _check_decoded(tensors: dict[str, np.ndarray], bound: int) -> None:
    total = sum(int(v.nbytes) for v in tensors.values())
    if total > bound:
        raise MemoryBound(
            "decode_envelope (decoded tensors)",
            f"decoded tensors hold {total / 2**20:,.0f} MiB (bound {bound / 2**20:,.0f} MiB)",
        )


def _frozen_checked(tensors: dict[str, np.ndarray], bound: int) -> dict[str, np.ndarray]:
    """``frozen_changes`` (what the device runs on a decoded global envelope), refusing to start
    a ``B @ A`` product beyond the memory bound: that allocation is the finding."""
    for key, a in tensors.items():
        if key.startswith(BASE_A_PREFIX):
            b = tensors.get(BASE_B_PREFIX + key[len(BASE_A_PREFIX) :])
            if b is not None and a.ndim == 2 and b.ndim == 2 and b.shape[1] == a.shape[0]:
                size = 4 * b.shape[0] * a.shape[1]
                if b.shape[0] * a.shape[1] > MAX_ELEMENTS:
                    # frozen_changes refuses these before building the product (a regression test
                    # in tests/test_fuzz.py calls it on one); here that refusal is not risked.
                    raise ProtocolError(f"B @ A of {b.shape[0]} x {a.shape[1]} exceeds {MAX_ELEMENTS} values")
                if size > bound:
                    raise MemoryBound(
                        "frozen_changes (B @ A)",
                        f"frozen_changes would allocate {size / 2**20:,.0f} MiB for B {b.shape} @ A {a.shape}"
                        f" (bound {bound / 2**20:,.0f} MiB)",
                    )
    return frozen_changes(tensors)


class EnvelopeGen:
    """Envelope inputs: valid, byte-mutated, header-mutated, length word, zlib bombs,
    structure-aware with reseal, random; rarely "amplify" (largest shapes, smallest encodings)."""

    def __init__(self, corpus: Corpus, which: str, amplify: bool):
        self.corpus, self.which, self.amplify = corpus, which, amplify

    def __call__(self, rng: random.Random) -> tuple[str, bytes]:
        seeds = self.corpus.envelopes(self.which)
        seed = rng.choice(seeds)
        r = rng.random()
        if self.amplify and r < 0.0005:
            return "amplify", self._amplify(rng)
        if r < 0.06:
            return "valid", seed.payload
        if r < 0.22:
            return "bytes", havoc(rng, seed.payload, [rng.choice(seeds).payload])
        if r < 0.36:
            return "bytes-header", self._header_bytes(rng, seed)
        if r < 0.44:
            return "length-word", self._length_word(rng, seed)
        if r < 0.50:
            return "zlib", self._zlib(rng, seed)
        if r < 0.92:
            return "struct", self._struct(rng, seed)
        return "random", random_bytes(rng, ENVELOPE_MAGIC + struct.pack("<I", rng.choice((0, 2, 30, 1 << 31 | 20))))

    def _header_bytes(self, rng, seed: EnvSeed) -> bytes:
        raw = to_bytes(seed.header)
        raw = havoc(rng, raw, self.corpus.headers)
        compress = rng.random() < 0.5
        body = b"".join(seed.parts)
        if compress:
            z = zlib.compress(raw)
            return ENVELOPE_MAGIC + struct.pack("<I", len(z) | HEADER_ZLIB) + z + body
        return ENVELOPE_MAGIC + struct.pack("<I", len(raw)) + raw + body

    def _length_word(self, rng, seed: EnvSeed) -> bytes:
        p = seed.payload
        (word,) = struct.unpack_from("<I", p, 4)
        hlen = word & ~HEADER_ZLIB
        new = (
            rng.choice(
                (
                    rng.getrandbits(32),
                    word + rng.randint(-8, 8),
                    word ^ HEADER_ZLIB,
                    hlen,
                    hlen | HEADER_ZLIB,
                    MAX_HEADER_BYTES,
                    MAX_HEADER_BYTES + 1,
                    len(p) - 8,
                    len(p) - 7,
                    0,
                    0xFFFFFFFF,
                    HEADER_ZLIB,
                    HEADER_ZLIB | (len(p) - 8),
                    HEADER_ZLIB | MAX_HEADER_BYTES,
                    1 << 30,
                )
            )
            & 0xFFFFFFFF
        )
        return p[:4] + struct.pack("<I", new) + p[8:]

    def _zlib(self, rng, seed: EnvSeed) -> bytes:
        body = b"".join(seed.parts)
        raw = to_bytes(seed.header)
        c = rng.randrange(7)
        if c == 0:
            z = self.corpus.zlib_bomb
        elif c == 1:
            z = zlib.compress(raw[:-1] + b" " * (MAX_HEADER_BYTES + rng.choice((0, 1, 4096))) + b"}", 9)
        elif c == 2:
            z = zlib.compress(raw) + rng.randbytes(rng.randint(1, 16))  # trailing bytes after the stream
        elif c == 3:
            z = zlib.compress(raw)[: rng.randint(0, 40)]
        elif c == 4:
            z = zlib.compress(b"[" * rng.choice((100, 100_000, MAX_HEADER_BYTES)), 9)
        elif c == 5:
            z = zlib.compress(serialize(mutate_json(rng, json.loads(raw))))
        else:
            z = havoc(rng, zlib.compress(raw), ops=1)
        word = len(z) | HEADER_ZLIB if rng.random() < 0.85 else len(z)
        return ENVELOPE_MAGIC + struct.pack("<I", word & 0xFFFFFFFF) + z + (body if rng.random() < 0.8 else b"")

    def _struct(self, rng, seed: EnvSeed) -> bytes:
        header = json.loads(json.dumps(seed.header))
        parts = list(seed.parts)
        seal = rng.random() < 0.8
        for _ in range(rng.choice((1, 1, 2, 3))):
            op = rng.randrange(9)
            if not isinstance(header, dict):
                header = mutate_json(rng, header)
                continue
            tensors = header.get("tensors")
            specs = [t for t in tensors if isinstance(t, dict)] if isinstance(tensors, list) else []
            if op <= 1 or not specs:
                header = mutate_json(rng, header)
            elif op == 2 and parts:  # corrupt one tensor's bytes
                i = rng.randrange(len(parts))
                parts[i] = havoc(rng, parts[i], ops=rng.choice((1, 1, 2)), max_len=len(parts[i]) + 4096)
            elif op == 3:  # another codec for the envelope or one tensor
                spec = rng.choice(SPECS + list(CODEC_SPECS_BAD[:8]))
                if rng.random() < 0.5:
                    header["codec"] = spec
                else:
                    rng.choice(specs)["codec"] = spec
            elif op == 4:  # another shape: claimed over the same bytes, or a tensor of that shape encoded validly
                aligned = [i for i, t in enumerate(tensors) if isinstance(t, dict) and i < len(parts)] or [None]
                i = rng.choice(aligned)
                t = tensors[i] if i is not None else rng.choice(specs)
                shape = [d for d in t["shape"] if isinstance(d, int)] if isinstance(t.get("shape"), list) else [1]
                new = rng.choice(
                    (
                        shape[::-1],
                        shape + [1],
                        shape[:-1],
                        [0] + shape[1:],
                        [rng.choice(INTERESTING_INTS)],
                        [d * 2 for d in shape],
                        [max(0, d - rng.randint(0, max(0, d))) for d in shape],
                        [rng.randint(1, 16), rng.randint(1, 400)],
                        [rng.randint(0, 9)],
                        [2**13, 2**13],
                        [1] * 9,
                        [-1],
                    )
                )
                t["shape"] = new
                if (
                    i is not None
                    and rng.random() < 0.6
                    and all(0 <= d <= 4096 for d in new)
                    and math.prod(new) <= 1 << 16
                ):
                    spec = t.get("codec") or (header.get("codec") if rng.random() < 0.8 else rng.choice(SPECS))
                    x = np.random.default_rng(rng.getrandbits(32)).normal(scale=1e-2, size=new).astype(np.float32)
                    try:
                        parts[i] = parse_codec(spec, seed=0).encode(x)[0]
                    except (ProtocolError, TypeError):
                        pass
            elif op == 5 and isinstance(tensors, list):  # drop or repeat a tensor
                i = rng.randrange(len(tensors))
                if rng.random() < 0.5:
                    del tensors[i]
                    if i < len(parts):
                        del parts[i]
                else:
                    tensors.insert(i, json.loads(json.dumps(tensors[i])))
                    if i < len(parts):
                        parts.insert(i, parts[i])
                    if rng.random() < 0.5 and isinstance(tensors[i], dict):
                        tensors[i]["name"] = f"{tensors[i].get('name')}~"
            elif op == 6:  # rename: unknown, frozen-weight prefixes, unpaired factors
                t = rng.choice(specs)
                name = str(t.get("name", "x"))
                t["name"] = rng.choice(
                    (
                        BASE_A_PREFIX + name,
                        BASE_B_PREFIX + name,
                        BASE_DELTA_PREFIX + name,
                        name + ".x",
                        name.replace("lora_A", "lora_B"),
                        "",
                        "classifier.weight",
                    )
                )
            elif op == 7:  # re-encode one tensor validly in another codec
                aligned = [i for i, t in enumerate(tensors) if isinstance(t, dict) and i < len(parts)]
                i = rng.choice(aligned) if aligned else None
                t = tensors[i] if i is not None else {}
                value = seed.tensors.get(t.get("name")) if isinstance(t.get("name"), str) else None
                if value is not None:
                    spec = rng.choice(SPECS)
                    parts[i] = parse_codec(spec, seed=rng.getrandbits(32)).encode(value)[0]
                    t["codec"] = spec
            else:  # the header's numbers and strings
                key = rng.choice(
                    ("v", "round", "rank", "num_examples", "base_version", "kind", "job", "sender", "metrics")
                )
                header[key] = interesting_value(rng)
        if seal:
            reseal(header, parts)
        return pack_envelope(header, b"".join(parts), rng.random() < 0.5)

    def _amplify(self, rng) -> bytes:
        """A valid envelope whose tensors have the largest shapes and the smallest encodings."""
        n = 1 << 26
        names = list(SHAPES) if self.which != "all" else [f"t{i}" for i in range(64)]
        count = rng.choice((1, 2, 3, 4, 8))
        kind = rng.randrange(3)
        specs, parts = [], []
        if kind == 2:  # a factored frozen-weight change whose product is huge
            base = names[0][: -len(A_SUFFIX)] + "base_layer.weight"
            one = bytes([2, 0]) + np.float32(1).tobytes()  # topk1e-9: k = 1, u8 gap 0, one fp32
            side = rng.choice((1 << 13, 1 << 16))
            for name, shape in ((BASE_A_PREFIX + base, [1, side]), (BASE_B_PREFIX + base, [side, 1])):
                specs.append({"name": name, "shape": shape, "dtype": "float32", "nbytes": len(one), "meta": {}})
                parts.append(one)
            codec = "topk1e-9"
        elif kind == 1:  # randk: the positions cost a SHAKE-128 draw per element
            codec = "randk1e-9+sign"
            seed = b"\0" * 8
            kept = self.corpus.randk_kept()
            data = seed + get_codec("sign").encode(np.ones(kept, np.float32))[0]
            for i in range(min(count, 4)):  # 0.5 s each here: 4 is past the slow mark, short of the alarm
                specs.append(
                    {
                        "name": names[i % len(names)] + ("" if i < len(names) else f".{i}"),
                        "shape": [n],
                        "dtype": "float32",
                        "nbytes": len(data),
                        "meta": {},
                    }
                )
                parts.append(data)
        else:  # topk: one value stands for 2**26
            codec = "topk1e-9"
            data = bytes([2, 0]) + np.float32(1).tobytes()
            for i in range(count * 4):
                specs.append(
                    {
                        "name": names[i % len(names)] + ("" if i < len(names) else f".{i}"),
                        "shape": [n],
                        "dtype": "float32",
                        "nbytes": len(data),
                        "meta": {},
                    }
                )
                parts.append(data)
        header = {
            "v": 1,
            "kind": "global",
            "job": "job1",
            "round": 1,
            "sender": "aggregator",
            "rank": 8,
            "codec": codec,
            "tensors": specs,
            "num_examples": 0,
            "metrics": {},
            "base_version": 0,
            "body_sha256": hashlib.sha256(b"".join(parts)).hexdigest(),
        }
        return pack_envelope(header, b"".join(parts), True)


class CodecGen:
    """(spec, shape, data) for ``get_codec(spec).decode(data, {}, shape)``."""

    BIG_SHAPES = (
        (2**26,),
        (2**13, 2**13),
        (2**26 + 1,),
        (2**13, 2**13 + 1),
        (2**40,),
        (2**31, 2**31),
        (-1,),
        (3, -2),
        (2**20,),
        (1,) * 8,
        (0, 2**40),
    )

    def __init__(self, corpus: Corpus, amplify: bool):
        self.corpus, self.amplify = corpus, amplify

    def __call__(self, rng: random.Random) -> tuple[str, tuple[str, tuple[int, ...], bytes]]:
        spec = rng.choice(SPECS)
        shape, data = rng.choice(self.corpus.encodings(spec, rng))
        r = rng.random()
        if self.amplify and r < 0.0005:
            return "amplify", (rng.choice(("randk0.5", "randk1e-9+sign", "randk0.05+int8+zlib")), (2**26,), b"\0" * 8)
        if r < 0.08:
            return "valid", (spec, shape, data)
        if r < 0.40:
            return "bytes", (spec, shape, havoc(rng, data, max_len=len(data) + 65536))
        if r < 0.52:
            return "aware", (spec, shape, self._aware(rng, spec, shape, data))
        if r < 0.62:
            other = rng.choice(
                self.BIG_SHAPES[4:]
                + (
                    (),
                    (0,),
                    (1,),
                    (2,),
                    (3, 5),
                    (5, 3),
                    (8, 384),
                    (384, 8),
                    (64,),
                    (63,),
                    (65,),
                    (7, 9),
                    tuple(reversed(shape)),
                    shape + (1,),
                )
            )
            return "shape", (spec, other, data)
        if r < 0.72:
            return "cross", (rng.choice(SPECS), shape, data)
        if r < 0.80:
            return "entropy", self._entropy(rng, spec, shape, data)
        if r < 0.83:
            big = rng.choice(self.BIG_SHAPES)
            if "randk" in spec and 0 < math.prod(big) >= 2**20 and all(d > 0 for d in big):
                big = (2**40,)  # randk's draw for 2**26 elements takes 0.5 s: the "amplify" family has those
            return "big-shape", (spec, big, data[: rng.randint(0, 64)])
        return "random", (
            spec,
            rng.choice(((), (1,), (7,), (64,), (65,), (100,), (8, 384), (0,), (3, 5))),
            random_bytes(rng),
        )

    def _aware(self, rng, spec: str, shape: tuple[int, ...], data: bytes) -> bytes:
        """Codec-aware corruption: bf16 scales set to NaN, inf or negative; sparse index tags;
        padding bits; varint continuation bits; RandK seeds."""
        b = bytearray(data)
        if not b:
            return bytes(b)
        c = rng.randrange(5)
        if c == 0 and len(b) >= 2:
            i = 2 * rng.randrange(len(b) // 2)
            b[i : i + 2] = rng.choice(
                (b"\xc0\x7f", b"\x80\x7f", b"\x80\xff", b"\x80\xbf", b"\x01\x80", b"\x7f\x7f", b"\xff\xff")
            )
        elif c == 1:
            b[0] = rng.choice((0, 1, 2, 3, 4, 5, 255))
        elif c == 2:
            b[-1] |= 0x80 | (1 << rng.randrange(8))
        elif c == 3:
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] |= 0x80
        else:
            b[: min(8, len(b))] = rng.randbytes(min(8, len(b)))
        return bytes(b)

    def _entropy(self, rng, spec: str, shape, data: bytes) -> tuple[str, tuple[int, ...], bytes]:
        method = rng.choice(("zlib", "lzma", "zstd"))
        base = spec.rsplit("+", 1)[0] if spec.endswith(("+zlib", "+lzma", "+zstd")) else spec
        target = f"{base}+{method}" if base not in ("zlib", "lzma", "zstd") else method
        inner = data
        if spec.endswith(("+zlib", "+lzma", "+zstd")) and spec not in ("zlib", "lzma", "zstd"):
            try:
                inner = parse_codec(base, seed=0).encode(np.zeros(shape, np.float32))[0]
            except ProtocolError:
                inner = b""
        c = rng.randrange(4)
        if c == 0:  # a bomb
            blob = {"zlib": self.corpus.zlib_bomb, "lzma": self.corpus.lzma_bomb}.get(method) or rng.choice(
                self.corpus.zstd_bombs
            )
        else:
            payload = havoc(rng, inner, ops=1) if c == 1 else inner + bytes(rng.choice((1, 64, 4096)))
            if method == "zlib":
                blob = zlib.compress(payload)
            elif method == "lzma":
                blob = lzma.compress(
                    payload,
                    format=lzma.FORMAT_RAW,
                    filters=[{"id": lzma.FILTER_LZMA2, "preset": 1, "dict_size": 1 << 20}],
                )
            else:
                import zstandard

                blob = zstandard.ZstdCompressor(level=1, write_content_size=rng.random() < 0.9).compress(payload)
            if c == 3:
                blob = havoc(rng, blob, ops=1)
        return target, shape, blob


class ChunkGen:
    def __init__(self, corpus: Corpus):
        self.corpus = corpus
        self._chunks: list[bytes] = []

    def pool(self) -> list[bytes]:
        if not self._chunks:
            rng = random.Random(f"{self.corpus.seed}:chunks")
            for size in (0, 1, 35, 36, 100, 1000, 5000):
                payload = rng.randbytes(size)
                for cs in (1, 7, 64, 4096):
                    self._chunks.extend(split_chunks(payload, cs)[:3])
            env = self.corpus.envelopes("update")[0].payload
            for cs in (1000, 65536):
                self._chunks.extend(split_chunks(env, cs)[:4])
        return self._chunks

    def __call__(self, rng: random.Random) -> tuple[str, bytes]:
        pool = self.pool()
        chunk = rng.choice(pool)
        r = rng.random()
        if r < 0.06:
            return "valid", chunk
        if r < 0.45:
            return "bytes", havoc(rng, chunk, pool, max_len=1 << 18)
        if r < 0.80:
            magic, mid, index, count, total = CHUNK_HEADER.unpack_from(chunk)
            fields = [magic, mid, index, count, total]
            for _ in range(rng.choice((1, 1, 2, 3))):
                f = rng.randrange(5)
                if f == 0:
                    fields[0] = rng.choice((b"FLC0", b"FLE1", b"\0\0\0\0", b"flc1"))
                elif f == 1:
                    fields[1] = rng.randbytes(16)
                else:
                    bits = 64 if f == 4 else 32
                    fields[f] = (rng.choice(INTERESTING_INTS + (index, count, total)) + rng.choice((0, 0, -1, 1))) % (
                        1 << bits
                    )
            return "header-fields", CHUNK_HEADER.pack(*fields) + chunk[CHUNK_HEADER.size :]
        if r < 0.85:
            return "truncated", chunk[: rng.randint(0, CHUNK_HEADER.size + 2)]
        return "random", random_bytes(rng, CHUNK_MAGIC)


class ReassemblyGen:
    """Interleaved chunk streams from several sources into long-lived reassemblers with small
    limits and a fake clock: reordering, duplicates, losses, corrupt data, resends at another
    chunk size, lying sizes, floods of new message ids, byte-mutated chunks. Each ``add`` is one
    input; after each, the reassembler's accounting is checked against its limits."""

    SOURCES = ("dev0", "dev1", "dev2", "dev3", "dev4", "dev5", "dev6", "", "x" * 300, "dev/0")

    def __init__(self, corpus: Corpus):
        self.corpus = corpus
        self.queue: list[tuple[str, str, bytes]] = []
        self.now = 0.0
        self.adds = 0
        self.r: Reassembler | None = None
        self.rng_stream: random.Random | None = None

    def new_reassembler(self, rng: random.Random) -> Reassembler:
        return Reassembler(
            max_bytes=rng.choice((1 << 16, 1 << 18)),
            max_pending=rng.choice((4, 8, 16)),
            per_source=rng.choice((1, 2, 3)),
            max_buffered=rng.choice((1 << 17, 1 << 19)),
            evict_idle_s=120.0,
            clock=lambda: self.now,
        )

    def _stream(self, rng: random.Random) -> list[tuple[str, str, bytes]]:
        src = rng.choice(self.SOURCES)
        r = rng.random()
        size = rng.choice((0, 1, 100, 5000, 40_000, 70_000, 200_000, 300_000))
        if r < 0.2 and self.corpus.envelopes("small"):
            payload = rng.choice(self.corpus.envelopes("small")).payload
        else:
            payload = rng.randbytes(size)
        cs = rng.choice((1, 64, 1000, 4096, 16384, 65536))
        if len(payload) // cs > 400:
            cs = max(cs, len(payload) // 400)
        chunks = split_chunks(payload, cs)
        kind = rng.randrange(11)
        out = list(chunks)
        if kind == 0:
            rng.shuffle(out)
        elif kind == 1:
            out = [rng.choice(chunks) for _ in range(len(chunks) + rng.randint(0, 5))]
        elif kind == 2 and out:  # lost chunks
            out = [c for c in out if rng.random() < 0.8]
        elif kind == 3 and out:  # corrupt data
            i = rng.randrange(len(out))
            out[i] = out[i][: CHUNK_HEADER.size] + havoc(rng, out[i][CHUNK_HEADER.size :], ops=1, max_len=cs + 64)
        elif kind == 4:  # resent midway with another chunk size
            other = split_chunks(payload, rng.choice((1, 100, 5000, 65536)))
            cut = rng.randint(0, len(out))
            out = out[:cut] + other[:400]
        elif kind == 5 and out:  # lying sizes
            i = rng.randrange(len(out))
            magic, mid, index, count, total = CHUNK_HEADER.unpack_from(out[i])
            total = rng.choice((0, 1, total - 1, total + 1, 1 << 17, 1 << 31, 2**64 - 1)) % 2**64
            out[i] = CHUNK_HEADER.pack(magic, mid, index, count, total) + out[i][CHUNK_HEADER.size :]
        elif kind == 6:  # a flood of new message ids, first chunk each
            out = [
                CHUNK_HEADER.pack(CHUNK_MAGIC, rng.randbytes(16), 0, 2, rng.choice((2, 200, 60_000)))
                + rng.randbytes(rng.choice((1, 100, 30_000)))
                for _ in range(rng.randint(2, 30))
            ]
        elif kind == 7 and out:  # byte-level
            out = [havoc(rng, c, ops=1, max_len=len(c) + 64) if rng.random() < 0.3 else c for c in out]
        elif kind == 8 and out:  # chunks carrying more data than the message announces
            i = rng.randrange(len(out))
            out[i] = out[i] + rng.randbytes(rng.choice((1, 100, 70_000)))
        elif kind == 9 and len(out) > 1:  # the same message id and index with other data
            i = rng.randrange(len(out))
            out.insert(
                rng.randint(0, len(out)), out[i][: CHUNK_HEADER.size] + rng.randbytes(len(out[i]) - CHUNK_HEADER.size)
            )
        tagged = [(src, "stream", c) for c in out]
        if rng.random() < 0.1:
            tagged.append((src, "random", random_bytes(rng, CHUNK_MAGIC)))
        return tagged

    def __call__(self, rng: random.Random) -> tuple[str, tuple[str, bytes]]:
        if self.r is None or self.adds % 5000 == 0:
            self.r = self.new_reassembler(rng)
        self.adds += 1
        while not self.queue:
            streams = [self._stream(rng) for _ in range(rng.choice((1, 2, 3)))]
            merged: list[tuple[str, str, bytes]] = []
            while any(streams):
                s = rng.choice([s for s in streams if s])
                merged.append(s.pop(0))
            self.queue = merged[::-1]
        src, family, chunk = self.queue.pop()
        self.now += rng.choice((0.0, 0.0, 0.0, 0.01, 1.0, 30.0, 121.0))
        return family, (src, chunk)

    def call(self, inp: tuple[str, bytes]) -> Any:
        src, chunk = inp
        r = self.r
        try:
            out = r.add(src, chunk)
            if out is not None and message_id(out) != parse_chunk(chunk).msg_id:
                raise InvariantViolation(
                    "Reassembler.add (payload hash)", "a reassembled payload does not hash to its message id"
                )
            if self.adds % 37 == 0:
                r.stalled(idle_s=10.0)
            if self.adds % 997 == 0:
                r.drop_source(src)
            return out
        finally:
            try:
                self.check(r)
            except InvariantViolation:
                self.r = None  # report a broken reassembler once, then start a fresh one
                raise

    @staticmethod
    def check(r: Reassembler) -> None:
        held = sum(len(d) + CHUNK_OVERHEAD for p in r._pending.values() for d in p.parts.values())
        if held != r.buffered:
            raise InvariantViolation(
                "Reassembler (byte accounting)", f"Reassembler.buffered = {r.buffered} but it holds {held} bytes"
            )
        if r.buffered > r.max_buffered:
            raise InvariantViolation(
                "Reassembler (max_buffered)",
                f"Reassembler holds {r.buffered} bytes, above max_buffered = {r.max_buffered}",
            )
        if len(r._pending) > r.max_pending:
            raise InvariantViolation(
                "Reassembler (max_pending)",
                f"Reassembler holds {len(r._pending)} partial messages, above max_pending = {r.max_pending}",
            )
        per: dict[str, int] = {}
        for source, _ in r._pending:
            per[source] = per.get(source, 0) + 1
        if per and max(per.values()) > r.per_source:
            raise InvariantViolation(
                "Reassembler (per_source)",
                f"a source holds {max(per.values())} partial messages, above per_source = {r.per_source}",
            )
        if len(r._done) > 4097:
            raise InvariantViolation(
                "Reassembler (remembered ids)", f"Reassembler remembers {len(r._done)} message ids"
            )


def topic_gen(rng: random.Random) -> tuple[str, tuple[Any, str]]:
    t = Topics("job1")
    valid = (
        t.round,
        t.global_chunk(8, 3),
        t.delta_chunk(1, 0),
        t.global_chunk(4096, 999_999_999),
        t.update("dev0"),
        t.status("dev0"),
        t.ack("dev0"),
        t.update("d" * 128),
        t.secagg("dev0"),
        t.secagg_round("keys"),
        t.secagg_round("unmask"),
        t.secagg_to("dev0"),
    )
    topic = rng.choice(valid)
    r = rng.random()
    if r < 0.08:
        return "valid", (topic, BASE)
    if r < 0.75:
        for _ in range(rng.choice((1, 1, 2, 3))):
            op = rng.randrange(7)
            i = rng.randint(0, len(topic))
            char = rng.choice(TRICKY_CHARS) if rng.random() < 0.6 else chr(rng.randrange(0x80, 0x3000))
            if op == 0 and topic:
                i = min(i, len(topic) - 1)
                topic = topic[:i] + char + topic[i + 1 :]
            elif op == 1:
                topic = topic[:i] + char + topic[i:]
            elif op == 2 and topic:
                topic = topic[:i] + topic[i + 1 :]
            elif op == 3:
                parts = topic.split("/")
                j = rng.randrange(len(parts))
                parts[j] = rng.choice(
                    (
                        "",
                        "0",
                        "00",
                        "4096",
                        "4097",
                        "999999999",
                        "1000000000",
                        "-1",
                        "+1",
                        "1e3",
                        "\u00b2",
                        "\u0663",
                        "\uff11",
                        "\u2460",
                        "dev0",
                        "x" * 129,
                        "round",
                        "global",
                        "GLOBAL",
                        " global",
                        "updates",
                        "ack",
                        "#",
                        "+",
                    )
                )
                topic = "/".join(parts)
            elif op == 4:
                topic = topic + rng.choice(("/", "/x", "/0", "//", "/\u00b2"))
            elif op == 5:
                topic = topic.replace("/", rng.choice(("//", "", "\\", "/./")), 1)
            else:
                topic = topic * rng.choice((2, 20))
        return "mutated", (topic, BASE)
    if r < 0.85:
        return "random", ("".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randint(0, 40))), BASE)
    if r < 0.95:
        return "random-tail", (
            BASE + "/" + "".join(rng.choice("round/global/0123456789\u00b2\u0663") for _ in range(rng.randint(0, 30))),
            BASE,
        )
    return "type", (rng.choice((None, b"fedlora/job1/round", 7, ["fedlora"], BASE + "/round" + "/x" * 600)), BASE)


PARTIAL_MAX_VALUES = 1 << 16  # what the fuzzed coordinator's job allows in a partial


def partial_gen(corpus: Corpus) -> Callable[[random.Random], tuple[str, bytes]]:
    """Sealed partials: a mutated JSON header before a valid, cut or lengthened body (a), byte-level
    mutation of a whole valid partial (b), or random bytes after the magic (c)."""

    def frame(header: bytes, body: bytes) -> bytes:
        return PARTIAL_MAGIC + struct.pack("<I", len(header)) + header + body

    def gen(rng: random.Random) -> tuple[str, bytes]:
        seeds = corpus.partials
        header, body = rng.choice(seeds)
        r = rng.random()
        if r < 0.6:
            family, mutated = mutate_message(rng, [h for h, _ in seeds])
            if rng.random() < 0.3:
                body = body[: rng.randrange(len(body) + 1)] if rng.random() < 0.5 else body + rng.randbytes(8)
            return family, frame(mutated, body)
        if r < 0.9:
            whole = [frame(h, b) for h, b in seeds]
            return "bytes", havoc(rng, rng.choice(whole), whole)
        return "random", PARTIAL_MAGIC + rng.randbytes(rng.randint(0, 64))

    return gen


def make_targets(corpus: Corpus, amplify: bool = True, memory_bound: int = 1 << 30) -> dict[str, Target]:
    """Every target, generators bound to ``corpus``. ``amplify`` adds the rare inputs with the
    largest shapes (slow, memory-heavy by design: left out of the test suite's sample)."""

    def envelope(limits, frozen):
        def call(payload):
            env = decode_envelope(payload, limits)
            _check_decoded(env.tensors, memory_bound)
            if frozen:
                _frozen_checked(env.tensors, memory_bound)
            return env

        return call

    def codec_call(inp):
        spec, shape, data = inp
        return get_codec(spec).decode(data, {}, shape)

    reasm = ReassemblyGen(corpus)
    chunks = ChunkGen(corpus)
    return {
        t.name: t
        for t in (
            Target("status", 3, lambda rng: mutate_message(rng, corpus.status), parse_status),
            Target("ack", 3, lambda rng: mutate_message(rng, corpus.ack), parse_ack),
            Target("announcement", 2, lambda rng: mutate_message(rng, corpus.announcement), parse_announcement),
            Target(
                "header",
                1.5,
                lambda rng: mutate_message(rng, corpus.headers),
                lambda b: parse_header(parse_json(b, "envelope header", MAX_HEADER_BYTES)),
            ),
            Target("envelope", 1, EnvelopeGen(corpus, "all", amplify), envelope(None, True)),
            Target("envelope_update", 1, EnvelopeGen(corpus, "update", amplify), envelope(LIMITS_UPDATE, False)),
            Target("envelope_global", 1, EnvelopeGen(corpus, "global", amplify), envelope(LIMITS_GLOBAL, True)),
            Target("chunk", 3, chunks, parse_chunk),
            Target("reassembler", 2, reasm, reasm.call, stateless=False),
            Target("codec", 2.5, CodecGen(corpus, amplify), codec_call),
            Target("topic", 3, topic_gen, lambda inp: parse_topic(*inp)),
            Target("secagg_upload", 2, lambda rng: mutate_message(rng, corpus.secagg_upload), parse_secagg_upload),
            Target(
                "secagg_key_list", 1, lambda rng: mutate_message(rng, corpus.secagg_down[:1]), parse_secagg_key_list
            ),
            Target("secagg_forward", 1, lambda rng: mutate_message(rng, corpus.secagg_down[1:2]), parse_secagg_forward),
            Target("secagg_unmask", 1, lambda rng: mutate_message(rng, corpus.secagg_down[2:]), parse_secagg_unmask),
            Target("shard_plan", 1, lambda rng: mutate_message(rng, corpus.shard_messages[:3]), parse_shard_plan),
            Target(
                "shard_progress", 1, lambda rng: mutate_message(rng, corpus.shard_messages[3:]), parse_shard_progress
            ),
            Target("shard_partial", 1, partial_gen(corpus), lambda b: decode_partial(b, PARTIAL_MAX_VALUES)),
        )
    }


# -- the harness ---------------------------------------------------------------------------
@dataclass
class Finding:
    target: str
    kind: str  # exception, hang, slow, memory, invariant
    type: str
    where: str
    message: str
    family: str
    index: int
    input_repr: str
    input_len: int
    input_b64: str = ""
    count: int = 1


@dataclass
class TargetStats:
    name: str
    inputs: int = 0
    refused: int = 0
    accepted: int = 0
    findings: int = 0
    max_s: float = 0.0  # an input's wall time; over slow_s, the lesser of two runs (stateless targets)
    max_family: str = ""
    max_first_s: float = 0.0  # wall time of first runs only
    max_cpu_s: float = 0.0
    total_s: float = 0.0
    over_slow: int = 0  # over slow_s, on the rerun too
    over_slow_first: int = 0
    traced: int = 0
    traced_peak: int = 0
    traced_peak_family: str = ""
    traced_peak_input_len: int = 0
    peak_rss: int = 0
    wall_s: float = 0.0
    generator_errors: int = 0
    families: dict[str, int] = field(default_factory=dict)


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        if "edge_client" in frame.filename:
            return f"{Path(frame.filename).name}:{frame.lineno} in {frame.name}"
    if frames:
        f = frames[-1]
        return f"{Path(f.filename).name}:{f.lineno} in {f.name}"
    return "?"


def _b64(value: Any) -> str:
    if isinstance(value, tuple):
        value = next((v for v in value if isinstance(v, (bytes, str))), b"")
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogatepass")
    if isinstance(value, (bytes, bytearray)) and len(value) <= 65536:
        return base64.b64encode(bytes(value)).decode()
    return ""


class Harness:
    """Runs inputs through targets; counts refusals; records anything else as a finding."""

    def __init__(
        self,
        slow_s: float = 1.0,
        alarm_s: int = 5,
        trace_every: int = 0,
        progress_every: int = 50_000,
        quiet: bool = False,
    ):
        self.slow_s, self.alarm_s, self.trace_every = slow_s, alarm_s, trace_every
        self.progress_every, self.quiet = progress_every, quiet
        self.findings: dict[tuple, Finding] = {}
        self.stats: dict[str, TargetStats] = {}
        self.done = 0
        self.total = 0
        self.started = time.perf_counter()

    def _record(
        self, target: str, kind: str, exc_type: str, where: str, message: str, family: str, index: int, inp: Any
    ) -> None:
        key = (target, kind, exc_type, where)
        size = input_size(inp)
        old = self.findings.get(key)
        if old is None or size < old.input_len:
            count = old.count + 1 if old else 1
            self.findings[key] = Finding(
                target, kind, exc_type, where, message[:300], family, index, describe(inp), size, _b64(inp), count
            )
        else:
            old.count += 1
        self.stats[target].findings += 1

    def _again(self, target: Target, inp: Any) -> float:
        """The time of a second run of an input (findings were recorded by the first)."""
        if self.alarm_s:
            signal.alarm(self.alarm_s)
        t0 = time.perf_counter()
        try:
            target.call(inp)
        except (Hang, Exception):  # noqa: BLE001, S110 (the first run recorded whatever this one raises)
            pass
        finally:
            if self.alarm_s:
                signal.alarm(0)
        return time.perf_counter() - t0

    def run(self, target: Target, count: int, rng: random.Random) -> TargetStats:
        st = self.stats.setdefault(target.name, TargetStats(target.name))
        per_rss = reset_peak_rss()
        t_start = time.perf_counter()
        old_handler = None
        if self.alarm_s:

            def on_alarm(signum, frame):
                raise Hang(f"no answer within {self.alarm_s} s")

            old_handler = signal.signal(signal.SIGALRM, on_alarm)
        try:
            for i in range(count):
                try:
                    family, inp = target.generate(rng)
                except Exception as exc:  # noqa: BLE001 (a bug of the fuzzer, not of a parser: count it, go on)
                    st.generator_errors += 1
                    if st.generator_errors <= 3:
                        print(
                            f"fuzz: {target.name}: generator error {type(exc).__name__}: {exc} at {_where(exc)}",
                            file=sys.stderr,
                            flush=True,
                        )
                    continue
                st.families[family] = st.families.get(family, 0) + 1
                traced = bool(self.trace_every) and i % self.trace_every == self.trace_every // 2
                if traced:
                    tracemalloc.start()
                if self.alarm_s:
                    signal.alarm(self.alarm_s)
                hung = False
                c0 = time.thread_time()
                t0 = time.perf_counter()
                try:
                    target.call(inp)
                    st.accepted += 1
                except ProtocolError:
                    st.refused += 1
                except Hang as exc:
                    hung = True
                    self._record(target.name, "hang", "Hang", _where(exc), str(exc), family, i, inp)
                except MemoryBound as exc:
                    self._record(target.name, "memory", "MemoryBound", exc.where, str(exc), family, i, inp)
                except InvariantViolation as exc:
                    self._record(target.name, "invariant", "InvariantViolation", exc.where, str(exc), family, i, inp)
                except Exception as exc:  # noqa: BLE001 (exactly what the fuzzer looks for)
                    self._record(
                        target.name,
                        "exception",
                        type(exc).__name__,
                        _where(exc),
                        f"{type(exc).__name__}: {exc}",
                        family,
                        i,
                        inp,
                    )
                finally:
                    dt = time.perf_counter() - t0
                    cpu = time.thread_time() - c0
                    if self.alarm_s:
                        signal.alarm(0)
                    if traced:
                        peak = tracemalloc.get_traced_memory()[1]
                        tracemalloc.stop()
                        st.traced += 1
                        if peak > st.traced_peak:
                            st.traced_peak, st.traced_peak_family, st.traced_peak_input_len = (
                                peak,
                                family,
                                input_size(inp),
                            )
                if not traced:  # tracemalloc slows a call down several times: time only untraced ones
                    st.total_s += dt
                    st.max_cpu_s = max(st.max_cpu_s, cpu)
                    st.max_first_s = max(st.max_first_s, dt)
                    if dt > self.slow_s and not hung:
                        st.over_slow_first += 1
                        if target.stateless:  # a busy machine stalls any call: time it again before calling it slow
                            dt = min(dt, self._again(target, inp))
                    if dt > st.max_s:
                        st.max_s, st.max_family = dt, family
                    if dt > self.slow_s and not hung:
                        st.over_slow += 1
                        self._record(
                            target.name,
                            "slow",
                            "Slow",
                            family,
                            f"took {dt:.2f} s (over {self.slow_s} s), {cpu:.2f} s of CPU",
                            family,
                            i,
                            inp,
                        )
                st.inputs += 1
                self.done += 1
                if self.progress_every and self.done % self.progress_every == 0 and not self.quiet:
                    rate = self.done / (time.perf_counter() - self.started)
                    print(
                        f"fuzz: {self.done:,}/{self.total:,} inputs ({target.name}), {rate:,.0f}/s, "
                        f"{sum(s.findings for s in self.stats.values())} findings",
                        file=sys.stderr,
                        flush=True,
                    )
        finally:
            if self.alarm_s:
                signal.alarm(0)
                signal.signal(signal.SIGALRM, old_handler)
        st.wall_s += time.perf_counter() - t_start
        st.peak_rss = max(st.peak_rss, peak_rss_bytes()) if per_rss else peak_rss_bytes()
        return st


def allocate(total: int, targets: dict[str, Target], minimum: int = MIN_PER_TARGET) -> dict[str, int]:
    """Inputs per target: ``minimum`` each (scaled down when ``total`` cannot give that), the
    rest by weight."""
    names = list(targets)
    floor = min(minimum, total // len(names))
    rest = total - floor * len(names)
    weights = sum(targets[n].weight for n in names)
    counts = {n: floor + int(rest * targets[n].weight / weights) for n in names}
    counts[names[0]] += total - sum(counts.values())
    return counts


def run(
    inputs: int = 1_000_000,
    seed: int = 0,
    targets: list[str] | None = None,
    *,
    slow_s: float = 1.0,
    alarm_s: int = 5,
    trace_every: int = 500,
    memory_bound_mb: int = 1024,
    bomb_mb: int = 100,
    amplify: bool = True,
    full: bool = True,
    minimum: int = MIN_PER_TARGET,
    quiet: bool = False,
    extra: dict[str, Target] | None = None,
) -> dict:
    """Run the fuzzer; returns the results as a JSON-able dict."""
    corpus = Corpus(seed, bomb_mb, full)
    corpus.prepare(amplify)
    all_targets = make_targets(corpus, amplify, memory_bound_mb << 20)
    all_targets.update(extra or {})
    chosen = {n: all_targets[n] for n in (targets or list(all_targets))}
    counts = allocate(inputs, chosen, minimum)
    harness = Harness(slow_s, alarm_s, trace_every, quiet=quiet)
    harness.total = sum(counts.values())
    t0 = time.perf_counter()
    for name, target in chosen.items():
        rng = random.Random(f"{seed}:{name}")
        harness.run(target, counts[name], rng)
        if not quiet:
            s = harness.stats[name]
            print(
                f"fuzz: {name}: {s.inputs:,} inputs in {s.wall_s:.1f} s, {s.refused:,} refused, {s.accepted:,} accepted, "
                f"{s.findings} findings, max {1e3 * s.max_s:.1f} ms",
                file=sys.stderr,
                flush=True,
            )
    return {
        "seed": seed,
        "inputs": sum(s.inputs for s in harness.stats.values()),
        "wall_s": time.perf_counter() - t0,
        "slow_s": slow_s,
        "alarm_s": alarm_s,
        "trace_every": trace_every,
        "memory_bound_mb": memory_bound_mb,
        "bomb_mb": bomb_mb,
        "amplify": amplify,
        "codec_specs": len(SPECS),
        "targets": {n: {k: v for k, v in vars(s).items()} for n, s in harness.stats.items()},
        "findings": [
            vars(f) for f in sorted(harness.findings.values(), key=lambda f: (f.target, f.kind, f.type, f.where))
        ],
        # ru_maxrss would not do: resetting VmHWM per target resets the kernel's high-water mark it reads
        "peak_rss": max([s.peak_rss for s in harness.stats.values()] + [peak_rss_bytes()]),
    }


# -- report --------------------------------------------------------------------------------
def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def run_details(results: dict, machine: str) -> str:
    """What follows the command in the section's first line."""
    return (
        f"({machine}; {results['wall_s'] / 60:.1f} minutes for {results['inputs']:,} inputs, seed {results['seed']})."
    )


def markdown(results: dict) -> str:
    """The section's body: how inputs are judged, the table per target, the findings."""
    t = results["targets"]
    total_findings = sum(f["count"] for f in results["findings"])
    lines = [
        (
            "Every input runs in one process. A `ProtocolError` is the expected refusal; any other exception, an input "
            f"slower than {results['slow_s']:g} s (an alarm cuts one off at {results['alarm_s']} s), a decode holding more "
            f"than {results['memory_bound_mb']:,} MiB (decoded tensors, or a `B @ A` that `frozen_changes` would allocate), or "
            "a reassembler whose accounting breaks its limits is a finding. Inputs: (a) structure-aware mutations of valid "
            "messages (JSON values replaced by huge, negative or non-finite literals such as `1e999`, nesting up to 100,000 "
            "levels, long strings, wrong types, unknown, missing and repeated fields, 100,000-item lists; envelope headers "
            "mutated and *resealed*, byte counts and body hash recomputed, so decoding reaches the codecs; tensors "
            "re-encoded in another codec or given another shape), (b) byte-level mutations (bit flips, truncation, "
            f"splices, repeated blocks, length words, the header's zlib bit, a zlib bomb of {results['bomb_mb']} MB of "
            "zeros), (c) random bytes; `amplify`: rare valid envelopes whose tensors have the largest shapes a codec "
            f"allows (2^26 values) in the fewest bytes. {results['codec_specs']} codec specs built from the grammar. "
            f"Envelope limits: a MiniLM-like rank-8 adapter (12 modules, A (8, 384), B (384, 8), head (5, 384) and (5,)) "
            "through `EnvelopeLimits.for_update` / `for_global`. Times are wall-clock per input (the parse only, not the "
            "generation). The machine is shared: an input over the slow mark on its first run is timed again and counts "
            'as slow only if the second run is slow too (not for the reassembler, whose inputs change its state); "max '
            'ms" is after that rerun, "first run" before it, and CPU ms is the thread\'s CPU time. '
            f"1 input in {results['trace_every']} runs under tracemalloc for its allocation peak (and is left out of the "
            "times). Peak RSS is the process's VmHWM, reset before each target."
        ),
        "",
        (
            f"| target | inputs | refused (ProtocolError) | accepted | findings | max ms / input | family of the max | "
            f"max ms, first run | max CPU ms | over {results['slow_s']:g} s: first run / rerun | mean µs | "
            "traced peak MiB (family, inputs traced) | peak RSS MiB |"
        ),
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in t.items():
        mean = 1e6 * s["total_s"] / max(1, s["inputs"] - s["traced"])
        lines.append(
            f"| `{name}` | {s['inputs']:,} | {s['refused']:,} | {s['accepted']:,} | {s['findings']:,} | "
            f"{1e3 * s['max_s']:.1f} | {s['max_family']} | {1e3 * s['max_first_s']:.1f} | "
            f"{1e3 * s['max_cpu_s']:.1f} | {s['over_slow_first']:,} / {s['over_slow']:,} | {mean:,.0f} | "
            f"{_mib(s['traced_peak'])} ({s['traced_peak_family']}, {s['traced']:,}) | {_mib(s['peak_rss'])} |"
        )
    total = sum(s["inputs"] for s in t.values())
    lines.append(
        f"| **all** | {total:,} | {sum(s['refused'] for s in t.values()):,} | "
        f"{sum(s['accepted'] for s in t.values()):,} | {total_findings:,} | "
        f"{1e3 * max(s['max_s'] for s in t.values()):.1f} | | {1e3 * max(s['max_first_s'] for s in t.values()):.1f} | "
        f"{1e3 * max(s['max_cpu_s'] for s in t.values()):.1f} | {sum(s['over_slow_first'] for s in t.values()):,} / "
        f"{sum(s['over_slow'] for s in t.values()):,} | | {_mib(max(s['traced_peak'] for s in t.values()))} | "
        f"{_mib(results['peak_rss'])} |"
    )
    lines.append("")
    errors = sum(s["generator_errors"] for s in t.values())
    if errors:
        lines += [f"The generators themselves failed {errors:,} times (those inputs were skipped).", ""]
    if not results["findings"]:
        lines.append(
            "Findings: none (no unexpected exception type, no input over "
            f"{results['slow_s']:g} s, nothing over the memory bound)."
        )
    else:
        lines.append(
            f"Findings: {total_findings:,} inputs in {len(results['findings'])} kinds (target, kind, where; "
            "count; smallest input):"
        )
        lines.append("")
        for f in results["findings"]:
            rep = f["input_repr"] if len(f["input_repr"]) <= 160 else f["input_repr"][:160] + " ..."
            lines.append(
                f"- `{f['target']}` {f['kind']} `{f['type']}` at {f['where']} ({f['count']:,}x, family "
                f"{f['family']}): {f['message'][:200].strip()}; smallest input (of {f['input_len']:,} bytes) "
                f"`` {rep} ``"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--targets", default="", help="comma-separated target names (default: all)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--write-docs", action="store_true", help="write the section of docs/benchmarks.md")
    ap.add_argument("--slow-s", type=float, default=1.0)
    ap.add_argument("--alarm-s", type=int, default=5)
    ap.add_argument("--trace-every", type=int, default=500)
    ap.add_argument("--memory-bound-mb", type=int, default=1024)
    ap.add_argument("--max-memory-gb", type=float, default=8.0, help="address-space limit of this process (0: none)")
    ap.add_argument("--bomb-mb", type=int, default=100)
    ap.add_argument("--no-amplify", action="store_true")
    args = ap.parse_args(argv)

    if args.max_memory_gb:
        limit = int(args.max_memory_gb * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    names = [n for n in args.targets.split(",") if n]
    known = list(make_targets(Corpus()))
    if any(n not in known for n in names):
        ap.error(f"unknown target; choose from {', '.join(known)}")
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    results = run(
        args.inputs,
        args.seed,
        names or None,
        slow_s=args.slow_s,
        alarm_s=args.alarm_s,
        trace_every=args.trace_every,
        memory_bound_mb=args.memory_bound_mb,
        bomb_mb=args.bomb_mb,
        amplify=not args.no_amplify,
    )
    machine = (
        f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load average {load:.1f} at the start, Python {platform.python_version()}, numpy {np.__version__}"
    )
    try:
        machine += f", {os.getloadavg()[0]:.1f} at the end"
    except OSError:
        pass
    results["machine"] = machine
    cmd = command_line("bench/fuzz_bench.py", argv if argv is not None else sys.argv[1:])
    results["command"] = cmd
    if args.out:
        args.out.write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    body, details = markdown(results), run_details(results, machine)
    print(DOC_SECTION.write(cmd, body, details) if args.write_docs else DOC_SECTION.render(cmd, body, details))
    return 1 if results["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
