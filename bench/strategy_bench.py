"""Every aggregation strategy on real data, homogeneous and mixed ranks, written to docs/.

Each configuration is one real ``fedlora simulate`` run (embedded broker, one process per
device, ONNX Runtime training). Results go to ``docs/strategy_bench.json`` (appended per run,
so an interrupted sweep keeps what it measured), a markdown table printed to stdout, and
``docs/strategy_bench.png`` (final accuracy per strategy and configuration).

    .venv/bin/python bench/strategy_bench.py --datasets bbc-news --alphas 0.1 \\
        --devices 20 --rounds 8 --local-steps 5 --max-length 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# (strategy, ranks): the same-rank methods at rank 8, FedAvg also at the smallest common rank
# 2, and the rank-aware methods with every device at 8 and with mixed ranks.
CONFIGS = [
    ("fedavg", (2,)), ("fedavg", (8,)), ("ffa-lora", (8,)), ("fedsa-lora", (8,)), ("fedex-lora", (8,)),
    ("hetlora", (8,)), ("flexlora", (8,)), ("flora", (8,)),
    ("hetlora", (2, 4, 8, 16)), ("flexlora", (2, 4, 8, 16)), ("flora", (2, 4, 8, 16)),
]


def summarize(result: dict, out: Path) -> dict:
    history = result["history"]
    accs = [h["eval"]["accuracy"] for h in history if h.get("eval")]
    best = max(accs) if accs else float("nan")
    reach = next((i + 1 for i, a in enumerate(accs) if a >= 0.95 * best), None)
    events = [json.loads(line) for line in (out / "aggregator" / "events.jsonl").read_text().splitlines()]
    local = {}
    for e in events:  # each device's accuracy on its own held-out split, last round it reported
        if e["event"] == "update_accepted" and "eval_accuracy" in e.get("metrics", {}):
            local[e["device"]] = e["metrics"]["eval_accuracy"]
    return {
        "final_accuracy": accs[-1] if accs else float("nan"), "best_accuracy": best, "rounds_to_95pct_best": reach,
        "uplink_bytes_per_round": statistics.mean(h["uplink_bytes_wire"] for h in history),
        "downlink_bytes_per_round": statistics.mean(h.get("downlink_bytes_wire", 0) for h in history),
        "aggregation_ms_per_round": 1000 * statistics.mean(h.get("aggregation_s", 0) for h in history),
        "device_local_accuracy_mean": statistics.mean(local.values()) if local else None,
        "wall_s": result["wall_s"],
    }


def table(rows: list[dict]) -> str:
    lines = ["| dataset | alpha | strategy | ranks | final acc | best acc | rounds to 95% | uplink/round | "
             "downlink/round | aggregation | device-local acc |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        local = f"{r['device_local_accuracy_mean']:.3f}" if r.get("device_local_accuracy_mean") is not None else ""
        lines.append(
            f"| {r['dataset']} | {r['alpha']} | {r['strategy']} | {'/'.join(map(str, r['ranks']))} | "
            f"{r['final_accuracy']:.3f} | {r['best_accuracy']:.3f} | {r['rounds_to_95pct_best']} | "
            f"{r['uplink_bytes_per_round'] / 1e6:.2f} MB | {r['downlink_bytes_per_round'] / 1e6:.2f} MB | "
            f"{r['aggregation_ms_per_round']:.1f} ms | {local} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["dataset"], r["alpha"]) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.5), squeeze=False)
    for ax, (dataset, alpha) in zip(axes[0], groups):
        sel = [r for r in rows if (r["dataset"], r["alpha"]) == (dataset, alpha)]
        labels = [f"{r['strategy']}\n{'/'.join(map(str, r['ranks']))}" for r in sel]
        ax.bar(range(len(sel)), [r["final_accuracy"] for r in sel],
               color=["tab:orange" if len(r["ranks"]) > 1 else "tab:blue" for r in sel])
        ax.set_xticks(range(len(sel)), labels, rotation=60, fontsize=7)
        ax.set_ylim(min(r["final_accuracy"] for r in sel) - 0.05, 1.0)
        ax.set_title(f"{dataset}, Dirichlet alpha {alpha}")
        ax.set_ylabel("final test accuracy")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="bbc-news")
    parser.add_argument("--alphas", default="0.1")
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--max-train", type=int, default=0)
    parser.add_argument("--only", help="comma-separated strategy names to run")
    parser.add_argument("--out", default=str(ROOT / "docs" / "strategy_bench.json"))
    args = parser.parse_args()

    from server.simulate import SimulateConfig, run_simulation

    results_path = Path(args.out)
    rows = json.loads(results_path.read_text()) if results_path.is_file() else []
    only = set(args.only.split(",")) if args.only else None
    for dataset in args.datasets.split(","):
        for alpha in (float(a) for a in args.alphas.split(",")):
            for strategy, ranks in CONFIGS:
                if only and strategy not in only:
                    continue
                key = (dataset, alpha, strategy, list(ranks))
                if any((r["dataset"], r["alpha"], r["strategy"], r["ranks"]) == key for r in rows):
                    continue
                out = ROOT / "runs" / "bench" / f"{dataset}-a{alpha}-{strategy}-{'_'.join(map(str, ranks))}"
                print(f"[bench] {dataset} alpha {alpha} {strategy} ranks {ranks}", flush=True)
                start = time.time()
                result = run_simulation(SimulateConfig(
                    dataset=dataset, devices=args.devices, split="dirichlet", alpha=alpha, rounds=args.rounds,
                    local_steps=args.local_steps, max_length=args.max_length, ranks=ranks, strategy=strategy,
                    max_train=args.max_train, out=out, cache=ROOT / ".cache" / "fedlora", eval_max=500))
                row = {"dataset": dataset, "alpha": alpha, "strategy": strategy, "ranks": list(ranks),
                       "devices": args.devices, "rounds": args.rounds, "local_steps": args.local_steps,
                       "max_length": args.max_length, **summarize(result, out)}
                row["wall_s"] = round(time.time() - start, 1)
                rows.append(row)
                results_path.write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows))
    plot(rows, results_path.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
