"""Poisoning benchmark: one device in ten lies about its data size and scales its update up.

Runs ``fedlora simulate`` (real devices, real broker, real data) with the same seed four ways:

* ``clean``: ten honest devices, today's defaults (weights capped at a multiple of the round's
  median claim, update norms clipped to a bound that follows the previous round's median);
* ``poisoned``: device 0 replaced by ``bench/poison_device.py``, which claims 1e12 examples (in
  its status and its updates) and scales every update to a norm of 9,900 (just under the old
  fixed bound of 10,000);
* ``clean-unbounded`` / ``poisoned-unbounded``: the same without those bounds (the behaviour
  before them: no weight cap, a fixed norm bound of 10,000 that only rejects).

It reports final accuracy, the liar's share of each round's weight and the norm it was clipped
to, and how far the poisoned global adapter lies from the clean one, measured against the bound
the bounds promise: ``share * clipped norm`` per round. Plots accuracy per round beside the report.

    .venv/bin/python bench/poison_bench.py [--rounds 5 --max-train 1000 --eval-max 500] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # devkit: the benchmarks' and tests' kit, not installed

from devkit.docsection import DocSection  # noqa: E402
from server.store import StateStore  # noqa: E402
from simulator.run import SimulateConfig, run_simulation  # noqa: E402

DOC_SECTION = DocSection("poison_bench", "bench/poison_bench.py", "## Poisoning: a device that lies")
# What the runs were: the section's first line, after the command.
DETAILS = (
    "(MiniLM-L6 rank 8, FedAvg, Dirichlet 0.5, 20 local steps; device `dev000` is `bench/poison_device.py`: it "
    "claims 1e12 examples in its status and its updates and scales every update to norm {norm:g})."
)
UNBOUNDED = {"max_weight_ratio": 0.0, "norm_clip_multiple": 0.0, "max_update_norm": 1e4, "norm_bound": "reject"}


def run(name: str, args, out: Path, poisoned: bool, bounded: bool) -> dict:
    edge_python = str(ROOT / ".venv-edge" / "bin" / "python")
    cfg = SimulateConfig(
        dataset=args.dataset,
        devices=args.devices,
        rounds=args.rounds,
        max_train=args.max_train,
        eval_max=args.eval_max,
        seed=args.seed,
        out=out / name,
        device_python=edge_python,
        round_settings={} if bounded else dict(UNBOUNDED),
        device_commands={
            0: [edge_python, str(ROOT / "bench" / "poison_device.py"), "--norm", str(args.norm), "--claim", "1e12"]
        }
        if poisoned
        else {},
    )
    print(f"[poison_bench] {name}", flush=True)
    started = time.time()
    result = run_simulation(cfg)
    state = StateStore(out / name / "aggregator").load()
    events = StateStore(out / name / "aggregator").events()
    accepted = [e for e in events if e["event"] == "update_accepted"]
    liar = []
    for h in state["history"]:
        rows = [e for e in accepted if e["round"] == h["round"]]
        total = sum(e.get("weight", e["num_examples"]) for e in rows)
        mine = [e for e in rows if e["device"] == "dev000"]
        if mine and total:
            e = mine[0]
            sent = float(e.get("norm", 0.0))
            liar.append({"round": h["round"], "share": e.get("weight", e["num_examples"]) / total, "norm_sent": sent})
    opened = {e["round"]: e.get("max_norm", 0.0) for e in events if e["event"] == "round_opened"}
    for row in liar:
        bound = opened.get(row["round"]) or 0.0
        row["norm_kept"] = min(row["norm_sent"], bound) if bound else row["norm_sent"]
    honest = [float(e["norm"]) for e in accepted if e["device"] != "dev000" and "norm" in e]
    return {
        "name": name,
        "history": [{"round": h["round"], "accuracy": (h.get("eval") or {}).get("accuracy")} for h in state["history"]],
        "final": result["final"].get("accuracy"),
        "global": state["global"],
        "liar": liar,
        "honest_norm_median": float(np.median(honest)) if honest else None,
        "wall_s": time.time() - started,
    }


def distance(a: dict, b: dict) -> float:
    return float(np.sqrt(sum(float(np.square(a[k].astype(np.float64) - b[k]).sum()) for k in a)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="bbc-news")
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-train", type=int, default=1000)
    ap.add_argument("--eval-max", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--norm", type=float, default=9900.0, help="the norm the lying device scales its update to")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "poison_bench")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--report-only", action="store_true", help="render the last run's poison_bench.json again")
    args = ap.parse_args(argv)
    if args.report_only:
        summary = json.loads((args.out / "poison_bench.json").read_text())
        return report(args, summary, summary)
    runs = {
        r["name"]: r
        for r in (
            run("clean", args, args.out, poisoned=False, bounded=True),
            run("poisoned", args, args.out, poisoned=True, bounded=True),
            run("clean-unbounded", args, args.out, poisoned=False, bounded=False),
            run("poisoned-unbounded", args, args.out, poisoned=True, bounded=False),
        )
    }
    initial_gap = {
        name: distance(runs[name]["global"], runs["clean" if "unbounded" not in name else "clean-unbounded"]["global"])
        for name in runs
    }
    summary = {
        name: {k: v for k, v in r.items() if k != "global"} | {"distance_to_clean": initial_gap[name]}
        for name, r in runs.items()
    }
    (args.out / "poison_bench.json").write_text(json.dumps(summary, indent=1))
    return report(args, runs, summary)


def report(args, runs: dict, summary: dict) -> int:
    plot(runs, args.out / "poison_bench.png")
    command, details, body = command_of(args), DETAILS.format(norm=args.norm), render(summary)
    print(DOC_SECTION.render(command, body, details))
    if args.write_docs:
        import shutil

        shutil.copy(args.out / "poison_bench.png", ROOT / "docs" / "poison_bench.png")
        DOC_SECTION.write(command, body, details)
    return 0


def plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, r in runs.items():
        rounds = [h["round"] for h in r["history"]]
        acc = [h["accuracy"] for h in r["history"]]
        ax.plot(rounds, acc, marker="o", label=name, linestyle="--" if "unbounded" in name else "-")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_title("one device in ten claims 1e12 examples and scales its update")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def command_of(args) -> str:
    """The command that runs these four simulations again (also for --report-only, which only renders them)."""
    return (
        f".venv/bin/python bench/poison_bench.py --dataset {args.dataset} --devices {args.devices} --rounds "
        f"{args.rounds} --max-train {args.max_train} --eval-max {args.eval_max} --seed {args.seed} --write-docs"
    )


def render(summary: dict) -> str:
    lines = [
        "| run | final accuracy | liar's weight share (max over rounds) | liar's norm sent / kept (max) | "
        "honest norm (median) | distance of the global to the clean run's |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in summary.items():
        liar = r["liar"]
        share = f"{max(x['share'] for x in liar):.3f}" if liar else "-"
        norms = f"{max(x['norm_sent'] for x in liar):.3g} / {max(x['norm_kept'] for x in liar):.3g}" if liar else "-"
        honest = f"{r['honest_norm_median']:.3g}" if r["honest_norm_median"] else "-"
        acc = f"{r['final']:.4f}" if r["final"] is not None else "-"
        lines.append(f"| {name} | {acc} | {share} | {norms} | {honest} | {r['distance_to_clean']:.3g} |")
    bounded = summary["poisoned"]["liar"]
    if bounded:
        promise = sum(x["share"] * x["norm_kept"] for x in bounded)
        lines += [
            "",
            f"The bounds promise that the liar moves each round's aggregate by at most its weight share "
            f"times its clipped norm; summed over the rounds that is {promise:.3g}, and the poisoned global "
            f"adapter ends {summary['poisoned']['distance_to_clean']:.3g} from the clean one.",
        ]
    lines += ["", "![accuracy per round](poison_bench.png)"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
