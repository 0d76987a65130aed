"""Faults against the real processes and a real Mosquitto. Every test ends in a completed round
whose accepted set is exactly the expected one, and checks that nothing acknowledged was lost
or counted twice: an update whose ``accepted`` ack a device received is in the committed state
(the open round's ``accepted``, or a closed round's weight sum) exactly once.

- the aggregator SIGKILLed at each of its persisting fault points (``server.store.FAULT_POINTS``)
  in the middle of a round, and at random instants under a stream of updates;
- a batch of updates (group commit) SIGKILLed between accepting and committing it and between
  committing and acknowledging it, and a batch whose commit fails on a full volume;
- the broker SIGKILLed mid-round and restarted without persistence (retained round, globals,
  statuses and sessions all gone);
- the state volume full during a round (``retry_later``, /healthz ``degraded``, recovery);
- 20 % packet loss on a device's link (network namespace, veth, nftables);
- a device SIGKILLed while writing its own state.

Hand-driven devices (``faultkit.HandDevice``) publish real encoded updates with weights 1, 10,
100, ... so a round's ``examples`` in the aggregator's history says, digit by digit, how many
times each device was counted.
"""

from __future__ import annotations

import random
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from faultkit import (
    Broker,
    DeviceProc,
    HandDevice,
    LossyLink,
    Server,
    bundle_of,
    expected_average,
    hand_devices,
    metric,
    multiplicities,
    wait_for,
)

from server.store import FAULT_POINTS

# -- helpers ------------------------------------------------------------------------------


def acked_rounds(devices: list[HandDevice]) -> dict[str, set[int]]:
    """What each device was told so far: the rounds of its ``accepted`` acks. Take it *before*
    loading the state it is compared with (an ack received later may be for a later commit)."""
    return {d.id: d.accepted_rounds() for d in devices}


def check_committed_open_round(saved: dict, devices: list[HandDevice], told: dict[str, set[int]]) -> None:
    """The committed open round agrees with what the devices were ``told``: every device acked
    for it is accepted, the partial holds each accepted device once, and its sums are the
    weighted sums of exactly those updates."""
    rnd = saved["open_round"]
    assert rnd is not None, "the round was open when the aggregator died"
    by_id = {d.id: d for d in devices}
    acked = {d for d, rounds in told.items() if rnd.round in rounds}
    assert acked <= set(rnd.accepted), f"acknowledged {sorted(acked)} but committed only {sorted(rnd.accepted)}"
    p = rnd.partial
    assert sorted(p.devices) == sorted(rnd.accepted) and len(set(p.devices)) == len(p.devices), p.devices
    assert p.count == len(rnd.accepted)
    assert p.weight == sum(by_id[d].weight for d in rnd.accepted) == sum(rnd.accepted.values())
    if rnd.accepted:  # sums of (global + delta) * weight, each accepted device once
        g0 = saved["global"]
        for name in list(g0)[:2]:
            want = sum(by_id[d].weight * (g0[name].astype(np.float64) + float(by_id[d].value)) for d in rnd.accepted)
            np.testing.assert_allclose(p.sums[name], want, rtol=1e-5, atol=1e-7)


def check_completed_round(
    server: Server,
    rnd: int,
    devices: list[HandDevice],
    expected: list[HandDevice],
    initial: dict[str, np.ndarray] | None = None,
    acked: list[HandDevice] | None = None,
) -> dict:
    """Round ``rnd`` completed once, with exactly ``expected`` each counted once; ``acked`` (default:
    ``expected``) got their ``accepted`` acks (an ack in flight when the aggregator died is lost,
    and the round may have closed before the device could resend)."""
    saved = server.load()
    entries = [h for h in saved["history"] if h["round"] == rnd]
    assert len(entries) == 1, f"round {rnd} is in the history {len(entries)} times: {saved['history']}"
    h = entries[0]
    assert h["ok"], h
    counts = multiplicities(h["examples"], len(devices))
    assert counts == [int(d in expected) for d in devices], (
        f"round {rnd}: devices counted {dict(zip([d.id for d in devices], counts))}, expected {[d.id for d in expected]}"
    )
    assert h["participants"] == len(expected)
    accepted_events = [e["device"] for e in server.events("update_accepted") if e.get("round") == rnd]
    assert len(accepted_events) == len(set(accepted_events)), (
        f"round {rnd}: accepted twice in events: {accepted_events}"
    )
    assert set(accepted_events) <= {d.id for d in expected}, accepted_events
    must = expected if acked is None else acked  # acks may still be on their way from the broker
    wait_for(
        lambda: all(rnd in d.accepted_rounds() for d in must),
        10,
        f"accepted acks of round {rnd} for {[d.id for d in must if rnd not in d.accepted_rounds()]}",
    )
    if initial is not None:  # the new global is the average of exactly those updates, once each
        change = expected_average(expected)
        for name in list(initial)[:3]:
            np.testing.assert_allclose(saved["global"][name], initial[name] + np.float32(change), rtol=1e-5, atol=1e-7)
    return saved


# -- 1. the aggregator SIGKILLed at each step of persisting --------------------------------

# Saves of the aggregator: 1 the fresh state, 2 round 1 opened, 3-5 the updates of d0, d1 and d2,
# 6 round 1 closed. Events: 1 job_started, 2 round_opened, 3-5 update_accepted, 6 round_closed.
# "update" dies at the 4th hit (on d1's update, d0's acknowledged), "close" at the 6th (closing).
COMMITTED = ("save:after_commit", "event:write")  # the points past the commit


@pytest.mark.parametrize("step", ["update", "close"])
@pytest.mark.parametrize("point", FAULT_POINTS)
def test_aggregator_sigkilled_at_each_fault_point_mid_round(tmp_path, minilm_bundle, mosquitto, point, step):
    job = "kill-points"
    server = Server(tmp_path, minilm_bundle, mosquitto.url, job, rounds={"min_devices": 3})
    devices = hand_devices(mosquitto.url, job, minilm_bundle, 3)
    d0, d1, d2 = devices
    try:
        server.start(fault=f"{point}@{4 if step == 'update' else 6}")
        for d in devices:
            d.online()
        ann = wait_for(d0.open_round, 60, "round 1 to open", [server])
        assert ann["round"] == 1 and ann["selected"] == ["d0", "d1", "d2"]
        initial = {k: v.copy() for k, v in server.load()["global"].items()}
        if step == "update":
            d0.send(1, 0)
            wait_for(lambda: 1 in d0.accepted_rounds(), 20, "d0's ack", [server])
            d1.send(1, 0)
            assert server.wait(20) == -9, f"the aggregator was to die at {point}@4:\n{server.tail()}"
            assert 1 not in d1.accepted_rounds(), "d1 was acknowledged although the aggregator died before its ack"
            saved = server.load()
            check_committed_open_round(saved, devices, acked_rounds(devices))
            # past the commit d1 is in, not yet acknowledged; before it, the transaction never happened
            assert set(saved["open_round"].accepted) == ({"d0", "d1"} if point in COMMITTED else {"d0"})
            d2.send(1, 0)  # while no aggregator runs: the broker queues it for the aggregator's session
        else:
            for d in devices:
                d.send(1, 0)
                if d is not d2:
                    wait_for(lambda d=d: 1 in d.accepted_rounds(), 20, f"{d.id}'s ack", [server])
            assert server.wait(20) == -9, f"the aggregator was to die at {point}@6:\n{server.tail()}"
            saved = server.load()
            if point in COMMITTED:  # the round is closed on disk
                assert saved["open_round"] is None and saved["completed"] == 1
                check_completed_round(server, 1, devices, devices, initial, acked=[d0, d1])
            else:
                check_committed_open_round(saved, devices, acked_rounds(devices))
                assert set(saved["open_round"].accepted) == {"d0", "d1", "d2"}

        server.start()
        for d in devices:
            d.auto.set()  # an unacknowledged update is resent when the round is announced again
        assert server.wait(60) == 0, server.tail()  # one round: the job is done
        check_completed_round(server, 1, devices, devices, initial, acked=[d0, d1] if step == "close" else None)
        assert "job_resumed" in {e["event"] for e in server.events()}
        assert len(d0.sends) == 1, "d0 had its ack and must not have resent"
        assert "Traceback" not in server.text(), server.tail()
    finally:
        server.kill()
        for d in devices:
            d.close()


# -- 1b. a batch of updates (group commit) killed before and after its commit ---------------


@pytest.mark.parametrize("point", ["save:before_commit", "save:after_commit"])
def test_a_batch_killed_between_accept_and_commit_or_commit_and_ack(tmp_path, minilm_bundle, mosquitto, point):
    """Updates queued at the broker while the aggregator is down arrive in a burst and are added
    to the round together; the aggregator dies at its first commit of them: before it (accepted
    in memory, nothing durable: nothing acknowledged, nothing committed) or after it (all of the
    batch durable, none acknowledged). Restarted, it counts each update exactly once: the
    committed ones answer their devices' resends as duplicates."""
    job = "kill-batch"
    n = 6
    server = Server(tmp_path, minilm_bundle, mosquitto.url, job, rounds={"min_devices": n})
    devices = hand_devices(mosquitto.url, job, minilm_bundle, n)
    try:
        server.start()
        for d in devices:
            d.online()
        ann = wait_for(devices[0].open_round, 60, "round 1 to open", [server])
        initial = {k: v.copy() for k, v in server.load()["global"].items()}
        server.stop()  # its session keeps the updates sent meanwhile: they arrive in one burst
        assert server.returncode == 0, server.tail()
        for d in devices:
            d.send(1, ann["global_version"])
        server.start(fault=f"{point}@1")  # its first save after resuming: the burst's first commit
        assert server.wait(30) == -9, f"the aggregator was to die at {point}@1:\n{server.tail()}"
        time.sleep(0.5)  # an ack sent before the kill would have arrived
        assert all(not d.accepted_rounds() for d in devices), "an update was acknowledged before its commit"
        saved = server.load()
        check_committed_open_round(saved, devices, acked_rounds(devices))
        batch = set(saved["open_round"].accepted)
        if point == "save:after_commit":
            assert len(batch) >= 2, f"the burst was committed as a batch of {len(batch)}: {sorted(batch)}"
        else:
            assert batch == set(), f"nothing was committed, yet the round holds {sorted(batch)}"

        server.start()
        for d in devices:
            d.auto.set()  # unacknowledged: resent when the round is announced again
        assert server.wait(60) == 0, server.tail()
        check_completed_round(server, 1, devices, devices, initial)
        for d in devices:
            if d.id in batch:  # committed before the kill: its resend is a duplicate, confirmed
                assert any(a.get("reason") == "duplicate" for a in d.acks_for(1)), (d.id, d.acks_for(1))
        assert "Traceback" not in server.text(), server.tail()
    finally:
        server.kill()
        for d in devices:
            d.close()


# -- 2. SIGKILL at random instants under load ----------------------------------------------


def test_aggregator_sigkilled_at_random_instants_under_load(tmp_path, minilm_bundle, mosquitto):
    job = "kill-random"
    rng = random.Random(20261206)
    server = Server(
        tmp_path,
        minilm_bundle,
        mosquitto.url,
        job,
        exit_when_finished=False,
        rounds={"rounds": 0, "min_devices": 4, "round_timeout": 300},
    )
    devices = hand_devices(mosquitto.url, job, minilm_bundle, 4, resend_s=1.0)
    completed_before = 0

    def check_all() -> int:
        """Every acknowledged update is counted exactly once in the committed state; returns the
        rounds completed."""
        told = acked_rounds(devices)
        saved = server.load()
        history = saved["history"]
        assert [h["round"] for h in history] == list(range(1, len(history) + 1)), history
        for h in history:
            assert h["ok"] and multiplicities(h["examples"], len(devices)) == [1] * len(devices), h
        open_round = saved["open_round"]
        if open_round is not None:
            check_committed_open_round(saved, devices, told)
        for d, rounds in told.items():
            for r in rounds:
                counted = r <= len(history) or (
                    open_round is not None and open_round.round == r and d in open_round.accepted
                )
                assert counted, f"{d}'s acknowledged update of round {r} is not in the committed state"
        return len(history)

    try:
        for d in devices:
            d.online()
            d.auto.set()
        kills = []
        for _ in range(5):
            server.start()
            # the main loop runs and knows every device: kill at a random instant from here
            wait_for(
                lambda: metric(server.metrics(), "fedlora_devices_online") >= len(devices),
                60,
                "the aggregator's main loop",
                [server],
            )
            delay = rng.uniform(0.5, 3.0)
            time.sleep(delay)
            assert server.alive(), server.tail()
            server.kill()
            completed = check_all()
            kills.append((round(delay, 2), completed))
            assert completed >= completed_before
            completed_before = completed
        server.start()
        wait_for(
            lambda: check_all() >= completed_before + 2, 60, "two more rounds after the last kill", [server], poll=0.5
        )
        server.stop()
        final = check_all()
        print(f"kills (delay, rounds completed): {kills}; {final} rounds at the end")
        assert final >= 5, f"too little progress to mean anything: {kills}, {final} rounds"
        for d in devices:  # an ack in flight when the aggregator died is lost, and so is a few
            assert len(d.accepted_rounds()) >= final // 2, (d.id, sorted(d.accepted_rounds()), final)
        accepted = [(e["round"], e["device"]) for e in server.events("update_accepted")]
        assert len(set(accepted)) == len(accepted), "an update was accepted twice"
        assert "Traceback" not in server.text(), server.tail()
    finally:
        server.kill()
        for d in devices:
            d.close()


# -- 3. broker killed and restarted without persistence mid-round --------------------------


def test_broker_restarted_without_persistence_mid_round(tmp_path, minilm_bundle, edge_python):
    job = "broker-restart"
    broker = Broker(tmp_path).start()
    server = Server(
        tmp_path,
        minilm_bundle,
        broker.url,
        job,
        rounds={"rounds": 2, "min_devices": 2, "round_timeout": 120},
        train={"local_steps": 8},
    )
    devices = [
        DeviceProc(tmp_path / f"dev{i}", edge_python, minilm_bundle, broker.url, job, f"dev{i}") for i in range(2)
    ]
    procs = [server, *devices]
    try:
        server.start()
        for d in devices:
            d.start()
        wait_for(lambda: any("round 1: training" in d.text() for d in devices), 90, "round 1 training", procs)
        assert metric(server.metrics(), 'fedlora_updates_total{reason="ok",result="accepted"}') < 2
        broker.kill()  # SIGKILL: retained messages and sessions are gone with it
        time.sleep(1.0)
        broker.start()  # same port, empty
        wait_for(lambda: not server.alive(), 120, "both rounds to complete", procs)
        assert server.returncode == 0, server.tail()
        for d in devices:
            assert d.wait(30) == 0, d.tail()
        saved = server.load()
        assert [(h["round"], h["ok"], h["participants"]) for h in saved["history"]] == [(1, True, 2), (2, True, 2)]
        for rnd in (1, 2):
            accepted = sorted(e["device"] for e in server.events("update_accepted") if e["round"] == rnd)
            assert accepted == ["dev0", "dev1"], (rnd, accepted)
        assert "republished the round announcement" in server.text()
        for d in devices:
            assert d.text().count("update accepted") == 2, d.tail()
    finally:
        for p in procs:
            p.kill()
        broker.kill()


# -- 4. disk full during a round -----------------------------------------------------------


@pytest.fixture
def small_volume(tmp_path):
    import subprocess

    mount = tmp_path / "volume"
    mount.mkdir()
    out = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], check=False, capture_output=True, text=True
    )
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the full-disk test (needs root): {out.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True)


def fill(path: Path) -> int:
    """Write ``path`` until the file system is full; returns the bytes written."""
    written = 0
    block = b"\0" * (1 << 20)
    with open(path, "wb", buffering=0) as fh:
        for size in (1 << 20, 4096, 512, 1):
            while True:
                try:
                    written += fh.write(block[:size])
                except OSError:
                    break
    return written


def test_disk_full_refuses_with_retry_later_and_recovers(tmp_path, minilm_bundle, mosquitto, small_volume):
    job = "disk-full"
    server = Server(
        tmp_path,
        minilm_bundle,
        mosquitto.url,
        job,
        state_dir=small_volume / "state",
        exit_when_finished=False,
        rounds={"min_devices": 2},
    )
    devices = hand_devices(mosquitto.url, job, minilm_bundle, 2, retry_s=0.5)
    d0, d1 = devices
    filler = small_volume / "filler"
    try:
        server.start()
        for d in devices:
            d.online()
        wait_for(d0.open_round, 60, "round 1 to open", [server])
        initial = {k: v.copy() for k, v in server.load()["global"].items()}
        d0.send(1, 0)
        wait_for(lambda: 1 in d0.accepted_rounds(), 20, "d0's ack", [server])
        assert fill(filler) > 0
        d1.auto.set()  # resends when told retry_later
        wait_for(lambda: d1.acks_for(1), 20, "an answer to d1", [server])
        first = d1.acks_for(1)[0]
        assert (first["result"], first["reason"]) == ("rejected", "retry_later"), first
        code, body = server.get("/healthz")
        assert code == 200 and body.startswith("degraded"), (code, body)
        text = server.metrics()
        assert metric(text, "fedlora_store_errors_total") > 0
        assert metric(text, 'fedlora_updates_total{reason="retry_later",result="rejected"}') >= 1
        time.sleep(1.5)  # a few more refused resends while the disk stays full
        assert 1 not in d1.accepted_rounds() and server.alive()
        assert server.load()["open_round"].accepted == {"d0": 1}  # d0 survived the failed writes

        filler.unlink()
        wait_for(lambda: 1 in d1.accepted_rounds(), 20, "d1 accepted once space returned", [server])
        wait_for(
            lambda: metric(server.metrics(), "fedlora_rounds_completed_total") >= 1, 20, "round 1 to complete", [server]
        )
        code, body = server.get("/healthz")
        assert (code, body.strip()) == (200, "ok")
        server.stop()
        check_completed_round(server, 1, devices, devices, initial)
        acks = d1.acks_for(1)  # retry_later while the disk was full, then accepted (and duplicates)
        ok = next(i for i, a in enumerate(acks) if a["result"] == "accepted")
        assert ok >= 1 and all((a["result"], a["reason"]) == ("rejected", "retry_later") for a in acks[:ok]), acks
        assert all(a["result"] == "accepted" for a in acks[ok:]), acks
        assert "Traceback" not in server.text(), server.tail()
    finally:
        server.kill()
        for d in devices:
            d.close()


def test_a_batch_that_cannot_be_committed_is_undone_and_answered_retry_later(
    tmp_path, minilm_bundle, mosquitto, small_volume
):
    """Updates sent together while the aggregator's volume is full: the commit of their batch (or
    batches) fails, every one of them is answered ``retry_later`` and the round is as it was
    (d0's committed update only); once space returns they are accepted, each once."""
    job = "disk-full-batch"
    n = 5
    server = Server(
        tmp_path,
        minilm_bundle,
        mosquitto.url,
        job,
        state_dir=small_volume / "state",
        exit_when_finished=False,
        rounds={"min_devices": n},
    )
    devices = hand_devices(mosquitto.url, job, minilm_bundle, n, retry_s=0.5)
    d0, burst = devices[0], devices[1:]
    filler = small_volume / "filler"
    try:
        server.start()
        for d in devices:
            d.online()
        ann = wait_for(d0.open_round, 60, "round 1 to open", [server])
        initial = {k: v.copy() for k, v in server.load()["global"].items()}
        d0.send(1, ann["global_version"])
        wait_for(lambda: 1 in d0.accepted_rounds(), 20, "d0's ack", [server])
        assert fill(filler) > 0
        senders = [threading.Thread(target=d.send, args=(1, ann["global_version"])) for d in burst]
        for t in senders:
            t.start()
        for t in senders:
            t.join(30)
        wait_for(lambda: all(d.acks_for(1) for d in burst), 30, "an answer to every update of the burst", [server])
        for d in burst:
            first = d.acks_for(1)[0]
            assert (first["result"], first["reason"]) == ("rejected", "retry_later"), (d.id, first)
        assert server.load()["open_round"].accepted == {"d0": 1}, "a batch that failed to commit left a trace"

        for d in burst:
            d.auto.set()  # resent after retry_later
        filler.unlink()
        wait_for(lambda: all(1 in d.accepted_rounds() for d in burst), 30, "the burst accepted", [server])
        wait_for(
            lambda: metric(server.metrics(), "fedlora_rounds_completed_total") >= 1, 20, "round 1 to complete", [server]
        )
        server.stop()
        check_completed_round(server, 1, devices, devices, initial)
        assert "Traceback" not in server.text(), server.tail()
    finally:
        server.kill()
        for d in devices:
            d.close()


# -- 5. 20 % packet loss on a device's link ------------------------------------------------


def test_a_device_behind_a_link_losing_20_percent_of_packets(tmp_path, minilm_bundle, edge_python):
    why = LossyLink.available()
    if why:
        pytest.skip(f"needs network namespaces and nftables: {why}")
    job = "lossy"
    link = LossyLink(percent=20)
    broker = server = device = None
    try:
        try:
            link.open()
        except LossyLink.Unavailable as exc:
            pytest.skip(f"needs network namespaces and nftables: {exc}")
        broker = Broker(tmp_path, host=link.host_ip).start()
        server = Server(
            tmp_path, minilm_bundle, broker.url, job, train={"local_steps": 2}, rounds={"round_timeout": 240}
        )
        device = DeviceProc(
            tmp_path / "dev0",
            edge_python,
            minilm_bundle,
            broker.url,
            job,
            "dev0",
            netns=link.ns,
            broker={"max_packet_size": 20000},
        )
        server.start()
        device.start()
        assert server.wait(180) == 0, server.tail()
        assert device.wait(60) == 0, device.tail()
        saved = server.load()
        assert [(h["round"], h["ok"], h["participants"]) for h in saved["history"]] == [(1, True, 1)]
        assert [e["device"] for e in server.events("update_accepted")] == ["dev0"]
        chunks = [int(n) for n in re.findall(r"update sent \(\d+ bytes, (\d+) chunks\)", device.text())]
        assert chunks and min(chunks) >= 5, chunks  # many chunks on the lossy link
        assert link.dropped() > 0
    finally:
        for p in (device, server, broker):
            if p is not None:
                p.kill()
        link.close()


# -- 6. a device SIGKILLed while writing its state -----------------------------------------


@pytest.mark.parametrize(
    "fault, acked_before",
    [
        ("device:pending:tmp", False),  # pending.bin written, not renamed: the round is trained again
        ("device:state:tmp", False),  # pending.bin in place, state.json not naming it: trained again
        ("device:state:tmp@2", True),  # the ack arrived, state.json not updated: resent, acked again, counted once
    ],
)
def test_device_sigkilled_while_writing_its_state(tmp_path, minilm_bundle, mosquitto, edge_python, fault, acked_before):
    job = "device-kill"
    server = Server(tmp_path, minilm_bundle, mosquitto.url, job, rounds={"min_devices": 2}, train={"local_steps": 2})
    device = DeviceProc(tmp_path / "dev0", edge_python, minilm_bundle, mosquitto.url, job, "dev0")
    # A second selected device that sends only at the end keeps round 1 open meanwhile.
    other = HandDevice(mosquitto.url, job, "h", bundle_of(minilm_bundle), value=1e-4, weight=1000)
    try:
        server.start()
        other.online()
        device.start(fault=fault)
        assert device.wait(90) == -9, f"the device was to die at {fault}:\n{device.tail()}"
        first = len(device.text())
        assert ("round 1: update accepted" in device.text()) == acked_before, device.tail()
        device.start()
        wait_for(
            lambda: "round 1: update accepted" in device.text()[first:],
            25,
            "dev0's restarted process to have its round 1 update acknowledged",
            [server, device],
        )
        again = device.text()[first:]
        if acked_before:  # the update it held was resent as it was (and acknowledged as a duplicate)
            assert "round 1: update sent" in again and "round 1: training" not in again, again
        else:
            assert "round 1: training" in again, again
        other.auto.set()
        assert server.wait(60) == 0, server.tail()
        assert device.wait(30) == 0, device.tail()
        saved = server.load()
        accepted = [e for e in server.events("update_accepted") if e["round"] == 1]
        assert sorted(e["device"] for e in accepted) == ["dev0", "h"], accepted
        weight = next(e["weight"] for e in accepted if e["device"] == "dev0")
        assert [(h["round"], h["ok"], h["participants"], h["examples"]) for h in saved["history"]] == [
            (1, True, 2, weight + 1000)
        ]
    finally:
        device.kill()
        server.kill()
        other.close()
