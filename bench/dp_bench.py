"""Differential privacy's utility: ``fedlora simulate`` on BBC News with 10 devices, without DP
and at epsilon 8 and 1 (delta 1e-5), per strategy where DP applies (fedavg, ffa-lora).

Every device takes part in every round (q = 1: no amplification by sampling), so the noise
multiplier for a target epsilon over the run's rounds comes from the accountant
(``server.privacy.epsilon``), searched here. Each run's epsilon per round is in its report
(``runs/dp_bench/<run>/report.md``, "Differential privacy").

    .venv/bin/python bench/dp_bench.py [--rounds 3 --max-train 600 --eval-max 300] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
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
RUNS = (("fedavg", 0.0), ("fedavg", 8.0), ("fedavg", 1.0), ("ffa-lora", 0.0), ("ffa-lora", 8.0))


def noise_for(target: float, rounds: int, delta: float) -> float:
    """The smallest noise multiplier (to 0.01) whose ``rounds`` rounds at q = 1 stay within ``target``."""
    lo, hi = 0.3, 100.0
    while hi - lo > 0.01:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if epsilon({(1.0, mid): rounds}, delta) <= target else (mid, hi)
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="bbc-news")
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--max-train", type=int, default=600)
    ap.add_argument("--eval-max", type=int, default=300)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--clip", type=float, default=1.0, help="the clip norm C (the honest median norm is ~2.5 here)")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "dp_bench")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)
    rows = [run(args, strategy, target) for strategy, target in RUNS]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dp_bench.json").write_text(json.dumps(rows, indent=1))
    command = command_line("bench/dp_bench.py", argv if argv is not None else sys.argv[1:])
    details = f"({sum(r['wall_s'] for r in rows):.0f} s; MiniLM-L6 rank 8, Dirichlet 0.5, every device every round)"
    body = render(rows, args.clip)
    print(DOC_SECTION.render(command, body, details))
    if args.write_docs:
        DOC_SECTION.write(command, body, details)
    return 0


if __name__ == "__main__":
    sys.exit(main())
