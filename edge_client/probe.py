"""Measure one bundle's training step on this machine: peak memory and step time.

Run as a fresh process (``python -m edge_client.probe BUNDLE``) so the numbers are the
device's own: the exporter records them per rank in the manifest, and a device compares
them with its memory budget to pick a rank.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np


def measure(bundle_dir: str, batch: int, seq: int, steps: int, threads: int) -> dict:
    from core.bundle import Bundle
    from edge_client.data import Batch
    from edge_client.device import peak_rss_bytes
    from edge_client.runtime import RuntimeOptions, Trainer

    bundle = Bundle(bundle_dir, verify=False)
    m = bundle.manifest
    seq = min(seq, m.max_length)
    trainer = Trainer(bundle, options=RuntimeOptions(intra_op_threads=threads))
    loaded_rss = peak_rss_bytes()
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(bundle.path(m.tokenizer))).get_vocab_size()
    rng = np.random.default_rng(0)
    ids = rng.integers(min(5, vocab - 1), vocab, size=(batch, seq)).astype(np.int64)
    if m.task == "causal-lm":
        labels = np.concatenate([ids[:, 1:], np.full((batch, 1), -100)], axis=1).astype(np.int64)
    else:
        labels = rng.integers(0, max(1, len(m.labels)), size=(batch,)).astype(np.int64)
    b = Batch(ids, np.ones_like(ids), labels)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.train_step(b)
        times.append(time.perf_counter() - t0)
    return {
        "rank": m.rank,
        "batch": batch,
        "seq": seq,
        "threads": threads,
        "steps": steps,
        "peak_rss_bytes": peak_rss_bytes(),
        "loaded_rss_bytes": loaded_rss,
        "step_time_s": statistics.median(times),
        "torch_loaded": "torch" in sys.modules,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge_client.probe", description=__doc__)
    parser.add_argument("bundle")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.bundle, args.batch, args.seq, args.steps, args.threads)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
