"""Simulations of thousands of devices: time per round over a pool of Ray workers, and where it saturates.

Each configuration is one real ``fedlora simulate`` run in its own process: the embedded
Mosquitto, the aggregator, and N virtual devices (each its own data shard, identity and state
folder) multiplexed over W Ray workers with one ONNX Runtime session each (``--workers``), a
fraction of them sampled per round (``--participation``). The baseline, in the same
invocation: the same job at a size one process per device can hold (``--workers 0``).

The model is the tests' cached MiniLM-L6 export (real weights, rank 4, 32 tokens: devkit's
one cached-export rule), so that the measure is the fleet's machinery and not one model's step.
Writes ``docs/fleet_bench.png`` and the section of ``docs/benchmarks.md``.

    .venv/bin/python bench/fleet_bench.py --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # devkit: the benchmarks' and tests' kit, not installed

from devkit.assets import minilm_bbc_export  # noqa: E402
from devkit.docsection import DocSection, command_line  # noqa: E402

SECTION = DocSection("fleet_bench", "bench/fleet_bench.py", "## Thousands of simulated devices on Ray")
PNG = ROOT / "docs" / "fleet_bench.png"
# (devices, workers, participation): the baseline (one process per device) and the pool at the
# same size, then the pool growing at 5% participation, and 1 vs 2 workers at 1,000 devices.
CONFIGS = [
    (20, 0, 0.5),
    (20, 2, 0.5),
    (250, 2, 0.05),
    (500, 2, 0.05),
    (1000, 1, 0.05),
    (1000, 2, 0.05),
    (1500, 2, 0.05),
]


def bundle() -> Path:
    return minilm_bbc_export() / "r4"


def run_one(devices: int, workers: int, participation: float, args, bundle_dir: Path) -> dict:
    out = ROOT / "runs" / "bench" / f"fleet-{devices}-w{workers}"
    cmd = [
        sys.executable,
        "-m",
        "simulator.cli",
        "simulate",
        "--bundle",
        str(bundle_dir),
        "--devices",
        str(devices),
        "--workers",
        str(workers),
        "--participation",
        str(participation),
        "--rounds",
        str(args.rounds),
        "--local-steps",
        str(args.local_steps),
        "--batch-size",
        "8",
        "--split",
        "iid",
        "--eval-max",
        "100",
        "--out",
        str(out),
        "--device-python",
        args.device_python,
    ]
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.monotonic() - started
    terminal = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"{devices} devices, {workers} workers: fedlora simulate failed:\n{terminal[-4000:]}")
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rounds = [h["duration_s"] for h in history if "duration_s" in h]
    return {
        "devices": devices,
        "workers": workers,
        "participation": participation,
        "sampled": history[-1]["selected"],
        "rounds_ok": sum(h["ok"] for h in history),
        "round_median_s": statistics.median(rounds),
        "first_round_s": rounds[0],
        "wall_s": wall,
        "setup_s": wall - sum(rounds),
        "tracebacks": terminal.count("Traceback"),
        "accuracy": (history[-1].get("eval") or {}).get("accuracy"),
    }


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for workers in sorted({r["workers"] for r in rows if r["participation"] == 0.05}):
        pts = sorted((r["devices"], r["round_median_s"], r["setup_s"]) for r in rows if r["workers"] == workers)
        pts = [p for p in pts if p[0] >= 250]
        left.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"round, {workers} worker(s)")
        right.plot([p[0] for p in pts], [p[2] for p in pts], marker="s", label=f"set-up, {workers} worker(s)")
    left.set_xlabel("devices (5% sampled per round)")
    left.set_ylabel("median seconds per round")
    right.set_xlabel("devices")
    right.set_ylabel("seconds outside rounds (start, load, report)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(PNG, dpi=110)


def render(rows: list[dict], args, load: tuple[float, float, float]) -> str:
    head = (
        "| devices | workers | sampled per round | rounds ok | round median (s) | first round (s) | "
        "outside rounds (s) | run (s) | final accuracy | tracebacks |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {r['devices']} | {r['workers'] or 'none: a process per device'} | {r['sampled']} | {r['rounds_ok']} | "
        f"{r['round_median_s']:.1f} | {r['first_round_s']:.1f} | {r['setup_s']:.0f} | {r['wall_s']:.0f} | "
        f"{r['accuracy'] if r['accuracy'] is None else format(r['accuracy'], '.3f')} | {r['tracebacks']} |\n"
        for r in rows
    )
    return (
        f"MiniLM-L6 (real weights) rank 4 at 32 tokens, BBC News (1,780 training articles) split IID over the devices, "
        f"{args.rounds} rounds of {args.local_steps} local steps of 8, the embedded Mosquitto, all in one "
        f"invocation on a shared 2-core machine (load average before the runs {load[0]:.1f}, {load[1]:.1f}, "
        f"{load[2]:.1f}). Outside rounds: the run's wall time less its rounds (data split and shards, "
        "Ray and the workers starting, every device's state loaded, evaluation of the last round, the report).\n\n"
        + head
        + body
        + "\n![time per round and set-up against devices](fleet_bench.png)\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--configs", help="devices:workers:participation,... (default: the table in the script)")
    parser.add_argument("--device-python", default=str(ROOT / ".venv-edge" / "bin" / "python"))
    args = parser.parse_args()
    configs = CONFIGS
    if args.configs:
        configs = [(int(d), int(w), float(p)) for d, w, p in (c.split(":") for c in args.configs.split(","))]
    load = os.getloadavg()
    bundle_dir = bundle()
    rows = []
    for devices, workers, participation in configs:
        rows.append(run_one(devices, workers, participation, args, bundle_dir))
        print(json.dumps(rows[-1]), flush=True)
    plot(rows)
    body = render(rows, args, load)
    SECTION.write(command_line("bench/fleet_bench.py", sys.argv[1:]), body, f"({datetime.now():%Y-%m-%d})")
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
