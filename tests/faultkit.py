"""Helpers for the fault tests (tests/test_faults.py): a real ``fedlora-server`` process watched
through /metrics and /healthz, a Mosquitto that can be SIGKILLed and restarted on the same
address, real device processes (``fedlora-edge run``), and hand-driven devices that publish real
encoded updates and record every ack, so a test can check "acknowledged => counted exactly once".

Counting. Every hand-driven device of a test sends ``num_examples`` = a distinct power of ten
(1, 10, 100, ...), with ``max_weight_ratio: 0`` on the aggregator so weights are not capped. A
round's ``examples`` (the sum of the accepted weights, in the aggregator's history) then spells
out in its decimal digits how many times each device was counted (see ``multiplicities``).
"""

from __future__ import annotations

import functools
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from core.bundle import Bundle
from core.protocol import Envelope, Topics, encode_envelope, split_chunks
from core.transport import BrokerConfig, MqttLink

ROOT = Path(__file__).resolve().parent.parent
SERVER = Path(sys.executable).parent / "fedlora-server"
FAULT_ENV = "FEDLORA_FAULT_POINT"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any FEDLORA_* variable (they configure the server and
    devices, and arm fault points), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDLORA_")}
    env.update(extra)
    return env


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def wait_for(predicate, timeout: float, what: str, procs=(), poll: float = 0.05):
    """Poll ``predicate`` until it returns something true; fail early if one of ``procs`` (``Proc``)
    exited with a non-zero status (one that finished its work and exited 0 is no failure)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        for proc in procs:
            if proc.returncode not in (None, 0):
                raise AssertionError(f"{what}: {proc.name} exited ({proc.returncode}):\n{proc.tail()}")
        if time.monotonic() > deadline:
            detail = "\n".join(f"--- {p.name}:\n{p.tail()}" for p in procs)
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{detail}")
        time.sleep(poll)


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


def metric(text: str, name: str) -> float:
    """The sum of every sample whose line starts with ``name`` (labels included in ``name`` or not)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def multiplicities(examples: int, devices: int) -> list[int]:
    """How often each of ``devices`` hand-driven devices (weights 1, 10, 100, ...) was counted in a
    round whose accepted weights sum to ``examples`` (each count must stay below 10)."""
    digits = [(int(examples) // 10**i) % 10 for i in range(devices)]
    assert int(examples) == sum(d * 10**i for i, d in enumerate(digits)), f"examples {examples} is not a digit sum"
    return digits


# -- processes ----------------------------------------------------------------------------
class Proc:
    """A subprocess with its output appended to a log file (kept across restarts)."""

    def __init__(self, name: str, log: Path):
        self.name = name
        self.log = log
        self.proc: subprocess.Popen | None = None

    def spawn(self, command: list[str], env: dict[str, str]) -> Proc:
        assert not self.alive(), f"{self.name} is already running"
        with self.log.open("ab") as fh:
            fh.write(f"\n===== start {' '.join(command[-3:])} ({env.get(FAULT_ENV, 'no fault')})\n".encode())
            self.proc = subprocess.Popen(command, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, n: int = 4000) -> str:
        return self.text()[-n:]

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} did not exit within {timeout:.0f}s:\n{self.tail()}") from None

    def kill(self) -> None:
        """SIGKILL (only this process, by its id) and reap it."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()


class Broker(Proc):
    """Mosquitto without persistence on a fixed address, so it can be SIGKILLed and started again
    on the same port (conftest's Mosquitto picks a new port each time)."""

    def __init__(self, workdir: Path, host: str = "127.0.0.1", port: int | None = None, extra: str = ""):
        super().__init__("mosquitto", workdir / "mosquitto.log")
        self.host = host
        self.port = port or free_port(host)
        self.conf = workdir / "mosquitto.conf"
        user = "user root\n" if os.geteuid() == 0 else ""
        self.conf.write_text(f"{user}listener {self.port} {host}\nallow_anonymous true\npersistence false\n{extra}")
        self.binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> Broker:
        if not Path(self.binary).exists():
            raise AssertionError("mosquitto is not installed: apt-get install mosquitto (.ci/run does)")
        self.spawn([self.binary, "-c", str(self.conf)], clean_env())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return self
            except OSError:
                if not self.alive():
                    break
                time.sleep(0.02)
        raise AssertionError(f"mosquitto did not start on {self.url}:\n{self.tail()}")


class Server(Proc):
    """``fedlora-server`` with a JSON config, its state directory and its HTTP port."""

    def __init__(
        self, workdir: Path, bundle: Path, broker_url: str, job: str, state_dir: Path | None = None, **overrides
    ):
        super().__init__("fedlora-server", workdir / "server.log")
        self.port = free_port()
        self.state_dir = state_dir or workdir / "state"
        self.config = workdir / "server.json"
        cfg = {
            "job": job,
            "bundle": str(bundle),
            "state_dir": str(self.state_dir),
            "http_host": "127.0.0.1",
            "http_port": self.port,
            "broker": {"url": broker_url, "protocol": "3.1.1"},
            "exit_when_finished": True,
            "chunk_repair_after_s": 1.0,
            "rounds": {"rounds": 1, "min_devices": 1, "round_timeout": 120, "max_weight_ratio": 0},
            "train": {"local_steps": 20, "batch_size": 4},
        }
        self.config.write_text(json.dumps(deep_merge(cfg, overrides)))

    def start(self, fault: str = "") -> Server:
        return self.spawn(
            [str(SERVER), "--config", str(self.config)], clean_env(**({FAULT_ENV: fault} if fault else {}))
        )

    def get(self, path: str) -> tuple[int, str]:
        return http_get(f"http://127.0.0.1:{self.port}{path}")

    def metrics(self) -> str:
        code, text = self.get("/metrics")
        return text if code == 200 else ""

    def store(self):
        from server.store import StateStore

        return StateStore(self.state_dir)

    def load(self) -> dict | None:
        """The committed state, the open round's logged updates added to it by the job's strategy."""
        from server.strategies import make_strategy
        from server.strategies.base import AdapterLayout

        cfg = json.loads(self.config.read_text())
        manifest = bundle_of(Path(cfg["bundle"])).manifest
        strategy = make_strategy(
            cfg.get("strategy", "fedavg"), AdapterLayout.from_manifest(manifest), rank=manifest.rank
        )
        store = self.store()
        try:
            return store.load(strategy)
        finally:
            store.close()

    def events(self, kind: str | None = None) -> list[dict]:
        store = self.store()
        try:
            return [e for e in store.events() if kind is None or e.get("event") == kind]
        finally:
            store.close()


def write_device_data(path: Path, rows: int = 24) -> Path:
    labels = ("business", "entertainment", "politics", "sports", "tech")
    path.write_text(
        "text,label\n" + "".join(f"story number {i} about {labels[i % 5]},{labels[i % 5]}\n" for i in range(rows))
    )
    return path


class DeviceProc(Proc):
    """A real device: ``python -m edge_client.cli run --config device.json`` in the device
    environment, optionally inside a network namespace (``ip netns exec``)."""

    def __init__(
        self,
        workdir: Path,
        edge_python: str,
        bundle: Path,
        broker_url: str,
        job: str,
        device_id: str,
        netns: str = "",
        **overrides,
    ):
        workdir.mkdir(parents=True, exist_ok=True)
        super().__init__(device_id, workdir / "device.log")
        self.device_id = device_id
        self.state_dir = workdir / "state"
        self.config = workdir / "device.json"
        cfg = {
            "device_id": device_id,
            "job": job,
            "bundle": str(bundle),
            "data": str(write_device_data(workdir / "local.csv")),
            "state_dir": str(self.state_dir),
            "threads": 1,
            "exit_when_finished": True,
            "broker": {"url": broker_url, "protocol": "3.1.1"},
        }
        self.config.write_text(json.dumps(deep_merge(cfg, overrides)))
        command = [edge_python, "-m", "edge_client.cli", "run", "--config", str(self.config)]
        self.command = ["ip", "netns", "exec", netns, *command] if netns else command

    def start(self, fault: str = "") -> DeviceProc:
        return self.spawn(self.command, clean_env(**({FAULT_ENV: fault} if fault else {})))


# -- hand-driven devices ------------------------------------------------------------------
class HandDevice:
    """A device driven by the test: its status is online (retained), it publishes real encoded
    update envelopes (every tensor filled with ``value``, weight ``weight``) and records every
    ack. In auto mode (``auto.set()``) it behaves like a device: it sends its update for each
    open round that selects it, resends it every ``resend_s`` seconds, at once when the round is
    announced again (an aggregator restart) and ``retry_s`` after a ``retry_later``, until the
    round's update is acknowledged; a repair request gets the whole update again."""

    def __init__(
        self,
        url: str,
        job: str,
        device_id: str,
        bundle: Bundle,
        value: float,
        weight: int,
        resend_s: float = 2.0,
        retry_s: float = 0.5,
        chunk: int = 60_000,
    ):
        self.id = device_id
        self.job = job
        self.topics = Topics(job)
        self.manifest = bundle.manifest
        self.value = np.float32(value)
        self.weight = int(weight)
        self.resend_s = resend_s
        self.retry_s = retry_s
        self.chunk = chunk
        self.link = MqttLink(BrokerConfig(url=url, protocol="3.1.1"), client_id=f"hand-{job}-{device_id}").connect()
        self.link.subscribe(self.topics.ack(device_id))
        self.link.subscribe(self.topics.round)
        self.lock = threading.Lock()
        self.acks: list[dict] = []
        self.announcement: dict | None = None
        self.sends: list[tuple[int, float]] = []  # (round, monotonic time) of every whole send
        self.auto = threading.Event()
        self._stop = threading.Event()
        self._fresh = False  # an announcement arrived since our last send
        self._retry_at: float | None = None
        self._last_send: tuple[int, float] | None = None
        self._payloads: dict[tuple[int, int], bytes] = {}
        self._thread = threading.Thread(target=self._loop, name=f"hand-{device_id}", daemon=True)
        self._thread.start()

    def online(self) -> None:
        self.link.publish(
            self.topics.status(self.id),
            json.dumps({"state": "online", "rank": self.manifest.rank}).encode(),
            retain=True,
        ).wait_for_publish(5)

    def payload(self, rnd: int, base_version: int) -> bytes:
        key = (rnd, base_version)
        if key not in self._payloads:
            tensors = {p.name: np.full(p.shape, self.value, np.float32) for p in self.manifest.trainable}
            self._payloads[key] = encode_envelope(
                Envelope(
                    kind="update",
                    job=self.job,
                    round=rnd,
                    sender=self.id,
                    rank=self.manifest.rank,
                    codec="fp32",
                    tensors=tensors,
                    num_examples=self.weight,
                    base_version=base_version,
                )
            )
        return self._payloads[key]

    def send(self, rnd: int, base_version: int) -> None:
        """Publish the whole update for round ``rnd`` (QoS 1, waiting for the broker's PUBACKs)."""
        with self.lock:
            self._last_send = (rnd, time.monotonic())
            self._fresh = False
            self._retry_at = None
            self.sends.append(self._last_send)
        with self.lock:
            shards = (self.announcement or {}).get("shards", 1)  # a sharded job: our shard's topic
        try:
            for c in split_chunks(self.payload(rnd, base_version), self.chunk):
                self.link.publish(self.topics.update_for(self.id, shards), c).wait_for_publish(5)
        except (RuntimeError, ValueError, OSError):
            pass  # not connected: the next resend goes out

    def open_round(self) -> dict | None:
        with self.lock:
            ann = self.announcement
        return ann if ann and ann.get("state") == "open" else None

    def accepted_rounds(self) -> set[int]:
        with self.lock:
            return {a["round"] for a in self.acks if a.get("result") == "accepted"}

    def acks_for(self, rnd: int) -> list[dict]:
        with self.lock:
            return [a for a in self.acks if a.get("round") == rnd and a.get("result") != "incomplete"]

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.link.inbox.get(timeout=0.05)
            except queue.Empty:
                msg = None
            if msg is not None and msg.payload:
                data = json.loads(msg.payload)
                with self.lock:
                    if msg.topic == self.topics.round:
                        self.announcement = data
                        self._fresh = True
                    else:
                        data["_t"] = time.monotonic()
                        self.acks.append(data)
                        if data.get("result") == "incomplete":
                            self._fresh = True  # a repair request: send it all again
                        elif data.get("reason") == "retry_later":
                            self._retry_at = time.monotonic() + self.retry_s
            if self.auto.is_set():
                self._maybe_send()

    def _maybe_send(self) -> None:
        ann = self.open_round()
        if ann is None or self.id not in ann.get("selected", ()):
            return
        rnd = ann["round"]
        if rnd in self.accepted_rounds():
            return
        with self.lock:
            last, fresh, retry_at = self._last_send, self._fresh, self._retry_at
        now = time.monotonic()
        due = (
            last is None
            or last[0] != rnd
            or fresh
            or now - last[1] >= self.resend_s
            or (retry_at is not None and now >= retry_at)
        )
        if due:
            self.send(rnd, ann["global_version"])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.link.close()


@functools.cache
def bundle_of(path: Path) -> Bundle:
    """The verified bundle at ``path``, checked once per test session (hashing it takes a while)."""
    return Bundle(path)


def hand_devices(url: str, job: str, bundle_dir: Path, count: int, **kw) -> list[HandDevice]:
    """``count`` hand-driven devices d0, d1, ... with weights 1, 10, 100, ... and values
    1e-4, 2e-4, ... (small: under the first round's norm bound)."""
    bundle = bundle_of(Path(bundle_dir))
    return [HandDevice(url, job, f"d{i}", bundle, value=1e-4 * (i + 1), weight=10**i, **kw) for i in range(count)]


def expected_average(counted: list[HandDevice]) -> float:
    """The FedAvg change of every tensor for the updates of ``counted`` (each once)."""
    total = sum(d.weight for d in counted)
    return sum(float(d.value) * d.weight for d in counted) / total


# -- network namespace with random loss ---------------------------------------------------
class LossyLink:
    """A network namespace joined to the host by a veth pair on a private /30, with nftables
    dropping ``percent`` % of the packets crossing the host's end of the veth in each direction
    (never on lo). Everything is removed by ``close``."""

    class Unavailable(Exception):
        """Namespaces or nftables cannot be used here (no privilege, no kernel support)."""

    def __init__(self, percent: int):
        tag = f"{os.getpid() % 100000}"
        self.ns = f"fl-loss-{tag}"
        self.host_if = f"flh{tag}"
        self.dev_if = f"fld{tag}"
        self.table = f"fedlora_loss_{tag}"
        base = (os.getpid() % 16000) * 4  # a /30 of 10.234.0.0/16 of our own
        self.host_ip = f"10.234.{base // 256}.{base % 256 + 1}"
        self.dev_ip = f"10.234.{base // 256}.{base % 256 + 2}"
        self.percent = percent
        self._made: list[str] = []

    @staticmethod
    def available() -> str | None:
        """None, or why namespaces and nftables cannot be used here."""
        for tool in ("ip", "nft"):
            if shutil.which(tool) is None:
                return f"`{tool}` is not installed (apt-get install iproute2 nftables)"
        if os.geteuid() != 0:
            return "network namespaces and nftables need root"
        probe = subprocess.run(["ip", "netns", "list"], check=False, capture_output=True, text=True)
        if probe.returncode != 0:
            return f"`ip netns` does not work here: {probe.stderr.strip()}"
        probe = subprocess.run(["nft", "list", "tables"], check=False, capture_output=True, text=True)
        if probe.returncode != 0:
            return f"`nft` does not work here: {probe.stderr.strip()}"
        return None

    @staticmethod
    def _run(*args: str) -> str:
        out = subprocess.run(list(args), check=False, capture_output=True, text=True)
        if out.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed: {out.stderr.strip()}")
        return out.stdout

    def open(self) -> LossyLink:
        run = self._run
        try:
            run("ip", "netns", "add", self.ns)
        except AssertionError as exc:
            raise self.Unavailable(str(exc)) from None
        self._made.append("ns")
        run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.dev_if)
        self._made.append("veth")
        run("ip", "link", "set", self.dev_if, "netns", self.ns)
        run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        run("ip", "link", "set", self.host_if, "up")
        run("ip", "netns", "exec", self.ns, "ip", "addr", "add", f"{self.dev_ip}/30", "dev", self.dev_if)
        run("ip", "netns", "exec", self.ns, "ip", "link", "set", self.dev_if, "up")
        run("ip", "netns", "exec", self.ns, "ip", "link", "set", "lo", "up")
        rules = (
            f"table inet {self.table} {{\n"
            f"  chain input {{\n    type filter hook input priority 0; policy accept;\n"
            f'    iifname "{self.host_if}" numgen random mod 100 < {self.percent} counter drop\n  }}\n'
            f"  chain output {{\n    type filter hook output priority 0; policy accept;\n"
            f'    oifname "{self.host_if}" numgen random mod 100 < {self.percent} counter drop\n  }}\n'
            f"}}\n"
        )
        out = subprocess.run(["nft", "-f", "-"], input=rules, check=False, capture_output=True, text=True)
        if out.returncode != 0:
            raise AssertionError(f"nft -f failed: {out.stderr.strip()}\n{rules}")
        self._made.append("table")
        return self

    def dropped(self) -> int:
        """Packets the loss rules dropped so far (both directions)."""
        text = self._run("nft", "list", "table", "inet", self.table)
        return sum(int(n) for n in re.findall(r"counter packets (\d+) bytes", text))

    def close(self) -> None:
        if "table" in self._made:
            subprocess.run(["nft", "delete", "table", "inet", self.table], check=False, capture_output=True)
        if "veth" in self._made:
            subprocess.run(["ip", "link", "del", self.host_if], check=False, capture_output=True)
        if "ns" in self._made:
            subprocess.run(["ip", "netns", "del", self.ns], check=False, capture_output=True)
        self._made.clear()
