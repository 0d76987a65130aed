"""Does a device answer while it trains? Ack latency and terminal tracebacks of ``fedlora simulate``.

Two configurations of the same small job, run one after the other in this invocation:

- ``before``: what ``fedlora simulate`` did up to issue 18: the embedded amqtt broker and each
  device training in its own process's main thread (``FEDLORA_DEVICE_ISOLATE_TRAINING=false``),
  so ONNX Runtime's step holds the GIL that paho's network thread needs;
- ``after``: today's defaults: the embedded Mosquitto (amqtt where Mosquitto is not installed)
  and the training step in a child process of the device.

Per update (device, round): the ack latency, from the device's log line "update sent" to
"update accepted"; how often a device sent a round's update again for want of an ack; and the
number of tracebacks in the simulator's terminal (stdout and stderr of ``fedlora simulate``).
The section of ``docs/benchmarks.md`` is rewritten.

    .venv/bin/python bench/responsiveness_bench.py --devices 8 --rounds 3 --max-train 1200
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # devkit: the benchmarks' and tests' kit, not installed

from devkit.docsection import DocSection, command_line  # noqa: E402

SECTION = DocSection(
    "responsiveness_bench", "bench/responsiveness_bench.py", "## A device that trains still answers (issue 18)"
)
CONFIGS = {
    "before": (["--embedded-broker", "amqtt"], {"FEDLORA_DEVICE_ISOLATE_TRAINING": "false"}),
    "after": ([], {}),
}
LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ [\w.]+: round (\d+): (update sent|update accepted)")


def ack_latencies(devices_dir: Path) -> tuple[list[float], int]:
    """Seconds from a round's first "update sent" to its "update accepted", over every device;
    and how many sends were repeats of a round already sent."""
    latencies, repeats = [], 0
    for log in sorted(devices_dir.glob("*/device.log")):
        sent: dict[str, datetime] = {}
        for line in log.read_text(errors="replace").splitlines():
            m = LINE.match(line)
            if not m:
                continue
            at = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f")
            if m[3] == "update sent":
                repeats += m[2] in sent
                sent.setdefault(m[2], at)
            elif m[2] in sent:
                latencies.append((at - sent[m[2]]).total_seconds())
    return latencies, repeats


def run_one(name: str, args) -> dict:
    flags, env = CONFIGS[name]
    out = ROOT / "runs" / "bench" / f"responsiveness-{name}"
    cmd = [
        sys.executable,
        "-m",
        "simulator.cli",
        "simulate",
        "--devices",
        str(args.devices),
        "--rounds",
        str(args.rounds),
        "--max-train",
        str(args.max_train),
        "--eval-max",
        str(args.eval_max),
        "--seed",
        "0",
        "--out",
        str(out),
        "--device-python",
        args.device_python,
        *flags,
    ]
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True)
    wall = time.monotonic() - started
    terminal = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"{name}: fedlora simulate failed ({proc.returncode}):\n{terminal[-4000:]}")
    latencies, repeats = ack_latencies(out / "devices")
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {
        "config": name,
        "updates": len(latencies),
        "ack_median_s": statistics.median(latencies),
        "ack_max_s": max(latencies),
        "repeats": repeats,
        "tracebacks": terminal.count("Traceback"),
        "round_median_s": statistics.median(h["duration_s"] for h in history),
        "wall_s": wall,
    }


def render(rows: list[dict], args, load: tuple[float, float, float]) -> str:
    head = (
        "| configuration | updates | ack latency median (s) | ack latency max (s) | updates sent again | "
        "tracebacks in the terminal | round median (s) | run (s) |\n|---|---|---|---|---|---|---|---|\n"
    )
    labels = {
        "before": "before: embedded amqtt, training on the device's main thread",
        "after": "after: embedded Mosquitto, training in a child process",
    }
    body = "".join(
        f"| {labels[r['config']]} | {r['updates']} | {r['ack_median_s']:.2f} | {r['ack_max_s']:.2f} | {r['repeats']} | "
        f"{r['tracebacks']} | {r['round_median_s']:.1f} | {r['wall_s']:.0f} |\n"
        for r in rows
    )
    return (
        f"BBC News, MiniLM-L6 rank 8 at 128 tokens, {args.devices} device processes, {args.rounds} rounds of the "
        f"default 20 steps of 8, {args.max_train} training examples; both configurations in one invocation, one "
        f"after the other, on a shared 2-core machine (load average before the runs {load[0]:.1f}, "
        f"{load[1]:.1f}, {load[2]:.1f}). Ack latency: from a device's log line `update sent` to `update accepted`, "
        "per update.\n\n" + head + body
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-train", type=int, default=1200)
    parser.add_argument("--eval-max", type=int, default=100)
    parser.add_argument("--device-python", default=str(ROOT / ".venv-edge" / "bin" / "python"))
    parser.add_argument("--configs", default="before,after")
    args = parser.parse_args()
    load = os.getloadavg()
    rows = []
    for name in args.configs.split(","):
        rows.append(run_one(name, args))
        print(json.dumps(rows[-1]), flush=True)
    argv = [a for a in sys.argv[1:]]
    body = render(rows, args, load)
    SECTION.write(command_line("bench/responsiveness_bench.py", argv), body, f"({datetime.now():%Y-%m-%d})")
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
