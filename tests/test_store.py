import numpy as np

from server.rounds import OpenRound
from server.store import StateStore
from server.strategies.base import Partial


def test_state_round_trips_with_open_round_and_partial(tmp_path):
    store = StateStore(tmp_path)
    assert store.load() is None
    glob = {"w": np.arange(4, dtype=np.float32)}
    rnd = OpenRound(3, ["a", "b"], 10.0, 70.0, 2, accepted={"a": 5},
                    partial=Partial(sums={"w": np.full(4, 5.0)}, weight=5.0, count=1, devices=["a"]))
    store.save(job="j", next_round=4, completed=2, version=2, history=[{"round": 2}], global_adapter=glob, open_round=rnd)
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


def test_events_are_appended(tmp_path):
    store = StateStore(tmp_path)
    store.event("update_rejected", device="d", reason="non_finite")
    store.event("update_accepted", device="e")
    assert [e["event"] for e in store.events()] == ["update_rejected", "update_accepted"]
