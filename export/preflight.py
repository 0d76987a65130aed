"""Everything about an export that can be checked without the weights, checked before they load.

Loading a model takes up to a minute and several GB (a GGUF file is de-quantized to float32);
a wrong option should not cost that. ``preflight`` reads only the output folder, config.json or
the GGUF metadata, and the tokenizer files, and returns the ``Plan`` the export follows: the
model type and its row in the architecture table, the task, the LoRA targets (matched against
the model's layers built on PyTorch's meta device, which holds no memory), the labels, the
tokenizer and the chat format. Each failure is a ConfigError (the options) or an ExportError
(the model's files) that names the architecture and what is missing.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from core.errors import ConfigError, FedloraError
from export.architectures import FAMILIES, PRESETS, UNSUPPORTED, Family, resolve_targets, supported_types
from export.chat_format import ChatFormat, ChatFormatError, derive_chat_format
from export.config import ExportConfig, check_labels

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

# transformers' model type of a GGUF ``general.architecture`` where the two differ
GGUF_MODEL_TYPES = {"gemma3": "gemma3_text", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}


class ExportError(FedloraError):
    """The export or its self-check failed."""


def log(message: str) -> None:
    import sys

    print(f"[export] {message}", file=sys.stderr, flush=True)


@dataclass
class ModelSource:
    """Where the model is: a folder, and the GGUF file in it when it is one.

    gguf: the GGUF metadata the manifest records (``file``, ``name``, ``architecture``).
    """

    folder: Path
    gguf_file: str | None = None
    gguf: dict = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.folder / self.gguf_file if self.gguf_file else self.folder

    @property
    def load_kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


@dataclass
class Plan:
    """What the export will do, decided before the weights load."""

    source: ModelSource
    config: PretrainedConfig  # set up for the task
    model_type: str
    family: Family | None
    task: str
    targets: tuple[str, ...]
    labels: tuple[str, ...]
    tokenizer: PreTrainedTokenizerBase
    model_id: str
    chat_format: ChatFormat | None = None
    chat_note: str = ""  # why there is no chat format, when there is none

    def summary(self) -> str:
        chat = "chat format from the template" if self.chat_format else (self.chat_note or "no chat template")
        labels = f", labels {','.join(self.labels)}" if self.labels else ""
        return (
            f"{self.model_id}: model type {self.model_type}, task {self.task}, LoRA targets "
            f"{','.join(self.targets)}{labels}; {chat}"
        )


def preflight(cfg: ExportConfig) -> Plan:
    """The checks, cheapest first; returns the plan or raises naming what is wrong."""
    check_output_dir(cfg.output_dir, cfg.ranks)
    source = find_source(cfg)
    declared = declared_model_type(source)
    check_family(declared, cfg.targets, source)
    config = load_config(source)
    model_type = config.model_type
    family = check_family(model_type, cfg.targets, source)
    task = resolve_task(config, cfg.task, family, model_type, source)
    labels = tuple(cfg.labels)
    check_task_labels(task, labels)
    config = config_for_task(config, task, labels)
    targets = resolve_targets(family, cfg.targets, getattr(config, "num_hidden_layers", None), model_type)
    check_targets(config, task, targets, model_type)
    tokenizer = load_tokenizer(source)
    check_vocabulary(tokenizer, config, model_type)
    plan = Plan(source, config, model_type, family, task, targets, labels, tokenizer, model_id(cfg, source))
    if task == "causal-lm":
        plan.chat_format, plan.chat_note = chat_format_of(tokenizer)
    return plan


def check_output_dir(output_dir: Path, ranks: tuple[int, ...]) -> None:
    """The output is a folder (or can be made one) that we may write, and no r<rank> in it is a file."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"the output {output_dir} is a file, not a folder")
    for rank in ranks:
        sub = output_dir / f"r{rank}"
        if sub.exists() and not sub.is_dir():
            raise ConfigError(f"the output {output_dir} holds a file r{rank} where the rank-{rank} bundle goes")
    existing = output_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"the output {output_dir} cannot be made: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"the output {output_dir} cannot be written: {existing} is not writable")


def find_source(cfg: ExportConfig) -> ModelSource:
    """The model folder and, for a GGUF model, its file and metadata."""
    folder = cfg.model_dir
    if cfg.gguf_file:
        if not (folder / cfg.gguf_file).is_file():
            raise ConfigError(f"gguf_file {cfg.gguf_file} not found in {folder}")
        gguf_file = cfg.gguf_file
    elif (folder / "config.json").is_file():
        return ModelSource(folder)
    else:
        found = sorted(p.name for p in folder.glob("*.gguf"))
        if not found:
            raise ConfigError(f"{folder} has no config.json and no .gguf file: not a Hugging Face model folder")
        if len(found) > 1:
            raise ConfigError(
                f"{folder} has several .gguf files, choose one with --gguf-file (or pass the file): {found}"
            )
        gguf_file = found[0]
    return ModelSource(folder, gguf_file, read_gguf_metadata(folder / gguf_file))


def read_gguf_metadata(path: Path) -> dict:
    """``general.architecture`` and ``general.name`` of a GGUF file (the header only)."""
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"{path.name} is a GGUF file; reading it needs the gguf package (pip install gguf)")
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # a truncated or foreign file: the reader's own words
        raise ExportError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from exc

    def text(key: str) -> str | None:
        found = reader.fields.get(key)
        if found is None:
            return None
        return bytes(found.parts[found.data[0]]).decode("utf-8", "replace")

    architecture = text("general.architecture")
    if not architecture:
        raise ExportError(f"{path}: the GGUF metadata has no general.architecture")
    return {"file": path.name, "name": text("general.name"), "architecture": architecture}


def declared_model_type(source: ModelSource) -> str:
    """The model type the files declare, read without transformers: config.json's ``model_type``,
    or the GGUF architecture as transformers names it."""
    if source.gguf_file:
        architecture = source.gguf["architecture"]
        return GGUF_MODEL_TYPES.get(architecture, architecture)
    try:
        data = json.loads((source.folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{source.folder}/config.json cannot be read ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{source.folder}/config.json is not a JSON object")
    model_type = data.get("model_type")
    return model_type if isinstance(model_type, str) else ""  # old configs: transformers infers it


def check_family(model_type: str, targets: tuple[str, ...], source: ModelSource) -> Family | None:
    """The model type's row of the table. A type without one is exported only with its LoRA
    targets named (the self-check then says whether it works); a known failure never."""
    if not model_type:
        return None
    where = f"GGUF architecture {source.gguf['architecture']!r}" if source.gguf_file else "config.json"
    if model_type in UNSUPPORTED:
        raise ConfigError(f"model type {model_type!r} ({where}) is not supported: {UNSUPPORTED[model_type]}")
    family = FAMILIES.get(model_type)
    if family is None and (not targets or any(t in PRESETS for t in targets)):
        raise ConfigError(
            f"model type {model_type!r} ({where}) is not in fedlora-export's architecture table (supported: "
            f"{supported_types()}): there are no default LoRA targets for it. Name its modules with --targets "
            f"to try it; the self-check says whether the export is right"
        )
    return family


def load_config(source: ModelSource):
    """The transformers config (for a GGUF file: built from its metadata; no tensor is read)."""
    import transformers

    if source.gguf_file:
        _quiet_transformers()
    try:
        return transformers.AutoConfig.from_pretrained(source.folder, **source.load_kwargs)
    except Exception as exc:  # unknown model types, GGUF architectures transformers cannot load, bad JSON
        what = (
            "transformers cannot load this GGUF architecture"
            if "not supported" in str(exc)
            else "cannot read the model config"
        )
        raise ConfigError(f"{source.path}: {what} (transformers {transformers.__version__}: {exc})") from exc


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def resolve_task(config, task: str, family: Family | None, model_type: str, source: ModelSource) -> str:
    """``task``, or for ``auto`` the one the architecture names (a GGUF file is a causal LM);
    checked against what the family and transformers can build."""
    if task == "auto":
        archs = " ".join(getattr(config, "architectures", None) or [])
        task = "causal-lm" if (source.gguf_file or "CausalLM" in archs or "LMHead" in archs) else "seq-cls"
    from transformers.models.auto import modeling_auto

    mapping = (
        modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        if task == "causal-lm"
        else modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
    )
    allowed = family.tasks if family is not None else ("causal-lm", "seq-cls")
    if task not in allowed or model_type not in mapping:
        possible = [
            t
            for t in allowed
            if model_type
            in (
                modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
                if t == "causal-lm"
                else modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
            )
        ]
        raise ConfigError(
            f"model type {model_type!r} is not exported for {task} (it is for: {', '.join(possible) or 'nothing'})"
        )
    return task


def check_task_labels(task: str, labels: tuple[str, ...]) -> None:
    if task == "seq-cls" and not labels:
        raise ConfigError(
            "seq-cls export needs the class labels (--labels a,b,c); for a language model give --task causal-lm"
        )
    check_labels(labels)


def config_for_task(config, task: str, labels: tuple[str, ...]):
    """A copy of the config with the classifier's labels (seq-cls)."""
    config = copy.deepcopy(config)
    if task == "seq-cls":
        config.num_labels = len(labels)
        config.id2label = dict(enumerate(labels))
        config.label2id = {name: i for i, name in enumerate(labels)}
    return config


def model_classes(task: str):
    import transformers

    return transformers.AutoModelForCausalLM if task == "causal-lm" else transformers.AutoModelForSequenceClassification


def check_targets(config, task: str, targets: tuple[str, ...], model_type: str) -> None:
    """Each target matches a linear layer of the model (as peft matches: the whole name or a
    suffix after a dot), on the model built on the meta device: names and shapes, no memory."""
    import torch
    from transformers.pytorch_utils import Conv1D

    try:
        with torch.device("meta"):
            model = model_classes(task).from_config(copy.deepcopy(config))
    except Exception as exc:  # a model whose construction needs real tensors: peft checks at the load instead
        log(f"the LoRA targets are checked after the load ({model_type} cannot be built without weights: {exc})")
        return
    linear = [name for name, module in model.named_modules() if isinstance(module, (torch.nn.Linear, Conv1D))]
    for target in targets:
        if not any(name == target or name.endswith("." + target) for name in linear):
            raise ConfigError(
                f"LoRA target {target!r} matches no linear layer of model type {model_type!r}; its linear "
                f"layers end in: {', '.join(layer_suffixes(linear))}"
            )


def layer_suffixes(names: list[str]) -> list[str]:
    """Linear layer names without their path up to the layer index: ``self_attn.q_proj``, ``lm_head``."""
    return list(dict.fromkeys(re.split(r"(?:^|\.)\d+\.", name)[-1] for name in names))


def load_tokenizer(source: ModelSource):
    """The model's tokenizer, which must have the fast (tokenizer.json) form the device reads;
    batches are padded, so a tokenizer without a pad token pads with EOS (or token 0)."""
    import transformers

    _quiet_transformers()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source.folder, **source.load_kwargs)
    except Exception as exc:
        raise ExportError(f"{source.path}: no usable tokenizer ({type(exc).__name__}: {exc})") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise ExportError(f"{source.path}: the tokenizer has no fast (tokenizer.json) form, which the device needs")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = (
            tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.convert_ids_to_tokens(0)
        )
    return tokenizer


def check_vocabulary(tokenizer, config, model_type: str) -> None:
    """Every id the tokenizer can produce has a row in the model's embedding."""
    rows = getattr(config, "vocab_size", None)
    top = max(tokenizer.get_vocab().values(), default=-1)
    if rows and top >= rows:
        raise ExportError(
            f"model type {model_type!r}: the tokenizer's ids reach {top} but the model's vocabulary has "
            f"{rows} rows; a device would feed ids the embedding does not have"
        )


def chat_format_of(tokenizer) -> tuple[ChatFormat | None, str]:
    """The chat format of the tokenizer's template, or None and why (logged)."""
    if not getattr(tokenizer, "chat_template", None):
        return None, "no chat template (devices use their own prompt format)"

    def render(messages: list[dict], add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    try:
        fmt = derive_chat_format(render)
    except ChatFormatError as exc:
        note = f"chat template left out of the manifest: {exc}"
        log(note)
        return None, note
    if fmt.system_in_user:
        log("the chat template refuses system messages: a system text goes before the first user message")
    return fmt, ""


def model_id(cfg: ExportConfig, source: ModelSource) -> str:
    """The name recorded in manifests: given; a GGUF file's stem; else the folder's (its parent's
    for a folder named 'model')."""
    if cfg.model_id:
        return cfg.model_id
    if source.gguf_file:
        return Path(source.gguf_file).stem
    return source.folder.parent.name if source.folder.name == "model" else source.folder.name
