"""The model families the exporter supports, and their LoRA targets.

One row per Hugging Face ``model_type``: the attention projections and the MLP projections
(module-name suffixes as peft matches them: a module ``...layers.0.self_attn.q_proj`` is a target
``q_proj``), the default targets (attention query and value, the LoRA paper's choice and peft's
default for these models) and the tasks. The names were read off transformers' modeling code
(5.24) and every row is exported by ``tests/test_export.py`` from a tiny random model with all
its targets, through the self-check. ``{layer}`` in a name stands for each layer index: BERT's
MLP output (``layer.3.output.dense``) has no suffix of its own besides the index, as
``output.dense`` also ends its attention output ``attention.output.dense``.

``--targets`` takes ``attention``, ``mlp``, ``all``, ``default`` or module names, comma
separated; ``resolve_targets`` turns them into the names peft gets.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.errors import ConfigError

PRESETS = ("default", "attention", "mlp", "all")
DECODER_TASKS = ("causal-lm", "seq-cls")
ENCODER_TASKS = ("seq-cls",)


@dataclass(frozen=True)
class Family:
    """One model type: its LoRA target names and the tasks it exports for.

    attention: the attention projections (query, key, value, output; fused ones as they are).
    mlp: the feed-forward projections.
    default: the targets when none are named.
    tasks: what it exports for (``causal-lm``, ``seq-cls``), where transformers has the class.
    """

    model_type: str
    attention: tuple[str, ...]
    mlp: tuple[str, ...]
    default: tuple[str, ...]
    tasks: tuple[str, ...] = DECODER_TASKS

    def preset(self, name: str) -> tuple[str, ...]:
        return {
            "default": self.default,
            "attention": self.attention,
            "mlp": self.mlp,
            "all": self.attention + self.mlp,
        }[name]


_LLAMA_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_GATED_MLP = ("gate_proj", "up_proj", "down_proj")
_QV = ("q_proj", "v_proj")


def _llama_like(model_type: str) -> Family:
    return Family(model_type, _LLAMA_ATTENTION, _GATED_MLP, _QV)


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        # Llama-architecture decoders (SmolLM2, TinyLlama, Llama 3.x) and those that kept its module names
        *(
            _llama_like(t)
            for t in (
                "llama",
                "mistral",
                "ministral",
                "qwen2",
                "qwen3",
                "gemma",
                "gemma2",
                "gemma3_text",
                "smollm3",
                "granite",
                "olmo2",
            )
        ),
        Family("phi", ("q_proj", "k_proj", "v_proj", "dense"), ("fc1", "fc2"), _QV),
        # Phi-3 fuses query, key and value into one projection, and gate and up into another
        Family("phi3", ("qkv_proj", "o_proj"), ("gate_up_proj", "down_proj"), ("qkv_proj",)),
        Family("starcoder2", _LLAMA_ATTENTION, ("c_fc", "c_proj"), _QV),
        # GPT-2's Conv1D layers: c_attn is query, key and value fused; c_proj is in both blocks
        Family("gpt2", ("c_attn", "attn.c_proj"), ("c_fc", "mlp.c_proj"), ("c_attn",)),
        Family(
            "gpt_neox", ("query_key_value", "attention.dense"), ("dense_h_to_4h", "dense_4h_to_h"), ("query_key_value",)
        ),
        Family(
            "bert",
            ("query", "key", "value", "attention.output.dense"),
            ("intermediate.dense", "layer.{layer}.output.dense"),
            ("query", "value"),
            ENCODER_TASKS,
        ),
        Family(
            "roberta",
            ("query", "key", "value", "attention.output.dense"),
            ("intermediate.dense", "layer.{layer}.output.dense"),
            ("query", "value"),
            ENCODER_TASKS,
        ),
        Family(
            "distilbert", ("q_lin", "k_lin", "v_lin", "out_lin"), ("lin1", "lin2"), ("q_lin", "v_lin"), ENCODER_TASKS
        ),
    )
}

# Model types that load and export but fail in ONNX Runtime's training step (transformers 5.24,
# onnxruntime-training 1.19.2, legacy exporter): said before the weights load.
UNSUPPORTED = {
    "cohere": "ONNX Runtime's training step fails on its exported attention (a broadcast in the rotary embedding)",
    "helium": "ONNX Runtime's training step fails on its exported attention (a reshape in the rotary embedding)",
    "gemma3": "the multimodal Gemma 3 (model type gemma3); its text-only checkpoints (gemma3_text) are supported",
}


def supported_types() -> str:
    return ", ".join(sorted(FAMILIES))


def resolve_targets(
    family: Family | None, requested: tuple[str, ...], num_layers: int | None, model_type: str
) -> tuple[str, ...]:
    """The module names peft gets: presets replaced by the family's names, ``{layer}`` expanded,
    duplicates dropped (first place kept). Raises ConfigError for a preset or a default that
    the model type has no table for."""
    names: list[str] = []
    for item in requested or ("default",):
        if item in PRESETS:
            if family is None:
                raise ConfigError(
                    f"model type {model_type!r} has no LoRA target table in fedlora-export (known: "
                    f"{supported_types()}), so --targets {item} means nothing for it: name its modules"
                )
            names += family.preset(item)
        else:
            names.append(item)
    expanded: list[str] = []
    for name in names:
        if "{layer}" in name:
            if not num_layers:
                raise ConfigError(f"{model_type}: target {name!r} needs the number of layers, which the config lacks")
            expanded += [name.format(layer=i) for i in range(num_layers)]
        else:
            expanded.append(name)
    return tuple(dict.fromkeys(expanded))


def describe() -> str:
    """The table as text, for ``fedlora-export --architectures``."""
    lines = []
    for f in sorted(FAMILIES.values(), key=lambda f: f.model_type):
        lines.append(
            f"{f.model_type:12s} tasks {','.join(f.tasks):17s} default {','.join(f.default)}\n"
            f"{'':12s} attention {','.join(f.attention)}\n{'':12s} mlp       {','.join(f.mlp)}"
        )
    return "\n".join(lines)
