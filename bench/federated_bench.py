"""Federated runs on real data: aggregation strategies (homogeneous and mixed ranks) and uplink codecs.

Each configuration is one real ``fedlora simulate`` run in its own process: embedded amqtt
broker, one torch-free device process per device training ONNX Runtime artifacts, the
aggregator evaluating the global adapter on the held-out test set after every round. Rows are
appended to ``docs/federated_bench.json`` as runs finish, so an interrupted sweep resumes where
it stopped (a row is identified by all of its settings). Every invocation then rewrites the
two sections of ``docs/benchmarks.md`` it owns and the plots next to it.

Suites:

* ``strategies``: every strategy at homogeneous rank 8, FedAvg also at the smallest common rank
  2, and the rank-aware strategies with devices at ranks 2/4/8/16 in turn, per data set and
  Dirichlet alpha.
* ``codecs``: FedAvg at rank 8 with each uplink codec (error feedback on for the lossy ones),
  at ``--codec-alpha``; accuracy against total uplink bytes. ``sign|int8`` sends the LoRA
  factors in ``sign`` and the classifier head in ``int8``.

    .venv/bin/python bench/federated_bench.py --suite strategies --datasets bbc-news --alphas 0.1
    .venv/bin/python bench/federated_bench.py --suite codecs --datasets bbc-news,20newsgroups
    .venv/bin/python bench/federated_bench.py --report-only
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # devkit: the benchmarks' and tests' kit, not installed

from devkit.docsection import BENCHMARKS_MD as DOC  # noqa: E402
from devkit.docsection import DocSection, command_line

RESULTS = ROOT / "docs" / "federated_bench.json"
SECTIONS = {
    "strategies": DocSection(
        "federated_bench:strategies",
        "bench/federated_bench.py",
        "## Aggregation strategies: homogeneous and mixed ranks",
    ),
    "codecs": DocSection(
        "federated_bench:codecs", "bench/federated_bench.py", "## Uplink codecs: accuracy against bytes"
    ),
}
DETAILS = "(renders every run recorded in `docs/federated_bench.json`, whichever invocation ran it)"

STRATEGY_CONFIGS = [
    ("fedavg", (2,)),
    ("fedavg", (8,)),
    ("ffa-lora", (8,)),
    ("fedsa-lora", (8,)),
    ("fedex-lora", (8,)),
    ("hetlora", (8,)),
    ("flexlora", (8,)),
    ("flora", (8,)),
    ("hetlora", (2, 4, 8, 16)),
    ("flexlora", (2, 4, 8, 16)),
    ("flexlora-delta", (2, 4, 8, 16)),
    ("flora", (2, 4, 8, 16)),
]
CODECS = [
    "fp32",
    "int8",
    "int4",
    "sign",
    "sign|int8",
    "topk0.1+int8",
    "topk0.1+sign",
    "topk0.05+int8",
    "topk0.02+int8+zlib",
    "randk0.7+sign|int4",
    "randk0.5+sign|int4",
]
SETTINGS = ("devices", "rounds", "local_steps", "max_length", "lr", "eval_max", "seed")
RUN_SETTINGS = SETTINGS[:-1]  # rows that differ only in the seed are repeats of one configuration
# Mixed-rank tuning knobs (0: off), part of a configuration: train.lr_rank_power on the devices,
# flexlora-delta's rank_norm_power on the server.
TUNING = {"lr_rank_power": ("lrp", "lr x (R/r)^{:g}"), "rank_norm_power": ("rnp", "change / (r/R)^{:g}")}


def summarize(out: Path) -> dict:
    """The numbers of one finished run, from its report folder."""
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    events = [json.loads(line) for line in (out / "aggregator" / "events.jsonl").read_text().splitlines()]
    accs = [h["eval"]["accuracy"] for h in history if h.get("eval")]
    best = max(accs) if accs else float("nan")
    local: dict[str, tuple[float, int]] = {}  # each device's last accuracy on its own held-out split
    decode_ms = []
    for e in events:
        if e["event"] != "update_accepted":
            continue
        decode_ms.append(e.get("decode_ms", float("nan")))
        m = e.get("metrics", {})
        if "eval_accuracy" in m:
            local[e["device"]] = (m["eval_accuracy"], int(m.get("eval_examples", 1)))
    n_local = sum(n for _, n in local.values())
    return {
        "accuracy_per_round": [round(a, 4) for a in accs],
        "final_accuracy": accs[-1] if accs else float("nan"),
        "best_accuracy": best,
        "rounds_to_95pct_best": next((i + 1 for i, a in enumerate(accs) if a >= 0.95 * best), None),
        "uplink_bytes_total": sum(h["uplink_bytes_wire"] for h in history),
        "uplink_raw_bytes_total": sum(h["uplink_bytes_raw"] for h in history),
        "uplink_bytes_per_round": statistics.mean(h["uplink_bytes_wire"] for h in history),
        "downlink_bytes_per_round": statistics.mean(h.get("downlink_bytes_wire", 0) for h in history),
        "aggregation_ms_per_round": 1000 * statistics.mean(h.get("aggregation_s", 0) for h in history),
        "decode_ms_median": statistics.median(decode_ms) if decode_ms else None,
        "updates_accepted": len(decode_ms),
        "device_local_accuracy": sum(a * n for a, n in local.values()) / n_local if n_local else None,
        "device_local_examples": n_local,
        "device_local_devices": len(local),
        "device_local": {d: {"accuracy": round(a, 4), "examples": n} for d, (a, n) in sorted(local.items())},
    }


def _name(
    dataset: str,
    alpha: float,
    strategy: str,
    ranks: tuple[int, ...],
    codec: str,
    seed: int = 0,
    tuning: dict | None = None,
    rounds: int = 10,
) -> str:
    name = (
        f"{dataset}-a{alpha}-{strategy}-r{'_'.join(map(str, ranks))}-{codec.replace('+', '_').replace('|', '-head-')}"
    )
    tuning = tuning or {}
    name += "".join(f"-{short}{tuning[k]:g}" for k, (short, _) in TUNING.items() if tuning.get(k))
    return name + (f"-R{rounds}" if rounds != 10 else "") + (f"-s{seed}" if seed else "")


def run_one(args, dataset: str, alpha: float, strategy: str, ranks: tuple[int, ...], codec: str, seed: int) -> dict:
    tuning = {k: getattr(args, k) for k in TUNING}
    name = _name(dataset, alpha, strategy, ranks, codec, seed, tuning, args.rounds)
    out = ROOT / "runs" / "bench" / name
    edge_python = ROOT / ".venv-edge" / "bin" / "python"
    cmd = [
        sys.executable,
        "-m",
        "simulator.cli",
        "simulate",
        "--dataset",
        dataset,
        "--devices",
        str(args.devices),
        "--split",
        "dirichlet",
        "--alpha",
        str(alpha),
        "--rounds",
        str(args.rounds),
        "--local-steps",
        str(args.local_steps),
        "--max-length",
        str(args.max_length),
        "--lr",
        str(args.lr),
        "--lr-rank-power",
        str(args.lr_rank_power),
        # a strategy setting: only for the strategy that declares it
        *(["--rank-norm-power", str(args.rank_norm_power)] if strategy == "flexlora-delta" else []),
        "--seed",
        str(seed),
        "--ranks",
        ",".join(map(str, ranks)),
        "--strategy",
        strategy,
        "--codec",
        codec.split("|")[0],
        "--head-codec",
        codec.partition("|")[2],
        "--eval-max",
        str(args.eval_max),
        "--out",
        str(out),
        "--device-python",
        str(edge_python if edge_python.is_file() else sys.executable),
    ]
    print(f"[bench] {name}: {' '.join(cmd[3:])}", flush=True)
    start = time.time()
    with open(ROOT / "runs" / "bench" / f"{name}.log", "wb") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"run {name} failed (exit {proc.returncode}); see runs/bench/{name}.log")
    row = {
        "dataset": dataset,
        "alpha": alpha,
        "strategy": strategy,
        "ranks": list(ranks),
        "codec": codec,
        **tuning,
        **{k: getattr(args, k) for k in RUN_SETTINGS},
        "seed": seed,
        **summarize(out),
        "wall_s": round(time.time() - start, 1),
    }
    print(
        f"[bench] {name}: final accuracy {row['final_accuracy']:.4f} (best {row['best_accuracy']:.4f}), "
        f"{row['uplink_bytes_total'] / 1e6:.1f} MB up, {row['wall_s']:.0f}s",
        flush=True,
    )
    return row


def _key(row: dict) -> tuple:
    return (
        row["dataset"],
        row["alpha"],
        row["strategy"],
        tuple(row["ranks"]),
        row["codec"],
        *(row[k] for k in TUNING),
        *(row[k] for k in SETTINGS),
    )


# -- report --------------------------------------------------------------------------------
def merge_seeds(rows: list[dict]) -> list[dict]:
    """One row per configuration: the mean over its seeds of every number, the accuracy of
    every round included (``final_std``: the spread of the final accuracy across seeds). Device-
    local details are the first seed's."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(_key(r)[:-1], []).append(r)
    merged = []
    for runs in groups.values():
        runs.sort(key=lambda r: r["seed"])
        row = dict(runs[0], seeds=[r["seed"] for r in runs])
        for k, v in runs[0].items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in (*SETTINGS, *TUNING, "alpha"):
                values = [r[k] for r in runs if r.get(k) is not None]
                row[k] = statistics.mean(values) if values else None
        curves = [r["accuracy_per_round"] for r in runs if r.get("accuracy_per_round")]
        if curves and len({len(c) for c in curves}) == 1:
            row["accuracy_per_round"] = [statistics.mean(a) for a in zip(*curves)]
        row["final_std"] = statistics.stdev(r["final_accuracy"] for r in runs) if len(runs) > 1 else None
        merged.append(row)
    return merged


def _ranks(r: dict) -> str:
    return "/".join(map(str, r["ranks"]))


def _strategy(r: dict) -> str:
    """The strategy, and the mixed-rank tuning when the run used some."""
    return " ".join([r["strategy"], *(label.format(r[k]) for k, (_, label) in TUNING.items() if r[k])])


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def strategy_table(rows: list[dict]) -> str:
    lines = [
        "| data set | alpha | strategy | ranks | seeds | final acc | last 3 rounds | best acc | rounds to 95% of best | "
        "uplink/round | downlink/round | aggregation/round | device-local acc |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        local = f"{r['device_local_accuracy']:.3f}" if r.get("device_local_accuracy") is not None else ""
        lines.append(
            f"| {r['dataset']} | {r['alpha']} | {_strategy(r)} | {_ranks(r)} | {_seeds(r)} | {_final(r)} | "
            f"{last3(r):.3f} | {r['best_accuracy']:.3f} | {r['rounds_to_95pct_best']:.3g} | {_mb(r['uplink_bytes_per_round'])} | "
            f"{_mb(r['downlink_bytes_per_round'])} | {r['aggregation_ms_per_round']:.1f} ms | {local} |"
        )
    return "\n".join(lines)


def _seeds(r: dict) -> str:
    return str(len(r.get("seeds", [r["seed"]])))


def _final(r: dict) -> str:
    """The final accuracy, with its standard deviation across seeds where there are several."""
    return f"{r['final_accuracy']:.3f}" + (f" ± {r['final_std']:.3f}" if r.get("final_std") is not None else "")


def last3(r: dict) -> float:
    """Mean test accuracy of the last three rounds: less noisy than the last round alone."""
    acc = r.get("accuracy_per_round") or [r["final_accuracy"]]
    return sum(acc[-3:]) / len(acc[-3:])


def final(r: dict) -> float:
    return r["final_accuracy"]


def target_seeds(raw: list[dict]) -> set[int]:
    """The seeds a cell's targets are judged on: the largest set that FedAvg at ranks 2 and 8
    and some mixed-rank configuration all ran (like with like: a best of one seed is luckier
    than a mean of three, and a mean over other federations is no baseline)."""
    seeds: dict[tuple, set[int]] = {}
    for r in raw:
        seeds.setdefault(_key(r)[:-1], set()).add(r["seed"])
    base = [
        v for k, v in seeds.items() if k[2] == "fedavg" and k[3] in ((2,), (8,)) and not any(k[5 : 5 + len(TUNING)])
    ]
    if len(base) < 2:
        return set()
    return max((base[0] & base[1] & v for k, v in seeds.items() if len(k[3]) > 1), key=len, default=set())


def strategy_targets(raw: list[dict]) -> str:
    """The issue's targets per data set and alpha, on the final round and on the mean of the
    last three: the best mixed-rank strategy against FedAvg at rank 2 (>= +2 points) and
    against the best homogeneous rank 8 (>= -1 point), among the configurations that ran every
    seed of ``target_seeds``, compared on their means over exactly those seeds."""
    lines = [
        "| data set | alpha | accuracy | best mixed-rank | FedAvg r2 | vs FedAvg r2 (target >= +2.0) | best rank 8 | "
        "vs best rank 8 (target >= -1.0) | FedAvg r8 | vs FedAvg r8 |",
        "|---|---:|---|---|---:|---:|---|---:|---:|---:|",
    ]
    for dataset, alpha in sorted({(r["dataset"], r["alpha"]) for r in raw}):
        cell = [r for r in raw if (r["dataset"], r["alpha"]) == (dataset, alpha)]
        seeds = target_seeds(cell)
        sel = [r for r in merge_seeds([r for r in cell if r["seed"] in seeds]) if set(r["seeds"]) == seeds]
        mixed = [r for r in sel if len(r["ranks"]) > 1]
        r2 = next((r for r in sel if r["strategy"] == "fedavg" and r["ranks"] == [2]), None)
        r8 = [
            r for r in sel if r["ranks"] == [8] and r["strategy"] != "fedsa-lora"
        ]  # FedSA's global model is not its product
        avg8 = next((r for r in r8 if r["strategy"] == "fedavg"), None)
        if not (mixed and r2 and r8 and avg8):
            continue
        for label, acc in (("final", final), ("last 3 rounds", last3)):
            m, h = max(mixed, key=acc), max(r8, key=acc)
            d2, d8, da = (100 * (acc(m) - acc(x)) for x in (r2, h, avg8))
            lines.append(
                f"| {dataset} | {alpha} | {label} | {_strategy(m)} {acc(m):.3f} ({_seeds(m)}) | {acc(r2):.3f} ({_seeds(r2)}) | "
                f"{d2:+.1f} {'met' if d2 >= 2.0 else 'missed'} | {_strategy(h)} {acc(h):.3f} ({_seeds(h)}) | "
                f"{d8:+.1f} {'met' if d8 >= -1.0 else 'missed'} | {acc(avg8):.3f} ({_seeds(avg8)}) | {da:+.1f} |"
            )
    return "\n".join(lines)


def _cell(r: dict) -> tuple:
    """Where runs compete: a data set and alpha at one round budget (codec runs may add a longer one)."""
    return r["dataset"], r["alpha"], r["rounds"]


def _codec_label(codec: str) -> str:
    """``sign|int8`` (LoRA factors | classifier head) as markdown; a bare ``|`` would split the cell."""
    lora, _, head = codec.partition("|")
    return f"`{lora}`, head `{head}`" if head else f"`{lora}`"


def paired_fp32(row: dict, raw: list[dict]) -> dict | None:
    """fp32 over exactly the seeds ``row`` (merged) ran, same cell and settings: a codec is
    compared with the federations it saw, not with a mean over others. None if fp32 lacks one."""
    base = [
        x
        for x in raw
        if x["codec"] == "fp32"
        and x["strategy"] == row["strategy"]
        and x["ranks"] == row["ranks"]
        and (x["dataset"], x["alpha"]) == (row["dataset"], row["alpha"])
        and all(x[k] == row[k] for k in (*TUNING, *RUN_SETTINGS))
        and x["seed"] in row["seeds"]
    ]
    return merge_seeds(base)[0] if sorted(x["seed"] for x in base) == sorted(row["seeds"]) else None


def codec_table(rows: list[dict], raw: list[dict]) -> str:
    """One line per codec (means over its seeds), against fp32 over the same seeds."""
    lines = [
        "| data set | alpha | rounds | codec | seeds | final acc | vs fp32 | last 3 rounds | vs fp32 | uplink total (wire) | "
        "fewer bytes than fp32 | target (final / last 3) | decode ms/update |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for dataset, alpha, rounds in sorted({_cell(r) for r in rows}):
        sel = [r for r in rows if _cell(r) == (dataset, alpha, rounds)]
        for r in sorted(sel, key=lambda r: -r["uplink_bytes_total"]):
            d_final = d_last = ratio = None
            ref = paired_fp32(r, raw)
            if ref:
                d_final, d_last = 100 * (final(r) - final(ref)), 100 * (last3(r) - last3(ref))
                ratio = ref["uplink_bytes_total"] / r["uplink_bytes_total"]
            target = ""
            if ratio is not None and ratio >= 16:
                need = -1.0 if ratio >= 32 else -0.5
                verdict = lambda d, need=need: "met" if d >= need else "missed"  # noqa: E731
                target = (
                    f"{'>=32x' if ratio >= 32 else '>=16x'} within {-need:.1f}: {verdict(d_final)} / {verdict(d_last)}"
                )
            fmt = lambda d: "" if d is None else f"{d:+.1f}"  # noqa: E731
            lines.append(
                f"| {dataset} | {alpha} | {rounds} | {_codec_label(r['codec'])} | {_seeds(r)} | {_final(r)} | {fmt(d_final)} | {last3(r):.3f} | "
                f"{fmt(d_last)} | {_mb(r['uplink_bytes_total'])} | {'' if ratio is None else f'{ratio:.1f}x'} | "
                f"{target} | {r['decode_ms_median']:.2f} |"
            )
    return "\n".join(lines)


def personalization_table(rows: list[dict]) -> str:
    """FedSA-LoRA's target, per device: accuracy on its own held-out split after local training,
    next to FedAvg's at the same rank, for the most skewed cells."""
    lines = []
    for dataset, alpha in sorted({(r["dataset"], r["alpha"]) for r in rows}):
        sel = {r["strategy"]: r for r in rows if (r["dataset"], r["alpha"]) == (dataset, alpha) and r["ranks"] == [8]}
        sa, avg = sel.get("fedsa-lora"), sel.get("fedavg")
        if alpha != min(r["alpha"] for r in rows) or not sa or not avg or not sa.get("device_local"):
            continue
        lines += [
            f"{dataset}, alpha {alpha}, rank 8: each device's accuracy on its own held-out split",
            "",
            "| device | held-out examples | FedSA-LoRA | FedAvg |",
            "|---|---:|---:|---:|",
        ]
        for device, v in sa["device_local"].items():
            other = avg.get("device_local", {}).get(device, {}).get("accuracy")
            lines.append(
                f"| {device} | {v['examples']} | {v['accuracy']:.3f} | {'' if other is None else f'{other:.3f}'} |"
            )
        lines.append("")
    return "\n".join(lines)


def _config_index(r: dict) -> int:
    """A configuration's place (and plot color): the suite's order, then tuned runs by knob."""
    tuned = [i for i, k in enumerate(TUNING) if r[k]]
    if tuned:
        return len(STRATEGY_CONFIGS) + 1 + tuned[0]
    key = (r["strategy"], tuple(r["ranks"]))
    return STRATEGY_CONFIGS.index(key) if key in STRATEGY_CONFIGS else len(STRATEGY_CONFIGS)


def plot_strategies(rows: list[dict], path: Path) -> None:
    """Per data set and alpha: final accuracy per configuration (bars; a tick marks the best
    round) and test accuracy after every round (curves; dashed: mixed ranks)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    groups = sorted({(r["dataset"], r["alpha"]) for r in rows})
    cols = min(3, len(groups))
    grid = -(-len(groups) // cols)
    fig, axes = plt.subplots(2 * grid, cols, figsize=(6 * cols, 8.5 * grid), squeeze=False)
    for i in range(len(groups), grid * cols):
        axes[2 * (i // cols)][i % cols].axis("off")
        axes[2 * (i // cols) + 1][i % cols].axis("off")
    for i, (dataset, alpha) in enumerate(groups):
        sel = sorted((r for r in rows if (r["dataset"], r["alpha"]) == (dataset, alpha)), key=_config_index)
        top, col = 2 * (i // cols), i % cols
        ax = axes[top][col]
        x = range(len(sel))
        ax.bar(
            x,
            [r["final_accuracy"] for r in sel],
            color=["tab:orange" if len(r["ranks"]) > 1 else "tab:blue" for r in sel],
        )
        ax.scatter(x, [r["best_accuracy"] for r in sel], marker="_", color="black", s=120, zorder=3)
        ax.set_xticks(list(x), [f"{_strategy(r)}\n{_ranks(r)}" for r in sel], rotation=60, fontsize=7)
        ax.set_ylim(max(0.0, min(r["final_accuracy"] for r in sel) - 0.05), 1.12)  # room for the legend above 1.0
        ax.set_title(f"{dataset}, Dirichlet alpha {alpha}")
        ax.set_ylabel("final test accuracy")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(
            handles=[
                Patch(color="tab:blue", label="one rank"),
                Patch(color="tab:orange", label="ranks 2/4/8/16"),
                plt.Line2D([], [], color="black", marker="_", ls="", label="best round"),
            ],
            loc="upper right",
            ncol=3,
            fontsize=7,
        )
        ax = axes[top + 1][col]
        for r in sel:  # one color per configuration, the same in every panel
            acc = r.get("accuracy_per_round", [])
            ax.plot(
                range(1, len(acc) + 1),
                acc,
                ls="--" if len(r["ranks"]) > 1 else "-",
                marker=".",
                color=plt.get_cmap("tab20")(_config_index(r) % 20),
                label=f"{_strategy(r)} {_ranks(r)}",
            )
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_codecs(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    groups = sorted({_cell(r) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 4.8), squeeze=False)
    for ax, (dataset, alpha, rounds) in zip(axes[0], groups):
        sel = sorted((r for r in rows if _cell(r) == (dataset, alpha, rounds)), key=lambda r: r["uplink_bytes_total"])
        mb = [r["uplink_bytes_total"] / 1e6 for r in sel]
        acc = [r["final_accuracy"] for r in sel]
        ax.scatter(mb, acc, color="tab:blue", zorder=3)
        for r, x, y in zip(sel, mb, acc):
            ax.annotate(
                r["codec"].replace("|", ", head "), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7
            )
        ref = next((r for r in sel if r["codec"] == "fp32"), None)
        if ref:
            ax.axhline(ref["final_accuracy"] - 0.005, color="tab:green", ls="--", lw=0.8, label="fp32 - 0.5 point")
            ax.axhline(ref["final_accuracy"] - 0.01, color="tab:red", ls=":", lw=0.8, label="fp32 - 1 point")
            for k, style in ((16, "--"), (32, ":")):
                ax.axvline(ref["uplink_bytes_total"] / 1e6 / k, color="gray", ls=style, lw=0.8)
                ax.text(
                    ref["uplink_bytes_total"] / 1e6 / k,
                    1.01,
                    f"{k}x fewer",
                    fontsize=7,
                    color="gray",
                    ha="center",
                    transform=ax.get_xaxis_transform(),
                )
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("total uplink bytes on the wire (MB, log)")
        ax.set_ylabel("final test accuracy")
        seeds = ", ".join(map(str, sel[0]["seeds"])) if sel else ""
        ax.set_title(f"{dataset}, alpha {alpha}, {rounds} rounds, FedAvg rank 8, seeds {seeds}", pad=14)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _settings_line(rows: list[dict]) -> str:
    s = sorted({tuple(r[k] for k in RUN_SETTINGS) for r in rows})
    seeds = sorted({seed for r in rows for seed in r.get("seeds", [r["seed"]])})
    return (
        "; ".join(", ".join(f"{k.replace('_', ' ')} {v}" for k, v in zip(RUN_SETTINGS, one)) for one in s)
        + f"; seeds {', '.join(map(str, seeds))} (tables: the mean over a configuration's seeds)"
    )


def common_seeds(rows: list[dict]) -> list[dict]:
    """Per data set, alpha and round budget, only the seeds every configuration there ran (for
    plots, where a point and its reference line must come from the same federations)."""
    out = []
    for cell in {_cell(r) for r in rows}:
        sel = [r for r in rows if _cell(r) == cell]
        configs: dict[tuple, set] = {}
        for r in sel:
            configs.setdefault(_key(r)[:-1], set()).add(r["seed"])
        common = set.intersection(*configs.values())
        out += [r for r in sel if r["seed"] in common]
    return out


def report(rows: list[dict], command: str) -> None:
    raw = rows
    rows = merge_seeds(rows)
    strat = [r for r in rows if r["codec"] == "fp32" and (r["strategy"], tuple(r["ranks"])) in STRATEGY_CONFIGS]
    strat = [
        r for r in strat if any(_cell(o) == _cell(r) and o["strategy"] != "fedavg" for o in strat)
    ]  # cells the strategy suite ran, not just a codec baseline
    strat.sort(key=lambda r: (r["dataset"], r["alpha"], _config_index(r)))
    codec = [
        r
        for r in rows
        if r["strategy"] == "fedavg"
        and r["ranks"] == [8]
        and any(o["codec"] != "fp32" and _cell(o) == _cell(r) for o in rows)
    ]
    if strat:
        plot_strategies(strat, DOC.parent / "strategy_bench.png")
        SECTIONS["strategies"].write(
            command,
            "\n".join(
                [
                    f"Settings: {_settings_line(strat)}; {sum(r['wall_s'] * len(r['seeds']) for r in strat) / 60:.0f} min of runs.",
                    "",
                    strategy_table(strat),
                    "",
                    "Targets (accuracy points, means over seeds; in each cell only the configurations "
                    "that ran the same, largest set of seeds compete, over those seeds only (count in brackets); FedSA-LoRA is "
                    'left out of "best rank 8": its global model lacks the personal B):',
                    "",
                    strategy_targets([r for r in raw if any(_key(r)[:-1] == _key(c)[:-1] for c in strat)]),
                    "",
                    personalization_table(strat),
                    "![final accuracy per strategy](strategy_bench.png)",
                ]
            ),
            DETAILS,
        )
    if codec:
        codec_raw = [r for r in raw if any(_key(r)[:-1] == _key(c)[:-1] for c in codec)]
        plot_codecs(merge_seeds(common_seeds(codec_raw)), DOC.parent / "codec_accuracy.png")
        SECTIONS["codecs"].write(
            command,
            "\n".join(
                [
                    f"Settings: {_settings_line(codec)}; {sum(r['wall_s'] * len(r['seeds']) for r in codec) / 60:.0f} min of runs.",
                    "",
                    '"vs fp32": against fp32 run with the same seeds (paired); the plot shows the seeds every codec of a '
                    "data set ran.",
                    "",
                    codec_table(codec, raw),
                    "",
                    "![accuracy against uplink bytes](codec_accuracy.png)",
                ]
            ),
            DETAILS,
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="strategies,codecs", help="strategies, codecs or both (comma-separated)")
    parser.add_argument("--datasets", default="bbc-news,20newsgroups")
    parser.add_argument("--alphas", default="0.1,0.5,1.0", help="Dirichlet alphas of the strategy suite")
    parser.add_argument("--codec-alpha", type=float, default=0.5)
    parser.add_argument("--codecs", default=",".join(CODECS))
    parser.add_argument("--only", help="comma-separated strategy names to run (strategy suite)")
    parser.add_argument("--configs", help="strategy suite: run these, in this order, e.g. fedavg:2,flexlora:2/4/8/16")
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument(
        "--lr-rank-power",
        type=float,
        default=0.0,
        help="mixed ranks: rank-r devices train at lr * (max rank / r) ** this (shown with the strategy)",
    )
    parser.add_argument(
        "--rank-norm-power",
        type=float,
        default=0.0,
        help="flexlora-delta: each device's change counts divided by (r / max rank) ** this",
    )
    parser.add_argument("--seeds", default="0", help="comma-separated seeds: each configuration runs once per seed")
    parser.add_argument("--eval-max", type=int, default=2000, help="test examples the aggregator evaluates on")
    parser.add_argument("--report-only", action="store_true", help="rewrite tables and plots from the JSON only")
    args = parser.parse_args()
    command = command_line("bench/federated_bench.py", sys.argv[1:])

    rows = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    for r in rows:  # rows from before a setting was recorded ran with the bench's default
        r.setdefault("eval_max", 2000)
        for k in TUNING:
            r.setdefault(k, 0.0)
        # rows written before per-device numbers were kept: read them from the run folder
        out = (
            ROOT
            / "runs"
            / "bench"
            / _name(
                r["dataset"],
                r["alpha"],
                r["strategy"],
                tuple(r["ranks"]),
                r["codec"],
                r["seed"],
                {k: r[k] for k in TUNING},
                r["rounds"],
            )
        )
        if "device_local" not in r and (out / "metrics.jsonl").is_file():
            r["device_local"] = summarize(out)["device_local"]
    plan = []
    suites = set(args.suite.split(","))
    if not suites <= {"strategies", "codecs"}:
        parser.error(f"unknown suite in {args.suite!r}")
    only = set(args.only.split(",")) if args.only else None
    for dataset in args.datasets.split(","):
        if "strategies" in suites:
            configs = [(s, ranks) for s, ranks in STRATEGY_CONFIGS if not only or s in only]
            if args.configs:
                configs = [
                    (c.split(":")[0], tuple(int(r) for r in c.split(":")[1].split("/")))
                    for c in args.configs.split(",")
                ]
            for alpha in (float(a) for a in args.alphas.split(",")):
                plan += [(dataset, alpha, s, ranks, "fp32") for s, ranks in configs]
        if "codecs" in suites:
            plan += [(dataset, args.codec_alpha, "fedavg", (8,), c) for c in args.codecs.split(",")]
    plan = [
        (*p, seed) for seed in (int(s) for s in args.seeds.split(",")) for p in plan
    ]  # one seed of everything first
    (ROOT / "runs" / "bench").mkdir(parents=True, exist_ok=True)
    for dataset, alpha, strategy, ranks, codec, seed in [] if args.report_only else plan:
        probe = {
            "dataset": dataset,
            "alpha": alpha,
            "strategy": strategy,
            "ranks": list(ranks),
            "codec": codec,
            **{k: getattr(args, k) for k in (*TUNING, *RUN_SETTINGS)},
            "seed": seed,
        }
        if any(_key(r) == _key(probe) for r in rows):
            continue
        rows.append(run_one(args, dataset, alpha, strategy, ranks, codec, seed))
        RESULTS.write_text(json.dumps(rows, indent=1) + "\n")
        report(rows, command)
    report(rows, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
