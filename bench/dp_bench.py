"""Differential privacy's utility: ``fedlora simulate`` on BBC News, without DP and at a target
epsilon (delta 1e-5), per strategy where DP applies (fedavg, ffa-lora).

Two modes:

* ten devices (the default): every device takes part in every round (q = 1: no amplification
  by sampling), at epsilon 8 and 1;
* ``--fleet``: a population of many devices on the Ray worker pool (``simulator.fleet``), of
  which ``--per-round`` are sampled each round, on average (Poisson sampling at q = per-round / population:
  amplification by sampling, ``privacy.accounting: sampled``), at ``--target-epsilon``. Each
  run is one ``fedlora simulate`` process; a finished run's result is kept in
  ``<out>/fleet/<run>.json`` and reused by the same command (so that the strategies can run
  one invocation at a time and the last one writes the docs). Writes ``docs/dp_fleet.png``
  (accuracy per round, DP against no DP).

In both the noise multiplier for the target epsilon over the run's rounds comes from the
accountant (``server.privacy.epsilon``, dp-accounting's RDP), searched here. Each run's epsilon
per round is in its report (``<out>/<run>/report.md``, "Differential privacy").

    .venv/bin/python bench/dp_bench.py [--rounds 3 --max-train 600 --eval-max 300] [--write-docs]
    .venv/bin/python bench/dp_bench.py --fleet [--population 1780 --per-round 150 --rounds 15] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devkit.docsection import DocSection, command_line  # noqa: E402
from server.privacy import epsilon  # noqa: E402
from server.store import StateStore  # noqa: E402
from simulator.run import SimulateConfig, run_simulation  # noqa: E402

DOC_SECTION = DocSection("dp_bench", "bench/dp_bench.py", "## Differential privacy: utility")
FLEET_SECTION = DocSection("dp_bench:fleet", "bench/dp_bench.py", "## Differential privacy: utility")
FLEET_PNG = ROOT / "docs" / "dp_fleet.png"
RUNS = (("fedavg", 0.0), ("fedavg", 8.0), ("fedavg", 1.0), ("ffa-lora", 0.0), ("ffa-lora", 8.0))


def noise_for(target: float, rounds: int, delta: float, q: float = 1.0) -> float:
    """The smallest noise multiplier (to 0.01) whose ``rounds`` rounds at sampling rate ``q``
    stay within ``target``."""
    lo, hi = 0.3, 100.0
    while hi - lo > 0.01:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if epsilon({(q, mid): rounds}, delta) <= target else (mid, hi)
    return round(hi, 2)


def run(args, strategy: str, target: float) -> dict:
    name = f"{strategy}-eps{target:g}" if target else f"{strategy}-nodp"
    privacy = {}
    if target:
        z = noise_for(target, args.rounds, args.delta)
        privacy = {"mode": "central", "noise_multiplier": z, "clip_norm": args.clip, "delta": args.delta}
    edge_python = str(ROOT / ".venv-edge" / "bin" / "python")
    cfg = SimulateConfig(
        dataset=args.dataset,
        devices=args.devices,
        rounds=args.rounds,
        local_steps=args.local_steps,
        max_train=args.max_train,
        eval_max=args.eval_max,
        max_length=args.max_length,
        seed=args.seed,
        strategy=strategy,
        out=args.out / name,
        device_python=edge_python,
        privacy=privacy,
    )
    print(f"[dp_bench] {name} {privacy}", flush=True)
    started = time.time()
    result = run_simulation(cfg)
    history = StateStore(args.out / name / "aggregator").load()["history"]
    return {
        "name": name,
        "strategy": strategy,
        "target": target,
        "noise_multiplier": privacy.get("noise_multiplier"),
        "epsilon": [h.get("dp_epsilon") for h in history],
        "final": result["final"].get("accuracy"),
        "wall_s": round(time.time() - started, 1),
    }


def render(rows: list[dict], clip: float) -> str:
    base = {r["strategy"]: r["final"] for r in rows if not r["target"]}
    lines = [
        "| strategy | target epsilon | noise multiplier | clip | epsilon after each round | final accuracy | vs no DP |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        eps = ", ".join(f"{e:.2f}" for e in r["epsilon"] if e is not None) or "-"
        gap = f"{100 * (r['final'] - base[r['strategy']]):+.1f} points" if r["target"] else ""
        lines.append(
            f"| {r['strategy']} | {r['target'] or 'no DP'} | {r['noise_multiplier'] or '-'} | "
            f"{clip if r['target'] else '-'} | {eps} | {r['final']:.4f} | {gap} |"
        )
    return "\n".join(lines)


# -- the fleet mode ------------------------------------------------------------------------
def fleet_bundle() -> Path:
    """The tests' cached MiniLM-L6 export at rank 2 (32 tokens)."""
    from devkit.assets import minilm_bbc_export

    return minilm_bbc_export() / "r2"


def fleet_command(args, strategy: str, privacy: dict, out: Path) -> list[str]:
    """The ``fedlora simulate`` invocation of one fleet run."""
    cmd = ["-m", "simulator.cli", "simulate", "--bundle", str(args.bundle), "--dataset", args.dataset]
    cmd += ["--devices", str(args.population), "--participation", repr(args.per_round / args.population)]
    cmd += ["--workers", str(args.workers), "--split", "iid", "--rounds", str(args.rounds)]
    cmd += ["--local-steps", str(args.local_steps), "--batch-size", str(args.batch_size)]
    cmd += ["--strategy", strategy, "--eval-max", str(args.eval_max), "--seed", str(args.seed), "--out", str(out)]
    cmd += ["--device-python", str(ROOT / ".venv-edge" / "bin" / "python")]
    if args.lr:
        cmd += ["--lr", repr(args.lr)]
    if args.server_momentum:
        cmd += ["--server-optimizer", "fedavgm", "--server-momentum", repr(args.server_momentum)]
    for key, value in privacy.items():
        cmd += [f"--dp-{key.replace('_', '-')}", str(value)]
    return cmd


def fleet_run(args, strategy: str, target: float, clip: float) -> dict:
    """One fleet run (reused from ``<out>/fleet/<name>.json`` when the same settings ran before)."""
    name = f"{strategy}-eps{target:g}" if target else f"{strategy}-nodp"
    out = args.out / "fleet" / name
    q = args.per_round / args.population
    privacy = {}
    if target:
        z = noise_for(target, args.rounds, args.delta, q)
        privacy = {"mode": "central", "noise_multiplier": z, "clip_norm": clip, "delta": args.delta}
    cmd = fleet_command(args, strategy, privacy, out)
    saved = args.out / "fleet" / f"{name}.json"
    if saved.is_file() and json.loads(saved.read_text())["command"] == cmd:
        print(f"[dp_bench] {name}: reusing {saved}", flush=True)
        return json.loads(saved.read_text())
    print(f"[dp_bench] {name} q={q:.4f} {privacy}", flush=True)
    started = time.time()
    proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: fedlora simulate failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rounds = [h for h in history if h.get("round", 0) > 0]
    row = {
        "name": name,
        "strategy": strategy,
        "target": target,
        "noise_multiplier": privacy.get("noise_multiplier"),
        "clip": privacy.get("clip_norm"),
        "sampling_rate": [h.get("dp_sampling_rate") for h in rounds],
        "epsilon": [h.get("dp_epsilon") for h in rounds],
        "epsilon_every_round": [h.get("dp_epsilon_every_round") for h in rounds],
        "accuracy": [(h.get("eval") or {}).get("accuracy") for h in rounds],
        "median_norm": [h.get("median_norm") for h in rounds],
        "participants": [h.get("participants") for h in rounds],
        "final": (rounds[-1].get("eval") or {}).get("accuracy"),
        "wall_s": round(time.time() - started, 1),
        "command": cmd,
    }
    saved.write_text(json.dumps(row, indent=1))
    return row


def fleet_plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in rows:
        acc = r["accuracy"]
        label = f"{r['strategy']}, " + (f"DP epsilon {r['epsilon'][-1]:.2f}" if r["target"] else "no DP")
        ax.plot(range(1, len(acc) + 1), acc, marker="o" if r["target"] else "s", ms=3, label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (BBC News, 445 articles)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(FLEET_PNG, dpi=110)


def fleet_render(rows: list[dict], args) -> str:
    base = {r["strategy"]: r["final"] for r in rows if not r["target"]}
    lines = [
        "| strategy | target epsilon | noise multiplier z | clip C | devices per round | epsilon after rounds 1, 5, 10, ... and last | "
        "epsilon at q = 1 (every round counted) | final accuracy | vs no DP | run (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        n = len(r["epsilon"])
        marks = sorted({i for i in range(n) if i == 0 or (i + 1) % 5 == 0} | {n - 1})
        eps = ", ".join(f"{r['epsilon'][i]:.2f}" for i in marks) if r["target"] else "-"
        gap = f"{100 * (r['final'] - base[r['strategy']]):+.1f} points" if r["target"] and r["strategy"] in base else ""
        per_round = f"{min(r['participants'])}-{max(r['participants'])}"
        every = f"{r['epsilon_every_round'][-1]:.1f}" if r["target"] else "-"
        lines.append(
            f"| {r['strategy']} | {r['target'] or 'no DP'} | {r['noise_multiplier'] or '-'} | {r['clip'] or '-'} | "
            f"{per_round} | {eps} | {every} | "
            f"{r['final']:.4f} | {gap} | {r['wall_s']:.0f} |"
        )
    q = args.per_round / args.population
    acc = "\n".join(f"- {r['name']}: " + ", ".join(f"{a:.3f}" for a in r["accuracy"]) for r in rows)
    eps = "\n".join(f"- {r['name']}: " + ", ".join(f"{e:.2f}" for e in r["epsilon"]) for r in rows if r["target"])
    return (
        f"A population of {args.population} devices (BBC News's 1,780 training articles split IID over them; "
        f"1,780 devices: one article each), {args.per_round} sampled per round (q = {q:.4f}; the DP runs "
        f"Poisson-sample, so their rounds hold {args.per_round} on average, from the operating system's generator; "
        f"the first round waits for the whole population), {args.rounds} rounds of "
        f"{args.local_steps} local steps of {args.batch_size}"
        + (f" at device lr {args.lr:g}" if args.lr else "")
        + (f", server momentum {args.server_momentum:g} (FedAvgM)" if args.server_momentum else "")
        + f", MiniLM-L6 rank 2 at 32 tokens on {args.workers} Ray "
        f"workers, central DP at delta {args.delta:g}; z from the accountant for the target over the rounds at q"
        + ("; C the non-private run's median update norm in its first round" if not args.clip else "")
        + ". "
        "Accuracy on all 445 test articles after each round:\n\n"
        + "\n".join(lines)
        + "\n\nAccuracy per round:\n\n"
        + acc
        + "\n\nEpsilon after each round (the accountant's, as in each run's report):\n\n"
        + eps
        + "\n\n![accuracy per round, DP against no DP](dp_fleet.png)\n"
    )


def fleet_main(args, argv) -> int:
    args.bundle = args.bundle or fleet_bundle()
    (args.out / "fleet").mkdir(parents=True, exist_ok=True)
    rows = []
    for strategy in args.strategies.split(","):
        base = fleet_run(args, strategy, 0.0, 0.0)
        rows.append(base)
        # C: the given clip, or the non-private run's median update norm in its first round
        clip = args.clip or round(float(base["median_norm"][0]), 2)
        rows.append(fleet_run(args, strategy, args.target_epsilon, clip))
    fleet_plot(rows)
    command = command_line("bench/dp_bench.py", argv)
    details = f"({sum(r['wall_s'] for r in rows):.0f} s of runs)"
    body = fleet_render(rows, args)
    print(FLEET_SECTION.render(command, body, details))
    if args.write_docs:
        FLEET_SECTION.write(command, body, details)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="bbc-news")
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--max-train", type=int, default=600)
    ap.add_argument("--eval-max", type=int, default=300)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument(
        "--clip",
        type=float,
        default=1.0,
        help="the clip norm C (the honest median norm is ~2.5 with ten devices; --fleet with 0: the non-private "
        "run's median update norm in its first round)",
    )
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "dp_bench")
    ap.add_argument("--write-docs", action="store_true")
    fleet = ap.add_argument_group("--fleet: many devices on the Ray worker pool, a random sample per round")
    fleet.add_argument("--fleet", action="store_true")
    fleet.add_argument("--population", type=int, default=1780, help="devices (1780: every BBC training article)")
    fleet.add_argument("--per-round", type=int, default=150, help="devices sampled per round")
    fleet.add_argument("--workers", type=int, default=2)
    fleet.add_argument("--batch-size", type=int, default=8)
    fleet.add_argument("--target-epsilon", type=float, default=8.0)
    fleet.add_argument("--lr", type=float, default=0.0, help="the devices' AdamW rate (0: the task's default)")
    fleet.add_argument(
        "--server-momentum", type=float, default=0.0, help="FedAvgM's server momentum (0: plain averaging, sgd)"
    )
    fleet.add_argument("--strategies", default="ffa-lora,fedavg")
    fleet.add_argument("--bundle", type=Path, help="default: the tests' cached MiniLM-L6 rank-2 export")
    args = ap.parse_args(argv)
    argv = argv if argv is not None else sys.argv[1:]
    if args.fleet:
        return fleet_main(args, argv)
    rows = [run(args, strategy, target) for strategy, target in RUNS]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dp_bench.json").write_text(json.dumps(rows, indent=1))
    command = command_line("bench/dp_bench.py", argv)
    details = f"({sum(r['wall_s'] for r in rows):.0f} s; MiniLM-L6 rank 8, Dirichlet 0.5, every device every round)"
    body = render(rows, args.clip)
    print(DOC_SECTION.render(command, body, details))
    if args.write_docs:
        DOC_SECTION.write(command, body, details)
    return 0


if __name__ == "__main__":
    sys.exit(main())
