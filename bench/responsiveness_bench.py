"""Does a device answer while it trains? Ack latency and terminal tracebacks of ``fedlora simulate``.

Two configurations of the same small job, run one after the other in this invocation:

- ``before``: what ``fedlora simulate`` did before training moved to a child process: the embedded amqtt broker and each
  device training in its own process's main thread (``FEDLORA_DEVICE_ISOLATE_TRAINING=false``),
  so ONNX Runtime's step holds the GIL that paho's network thread needs;
- ``after``: today's defaults: the embedded Mosquitto (amqtt where Mosquitto is not installed)
  and the training step in a child process of the device.

Per update (device, round): the ack latency, from the device's log line "update sent" to
"update accepted"; how often a device sent a round's update again for want of an ack; and the
number of tracebacks in the simulator's terminal (stdout and stderr of ``fedlora simulate``).
Rows are appended to ``docs/responsiveness_bench.json`` and the section of
``docs/benchmarks.md`` renders them all.

    .venv/bin/python bench/responsiveness_bench.py --devices 8 --rounds 3 --max-train 1200
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # devkit: the benchmarks' and tests' kit, not installed

from devkit.docsection import DocSection, command_line  # noqa: E402

SECTION = DocSection("responsiveness_bench", "bench/responsiveness_bench.py", "## A device that trains still answers")
RESULTS = ROOT / "docs" / "responsiveness_bench.json"  # every invocation's rows; the section renders them all
CONFIGS = {
    "before": (["--embedded-broker", "amqtt"], {"FEDLORA_DEVICE_ISOLATE_TRAINING": "false"}),
    "after": ([], {}),
}
LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ [\w.]+: round (\d+): (update sent|update accepted)")


def ack_latencies(devices_dir: Path) -> tuple[list[float], int]:
    """Seconds from a round's first "update sent" to its "update accepted", over every device;
    and how many sends were repeats of a round already sent."""
    latencies, repeats = [], 0
    for log in sorted(devices_dir.glob("*/device.log")):
        sent: dict[str, datetime] = {}
        for line in log.read_text(errors="replace").splitlines():
            m = LINE.match(line)
            if not m:
                continue
            at = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f")
            if m[3] == "update sent":
                repeats += m[2] in sent
                sent.setdefault(m[2], at)
            elif m[2] in sent:
                latencies.append((at - sent[m[2]]).total_seconds())
    return latencies, repeats


def default_bundle() -> Path:
    """The rank-8 bundle ``fedlora simulate`` exports for BBC News by default (cached)."""
    from simulator.datasets import load_dataset
    from simulator.run import default_model_dir, ensure_bundle

    labels = load_dataset("bbc-news").labels
    return ensure_bundle(default_model_dir(), labels, (8,), 128, ROOT / ".cache" / "fedlora") / "r8"


def thread_stalls(bundle_dir: Path, steps: int = 10) -> list[dict]:
    """How long another Python thread of the device's process (paho's network thread, in the
    device) goes without running while the device trains: the longest gap between the ticks
    of a thread that wakes every millisecond, with the trainer in this process and in a child."""
    import threading

    import numpy as np

    from core.bundle import Bundle
    from edge_client.data import Batch
    from edge_client.runtime import RuntimeOptions, Trainer
    from edge_client.trainer_process import TrainerProcess

    bundle = Bundle(bundle_dir)
    length = bundle.manifest.max_length
    ids = np.random.default_rng(0).integers(5, 1000, (8, length)).astype(np.int64)
    batch = Batch(ids, np.ones_like(ids), np.zeros(8, dtype=np.int64))
    rows = []
    for name, make in (
        ("in the device's process", lambda: Trainer(bundle, options=RuntimeOptions(intra_op_threads=1))),
        ("in a child process", lambda: TrainerProcess(bundle, options=RuntimeOptions(intra_op_threads=1))),
    ):
        trainer = make()
        trainer.train_step(batch)
        ticks: list[float] = []
        stop = threading.Event()

        thread = threading.Thread(target=_tick, args=(ticks, stop))
        thread.start()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            trainer.train_step(batch)
            times.append(time.perf_counter() - t0)
        stop.set()
        thread.join()
        if isinstance(trainer, TrainerProcess):
            trainer.close()
        gaps = np.diff(ticks)
        rows.append({"trainer": name, "step_median_s": statistics.median(times), "longest_stall_s": float(gaps.max())})
    return rows


def _count(path: Path, text: str) -> int:
    return path.read_text(errors="replace").count(text) if path.exists() else 0


def _tick(ticks: list[float], stop) -> None:
    while not stop.is_set():
        ticks.append(time.perf_counter())
        time.sleep(0.001)


def run_one(name: str, args) -> dict:
    flags, env = CONFIGS[name]
    out = ROOT / "runs" / "bench" / f"responsiveness-{name}"
    cmd = [
        sys.executable,
        "-m",
        "simulator.cli",
        "simulate",
        "--devices",
        str(args.devices),
        "--rounds",
        str(args.rounds),
        "--max-train",
        str(args.max_train),
        "--eval-max",
        str(args.eval_max),
        "--batch-size",
        str(args.batch_size),
        "--seed",
        "0",
        "--out",
        str(out),
        "--device-python",
        args.device_python,
        *flags,
    ]
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True)
    wall = time.monotonic() - started
    terminal = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"{name}: fedlora simulate failed ({proc.returncode}):\n{terminal[-4000:]}")
    latencies, repeats = ack_latencies(out / "devices")
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {
        "config": name,
        "updates": len(latencies),
        "ack_median_s": statistics.median(latencies),
        "ack_max_s": max(latencies),
        "repeats": repeats,
        "tracebacks": terminal.count("Traceback"),
        # amqtt gives a delivery up after 5 s without the client's PUBACK (its log, one line each)
        "broker_timeouts": _count(
            out / "broker.log", "WARNING amqtt.mqtt.protocol.handler: Timeout waiting for PUBACK"
        ),
        "round_median_s": statistics.median(h["duration_s"] for h in history),
        "wall_s": wall,
    }


def render_stalls(rows: list[dict]) -> str:
    head = "| training step | step median (s) | longest stall of another thread (s) |\n|---|---|---|\n"
    body = "".join(f"| {r['trainer']} | {r['step_median_s']:.3f} | {r['longest_stall_s']:.3f} |\n" for r in rows)
    return (
        "Why a child process: another thread of the device's process, waking every millisecond, while the "
        "device trains 10 steps of 8 examples (MiniLM-L6 rank 8, 128 tokens, 1 ONNX Runtime "
        "thread). ONNX Runtime's training step holds the GIL from start to end, so in one process the network "
        "thread stalls for a whole step; calling paho's `loop()` between steps would leave the same stall. "
        "With the step in a child process the device's process only waits on a pipe.\n\n" + head + body
    )


def render(rows: list[dict]) -> str:
    head = (
        "| devices | batch | rounds | configuration | updates | ack latency median (s) | ack latency max (s) | "
        "updates sent again | deliveries the broker gave up | tracebacks in the terminal | round median (s) | "
        "run (s) | load average before |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    labels = {
        "before": "before: embedded amqtt, training on the device's main thread",
        "after": "after: embedded Mosquitto, training in a child process",
    }
    body = "".join(
        f"| {r['devices']} | {r['batch_size']} | {r['rounds']} | {labels[r['config']]} | {r['updates']} | {r['ack_median_s']:.2f} | "
        f"{r['ack_max_s']:.2f} | {r['repeats']} | {r.get('broker_timeouts', 'not counted')} | {r['tracebacks']} | {r['round_median_s']:.1f} | {r['wall_s']:.0f} | "
        f"{r['load']} |\n"
        for r in rows
    )
    return (
        "BBC News, MiniLM-L6 rank 8 at 128 tokens, device processes training the default 20 steps per round on "
        f"{rows[0]['max_train']} training examples; before and after run one after the "
        "other in one invocation (a row pair per invocation), on a shared 2-core machine. Ack latency: from a device's "
        "log line `update sent` to `update accepted`, per update; a larger batch makes each step (and so each "
        "stall of the network thread) longer.\n\n" + head + body
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-train", type=int, default=1200)
    parser.add_argument("--eval-max", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8, help="larger: longer steps (the stall grows with them)")
    parser.add_argument("--device-python", default=str(ROOT / ".venv-edge" / "bin" / "python"))
    parser.add_argument("--configs", default="before,after")
    args = parser.parse_args()
    load = os.getloadavg()
    stalls = thread_stalls(default_bundle())
    print(json.dumps(stalls), flush=True)
    rows = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    for name in args.configs.split(","):
        row = run_one(name, args)
        row.update(devices=args.devices, batch_size=args.batch_size, rounds=args.rounds, max_train=args.max_train)
        row["load"] = ", ".join(f"{x:.1f}" for x in load)
        rows.append(row)
        RESULTS.write_text(json.dumps(rows, indent=1) + "\n")
        print(json.dumps(row), flush=True)
    argv = [a for a in sys.argv[1:]]
    body = render(rows) + "\n" + render_stalls(stalls)
    SECTION.write(command_line("bench/responsiveness_bench.py", argv), body, f"({datetime.now():%Y-%m-%d})")
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
