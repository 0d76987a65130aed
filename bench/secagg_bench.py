"""Secure aggregation's cost (core/secagg.py), in one process: bytes and seconds of one round
against plain aggregation, at 10 and 100 devices, with devices dropping after masking.

Per device: two key pairs, Shamir shares of two 32-byte secrets sealed for every peer, the
quantized update masked with every pairwise mask; the aggregator: the ring sum, rebuilding the
survivors' self seeds and the dropped devices' mask keys, and removing their masks. The update
is a MiniLM-L6 rank-8 adapter's size (``--values``). Compute is measured per step and summed
over devices (a real fleet runs the device steps in parallel: the per-device column is what one
device spends). Bytes are what crosses the broker beyond the update itself (the masked input
is one uint32 a value, the same 4 bytes as fp32).

    .venv/bin/python bench/secagg_bench.py [--values 73733] [--write-docs]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.secagg import (  # noqa: E402
    SEALED_BYTES,
    Quantizer,
    combine_secret,
    masked_input,
    new_keys,
    open_shares,
    reveal,
    ring_sum,
    seal_shares,
    unmask,
)
from devkit.docsection import DocSection, command_line  # noqa: E402

DOC_SECTION = DocSection("secagg_bench", "bench/secagg_bench.py", "## Secure aggregation: overhead")
JOB, ROUND = "bench", 1


def one_round(n: int, dropped: int, values: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    devices = [f"dev{i:03d}" for i in range(n)]
    threshold = max(2, n // 2 + 1)
    q = Quantizer(clip=0.05, max_devices=n)
    updates = {d: rng.normal(0, 0.005, values) for d in devices}
    t = {"keys": 0.0, "shares": 0.0, "open": 0.0, "mask": 0.0, "reveal": 0.0}
    start = time.perf_counter()
    keys = {d: new_keys() for d in devices}
    seeds = {d: rng.bytes(32) for d in devices}
    t["keys"] = time.perf_counter() - start
    held: dict[str, dict] = {d: {} for d in devices}
    for d in devices:
        start = time.perf_counter()
        sealed = seal_shares(
            d, keys[d], seeds[d], {p: keys[p].cipher_public for p in devices if p != d}, threshold, JOB, ROUND
        )
        t["shares"] += time.perf_counter() - start
        start = time.perf_counter()
        for peer, box in sealed.items():
            held[peer][d] = open_shares(peer, keys[peer], d, keys[d].cipher_public, box, JOB, ROUND)
        t["open"] += time.perf_counter() - start
    drop = set(devices[:dropped])
    mask_public = {d: keys[d].mask_public for d in devices}
    masked = {}
    for d in devices:
        if d in drop:
            continue
        start = time.perf_counter()
        masked[d] = masked_input(
            q.encode(updates[d], rng), d, keys[d], seeds[d], {p: mask_public[p] for p in devices if p != d}, JOB, ROUND
        )
        t["mask"] += time.perf_counter() - start
    survivors = sorted(masked)
    start = time.perf_counter()
    revealed = {s: reveal(held[s], survivors, drop) for s in survivors}
    t["reveal"] = time.perf_counter() - start
    start = time.perf_counter()
    total = ring_sum(masked.values())
    # The aggregator needs only the first `threshold` shares of each secret (Shamir is O(t^2)).
    self_seeds = {
        u: combine_secret([revealed[s][u] for s in survivors if s != u][:threshold], threshold) for u in survivors
    }
    mask_secrets = {g: combine_secret([revealed[s][g] for s in survivors][:threshold], threshold) for g in drop}
    peers_of = {d: [p for p in devices if p != d] for d in devices}
    result = unmask(total, self_seeds, mask_secrets, peers_of, mask_public, JOB, ROUND)
    aggregator_s = time.perf_counter() - start
    start = time.perf_counter()
    plain_sum = sum(updates[d] for d in survivors)
    plain_s = time.perf_counter() - start
    error = float(np.max(np.abs(q.decode(result) - plain_sum)))
    assert error <= len(survivors) / q.scale + 1e-12, error
    extra_up = 64 + (n - 1) * SEALED_BYTES + (n - 1) * 33  # keys, sealed shares, revealed shares
    extra_down = n * 64 + (n - 1) * SEALED_BYTES + 8 * n  # everyone's keys, shares for it, the survivor list
    device_s = (t["keys"] + t["shares"] + t["open"] + t["mask"] + t["reveal"]) / n
    return {
        "devices": n,
        "dropped": dropped,
        "threshold": threshold,
        "device_s": device_s,
        "mask_s": t["mask"] / max(1, len(survivors)),
        "aggregator_s": aggregator_s,
        "plain_sum_s": plain_s,
        "extra_up_bytes": extra_up,
        "extra_down_bytes": extra_down,
        "update_bytes": 4 * values,
        "max_error": error,
        "bound": len(survivors) / q.scale,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| devices | dropped after masking | threshold | device compute (per device) | of it, masking | aggregator unmask | plain sum | extra uplink per device | extra downlink per device | update | max error / bound |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['devices']} | {r['dropped']} | {r['threshold']} | {r['device_s'] * 1000:.0f} ms | {r['mask_s'] * 1000:.0f} ms | "
            f"{r['aggregator_s'] * 1000:.0f} ms | {r['plain_sum_s'] * 1000:.1f} ms | {r['extra_up_bytes'] / 1024:.1f} KiB | "
            f"{r['extra_down_bytes'] / 1024:.1f} KiB | {r['update_bytes'] / 1024:.0f} KiB | {r['max_error']:.2g} / {r['bound']:.2g} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--values", type=int, default=73_733, help="values in an update (default: MiniLM-L6 r8 q/v + head)")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)
    rows = [one_round(n, d, args.values) for n, d in ((10, 0), (10, 1), (10, 3), (100, 0), (100, 10), (100, 30))]
    body = table(rows) + (
        "\n\nThe masked input is as large as an fp32 update (4 bytes a value); what secure aggregation adds is "
        "the keys and shares, O(devices) bytes per device, and the pairwise masks, O(devices x values) compute "
        "per device and, for each device that dropped, O(survivors x values) at the aggregator. SecAgg+ "
        "(peers = a random subset of O(log n) devices) would make both O(log n); the core takes the peer sets "
        "as arguments. Unmasking is exact in the ring: the error is the quantization's."
    )
    command = command_line("bench/secagg_bench.py", argv if argv is not None else sys.argv[1:])
    print(DOC_SECTION.render(command, body))
    if args.write_docs:
        DOC_SECTION.write(command, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
