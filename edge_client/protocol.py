"""Protocol v1: topics, the binary envelope, and chunking with reassembly.

See docs/protocol.md for the normative description. Everything here is pure (no sockets),
so the aggregator, the device and the tests drive it directly.

Envelope (one update or one global adapter)::

    b"FLE1" | u32 header length | header (UTF-8 JSON) | body (encoded tensors, back to back)

If bit 31 of the header length is set, the header is zlib-compressed UTF-8 JSON (senders
compress it whenever that is smaller: the tensor names repeat, so ~4 KB become ~0.5 KB, which
matters once a codec has shrunk the body to a few KB). Either way the JSON is at most
``MAX_HEADER_BYTES``.

Chunk (one MQTT message)::

    b"FLC1" | 16-byte message id | u32 index | u32 count | u64 total size | data

The message id is the first 16 bytes of sha256(envelope), so reassembly checks the whole
payload's hash before anything is decoded.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import struct
import time
import zlib
from dataclasses import dataclass, field

import numpy as np

from edge_client.codecs import get_codec
from edge_client.errors import PayloadTooLarge, ProtocolError

log = logging.getLogger("fedlora.protocol")

PROTOCOL_VERSION = 1
ENVELOPE_MAGIC = b"FLE1"
CHUNK_MAGIC = b"FLC1"
CHUNK_HEADER = struct.Struct("<4s16sIIQ")
MAX_HEADER_BYTES = 1 << 20
# Most chunk indices one repair request names; the sender resends those and is asked again.
MAX_MISSING = 1024
HEADER_ZLIB = 1 << 31  # flag bit in the header length word
KINDS = ("update", "global")
# Global envelopes may carry changes to frozen base weights: dense under ``base_delta/<weight>``
# (FLoRA, FedEx-LoRA), or factored as ``base_b/<weight> @ base_a/<weight>`` (flexlora-delta:
# the part of the global adapter beyond the device's rank, LoRA scale included in B). The
# device sets each weight to its checkpoint's original value plus the sum of its changes.
BASE_DELTA_PREFIX = "base_delta/"
BASE_A_PREFIX = "base_a/"
BASE_B_PREFIX = "base_b/"
FROZEN_PREFIXES = (BASE_DELTA_PREFIX, BASE_A_PREFIX, BASE_B_PREFIX)


def adapter_part(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The adapter tensors of a global envelope: everything but changes to frozen weights."""
    return {k: v for k, v in tensors.items() if not k.startswith(FROZEN_PREFIXES)}


def frozen_changes(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Frozen weight name -> its total change (dense ``base_delta/`` plus factored
    ``base_b/ @ base_a/``) in a global envelope; ProtocolError for an unpaired or
    mis-shaped factor."""
    out: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        if key.startswith(BASE_DELTA_PREFIX):
            name = key[len(BASE_DELTA_PREFIX):]
            out[name] = out.get(name, 0) + np.asarray(value, dtype=np.float32)
    a_names = {k[len(BASE_A_PREFIX):] for k in tensors if k.startswith(BASE_A_PREFIX)}
    b_names = {k[len(BASE_B_PREFIX):] for k in tensors if k.startswith(BASE_B_PREFIX)}
    if a_names != b_names:
        raise ProtocolError(f"factored weight changes come in pairs; unpaired: {sorted(a_names ^ b_names)[0]}")
    for name in sorted(a_names):
        a, b = tensors[BASE_A_PREFIX + name], tensors[BASE_B_PREFIX + name]
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
            raise ProtocolError(f"change to {name}: B {tuple(b.shape)} @ A {tuple(a.shape)} is not a matrix product")
        out[name] = out.get(name, 0) + (b.astype(np.float32) @ a.astype(np.float32))
    return out


# -- topics --------------------------------------------------------------------------------
class Topics:
    """All topics of one job live under ``fedlora/<job>/``."""

    def __init__(self, job: str, prefix: str = "fedlora"):
        if not job or any(c in job for c in "/#+\0"):
            raise ProtocolError(f"job id {job!r} must be non-empty and free of '/', '#', '+'")
        self.job = job
        self.base = f"{prefix}/{job}"

    @property
    def round(self) -> str:
        return f"{self.base}/round"

    def global_chunk(self, rank: int, index: int) -> str:
        return f"{self.base}/global/{rank}/{index}"

    def global_filter(self, rank: int) -> str:
        return f"{self.base}/global/{rank}/+"

    def delta_chunk(self, rank: int, index: int) -> str:
        return f"{self.base}/gdelta/{rank}/{index}"

    def delta_filter(self, rank: int) -> str:
        return f"{self.base}/gdelta/{rank}/+"

    def update(self, device: str) -> str:
        return f"{self.base}/updates/{device}"

    @property
    def update_filter(self) -> str:
        return f"{self.base}/updates/+"

    def status(self, device: str) -> str:
        return f"{self.base}/status/{device}"

    @property
    def status_filter(self) -> str:
        return f"{self.base}/status/+"

    def ack(self, device: str) -> str:
        return f"{self.base}/ack/{device}"

    def device_of(self, topic: str) -> str:
        return topic.rsplit("/", 1)[-1]


def check_device_id(device: str) -> str:
    if not device or len(device) > 128 or any(c in device for c in "/#+\0 "):
        raise ProtocolError(f"device id {device!r} must be 1-128 characters without '/', '#', '+' or spaces")
    return device


# -- envelope ------------------------------------------------------------------------------
@dataclass
class Envelope:
    kind: str
    job: str
    round: int
    sender: str
    rank: int
    codec: str
    tensors: dict[str, np.ndarray]
    num_examples: int = 0
    metrics: dict = field(default_factory=dict)
    base_version: int = 0
    tensor_codecs: dict[str, str] = field(default_factory=dict)  # per-tensor exceptions to ``codec``


def encode_envelope(env: Envelope) -> bytes:
    parts, specs = [], []
    for name, array in env.tensors.items():
        spec_codec = env.tensor_codecs.get(name, env.codec)
        data, meta = get_codec(spec_codec).encode(np.asarray(array, dtype=np.float32))
        parts.append(data)
        specs.append({"name": name, "shape": list(array.shape), "dtype": "float32", "nbytes": len(data), "meta": meta,
                      **({"codec": spec_codec} if spec_codec != env.codec else {})})
    body = b"".join(parts)
    header = {
        "v": PROTOCOL_VERSION, "kind": env.kind, "job": env.job, "round": env.round, "sender": env.sender,
        "rank": env.rank, "codec": env.codec, "tensors": specs, "num_examples": env.num_examples,
        "metrics": env.metrics, "base_version": env.base_version, "body_sha256": hashlib.sha256(body).hexdigest(),
    }
    raw = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(f"envelope header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    packed = zlib.compress(raw, 9)
    if len(packed) < len(raw):
        return ENVELOPE_MAGIC + struct.pack("<I", len(packed) | HEADER_ZLIB) + packed + body
    return ENVELOPE_MAGIC + struct.pack("<I", len(raw)) + raw + body


def _read_header(payload: bytes) -> tuple[dict, int]:
    """The envelope's header object and where the body starts."""
    (word,) = struct.unpack_from("<I", payload, 4)
    hlen = word & ~HEADER_ZLIB
    if hlen > MAX_HEADER_BYTES or 8 + hlen > len(payload):
        raise ProtocolError(f"envelope header length {hlen} exceeds the payload")
    raw = payload[8 : 8 + hlen]
    if word & HEADER_ZLIB:
        inflater = zlib.decompressobj()
        try:
            raw = inflater.decompress(raw, MAX_HEADER_BYTES)
        except zlib.error as exc:
            raise ProtocolError(f"envelope header is not valid zlib data ({exc})") from exc
        if inflater.unconsumed_tail or not inflater.eof:
            raise ProtocolError(f"compressed envelope header is truncated or inflates beyond {MAX_HEADER_BYTES} bytes")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"envelope header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise ProtocolError("envelope header is not an object")
    return header, 8 + hlen


def decode_envelope(payload: bytes) -> Envelope:
    """Parse and check an envelope; raise ProtocolError saying what is wrong."""
    if len(payload) < 8 or payload[:4] != ENVELOPE_MAGIC:
        raise ProtocolError("not a fedlora envelope (bad magic)")
    header, body_start = _read_header(payload)
    if header.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {header.get('v')!r} not supported (this side speaks {PROTOCOL_VERSION})")
    body = payload[body_start:]
    try:
        if hashlib.sha256(body).hexdigest() != header["body_sha256"]:
            raise ProtocolError("envelope body fails its sha256 check")
        if header["kind"] not in KINDS:
            raise ProtocolError(f"unknown envelope kind {header['kind']!r}")
        get_codec(header["codec"])  # an unknown spec is refused even with no tensors
        tensors: dict[str, np.ndarray] = {}
        tensor_codecs: dict[str, str] = {}
        offset = 0
        for spec in header["tensors"]:
            shape = tuple(int(d) for d in spec["shape"])
            if any(d < 0 for d in shape):
                raise ProtocolError(f"tensor {spec['name']} has a negative dimension")
            end = offset + int(spec["nbytes"])
            if end > len(body):
                raise ProtocolError(f"tensor {spec['name']} runs past the end of the body")
            if spec["name"] in tensors:
                raise ProtocolError(f"tensor {spec['name']} appears twice")
            if "codec" in spec:
                tensor_codecs[spec["name"]] = spec["codec"]
            tensor_codec = get_codec(tensor_codecs.get(spec["name"], header["codec"]))
            tensors[spec["name"]] = tensor_codec.decode(body[offset:end], spec.get("meta") or {}, shape)
            offset = end
        if offset != len(body):
            raise ProtocolError(f"{len(body) - offset} trailing bytes after the last tensor")
        return Envelope(
            kind=header["kind"], job=str(header["job"]), round=int(header["round"]), sender=str(header["sender"]),
            rank=int(header["rank"]), codec=header["codec"], tensors=tensors,
            num_examples=int(header.get("num_examples", 0)), metrics=dict(header.get("metrics") or {}),
            base_version=int(header.get("base_version", 0)), tensor_codecs=tensor_codecs,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed envelope header ({type(exc).__name__}: {exc})") from exc


# -- chunking ------------------------------------------------------------------------------
def message_id(payload: bytes) -> bytes:
    return hashlib.sha256(payload).digest()[:16]


def split_chunks(payload: bytes, max_chunk_payload: int) -> list[bytes]:
    """Cut a payload into chunk messages whose data part is at most ``max_chunk_payload`` bytes."""
    if max_chunk_payload < 1:
        raise ProtocolError(f"chunk size must be positive, got {max_chunk_payload}")
    mid = message_id(payload)
    count = max(1, math.ceil(len(payload) / max_chunk_payload))
    return [
        CHUNK_HEADER.pack(CHUNK_MAGIC, mid, i, count, len(payload)) + payload[i * max_chunk_payload : (i + 1) * max_chunk_payload]
        for i in range(count)
    ]


@dataclass
class Chunk:
    msg_id: bytes
    index: int
    count: int
    total: int
    data: bytes


def parse_chunk(message: bytes) -> Chunk:
    if len(message) < CHUNK_HEADER.size:
        raise ProtocolError(f"chunk of {len(message)} bytes is shorter than its header")
    magic, mid, index, count, total = CHUNK_HEADER.unpack_from(message)
    if magic != CHUNK_MAGIC:
        raise ProtocolError("not a fedlora chunk (bad magic)")
    if count < 1 or index >= count:
        raise ProtocolError(f"chunk index {index} out of range for count {count}")
    if count > max(1, total):
        raise ProtocolError(f"{count} chunks cannot carry a message of {total} bytes")
    return Chunk(mid, index, count, total, message[CHUNK_HEADER.size :])


@dataclass
class _Pending:
    chunk_count: int
    total: int
    parts: dict[int, bytes]
    first_seen: float
    received: int = 0
    last_seen: float = 0.0  # when the last new chunk arrived
    max_gap: float = 0.0  # the longest wait between two new chunks so far (a slow link's pace)
    requested_at: float | None = None  # when the missing chunks were last asked for


@dataclass
class Stall:
    """A partial message that stopped growing: what to ask its sender for."""

    source: str
    msg_id: bytes
    count: int
    missing: list[int]


class Reassembler:
    """Collects chunks per (source, message id); returns a payload once complete and hash-checked.

    Duplicates are ignored, order does not matter, an announced size above ``max_bytes`` is
    refused before anything is buffered, and at most ``max_pending`` partial messages are
    kept (oldest dropped first) so a flood of first chunks cannot exhaust memory. A message
    resent with another chunk size (the sender reconnected under a different packet limit)
    starts over: its id is its hash, so the bytes are the same. ``stalled`` lists the partial
    messages that stopped growing, with the chunk indices still missing, for a repair request.
    """

    def __init__(self, max_bytes: int, max_pending: int = 64, clock=time.monotonic):
        self.max_bytes = max_bytes
        self.max_pending = max_pending
        self.clock = clock
        self._pending: dict[tuple[str, bytes], _Pending] = {}
        self._done: dict[tuple[str, bytes], None] = {}
        self.dropped_partials = 0

    def add(self, source: str, message: bytes) -> bytes | None:
        chunk = parse_chunk(message)
        key = (source, chunk.msg_id)
        if key in self._done:
            return None  # a duplicate of a message already delivered or refused
        if chunk.total > self.max_bytes:
            self._remember(key)  # refuse the message once, not once per chunk
            raise PayloadTooLarge(f"message of {chunk.total} bytes from {source} exceeds the limit of {self.max_bytes}")
        pending = self._pending.get(key)
        if pending is None:
            if len(self._pending) >= self.max_pending:
                oldest = min(self._pending, key=lambda k: self._pending[k].first_seen)
                del self._pending[oldest]
                self.dropped_partials += 1
            pending = self._pending[key] = _Pending(chunk.count, chunk.total, {}, self.clock())
        if chunk.total != pending.total:
            raise ProtocolError(f"chunk {chunk.index} from {source} disagrees with earlier chunks on the message size")
        if chunk.count != pending.chunk_count:
            log.info("message from %s resent in %d chunks instead of %d; starting it over", source, chunk.count,
                     pending.chunk_count)
            pending = self._pending[key] = _Pending(chunk.count, chunk.total, {}, pending.first_seen)
        if chunk.index in pending.parts:
            return None
        now = self.clock()
        if pending.parts and pending.requested_at is None:  # the sender's own pace, not a reply's delay
            pending.max_gap = max(pending.max_gap, now - pending.last_seen)
        pending.last_seen = now
        pending.received += len(chunk.data)
        if pending.received > pending.total:
            del self._pending[key]
            raise ProtocolError(f"chunks from {source} carry more bytes than the announced {pending.total}")
        pending.parts[chunk.index] = chunk.data
        if len(pending.parts) < pending.chunk_count:
            return None
        del self._pending[key]
        payload = b"".join(pending.parts[i] for i in range(pending.chunk_count))
        if len(payload) != pending.total or message_id(payload) != chunk.msg_id:
            raise ProtocolError(f"reassembled message from {source} fails its hash check")
        self._remember(key)
        return payload

    def _remember(self, key: tuple[str, bytes]) -> None:
        self._done[key] = None
        if len(self._done) > 4096:  # remember recent ids only
            self._done.pop(next(iter(self._done)))

    def stalled(self, idle_s: float, max_missing: int = MAX_MISSING) -> list[Stall]:
        """Partial messages without a new chunk for ``idle_s`` seconds (or three times the longest
        wait between their chunks so far, on a slow link) and not asked for in that time, each
        with (up to ``max_missing`` of) its missing chunk indices; marks them asked."""
        now = self.clock()
        stalls = []
        for (source, mid), p in self._pending.items():
            if now - max(p.last_seen, p.requested_at or 0.0) < max(idle_s, 3 * p.max_gap):
                continue
            p.requested_at = now
            missing = list(itertools.islice((i for i in range(p.chunk_count) if i not in p.parts), max_missing))
            stalls.append(Stall(source, mid, p.chunk_count, missing))
        return stalls

    def drop_source(self, source: str) -> int:
        """Forget partial messages of one source (e.g. its round closed); returns how many."""
        keys = [k for k in self._pending if k[0] == source]
        for k in keys:
            del self._pending[k]
        self.dropped_partials += len(keys)
        return len(keys)

    def pending_count(self) -> int:
        return len(self._pending)
