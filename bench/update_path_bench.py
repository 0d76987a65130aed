"""The aggregator's work per update, without the network: CPU milliseconds on its main thread.

``bench/capacity_bench.py`` measures whole processes through a real broker, where paho's network
thread, Mosquitto and the load generator share this machine's two cores with the loop being
measured, so its rates move by 10-15 % from run to run. This bench isolates the main loop: one
``Aggregator`` (this tree's, or ``--baseline REV``'s from ``git archive``) in this process,
connected to a real Mosquitto (for its acks), with every device online and one round open; then
the chunks of ``--updates`` real encoded updates (MiniLM-L6 rank 8, fp32, cut below the 128 KiB
packet limit as devices cut them) go straight to ``Aggregator.handle`` in one thread, group
committed every ``--batch`` updates (``commit.batch``, as the loop does at saturation). Per repeat: the process CPU time per update
(paho's thread sending the acks included); the median of ``--repeats`` fresh aggregators is
reported, this tree and the baseline alternating (each first in turn), with their paired ratio. ``--profile`` also
prints where one repeat of this tree's time goes (cProfile, grouped by stage).

    .venv/bin/python bench/update_path_bench.py --baseline 2961080 [--profile] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # devkit: the benchmarks' and tests' kit, not installed

from devkit.docsection import DocSection, command_line  # noqa: E402

SECTION = DocSection(
    "update_path_bench", "bench/update_path_bench.py", "## Aggregator capacity: updates a second through Mosquitto"
)
JOB = "path"
# The stages of an update, each the cumulative cProfile time of its functions (file, function
# name), minus what an earlier stage's functions took inside it.
STAGES = (
    ("sha256 of the reassembled payload", [("protocol.py", "message_id")], []),
    ("reassembly (chunks, join)", [("protocol.py", "add")], ["sha256 of the reassembled payload"]),
    ("envelope header (zlib, JSON, typed fields)", [("protocol.py", "_read_header")], []),
    (
        "envelope layout and tensor views",
        [("protocol.py", "decode_envelope")],
        ["envelope header (zlib, JSON, typed fields)"],
    ),
    ("strategy checks (tensors, shapes, finiteness)", [("base.py", "check")], []),
    ("norm and bounds", [("rounds.py", "bounded")], []),
    ("base + change, float64 sums", [("aggregator.py", "<dictcomp>"), ("rounds.py", "add")], []),
    ("group commit (SQLite) and acks", [("aggregator.py", "commit_batch")], []),
)


def measure(code: Path, bundle: Path, url: str, job: str, updates: int, batch: int, profile: str = "") -> dict:
    """One repeat in a fresh process that imports ``code`` only: its aggregator, ``updates``
    updates through handle() (the parent holds the broker and the bundle)."""
    script = f"""
import sys, json, tempfile, time, shutil
sys.path.insert(0, {str(code)!r})
from pathlib import Path
import numpy as np
from core.bundle import Bundle
from core.messages import Presence, Status
from core.protocol import CHUNK_HEADER, Envelope, Topics, encode_envelope, split_chunks
from core.transport import PACKET_OVERHEAD, MqttLink
from edge_client.runtime import read_parameters
from server.aggregator import Aggregator
from server.config import load_server_config
assert Aggregator.__module__ and sys.modules["server.aggregator"].__file__.startswith({str(code)!r})
work = Path(tempfile.mkdtemp(prefix="fedlora-path-"))
try:
    bundle = Bundle({str(bundle)!r})
    g0 = read_parameters(bundle)
    n = {updates}
    devices = [f"dev{{i:05d}}" for i in range(n)]
    cfg = load_server_config(None, {{"job": {job!r}, "bundle": str(bundle.root), "state_dir": str(work / "state"),
        "broker": {{"url": {url!r}}}, "http_port": 0, "adapter_versions": 0,
        "rounds": {{"rounds": 1, "min_devices": n, "round_timeout": 3600, "min_updates": 1}}}})
    link = MqttLink(cfg.broker, client_id="path-bench-{job}").connect()
    agg = Aggregator(cfg, link)
    agg.start()
    topics = Topics({job!r})
    for i, d in enumerate(devices):
        agg.handle(topics.status(d), Status(Presence.ONLINE, bundle.manifest.rank, 1 + i % 5, "bench").to_bytes())
    agg.tick()
    assert agg.coordinator.open is not None, "no round opened"
    rng = np.random.default_rng(0)
    pool = [{{k: rng.normal(0, 1e-4, v.shape).astype(np.float32) for k, v in g0.items()}} for _ in range(16)]
    room = 128 * 1024 - PACKET_OVERHEAD - len(topics.update(devices[0]).encode()) - CHUNK_HEADER.size
    msgs = [(topics.update(d), split_chunks(encode_envelope(Envelope(kind="update", job={job!r}, round=1, sender=d,
             rank=bundle.manifest.rank, codec="fp32", tensors=pool[i % 16], num_examples=1 + i % 5,
             base_version=agg.coordinator.version)), room)) for i, d in enumerate(devices)]
    while not link.inbox.empty():
        link.inbox.get_nowait()
    prof = None
    if {profile!r}:
        import cProfile
        prof = cProfile.Profile()
        prof.enable()
    c0 = time.process_time()
    for topic, chunks in msgs:
        for c in chunks:
            agg.handle(topic, c)
        if len(agg._batch) >= {batch}:
            agg.commit_batch()
    agg.commit_batch()
    cpu = time.process_time() - c0
    if prof is not None:
        prof.disable()
        prof.dump_stats({profile!r})
    accepted = len(agg.coordinator.open.accepted) if agg.coordinator.open else 0
    assert accepted == n, f"{{accepted}} of {{n}} updates accepted"
    link.close()
    print(json.dumps({{"ms": 1000 * cpu / n}}))
finally:
    shutil.rmtree(work, ignore_errors=True)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDLORA_")}
    env["PYTHONPATH"] = str(code)
    proc = subprocess.run([sys.executable, "-c", script], cwd=code, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the bench's aggregator in {code} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def stages(stats_file: str) -> list[tuple[str, float]]:
    """Each stage's share of the profiled loop."""
    import pstats

    profile = pstats.Stats(stats_file)
    stats = profile.stats  # type: ignore[attr-defined]

    def cumulative(file: str, func: str) -> float:
        return sum(v[3] for (f, _line, name), v in stats.items() if f.endswith("/" + file) and name == func)

    own = {}
    for name, functions, minus in STAGES:
        own[name] = sum(cumulative(f, fn) for f, fn in functions) - sum(own[m] for m in minus)
    whole = profile.total_tt  # type: ignore[attr-defined]
    rest = whole - sum(own.values())
    rows = [*own.items(), ("the rest (dispatch, rate limits, topics, admission)", max(0.0, rest))]
    return [(name, t / whole) for name, t in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--updates", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=256, help="group commit every this many updates (commit.batch)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline", default="", help="also measure the aggregator of this git revision")
    parser.add_argument("--profile", action="store_true", help="profile one more repeat of this tree, by stage")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "bench"))
    import capacity_bench

    tmp = Path(tempfile.mkdtemp(prefix="fedlora-path-base-"))
    broker, url = capacity_bench.start_broker(tmp)
    try:
        bundle = capacity_bench.minilm_bundle()
        codes = {"this tree": ROOT}
        if args.baseline:
            codes = {
                f"baseline {args.baseline}": capacity_bench.baseline_tree(args.baseline, tmp / "baseline"),
                **codes,
            }
        ms: dict[str, list[float]] = {name: [] for name in codes}
        for i in range(args.repeats):  # alternating, and in turn first, so that neither gains by order
            pairs = list(codes.items())
            for j, (name, code) in enumerate(pairs if i % 2 == 0 else pairs[::-1]):
                ms[name].append(measure(code, bundle, url, f"path{i}-{j}", args.updates, args.batch)["ms"])
                print(f"[path] repeat {i + 1}/{args.repeats} {name}: {ms[name][-1]:.3f} ms an update", flush=True)
        shares = []
        if args.profile:
            stats_file = str(tmp / "profile.out")
            measure(ROOT, bundle, url, "path-profile", args.updates, args.batch, profile=stats_file)
            shares = stages(stats_file)
    finally:
        broker.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    lines = [
        f"{args.updates} MiniLM-L6 rank-8 fp32 updates (296 KiB in 3 chunks each) through `Aggregator.handle`, "
        f"group commits of {args.batch}, {args.repeats} repeats each, alternating, each first in turn; load average "
        f"{os.getloadavg()[0]:.1f} after.",
        "",
        "| aggregator | CPU ms an update, median | repeats | updates/s one core could take |",
        "|---|---|---|---|",
    ]
    for name, values in ms.items():
        med = statistics.median(values)
        lines.append(f"| {name} | {med:.3f} | {', '.join(f'{v:.2f}' for v in values)} | {1000 / med:.0f} |")
    if args.baseline:
        ratios = [t / b for t, b in zip(ms["this tree"], ms[f"baseline {args.baseline}"])]
        lines += [
            "",
            f"Paired ratio, this tree / baseline: median {statistics.median(ratios):.2f} "
            f"({', '.join(f'{r:.2f}' for r in ratios)}).",
        ]
    if shares:
        lines += [
            "",
            "Where this tree's time goes (cProfile of one more repeat, own time by stage):",
            "",
            "| stage | share |",
            "|---|---|",
        ]
        lines += [f"| {name} | {share:.0%} |" for name, share in shares]
    body = "\n".join(lines)
    print(body)
    if args.write_docs:
        SECTION.write(
            command_line("bench/update_path_bench.py", sys.argv[1:] if argv is None else argv),
            body,
            f"({time.strftime('%Y-%m-%d')})",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
