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

import base64
import builtins
import functools
import hashlib
import json
import math
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from core.errors import ProtocolError

PROTOCOL_VERSION = 1
# An announcement of asynchronous rounds (``mode: async``) is version 2: a device that predates
# them refuses it (it would drop a pending update when a newer version is announced, and wait
# for a selection that async rounds do not make), which is the safe failure.
ASYNC_ANNOUNCEMENT_VERSION = 2
# An announcement of a sharded job (``shards`` > 1: devices send their updates to the topic of
# their shard, ``updates/<shard>/<device>``) is version 3: a device that predates sharding
# refuses it rather than send where no worker listens.
SHARDED_ANNOUNCEMENT_VERSION = 3
ANNOUNCEMENT_VERSIONS = (PROTOCOL_VERSION, ASYNC_ANNOUNCEMENT_VERSION, SHARDED_ANNOUNCEMENT_VERSION)
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
MAX_SHARDS = 256  # aggregator workers of one job
MAX_SHARD_MESSAGE_BYTES = 32 << 20  # a worker's progress or partial header names up to MAX_SELECTED devices
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


def parse_json(payload: bytes, what: str, max_bytes: int, max_depth: int | None = MAX_DEPTH) -> dict:
    """``payload`` as a JSON object, refusing oversize, non-UTF-8, non-finite or deep input.

    ``max_depth=None``: the typed parser that follows bounds the depth itself (every field it
    reads has a fixed type and it refuses unknown fields unread), so the walk over every
    container is skipped; the JSON decoder still refuses input nested beyond its recursion
    limit."""
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
    if max_depth is not None:
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
    SECAGG = "secagg"  # secure aggregation: secagg/<device> up, secagg/round/<step> and secagg/to/<device> down
    SHARDS = "shards"  # sharded aggregation: shards/plan down, shards/progress/<k> and shards/partial/<k> up


class SecaggChannel(str, Enum):
    """Which secure-aggregation topic a ``secagg/...`` topic is."""

    UP = "up"  # secagg/<device>: the device's keys, shares and reveal
    KEYS = "keys"  # secagg/round/keys (retained): the round's key list
    UNMASK = "unmask"  # secagg/round/unmask (retained): survivors and dropped devices
    TO = "to"  # secagg/to/<device> (retained): the sealed shares addressed to that device


class ShardChannel(str, Enum):
    """Which sharded-aggregation topic a ``shards/...`` topic is."""

    PLAN = "plan"  # shards/plan (retained): the coordinator's open or sealed round, to every worker
    PROGRESS = "progress"  # shards/progress/<k>: worker k's updates committed, after each group commit
    PARTIAL = "partial"  # shards/partial/<k>: worker k's sealed partial sums (chunked)


@dataclass(frozen=True)
class TopicRef:
    """A parsed topic of one job: its kind, and the device or (rank, chunk index) it names;
    for ``secagg`` and ``shards`` topics also which one (``channel``); ``shard``: the shard a
    sharded update topic (``updates/<shard>/<device>``) or a worker's topic names (-1: none)."""

    kind: TopicKind
    device: str = ""
    rank: int = 0
    index: int = 0
    channel: SecaggChannel | ShardChannel | None = None
    shard: int = -1


def shard_of(device: str, shards: int) -> int:
    """The shard (0 .. shards - 1) whose worker takes ``device``'s updates: the first 8 bytes of
    sha256 of the device id, big-endian, modulo ``shards``. The same on every device, worker and
    Python (not ``hash()``, which is salted per process), so a resend always reaches the worker
    that took, or refused, the first copy."""
    if not 1 <= shards <= MAX_SHARDS:
        raise ProtocolError(f"shard count {shards} is outside [1, {MAX_SHARDS}]")
    return int.from_bytes(hashlib.sha256(device.encode()).digest()[:8], "big") % shards


def _shard_index(text: str) -> int:
    index = int(text) if _DIGITS.fullmatch(text) else MAX_SHARDS
    if index >= MAX_SHARDS:
        raise ProtocolError(f"shard index {text[:20]!r} is not in [0, {MAX_SHARDS})")
    return index


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
    if kind is TopicKind.UPDATES and len(parts) == 3 and DEVICE_ID.fullmatch(parts[2]):
        return TopicRef(kind, device=parts[2], shard=_shard_index(parts[1]))
    if kind is TopicKind.SHARDS:
        if len(parts) == 2 and parts[1] == ShardChannel.PLAN.value:
            return TopicRef(kind, channel=ShardChannel.PLAN)
        if len(parts) == 3 and parts[1] in (ShardChannel.PROGRESS.value, ShardChannel.PARTIAL.value):
            return TopicRef(kind, channel=ShardChannel(parts[1]), shard=_shard_index(parts[2]))
    if kind is TopicKind.SECAGG:
        if len(parts) == 2 and DEVICE_ID.fullmatch(parts[1]):
            return TopicRef(kind, device=parts[1], channel=SecaggChannel.UP)
        if len(parts) == 3 and parts[1] == "round" and parts[2] in ("keys", "unmask"):
            return TopicRef(kind, channel=SecaggChannel(parts[2]))
        if len(parts) == 3 and parts[1] == "to" and DEVICE_ID.fullmatch(parts[2]):
            return TopicRef(kind, device=parts[2], channel=SecaggChannel.TO)
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


@dataclass(frozen=True)
class SecaggInfo:
    """Secure aggregation in an open round (absent: off). The device advertises its keys on
    ``secagg/<device>`` and, instead of a plain update, sends its change clipped to
    ``[-clip, clip]`` per value, quantized into the ring and masked (a ``masked`` envelope)."""

    clip: float


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
    secagg: SecaggInfo | None = None
    shards: int = 1  # > 1: send updates to ``updates/<shard_of(device, shards)>/<device>`` (version 3)
    v: int = PROTOCOL_VERSION

    @property
    def is_open(self) -> bool:
        return self.state is RoundState.OPEN

    @property
    def is_async(self) -> bool:
        return self.mode is RoundMode.ASYNC

    @property
    def version(self) -> int:
        """The protocol version this announcement needs: 2 for async rounds, 3 for a sharded job."""
        if self.shards > 1:
            return SHARDED_ANNOUNCEMENT_VERSION
        return ASYNC_ANNOUNCEMENT_VERSION if self.is_async else self.v

    def to_json(self) -> dict:
        body: dict = {
            "v": self.version,
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
        if self.shards > 1:
            body["shards"] = self.shards
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
            if self.secagg is not None:
                body["secagg"] = {"clip": self.secagg.clip}
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
    shards = f.int("shards", 2, MAX_SHARDS) if v == SHARDED_ANNOUNCEMENT_VERSION else 1
    common: dict[str, Any] = dict(
        mode=mode,
        shards=shards,
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
    sa = f.object("secagg", None)
    secagg = None
    if sa is not None:
        secagg = SecaggInfo(sa.float("clip", 1e-12, MAX_CLIP))
        sa.done()
    ann = Announcement(
        **common,
        deadline=f.float("deadline", 0.0, float(MAX_ROUND)),
        selected=f.list("selected", MAX_SELECTED, _device_item),
        codec=_codec_spec(f.str("codec", 80, "fp32"), "announced codec"),
        head_codec=f.str("head_codec", 80, ""),
        strategy=strategy,
        train=train,
        privacy=privacy,
        secagg=secagg,
    )
    if ann.head_codec:
        _codec_spec(ann.head_codec, "announced head codec")
    f.done()
    return ann


# -- envelope header -----------------------------------------------------------------------
class EnvelopeKind(str, Enum):
    UPDATE = "update"
    GLOBAL = "global"
    MASKED = "masked"  # secure aggregation's masked input: uint32 ring words, codec RING_CODEC


# The masked input's "codec": each value a little-endian uint32 word of Z_2^32, sent as is. It
# is not a tensor codec (nothing float goes in) and only a ``masked`` envelope may use it.
RING_CODEC = "ring32"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    nbytes: int
    codec: str = ""  # empty: the envelope's codec
    dtype: str = "float32"  # "uint32" in a masked envelope

    @functools.cached_property
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
        dtype=f.str("dtype", 16, choices=("float32", "uint32")),
    )
    meta = f.object("meta", {})
    if meta is not None and meta.obj:
        raise ProtocolError(f"{what}.meta must be empty (no codec of protocol v1 uses it)")
    f.done()
    return spec


# Every device of a job sends the same few tensor lists (one per rank and codec): a list whose
# repr was parsed recently is not parsed again. The repr tells apart what ``==`` would not
# (``true``, ``1`` and ``1.0``), so a cached list is one that passed ``_tensor_spec`` as it is.
# At most 64 lists of at most 256 KiB of repr each are kept (an LLM's list is about 30 KiB).
_SPEC_CACHE: dict[str, tuple[TensorSpec, ...]] = {}
_SPEC_CACHE_LOCK = threading.Lock()
_SPEC_CACHE_SIZE = 64
_SPEC_KEY_MAX = 256 * 1024


def _tensor_specs(f: Fields) -> tuple[TensorSpec, ...]:
    raw = f.obj.get("tensors")
    key = None
    if isinstance(raw, list) and len(raw) <= MAX_TENSORS:
        try:
            key = repr(raw)
        except RecursionError:  # nested past the interpreter's limit: the typed parse refuses it
            key = None
        if key is not None and len(key) > _SPEC_KEY_MAX:
            key = None
    cached = _SPEC_CACHE.get(key) if key is not None else None
    if cached is not None:
        f.seen.add("tensors")
        return cached
    specs = f.list("tensors", MAX_TENSORS, _tensor_spec)
    if key is not None:
        with _SPEC_CACHE_LOCK:
            if len(_SPEC_CACHE) >= _SPEC_CACHE_SIZE:
                _SPEC_CACHE.pop(next(iter(_SPEC_CACHE)))
            _SPEC_CACHE[key] = specs
    return specs


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
        codec=f.str("codec", 80),
        tensors=_tensor_specs(f),
        body_sha256=f.str("body_sha256", 64, pattern=HEX64),
        num_examples=f.int("num_examples", 0, MAX_EXAMPLES, 0),
        metrics=_metrics(f.object("metrics", {})),
        base_version=f.int("base_version", 0, MAX_ROUND, 0),
    )
    f.done()
    masked = kind is EnvelopeKind.MASKED
    if masked != (header.codec == RING_CODEC):
        raise ProtocolError(
            f"a {kind.value} envelope with codec {header.codec[:40]!r} ({RING_CODEC} is for masked ones)"
        )
    if not masked:
        _codec_spec(header.codec, "envelope codec")
    names = set()
    for spec in header.tensors:
        if spec.dtype != ("uint32" if masked else "float32") or (masked and spec.codec):
            raise ProtocolError(f"tensor {spec.name[:80]} of a {kind.value} envelope is {spec.dtype} {spec.codec}")
        if spec.name in names:
            raise ProtocolError(f"tensor {spec.name[:80]} appears twice")
        names.add(spec.name)
        if spec.codec:
            _codec_spec(spec.codec, f"codec of {spec.name[:80]}")
    return header


# -- secure aggregation --------------------------------------------------------------------
# Sizes fixed by core.secagg (a test checks they agree): X25519 keys, sealed share pairs, shares.
SECAGG_KEY_BYTES = 32
SECAGG_SEALED_BYTES = 96
SECAGG_SHARE_BYTES = 34
MAX_SECAGG_PEERS = 1000  # core.secagg.MAX_PEERS: devices in one round's key list
# A device's shares or reveal names each peer once: 1000 x (128-character id + base64) fits.
MAX_SECAGG_BYTES = 512 * 1024
MAX_SECAGG_LIST_BYTES = 1 << 20  # the key list and the survivors: 1000 devices with their keys


class SecaggStep(str, Enum):
    """The messages of one secure-aggregation round (docs/protocol.md), in order."""

    KEYS = "keys"  # device -> aggregator: its two public keys
    KEY_LIST = "key_list"  # aggregator -> devices: the round's devices, their keys, the threshold
    SHARES = "shares"  # device -> aggregator: per peer, its sealed shares
    FORWARD = "forward"  # aggregator -> one device: the sealed shares addressed to it
    UNMASK = "unmask"  # aggregator -> devices: who sent a masked input and who dropped
    REVEAL = "reveal"  # surviving device -> aggregator: per peer, the one share it may reveal


def _b64(value: Any, what: str, nbytes: int) -> bytes:
    """Exactly ``nbytes`` bytes as standard base64 (padded, no whitespace)."""
    if not isinstance(value, str) or len(value) != 4 * ((nbytes + 2) // 3):
        raise ProtocolError(f"{what} must be {nbytes} bytes in base64")
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        raise ProtocolError(f"{what} is not base64") from None
    if len(raw) != nbytes:
        raise ProtocolError(f"{what} must be {nbytes} bytes in base64")
    return raw


def _b64text(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _peer_map(fields: Fields | None, what: str, nbytes: int) -> dict[str, bytes]:
    """``{device id: base64 of nbytes}`` with at most MAX_SECAGG_PEERS entries."""
    if fields is None:
        return {}
    if len(fields.obj) > MAX_SECAGG_PEERS:
        raise ProtocolError(f"{fields.what} names {len(fields.obj)} devices (at most {MAX_SECAGG_PEERS})")
    out = {}
    for key, value in fields.obj.items():
        _device_item(key, f"{fields.what} key {str(key)[:40]!r}")
        out[key] = _b64(value, f"{what} of {key[:40]!r}", nbytes)
    return out


@dataclass(frozen=True)
class SecaggKeys:
    """``secagg/<device>``, step ``keys``: the device's cipher and mask X25519 public keys, and
    the sha256 of its self-mask seed (so the aggregator can tell a seed rebuilt from wrong
    shares: a round then fails instead of releasing a wrong sum)."""

    job: str
    round: int
    sender: str
    cipher: bytes
    mask: bytes
    seed_hash: bytes
    step: SecaggStep = SecaggStep.KEYS

    def to_bytes(self) -> bytes:
        return _secagg_bytes(
            self, cipher=_b64text(self.cipher), mask=_b64text(self.mask), seed_hash=_b64text(self.seed_hash)
        )


@dataclass(frozen=True)
class SecaggShares:
    """``secagg/<device>``, step ``shares``: per peer, the pair of shares sealed for it."""

    job: str
    round: int
    sender: str
    shares: dict[str, bytes]
    step: SecaggStep = SecaggStep.SHARES

    def to_bytes(self) -> bytes:
        return _secagg_bytes(self, shares={k: _b64text(v) for k, v in sorted(self.shares.items())})


@dataclass(frozen=True)
class SecaggReveal:
    """``secagg/<device>``, step ``reveal``: per peer, its share of the peer's self seed (the
    peer survived) or of its mask key (it dropped)."""

    job: str
    round: int
    sender: str
    shares: dict[str, bytes]
    step: SecaggStep = SecaggStep.REVEAL

    def to_bytes(self) -> bytes:
        return _secagg_bytes(self, shares={k: _b64text(v) for k, v in sorted(self.shares.items())})


@dataclass(frozen=True)
class PeerKeys:
    device: str
    cipher: bytes
    mask: bytes


@dataclass(frozen=True)
class SecaggKeyList:
    """``secagg/round/keys`` (retained): the devices whose keys the aggregator took, with them,
    the Shamir threshold and the value clip; these devices are one another's peers."""

    job: str
    round: int
    threshold: int
    clip: float
    devices: tuple[PeerKeys, ...]
    step: SecaggStep = SecaggStep.KEY_LIST

    def to_bytes(self) -> bytes:
        peers = [{"id": p.device, "cipher": _b64text(p.cipher), "mask": _b64text(p.mask)} for p in self.devices]
        return _secagg_bytes(self, threshold=self.threshold, clip=self.clip, devices=peers, with_sender=False)


@dataclass(frozen=True)
class SecaggForward:
    """``secagg/to/<device>`` (retained): the sealed shares addressed to that device, by owner.
    Their owners are the round's masking set: the device masks with exactly these peers."""

    job: str
    round: int
    shares: dict[str, bytes]
    step: SecaggStep = SecaggStep.FORWARD

    def to_bytes(self) -> bytes:
        return _secagg_bytes(self, shares={k: _b64text(v) for k, v in sorted(self.shares.items())}, with_sender=False)


@dataclass(frozen=True)
class SecaggUnmask:
    """``secagg/round/unmask`` (retained): whose masked input counts, and who dropped after the shares."""

    job: str
    round: int
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    step: SecaggStep = SecaggStep.UNMASK

    def to_bytes(self) -> bytes:
        return _secagg_bytes(self, survivors=list(self.survivors), dropped=list(self.dropped), with_sender=False)


SecaggUpload = SecaggKeys | SecaggShares | SecaggReveal


def _secagg_bytes(msg: Any, with_sender: bool = True, **fields: Any) -> bytes:
    body = {"v": PROTOCOL_VERSION, "step": msg.step.value, "job": msg.job, "round": msg.round}
    if with_sender:
        body["sender"] = msg.sender
    body.update(fields)
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()


def _secagg_fields(
    payload: bytes, what: str, max_bytes: int, only: tuple[SecaggStep, str] | None = None
) -> tuple[Fields, SecaggStep, str, int]:
    """The fields every secagg message has; ``only``: the one step a topic carries, and where."""
    f = Fields(parse_json(payload, what, max_bytes), what)
    v = f.int("v", 0, 1 << 16)
    if v != PROTOCOL_VERSION:
        raise ProtocolError(f"{what} of protocol version {v} (this side speaks {PROTOCOL_VERSION})")
    step = SecaggStep(f.str("step", 16, choices=tuple(s.value for s in SecaggStep)))
    if only is not None and step is not only[0]:
        raise ProtocolError(f"a {step.value} message on {only[1]}")
    return f, step, f.str("job", 128, pattern=JOB_ID), f.int("round", 0, MAX_ROUND)


def parse_secagg_upload(payload: bytes) -> SecaggUpload:
    """A device's message on ``secagg/<device>``: its keys, its sealed shares or its reveal."""
    f, step, job, rnd = _secagg_fields(payload, "secagg message", MAX_SECAGG_BYTES)
    sender = f.str("sender", 128, pattern=DEVICE_ID)
    msg: SecaggUpload
    if step is SecaggStep.KEYS:
        msg = SecaggKeys(
            job,
            rnd,
            sender,
            _b64(f.str("cipher", 64), "cipher key", SECAGG_KEY_BYTES),
            _b64(f.str("mask", 64), "mask key", SECAGG_KEY_BYTES),
            _b64(f.str("seed_hash", 64), "seed hash", SECAGG_KEY_BYTES),
        )
    elif step is SecaggStep.SHARES:
        msg = SecaggShares(job, rnd, sender, _peer_map(f.object("shares"), "sealed shares", SECAGG_SEALED_BYTES))
    elif step is SecaggStep.REVEAL:
        msg = SecaggReveal(job, rnd, sender, _peer_map(f.object("shares"), "revealed share", SECAGG_SHARE_BYTES))
    else:
        raise ProtocolError(f"secagg step {step.value!r} is the aggregator's, not a device's")
    f.done()
    return msg


def parse_secagg_key_list(payload: bytes) -> SecaggKeyList:
    """``secagg/round/keys``: the round's devices and keys; each device once."""
    f, _, job, rnd = _secagg_fields(
        payload, "secagg key list", MAX_SECAGG_LIST_BYTES, (SecaggStep.KEY_LIST, "the key list topic")
    )

    def peer(value: Any, what: str) -> PeerKeys:
        p = Fields(value, what)
        keys = PeerKeys(
            p.str("id", 128, pattern=DEVICE_ID),
            _b64(p.str("cipher", 64), f"{what}.cipher", SECAGG_KEY_BYTES),
            _b64(p.str("mask", 64), f"{what}.mask", SECAGG_KEY_BYTES),
        )
        p.done()
        return keys

    devices = f.list("devices", MAX_SECAGG_PEERS, peer)
    ids = [d.device for d in devices]
    if len(set(ids)) != len(ids):
        raise ProtocolError("secagg key list names a device twice")
    threshold = f.int("threshold", 2, MAX_SECAGG_PEERS)
    if threshold > len(devices):
        raise ProtocolError(f"secagg threshold {threshold} exceeds the {len(devices)} devices of the key list")
    msg = SecaggKeyList(job, rnd, threshold, f.float("clip", 1e-12, MAX_CLIP), devices)
    f.done()
    return msg


def parse_secagg_forward(payload: bytes) -> SecaggForward:
    """``secagg/to/<device>``: the sealed shares addressed to that device."""
    f, _, job, rnd = _secagg_fields(
        payload, "secagg forward", MAX_SECAGG_BYTES, (SecaggStep.FORWARD, "a forward topic")
    )
    msg = SecaggForward(job, rnd, _peer_map(f.object("shares"), "sealed shares", SECAGG_SEALED_BYTES))
    f.done()
    return msg


def parse_secagg_unmask(payload: bytes) -> SecaggUnmask:
    """``secagg/round/unmask``: survivors and dropped devices, disjoint."""
    f, _, job, rnd = _secagg_fields(
        payload, "secagg unmask request", MAX_SECAGG_LIST_BYTES, (SecaggStep.UNMASK, "the unmask topic")
    )
    msg = SecaggUnmask(
        job,
        rnd,
        f.list("survivors", MAX_SECAGG_PEERS, _device_item),
        f.list("dropped", MAX_SECAGG_PEERS, _device_item),
    )
    f.done()
    named = msg.survivors + msg.dropped
    if len(set(named)) != len(named):
        raise ProtocolError("secagg unmask request names a device twice (or both surviving and dropped)")
    return msg


# -- sharded aggregation: coordinator <-> workers ------------------------------------------
class PlanState(str, Enum):
    """What the coordinator asks of its workers for ``ShardPlan.round``."""

    OPEN = "open"  # take the round's updates from the devices of your shard
    SEAL = "seal"  # stop taking them, and publish your partial sums (again, if asked again)
    FINISHED = "finished"  # the job is done: exit (or idle) like the coordinator


@dataclass(frozen=True)
class ShardPlan:
    """``shards/plan`` (retained): the round the workers take updates for, with the bounds the
    coordinator fixed when it opened (each worker judges updates exactly as one aggregator would)."""

    job: str
    state: PlanState
    round: int
    shards: int
    base_version: int = 0
    selected: tuple[str, ...] = ()
    max_weight: int = 0
    max_norm: float = 0.0
    opened_at: float = 0.0
    deadline: float = 0.0

    def to_bytes(self) -> bytes:
        body = {
            "v": PROTOCOL_VERSION,
            "job": self.job,
            "state": self.state.value,
            "round": self.round,
            "shards": self.shards,
            "base_version": self.base_version,
            "selected": list(self.selected),
            "max_weight": self.max_weight,
            "max_norm": self.max_norm,
            "opened_at": self.opened_at,
            "deadline": self.deadline,
        }
        return json.dumps(body, allow_nan=False).encode()


def _version_1(f: Fields, what: str) -> None:
    v = f.int("v", 0, 1 << 16)
    if v != PROTOCOL_VERSION:
        raise ProtocolError(f"{what} of protocol version {v} (this side speaks {PROTOCOL_VERSION})")


def parse_shard_plan(payload: bytes) -> ShardPlan:
    f = Fields(parse_json(payload, "shard plan", MAX_SHARD_MESSAGE_BYTES), "shard plan")
    _version_1(f, "shard plan")
    plan = ShardPlan(
        job=f.str("job", 128, pattern=JOB_ID),
        state=PlanState(f.str("state", 16, choices=tuple(s.value for s in PlanState))),
        round=f.int("round", 0, MAX_ROUND),
        shards=f.int("shards", 1, MAX_SHARDS),
        base_version=f.int("base_version", 0, MAX_ROUND),
        selected=f.list("selected", MAX_SELECTED, _device_item),
        max_weight=f.int("max_weight", 0, MAX_EXAMPLES),
        max_norm=f.float("max_norm", 0.0, 1e300),
        opened_at=f.float("opened_at", 0.0, float(MAX_ROUND)),
        deadline=f.float("deadline", 0.0, float(MAX_ROUND)),
    )
    f.done()
    return plan


@dataclass(frozen=True)
class ShardAccepted:
    """One update a worker committed: its device, the weight it counts with, its norm as sent;
    in a sealed partial also what the coordinator's round history reports of it: its bytes on
    the wire and decoded, and the device's own metrics (empty after a worker restarted)."""

    device: str
    weight: int
    norm: float
    wire_bytes: int = 0
    raw_bytes: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict)

    def to_json(self) -> list:
        short = [self.device, self.weight, self.norm]
        if not (self.wire_bytes or self.raw_bytes or self.metrics):
            return short
        return [*short, self.wire_bytes, self.raw_bytes, dict(self.metrics)]


def _accepted_item(value: Any, what: str) -> ShardAccepted:
    if not isinstance(value, list) or len(value) not in (3, 6):
        raise ProtocolError(f"{what} must be [device, weight, norm] or [device, weight, norm, wire, raw, metrics]")
    device, weight, norm = value[:3]
    if not isinstance(device, str) or not DEVICE_ID.fullmatch(device):
        raise ProtocolError(f"{what}: not a device id")
    if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= MAX_EXAMPLES:
        raise ProtocolError(f"{what}: weight must be an integer in [0, {MAX_EXAMPLES}]")
    if isinstance(norm, bool) or not isinstance(norm, (int, float)) or not 0 <= norm <= 1e300:
        raise ProtocolError(f"{what}: norm must be a number in [0, 1e300]")
    if len(value) == 3:
        return ShardAccepted(device, weight, float(norm))
    wire, raw, metrics = value[3:]
    for name, count in (("wire", wire), ("raw", raw)):
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_NBYTES:
            raise ProtocolError(f"{what}: {name} bytes must be an integer in [0, {MAX_NBYTES}]")
    return ShardAccepted(device, weight, float(norm), wire, raw, _metrics(Fields(metrics, f"{what} metrics")))


@dataclass(frozen=True)
class ShardProgress:
    """``shards/progress/<k>``: the updates worker ``shard`` committed (and acknowledged) in one
    group commit; the coordinator decides when the round closes from these, as from its own."""

    job: str
    shard: int
    round: int
    accepted: tuple[ShardAccepted, ...]

    def to_bytes(self) -> bytes:
        body = {
            "v": PROTOCOL_VERSION,
            "job": self.job,
            "shard": self.shard,
            "round": self.round,
            "accepted": [a.to_json() for a in self.accepted],
        }
        return json.dumps(body, allow_nan=False).encode()


def parse_shard_progress(payload: bytes) -> ShardProgress:
    f = Fields(parse_json(payload, "shard progress", MAX_SHARD_MESSAGE_BYTES), "shard progress")
    _version_1(f, "shard progress")
    msg = ShardProgress(
        job=f.str("job", 128, pattern=JOB_ID),
        shard=f.int("shard", 0, MAX_SHARDS - 1),
        round=f.int("round", 0, MAX_ROUND),
        accepted=f.list("accepted", MAX_SELECTED, _accepted_item),
    )
    f.done()
    return msg


@dataclass(frozen=True)
class PartialTensor:
    """One float64 sum of a partial: its key (a tensor name or a strategy's ``module:what``) and shape."""

    name: str
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def _partial_tensor(value: Any, what: str) -> PartialTensor:
    f = Fields(value, what)
    spec = PartialTensor(f.str("name", MAX_NAME), f.list("shape", 8, _int_item(0, MAX_DIM)))
    f.done()
    return spec


@dataclass(frozen=True)
class PartialHeader:
    """The header of worker ``shard``'s sealed partial of ``round`` (``shards/partial/<k>``):
    ``Partial.weight`` and ``count``, every update it holds (``accepted``, in the order they were
    added), and its sums' keys and shapes, in the order of the float64 body."""

    job: str
    shard: int
    round: int
    weight: float
    count: int
    accepted: tuple[ShardAccepted, ...]
    tensors: tuple[PartialTensor, ...]

    def to_json(self) -> dict:
        return {
            "v": PROTOCOL_VERSION,
            "job": self.job,
            "shard": self.shard,
            "round": self.round,
            "weight": self.weight,
            "count": self.count,
            "accepted": [a.to_json() for a in self.accepted],
            "tensors": [{"name": t.name, "shape": list(t.shape)} for t in self.tensors],
        }


def parse_partial_header(obj: dict) -> PartialHeader:
    """A partial's header (already limited JSON) as a typed PartialHeader; its counts must agree."""
    f = Fields(obj, "partial header")
    _version_1(f, "partial header")
    header = PartialHeader(
        job=f.str("job", 128, pattern=JOB_ID),
        shard=f.int("shard", 0, MAX_SHARDS - 1),
        round=f.int("round", 0, MAX_ROUND),
        weight=f.float("weight", 0.0, float(MAX_EXAMPLES) * MAX_SELECTED),
        count=f.int("count", 0, MAX_SELECTED),
        accepted=f.list("accepted", MAX_SELECTED, _accepted_item),
        tensors=f.list("tensors", MAX_TENSORS, _partial_tensor),
    )
    f.done()
    if header.count != len(header.accepted):
        raise ProtocolError(f"partial header: count {header.count} but {len(header.accepted)} updates listed")
    if header.weight != sum(a.weight for a in header.accepted):
        raise ProtocolError(f"partial header: weight {header.weight:g} is not the sum of its updates' weights")
    if len({a.device for a in header.accepted}) != len(header.accepted):
        raise ProtocolError("partial header: a device is listed twice")
    if len({t.name for t in header.tensors}) != len(header.tensors):
        raise ProtocolError("partial header: a sum is listed twice")
    return header
