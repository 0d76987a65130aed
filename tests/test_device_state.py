from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edge_client.device_state import FAULT_POINT_ENV, DeviceState, FaultInjector

REPO = Path(__file__).resolve().parents[1]

PAYLOAD = """
def payload(r):
    return f"round {r};".encode() * (3000 + 37 * r)
"""
# One device round after another, as Device.step does it: the update becomes pending, the local
# adapter is saved, the acknowledgement clears the pending update.
WRITER = (
    PAYLOAD
    + """
import sys
import numpy as np
from edge_client.device_state import DeviceState

state = DeviceState(sys.argv[1], "job")
for r in range(1, int(sys.argv[2]) + 1):
    state.set_pending(r, payload(r))
    state.save_adapter({"a": np.full((64, 8), r, dtype=np.float32)})
    state.clear_pending(r)
    print(r, flush=True)
"""
)
_ns: dict = {}
exec(PAYLOAD, _ns)
payload = _ns["payload"]


class Trainer:
    """What restore_adapter needs of edge_client.runtime.Trainer."""

    def __init__(self):
        self.adapter = None

    def set_adapter(self, tensors):
        self.adapter = tensors


def run_writer(root, count, fault=""):
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(root), str(count)],
        cwd=REPO,
        env={**os.environ, FAULT_POINT_ENV: fault},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def adapter_round(state: DeviceState) -> int | None:
    trainer = Trainer()
    state.restore_adapter(trainer)
    if trainer.adapter is None:
        return None
    a = trainer.adapter["a"]
    assert a.shape == (64, 8) and (a == a.flat[0]).all()
    return int(a.flat[0])


def test_state_round_trips(tmp_path):
    state = DeviceState(tmp_path, "j")
    assert (state.last_round, state.pending_round, state.rank, state.pending_payload()) == (0, None, None, None)
    assert state.path == tmp_path / "state.json" and state.feedback_path == tmp_path / "feedback.npz"
    state.set_pending(3, b"update")
    state.rank = 4
    state.save()
    back = DeviceState(tmp_path, "j")
    assert (back.pending_round, back.pending_payload(), back.rank) == (3, b"update", 4)
    saved = json.loads((tmp_path / "state.json").read_text())
    assert saved == {
        "job": "j",
        "last_round": 0,
        "pending_round": 3,
        "rank": 4,
        "pending_sha256": hashlib.sha256(b"update").hexdigest(),
    }
    back.clear_pending(3)
    assert not back.pending_path.exists()
    back = DeviceState(tmp_path, "j")
    assert (back.last_round, back.pending_round, back.pending_payload()) == (3, None, None)
    back.save_adapter({"a": np.full((64, 8), 5, dtype=np.float32)})
    assert adapter_round(DeviceState(tmp_path, "j")) == 5
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind
    other = DeviceState(tmp_path, "another job")  # a new job starts fresh
    assert (other.last_round, other.pending_round, other.rank) == (0, None, None)


def test_state_of_the_previous_release_is_read(tmp_path):
    (tmp_path / "pending.bin").write_bytes(b"old update")
    (tmp_path / "state.json").write_text(json.dumps({"job": "j", "last_round": 2, "pending_round": 3, "rank": None}))
    state = DeviceState(tmp_path, "j")
    assert (state.last_round, state.pending_round, state.pending_payload()) == (2, 3, b"old update")


@pytest.mark.parametrize(
    "content",
    [
        b"\x00\xff\xfe garbage",
        b'{"job": "j", "last_round": 1',
        b"[]",
        b'"j"',
        b'{"job": 5}',
        b'{"job": "j", "last_round": -1}',
        b'{"job": "j", "last_round": "3"}',
        b'{"job": "j", "last_round": true}',
        b'{"job": "j", "pending_round": 0}',
        b'{"job": "j", "pending_round": 1.5}',
        b'{"job": "j", "rank": 0}',
        b'{"job": "j", "rank": 2048}',
        b'{"job": "j", "pending_round": 2, "pending_sha256": "x"}',
    ],
)
def test_a_corrupt_state_file_starts_clean_with_a_warning(tmp_path, caplog, content):
    (tmp_path / "state.json").write_bytes(content)
    (tmp_path / "pending.bin").write_bytes(b"whatever")
    with caplog.at_level(logging.WARNING, logger="edge_client.device_state"):
        state = DeviceState(tmp_path, "j")
    assert (state.last_round, state.pending_round, state.rank, state.pending_payload()) == (0, None, None, None)
    assert any(str(tmp_path / "state.json") in r.getMessage() and "corrupt" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "state.json.corrupt").read_bytes() == content
    assert not (tmp_path / "state.json").exists()
    state.set_pending(1, b"u")  # and it works from there
    assert DeviceState(tmp_path, "j").pending_payload() == b"u"


def test_a_pending_update_that_does_not_match_its_hash_is_dropped(tmp_path, caplog):
    state = DeviceState(tmp_path, "j")
    state.clear_pending(4)
    state.set_pending(5, b"the update of round 5")
    (tmp_path / "pending.bin").write_bytes(b"the update of round 5, damaged")
    with caplog.at_level(logging.WARNING, logger="edge_client.device_state"):
        back = DeviceState(tmp_path, "j")
    assert (back.last_round, back.pending_round, back.pending_payload()) == (4, None, None)  # round 5 is trained again
    assert any("pending" in r.getMessage() and "sha256" in r.getMessage() for r in caplog.records)
    assert json.loads((tmp_path / "state.json").read_text())["pending_round"] is None
    assert not (tmp_path / "pending.bin").exists()
    # damaged while running: pending_payload checks too
    back.set_pending(6, b"six")
    (tmp_path / "pending.bin").write_bytes(b"siX")
    assert back.pending_payload() is None and back.pending_round is None
    # and a missing one
    back.set_pending(7, b"seven")
    (tmp_path / "pending.bin").unlink()
    assert DeviceState(tmp_path, "j").pending_round is None


def test_an_unreadable_adapter_is_ignored(tmp_path, caplog):
    state = DeviceState(tmp_path, "j")
    state.save_adapter({"a": np.ones((64, 8), dtype=np.float32)})
    data = state.adapter_path.read_bytes()
    state.adapter_path.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="edge_client.device_state"):
        assert adapter_round(state) is None
    assert any("adapter" in r.getMessage() for r in caplog.records)


def test_fault_injector_counts_hits():
    assert not FaultInjector("") and FaultInjector("a:b@2, c")
    f = FaultInjector("nothing-here@3")
    f.hit("device:state:tmp")  # not armed: returns


@pytest.mark.parametrize(
    "fault, last_round, pending, adapter",
    [
        ("device:pending:tmp@2", 1, None, 1),
        ("device:pending:replaced@2", 1, None, 1),  # pending.bin of round 2 is there, state.json does not name it
        ("device:state:tmp@3", 1, None, 1),
        ("device:state:replaced@3", 1, 2, 1),
        ("device:adapter:tmp@2", 1, 2, 1),
        ("device:adapter:replaced@2", 1, 2, 2),
        ("device:state:replaced@4", 2, None, 2),
    ],
)
def test_sigkill_at_each_point_leaves_a_usable_state(tmp_path, fault, last_round, pending, adapter):
    proc = run_writer(tmp_path, 5, fault)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err.decode()
    state = DeviceState(tmp_path, "job")
    assert (state.last_round, state.pending_round, adapter_round(state)) == (last_round, pending, adapter)
    assert state.pending_payload() == (None if pending is None else payload(pending))
    assert not list(tmp_path.glob(".*.tmp"))  # temporaries of the killed write are cleaned up


def test_sigkill_at_a_random_instant_leaves_a_usable_state(tmp_path, caplog):
    rng = random.Random(7)
    for attempt in range(5):
        root = tmp_path / str(attempt)
        proc = run_writer(root, 100_000)
        first = proc.stdout.readline()
        assert first == b"1\n", proc.stderr.read().decode()
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate(timeout=60)
        last = int((first + rest).split()[-1])
        with caplog.at_level(logging.WARNING, logger="edge_client.device_state"):
            state = DeviceState(root, "job")
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert state.last_round in (last, last + 1)
        if state.pending_round is not None:
            assert state.pending_round == state.last_round + 1
            assert state.pending_payload() == payload(state.pending_round)
        assert adapter_round(state) in (state.last_round, state.last_round + 1)
