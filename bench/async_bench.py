"""Synchronous against asynchronous rounds under an availability schedule: time to accuracy.

Two real ``fedlora simulate`` runs, one after the other in one invocation, on the same data
split, the same devices and the same availability schedule (``--availability``,
``--mean-session-s``: each device online a fraction of the wall-clock time in sessions,
seeded) and the same stragglers (``--stragglers`` of them ``--straggler-slowdown`` times slower):

1. sync: FedAvg rounds; each round samples every device online when it opens and closes when
   they all reported or went offline;
2. async (FedBuff): every online device trains whenever it can; a version every
   ``--buffer-size`` updates, stale ones weighted ``(1 + s) ** -0.5``.

Each device is its own process (MiniLM-L6 rank 8 with real weights, the tests' cached export at
32 tokens), against the embedded Mosquitto. The async run gets ``--async-updates`` times the
updates the sync run took, so that it can reach the sync run's final accuracy if it will. The
figure: the wall time (from the devices' start) at which the async run's global adapter first
scores at least the sync run's final accuracy, over the sync run's wall time.
With ``--seeds 0,1,2,3`` the pair runs once per seed (another split, schedule and set of
stragglers each) and the section leads with every seed's ratio and their median; the detailed
tables and the plot are the first seed's. Writes ``docs/async_bench.png`` and the section of
``docs/benchmarks.md``.

    .venv/bin/python bench/async_bench.py [--seeds 0,1,2,3]
"""

from __future__ import annotations

import argparse
import json
import math
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

SECTION = DocSection(
    "async_bench", "bench/async_bench.py", "## Asynchronous rounds under an availability schedule: time to accuracy"
)
PNG = ROOT / "docs" / "async_bench.png"


def bundle(rank: int) -> Path:
    return minilm_bbc_export() / f"r{rank}"


def common_args(args, bundle_dir: Path) -> list[str]:
    return [
        "--bundle",
        str(bundle_dir),
        "--dataset",
        "bbc-news",
        "--devices",
        str(args.devices),
        "--split",
        args.split,
        "--local-steps",
        str(args.local_steps),
        "--batch-size",
        "8",
        "--eval-max",
        str(args.eval_max),
        "--availability",
        str(args.availability),
        "--mean-session-s",
        str(args.mean_session_s),
        "--stragglers",
        str(args.stragglers),
        "--straggler-slowdown",
        str(args.straggler_slowdown),
        "--seed",
        str(args.seed),
        "--device-python",
        args.device_python,
    ]


def run_one(name: str, extra: list[str], args, bundle_dir: Path) -> dict:
    out = run_folder(name, args.seed)
    cmd = [sys.executable, "-m", "simulator.cli", "simulate", *common_args(args, bundle_dir), "--out", str(out)]
    cmd += extra
    print(f"[async_bench] {name}: {' '.join(cmd[3:])}", flush=True)
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    terminal = proc.stdout + proc.stderr
    (out / "terminal.log").write_text(terminal)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: fedlora simulate failed:\n{terminal[-4000:]}")
    (out / "bench_wall_s.txt").write_text(f"{time.monotonic() - started:.1f}\n")
    return load_run(name, args.seed)


def run_folder(name: str, seed: int) -> Path:
    return ROOT / "runs" / "bench" / f"async-bench-{name}-seed{seed}"


def load_run(name: str, seed: int) -> dict:
    """What a finished run left in its folder: its history, updates, losses and tracebacks."""
    out = run_folder(name, seed)
    terminal = (out / "terminal.log").read_text()
    wall = float((out / "bench_wall_s.txt").read_text()) if (out / "bench_wall_s.txt").is_file() else float("nan")
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    events = [json.loads(x) for x in (out / "aggregator" / "events.jsonl").read_text().splitlines()]
    lost = sum(
        (d / "device.log").read_text().count("the update is lost") for d in (out / "devices").iterdir() if d.is_dir()
    )
    return {
        "name": name,
        "history": history,
        "wall_s": wall,
        "updates": sum(e["event"] == "update_accepted" for e in events),
        "rejected": sum(e["event"] == "update_rejected" for e in events),
        "lost": lost,
        "tracebacks": terminal.count("Traceback"),
    }


def curve(run: dict) -> list[tuple[float, float]]:
    """(wall time since the devices started, accuracy) of every evaluated round or version."""
    return [(h["time_s"], h["eval"]["accuracy"]) for h in run["history"] if h.get("eval") and "time_s" in h]


def time_to(run: dict, target: float) -> float | None:
    """When the run's global adapter first scored at least ``target`` (None: never)."""
    return next((t for t, acc in curve(run) if acc >= target - 1e-9), None)


def time_to_sustained(run: dict, target: float, window: int = 3) -> float | None:
    """When ``window`` evaluations in a row first averaged at least ``target``, at the last of
    them (a single evaluation on 200 articles moves by about 0.015 by chance; None: never)."""
    pts = curve(run)
    for i in range(len(pts) - window + 1):
        if sum(acc for _, acc in pts[i : i + window]) / window >= target - 1e-9:
            return pts[i + window - 1][0]
    return None


def plot(sync: dict, asyn: dict, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for run, label, marker in ((sync, "sync rounds (FedAvg)", "o"), (asyn, "async (FedBuff)", ".")):
        pts = curve(run)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=label)
    ax.axhline(target, color="grey", linestyle=":", label=f"sync final accuracy {target:.3f}")
    ax.set_xlabel("wall time since the devices started (s)")
    ax.set_ylabel("test accuracy (global adapter)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(PNG, dpi=110)


def summary(run: dict) -> dict:
    rows = [h for h in run["history"] if "participants" in h]
    stale = [h.get("staleness_mean", 0.0) for h in rows]
    last = rows[-1]
    return {
        "rounds": len(rows),
        "wall": last["time_s"],
        "final": (last.get("eval") or {}).get("accuracy"),
        "online_mean": sum(h["online"] for h in rows) / len(rows),
        "per_round": sum(h["participants"] for h in rows) / len(rows),
        "staleness_mean": sum(stale) / len(stale),
        "staleness_max": max(h.get("staleness_max", 0) for h in rows),
    }


def render(sync: dict, asyn: dict, args, load: tuple[float, float, float]) -> tuple[str, dict]:
    s, a = summary(sync), summary(asyn)
    target = s["final"]
    reached = time_to(asyn, target)
    ratio = reached / s["wall"] if reached is not None else None
    held = time_to_sustained(asyn, target)
    held_ratio = held / s["wall"] if held is not None else None
    durations = [h["duration_s"] for h in sync["history"] if "duration_s" in h and "participants" in h]
    best_at, best = max(curve(asyn), key=lambda point: (point[1], -point[0]), default=(None, None))
    result = {
        "sync_final": target,
        "sync_wall": s["wall"],
        "sync_round_median": statistics.median(durations) if durations else float("nan"),
        "async_reached": reached,
        "ratio": ratio,
        "async_sustained": held,
        "sustained_ratio": held_ratio,
        "async_best": best,  # the async run's best evaluation, and when it first scored it
        "async_best_at": best_at,
    }
    head = (
        "| mode | rounds / versions | updates taken | updates lost offline | refused | online (mean) "
        "| updates per round / version | staleness mean (max) | wall time (s) | final accuracy "
        "| reaches the sync final accuracy at (s) | 3 evaluations in a row average it at (s) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    body = ""
    for run, x, mode in ((sync, s, "sync"), (asyn, a, f"async, buffer {args.buffer_size}")):
        at = x["wall"] if run is sync else reached
        kept = time_to_sustained(sync, target) if run is sync else held
        body += (
            f"| {mode} | {x['rounds']} | {run['updates']} | {run['lost']} | {run['rejected']} | {x['online_mean']:.1f} "
            f"| {x['per_round']:.1f} | {x['staleness_mean']:.2f} ({x['staleness_max']}) | {x['wall']:.0f} "
            f"| {x['final']:.3f} | {'never' if at is None else format(at, '.0f')} "
            f"| {'never' if kept is None else format(kept, '.0f')} |\n"
        )
    verdict = (
        f"**Async reached the sync run's final accuracy ({target:.3f}, after {s['wall']:.0f} s) at "
        f"{reached:.0f} s: {ratio:.2f}x the wall time** (the target: at most 0.6x)"
        + (
            f"; three async evaluations in a row averaged at least that by {held:.0f} s ({held_ratio:.2f}x)."
            if held is not None and held_ratio is not None
            else "; three async evaluations in a row never averaged that."
        )
        if reached is not None and ratio is not None
        else f"**Async never reached the sync run's final accuracy ({target:.3f}) in {a['wall']:.0f} s.**"
    )
    levels = sorted({0.8, 0.9, 0.92, round(target, 4)})
    ladder = "| accuracy | sync reaches it at (s) | async (s) | async / sync |\n|---|---|---|---|\n"
    for level in levels:
        ts, ta = time_to(sync, level), time_to(asyn, level)
        share = f"{ta / ts:.2f}" if ts and ta is not None else ""
        ladder += f"| {level:.3f} | {_secs(ts)} | {_secs(ta)} | {share} |\n"
    text = (
        f"MiniLM-L6 (real weights) rank 8 at 32 tokens, BBC News ({args.split} split over {args.devices} devices, "
        f"each its own process), {args.local_steps} local steps of 8 examples per update, the embedded Mosquitto. "
        f"Availability: each device online {args.availability:.0%} of the wall-clock time in sessions of "
        f"{args.mean_session_s:g} s on average (offline ones {args.mean_session_s * (1 - args.availability) / args.availability:g} s), "
        f"{args.stragglers:.0%} of the devices {args.straggler_slowdown:g}x slower; the same devices, data and "
        f"schedule in both runs (seed {args.seed}). Accuracy on {args.eval_max} test articles, evaluated after every "
        f"sync round and every {args.async_eval_every} async versions; wall time from the devices' start to the "
        f"round's (version's) close. Both runs in one invocation on a shared 2-core machine (load average before "
        f"{load[0]:.1f}, {load[1]:.1f}, {load[2]:.1f}).\n\n" + verdict + "\n\n" + head + body + "\n"
        "\nTime to each accuracy (first evaluation at or above it):\n\n" + ladder + "\n"
        "![accuracy against wall time, sync and async](async_bench.png)\n"
    )
    return text, result


def _secs(t: float | None) -> str:
    return "never" if t is None else f"{t:.0f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--sync-rounds", type=int, default=12)
    parser.add_argument("--buffer-size", type=int, default=5)
    parser.add_argument("--async-updates", type=float, default=1.5, help="async updates / the sync run's updates")
    parser.add_argument("--async-eval-every", type=int, default=1)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--split", default="dirichlet")
    parser.add_argument("--availability", type=float, default=0.3)
    parser.add_argument("--mean-session-s", type=float, default=60.0)
    parser.add_argument("--stragglers", type=float, default=0.2)
    parser.add_argument("--straggler-slowdown", type=float, default=5.0)
    parser.add_argument("--eval-max", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", default="", help="comma-separated: one sync/async pair per seed (overrides --seed)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--no-docs", action="store_true", help="print the section, do not write the docs")
    parser.add_argument(
        "--from-runs", action="store_true", help="render the section again from the last runs' folders (same arguments)"
    )
    parser.add_argument("--device-python", default=str(ROOT / ".venv-edge" / "bin" / "python"))
    args = parser.parse_args()
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
    bundle_dir = bundle(args.rank)
    results, bodies = [], []
    for seed in seeds:
        args.seed = seed
        load, sync, asyn = run_pair(args, bundle_dir)
        body, result = render(sync, asyn, args, load)
        print(json.dumps({"seed": seed, **result}), flush=True)
        results.append({"seed": seed, **result})
        bodies.append((body, sync, asyn, result))
    body, sync, asyn, result = bodies[0]
    if len(seeds) > 1:
        args.seed = seeds[0]
        body = seed_table(results) + f"\nThe first seed's runs in detail ({seeds[0]}):\n\n" + body
    if args.no_docs:
        print(body)
        return 0
    plot(sync, asyn, result["sync_final"])
    argv = [a for a in sys.argv[1:] if a != "--from-runs"]
    SECTION.write(command_line("bench/async_bench.py", argv), body, f"({datetime.now():%Y-%m-%d})")
    print(body)
    return 0


def run_pair(args, bundle_dir: Path) -> tuple[tuple, dict, dict]:
    """The load before, then the sync and the async run of ``args.seed`` (or, with
    ``--from-runs``, what they left in their folders)."""
    load_file = run_folder("load", args.seed).with_suffix(".json")  # the load before the runs, for --from-runs
    if args.from_runs:
        return tuple(json.loads(load_file.read_text())), load_run("sync", args.seed), load_run("async", args.seed)
    load = os.getloadavg()
    load_file.parent.mkdir(parents=True, exist_ok=True)
    load_file.write_text(json.dumps([round(x, 2) for x in load]))
    sync = run_one("sync", ["--rounds", str(args.sync_rounds)], args, bundle_dir)
    print(json.dumps({"sync": summary(sync), "updates": sync["updates"]}), flush=True)
    versions = math.ceil(args.async_updates * sync["updates"] / args.buffer_size)
    extra = ["--round-mode", "async", "--buffer-size", str(args.buffer_size), "--rounds", str(versions)]
    extra += ["--eval-every", str(args.async_eval_every)]
    asyn = run_one("async", extra, args, bundle_dir)
    print(json.dumps({"async": summary(asyn), "updates": asyn["updates"]}), flush=True)
    return load, sync, asyn


def seed_table(results: list[dict]) -> str:
    """Every seed's ratio, and their median (a seed that never got there counts as infinite)."""
    ratios = [r["ratio"] if r["ratio"] is not None else math.inf for r in results]
    held = [r["sustained_ratio"] if r["sustained_ratio"] is not None else math.inf for r in results]
    met = sum(x <= 0.6 for x in ratios)
    text = (
        f"**Over {len(results)} seeds the median ratio is {_ratio(statistics.median(ratios))}** "
        f"({_ratio(statistics.median(held))} by three evaluations in a row); the 0.6x target is met on "
        f"{met} of {len(results)}.\n\n"
        "| seed | sync wall time (s) | sync round, median (s) | sync final accuracy | async reaches it at (s) "
        "| ratio | 3 in a row (s) | ratio |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    for r in results:
        text += (
            f"| {r['seed']} | {r['sync_wall']:.0f} | {r.get('sync_round_median', float('nan')):.0f} "
            f"| {r['sync_final']:.3f} | {_reached(r)} "
            f"| {_ratio(r['ratio'])} | {_secs(r['async_sustained'])} | {_ratio(r['sustained_ratio'])} |\n"
        )
    return text


def _reached(r: dict) -> str:
    """When async reached the sync final accuracy; if never, its best and when."""
    if r["async_reached"] is not None or r.get("async_best") is None:
        return _secs(r["async_reached"])
    return f"never (best {r['async_best']:.3f}, at {r['async_best_at']:.0f} s)"


def _ratio(x: float | None) -> str:
    return "never" if x is None or math.isinf(x) else f"{x:.2f}x"


if __name__ == "__main__":
    sys.exit(main())
