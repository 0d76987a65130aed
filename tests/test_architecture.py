"""The import directions of ARCHITECTURE.md, checked on the source (every import statement,
function-level ones included): the shared core imports nothing of fedlora's other packages, the
device never pulls in the aggregator, the exporter or a build-host library, and the aggregator's
image never needs the exporter."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# yaml and zstandard are optional on a device (a YAML config; the zstd codec stage), and so are
# cryptography and pycryptodome's Crypto (secure aggregation, core/secagg.py, the secagg extra):
# imported lazily.
CORE_ALLOWED = {"core", "numpy", "paho", "yaml", "zstandard", "cryptography", "Crypto"}
DEVICE_ALLOWED = CORE_ALLOWED | {"edge_client", "tokenizers", "onnxruntime"}
AGGREGATOR_FORBIDDEN = {
    "export",
    "simulator",
    "torch",
    "transformers",
    "peft",
    "onnx",
    "matplotlib",
    "ray",
    "bench",
    "tests",
}
EXPORT_FORBIDDEN = {"server", "simulator", "bench", "tests"}
SIMULATOR_FORBIDDEN = {"bench", "tests"}


def imports(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def stdlib(name: str) -> bool:
    import sys

    return name in sys.stdlib_module_names or name == "__future__"


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", sources("core"), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_shared_core_imports_only_itself_and_its_few_dependencies(path):
    foreign = {n for n in imports(path) if not stdlib(n)} - CORE_ALLOWED
    assert not foreign, (
        f"{path.relative_to(ROOT)} imports {sorted(foreign)}; the core may import only {sorted(CORE_ALLOWED)}"
    )


@pytest.mark.parametrize("path", sources("edge_client"), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_device_imports_only_its_own_dependencies(path):
    foreign = {n for n in imports(path) if not stdlib(n)} - DEVICE_ALLOWED
    assert not foreign, (
        f"{path.relative_to(ROOT)} imports {sorted(foreign)}; a device installs only {sorted(DEVICE_ALLOWED)}"
    )


@pytest.mark.parametrize("path", sources("server"), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_aggregator_needs_nothing_of_the_build_host(path):
    bad = imports(path) & AGGREGATOR_FORBIDDEN
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}; the aggregator image has only the [server] extra"


@pytest.mark.parametrize("path", sources("simulator"), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_simulator_uses_the_product_not_the_test_kit(path):
    bad = imports(path) & SIMULATOR_FORBIDDEN
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", sources("export"), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_exporter_does_not_import_the_aggregator(path):
    bad = imports(path) & EXPORT_FORBIDDEN
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_the_checker_sees_function_level_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    import torch.nn\n    from server.store import StateStore\n")
    assert imports(probe) == {"torch", "server"}


@pytest.mark.parametrize(
    "path",
    [p for package in ("core", "edge_client", "server", "simulator", "export") for p in sources(package)],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_no_product_package_imports_the_test_and_benchmark_kit(path):
    # devkit is installed nowhere (no distribution carries it): the product must run without it
    assert "devkit" not in imports(path), f"{path.relative_to(ROOT)} imports devkit, the kit of bench/ and tests/"


def test_the_device_installer_needs_only_the_standard_library():
    """install.sh runs ``edge_client.flashing.install`` from the client wheel before the venv
    exists, so it and every fedlora module it reaches (package ``__init__``s included) may import
    the standard library only."""

    def module_file(name: str) -> Path | None:
        base = ROOT.joinpath(*name.split("."))
        for path in (base.with_suffix(".py"), base / "__init__.py"):
            if path.is_file():
                return path
        return None

    def module_imports(path: Path) -> set[str]:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)  # submodules, if any
        return names

    seen, todo, foreign = set(), ["edge_client.flashing.install"], {}
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for module in (".".join(parts[:i]) for i in range(1, len(parts) + 1)):  # a.b.c runs a and a.b first
            if module in seen or module_file(module) is None:
                continue
            seen.add(module)
            path = module_file(module)
            for imported in module_imports(path):
                top = imported.split(".")[0]
                if module_file(top) is not None:
                    todo.append(imported)
                elif not stdlib(top):
                    foreign.setdefault(str(path.relative_to(ROOT)), set()).add(top)
    assert "core.bundle" in seen and "edge_client.flashing.layout" in seen  # the walk follows fedlora's imports
    assert not foreign, f"the device installer reaches {foreign}; it must run on the standard library alone"
