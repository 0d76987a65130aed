"""Robust aggregation benchmark: one or three devices in ten send sign-flipped or 100x-scaled
updates (within the aggregator's norm bound: it clips them), with the plain mean and with the
robust methods (``robust.method``, server/robust.py).

Every run is a real ``fedlora simulate`` job (MiniLM-L6, BBC News, Dirichlet 0.5); the
attackers are ``bench/poison_device.py --factor F`` (they train honestly, then multiply their
update by F and claim their true data size). The table gives the final test accuracy of each
run and its gap to the clean run with the same method.

    .venv/bin/python bench/robust_bench.py [--rounds 3 --max-train 600 --eval-max 300] [--reuse] [--write-docs]
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
from simulator.run import SimulateConfig, run_simulation  # noqa: E402

DOC_SECTION = DocSection("robust_bench", "bench/robust_bench.py", "## Poisoning: sign-flipped and scaled updates")
ATTACKS = {"sign_flip": -1.0, "scaled_100x": 100.0}
# (method, attack, attackers): the clean runs first, the attacked ones after
RUNS = (
    ("mean", None, 0),
    ("median", None, 0),
    ("mean", "sign_flip", 3),
    ("median", "sign_flip", 3),
    ("mean", "scaled_100x", 3),
    ("median", "scaled_100x", 3),
    ("median_filter", None, 0),
    ("median_filter", "sign_flip", 3),
    ("median_filter", "scaled_100x", 3),
    ("median_filter", "sign_flip", 1),
    ("mean", "sign_flip", 1),
)


def reused(args, name: str) -> dict | None:
    """The result of an earlier finished run of this name (``--reuse``), else None."""
    from server.store import StateStore

    saved = args.out / name / "result.json"
    if saved.exists():
        return json.loads(saved.read_text())
    state = StateStore(args.out / name / "aggregator").load() if (args.out / name / "aggregator").exists() else None
    history = (state or {}).get("history", [])
    if len(history) < args.rounds or not (history[-1].get("eval") or {}).get("accuracy"):
        return None
    return {"final": history[-1]["eval"]["accuracy"], "wall_s": 0.0}


def run(args, method: str, attack: str | None, attackers: int) -> dict:
    name = f"{method}-{attack or 'clean'}-{attackers}"
    if args.reuse and (earlier := reused(args, name)) is not None:
        print(f"[robust_bench] {name}: reusing the earlier run", flush=True)
        return {"name": name, "method": method, "attack": attack, "attackers": attackers, **earlier}
    edge_python = str(ROOT / ".venv-edge" / "bin" / "python")
    device = [edge_python, str(ROOT / "bench" / "poison_device.py"), "--factor"]
    cfg = SimulateConfig(
        dataset=args.dataset,
        devices=args.devices,
        rounds=args.rounds,
        local_steps=args.local_steps,
        max_train=args.max_train,
        eval_max=args.eval_max,
        max_length=args.max_length,
        seed=args.seed,
        out=args.out / name,
        device_python=edge_python,
        robust={"method": method, "buckets": 5},
        device_commands={i: device + [str(ATTACKS[attack])] for i in range(attackers)} if attack else {},
        **({"bundle": args.bundle} if args.bundle else {}),
    )
    print(f"[robust_bench] {name}", flush=True)
    started = time.time()
    result = run_simulation(cfg)
    out = {"final": result["final"].get("accuracy"), "wall_s": round(time.time() - started, 1)}
    (args.out / name / "result.json").write_text(json.dumps(out))
    return {"name": name, "method": method, "attack": attack, "attackers": attackers, **out}


def render(rows: list[dict]) -> str:
    clean = {r["method"]: r["final"] for r in rows if r["attack"] is None}
    lines = [
        "| method | attack | attackers of 10 | final accuracy | vs the clean run of the same method |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        base = clean.get(r["method"])
        gap = "" if r["attack"] is None or base is None else f"{100 * (r['final'] - base):+.1f} points"
        lines.append(f"| {r['method']} | {r['attack'] or 'none'} | {r['attackers']} | {r['final']:.4f} | {gap} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="bbc-news")
    ap.add_argument("--bundle", type=Path, help="an exported bundle (default: export MiniLM-L6 once, cached)")
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--max-train", type=int, default=600)
    ap.add_argument("--eval-max", type=int, default=300)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "robust_bench")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--reuse", action="store_true", help="take finished runs of the same name from --out as they are")
    ap.add_argument("--only", help="run only these, e.g. mean-clean-0,median_filter-sign_flip-1")
    args = ap.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    rows = [run(args, *spec) for spec in RUNS if only is None or f"{spec[0]}-{spec[1] or 'clean'}-{spec[2]}" in only]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "robust_bench.json").write_text(json.dumps(rows, indent=1))
    command = command_line("bench/robust_bench.py", argv if argv is not None else sys.argv[1:])
    details = "(MiniLM-L6 rank 8, FedAvg, Dirichlet 0.5, 10 local steps, sequence length 32)"
    body = render(rows)
    print(DOC_SECTION.render(command, body, details))
    if args.write_docs:
        DOC_SECTION.write(command, body, details)
    return 0


if __name__ == "__main__":
    sys.exit(main())
