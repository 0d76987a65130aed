"""A device's state on disk, crash-safe: whatever instant the process dies, the next start
finds a state it can use.

``state.json`` (job, last acknowledged round, pending round and the sha256 of its payload,
self-pruned rank), ``pending.bin`` (the encoded update waiting for its acknowledgement) and
``adapter.npz`` (the local adapter) in the state directory. Every file is written to a
temporary file in the same directory, flushed and fsynced, renamed over the old one
(``os.replace``) and the directory fsynced, so a crash or a power cut leaves the old file or
the new one. ``pending.bin`` is written before ``state.json`` names it, and ``state.json``
records its sha256: a pending update that does not match (a crash between the two renames, a
bad flash cell) is dropped with a warning and the round is trained again. A ``state.json``
that is unreadable, not JSON, or holds values of the wrong type or out of range is renamed
to ``state.json.corrupt`` with a warning and the device starts clean; nothing here raises on
bad state.

Also the test hook shared with ``server.store``: with ``FEDLORA_FAULT_POINT=<point>`` (or
``<point>@N`` for the N-th time the point is reached; several separated by commas) in the
environment, the process SIGKILLs itself at that point. The device's points are
``device:<file>:tmp`` (the temporary file is written and fsynced, not yet renamed) and
``device:<file>:replaced`` (renamed, directory not yet fsynced), with ``<file>`` one of
``state``, ``pending``, ``adapter``.

Standard library and NumPy only: this runs on the device.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from core.errors import FedloraError

if TYPE_CHECKING:
    from edge_client.runtime import Trainer
    from edge_client.trainer_process import TrainerProcess

log = logging.getLogger(__name__)

FAULT_POINT_ENV = "FEDLORA_FAULT_POINT"
MAX_RANK = 1024


class FaultInjector:
    """Kills this process with SIGKILL at a named point, for crash tests.

    ``spec`` (default: the ``FEDLORA_FAULT_POINT`` environment variable, read once here) is
    ``point``, ``point@N`` (the N-th hit) or several such separated by commas. Unset, ``hit``
    is one dictionary test.
    """

    def __init__(self, spec: str | None = None):
        if spec is None:
            spec = os.environ.get(FAULT_POINT_ENV, "")
        self._left: dict[str, int] = {}
        for item in spec.split(","):
            name, at, count = item.strip().partition("@")
            if not name:
                continue
            try:
                self._left[name] = max(1, int(count)) if at else 1
            except ValueError:
                log.warning("ignoring malformed %s entry %r", FAULT_POINT_ENV, item)

    def __bool__(self) -> bool:
        return bool(self._left)

    def hit(self, point: str, before_kill: Callable[[], object] | None = None) -> None:
        """SIGKILL the process if ``point`` is armed and this is its N-th hit (after ``before_kill``)."""
        if not self._left or point not in self._left:
            return
        self._left[point] -= 1
        if self._left[point] > 0:
            return
        if before_kill is not None:
            before_kill()
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new file in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory
    finally:
        os.close(fd)


Writer = bytes | Callable[[BinaryIO], object]


def atomic_write(path: str | Path, data: Writer, faults: FaultInjector | None = None, point: str = "") -> None:
    """Replace ``path`` with ``data`` (bytes, or a function writing to a binary file object):
    temporary file in the same directory, flush, fsync, ``os.replace``, fsync of the directory."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            if isinstance(data, (bytes, bytearray, memoryview)):
                fh.write(data)
            else:
                data(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if faults:
            faults.hit(f"{point}:tmp")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if faults:
        faults.hit(f"{point}:replaced")
    fsync_dir(path.parent)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _problem(data: object) -> str | None:
    """What is wrong with a parsed ``state.json``, or None."""
    if not isinstance(data, dict):
        return f"expected an object, found {type(data).__name__}"
    if not isinstance(data.get("job"), str):
        return "job is not a string"
    last = data.get("last_round", 0)
    if not _is_int(last) or last < 0:
        return f"last_round {last!r} is not an integer >= 0"
    pending = data.get("pending_round")
    if pending is not None and (not _is_int(pending) or pending < 1):
        return f"pending_round {pending!r} is not an integer >= 1 or null"
    rank = data.get("rank")
    if rank is not None and (not _is_int(rank) or not 1 <= rank <= MAX_RANK):
        return f"rank {rank!r} is not an integer in 1..{MAX_RANK} or null"
    digest = data.get("pending_sha256")
    if digest is not None and (
        not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest)
    ):
        return "pending_sha256 is not a sha256 hex digest or null"
    return None


class DeviceState:
    """``state.json`` + ``pending.bin`` + ``adapter.npz`` in the state directory, crash-safe."""

    def __init__(self, root: str | Path, job: str):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / "state.json"
        self.pending_path = self.root / "pending.bin"
        self.adapter_path = self.root / "adapter.npz"
        self.feedback_path = self.root / "feedback.npz"
        self.job = job
        self.last_round: int = 0
        self.pending_round: int | None = None
        self.rank: int | None = None  # set once HetLoRA self-pruning lowered it
        self.pending_sha256: str | None = None
        self._faults = FaultInjector()
        self._remove_stale_temporaries()
        data = self._read()
        if data.get("job") != job:
            if data:
                log.info("%s belongs to job %r, not %r: starting fresh", self.path, data.get("job"), job)
            return
        self.last_round = data.get("last_round", 0)
        self.pending_round = data.get("pending_round")
        self.rank = data.get("rank")
        self.pending_sha256 = data.get("pending_sha256")
        if self.pending_round is not None:
            self._check_pending()

    # -- reading -------------------------------------------------------------------------
    def _remove_stale_temporaries(self) -> None:
        for name in ("state.json", "pending.bin", "adapter.npz"):
            for tmp in self.root.glob(f".{name}.*.tmp"):
                with contextlib.suppress(OSError):
                    tmp.unlink()

    def _read(self) -> dict:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_bytes())
            problem = _problem(data)
        except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            problem = f"unreadable ({exc})"
        if problem is None:
            return data
        bad = self.path.with_name(self.path.name + ".corrupt")
        log.warning("device state %s is corrupt: %s; moved it to %s and starting clean", self.path, problem, bad.name)
        try:
            os.replace(self.path, bad)
            fsync_dir(self.root)
        except OSError as exc:
            log.warning("could not move %s aside: %s", self.path, exc)
        return {}

    def _check_pending(self) -> bytes | None:
        """The pending payload if it is there and matches the recorded sha256; else drop it."""
        payload: bytes | None = None
        problem: str | None = None
        try:
            payload = self.pending_path.read_bytes()
        except FileNotFoundError:
            problem = "it is missing"
        except OSError as exc:
            problem = f"it cannot be read ({exc})"
        else:
            digest = hashlib.sha256(payload).hexdigest()
            if self.pending_sha256 is not None and digest != self.pending_sha256:
                recorded = self.pending_sha256
                payload, problem = None, f"its sha256 {digest[:12]}... is not the recorded {recorded[:12]}..."
        if problem is not None:
            log.warning(
                "dropping the pending update of round %s in %s: %s", self.pending_round, self.pending_path, problem
            )
            try:
                self.clear_pending(None)
            except OSError as exc:
                self.pending_round = self.pending_sha256 = None  # in memory at least
                log.warning("could not record that in %s: %s", self.path, exc)
        return payload

    # -- writing -------------------------------------------------------------------------
    def _document(self) -> dict:
        return {
            "job": self.job,
            "last_round": self.last_round,
            "pending_round": self.pending_round,
            "rank": self.rank,
            "pending_sha256": self.pending_sha256 if self.pending_round is not None else None,
        }

    def save(self) -> None:
        """Write ``state.json`` from the attributes (atomically, durably)."""
        data = json.dumps(self._document()).encode("utf-8")
        atomic_write(self.path, data, self._faults, "device:state")

    def set_pending(self, round_id: int, payload: bytes) -> None:
        """Keep ``payload`` as round ``round_id``'s update until it is acknowledged: ``pending.bin``
        first, then ``state.json`` naming it with its sha256."""
        atomic_write(self.pending_path, bytes(payload), self._faults, "device:pending")
        previous = (self.pending_round, self.pending_sha256)
        self.pending_round, self.pending_sha256 = int(round_id), hashlib.sha256(payload).hexdigest()
        try:
            self.save()
        except BaseException:
            self.pending_round, self.pending_sha256 = previous
            raise

    def pending_payload(self) -> bytes | None:
        """The pending update (checked against its sha256), or None."""
        if self.pending_round is None:
            return None
        return self._check_pending()

    def clear_pending(self, acked_round: int | None) -> None:
        """Forget the pending update; ``acked_round`` (if any) becomes the last acknowledged round."""
        if acked_round is not None:
            self.last_round = max(self.last_round, int(acked_round))
        self.pending_round = None
        self.pending_sha256 = None
        self.save()
        with contextlib.suppress(FileNotFoundError):
            self.pending_path.unlink()

    def restore_adapter(self, trainer: Trainer | TrainerProcess) -> None:
        """Load the local adapter a previous run saved (personal tensors survive a restart)."""
        if not self.adapter_path.is_file():
            return
        try:
            with np.load(self.adapter_path, allow_pickle=False) as data:
                trainer.set_adapter({k: data[k] for k in data.files})
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, FedloraError) as exc:
            log.warning("ignoring the saved local adapter %s: %s", self.adapter_path, exc)

    def save_adapter(self, tensors: dict[str, np.ndarray]) -> None:
        def save(fh: BinaryIO) -> None:
            np.savez(fh, **tensors)  # type: ignore[arg-type]  # mypy reads a **dict as maybe allow_pickle

        atomic_write(self.adapter_path, save, self._faults, "device:adapter")
