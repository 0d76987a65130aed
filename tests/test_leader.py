"""Leader election over a Kubernetes Lease, against a loopback API server that answers with
resourceVersion conflicts the way kube-apiserver does (tests/fake_apiserver.py).

Unit tests drive LeaderElector with a hand-moved clock; the integration test runs two real
``fedlora-server`` processes on one persisted state and a real Mosquitto, deposes and kills
leaders, and checks that no round ever ran outside its runner's tenure."""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import yaml
from conftest import free_port
from fake_apiserver import FakeApiServer

from server.leader import LeaderElector, LeaseLock, micro_time

NS, LEASE = "fedlora", "fedlora-aggregator"


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def apiserver():
    server = FakeApiServer().start()
    yield server
    server.stop()


def api_client(url: str, agent: str):
    from kubernetes import client

    configuration = client.Configuration(host=url)
    configuration.retries = False  # urllib3 would retry a 503 connection error on its own
    api = client.ApiClient(configuration)
    api.user_agent = agent
    return api


def elector(url: str, identity: str, clock: Clock, **kw) -> LeaderElector:
    from kubernetes import client

    lock = LeaseLock(client.CoordinationV1Api(api_client(url, f"test ({identity})")), NS, LEASE, request_timeout=5)
    return LeaderElector(lock, identity, lease_duration=15, renew_deadline=10, retry_period=2, clock=clock, **kw)


def test_micro_time_always_has_six_fractional_digits():
    assert micro_time(0.0) == "1970-01-01T00:00:00.000000Z"
    assert micro_time(1.25) == "1970-01-01T00:00:01.250000Z"


def test_first_candidate_creates_the_lease_and_others_follow(apiserver):
    clock = Clock()
    a, b = elector(apiserver.url, "a", clock), elector(apiserver.url, "b", clock)
    a.step()
    b.step()
    assert a.is_leader() and not b.is_leader()
    lease = apiserver.lease(NS, LEASE)
    assert lease["spec"]["holderIdentity"] == "a"
    assert lease["spec"]["leaseDurationSeconds"] == 15 and lease["spec"]["leaseTransitions"] == 0
    assert b.leader == "a"
    creates = [r for r in apiserver.requests if r[0] == "POST"]
    assert [r[2] for r in creates] == [201]  # b saw the lease and did not try to create it


def test_standby_waits_a_full_lease_duration_on_its_own_clock(apiserver):
    clock = Clock()
    a, b = elector(apiserver.url, "a", clock), elector(apiserver.url, "b", clock)
    a.step()
    b.step()  # b first sees a's record now
    clock.advance(9.9)
    assert a.is_leader()
    clock.advance(0.1)
    assert not a.is_leader()  # renew deadline (10 s) passed without a renewal: a stops itself
    clock.advance(4.9)
    b.step()
    assert not b.is_leader()  # 14.9 s < lease duration
    clock.advance(0.1)
    b.step()
    assert b.is_leader()
    lease = apiserver.lease(NS, LEASE)
    assert lease["spec"]["holderIdentity"] == "b" and lease["spec"]["leaseTransitions"] == 1
    a.step()  # a reads b's fresh record and knows it lost
    assert not a.is_leader() and a.leader == "b"


def test_renewals_keep_the_lease(apiserver):
    clock = Clock()
    a, b = elector(apiserver.url, "a", clock), elector(apiserver.url, "b", clock)
    for _ in range(20):  # 40 s, far beyond the lease duration
        a.step()
        b.step()
        assert a.is_leader() and not b.is_leader()
        clock.advance(2)
    assert apiserver.tenures()[-1][1] == "a" and len(apiserver.tenures()) == 1


def test_a_conflicting_write_ends_leadership_at_once(apiserver):
    clock = Clock()
    stopped = []
    a = elector(apiserver.url, "a", clock, on_stopped_leading=lambda: stopped.append(clock()))
    a.step()
    assert a.is_leader()
    clock.advance(2)
    apiserver.conflict_next_write()  # someone wrote the Lease between a's read and its write
    a.step()
    assert not a.is_leader() and stopped == [clock.now]  # not after the renew deadline: now
    put_codes = [r[2] for r in apiserver.requests if r[0] == "PUT"]
    assert put_codes == [409]


def test_concurrent_candidates_elect_exactly_one(apiserver):
    clock = Clock()
    candidates = [elector(apiserver.url, f"c{i}", clock) for i in range(6)]

    def race(group):
        """Every candidate reads the Lease before any of them writes: a true race for the write."""
        read = threading.Barrier(len(group), timeout=20)
        for c in group:

            def get(real=c.lock.get):
                lease = real()
                read.wait()
                return lease

            c.lock.get = get
        threads = [threading.Thread(target=c.step) for c in group]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        for c in group:
            del c.lock.get  # back to the class's method
        return [c for c in group if c.is_leader()]

    leaders = race(candidates)  # all POST an absent Lease: one 201, the rest 409 AlreadyExists
    assert len(leaders) == 1
    assert sum(1 for r in apiserver.requests if r[0] == "POST" and r[2] == 409) == len(candidates) - 1
    standbys = [c for c in candidates if c is not leaders[0]]
    for c in [leaders[0], *standbys]:  # the holder renews once, then every standby sees that record
        c.step()
    clock.advance(16)  # ...and then the holder stops renewing: every standby sees the Lease expired
    assert not leaders[0].is_leader()
    leaders = race(standbys)  # all PUT on the same resourceVersion: one wins, the rest get 409 Conflict
    assert len(leaders) == 1
    assert apiserver.holder(NS, LEASE) == leaders[0].identity
    assert sum(1 for r in apiserver.requests if r[0] == "PUT" and r[2] == 409) == len(standbys) - 1


def test_losing_the_api_server_ends_leadership_by_the_renew_deadline(apiserver):
    clock = Clock()
    errors = []
    a = elector(apiserver.url, "a", clock, on_api_error=lambda op, exc: errors.append(op))
    a.step()
    apiserver.block("(a)")
    for _ in range(4):
        clock.advance(2)
        a.step()
        assert a.is_leader()  # 2, 4, 6, 8 s: still within the renew deadline
    clock.advance(2)
    a.step()
    assert not a.is_leader()
    assert errors and set(errors) == {"get"}


def test_release_hands_over_at_the_next_attempt(apiserver):
    clock = Clock()
    a, b = elector(apiserver.url, "a", clock), elector(apiserver.url, "b", clock)
    a.step()
    b.step()
    assert a.release()
    b.step()
    assert b.is_leader()
    assert not a.release()  # no longer the holder: leaves b's Lease alone
    assert apiserver.holder(NS, LEASE) == "b"


def test_elector_thread_campaigns_and_stops(apiserver):
    stop = threading.Event()
    a = LeaderElector(
        LeaseLock(_coordination(apiserver.url, "a"), NS, LEASE),
        "a",
        lease_duration=3,
        renew_deadline=2,
        retry_period=0.1,
    )
    a.start(stop)
    try:
        assert a.wait_for_leadership(timeout=10)
        time.sleep(0.5)
        assert a.is_leader()
        rvs = {h["resourceVersion"] for h in apiserver.history}
        assert len(rvs) >= 3  # renewing every retry period
    finally:
        stop.set()
        a.join(5)
    assert a.release() and apiserver.holder(NS, LEASE) == ""


def _coordination(url: str, identity: str):
    from kubernetes import client

    return client.CoordinationV1Api(api_client(url, f"test ({identity})"))


def test_round_events_reach_the_api_server(apiserver):
    from kubernetes import client

    from server.k8s import EventRecorder

    results = []
    recorder = EventRecorder(
        client.CoreV1Api(api_client(apiserver.url, "test (events)")), NS, "agg-0", "uid-1", on_result=results.append
    ).start()
    recorder.round_closed(
        {
            "round": 3,
            "ok": True,
            "reason": "all_reported",
            "selected": 4,
            "participants": 4,
            "examples": 120,
            "duration_s": 12.5,
        }
    )
    recorder.round_closed({"round": 4, "ok": False, "reason": "quorum_not_met (0/1)", "selected": 4, "participants": 0})
    recorder.stop()
    assert results == [True, True]
    first, second = apiserver.events
    assert first["reason"] == "RoundCompleted" and first["type"] == "Normal"
    assert first["message"].startswith("Round 3 completed: 4/4 devices, 120 examples")
    assert first["involvedObject"] == {
        "apiVersion": "v1",
        "kind": "Pod",
        "name": "agg-0",
        "namespace": NS,
        "uid": "uid-1",
    }
    assert second["reason"] == "RoundFailed" and second["type"] == "Warning"
    stamp = datetime.fromisoformat(first["firstTimestamp"])  # RFC 3339 in UTC, to the second
    assert stamp.utcoffset() == timedelta(0) and abs(stamp.timestamp() - time.time()) < 60
    assert first["lastTimestamp"] == first["firstTimestamp"]


# -- two real aggregator processes -----------------------------------------------------------
class AggregatorProcess:
    def __init__(self, identity: str, config: Path, kubeconfig: Path, workdir: Path):
        self.identity = identity
        self.port = free_port()
        self.log_path = workdir / f"{identity}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
        env.update(
            KUBECONFIG=str(kubeconfig),
            FEDLORA_KUBERNETES_IDENTITY=identity,
            FEDLORA_HTTP_PORT=str(self.port),
            FEDLORA_HTTP_HOST="127.0.0.1",
        )
        self.log = open(self.log_path, "wb")
        code = "import sys; from server.cli import server_main; sys.exit(server_main())"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, "--config", str(config)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=Path(__file__).resolve().parent.parent,
        )

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError:
            return 0, ""

    def metric(self, name: str) -> float | None:
        code, text = self.get("/metrics")
        m = re.search(rf"^{name} (\S+)$", text, re.M) if code == 200 else None
        return float(m.group(1)) if m else None

    def actions(self) -> list[tuple[float, str]]:
        """(time, 'round N open|closed') for every round this process opened or closed."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            m = re.match(
                r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO fedlora\.aggregator: (round \d+ (?:open|closed))", line
            )
            if m:
                out.append((datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp(), m.group(2)))
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


def wait_for(predicate, timeout=30.0, what="condition", procs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for p in procs:
            if p.proc.poll() is not None and p.proc.returncode not in (-9,):
                raise AssertionError(f"{p.identity} exited {p.proc.returncode}: {p.log_path.read_text()[-3000:]}")
        time.sleep(0.05)
    logs = "\n".join(f"--- {p.identity}\n{p.log_path.read_text()[-3000:]}" for p in procs)
    raise AssertionError(f"timed out waiting for {what}\n{logs}")


def test_two_aggregators_one_leads_and_a_standby_resumes_the_persisted_round(
    tmp_path, minilm_bundle, mosquitto, apiserver
):
    from test_aggregator import FakeDevice, update_payload

    from core.bundle import Bundle

    lease_duration, renew_deadline, retry = 4.0, 2.5, 0.5
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "test",
                "clusters": [{"name": "test", "cluster": {"server": apiserver.url}}],
                "users": [{"name": "test", "user": {"token": "test-token"}}],
                "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test", "namespace": NS}}],
            }
        )
    )
    config = tmp_path / "server.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "job": "ha",
                "bundle": str(minilm_bundle),
                "state_dir": str(tmp_path / "state"),
                "exit_when_finished": False,
                "broker": {"url": mosquitto.url},
                "train": {"local_steps": 1},
                "rounds": {"rounds": 3, "min_devices": 2, "min_updates": 2, "round_timeout": 120},
                "kubernetes": {
                    "leader_election": True,
                    "events": True,
                    "namespace": NS,
                    "lease_name": LEASE,
                    "pod_uid": "u",
                    "lease_duration": lease_duration,
                    "renew_deadline": renew_deadline,
                    "retry_period": retry,
                },
            }
        )
    )
    bundle = Bundle(minilm_bundle)
    a = AggregatorProcess("agg-a", config, kubeconfig, tmp_path)
    procs = [a]
    devices = []
    try:
        wait_for(lambda: apiserver.holder(NS, LEASE) == "agg-a", 90, "agg-a to take the lease", procs)
        b = AggregatorProcess("agg-b", config, kubeconfig, tmp_path)
        procs.append(b)
        wait_for(
            lambda: b.get("/readyz")[0] == 200 and b.metric("fedlora_leader") == 0.0,
            90,
            "agg-b ready as standby",
            procs,
        )
        wait_for(
            lambda: a.metric("fedlora_leader") == 1.0 and a.get("/readyz")[0] == 200, 30, "agg-a ready as leader", procs
        )

        d1, d2 = FakeDevice(mosquitto.url, "ha", "d1"), FakeDevice(mosquitto.url, "ha", "d2")
        devices = [d1, d2]
        for d in devices:
            d.online()

        def opened(n):
            return lambda: (d1.open_round() or {}).get("round") == n

        def accepted(dev, n):
            return lambda: any(x["round"] == n and x["result"] == "accepted" for x in (dev.pump() or dev.acks))

        wait_for(opened(1), 30, "round 1 to open", procs)
        for d in devices:
            d.send(update_payload(bundle, "ha", d.id, 1, codec="fp16"))
        wait_for(opened(2), 30, "round 2 to open", procs)
        d1.send(update_payload(bundle, "ha", "d1", 2, codec="fp16"))
        wait_for(accepted(d1, 2), 30, "d1's round-2 update to be accepted", procs)

        # Depose agg-a: it can no longer reach the API server, so it cannot renew.
        blocked_at = time.time()
        apiserver.block("(agg-a)")
        wait_for(lambda: a.metric("fedlora_leader") == 0.0, 15, "agg-a to stop leading", procs)
        assert time.time() - blocked_at < renew_deadline + retry + 1.5
        wait_for(lambda: apiserver.holder(NS, LEASE) == "agg-b", 15, "agg-b to take over", procs)
        assert time.time() - blocked_at < lease_duration + retry + 1.5
        wait_for(lambda: b.metric("fedlora_leader") == 1.0, 30, "agg-b to run rounds", procs)

        # agg-b resumed round 2 from the persisted state: d1's update is already in it.
        n = len(d1.acks)
        d1.send(update_payload(bundle, "ha", "d1", 2, codec="fp16"))
        wait_for(lambda: d1.ack_count() > n, 30, "agg-b to answer d1's resend", procs)
        assert d1.acks[-1] == {"round": 2, "result": "accepted", "reason": "duplicate", "detail": ""}
        d2.send(update_payload(bundle, "ha", "d2", 2, codec="fp16"))
        wait_for(opened(3), 30, "round 3 to open under agg-b", procs)

        # Kill agg-b outright; agg-a, reachable again, takes over within the lease duration.
        apiserver.unblock("(agg-a)")
        wait_for(lambda: a.get("/readyz")[0] == 200, 15, "agg-a to be a healthy standby", procs)
        b.proc.send_signal(signal.SIGKILL)
        killed_at = time.time()
        wait_for(lambda: apiserver.holder(NS, LEASE) == "agg-a", 15, "agg-a to take the lease back", procs)
        assert time.time() - killed_at < lease_duration + retry + 1.5
        for d in devices:
            d.send(update_payload(bundle, "ha", d.id, 3, codec="fp16"))
        wait_for(lambda: a.metric("fedlora_job_finished") == 1.0, 30, "the job to finish under agg-a", procs)
    finally:
        for d in devices:
            d.link.close()
        for p in procs:
            p.stop()

    from server.store import StateStore

    state = StateStore(tmp_path / "state").load()
    assert state["completed"] == 3
    assert [(h["round"], h["ok"], h["participants"]) for h in state["history"]] == [
        (1, True, 2),
        (2, True, 2),
        (3, True, 2),
    ]

    # Nobody ran a round outside its own tenure (from the API server's record of holders).
    tenures = apiserver.tenures() + [(float("inf"), "")]
    assert [h for _, h in tenures[:-1]] == ["agg-a", "agg-b", "agg-a", ""]  # "": released on SIGTERM
    actions = {p.identity: p.actions() for p in procs}
    assert {x for _, x in actions["agg-a"]} >= {"round 1 open", "round 1 closed", "round 2 open", "round 3 closed"}
    assert {x for _, x in actions["agg-b"]} >= {"round 2 closed", "round 3 open"}
    for identity, acts in actions.items():
        for t, what in acts:
            holder = (
                next(h for (start, h), (end, _) in zip(tenures, tenures[1:]) if start <= t < end)
                if t >= tenures[0][0]
                else ""
            )
            assert holder == identity, f"{identity} did '{what}' at {t:.3f} while the lease was {holder or 'free'}'s"

    # The rounds and the hand-overs are visible as Kubernetes Events.
    completed = [
        (e["reportingInstance"], e["message"].split(":")[0])
        for e in apiserver.events
        if e["reason"] == "RoundCompleted"
    ]
    assert completed == [("agg-a", "Round 1 completed"), ("agg-b", "Round 2 completed"), ("agg-a", "Round 3 completed")]
    elected = [e["involvedObject"]["name"] for e in apiserver.events if e["reason"] == "LeaderElected"]
    # A starved leader that misses its renew deadline steps down and may win its own Lease back
    # (the holder never changes, as the tenures above show): that elects it twice in a row.
    assert [name for name, _ in itertools.groupby(elected)] == ["agg-a", "agg-b", "agg-a"]
