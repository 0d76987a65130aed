"""``fedlora-export``: local HF model folder or GGUF file -> artifact bundles (one per rank)."""

from __future__ import annotations

import argparse
import sys

from core.errors import FedloraError


def _csv(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedlora-export", description=__doc__)
    parser.add_argument(
        "model_dir", nargs="?", metavar="MODEL", help="local Hugging Face model folder, or a .gguf file (no hub access)"
    )
    parser.add_argument("-o", "--output", help="output folder; bundles go to <output>/r<rank>")
    parser.add_argument(
        "--task",
        default="auto",
        choices=["auto", "seq-cls", "causal-lm"],
        help="default: from the architecture (a GGUF file is a causal LM)",
    )
    parser.add_argument(
        "--labels",
        type=_csv,
        default=(),
        help="class names for seq-cls, comma separated; for causal-lm the label words of a "
        "classification-as-instruction task (recorded in the manifest)",
    )
    parser.add_argument("--num-labels", type=int, help="instead of --labels: classes named 0..N-1")
    parser.add_argument(
        "--targets",
        type=_csv,
        default=(),
        help="LoRA targets: attention, mlp, all, default (attention query/value) or module names, "
        "comma separated (default: default; see --architectures)",
    )
    parser.add_argument("--ranks", type=_csv, default=("8",), help="rank ladder, e.g. 2,4,8,16")
    parser.add_argument("--alpha", type=float, help="LoRA alpha (default 2 x rank)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--opset", type=int, default=16)
    parser.add_argument("--gguf-file", help="the .gguf file in model_dir to load")
    parser.add_argument("--model-id", help="name recorded in the manifest (default: folder name)")
    parser.add_argument("--no-verify", action="store_true", help="skip the PyTorch-vs-ORT self-check")
    parser.add_argument(
        "--no-cpu-gradient-ops",
        action="store_true",
        help="keep ORT's single-threaded LayerNorm/GELU/Softmax gradient kernels instead of "
        "rewriting them into multi-threaded standard ops (for non-CPU execution providers)",
    )
    parser.add_argument("--no-measure", action="store_true", help="skip the per-rank memory and step-time probe")
    parser.add_argument(
        "--check",
        action="store_true",
        help="only the pre-load checks (architecture, task, targets, labels, tokenizer, chat "
        "template, output folder): print the plan, load no weights",
    )
    parser.add_argument(
        "--merge",
        metavar="ADAPTER",
        help="instead of exporting: fold this PEFT adapter folder (one a job wrote) into MODEL and write "
        "the merged transformers model folder to --output",
    )
    parser.add_argument(
        "--architectures", action="store_true", help="print the supported model types with their LoRA targets and exit"
    )
    args = parser.parse_args(argv)
    if args.architectures:
        from export.architectures import describe

        print(describe())
        return 0
    if not args.model_dir or not args.output:
        parser.error("MODEL and -o/--output are required")

    if args.merge:
        from export.merge import merge_adapter

        try:
            merge_adapter(args.model_dir, args.merge, args.output, gguf_file=args.gguf_file)
        except (FedloraError, ValueError) as exc:
            print(f"fedlora-export: error: {exc}", file=sys.stderr)
            return 2
        return 0

    from export.config import ExportConfig
    from export.exporter import export

    labels = args.labels or (tuple(str(i) for i in range(args.num_labels)) if args.num_labels else ())
    try:
        cfg = ExportConfig(
            model_dir=args.model_dir,
            output_dir=args.output,
            task=args.task,
            labels=labels,
            targets=args.targets,
            ranks=tuple(int(r) for r in args.ranks),
            alpha=args.alpha,
            max_length=args.max_length,
            opset=args.opset,
            gguf_file=args.gguf_file,
            model_id=args.model_id,
            verify=not args.no_verify,
            cpu_gradient_ops=not args.no_cpu_gradient_ops,
            measure=not args.no_measure,
        )
        if args.check:
            from export.preflight import preflight

            print(preflight(cfg).summary())
        else:
            export(cfg)
    except (FedloraError, ValueError) as exc:
        print(f"fedlora-export: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
