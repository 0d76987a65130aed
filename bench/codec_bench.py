"""Update codecs on a MiniLM-L6 rank-8 adapter: bytes on the wire, error, encode and decode time.

The update has the adapter's 26 tensors (LoRA A (8, 384) and B (384, 8) on query and value of
6 layers, and the new 5-class head (5, 384), (5,)) filled with a synthetic delta: Gaussian,
per-tensor scale 1e-3 to 1e-2, a quarter of each B factor near zero (as after few steps from a
zero init). Times are for one whole update through ``encode_envelope`` / ``decode_envelope``
(what the device and the aggregator call: codec, JSON header and sha256), median of ``--runs``.

    .venv/bin/python bench/codec_bench.py [--runs 15] [--codecs fp32,int8,...]

Prints a markdown table to stdout; writes nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import struct
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.codecs import CODECS
from core.protocol import HEADER_ZLIB, Envelope, decode_envelope, encode_envelope

DEFAULT = list(CODECS) + [
    "int4-b32",
    "int2",
    "topk0.05+int8+zlib",
    "topk0.01+int8+zlib",
    "int4+lzma",
    "topk0.1+int8+lzma",
    "topk0.1+sign",
]


def minilm_r8_update(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(6):
        for proj in ("query", "value"):
            prefix = f"encoder.layer.{layer}.attention.self.{proj}"
            tensors[f"{prefix}.lora_A"] = rng.normal(scale=rng.uniform(1e-3, 1e-2), size=(8, 384))
            b = rng.normal(scale=rng.uniform(1e-3, 1e-2), size=(384, 8))
            b[rng.random(384) < 0.25] *= 1e-3
            tensors[f"{prefix}.lora_B"] = b
    tensors["classifier.weight"] = rng.normal(scale=1e-2, size=(5, 384))
    tensors["classifier.bias"] = rng.normal(scale=1e-2, size=(5,))
    return {k: v.astype(np.float32) for k, v in tensors.items()}


def median_ms(fn, runs: int) -> float:
    fn()  # warm up (spec parsing, caches)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--codecs", default=",".join(DEFAULT), help="comma-separated codec specs")
    args = ap.parse_args(argv)

    update = minilm_r8_update()
    flat = np.concatenate([t.ravel() for t in update.values()])
    rows, fp32_bytes = [], None
    for spec in args.codecs.split(","):
        env = Envelope(kind="update", job="bench", round=1, sender="dev000", rank=8, codec=spec, tensors=update)
        payload = encode_envelope(env)
        back = decode_envelope(payload).tensors
        err = np.concatenate([back[k].ravel() for k in update]) - flat
        fp32_bytes = fp32_bytes or (len(payload) if spec == "fp32" else None)
        body = (
            len(payload) - 8 - (struct.unpack_from("<I", payload, 4)[0] & ~HEADER_ZLIB)
        )  # minus magic, length, header
        rows.append(
            (
                spec,
                len(payload),
                body,
                float(np.abs(err).max()),
                float(np.linalg.norm(err) / np.linalg.norm(flat)),
                median_ms(lambda e=env: encode_envelope(e), args.runs),
                median_ms(lambda p=payload: decode_envelope(p), args.runs),
            )
        )

    print(
        f"MiniLM-L6 r=8 update: {len(update)} tensors, {flat.size} parameters, {4 * flat.size} bytes as fp32; "
        f"median of {args.runs} runs; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, numpy {np.__version__}\n"
    )
    print(
        "| codec | envelope bytes | of which tensors | ratio vs fp32 | max abs error | relative L2 error | encode ms | decode ms |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for spec, size, body, max_err, rel, enc, dec in rows:
        ratio = f"{fp32_bytes / size:.1f}x" if fp32_bytes else "n/a"
        print(f"| `{spec}` | {size:,} | {body:,} | {ratio} | {max_err:.2e} | {rel:.2e} | {enc:.2f} | {dec:.2f} |")


if __name__ == "__main__":
    main()
