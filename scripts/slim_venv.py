"""Take out of a virtual environment the distributions its program never imports, and every
dependency that only they needed (standard library only; run with the environment's python).

    /opt/fedlora/bin/python scripts/slim_venv.py sympy onnx ... pip

The Dockerfile runs it on the aggregator's environment: ``pip install ".[server]"`` brings what the
declared dependencies declare, some of it for uses the aggregator has not (ONNX Runtime's
artifact generation, tokenizers' Hub downloads, kubernetes' asyncio client). The named
distributions go, then, repeatedly, any distribution that only removed ones require; one that a
kept distribution still requires stays (a new dependency of the server extra keeps what it needs
without this list changing). pip itself may be named: it is removed last.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterable, Mapping
from importlib import metadata


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements_of(dist: metadata.Distribution) -> set[str]:
    """The distributions ``dist`` always requires (its extras' requirements left out)."""
    names = set()
    for req in dist.requires or []:
        spec, _, marker = req.partition(";")
        if "extra" in marker:
            continue
        match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec)
        if match:
            names.add(canonical(match.group(1)))
    return names


def to_remove(requires: Mapping[str, set[str]], roots: Iterable[str]) -> set[str]:
    """``roots`` (those installed) and every distribution required only by removed ones.

    ``requires`` maps each installed distribution to the ones it requires (canonical names)."""
    removed = {canonical(r) for r in roots} & set(requires)
    changed = True
    while changed:
        changed = False
        kept = set(requires) - removed
        needed_by_kept = set().union(*(requires[k] for k in kept)) if kept else set()
        for name in sorted(removed):
            for dep in requires[name]:
                if dep in requires and dep not in removed and dep not in needed_by_kept:
                    removed.add(dep)
                    changed = True
    return removed


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    installed = {canonical(d.metadata["Name"]): d for d in metadata.distributions()}
    requires = {name: requirements_of(d) for name, d in installed.items()}
    absent = sorted({canonical(r) for r in argv} - set(installed))
    if absent:
        print(f"slim_venv: not installed, nothing to remove: {' '.join(absent)}")
    removed = to_remove(requires, argv)
    last = [n for n in ("pip",) if n in removed]
    names = sorted(removed - set(last)) + last
    if names:
        print(f"slim_venv: removing {len(names)} distributions: {' '.join(names)}")
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", *names], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
