import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

import server.store as store_mod
from core.errors import FedloraError
from server.rounds import OpenRound
from server.store import FAULT_POINT_ENV, FAULT_POINTS, StaleTerm, StateStore, StoreUnavailable
from server.strategies.base import Partial

REPO = Path(__file__).resolve().parents[1]

# The states a crash test writes: commit n is recognisable from any of its parts (the partial's
# weight, count, devices and sums, the history, the counters all say n), so a mix of two commits
# cannot pass for either.
STATES = """
import numpy as np
from server.rounds import OpenRound
from server.strategies.base import Partial


def state(n):
    devices = [f"d{j}" for j in range(n)]
    rnd = OpenRound(n, ["a", "b"], float(n), float(n) + 60.0, n - 1, accepted={d: j + 1 for j, d in enumerate(devices)},
                    partial=Partial(sums={"w": np.full(n + 3, float(n)), "x": np.arange(n, dtype=np.float64)},
                                    weight=float(n), count=n, devices=devices))
    glob = {"g": np.full((4, 8), n, dtype=np.float32)} if n % 3 == 1 else None
    delta = {"b": np.full(3, n, dtype=np.float16)} if glob else None
    return dict(job="kill", next_round=n, completed=n - 1, version=n - 1, history=[{"round": j} for j in range(1, n)],
                global_adapter=glob, open_round=rnd, base_delta=delta)
"""
WRITER = (
    STATES
    + """
import sys
from server.store import StateStore

store = StateStore(sys.argv[1], max_event_bytes=int(sys.argv[3]), keep=2)
for n in range(1, int(sys.argv[2]) + 1):
    store.save(**state(n))
    store.event("saved", n=n, detail="x" * 50)
    print(n, flush=True)
"""
)
_ns: dict = {}
exec(STATES, _ns)
state = _ns["state"]


def assert_is_commit(back: dict, n: int) -> None:
    """``back`` (a loaded state) is exactly commit ``n`` of ``state``."""
    want = state(n)
    assert (back["job"], back["next_round"], back["completed"], back["version"]) == ("kill", n, n - 1, n - 1)
    assert back["history"] == want["history"]
    o, w = back["open_round"], want["open_round"]
    assert (o.round, o.selected, o.opened_at, o.deadline, o.base_version, o.accepted) == (
        w.round,
        w.selected,
        w.opened_at,
        w.deadline,
        w.base_version,
        w.accepted,
    )
    assert (o.partial.weight, o.partial.count, o.partial.devices) == (float(n), n, w.partial.devices)
    assert sorted(o.partial.sums) == ["w", "x"]
    for k, v in w.partial.sums.items():
        assert o.partial.sums[k].dtype == np.float64
        np.testing.assert_array_equal(o.partial.sums[k], v)
    g = n - (n - 1) % 3  # the last commit that carried the global adapter
    assert back["global"]["g"].dtype == np.float32
    np.testing.assert_array_equal(back["global"]["g"], np.full((4, 8), g, dtype=np.float32))
    np.testing.assert_array_equal(back["base_delta"]["b"], np.full(3, g, dtype=np.float16))


def run_writer(state_dir, count=6, fault="", max_event_bytes=64 << 20, **kwargs):
    env = {**os.environ, FAULT_POINT_ENV: fault}
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(state_dir), str(count), str(max_event_bytes)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kwargs,
    )


# -- round trip ---------------------------------------------------------------------------


def test_state_round_trips_with_open_round_and_partial(tmp_path):
    store = StateStore(tmp_path)
    assert store.load() is None
    glob = {"w": np.arange(4, dtype=np.float32)}
    rnd = OpenRound(
        3,
        ["a", "b"],
        10.0,
        70.0,
        2,
        accepted={"a": 5},
        partial=Partial(sums={"w": np.full(4, 5.0)}, weight=5.0, count=1, devices=["a"]),
    )
    store.save(
        job="j", next_round=4, completed=2, version=2, history=[{"round": 2}], global_adapter=glob, open_round=rnd
    )
    back = StateStore(tmp_path).load()
    assert (back["job"], back["next_round"], back["completed"], back["version"]) == ("j", 4, 2, 2)
    np.testing.assert_array_equal(back["global"]["w"], glob["w"])
    o = back["open_round"]
    assert (o.round, o.selected, o.accepted, o.partial.weight) == (3, ["a", "b"], {"a": 5}, 5.0)
    np.testing.assert_array_equal(o.partial.sums["w"], np.full(4, 5.0))
    # a save without the adapter keeps the saved one
    store.save(job="j", next_round=4, completed=2, version=2, history=[], global_adapter=None, open_round=None)
    np.testing.assert_array_equal(StateStore(tmp_path).load()["global"]["w"], glob["w"])
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_arrays_keep_dtype_shape_and_are_writable(tmp_path):
    store = StateStore(tmp_path)
    glob = {
        "a": np.arange(6, dtype=np.float16).reshape(2, 3),
        "b": np.float32(2.5) * np.ones(()),
        "c": np.zeros((0, 4), dtype=np.int64),
        "d": np.arange(12, dtype=">f4").reshape(3, 4).T,
    }
    sums = {"s": np.asarray(7.0), "t": np.ones((2, 2), dtype=np.float32)}
    rnd = OpenRound(
        1, ["a"], 0.0, 1.0, 0, accepted={"a": 1}, partial=Partial(sums=sums, weight=1.0, count=1, devices=["a"])
    )
    store.save(
        job="j",
        next_round=2,
        completed=0,
        version=0,
        history=[],
        global_adapter=glob,
        open_round=rnd,
        base_delta={"m": np.eye(2)},
    )
    back = StateStore(tmp_path).load()
    for k, v in glob.items():
        assert back["global"][k].dtype == v.dtype and back["global"][k].shape == v.shape
        np.testing.assert_array_equal(back["global"][k], v)
        assert back["global"][k].flags.writeable
    s = back["open_round"].partial.sums
    assert s["s"].shape == () and s["s"] == 7.0 and s["t"].dtype == np.float64  # partial sums are float64
    s["t"] += 1  # the aggregator adds into them in place
    np.testing.assert_array_equal(back["base_delta"]["m"], np.eye(2))
    with pytest.raises(ValueError, match="object"):
        store.save(
            job="j",
            next_round=2,
            completed=0,
            version=0,
            history=[],
            open_round=None,
            global_adapter={"o": np.array([object()])},
        )
    assert StateStore(tmp_path).load()["global"].keys() == glob.keys()


def test_unchanged_blobs_are_not_rewritten(tmp_path):
    store = StateStore(tmp_path)
    glob = {"w": np.ones(1000, dtype=np.float32)}
    rnd = OpenRound(1, ["a"], 0.0, 1.0, 0, partial=Partial(sums={"w": np.zeros(1000)}))
    common = dict(job="j", completed=0, version=0, history=[{"round": 0}])
    store.save(next_round=2, global_adapter=glob, open_round=rnd, base_delta={"b": np.ones(2)}, **common)

    db = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
    db.execute("CREATE TABLE written (kind TEXT)")
    db.execute("CREATE TRIGGER log_writes AFTER INSERT ON arrays BEGIN INSERT INTO written VALUES (NEW.kind); END")
    rnd.partial.sums["w"] += 1.0
    store.save(next_round=2, global_adapter=None, open_round=rnd, **common)
    assert db.execute("SELECT kind FROM written").fetchall() == [("partial",)]  # only the partial was rewritten
    db.close()
    np.testing.assert_array_equal(StateStore(tmp_path).load()["open_round"].partial.sums["w"], np.ones(1000))


@dataclass
class OpenRoundPlus(OpenRound):  # a field someone adds to OpenRound later
    attempts: int = 0
    tags: list = field(default_factory=list)


def test_open_round_fields_are_stored_generically(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "OpenRound", OpenRoundPlus)
    store = StateStore(tmp_path)
    rnd = OpenRoundPlus(2, ["a"], 1.0, 2.0, 1, attempts=3, tags=["x"])
    store.save(job="j", next_round=3, completed=1, version=1, history=[], global_adapter={}, open_round=rnd)
    o = StateStore(tmp_path).load()["open_round"]
    assert isinstance(o, OpenRoundPlus) and (o.attempts, o.tags, o.round) == (3, ["x"], 2)
    monkeypatch.setattr(store_mod, "OpenRound", OpenRound)  # an older aggregator ignores what it does not know
    o = StateStore(tmp_path).load()["open_round"]
    assert type(o) is OpenRound and o.round == 2
    store.save(job="j", next_round=3, completed=1, version=1, history=[], global_adapter=None, open_round=o)
    monkeypatch.setattr(store_mod, "OpenRound", OpenRoundPlus)  # a newer one gets its defaults
    o = StateStore(tmp_path).load()["open_round"]
    assert (o.attempts, o.tags) == (0, [])


def test_a_format_1_directory_is_imported_once(tmp_path):
    StateStore(tmp_path).close()  # a database with no committed state (an import cut short) imports too
    state = {
        "format": 1,
        "job": "old",
        "next_round": 5,
        "completed": 3,
        "version": 4,
        "history": [{"round": 4}],
        "saved_at": 1.0,
        "open_round": {
            "round": 5,
            "selected": ["a", "b"],
            "opened_at": 9.0,
            "deadline": 69.0,
            "base_version": 4,
            "accepted": {"a": 7},
            "partial_weight": 7.0,
        },
    }
    (tmp_path / "state.json").write_text(json.dumps(state))
    np.savez(tmp_path / "global.npz", w=np.arange(3, dtype=np.float32))
    np.savez(tmp_path / "base_delta.npz", m=np.ones((2, 2)))
    np.savez(tmp_path / "partial.npz", w=np.full(3, 7.0, dtype=np.float32))
    back = StateStore(tmp_path).load()
    assert (back["job"], back["next_round"], back["completed"], back["version"], back["history"]) == (
        "old",
        5,
        3,
        4,
        [{"round": 4}],
    )
    np.testing.assert_array_equal(back["global"]["w"], np.arange(3, dtype=np.float32))
    np.testing.assert_array_equal(back["base_delta"]["m"], np.ones((2, 2)))
    o = back["open_round"]
    assert (o.round, o.selected, o.deadline, o.accepted, o.partial.weight, o.partial.count, o.partial.devices) == (
        5,
        ["a", "b"],
        69.0,
        {"a": 7},
        7.0,
        1,
        ["a"],
    )
    assert o.partial.sums["w"].dtype == np.float64
    # imported once: the old files are no longer read
    (tmp_path / "state.json").write_text(json.dumps({**state, "next_round": 99}))
    assert StateStore(tmp_path).load()["next_round"] == 5


# -- fencing ------------------------------------------------------------------------------


def test_a_store_fenced_by_a_newer_term_writes_nothing(tmp_path):
    old = StateStore(tmp_path)  # writes under the stored term, 0
    old.save(**state(1))
    new = StateStore(tmp_path)
    assert new.claim_term() == 1 and new.term == 1
    with pytest.raises(StaleTerm) as err:
        old.save(**state(2))
    assert isinstance(err.value, FedloraError) and "term 1" in str(err.value)
    assert_is_commit(StateStore(tmp_path).load(), 1)
    assert "term 1" in old.healthy()
    new.save(**state(2))
    assert new.healthy() is True
    # a store opened now writes under term 1; a claim in another process fences it and `new`
    later = StateStore(tmp_path)
    later.save(**state(3))
    code = f"from server.store import StateStore; print(StateStore({str(tmp_path)!r}).claim_term())"
    assert (
        subprocess.run(
            [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        == "2"
    )
    for stale in (later, new, StateStore(tmp_path, term=1)):
        with pytest.raises(StaleTerm):
            stale.save(**state(4))
    assert_is_commit(StateStore(tmp_path).load(), 3)
    # an explicit newer term (e.g. from the lease) is taken over on its first save
    StateStore(tmp_path, term=7).save(**state(4))
    assert StateStore(tmp_path).term == 7 and StateStore(tmp_path).claim_term() == 8


# -- write failures -----------------------------------------------------------------------


def test_disk_full_raises_store_unavailable_and_keeps_the_commit(tmp_path):
    store = StateStore(tmp_path)
    store.save(**state(1))
    pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
    store._conn.execute(f"PRAGMA max_page_count = {pages + 2}")  # SQLite's own "database or disk is full"
    big = {**state(2), "global_adapter": {"g": np.zeros((1 << 18,), dtype=np.float32)}}
    with pytest.raises(StoreUnavailable, match="full") as err:
        store.save(**big)
    assert isinstance(err.value, FedloraError) and "last committed state is kept" in str(err.value)
    assert isinstance(store.healthy(), str)
    assert_is_commit(store.load(), 1)
    assert_is_commit(StateStore(tmp_path).load(), 1)
    store._conn.execute("PRAGMA max_page_count = 1073741823")
    store.save(**state(2))
    assert store.healthy() is True
    assert_is_commit(StateStore(tmp_path).load(), 2)


def _mount_tmpfs(path: Path, size: str) -> bool:
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return False
    path.mkdir()
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )


def test_a_full_file_system_raises_store_unavailable(tmp_path):
    small = tmp_path / "small"
    if not _mount_tmpfs(small, "256k"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        store = StateStore(small)
        store.save(**state(1))
        store.event("saved", n=1, **{f"pad{i}": "x" * 400 for i in range(6)})  # the next one crosses a page
        big = {**state(2), "global_adapter": {"g": np.zeros((1 << 18,), dtype=np.float32)}}  # 1 MiB > 256 KiB
        with pytest.raises(StoreUnavailable):
            store.save(**big)
        assert isinstance(store.healthy(), str)
        assert_is_commit(StateStore(small).load(), 1)
        with pytest.raises(OSError):  # fill what is left (the failed transaction may have taken it all)
            with open(small / "filler", "wb") as fh:
                while True:
                    fh.write(b"\0" * 4096)
                    fh.flush()
        with pytest.raises(StoreUnavailable, match="ENOSPC"):
            store.event("saved", n=2, **{f"detail{i}": "y" * 500 for i in range(8)})  # crosses a page
        assert [e["n"] for e in store.events()] == [1]
        assert (small / "events.jsonl").read_bytes().endswith(b"\n")  # the part that went out was taken back
        (small / "filler").unlink(missing_ok=True)
        subprocess.run(["mount", "-o", "remount,size=16m", str(small)], check=True)
        store.save(**big)
        store.event("saved", n=2)
        assert store.healthy() is True
        assert StateStore(small).load()["global"]["g"].shape == (1 << 18,)
        store.close()
    finally:
        subprocess.run(["umount", "-l", str(small)], capture_output=True)


def test_an_event_that_cannot_be_written_raises_store_unavailable(tmp_path):
    store = StateStore(tmp_path)
    store.save(**state(1))
    store.event("first")
    (tmp_path / "events.jsonl").rename(tmp_path / "events.keep")
    (tmp_path / "events.jsonl").symlink_to("/dev/full")  # every write: ENOSPC
    with pytest.raises(StoreUnavailable, match="ENOSPC"):
        store.event("second")
    assert "ENOSPC" in store.healthy()
    assert_is_commit(StateStore(tmp_path).load(), 1)
    (tmp_path / "events.jsonl").unlink()
    (tmp_path / "events.keep").rename(tmp_path / "events.jsonl")
    store.event("third")
    assert store.healthy() is True
    assert [e["event"] for e in store.events()] == ["first", "third"]


# -- events -------------------------------------------------------------------------------


def test_events_are_appended(tmp_path):
    store = StateStore(tmp_path)
    store.event("update_rejected", device="d", reason="non_finite")
    store.event("update_accepted", device="e")
    assert [e["event"] for e in store.events()] == ["update_rejected", "update_accepted"]


def test_events_are_bounded_in_size(tmp_path):
    store = StateStore(tmp_path)
    rec = store.event("rejected", detail="z" * 10_000, nested={"a": ["q" * 600]}, n=np.int64(3))
    assert rec["detail"] == "z" * 512 + "…(10000 chars)" and rec["nested"]["a"][0].endswith("…(600 chars)")
    assert rec["n"] == 3
    many = {f"f{i}": "v" * 500 for i in range(20)}
    rec = store.event("many", **many)
    line = (tmp_path / "events.jsonl").read_bytes().splitlines()[-1]
    assert len(line) <= 4096 and json.loads(line) == rec
    assert rec["event"] == "many" and "time" in rec and 0 < rec["truncated"] == 20 - (len(rec) - 3)
    assert [e["event"] for e in store.events()] == ["rejected", "many"]


def test_events_rotate_and_read_oldest_first(tmp_path):
    store = StateStore(tmp_path, max_event_bytes=1000, keep=2)
    for i in range(100):
        store.event("e", i=i)
    files = sorted(p.name for p in tmp_path.glob("events.jsonl*"))
    assert files == ["events.jsonl", "events.jsonl.1", "events.jsonl.2"]
    assert all(p.stat().st_size <= 1000 for p in tmp_path.glob("events.jsonl*"))
    seen = [e["i"] for e in store.events()]
    assert seen == list(range(seen[0], 100)) and len(seen) > 30


def test_a_torn_event_line_is_skipped_and_does_not_swallow_the_next(tmp_path):
    store = StateStore(tmp_path)
    store.event("a")
    with open(tmp_path / "events.jsonl", "ab") as fh:
        fh.write(b'{"time": 1, "event": "to')  # a crash mid-line
    store.event("b")
    assert [e["event"] for e in store.events()] == ["a", "b"]


# -- crashes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "point, survivor", [("save:begin", 2), ("save:arrays", 2), ("save:before_commit", 2), ("save:after_commit", 3)]
)
def test_sigkill_at_each_point_leaves_the_last_commit(tmp_path, point, survivor):
    assert point in FAULT_POINTS
    proc = run_writer(tmp_path, fault=f"{point}@3")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err.decode()
    assert out.split() == [b"1", b"2"]  # killed in the third save
    store = StateStore(tmp_path)
    assert_is_commit(store.load(), survivor)
    assert [e["n"] for e in store.events()] == [1, 2]
    store.save(**state(survivor + 1))  # and it carries on from there
    assert_is_commit(StateStore(tmp_path).load(), survivor + 1)


def test_sigkill_while_writing_an_event_tears_only_that_line(tmp_path):
    proc = run_writer(tmp_path, fault="event:write@3")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err.decode()
    text = (tmp_path / "events.jsonl").read_bytes()
    assert not text.endswith(b"\n")  # the third line is half written
    store = StateStore(tmp_path)
    assert_is_commit(store.load(), 3)  # the state was committed before the event
    assert [e["n"] for e in store.events()] == [1, 2]
    store.event("saved", n=3)
    assert [e["n"] for e in store.events()] == [1, 2, 3]


def test_sigkill_at_a_random_instant_leaves_a_consistent_commit(tmp_path):
    rng = random.Random(1234)
    for attempt in range(5):
        d = tmp_path / str(attempt)
        proc = run_writer(d, count=100_000, max_event_bytes=3000)
        first = proc.stdout.readline()
        assert first == b"1\n", proc.stderr.read().decode()
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate(timeout=60)
        last = int((first + rest).split()[-1])
        store = StateStore(d, max_event_bytes=3000, keep=2)
        back = store.load()
        n = back["next_round"]
        assert n in (last, last + 1)  # the save after the last print may have committed
        assert_is_commit(back, n)
        seen = [e["n"] for e in store.events()]
        assert seen == list(range(seen[0], seen[-1] + 1)) and seen[-1] in (n - 1, n) and seen[-1] >= last


# -- the update log: group commits between checkpoints -------------------------------------


def _round_with_updates(n_devices: int = 9):
    from server.rounds import Coordinator, RoundSettings
    from server.strategies import make_strategy

    shapes = {"m.lora_A.weight": (2, 3), "m.lora_B.weight": (4, 2), "head.weight": (5,)}
    strategy = make_strategy("fedavg", shapes, rank=2)
    settings = RoundSettings(min_devices=1, norm_clip_multiple=0, max_weight_ratio=0)
    c = Coordinator(settings, strategy, "j", time.time)
    for j in range(n_devices):
        c.device_status(f"d{j}", True, rank=2)
    assert c.maybe_open() is not None
    rng = np.random.default_rng(7)

    def update(j: int):
        from server.strategies.base import ClientUpdate

        tensors = {k: rng.normal(0, 1, s).astype(np.float32) for k, s in shapes.items()}
        return ClientUpdate(f"d{j}", c.open.round, 2, j + 1, tensors, {"train_loss": float(j)})

    return c, strategy, update


def _save_open(store: StateStore, c) -> None:
    store.save(
        job="j", next_round=c.next_round, completed=0, version=0, history=[], global_adapter={}, open_round=c.open
    )


def test_committed_updates_replay_onto_the_last_checkpoint_exactly(tmp_path):
    """Batches committed as rows with their tensors, as rows beside a checkpoint of the sums, and
    as tensors again: loading gives the round exactly as it was in memory (same sums, bit for bit,
    same accepted order, norms and devices), and a full save drops the rows it covers."""
    c, strategy, update = _round_with_updates()
    store = StateStore(tmp_path)
    _save_open(store, c)
    j = 0
    for size, with_sums in ((2, False), (3, True), (1, False), (3, False)):
        records = [c.add(update(j + i), norm=0.5 + j + i) for i in range(size)]
        j += size
        store.append(c.open.round, records, c.open.partial if with_sums else None)
    back = StateStore(tmp_path).load(strategy)
    rnd, want = back["open_round"], c.open
    assert [r.seq for r in back["replay"]] == [6, 7, 8, 9]  # the tensor rows after the sums' checkpoint
    assert list(rnd.accepted.items()) == list(want.accepted.items())
    assert rnd.norms == want.norms and rnd.partial.devices == want.partial.devices
    assert (rnd.partial.count, rnd.partial.weight) == (want.partial.count, want.partial.weight)
    assert set(rnd.partial.sums) == set(want.partial.sums)
    for k, v in want.partial.sums.items():
        assert np.array_equal(rnd.partial.sums[k], v), k
    # without a strategy the caller replays: the rows come back as the updates were added
    plain = StateStore(tmp_path).load()
    assert len(plain["open_round"].accepted) == 5
    assert [r.update.device for r in plain["replay"]] == ["d5", "d6", "d7", "d8"]
    assert plain["replay"][0].update.metrics == {"train_loss": 5.0}
    _save_open(store, c)  # a checkpoint of the whole round
    with sqlite3.connect(tmp_path / "state.db") as db:
        assert db.execute("SELECT count(*) FROM updates").fetchone()[0] == 0
        assert db.execute("SELECT count(*) FROM update_tensors").fetchone()[0] == 0
    again = StateStore(tmp_path).load(strategy)
    assert again["replay"] == [] and list(again["open_round"].accepted) == list(want.accepted)


def test_the_tensors_a_sums_checkpoint_holds_are_dropped_a_few_per_commit(tmp_path):
    """No commit frees every covered tensor row at once (a latency spike): each drops as many as
    it adds, plus one, so they drain while the log stays bounded."""
    c, strategy, update = _round_with_updates()
    store = StateStore(tmp_path)
    _save_open(store, c)

    def tensor_rows() -> list[int]:
        with sqlite3.connect(tmp_path / "state.db") as db:
            return [seq for (seq,) in db.execute("SELECT seq FROM update_tensors ORDER BY seq")]

    for j in range(5):
        store.append(c.open.round, [c.add(update(j))])
    assert tensor_rows() == [1, 2, 3, 4, 5]
    store.append(c.open.round, [c.add(update(5))], c.open.partial)  # the sums hold 1-6 now
    assert tensor_rows() == [3, 4, 5]
    store.append(c.open.round, [c.add(update(6))])
    assert tensor_rows() == [5, 7]
    store.append(c.open.round, [c.add(update(7))])
    assert tensor_rows() == [7, 8]
    back = StateStore(tmp_path).load(strategy)
    assert [r.seq for r in back["replay"]] == [7, 8] and back["open_round"].partial.count == 8
    for k, v in c.open.partial.sums.items():
        assert np.array_equal(back["open_round"].partial.sums[k], v), k


def test_an_append_by_a_fenced_store_commits_nothing(tmp_path):
    c, strategy, update = _round_with_updates()
    old = StateStore(tmp_path)
    _save_open(old, c)
    old.append(c.open.round, [c.add(update(0))])
    StateStore(tmp_path).claim_term()
    with pytest.raises(StaleTerm):
        old.append(c.open.round, [c.add(update(1))])
    back = StateStore(tmp_path).load(strategy)
    assert list(back["open_round"].accepted) == ["d0"]


def test_a_gap_in_the_update_log_is_refused_with_a_clear_error(tmp_path):
    c, strategy, update = _round_with_updates()
    store = StateStore(tmp_path)
    _save_open(store, c)
    store.append(c.open.round, [c.add(update(0)), c.add(update(1))])
    with sqlite3.connect(tmp_path / "state.db") as db:
        db.execute("DELETE FROM updates WHERE seq = 1")
    with pytest.raises(StoreUnavailable, match="committed update 2 where 1 was due"):
        StateStore(tmp_path).load(strategy)


def test_a_format_2_database_is_upgraded_in_place(tmp_path):
    """A database of the store before the update log (format 2: the partial's devices in its
    state row, no ``updates`` tables) opens as format 3 with its open round intact."""
    c, strategy, update = _round_with_updates()
    c.add(update(0), norm=0.5)
    c.add(update(1), norm=1.5)
    store = StateStore(tmp_path)
    _save_open(store, c)
    store.close()
    with sqlite3.connect(tmp_path / "state.db") as db:  # as format 2 wrote it
        db.execute("DROP TABLE updates")
        db.execute("DROP TABLE update_tensors")
        db.execute("UPDATE meta SET value = 2 WHERE key = 'format'")
        db.execute("DELETE FROM state WHERE key = 'partial_devices'")
        p = c.open.partial
        row = json.dumps({"weight": p.weight, "count": p.count, "devices": list(p.devices)})
        db.execute("UPDATE state SET value = ? WHERE key = 'partial'", (row,))
    back = StateStore(tmp_path).load(strategy)
    rnd = back["open_round"]
    assert list(rnd.accepted) == ["d0", "d1"] and rnd.partial.devices == ["d0", "d1"] and rnd.norms == [0.5, 1.5]
    for k, v in c.open.partial.sums.items():
        assert np.array_equal(rnd.partial.sums[k], v), k
    with sqlite3.connect(tmp_path / "state.db") as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()[0] == 3
    store = StateStore(tmp_path)
    store.append(rnd.round, [c.add(update(2))])  # and the log works from there
    assert list(StateStore(tmp_path).load(strategy)["open_round"].accepted) == ["d0", "d1", "d2"]
