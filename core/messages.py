"""Typed, bounded wire messages: the one parser for every JSON message of protocol v1.

Every JSON payload that crosses MQTT (the round announcement, a device's status, an ack, a
chunk-repair request, an envelope's header) is parsed here into a frozen dataclass, or refused
with a ``ProtocolError`` that says what is wrong. The device and the aggregator both call
these functions; nothing else reads wire JSON.

What "bounded" means: a payload is at most ``max_bytes`` long before anything is decoded; JSON
may nest at most ``MAX_DEPTH`` levels; numbers are finite and in range (``1e999``, ``NaN`` and
``Infinity`` are refused); strings and lists have length caps; objects have exactly the known
fields (an unknown one is refused: a new field needs a new protocol version). Topics are parsed
into a ``TopicRef``, not matched by prefix.
"""

from __future__ import annotations

import builtins
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from core.errors import ProtocolError

PROTOCOL_VERSION = 1
# An announcement of asynchronous rounds (``mode: async``) is version 2: a device that predates
# them refuses it (it would drop a pending update when a newer version is announced, and wait
# for a selection that async rounds do not make), which is the safe failure.
ASYNC_ANNOUNCEMENT_VERSION = 2
ANNOUNCEMENT_VERSIONS = (PROTOCOL_VERSION, ASYNC_ANNOUNCEMENT_VERSION)
MAX_DEPTH = 6
# Status and acks are small; an announcement names every selected device (100k ids of <= 128
# characters fit); an envelope header lists every tensor with its name and shape.
MAX_STATUS_BYTES = 4096
MAX_ACK_BYTES = 64 * 1024
MAX_ANNOUNCEMENT_BYTES = 16 << 20
MAX_HEADER_BYTES = 1 << 20
MAX_SELECTED = 100_000
MAX_MISSING = 1024  # most chunk indices one repair request names
MAX_TENSORS = 10_000
MAX_NAME = 512
MAX_DETAIL = 512
MAX_METRICS = 64
MAX_ROUND = 2**53  # a round id, version or Unix time: exact in a float and in JSON
MAX_EXAMPLES = 10**12  # what a device may claim; the aggregator bounds the weight it gives it
MAX_RANK = 4096
MAX_DIM = 1 << 31
MAX_NBYTES = 1 << 34
DEVICE_ID = re.compile(r"[^/#+\0\s]{1,128}")
JOB_ID = re.compile(r"[^/#+\0\s]{1,128}")
HEX32 = re.compile(r"[0-9a-f]{32}")
HEX64 = re.compile(r"[0-9a-f]{64}")
_DIGITS = re.compile(r"[0-9]{1,9}")  # ASCII only: str.isdigit() also takes '²', which int() refuses


# -- JSON with limits ----------------------------------------------------------------------
def _refuse_constant(name: str) -> Any:
    raise ProtocolError(f"non-finite number {name} in a message")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ProtocolError(f"number {text[:32]} is out of range")
    return value


def _bounded_int(text: str) -> int:
    if len(text) > 20:  # no field takes more than 2**64; Python would parse 4,300 digits
        raise ProtocolError(f"integer of {len(text)} digits is out of range")
    return int(text)


def _depth(value: Any, limit: int) -> None:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                raise ProtocolError(f"message nests deeper than {limit} levels")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


def parse_json(payload: bytes, what: str, max_bytes: int, max_depth: int = MAX_DEPTH) -> dict:
    """``payload`` as a JSON object, refusing oversize, non-UTF-8, non-finite or deep input."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"{what}: payload is not bytes")
    if len(payload) > max_bytes:
        raise ProtocolError(f"{what} of {len(payload)} bytes exceeds {max_bytes}")
    try:
        text = bytes(payload).decode("utf-8")
        obj = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float, parse_int=_bounded_int)
    except RecursionError:
        raise ProtocolError(f"{what} nests too deeply") from None
    except ProtocolError as exc:
        raise ProtocolError(f"{what}: {exc}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"{what} is not JSON ({str(exc)[:120]})") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what} is not a JSON object")
    _depth(obj, max_depth)
    return obj


# -- field readers -------------------------------------------------------------------------
_MISSING = object()


class Fields:
    """Typed reads from one JSON object; ``done()`` refuses fields nobody read."""

    def __init__(self, obj: Any, what: str):
        if not isinstance(obj, dict):
            raise ProtocolError(f"{what} is not an object")
        self.obj, self.what = obj, what
        self.seen: set[builtins.str] = set()

    def _get(self, key: str, default: Any) -> Any:
        self.seen.add(key)
        value = self.obj.get(key, _MISSING)
        if value is _MISSING or (value is None and default is not _MISSING):
            if default is _MISSING:
                raise ProtocolError(f"{self.what}: field {key!r} is missing")
            return default
        return value

    def fail(self, key: str, why: str) -> ProtocolError:
        return ProtocolError(f"{self.what}: field {key!r} {why}")

    def int(self, key: builtins.str, lo: builtins.int, hi: builtins.int, default: Any = _MISSING) -> builtins.int:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"must be an integer, not {type(value).__name__}")
        if not lo <= value <= hi:
            raise self.fail(key, f"= {value} is outside [{lo}, {hi}]")
        return value

    def float(
        self, key: builtins.str, lo: builtins.float, hi: builtins.float, default: Any = _MISSING
    ) -> builtins.float:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(key, f"must be a number, not {type(value).__name__}")
        value = float(value)
        if not (math.isfinite(value) and lo <= value <= hi):
            raise self.fail(key, f"= {value:g} is outside [{lo:g}, {hi:g}]")
        return value

    def bool(self, key: builtins.str, default: Any = _MISSING) -> builtins.bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, not {type(value).__name__}")
        return value

    def str(
        self,
        key: builtins.str,
        max_len: builtins.int,
        default: Any = _MISSING,
        pattern: re.Pattern | None = None,
        choices: tuple[builtins.str, ...] = (),
    ) -> builtins.str:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, str):
            raise self.fail(key, f"must be a string, not {type(value).__name__}")
        if len(value) > max_len:
            raise self.fail(key, f"is {len(value)} characters long (at most {max_len})")
        if choices and value not in choices:
            raise self.fail(key, f"= {value[:40]!r} is not one of {', '.join(choices)}")
        if pattern is not None and not pattern.fullmatch(value):
            raise self.fail(key, f"= {value[:40]!r} is not well formed")
        return value

    def list(
        self,
        key: builtins.str,
        max_items: builtins.int,
        item: Callable[[Any, builtins.str], Any],
        default: Any = _MISSING,
    ) -> tuple:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, list):
            raise self.fail(key, f"must be a list, not {type(value).__name__}")
        if len(value) > max_items:
            raise self.fail(key, f"has {len(value)} items (at most {max_items})")
        return tuple(item(v, f"{self.what}.{key}[{i}]") for i, v in enumerate(value))

    def object(self, key: builtins.str, default: Any = _MISSING) -> Fields | None:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return None
        return Fields(value, f"{self.what}.{key}")

    def done(self) -> None:
        extra = set(self.obj) - self.seen
        if extra:
            raise ProtocolError(f"{self.what}: unknown field {sorted(extra)[0][:40]!r}")


def _int_item(lo: int, hi: int) -> Callable[[Any, str], int]:
    def read(value: Any, what: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ProtocolError(f"{what} must be an integer in [{lo}, {hi}]")
        return value

    return read


def _device_item(value: Any, what: str) -> str:
    if not isinstance(value, str) or not DEVICE_ID.fullmatch(value):
        raise ProtocolError(f"{what} is not a device id")
    return value


def _metrics(fields: Fields | None) -> dict[str, float]:
    """Device-reported numbers: at most MAX_METRICS finite numbers under short names."""
    if fields is None:
        return {}
    if len(fields.obj) > MAX_METRICS:
        raise ProtocolError(f"{fields.what} has {len(fields.obj)} entries (at most {MAX_METRICS})")
    out = {}
    for key in list(fields.obj):
        if not isinstance(key, str) or len(key) > 64:
            raise ProtocolError(f"{fields.what}: metric names are strings of at most 64 characters")
        out[key] = fields.float(key, -1e300, 1e300)
    return out


# -- topics --------------------------------------------------------------------------------
class TopicKind(str, Enum):
    ROUND = "round"
    GLOBAL = "global"
    GDELTA = "gdelta"
    UPDATES = "updates"
    STATUS = "status"
    ACK = "ack"


@dataclass(frozen=True)
class TopicRef:
    """A parsed topic of one job: its kind, and the device or (rank, chunk index) it names."""

    kind: TopicKind
    device: str = ""
    rank: int = 0
    index: int = 0


def parse_topic(topic: str, base: str) -> TopicRef:
    """``fedlora/<job>/<kind>[/...]`` under ``base`` as a TopicRef; ProtocolError otherwise."""
    if not isinstance(topic, str) or len(topic) > 1024 or not topic.startswith(base + "/"):
        raise ProtocolError(f"topic {str(topic)[:80]!r} is not under {base}/")
    parts = topic[len(base) + 1 :].split("/")
    try:
        kind = TopicKind(parts[0])
    except ValueError:
        raise ProtocolError(f"unknown topic kind {parts[0][:40]!r}") from None
    if kind is TopicKind.ROUND and len(parts) == 1:
        return TopicRef(kind)
    if (
        kind in (TopicKind.UPDATES, TopicKind.STATUS, TopicKind.ACK)
        and len(parts) == 2
        and DEVICE_ID.fullmatch(parts[1])
    ):
        return TopicRef(kind, device=parts[1])
    if (
        kind in (TopicKind.GLOBAL, TopicKind.GDELTA)
        and len(parts) == 3
        and all(_DIGITS.fullmatch(p) for p in parts[1:])
    ):
        rank, index = int(parts[1]), int(parts[2])
        if 1 <= rank <= MAX_RANK:
            return TopicRef(kind, rank=rank, index=index)
    raise ProtocolError(f"malformed {kind.value} topic {topic[:120]!r}")


# -- device status -------------------------------------------------------------------------
class Presence(str, Enum):
    """A device's state in its status message."""

    ONLINE = "online"
    OFFLINE = "offline"


@dataclass(frozen=True)
class Status:
    """``status/<device>`` (retained): the device's presence, rank and data size."""

    state: Presence
    rank: int = 0
    num_examples: int = 0
    model_id: str = ""

    def to_bytes(self) -> bytes:
        body: dict = {"state": self.state.value}
        if self.state is Presence.ONLINE:
            body.update(rank=self.rank, num_examples=self.num_examples, model_id=self.model_id)
        return json.dumps(body).encode()


def parse_status(payload: bytes) -> Status:
    f = Fields(parse_json(payload, "status", MAX_STATUS_BYTES), "status")
    status = Status(
        state=Presence(f.str("state", 16, choices=("online", "offline"))),
        rank=f.int("rank", 0, MAX_RANK, 0),
        num_examples=f.int("num_examples", 0, MAX_EXAMPLES, 0),
        model_id=f.str("model_id", 256, ""),
    )
    f.done()
    return status


# -- acks and repair requests --------------------------------------------------------------
class AckResult(str, Enum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    INCOMPLETE = "incomplete"  # a repair request


# Ack reasons that mean "not now": the device keeps its update and sends it again later, and
# the aggregator judges that resend anew.
RETRY_REASONS = ("retry_later",)


@dataclass(frozen=True)
class Ack:
    """``ack/<device>``: the aggregator's answer to one update."""

    round: int | None
    result: AckResult
    reason: str = ""
    detail: str = ""

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "round": self.round,
                "result": self.result.value,
                "reason": self.reason[:64],
                "detail": self.detail[:MAX_DETAIL],
            }
        ).encode()


@dataclass(frozen=True)
class RepairRequest:
    """``ack/<device>`` with result ``incomplete``: resend these chunks of that message."""

    round: int | None
    msg_id: str
    count: int
    missing: tuple[int, ...]

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "round": self.round,
                "result": AckResult.INCOMPLETE.value,
                "msg_id": self.msg_id,
                "count": self.count,
                "missing": list(self.missing),
            }
        ).encode()


def parse_ack(payload: bytes) -> Ack | RepairRequest:
    f = Fields(parse_json(payload, "ack", MAX_ACK_BYTES), "ack")
    rnd = f.int("round", 0, MAX_ROUND, None)
    result = AckResult(f.str("result", 16, choices=tuple(r.value for r in AckResult)))
    msg: Ack | RepairRequest
    if result is AckResult.INCOMPLETE:
        count = f.int("count", 1, 2**32 - 1)
        msg = RepairRequest(
            rnd, f.str("msg_id", 32, pattern=HEX32), count, f.list("missing", MAX_MISSING, _int_item(0, count - 1))
        )
    else:
        msg = Ack(rnd, result, f.str("reason", 64, ""), f.str("detail", MAX_DETAIL, ""))
    f.done()
    return msg


# -- round announcement --------------------------------------------------------------------
class RoundState(str, Enum):
    OPEN = "open"
    WAITING = "waiting"
    FINISHED = "finished"


class RoundMode(str, Enum):
    """``sync``: the selected devices train the announced version, until the round's deadline.
    ``async`` (FedBuff): every device trains whenever it can on the latest version; an update
    stays pending until it is acknowledged (accepted, or rejected as ``too_stale``)."""

    SYNC = "sync"
    ASYNC = "async"


# The strategy settings a device acts on (``device=True`` in a strategy's declaration; see
# ``server.strategies.settings``), each with the bounds a device accepts; the aggregator sends
# those that differ from their default, beside ``name`` and ``trains_a``.
DEVICE_SETTINGS: dict[str, tuple[float, float, float]] = {
    "prune_threshold": (0.0, 1.0, 0.0),  # HetLoRA rank self-pruning (lo, hi, default)
    "fedprox_mu": (0.0, 10.0, 0.0),  # FedProx's proximal weight, every strategy
}


@dataclass(frozen=True)
class StrategyInfo:
    name: str
    trains_a: bool = True
    settings: dict[str, float] = field(default_factory=dict)

    @property
    def prune_threshold(self) -> float:
        return float(self.settings.get("prune_threshold", DEVICE_SETTINGS["prune_threshold"][2]))

    @property
    def fedprox_mu(self) -> float:
        return float(self.settings.get("fedprox_mu", DEVICE_SETTINGS["fedprox_mu"][2]))


@dataclass(frozen=True)
class TrainInfo:
    local_steps: int
    batch_size: int
    lr: float
    lr_rank_power: float = 0.0


@dataclass(frozen=True)
class PrivacyInfo:
    """Client-level differential privacy of an open round (absent: off). The device clips its
    change (after error feedback, before encoding) to L2 norm ``clip``, then adds Gaussian
    noise of std ``noise_std`` per value (0: the aggregator adds it all), and reports in its
    metrics whether the change was within ``clip`` (``dp_below_clip``, 1 or 0)."""

    clip: float
    noise_std: float = 0.0


MAX_CLIP = 1e6
BELOW_CLIP_METRIC = "dp_below_clip"  # the update's metric: 1 if the change was within the clip, else 0


@dataclass(frozen=True)
class Announcement:
    """``round`` (retained): what round is open, for whom, and how to train it."""

    job: str
    state: RoundState
    round: int
    global_version: int
    rank: int
    completed: int = 0
    rounds: int = 0
    deadline: float = 0.0
    selected: tuple[str, ...] = ()
    codec: str = "fp32"
    head_codec: str = ""
    strategy: StrategyInfo | None = None
    train: TrainInfo | None = None
    privacy: PrivacyInfo | None = None
    mode: RoundMode = RoundMode.SYNC
    v: int = PROTOCOL_VERSION

    @property
    def is_open(self) -> bool:
        return self.state is RoundState.OPEN

    @property
    def is_async(self) -> bool:
        return self.mode is RoundMode.ASYNC

    def to_json(self) -> dict:
        body: dict = {
            "v": ASYNC_ANNOUNCEMENT_VERSION if self.is_async else self.v,
            "job": self.job,
            "state": self.state.value,
            "round": self.round,
            "global_version": self.global_version,
            "rank": self.rank,
            "completed": self.completed,
            "rounds": self.rounds,
        }
        if self.is_async:
            body["mode"] = self.mode.value
        if self.is_open:
            assert self.strategy is not None and self.train is not None
            strategy: dict = {"name": self.strategy.name, "trains_a": self.strategy.trains_a, **self.strategy.settings}
            train: dict = {
                "local_steps": self.train.local_steps,
                "batch_size": self.train.batch_size,
                "lr": self.train.lr,
            }
            if self.train.lr_rank_power:
                train["lr_rank_power"] = self.train.lr_rank_power
            body.update(
                deadline=self.deadline,
                selected=list(self.selected),
                codec=self.codec,
                strategy=strategy,
                train=train,
                **({"head_codec": self.head_codec} if self.head_codec else {}),
            )
            if self.privacy is not None:
                body["privacy"] = {"clip": self.privacy.clip, "noise_std": self.privacy.noise_std}
        return body

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), allow_nan=False).encode()


def _codec_spec(value: str, what: str) -> str:
    from core.codecs import get_codec  # codecs import numpy-heavy code; keep this module light

    try:
        get_codec(value)
    except ProtocolError as exc:
        raise ProtocolError(f"{what}: {exc}") from None
    return value


def parse_announcement(payload: bytes) -> Announcement:
    f = Fields(parse_json(payload, "round announcement", MAX_ANNOUNCEMENT_BYTES), "round announcement")
    v = f.int("v", 0, 1 << 16)
    if v not in ANNOUNCEMENT_VERSIONS:
        raise ProtocolError(
            f"round announcement of protocol version {v} (this side speaks {', '.join(map(str, ANNOUNCEMENT_VERSIONS))})"
        )
    mode = RoundMode.SYNC
    if v == ASYNC_ANNOUNCEMENT_VERSION:
        mode = RoundMode(f.str("mode", 16, choices=(RoundMode.ASYNC.value,)))
    common: dict[str, Any] = dict(
        mode=mode,
        job=f.str("job", 128, pattern=JOB_ID),
        state=RoundState(f.str("state", 16, choices=tuple(s.value for s in RoundState))),
        round=f.int("round", 0, MAX_ROUND),
        global_version=f.int("global_version", 0, MAX_ROUND),
        rank=f.int("rank", 1, MAX_RANK),
        completed=f.int("completed", 0, MAX_ROUND, 0),
        rounds=f.int("rounds", 0, MAX_ROUND, 0),
    )
    if common["state"] is not RoundState.OPEN:
        f.done()
        return Announcement(**common)
    s = f.object("strategy")
    t = f.object("train")
    assert s is not None and t is not None
    settings = {key: s.float(key, lo, hi) for key, (lo, hi, _) in DEVICE_SETTINGS.items() if key in s.obj}
    strategy = StrategyInfo(s.str("name", 64), s.bool("trains_a", True), settings)
    s.done()
    train = TrainInfo(
        t.int("local_steps", 1, 1_000_000),
        t.int("batch_size", 1, 65_536),
        t.float("lr", 1e-12, 1.0),
        t.float("lr_rank_power", 0.0, 2.0, 0.0),
    )
    t.done()
    p = f.object("privacy", None)
    privacy = None
    if p is not None:
        privacy = PrivacyInfo(p.float("clip", 1e-12, MAX_CLIP), p.float("noise_std", 0.0, MAX_CLIP, 0.0))
        p.done()
    ann = Announcement(
        **common,
        deadline=f.float("deadline", 0.0, float(MAX_ROUND)),
        selected=f.list("selected", MAX_SELECTED, _device_item),
        codec=_codec_spec(f.str("codec", 80, "fp32"), "announced codec"),
        head_codec=f.str("head_codec", 80, ""),
        strategy=strategy,
        train=train,
        privacy=privacy,
    )
    if ann.head_codec:
        _codec_spec(ann.head_codec, "announced head codec")
    f.done()
    return ann


# -- envelope header -----------------------------------------------------------------------
class EnvelopeKind(str, Enum):
    UPDATE = "update"
    GLOBAL = "global"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    nbytes: int
    codec: str = ""  # empty: the envelope's codec

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class EnvelopeHeader:
    kind: EnvelopeKind
    job: str
    round: int
    sender: str
    rank: int
    codec: str
    tensors: tuple[TensorSpec, ...]
    body_sha256: str
    num_examples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    base_version: int = 0

    def codec_of(self, spec: TensorSpec) -> str:
        return spec.codec or self.codec


def _tensor_spec(value: Any, what: str) -> TensorSpec:
    f = Fields(value, what)
    spec = TensorSpec(
        name=f.str("name", MAX_NAME),
        shape=f.list("shape", 8, _int_item(0, MAX_DIM)),
        nbytes=f.int("nbytes", 0, MAX_NBYTES),
        codec=f.str("codec", 80, ""),
    )
    f.str("dtype", 16, choices=("float32",))
    meta = f.object("meta", {})
    if meta is not None and meta.obj:
        raise ProtocolError(f"{what}.meta must be empty (no codec of protocol v1 uses it)")
    f.done()
    return spec


def parse_header(obj: dict) -> EnvelopeHeader:
    """An envelope header (already limited JSON) as a typed EnvelopeHeader."""
    f = Fields(obj, "envelope header")
    v = f.int("v", 0, 1 << 16)
    if v != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {v} not supported (this side speaks {PROTOCOL_VERSION})")
    kind = EnvelopeKind(f.str("kind", 16, choices=tuple(k.value for k in EnvelopeKind)))
    header = EnvelopeHeader(
        kind=kind,
        job=f.str("job", 128, pattern=JOB_ID),
        round=f.int("round", 0, MAX_ROUND),
        sender=f.str("sender", 128, pattern=DEVICE_ID),
        rank=f.int("rank", 0, MAX_RANK),
        codec=_codec_spec(f.str("codec", 80), "envelope codec"),
        tensors=f.list("tensors", MAX_TENSORS, _tensor_spec),
        body_sha256=f.str("body_sha256", 64, pattern=HEX64),
        num_examples=f.int("num_examples", 0, MAX_EXAMPLES, 0),
        metrics=_metrics(f.object("metrics", {})),
        base_version=f.int("base_version", 0, MAX_ROUND, 0),
    )
    f.done()
    names = set()
    for spec in header.tensors:
        if spec.name in names:
            raise ProtocolError(f"tensor {spec.name[:80]} appears twice")
        names.add(spec.name)
        if spec.codec:
            _codec_spec(spec.codec, f"codec of {spec.name[:80]}")
    return header
