"""Aggregator state on disk: a SIGKILL or a power cut at any instant leaves the last commit.

``state.db`` (SQLite, WAL journal, ``synchronous=FULL``) holds the round counters, the
history, the global adapter, ``base_delta``, the server optimizer's state (its step count and
moments, ``server.strategies.server_optimizer``), the open round and its partial sums. Every
``save`` and every ``append`` is one transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``): the
commit is the single point at which the new state replaces the old, so a crash anywhere before
it leaves the previous state and anywhere after it the new one, never a mix. Arrays are stored
as dtype, shape and raw bytes (never pickled); the global adapter, ``base_delta`` and the
optimizer state are rewritten only when given, the partial sums on every save, and the history
and other values only when they changed.

Accepted updates: checkpoint plus log. An update is committed before it is acknowledged, and a
commit must cost what its updates cost, not what the state and the round's device list cost.
``append`` commits a batch of accepted updates of the open round: a row of ``updates`` each (its
place in the round, device, weight, norm, metrics) and either a row of ``update_tensors`` each
(the tensors exactly as the strategy accumulated them) or, when the caller passes the round's
partial, a checkpoint of the sums instead (with ``through``, the updates they hold): O(min(batch,
model)) bytes, never the O(devices) open round. Tensor rows a checkpoint holds are deleted a few
per commit. ``save`` writes everything, the open round with its accepted set included, and
drops the rows it covers. ``load`` returns the open round as of the sums' checkpoint (the
``updates`` rows it holds merged into ``accepted`` and ``norms``) and, in ``replay``, the updates
after it in order; ``load(strategy=...)`` (or ``Coordinator.resume``) adds them to the round
again, which gives the same sums in the same order of additions. So the state after a crash is
the state of the last commit, whichever kind it was.

The open round is stored field by field from ``dataclasses.fields(OpenRound)`` (all but
``partial``, which is stored as its ``sums`` in float64 plus ``weight``, ``count``, ``through``
and ``devices``): a field added to ``OpenRound`` with a default round-trips with no change here,
and a field missing from an older database takes its default.

Fencing. The database holds a *term*. ``claim_term()`` increments it atomically and makes
this instance write under the new term; a store constructed with ``term=N`` writes under
``N``; any other store writes under the term stored when it was constructed (0 in a new
database). Every ``save`` compares, inside its transaction, the stored term with its own:
if the stored term is newer (another aggregator claimed leadership since), it raises
``StaleTerm`` and writes nothing; if its own is newer (an explicit ``term``), it stores it.
So a deposed leader that still runs can never overwrite its successor's state. The event
log is not fenced.

Failures. A write that fails (disk full, I/O error, read-only file system, database locked
beyond ``busy_timeout``) is rolled back, leaving the committed state as it was, and raised
as ``StoreUnavailable``; ``healthy()`` reports the last such failure until a write succeeds.

``events.jsonl`` (appended, one JSON object a line: every update accepted or rejected, with
the reason) lives beside the database. String values longer than 512 characters are cut
(``"…(N chars)"`` appended), a record is at most 4 KiB (fields that do not fit are dropped and
``truncated`` holds how many), and a file that would grow past ``max_event_bytes`` is rotated
to ``events.jsonl.1`` (older ones to ``.2`` ... ``.keep``). ``events()`` reads them oldest
first, skipping lines that do not parse (a line torn by a crash).

Crash tests: ``FEDLORA_FAULT_POINT`` (see ``edge_client.device_state.FaultInjector``) names
one of ``FAULT_POINTS`` at which the process SIGKILLs itself (``save:before_commit@3``: the
third time). ``event:write`` kills halfway through writing the line.

A directory written by an older fedlora (``state.json``, ``global.npz`` and optionally
``base_delta.npz`` and ``partial.npz``) and no committed state in the database is imported
into the database once, when the store is opened; the old files are left as they were.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import FedloraError
from edge_client.device_state import FAULT_POINT_ENV, FaultInjector, fsync_dir
from server.rounds import Accepted, Coordinator, OpenRound, RoundSettings
from server.strategies.base import ClientUpdate, Partial, Strategy

__all__ = ["FAULT_POINTS", "FAULT_POINT_ENV", "STATE_FORMAT", "StaleTerm", "StateStore", "StoreUnavailable"]

log = logging.getLogger(__name__)

STATE_FORMAT = 3  # 1: state.json + npz files (imported on open); 2: no update log (upgraded on open)
DB_NAME = "state.db"
FAULT_POINTS = ("save:begin", "save:arrays", "save:before_commit", "save:after_commit", "event:write")
EVENT_STRING_LIMIT = 512
EVENT_RECORD_LIMIT = 4096

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value)",
    "CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS arrays (kind TEXT NOT NULL, name TEXT NOT NULL, dtype TEXT NOT NULL, "
    "shape TEXT NOT NULL, data BLOB NOT NULL, UNIQUE (kind, name))",
    "CREATE TABLE IF NOT EXISTS updates (round INTEGER NOT NULL, seq INTEGER NOT NULL, device TEXT NOT NULL, "
    "rank INTEGER NOT NULL, weight INTEGER NOT NULL, norm REAL NOT NULL, metrics TEXT NOT NULL, "
    "PRIMARY KEY (round, seq))",
    "CREATE TABLE IF NOT EXISTS update_tensors (round INTEGER NOT NULL, seq INTEGER NOT NULL, "
    "layout TEXT NOT NULL, data BLOB NOT NULL, PRIMARY KEY (round, seq))",
)


class StaleTerm(FedloraError):
    """Another store claimed a newer term: this one is no longer the leader and must not write."""

    def __init__(self, path: Path, term: int, stored: int):
        super().__init__(
            f"{path}: term {stored} was claimed by another aggregator; this one (term {term}) "
            "is no longer the leader and wrote nothing"
        )
        self.term = term
        self.stored = stored


class StoreUnavailable(FedloraError):
    """The state directory cannot be written (or read): disk full, I/O error, read-only."""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _dumps(value) -> str:
    return json.dumps(value, default=_json_default, separators=(",", ":"))


def _encode_array(name: str, value, dtype=None) -> tuple[str, str, bytes]:
    arr = np.asarray(value, dtype=dtype)
    if arr.dtype.hasobject:
        raise ValueError(f"array {name!r}: object arrays cannot be stored")
    return arr.dtype.str, _dumps(list(arr.shape)), arr.tobytes()


def _decode_array(dtype: str, shape: str, blob: bytes) -> np.ndarray:
    dt = np.dtype(dtype)
    if dt.hasobject:
        raise ValueError(f"refusing to load an object array ({dtype})")
    return np.frombuffer(blob, dtype=dt).reshape(tuple(json.loads(shape))).copy()  # writable, not the blob


def _update_row(round_id: int, record: Accepted) -> tuple:
    """A row of ``updates``: the update's place in the round and what it counted for."""
    u = record.update
    return (
        int(round_id),
        int(record.seq),
        u.device,
        int(u.rank),
        int(u.num_examples),
        float(record.norm),
        _dumps(u.metrics),
    )


def _tensors_row(round_id: int, record: Accepted) -> tuple:
    """A row of ``update_tensors``: the update's tensors as one blob, laid out by name, dtype and shape."""
    layout, blobs = [], []
    for name, value in record.update.tensors.items():
        dtype, shape, data = _encode_array(name, value)
        layout.append([name, dtype, json.loads(shape)])
        blobs.append(data)
    return int(round_id), int(record.seq), _dumps(layout), b"".join(blobs)


def _decode_update(round_id: int, row: tuple, stored: tuple[str, bytes] | None) -> Accepted:
    seq, device, rank, weight, norm, metrics = row
    layout, data = stored if stored is not None else ("[]", b"")
    tensors, offset = {}, 0
    for name, dtype, shape in json.loads(layout):
        dt = np.dtype(dtype)
        if dt.hasobject:
            raise ValueError(f"refusing to load an object array ({dtype})")
        count = int(np.prod(shape, dtype=np.int64))
        tensors[name] = np.frombuffer(data, dtype=dt, count=count, offset=offset).reshape(shape).copy()
        offset += count * dt.itemsize
    if offset != len(data):
        raise ValueError(f"update {seq} of round {round_id}: {len(data)} bytes stored, its layout says {offset}")
    update = ClientUpdate(device, int(round_id), int(rank), int(weight), tensors, json.loads(metrics))
    return Accepted(int(seq), update, float(norm))


def _sums_row(partial: Partial, through: int) -> dict:
    """The partial's scalars beside its sums: O(1); ``through``: the updates the sums hold."""
    return {"weight": float(partial.weight), "count": int(partial.count), "through": int(through)}


def _round_to_json(rnd: OpenRound) -> dict:
    return {f.name: getattr(rnd, f.name) for f in dataclasses.fields(OpenRound) if f.name != "partial"}


def _round_from_json(data: dict, partial: Partial) -> OpenRound:
    kwargs: dict[str, Any] = {}
    later: dict[str, Any] = {}
    for f in dataclasses.fields(OpenRound):
        if f.name == "partial":
            continue
        if f.name in data:
            (kwargs if f.init else later)[f.name] = data[f.name]
        elif f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ValueError(f"the saved open round lacks its required field {f.name!r}")
    rnd = OpenRound(**kwargs, partial=partial)
    for name, value in later.items():
        setattr(rnd, name, value)
    return rnd


def _load_legacy(root: Path) -> dict | None:
    """A state written by fedlora's file store (format 1), in ``save``'s terms; None if there is none."""
    state_path = root / "state.json"
    if not state_path.is_file():
        return None

    def arrays(path: Path) -> dict[str, np.ndarray]:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}

    state = json.loads(state_path.read_text(encoding="utf-8"))
    if state.get("format") != 1:
        raise ValueError(f"{state_path}: unsupported state format {state.get('format')!r}")
    if not (root / "global.npz").is_file():
        raise ValueError(f"{state_path}: its global adapter {root / 'global.npz'} is missing")
    base_delta_path, partial_path = root / "base_delta.npz", root / "partial.npz"
    open_round = None
    if state.get("open_round"):
        o = state["open_round"]
        partial = Partial(weight=o["partial_weight"], count=len(o["accepted"]), devices=list(o["accepted"]))
        if partial_path.is_file() and o["accepted"]:
            partial.sums = {k: v.astype(np.float64) for k, v in arrays(partial_path).items()}
        open_round = OpenRound(
            round=o["round"],
            selected=o["selected"],
            opened_at=o["opened_at"],
            deadline=o["deadline"],
            base_version=o["base_version"],
            accepted=dict(o["accepted"]),
            partial=partial,
        )
    return {
        "job": state["job"],
        "next_round": state["next_round"],
        "completed": state["completed"],
        "version": state["version"],
        "history": state["history"],
        "global_adapter": arrays(root / "global.npz"),
        "base_delta": arrays(base_delta_path) if base_delta_path.is_file() else {},
        "open_round": open_round,
    }


def _clip_strings(value):
    if isinstance(value, str):
        if len(value) > EVENT_STRING_LIMIT:
            return value[:EVENT_STRING_LIMIT] + f"…({len(value)} chars)"
        return value
    if isinstance(value, dict):
        return {str(k): _clip_strings(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clip_strings(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _event_default(value):
    try:
        return _clip_strings(_json_default(value))
    except TypeError:
        return _clip_strings(str(value))  # an event is never refused for its contents


def _event_dumps(record: dict) -> str:
    return json.dumps(record, default=_event_default)


def _cap_record(record: dict) -> tuple[dict, str]:
    """``record`` and its JSON line, at most EVENT_RECORD_LIMIT bytes: fields that do not fit are
    dropped (``time`` and ``event`` always stay) and ``truncated`` counts them."""
    line = _event_dumps(record)
    if len(line.encode("utf-8")) <= EVENT_RECORD_LIMIT:
        return record, line
    fixed = ("time", "event")
    kept = {k: record[k] for k in fixed if k in record}
    budget = EVENT_RECORD_LIMIT - len(_event_dumps({**kept, "truncated": 10**6}).encode("utf-8"))
    dropped = 0
    for key, value in record.items():
        if key in fixed or key == "truncated":
            continue
        piece = len(_event_dumps({key: value}).encode("utf-8"))  # '"k": v' and its ', ' (the braces' length)
        if piece <= budget:
            kept[key] = value
            budget -= piece
        else:
            dropped += 1
    kept["truncated"] = max(dropped, 1)
    return kept, _event_dumps(kept)


class StateStore:
    """The aggregator's persistent state in ``root`` (see the module docstring).

    term: write under this fencing term (default: the one stored now; ``claim_term`` for a new one).
    max_event_bytes: ``events.jsonl`` is rotated before it grows past this size.
    keep: rotated event files kept (``events.jsonl.1`` newest ... ``.keep`` oldest).
    busy_timeout: seconds a write waits for another process's transaction before failing.
    """

    def __init__(
        self,
        root: str | Path,
        term: int | None = None,
        *,
        max_event_bytes: int = 64 << 20,
        keep: int = 3,
        busy_timeout: float = 30.0,
    ):
        self.root = Path(root)
        self.db_path = self.root / DB_NAME
        self.events_path = self.root / "events.jsonl"
        self.max_event_bytes = int(max_event_bytes)
        self.keep = int(keep)
        self._faults = FaultInjector()
        self._lock = threading.RLock()
        self._events_lock = threading.Lock()
        self._save_error: str | None = None
        self._event_error: str | None = None
        self._written: dict[str, str] = {}  # key -> JSON this instance committed at generation _generation
        self._generation = -1
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            created = not self.db_path.exists()
            self._conn = sqlite3.connect(
                str(self.db_path), timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                log.warning(
                    "%s: the file system does not support WAL; using the %s journal (still atomic, slower)",
                    self.db_path,
                    mode,
                )
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA journal_size_limit=67108864")
            with self._transaction():
                for statement in _SCHEMA:
                    self._conn.execute(statement)
                stored = self._meta("format")
                if stored is None or stored == 2:  # 2: the same tables but ``updates`` (just made)
                    self._set_meta("format", STATE_FORMAT)
                elif stored != STATE_FORMAT:
                    raise ValueError(f"{self.db_path}: unsupported state format {stored!r}")
                self._term = int(self._meta("term", 0)) if term is None else int(term)
            if created:
                fsync_dir(self.root)
        except (sqlite3.DatabaseError, OSError) as exc:
            raise StoreUnavailable(f"cannot open the state store {self.db_path}: {_describe(exc)}") from exc
        self._migrate()

    # -- plumbing ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _transaction(self):
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    @contextlib.contextmanager
    def _fenced(self, failure: str):
        """One write transaction of ``save`` or ``append`` (under the lock): fenced by the term
        (a newer term in the store raises StaleTerm), it yields the committed generation it
        starts from and commits the next. On any error it rolls back, forgets what it believed
        was written, and raises StoreUnavailable ("``failure`` <db>: why") for a database or
        disk error; the committed state is unchanged."""
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            self._faults.hit("save:begin")
            stored = int(self._meta("term", 0))
            if stored > self._term:
                raise StaleTerm(self.db_path, self._term, stored)
            if stored < self._term:
                self._set_meta("term", self._term)
            generation = int(self._meta("generation", 0))
            yield generation
            self._set_meta("generation", generation + 1)
            self._faults.hit("save:before_commit")
            self._conn.execute("COMMIT")
        except StaleTerm as exc:
            self._rollback()
            self._save_error = str(exc)
            raise
        except (sqlite3.DatabaseError, OSError) as exc:
            self._rollback()
            self._written, self._generation = {}, -1
            self._save_error = f"{failure} {self.db_path}: {_describe(exc)}; the last committed state is kept"
            raise StoreUnavailable(self._save_error) from exc
        except BaseException:
            self._rollback()
            self._written, self._generation = {}, -1
            raise

    def _rollback(self) -> None:
        try:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        except sqlite3.Error as exc:  # the transaction may already be gone (SQLITE_FULL rolls back itself)
            log.debug("rollback: %s", exc)

    def _meta(self, key: str, default=None):
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else row[0]

    def _set_meta(self, key: str, value) -> None:
        self._conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def _write_arrays(self, kind: str, arrays: list[tuple[str, str, str, bytes]]) -> None:
        self._conn.execute("DELETE FROM arrays WHERE kind = ?", (kind,))
        self._conn.executemany(
            "INSERT INTO arrays (kind, name, dtype, shape, data) VALUES (?, ?, ?, ?, ?)", [(kind, *a) for a in arrays]
        )

    def _read_arrays(self, kind: str) -> dict[str, np.ndarray]:
        rows = self._conn.execute("SELECT name, dtype, shape, data FROM arrays WHERE kind = ? ORDER BY rowid", (kind,))
        return {name: _decode_array(dtype, shape, data) for name, dtype, shape, data in rows}

    @property
    def term(self) -> int:
        """The fencing term this instance writes under."""
        return self._term

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- fencing -------------------------------------------------------------------------
    def claim_term(self) -> int:
        """Become the writer: increment the stored term and write under it from now on. Every
        other store, in this process or another, then gets ``StaleTerm`` from ``save``."""
        with self._lock:
            try:
                with self._transaction():
                    term = int(self._meta("term", 0)) + 1
                    self._set_meta("term", term)
            except (sqlite3.DatabaseError, OSError) as exc:
                self._save_error = f"cannot claim a term in {self.db_path}: {_describe(exc)}"
                raise StoreUnavailable(self._save_error) from exc
            self._term = term
            self._written, self._generation = {}, -1
            return term

    # -- whole state ---------------------------------------------------------------------
    def load(self, strategy: Strategy | None = None) -> dict | None:
        """The committed state (with ``global`` arrays and the ``open_round``), or None if fresh.

        ``open_round`` is the open round as of its partial sums' last checkpoint (every update
        the sums hold is in its ``accepted`` and ``norms``), and ``replay`` the updates committed
        after it (``Accepted``, in order). With ``strategy`` they are added to the open round here
        (``replay`` then lists what was added); without, the caller adds them
        (``Coordinator.resume``) or needs only the rest (the global adapter)."""
        with self._lock:
            try:
                self._conn.execute("BEGIN")  # one snapshot for every table
                try:
                    rows = {k: json.loads(v) for k, v in self._conn.execute("SELECT key, value FROM state")}
                    if "job" not in rows:
                        return None
                    glob = self._read_arrays("global")
                    base_delta = self._read_arrays("base_delta")
                    optimizer = self._read_arrays("server_optimizer")
                    sums = self._read_arrays("partial")
                    logged = self._read_log(rows)
                finally:
                    self._rollback()
            except (sqlite3.DatabaseError, OSError) as exc:
                raise StoreUnavailable(f"cannot read the state store {self.db_path}: {_describe(exc)}") from exc
        open_round, replay = None, []
        if rows.get("open_round") is not None:
            p = rows.get("partial") or {}
            accepted = rows["open_round"].get("accepted", {})
            devices = p["devices"] if "devices" in p else rows.get("partial_devices", list(accepted))
            partial = Partial(
                sums=sums,
                weight=float(p.get("weight", 0.0)),
                count=int(p.get("count", len(accepted))),
                devices=list(devices),
            )
            open_round = _round_from_json(rows["open_round"], partial)
            through = int(p.get("through", len(accepted)))
            for expected, record in enumerate(logged, start=len(accepted) + 1):
                if record.seq != expected:
                    raise StoreUnavailable(
                        f"{self.db_path}: round {open_round.round}: committed update {record.seq} where "
                        f"{expected} was due; the update log has a gap"
                    )
                if record.seq > through:  # not in the sums yet: added again
                    replay.append(record)
                    continue
                u = record.update  # in the checkpointed sums already: its place in the round
                open_round.accepted[u.device] = u.num_examples
                open_round.norms.append(record.norm)
                partial.devices.append(u.device)
            if strategy is not None:
                coordinator = Coordinator(RoundSettings(), strategy, rows["job"], time.time)
                coordinator.resume(open_round, replay)
        return {
            "format": STATE_FORMAT,
            "job": rows["job"],
            "next_round": rows["next_round"],
            "completed": rows["completed"],
            "version": rows["version"],
            "history": rows.get("history", []),
            "open_round": open_round,
            "saved_at": rows.get("saved_at"),
            "global": glob,
            "base_delta": base_delta,
            "server_optimizer": (int(rows.get("server_optimizer_step", 0)), optimizer),
            "replay": replay,
        }

    def _read_log(self, rows: dict) -> list[Accepted]:
        """The open round's updates committed after its last full save, in order (those the
        sums' checkpoint holds without their tensors)."""
        if rows.get("open_round") is None:
            return []
        round_id = int(rows["open_round"]["round"])
        saved = len(rows["open_round"].get("accepted", {}))
        cursor = self._conn.execute(
            "SELECT seq, device, rank, weight, norm, metrics FROM updates WHERE round = ? AND seq > ? ORDER BY seq",
            (round_id, saved),
        )
        logged = list(cursor)
        stored = {
            seq: (layout, data)
            for seq, layout, data in self._conn.execute(
                "SELECT seq, layout, data FROM update_tensors WHERE round = ? AND seq > ?", (round_id, saved)
            )
        }
        return [_decode_update(round_id, row, stored.get(row[0])) for row in logged]

    def save(
        self,
        *,
        job: str,
        next_round: int,
        completed: int,
        version: int,
        history: list[dict],
        global_adapter: dict[str, np.ndarray] | None,
        open_round: OpenRound | None,
        base_delta: dict[str, np.ndarray] | None = None,
        server_optimizer: tuple[int, dict[str, np.ndarray]] | None = None,
    ) -> None:
        """Commit everything in one transaction; ``global_adapter`` None keeps the saved one (it did
        not change), and so does ``base_delta`` None (changes folded into frozen weights,
        FLoRA/FedEx-LoRA) and ``server_optimizer`` None (its step count and moments,
        ``ServerOptimizer.state()``). Raises ``StaleTerm`` (another store claimed a newer term) or
        ``StoreUnavailable`` (nothing could be written); either way the committed state is unchanged."""
        values = {
            "job": job,
            "next_round": int(next_round),
            "completed": int(completed),
            "version": int(version),
            "history": history,
            "saved_at": time.time(),
        }
        partial_arrays: list = []
        if open_round is not None:
            values["open_round"] = _round_to_json(open_round)
            p = open_round.partial
            values["partial"] = _sums_row(p, len(open_round.accepted))
            values["partial_devices"] = list(p.devices)
            partial_arrays = [(k, *_encode_array(k, v, np.float64)) for k, v in p.sums.items()]
        else:
            values["open_round"] = values["partial"] = values["partial_devices"] = None
        optimizer = None
        if server_optimizer is not None:
            values["server_optimizer_step"] = int(server_optimizer[0])
            optimizer = [(k, *_encode_array(k, v, np.float64)) for k, v in server_optimizer[1].items()]
        rows = {k: _dumps(v) for k, v in values.items()}
        glob = None if global_adapter is None else [(k, *_encode_array(k, v)) for k, v in global_adapter.items()]
        delta = None if base_delta is None else [(k, *_encode_array(k, v)) for k, v in base_delta.items()]
        covered = None if open_round is None else (open_round.round, len(open_round.accepted))
        self._commit(rows, glob, delta, partial_arrays, optimizer, covered)

    def _commit(
        self,
        rows: dict[str, str],
        glob: list | None,
        delta: list | None,
        partial: list,
        optimizer: list | None,
        covered: tuple[int, int] | None,
    ) -> None:
        with self._lock:
            with self._fenced("cannot save the state to") as generation:
                cached = self._written if generation == self._generation else {}
                if glob is not None:
                    self._write_arrays("global", glob)
                if delta is not None:
                    self._write_arrays("base_delta", delta)
                if optimizer is not None:
                    self._write_arrays("server_optimizer", optimizer)
                self._write_arrays("partial", partial)
                if covered is None:  # no open round: its log is folded into the history
                    self._conn.execute("DELETE FROM updates")
                    self._conn.execute("DELETE FROM update_tensors")
                else:  # the checkpoint holds them now
                    self._conn.execute("DELETE FROM updates WHERE round != ? OR seq <= ?", covered)
                    self._conn.execute("DELETE FROM update_tensors WHERE round != ? OR seq <= ?", covered)
                self._faults.hit("save:arrays")
                changed = [(k, v) for k, v in rows.items() if cached.get(k) != v]
                self._conn.executemany("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", changed)
            self._written = {**cached, **dict(changed)}
            self._generation = generation + 1
            self._save_error = None
        self._faults.hit("save:after_commit")

    def append(self, round_id: int, records: list[Accepted], partial: Partial | None = None) -> None:
        """Commit accepted updates of open round ``round_id`` in one transaction: a row of
        ``updates`` each (place, device, weight, norm, metrics) and one of ``update_tensors``, or,
        given the round's ``partial`` after them, their sums instead (a checkpoint of the sums,
        O(model), cheaper than the tensors of a large batch). Never the O(devices) open round.
        Tensor rows the sums hold are deleted a few per commit (as many as it adds, plus one), so
        no commit pays for freeing all of them at once and they take bounded room. Same fencing,
        failures and fault points as ``save``; the committed state is unchanged on error."""
        rows = [_update_row(round_id, r) for r in records]
        tensor_rows = [] if partial is not None else [_tensors_row(round_id, r) for r in records]
        sums = None
        if partial is not None:
            sums = [(k, *_encode_array(k, v, np.float64)) for k, v in partial.sums.items()]
            sums_row = _dumps(_sums_row(partial, records[-1].seq))
        with self._lock:
            with self._fenced(f"cannot commit {len(records)} updates to") as generation:
                self._conn.executemany("INSERT INTO updates VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
                self._conn.executemany("INSERT INTO update_tensors VALUES (?, ?, ?, ?)", tensor_rows)
                if sums is not None:
                    self._write_arrays("partial", sums)
                    self._conn.execute("INSERT OR REPLACE INTO state (key, value) VALUES ('partial', ?)", (sums_row,))
                    through = records[-1].seq
                else:
                    row = self._conn.execute("SELECT value FROM state WHERE key = 'partial'").fetchone()
                    through = int((json.loads(row[0]) or {}).get("through", 0)) if row else 0
                self._conn.execute(  # the oldest tensor rows the sums hold: a few per commit
                    "DELETE FROM update_tensors WHERE rowid IN (SELECT rowid FROM update_tensors "
                    "WHERE round = ? AND seq <= ? ORDER BY round, seq LIMIT ?)",
                    (int(round_id), int(through), len(records) + 1),
                )
                self._faults.hit("save:arrays")
            if self._generation == generation:  # what this instance committed, still current
                self._written = {**self._written, **({"partial": sums_row} if sums is not None else {})}
                self._generation = generation + 1
            self._save_error = None
        self._faults.hit("save:after_commit")

    def _migrate(self) -> None:
        """Import a format-1 state directory once, in one transaction."""
        if not (self.root / "state.json").is_file():
            return
        with self._lock:
            try:
                if self._conn.execute("SELECT 1 FROM state WHERE key = 'job'").fetchone() is not None:
                    return
            except sqlite3.DatabaseError as exc:
                raise StoreUnavailable(f"cannot read the state store {self.db_path}: {_describe(exc)}") from exc
            legacy = _load_legacy(self.root)
            if legacy is None:
                return
            self.save(**legacy)  # a concurrent import would write the same state
        log.info("imported the format-1 state in %s into %s", self.root, self.db_path.name)

    def healthy(self) -> bool | str:
        """True, or what the last failed write (state or event) said; a successful write clears it."""
        return self._save_error or self._event_error or True

    # -- event log -----------------------------------------------------------------------
    def event(self, kind: str, **fields) -> dict:
        """Append one event; raises ``StoreUnavailable`` if it cannot be written."""
        return self.events_append([(kind, fields)])[0]

    def events_append(self, events: list[tuple[str, dict]]) -> list[dict]:
        """Append events (kind, fields) in one write (a batch of accepted updates logs its
        events together); raises ``StoreUnavailable`` if they cannot be written."""
        now = round(time.time(), 3)
        records, lines = [], []
        for kind, fields in events:
            record, line = _cap_record(_clip_strings({"time": now, "event": kind, **fields}))
            records.append(record)
            lines.append(line + "\n")
        data = "".join(lines).encode("utf-8")
        with self._events_lock:
            try:
                self._append(data)
            except OSError as exc:
                self._event_error = f"cannot append to {self.events_path}: {_describe(exc)}"
                raise StoreUnavailable(self._event_error) from exc
            self._event_error = None
        return records

    def _append(self, data: bytes) -> None:
        fd = os.open(self.events_path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and size + len(data) > self.max_event_bytes:
                os.close(fd)
                fd = -1
                self._rotate()
                fd = os.open(self.events_path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
                size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) not in (b"\n", b""):
                data = b"\n" + data  # the last line was torn by a crash: keep ours whole
            if self._faults:
                self._faults.hit("event:write", before_kill=lambda: os.write(fd, data[: len(data) // 2]))
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(fd, view) :]
            except OSError:
                if len(view) < len(data):  # part of the line went out (a full disk): take it back
                    try:
                        os.ftruncate(fd, size)
                    except OSError:
                        pass  # events() skips the torn line, the next event starts on a new one
                raise
        finally:
            if fd >= 0:
                os.close(fd)

    def _rotated(self, i: int) -> Path:
        return self.events_path.with_name(f"{self.events_path.name}.{i}")

    def _rotate(self) -> None:
        if self.keep <= 0:
            self.events_path.unlink(missing_ok=True)
            return
        for i in range(self.keep, 1, -1):
            if self._rotated(i - 1).exists():
                os.replace(self._rotated(i - 1), self._rotated(i))
        os.replace(self.events_path, self._rotated(1))
        for extra in self.root.glob(f"{self.events_path.name}.*"):  # a smaller keep than before
            suffix = extra.name.rsplit(".", 1)[-1]
            if suffix.isdigit() and int(suffix) > self.keep:
                extra.unlink(missing_ok=True)

    def events(self) -> list[dict]:
        """Every event still on disk, oldest first; lines that do not parse are skipped."""
        out: list[dict] = []
        for path in [self._rotated(i) for i in range(max(self.keep, 0), 0, -1)] + [self.events_path]:
            try:
                text = path.read_bytes()
            except FileNotFoundError:
                continue
            for line in text.splitlines():
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    out.append(record)
        return out
