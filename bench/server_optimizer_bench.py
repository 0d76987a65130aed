"""Server optimizers and FedProx under label skew: which defaults win on more than one data set.

Each configuration is one real ``fedlora simulate`` run in its own process (embedded broker,
torch-free device processes, the aggregator evaluating the global adapter after every round),
on a small sample so that a sweep fits in an hour on a shared 2-core machine: FedAvg at rank 8,
Dirichlet alpha 0.5 over 10 devices, 5 rounds, the simulator's default device training (20
steps of 8; each configuration pins its AdamW rate), and ``--max-train`` / ``--eval-max`` / ``--max-length`` to keep each run to minutes.
Rows are appended to ``docs/server_optimizer_bench.json`` as runs finish (a rerun skips the
configurations it has), and every invocation rewrites its section of ``docs/benchmarks.md``.

Besides the simulator's built-in sets, ``skewed-8`` is a harder case made here through the generic
CSV path: 8 of 20 Newsgroups' topics (train and test pooled) at imbalanced counts, the largest
class half of the 1,780 rows (``write_skewed_8``). A configuration is any ``fedlora simulate``
flags (strategy settings, ``lr``, ``local_steps``); ``--centralized`` also trains centrally
with the same sample passes, and the report shows the federated run's gap to it.

    .venv/bin/python bench/server_optimizer_bench.py --datasets bbc-news,20newsgroups --seeds 0
    .venv/bin/python bench/server_optimizer_bench.py --datasets skewed-8 --max-train 0 --eval-max 0 \
        --max-length 128 --centralized
    .venv/bin/python bench/server_optimizer_bench.py --report-only
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # devkit: the benchmarks' and tests' kit, not installed

from devkit.docsection import DocSection, command_line  # noqa: E402
from simulator.run import CENTRALIZED_LR  # noqa: E402

RESULTS = ROOT / "docs" / "server_optimizer_bench.json"
SECTION = DocSection(
    "server_optimizer_bench", "bench/server_optimizer_bench.py", "## Server optimizers and FedProx under label skew"
)
SKEWED_8 = ROOT / "runs" / "bench" / "skewed-8.csv"
# (20 Newsgroups topic, rows): the largest class is 51% of the rows.
SKEWED_8_CLASSES = (
    ("rec.sport.hockey", 900),
    ("sci.space", 250),
    ("comp.graphics", 180),
    ("sci.med", 140),
    ("talk.politics.mideast", 110),
    ("rec.autos", 85),
    ("misc.forsale", 65),
    ("soc.religion.christian", 50),
)
# (label, simulate flags: strategy settings or training settings), each with its device lr pinned:
# the paired baseline first (the defaults before this sweep), the default it chose at index 7.
CONFIGS: list[tuple[str, dict]] = [
    ("sgd lr 1, device lr 2e-3 (old default)", {"lr": 2e-3}),
    ("fedavgm lr 1 m 0.5", {"server_optimizer": "fedavgm", "server_lr": 1.0, "server_momentum": 0.5, "lr": 2e-3}),
    ("fedadam lr 0.01", {"server_optimizer": "fedadam", "server_lr": 0.01, "lr": 2e-3}),
    ("fedadam lr 0.03", {"server_optimizer": "fedadam", "server_lr": 0.03, "lr": 2e-3}),
    ("sgd + fedprox mu 0.1", {"fedprox_mu": 0.1, "lr": 2e-3}),
    ("fedyogi lr 0.01", {"server_optimizer": "fedyogi", "server_lr": 0.01, "lr": 2e-3}),
    ("fedadagrad lr 0.01", {"server_optimizer": "fedadagrad", "server_lr": 0.01, "lr": 2e-3}),
    ("device lr 5e-3 (new default)", {"lr": 5e-3}),
    ("device lr 1e-2", {"lr": 1e-2}),
    ("fedavgm lr 1 m 0.9", {"server_optimizer": "fedavgm", "server_lr": 1.0, "server_momentum": 0.9, "lr": 2e-3}),
    ("sgd lr 2", {"server_lr": 2.0, "lr": 2e-3}),
]
SETTINGS = ("devices", "alpha", "rounds", "max_train", "eval_max", "max_length")
DETAILS = "(renders every run recorded in `docs/server_optimizer_bench.json`, whichever invocation ran it)"


def write_skewed_8(path: Path = SKEWED_8) -> Path:
    """The ``skewed-8`` CSV (text, label): the same rows on every machine (fixed seed)."""
    from simulator.datasets import load_dataset

    news = load_dataset("20newsgroups")
    pooled = news.train + news.test
    rng = random.Random(7)
    rows = []
    for topic, count in SKEWED_8_CLASSES:
        examples = [e for e in pooled if e.label == topic]
        rng.shuffle(examples)
        rows += [(e.text, topic.split(".")[-1]) for e in examples[:count]]
    rng.shuffle(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def final_accuracies(out: Path) -> list[float]:
    """The global adapter's accuracy after each round."""
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [round(h["eval"]["accuracy"], 4) for h in history if h.get("eval")]


def centralized_accuracies(out: Path) -> list[float]:
    """The centralized run's accuracy after each round's worth of sample passes (if it ran)."""
    path = out / "centralized.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [round(json.loads(line)["accuracy"], 4) for line in lines if line.strip()]


def run_one(args, dataset: str, label: str, settings: dict, seed: int) -> dict:
    slug = label.split(" (")[0].replace(" ", "_").replace("+", "plus")
    out = ROOT / "runs" / "bench" / f"serveropt-{dataset}-{slug}-s{seed}"
    flags = [x for k, v in settings.items() for x in ("--" + k.replace("_", "-"), str(v))]
    edge_python = ROOT / ".venv-edge" / "bin" / "python"
    source = str(write_skewed_8()) if dataset == "skewed-8" else dataset
    cmd = [
        sys.executable,
        "-m",
        "simulator.cli",
        "simulate",
        "--dataset",
        source,
        "--devices",
        str(args.devices),
        "--alpha",
        str(args.alpha),
        "--rounds",
        str(args.rounds),
        "--max-train",
        str(args.max_train),
        "--eval-max",
        str(args.eval_max),
        "--max-length",
        str(args.max_length),
        "--seed",
        str(seed),
        *flags,
        *["--centralized"] * args.centralized,
        "--out",
        str(out),
        "--device-python",
        str(edge_python if edge_python.is_file() else sys.executable),
    ]
    print(f"[bench] {dataset} {label} seed {seed}", flush=True)
    start = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".log"), "wb") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{dataset} {label} seed {seed} failed (exit {proc.returncode}); see {out}.log")
    accs = final_accuracies(out)
    central = centralized_accuracies(out)
    row = {
        "dataset": dataset,
        "config": label,
        "settings": settings,
        **{k: getattr(args, k) for k in SETTINGS},
        "seed": seed,
        "accuracy_per_round": accs,
        "final_accuracy": accs[-1],
        **(
            {
                "centralized_accuracy": central[-1],
                "centralized_lr": settings.get("centralized_lr", CENTRALIZED_LR["seq-cls"]),
            }
            if central
            else {}
        ),
        "wall_s": round(time.time() - start, 1),
    }
    print(f"[bench]   final accuracy {row['final_accuracy']:.4f} {accs} in {row['wall_s']:.0f}s", flush=True)
    return row


CENTRAL_FLAGS = ("local_steps", "batch_size")  # what a centralized run depends on besides seed and rate


def _reference_key(row: dict) -> tuple:
    """The centralized run a row is compared with: same seed and sample passes, at the
    centralized rate the row asks for (the simulator's default, 2e-3, unless it sets one)."""
    rate = row["settings"].get("centralized_lr", CENTRALIZED_LR["seq-cls"])
    return (row["seed"], rate, *(row["settings"].get(k) for k in CENTRAL_FLAGS))


def _central_key(row: dict) -> tuple:
    """The centralized run a row made (``centralized_lr``: the rate it trained at)."""
    return (row["seed"], row["centralized_lr"], *(row["settings"].get(k) for k in CENTRAL_FLAGS))


def _row_line(label: str, runs: list[dict], base: dict[int, float], central: dict[tuple, float] | None) -> str:
    finals = [r["final_accuracy"] for r in runs]
    paired = [r["final_accuracy"] - base[r["seed"]] for r in runs if r["seed"] in base]
    mean_curve = [statistics.mean(a) for a in zip(*(r["accuracy_per_round"] for r in runs))]
    cells = [
        label,
        f"{statistics.mean(finals):.4f}",
        ", ".join(f"s{r['seed']}: {r['final_accuracy']:.4f}" for r in runs),
        f"{statistics.mean(paired):+.4f}" if paired else "-",
    ]
    if central is not None:
        # a server-side configuration shares the centralized run of its training settings and seed
        centrals = [central[_reference_key(r)] for r in runs if _reference_key(r) in central]
        gaps = [central[_reference_key(r)] - r["final_accuracy"] for r in runs if _reference_key(r) in central]
        cells += [f"{statistics.mean(centrals):.4f}", f"{100 * statistics.mean(gaps):.1f}"] if gaps else ["-", "-"]
    cells.append(" ".join(f"{a:.3f}" for a in mean_curve))
    return "| " + " | ".join(cells) + " |"


def report(rows: list[dict]) -> str:
    """Per data set, one line per configuration: mean final accuracy over its seeds, each seed's,
    the change against the default on the same seeds (paired) and, where centralized runs were
    made, the centralized accuracy with the same sample passes and the gap to it in points."""
    lines = []
    for dataset in sorted({r["dataset"] for r in rows}):
        here = [r for r in rows if r["dataset"] == dataset]
        s = here[0]
        central = {_central_key(r): r["centralized_accuracy"] for r in here if "centralized_accuracy" in r} or None
        head = ["configuration", "final accuracy (mean)", "per seed", "vs the first row, same seeds"]
        head += ["centralized (lr 2e-3), same sample passes", "gap to it (points)"] * (central is not None)
        head.append("per round (seed mean)")
        lines += [
            f"**{dataset}**: {s['devices']} devices, Dirichlet alpha {s['alpha']}, {s['rounds']} rounds, "
            f"{s['max_train'] or 'all'} training examples, {s['max_length']} tokens, "
            f"test on {s['eval_max'] or 'all'}.",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
        ]
        base = {r["seed"]: r["final_accuracy"] for r in here if r["config"] == CONFIGS[0][0]}
        for label, _ in CONFIGS:
            runs = sorted((r for r in here if r["config"] == label), key=lambda r: r["seed"])
            if runs:
                lines.append(_row_line(label, runs, base, central))
        lines.append("")
    walls = [r["wall_s"] for r in rows]
    lines.append(
        f"{len(rows)} runs, {statistics.mean(walls):.0f} s each on average, on a 2-core machine shared "
        "with other jobs (times are not comparable between runs)."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="bbc-news,20newsgroups")
    p.add_argument("--seeds", default="0")
    p.add_argument("--configs", default="", help="comma-separated indexes into CONFIGS (default: all)")
    p.add_argument("--devices", type=int, default=10)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--max-train", type=int, default=1000)
    p.add_argument("--eval-max", type=int, default=500)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--centralized", action="store_true", help="also train centrally with the same sample passes")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    rows = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    if not args.report_only:
        picked = [CONFIGS[int(i)] for i in args.configs.split(",") if i] or CONFIGS
        # configuration-major: an interrupted sweep has the first configurations on every data set
        for seed in (int(s) for s in args.seeds.split(",")):
            for label, settings in picked:
                for dataset in args.datasets.split(","):
                    if any(
                        r["dataset"] == dataset
                        and r["config"] == label
                        and r["seed"] == seed
                        and all(r[k] == getattr(args, k) for k in SETTINGS)
                        and ("centralized_accuracy" in r or not args.centralized)
                        for r in rows
                    ):
                        continue
                    rows.append(run_one(args, dataset, label, settings, seed))
                    RESULTS.write_text(json.dumps(rows, indent=1) + "\n")
    if rows:
        command = command_line(SECTION.script, sys.argv[1:] if argv is None else argv)
        SECTION.write(command, report(rows), DETAILS)


if __name__ == "__main__":
    main()
