"""Aggregator state on disk: survives a restart at any point.

``state.json`` (round counters, history, the open round's accepted set), ``global.npz``
(the current global adapter), ``partial.npz`` (the open round's partial sums) and
``events.jsonl`` (every update accepted or rejected, with the reason). Files are replaced
atomically (write to a temporary file, fsync, rename), so a crash leaves the old or the new
state, never half of one. The open round is saved before an update is acknowledged.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from server.rounds import OpenRound
from server.strategies.base import Partial

STATE_FORMAT = 1


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    _atomic_write(path, lambda fh: np.savez(fh, **arrays))


def _load_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


class StateStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.state_path = self.root / "state.json"
        self.global_path = self.root / "global.npz"
        self.partial_path = self.root / "partial.npz"
        self.base_delta_path = self.root / "base_delta.npz"
        self.events_path = self.root / "events.jsonl"

    # -- whole state ---------------------------------------------------------------------
    def load(self) -> dict | None:
        """The saved state (with ``global`` arrays and the ``open_round``), or None if fresh."""
        if not self.state_path.is_file():
            return None
        state = json.loads(self.state_path.read_text(encoding="utf-8"))
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"{self.state_path}: unsupported state format {state.get('format')!r}")
        state["global"] = _load_arrays(self.global_path)
        state["base_delta"] = _load_arrays(self.base_delta_path) if self.base_delta_path.is_file() else {}
        open_round = state.get("open_round")
        if open_round:
            partial = Partial(weight=open_round["partial_weight"], count=len(open_round["accepted"]),
                              devices=list(open_round["accepted"]))
            if self.partial_path.is_file() and open_round["accepted"]:
                partial.sums = {k: v.astype(np.float64) for k, v in _load_arrays(self.partial_path).items()}
            state["open_round"] = OpenRound(
                round=open_round["round"], selected=open_round["selected"], opened_at=open_round["opened_at"],
                deadline=open_round["deadline"], base_version=open_round["base_version"],
                accepted=dict(open_round["accepted"]), partial=partial,
            )
        return state

    def save(self, *, job: str, next_round: int, completed: int, version: int, history: list[dict],
             global_adapter: dict[str, np.ndarray] | None, open_round: OpenRound | None,
             base_delta: dict[str, np.ndarray] | None = None) -> None:
        """Persist everything; ``global_adapter`` None keeps the saved one (it did not change),
        and so does ``base_delta`` None (changes folded into frozen weights, FLoRA/FedEx-LoRA)."""
        if global_adapter is not None:
            _save_arrays(self.global_path, global_adapter)
        if base_delta is not None:
            _save_arrays(self.base_delta_path, base_delta)
        round_json = None
        if open_round is not None:
            if open_round.accepted:
                _save_arrays(self.partial_path, open_round.partial.sums)
            round_json = {
                "round": open_round.round, "selected": open_round.selected, "opened_at": open_round.opened_at,
                "deadline": open_round.deadline, "base_version": open_round.base_version,
                "accepted": open_round.accepted, "partial_weight": open_round.partial.weight,
            }
        state = {"format": STATE_FORMAT, "job": job, "next_round": next_round, "completed": completed,
                 "version": version, "history": history, "open_round": round_json, "saved_at": time.time()}
        data = json.dumps(state, indent=1).encode("utf-8")
        _atomic_write(self.state_path, lambda fh: fh.write(data))

    # -- event log -----------------------------------------------------------------------
    def event(self, kind: str, **fields) -> dict:
        record = {"time": round(time.time(), 3), "event": kind, **fields}
        with self.events_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        return record

    def events(self) -> list[dict]:
        if not self.events_path.is_file():
            return []
        return [json.loads(line) for line in self.events_path.read_text(encoding="utf-8").splitlines() if line.strip()]
