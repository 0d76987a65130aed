"""Where an ORT training step spends its time: ONNX Runtime's profiler, summed per operator type.

    .venv/bin/python bench/profile_step.py .cache/step_bench/minilm-r8-len128-<key>/r8 --batch 8 --seq 128

Prints milliseconds per step for each operator type (kernel time only) and the slowest nodes.
ORT profiles a session from its creation on, so the first ``--skip`` steps (warm-up) are left
out of the summary.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_bench  # the bench folder is not a package


def profile(
    bundle: str, batch: int, seq: int, steps: int, threads: int, prefix: str, config: dict[str, str] | None = None
) -> list[dict]:
    from core.bundle import Bundle
    from edge_client import runtime
    from edge_client.data import Batch

    runtime.training_api()
    base = runtime._session_options

    def profiled(opts):
        so = base(opts)
        so.enable_profiling = True
        so.profile_file_prefix = prefix
        for key, value in (config or {}).items():
            so.add_session_config_entry(key, value)
        return so

    runtime._session_options = profiled
    try:
        trainer = runtime.Trainer(Bundle(bundle), options=runtime.RuntimeOptions(intra_op_threads=threads))
    finally:
        runtime._session_options = base
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 29000, size=(batch, seq), dtype=np.int64)
    data = Batch(ids, np.ones_like(ids), rng.integers(0, 5, size=batch, dtype=np.int64))
    for _ in range(steps):
        trainer.train_step(data)
    del trainer  # the sessions write their profiles when they close
    events = []
    for path in Path(prefix).parent.glob(Path(prefix).name + "*.json"):
        # Module and Optimizer sessions may share one file name; read it line by line.
        for line in path.read_text().splitlines():
            line = line.strip().rstrip(",")
            if line.startswith("{") and line.endswith("}"):
                try:
                    events.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return events


def summarize(events: list[dict], skip: int, top: int) -> str:
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    longest = max(e["dur"] for e in runs)  # the training runs; the optimizer's (same file) are short
    runs = sorted((e for e in runs if e["dur"] > longest / 5), key=lambda e: e["ts"])[skip:]
    windows = [(r["ts"], r["ts"] + r["dur"]) for r in runs]
    by_op, count, by_node = collections.Counter(), collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        if not any(a <= e["ts"] <= b for a, b in windows):
            continue
        op = e["args"].get("op_name", "?")
        by_op[op] += e["dur"]
        count[op] += 1
        by_node[e["name"][: -len("_kernel_time")]] += e["dur"]
    n = max(1, len(runs))
    total = sum(by_op.values())
    head = (
        f"{n} profiled steps: step (model_run) {np.median([r['dur'] for r in runs]) / 1000:.1f} ms median, "
        f"kernels {total / n / 1000:.1f} ms/step"
    )
    lines = [head, "", "| op type | ms/step | share | nodes |", "|---|---:|---:|---:|"]
    lines += [
        f"| {op} | {d / n / 1000:.2f} | {100 * d / total:.1f}% | {count[op] // n} |" for op, d in by_op.most_common(top)
    ]
    lines += ["", "slowest nodes (ms/step):"]
    lines += [f"  {d / n / 1000:6.2f}  {name}" for name, d in by_node.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip", type=int, default=2, help="first steps left out of the summary")
    parser.add_argument("--threads", type=int, default=0, help="0: ORT's default (all cores)")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="session config entry, e.g. session.set_denormal_as_zero=1 (repeatable)",
    )
    args = parser.parse_args(argv)
    config = dict(item.split("=", 1) for item in args.config)
    with tempfile.TemporaryDirectory() as tmp:
        events = profile(args.bundle, args.batch, args.seq, args.steps, args.threads, f"{tmp}/ort_profile", config)
    step_bench._assert_torch_free()
    print(summarize(events, args.skip, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
