"""A merged model: the original model with a trained PEFT adapter folded into its weights.

``fedlora-export MODEL --merge ADAPTER -o OUT`` loads MODEL (a local folder or a GGUF file, as
the export does), puts the adapter folder that a job wrote (``server.peft_adapter``) on it with
PEFT, folds it in (``merge_and_unload``) and saves a plain transformers model folder: config,
``model.safetensors`` and the tokenizer, which serving stacks load without PEFT. A
classification model's head comes from the adapter (its ``modules_to_save``), and its class
names from the adapter's metadata.

This runs on the build host (torch, transformers, peft); the aggregator writes the adapter
folder without torch.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from core.errors import ConfigError
from export.config import ExportConfig
from export.preflight import log

ADAPTER_CONFIG = "adapter_config.json"  # PEFT's names for the adapter folder's two files
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LABELS_METADATA = "fedlora_labels"  # server.peft_adapter.LABELS_METADATA: the labels, as JSON
TASKS = {"CAUSAL_LM": "causal-lm", "SEQ_CLS": "seq-cls"}


def adapter_task_and_labels(adapter: Path) -> tuple[str, tuple[str, ...]]:
    """The export task and the labels of a PEFT adapter folder; a clear error when it is not one."""
    from safetensors import safe_open

    config_path, weights_path = adapter / ADAPTER_CONFIG, adapter / ADAPTER_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise ConfigError(f"{adapter} is not a PEFT adapter folder: it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{config_path} is not readable JSON: {exc}") from exc
    task_type = config.get("task_type") if isinstance(config, dict) else None
    task = TASKS.get(task_type) if isinstance(task_type, str) else None
    if task is None:
        raise ConfigError(f"{config_path}: task_type must be one of {sorted(TASKS)}")
    with safe_open(str(weights_path), framework="np") as f:
        metadata = f.metadata() or {}
    labels: tuple[str, ...] = ()
    if LABELS_METADATA in metadata:
        try:
            named = json.loads(metadata[LABELS_METADATA])
        except ValueError:
            named = None
        if not isinstance(named, list) or not all(isinstance(x, str) for x in named):
            raise ConfigError(f"{weights_path}: its {LABELS_METADATA} metadata is not a JSON list of class names")
        labels = tuple(named)
    if task == "seq-cls" and not labels:
        raise ConfigError(f"{weights_path} does not name its classes ({LABELS_METADATA} metadata)")
    return task, labels


def merge_adapter(model: str | Path, adapter: str | Path, output: str | Path, gguf_file: str | None = None) -> Path:
    """Write ``model`` + ``adapter`` merged into ``output`` (a transformers model folder)."""
    from peft import PeftModel

    from export.exporter import load_model

    adapter, output = Path(adapter), Path(output)
    task, labels = adapter_task_and_labels(adapter)
    if output.exists() and any(output.iterdir()):
        raise ConfigError(f"the output {output} exists and is not empty")
    with tempfile.TemporaryDirectory() as scratch:  # the export's checks want an output folder; nothing goes there
        cfg = ExportConfig(
            model_dir=Path(model),
            output_dir=Path(scratch),
            task=task,
            labels=labels,
            gguf_file=gguf_file,
            measure=False,
        )
        loaded = load_model(cfg)
    log(f"merging {adapter} into {loaded.plan.model_id if loaded.plan else model}")
    peft_model = PeftModel.from_pretrained(loaded.model, str(adapter))
    merged = peft_model.merge_and_unload()
    output.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(output), safe_serialization=True)
    loaded.tokenizer.save_pretrained(str(output))
    log(f"merged model written to {output}")
    return output
