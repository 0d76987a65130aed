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

Partial (a sharded worker's sealed sums, sent chunked like an envelope)::

    b"FLP1" | u32 header length | header (UTF-8 JSON, ``messages.PartialHeader``) | float64 sums
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import struct
import threading
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from core.codecs import element_count, get_codec
from core.errors import PayloadTooLarge, ProtocolError
from core.lora import A_SUFFIX, lora_pairs
from core.messages import (
    MAX_HEADER_BYTES,
    MAX_MISSING,
    MAX_SHARD_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    RING_CODEC,
    EnvelopeHeader,
    PartialHeader,
    TopicRef,
    parse_header,
    parse_json,
    parse_partial_header,
    parse_topic,
    shard_of,
)

log = logging.getLogger("fedlora.protocol")

ENVELOPE_MAGIC = b"FLE1"
PARTIAL_MAGIC = b"FLP1"
CHUNK_MAGIC = b"FLC1"
CHUNK_HEADER = struct.Struct("<4s16sIIQ")
HEADER_ZLIB = 1 << 31  # flag bit in the header length word
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
            name = key[len(BASE_DELTA_PREFIX) :]
            if np.ndim(value) != 2:
                raise ProtocolError(f"change to {name[:120]} is not a matrix")
            out[name] = np.asarray(value, dtype=np.float32)
    a_names = {k[len(BASE_A_PREFIX) :] for k in tensors if k.startswith(BASE_A_PREFIX)}
    b_names = {k[len(BASE_B_PREFIX) :] for k in tensors if k.startswith(BASE_B_PREFIX)}
    if a_names != b_names:
        raise ProtocolError(f"factored weight changes come in pairs; unpaired: {sorted(a_names ^ b_names)[0]}")
    for name in sorted(a_names):
        a, b = tensors[BASE_A_PREFIX + name], tensors[BASE_B_PREFIX + name]
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
            raise ProtocolError(
                f"change to {name[:120]}: B {tuple(b.shape)} @ A {tuple(a.shape)} is not a matrix product"
            )
        shape = (b.shape[0], a.shape[1])
        if name in out and out[name].shape != shape:
            raise ProtocolError(
                f"change to {name[:120]}: B @ A {shape} disagrees with its dense change {out[name].shape}"
            )
        element_count(shape)  # the product is dense: refuse one beyond any tensor's limit before building it
        product = b.astype(np.float32) @ a.astype(np.float32)
        out[name] = out[name] + product if name in out else product
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

    def shard_update(self, shard: int, device: str) -> str:
        """Where a device of a sharded job (``shards`` > 1) sends its update: its shard's topic."""
        return f"{self.base}/updates/{shard}/{device}"

    def shard_update_filter(self, shard: int) -> str:
        return f"{self.base}/updates/{shard}/+"

    def update_for(self, device: str, shards: int) -> str:
        """A device's update topic under the announced shard count (1: ``updates/<device>``)."""
        return self.update(device) if shards <= 1 else self.shard_update(shard_of(device, shards), device)

    @property
    def shard_plan(self) -> str:
        """The coordinator's plan for its workers (retained): ``messages.ShardPlan``."""
        return f"{self.base}/shards/plan"

    def shard_progress(self, shard: int) -> str:
        return f"{self.base}/shards/progress/{shard}"

    @property
    def shard_progress_filter(self) -> str:
        return f"{self.base}/shards/progress/+"

    def shard_partial(self, shard: int) -> str:
        return f"{self.base}/shards/partial/{shard}"

    @property
    def shard_partial_filter(self) -> str:
        return f"{self.base}/shards/partial/+"

    @property
    def global_all_filter(self) -> str:
        """Every rank's full global adapter chunks (what a sharded worker follows)."""
        return f"{self.base}/global/+/+"

    def status(self, device: str) -> str:
        return f"{self.base}/status/{device}"

    @property
    def status_filter(self) -> str:
        return f"{self.base}/status/+"

    def ack(self, device: str) -> str:
        return f"{self.base}/ack/{device}"

    def secagg(self, device: str) -> str:
        """A device's secure-aggregation messages to the aggregator."""
        return f"{self.base}/secagg/{device}"

    @property
    def secagg_filter(self) -> str:
        return f"{self.base}/secagg/+"

    def secagg_round(self, step: str) -> str:
        """``keys`` or ``unmask``: what every device of a secure round reads (retained)."""
        return f"{self.base}/secagg/round/{step}"

    def secagg_to(self, device: str) -> str:
        """The sealed shares addressed to one device (retained)."""
        return f"{self.base}/secagg/to/{device}"

    def parse(self, topic: str) -> TopicRef:
        """What a topic of this job names (``messages.parse_topic``); ProtocolError otherwise."""
        return parse_topic(topic, self.base)


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
    masked = env.codec == RING_CODEC
    if masked != (env.kind == "masked") or (masked and env.tensor_codecs):
        raise ProtocolError(f"codec {RING_CODEC} is for masked envelopes only, and all of their tensors")
    for name, array in env.tensors.items():
        spec_codec = env.tensor_codecs.get(name, env.codec)
        meta: dict = {}
        if masked:
            data = _ring_words(name, array)
        else:
            data, meta = get_codec(spec_codec).encode(np.asarray(array, dtype=np.float32))
        parts.append(data)
        specs.append(
            {
                "name": name,
                "shape": list(array.shape),
                "dtype": "uint32" if masked else "float32",
                "nbytes": len(data),
                "meta": meta,
                **({"codec": spec_codec} if spec_codec != env.codec else {}),
            }
        )
    body = b"".join(parts)
    header = {
        "v": PROTOCOL_VERSION,
        "kind": env.kind,
        "job": env.job,
        "round": env.round,
        "sender": env.sender,
        "rank": env.rank,
        "codec": env.codec,
        "tensors": specs,
        "num_examples": env.num_examples,
        "metrics": env.metrics,
        "base_version": env.base_version,
        "body_sha256": hashlib.sha256(body).hexdigest(),
    }
    raw = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(f"envelope header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    packed = zlib.compress(raw, 9)
    if len(packed) < len(raw):
        return ENVELOPE_MAGIC + struct.pack("<I", len(packed) | HEADER_ZLIB) + packed + body
    return ENVELOPE_MAGIC + struct.pack("<I", len(raw)) + raw + body


def _ring_words(name: str, array: np.ndarray) -> bytes:
    """A masked tensor's bytes: its uint32 ring words, little-endian (never a float cast)."""
    array = np.asarray(array)
    if array.dtype != np.uint32:
        raise ProtocolError(f"masked tensor {name[:80]} must hold uint32 ring words, not {array.dtype}")
    return np.ascontiguousarray(array, dtype="<u4").tobytes()


def _read_header(payload: bytes) -> tuple[EnvelopeHeader, int]:
    """The envelope's typed header and where the body starts."""
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
    # the header is typed to a fixed depth (tensors -> spec -> shape): no generic depth walk
    return parse_header(parse_json(raw, "envelope header", MAX_HEADER_BYTES, max_depth=None)), 8 + hlen


# Receivers decode against their job's EnvelopeLimits; without them (a trusted payload, a tool),
# an envelope holds at most this many values in all (64 MiB as float32).
UNLIMITED_MAX_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class EnvelopeLimits:
    """What a receiver accepts, checked against the header before any tensor is decoded.

    shapes: tensor name -> its largest shape (the job's adapter at its top rank; frozen-weight
        changes under their prefixes); a tensor must have the same number of dimensions and no
        dimension above these.
    max_elements: the most values all tensors together may decode to.
    """

    shapes: Mapping[str, tuple[int, ...]]
    max_elements: int

    @classmethod
    def for_update(cls, shapes: Mapping[str, tuple[int, ...]]) -> EnvelopeLimits:
        """An update of the adapter whose top-rank shapes are ``shapes``."""
        return cls(dict(shapes), sum(math.prod(s) for s in shapes.values()))

    @classmethod
    def for_global(cls, shapes: Mapping[str, tuple[int, ...]]) -> EnvelopeLimits:
        """A global envelope: the adapter, plus per adapted weight (out x in) a dense change and a
        factored one of rank at most min(out, in)."""
        limits = dict(shapes)
        extra = 0
        for a, b in lora_pairs(shapes):
            base = a[: -len(A_SUFFIX)] + "base_layer.weight"
            out, inp = shapes[b][0], shapes[a][1]
            k = min(out, inp)
            limits[BASE_DELTA_PREFIX + base] = (out, inp)
            limits[BASE_A_PREFIX + base] = (k, inp)
            limits[BASE_B_PREFIX + base] = (out, k)
            extra += out * inp + k * (out + inp)
        return cls(limits, sum(math.prod(s) for s in shapes.values()) + extra)

    def check(self, header: EnvelopeHeader) -> None:
        total = 0
        for spec in header.tensors:
            limit = self.shapes.get(spec.name)
            if limit is None:
                raise ProtocolError(f"tensor {spec.name[:120]} is not part of this job's adapter")
            if len(spec.shape) != len(limit) or any(d > m for d, m in zip(spec.shape, limit)):
                raise ProtocolError(f"tensor {spec.name[:120]} has shape {spec.shape}, beyond {tuple(limit)}")
            total += spec.size
        if total > self.max_elements:
            raise ProtocolError(
                f"envelope decodes to {total} values, more than the {self.max_elements} of this job's adapter"
            )


def decode_envelope(payload: bytes, limits: EnvelopeLimits | None = None, *, reassembled: bool = False) -> Envelope:
    """Parse and check an envelope; raise ProtocolError saying what is wrong.

    Before any tensor is decoded: the header is typed and bounded (``messages.parse_header``),
    ``limits`` (if given) bound names, shapes and the total size, every tensor's byte count is
    at most what its codec can take for its shape, and the byte counts add up to the body.

    ``reassembled``: the payload came out of a ``Reassembler``, which checked the whole
    envelope, header and body, against its message id (sha256); the body's own sha256 would
    check the same bytes again (0.17 ms for a MiniLM update), so it is not computed. A header
    whose ``body_sha256`` is wrong then goes unnoticed, but it came from the sender that
    hashed the whole: neither hash is a signature."""
    if not isinstance(payload, (bytes, bytearray)) or len(payload) < 8 or payload[:4] != ENVELOPE_MAGIC:
        raise ProtocolError("not a fedlora envelope (bad magic)")
    header, body_start = _read_header(payload)
    layout = _layout(header, limits)
    body = memoryview(payload)[body_start:]
    if layout.declared != len(body):
        raise ProtocolError(f"tensors declare {layout.declared} bytes but the body has {len(body)}")
    if not reassembled and hashlib.sha256(body).hexdigest() != header.body_sha256:
        raise ProtocolError("envelope body fails its sha256 check")
    if layout.raw_dtype is not None:
        tensors = _decode_raw(header, layout.raw_dtype, body)
    else:
        tensors = {}
        offset = 0
        for spec, codec in zip(header.tensors, layout.codecs):
            end = offset + spec.nbytes
            if codec is None:
                tensors[spec.name] = np.frombuffer(bytes(body[offset:end]), "<u4").astype(np.uint32).reshape(spec.shape)
            else:
                tensors[spec.name] = codec.decode(bytes(body[offset:end]), {}, spec.shape)
            offset = end
    return Envelope(
        kind=header.kind.value,
        job=header.job,
        round=header.round,
        sender=header.sender,
        rank=header.rank,
        codec=header.codec,
        tensors=tensors,
        num_examples=header.num_examples,
        metrics=dict(header.metrics),
        base_version=header.base_version,
        tensor_codecs={spec.name: spec.codec for spec in header.tensors if spec.codec},
    )


@dataclass(frozen=True)
class _Layout:
    """What an envelope's tensor list was checked to be, before its body is looked at."""

    tensors: tuple  # the TensorSpecs checked (kept: their identity is the memo's key)
    limits: EnvelopeLimits | None
    codecs: list  # per tensor; None in a masked envelope
    declared: int  # body bytes
    raw_dtype: str | None  # every tensor is its values in this dtype (``_decode_raw``)


_LAYOUTS: dict[tuple[int, str, int], _Layout] = {}
_LAYOUTS_LOCK = threading.Lock()


def _layout(header: EnvelopeHeader, limits: EnvelopeLimits | None) -> _Layout:
    """The header-only checks of ``decode_envelope``: ``limits`` on names, shapes and the total,
    and each tensor's byte count against its codec. Remembered for a tensor list the header
    parser handed out before (``messages._tensor_specs`` returns the same tuple for the same
    list), with the same codec and limits: every device of a job sends the same few."""
    key = (id(header.tensors), header.codec, id(limits))
    known = _LAYOUTS.get(key)
    if known is not None and known.tensors is header.tensors and known.limits is limits:
        return known
    if limits is not None:
        limits.check(header)
    elif sum(spec.size for spec in header.tensors) > UNLIMITED_MAX_ELEMENTS:
        raise ProtocolError(f"envelope decodes to more than {UNLIMITED_MAX_ELEMENTS} values")
    masked = header.codec == RING_CODEC  # parse_header: exactly the masked envelopes
    codecs = [None if masked else get_codec(header.codec_of(spec)) for spec in header.tensors]
    for spec, codec in zip(header.tensors, codecs):
        element_count(spec.shape)
        if codec is None:
            if spec.nbytes != 4 * spec.size:
                raise ProtocolError(f"masked tensor {spec.name[:120]} has {spec.nbytes} bytes, not 4 per value")
        elif spec.nbytes > codec.max_nbytes(spec.size):
            raise ProtocolError(
                f"tensor {spec.name[:120]} claims {spec.nbytes} bytes, more than its codec needs for shape {spec.shape}"
            )
    dtypes = {"<u4" if codec is None else codec.raw_dtype for codec in codecs}
    raw = next(iter(dtypes)) if len(dtypes) == 1 else None
    if raw is not None and any(spec.nbytes != np.dtype(raw).itemsize * spec.size for spec in header.tensors):
        raw = None  # a byte count the codec refuses: the per-tensor path says which
    layout = _Layout(header.tensors, limits, codecs, sum(spec.nbytes for spec in header.tensors), raw)
    with _LAYOUTS_LOCK:
        if len(_LAYOUTS) >= 64:
            _LAYOUTS.pop(next(iter(_LAYOUTS)))
        _LAYOUTS[key] = layout
    return layout


def _decode_raw(header: EnvelopeHeader, dtype: str, body: memoryview) -> dict[str, np.ndarray]:
    """A body whose tensors are all their values in ``dtype`` (fp32, or a masked envelope's
    uint32), as views of one array: no copy and one call instead of one per tensor (a MiniLM
    update has 26 tensors). The body is not 4-byte aligned in general (it follows the header),
    which slows a few NumPy paths less than a copy of it would cost."""
    values = np.frombuffer(body, dtype)
    tensors, offset = {}, 0
    for spec in header.tensors:
        tensors[spec.name] = values[offset : offset + spec.size].reshape(spec.shape)
        offset += spec.size
    return tensors


# -- chunking ------------------------------------------------------------------------------
# -- partial sums (sharded aggregation) ----------------------------------------------------
def encode_partial(header: PartialHeader, sums: Mapping[str, np.ndarray]) -> bytes:
    """A worker's sealed partial: the typed header, then each sum as little-endian float64 in
    the header's order (exact: the coordinator adds the very numbers the worker added)."""
    names = [t.name for t in header.tensors]
    if set(names) != set(sums):
        raise ProtocolError("a partial's header must list exactly its sums")
    raw = json.dumps(header.to_json(), allow_nan=False, separators=(",", ":")).encode()
    body = b"".join(np.ascontiguousarray(sums[n], dtype="<f8").tobytes() for n in names)
    return PARTIAL_MAGIC + struct.pack("<I", len(raw)) + raw + body


def decode_partial(payload: bytes, max_values: int) -> tuple[PartialHeader, dict[str, np.ndarray]]:
    """Parse and check a partial: typed header (``messages.parse_partial_header``), at most
    ``max_values`` float64 values in all, a body of exactly their bytes, every value finite."""
    if not isinstance(payload, (bytes, bytearray)) or len(payload) < 8 or payload[:4] != PARTIAL_MAGIC:
        raise ProtocolError("not a fedlora partial (bad magic)")
    (hlen,) = struct.unpack_from("<I", payload, 4)
    if hlen > MAX_SHARD_MESSAGE_BYTES or 8 + hlen > len(payload):
        raise ProtocolError(f"partial header length {hlen} exceeds the payload")
    header = parse_partial_header(parse_json(payload[8 : 8 + hlen], "partial header", MAX_SHARD_MESSAGE_BYTES))
    total = sum(t.size for t in header.tensors)
    if total > max_values:
        raise ProtocolError(f"partial of {total} values exceeds the {max_values} this job's sums may hold")
    body = memoryview(payload)[8 + hlen :]
    if len(body) != 8 * total:
        raise ProtocolError(f"partial body of {len(body)} bytes, its header lists {8 * total}")
    sums, offset = {}, 0
    for t in header.tensors:
        array = np.frombuffer(body, dtype="<f8", count=t.size, offset=offset).reshape(t.shape).astype(np.float64)
        if not np.all(np.isfinite(array)):
            raise ProtocolError(f"partial sum {t.name[:80]} holds non-finite values")
        sums[t.name] = array
        offset += 8 * t.size
    return header, sums


def message_id(payload: bytes) -> bytes:
    return hashlib.sha256(payload).digest()[:16]


def split_chunks(payload: bytes, max_chunk_payload: int) -> list[bytes]:
    """Cut a payload into chunk messages whose data part is at most ``max_chunk_payload`` bytes."""
    if max_chunk_payload < 1:
        raise ProtocolError(f"chunk size must be positive, got {max_chunk_payload}")
    mid = message_id(payload)
    count = max(1, math.ceil(len(payload) / max_chunk_payload))
    return [
        CHUNK_HEADER.pack(CHUNK_MAGIC, mid, i, count, len(payload))
        + payload[i * max_chunk_payload : (i + 1) * max_chunk_payload]
        for i in range(count)
    ]


@dataclass
class Chunk:
    msg_id: bytes
    index: int
    count: int
    total: int
    data: memoryview  # a view of the message: no copy


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
    return Chunk(mid, index, count, total, memoryview(message)[CHUNK_HEADER.size :])


@dataclass
class _Pending:
    chunk_count: int
    total: int
    parts: dict[int, memoryview]
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


class ReassemblyBusy(ProtocolError):
    """The receiver holds as many partial messages (or bytes) as it may: send again later."""


CHUNK_OVERHEAD = 256  # bytes of bookkeeping counted against the limits for every buffered chunk


class Reassembler:
    """Collects chunks per (source, message id); returns a payload once complete and hash-checked.

    Duplicates are ignored and order does not matter. Every limit is per source first, so one
    source cannot take another's room:

    * an announced size above ``max_bytes`` is refused before anything is buffered;
    * a source holds at most ``per_source`` partial messages (a new one drops that source's
      oldest, never another source's);
    * all sources together hold at most ``max_pending`` partial messages and ``max_buffered``
      bytes (chunk data plus ``CHUNK_OVERHEAD`` each); when full, a partial message idle for
      ``evict_idle_s`` makes room, else the new chunk is refused with ``ReassemblyBusy`` (the
      sender retries; nothing of another source is dropped).

    A message resent with another chunk size (the sender reconnected under a different packet
    limit) starts over: its id is its hash, so the bytes are the same. ``stalled`` lists the
    partial messages that stopped growing, with the chunk indices still missing, for a repair.
    """

    def __init__(
        self,
        max_bytes: int,
        max_pending: int = 1024,
        clock=time.monotonic,
        per_source: int = 2,
        max_buffered: int | None = None,
        evict_idle_s: float = 120.0,
    ):
        self.max_bytes = max_bytes
        self.max_pending = max_pending
        self.per_source = per_source
        self.max_buffered = max_buffered if max_buffered is not None else max(4 * max_bytes, 256 << 20)
        self.evict_idle_s = evict_idle_s
        self.clock = clock
        self._pending: dict[tuple[str, bytes], _Pending] = {}
        self._done: dict[tuple[str, bytes], None] = {}
        self.dropped_partials = 0
        self.buffered = 0  # bytes held, overhead included

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
            pending = self._new_partial(key, chunk)
        if chunk.total != pending.total:
            raise ProtocolError(f"chunk {chunk.index} from {source} disagrees with earlier chunks on the message size")
        if chunk.count != pending.chunk_count:
            log.info(
                "message from %s resent in %d chunks instead of %d; starting it over",
                source,
                chunk.count,
                pending.chunk_count,
            )
            self._drop(key)
            pending = self._pending[key] = _Pending(chunk.count, chunk.total, {}, pending.first_seen)
        if chunk.index in pending.parts:
            return None
        cost = len(chunk.data) + CHUNK_OVERHEAD
        while self.buffered + cost > self.max_buffered:
            if not self._evict_idle(exclude=key):
                raise ReassemblyBusy(
                    f"receiver holds {self.buffered} bytes of partial messages; {source} must send again later"
                )
        now = self.clock()
        if pending.parts and pending.requested_at is None:  # the sender's own pace, not a reply's delay
            pending.max_gap = max(pending.max_gap, now - pending.last_seen)
        pending.last_seen = now
        pending.received += len(chunk.data)
        if pending.received > pending.total:
            self._drop(key)
            raise ProtocolError(f"chunks from {source} carry more bytes than the announced {pending.total}")
        pending.parts[chunk.index] = chunk.data
        self.buffered += cost
        if len(pending.parts) < pending.chunk_count:
            return None
        self._drop(key)
        payload = b"".join(pending.parts[i] for i in range(pending.chunk_count))
        if len(payload) != pending.total or message_id(payload) != chunk.msg_id:
            raise ProtocolError(f"reassembled message from {source} fails its hash check")
        self._remember(key)
        return payload

    def _new_partial(self, key: tuple[str, bytes], chunk: Chunk) -> _Pending:
        own = [k for k in self._pending if k[0] == key[0]]
        if len(own) >= self.per_source:
            self._drop(min(own, key=lambda k: self._pending[k].first_seen))
            self.dropped_partials += 1
        elif len(self._pending) >= self.max_pending and not self._evict_idle(exclude=key):
            raise ReassemblyBusy(
                f"receiver holds {len(self._pending)} partial messages; {key[0]} must send again later"
            )
        pending = self._pending[key] = _Pending(chunk.count, chunk.total, {}, self.clock())
        return pending

    def _evict_idle(self, exclude: tuple[str, bytes]) -> bool:
        """Drop the partial message idle longest, if idle for ``evict_idle_s``; True if one went."""
        now = self.clock()
        idle = [
            k
            for k, p in self._pending.items()
            if k != exclude and now - max(p.last_seen, p.first_seen) >= self.evict_idle_s
        ]
        if not idle:
            return False
        self._drop(min(idle, key=lambda k: max(self._pending[k].last_seen, self._pending[k].first_seen)))
        self.dropped_partials += 1
        return True

    def _drop(self, key: tuple[str, bytes]) -> None:
        pending = self._pending.pop(key, None)
        if pending is not None:
            self.buffered -= sum(len(d) + CHUNK_OVERHEAD for d in pending.parts.values())

    def forget(self, source: str, msg_id: bytes) -> None:
        """Take a message out of the delivered set, so an identical resend is reassembled and
        delivered again (the receiver could not act on it the first time)."""
        self._done.pop((source, msg_id), None)

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
            self._drop(k)
        self.dropped_partials += len(keys)
        return len(keys)

    def pending_count(self) -> int:
        return len(self._pending)
