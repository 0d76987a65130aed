"""Turn a local Hugging Face model (a folder or a GGUF file) into fedlora artifact bundles, one per LoRA rank.

First the pre-load checks (``export.preflight``: architecture, task, targets, labels, tokenizer,
chat format, output folder), then the load, then per rank: wrap the model with peft LoRA -> ``torch.onnx.export`` (legacy exporter,
training mode, no constant folding: see the traps in the design notes) -> rename parameters
to peft's adapter keys -> ``generate_artifacts`` (only LoRA and head trainable) -> CPU
gradient kernels swapped for multi-threaded ops (``rewrite_cpu_gradients``) -> manifest
with hashes -> self-check (one training step in PyTorch and in ORT must give the same loss).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from core.bundle import MANIFEST_NAME, Bundle, Manifest, ParamSpec, sha256_file
from core.errors import ConfigError
from export.chat_format import end_of_turn_id
from export.config import ExportConfig
from export.preflight import ExportError, Plan, log, preflight

if TYPE_CHECKING:
    import onnx
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

IGNORE_INDEX = -100
# The causal LM graph's second output: the labels of the rows of its logits (the labeled positions).
LABELED_TARGETS = "labeled_targets"
# Bumped whenever the exported graphs or the manifest's fields change, so caches of exported bundles are rebuilt.
EXPORT_RECIPE = 6  # 6: FedProx's proximal term in the loss (export.proximal)
# What export() keeps of the tokenizer folder transformers writes (the device reads tokenizer.json).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


@contextmanager
def stage(name: str, timings: dict[str, float]):
    log(f"{name} ...")
    start = time.perf_counter()
    yield
    elapsed = time.perf_counter() - start
    timings[name] = round(elapsed, 3)
    log(f"{name} done in {elapsed:.1f}s")


class _Captured:
    def __init__(self, file):
        self.file = file

    def text(self) -> str:
        self.file.seek(0)
        return self.file.read().decode("utf-8", "replace")


@contextmanager
def native_stderr_captured():
    """Hold back what native code (ORT's graph builder logs at info level) writes to fd 2.

    Shown only when the step fails, so a good export prints our progress lines alone.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield _Captured(tmp)
        finally:
            os.dup2(saved, 2)
            os.close(saved)


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    task: str
    model_type: str
    labels: tuple[str, ...]
    plan: Plan | None = None


def _quiet_gguf_progress() -> None:
    """transformers de-quantizes GGUF tensors under a plain tqdm bar, which its
    ``disable_progress_bar`` does not reach; our progress lines say what happens."""
    import functools

    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        return
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None and not isinstance(bar, functools.partial):
        gguf_utils.tqdm = functools.partial(bar, disable=True)


def load_model(cfg: ExportConfig, plan: Plan | None = None) -> LoadedModel:
    """Load the model the plan describes (``preflight(cfg)`` when none is given), with every
    dropout set to 0 and activations in the form ORT's gradient builder takes.

    Dropout is off so the exported graph is deterministic: the self-check compares PyTorch
    and ORT losses exactly, and LoRA on small adapters trains well without it.
    """
    if plan is None:
        plan = preflight(cfg)
    if plan.source.gguf_file:
        _quiet_gguf_progress()
    config = plan.config
    _zero_dropout_settings(config)
    model = _load_weights(cfg, plan, config)
    _zero_dropout_modules(model)
    _exportable_activations(model)
    return LoadedModel(model, plan.tokenizer, plan.task, plan.model_type, plan.labels, plan)


def _zero_dropout_settings(config) -> None:
    for key in (
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "attention_dropout",
        "classifier_dropout",
        "resid_pdrop",
        "embd_pdrop",
        "attn_pdrop",
        "dropout",
    ):
        if hasattr(config, key):
            setattr(config, key, 0.0)


def _zero_dropout_modules(model) -> None:
    """Dropout modules the config keys did not reach."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def _load_weights(cfg: ExportConfig, plan: Plan, config) -> PreTrainedModel:
    """The float32 model for the plan's task; a classifier gets a fresh head for its labels (seeded)."""
    import torch

    from export.preflight import model_classes

    common = dict(config=config, attn_implementation="eager", torch_dtype=torch.float32, **plan.source.load_kwargs)
    if plan.task == "seq-cls":
        if getattr(config, "pad_token_id", None) is None:  # decoders find each row's last token by it
            config.pad_token_id = plan.tokenizer.pad_token_id
        torch.manual_seed(cfg.seed)
    return model_classes(plan.task).from_pretrained(plan.source.folder, **common)


def _exportable_activations(model) -> None:
    """The tanh GELU (Gemma, StarCoder2) as its formula in standard ops: torch's fused
    ``gelu(approximate="tanh")`` exports to a pattern that ORT's training graph transformers
    break on ("Argument mismatch when removing edge"); the formula is the same approximation."""
    try:
        from transformers.activations import GELUTanh
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, GELUTanh):
            module.act = module._gelu_tanh_python


def _head_names(model) -> tuple[str, ...]:
    """Modules that are new for the task and must train (the classifier of a seq-cls model)."""
    names = [n for n in ("classifier", "score") if hasattr(model, n)]
    return tuple(names)


def peft_key(torch_name: str) -> str:
    """Graph name of a parameter: peft's adapter key (``base_model.model.<path>``, no adapter name)."""
    name = torch_name[len("model.") :] if torch_name.startswith("model.") else torch_name
    return name.replace(".default.", ".").replace(".modules_to_save.", ".")


def role_of(name: str) -> str:
    if ".lora_A." in name:
        return "lora_A"
    if ".lora_B." in name:
        return "lora_B"
    return "head"


def build_peft(loaded: LoadedModel, cfg: ExportConfig, rank: int):
    """A fresh LoRA model of this rank (same seed for every rank) wrapped for export."""
    import copy
    import warnings

    import peft
    import torch

    targets = loaded.plan.targets if loaded.plan is not None else tuple(cfg.targets)
    torch.manual_seed(cfg.seed + rank)
    base = copy.deepcopy(loaded.model)
    lora = peft.LoraConfig(
        r=rank,
        # peft annotates lora_alpha as int but only divides by it (scaling = lora_alpha / r); alpha may be fractional
        lora_alpha=cfg.alpha_for(rank),  # type: ignore[arg-type]
        target_modules=list(targets),
        lora_dropout=0.0,
        modules_to_save=list(_head_names(base)) + list(cfg.extra_trainable) or None,
    )
    try:
        with warnings.catch_warnings():  # peft reads a property transformers has deprecated
            warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
            model = peft.get_peft_model(base, lora)
    except ValueError as exc:
        raise ConfigError(f"LoRA targets {list(targets)} do not match modules of this model: {exc}") from exc

    from export.wrappers import CausalLMWrapper, ClassifierWrapper

    wrapper = CausalLMWrapper(model, IGNORE_INDEX) if loaded.task == "causal-lm" else ClassifierWrapper(model)
    wrapper.train()
    return wrapper, targets


def _rename_initializers(model_proto, mapping: dict[str, str]) -> None:
    graph = model_proto.graph
    for init in graph.initializer:
        if init.name in mapping:
            init.name = mapping[init.name]
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in mapping:
                node.input[i] = mapping[name]
    for value in list(graph.input) + list(graph.value_info):
        if value.name in mapping:
            value.name = mapping[value.name]


def export_onnx(wrapper, cfg: ExportConfig, path: Path) -> tuple[list[str], list[str]]:
    """Legacy TorchScript export in training mode; returns (trainable, frozen) graph names."""
    import warnings

    import onnx
    import torch

    from export.wrappers import CausalLMWrapper

    causal = isinstance(wrapper, CausalLMWrapper)
    ids = torch.ones((2, 16), dtype=torch.int64)
    mask = torch.ones((2, 16), dtype=torch.int64)
    inputs: tuple = (ids, mask)
    input_names = ["input_ids", "attention_mask"]
    output_names = ["logits"]
    dynamic_axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
    if causal:  # labels in, the labeled positions' logits and labels out (CausalLMWrapper)
        labels = torch.full((2 * 16,), IGNORE_INDEX, dtype=torch.int64)
        labels[10:14] = 1
        inputs += (labels,)
        input_names.append("labels")
        output_names.append(LABELED_TARGETS)
        dynamic_axes.update({"labels": {0: "rows"}, "logits": {0: "labeled"}, LABELED_TARGETS: {0: "labeled"}})
    else:
        dynamic_axes["logits"] = {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(
            wrapper,
            inputs,
            str(path),
            dynamo=False,
            opset_version=cfg.opset,
            do_constant_folding=False,
            training=torch.onnx.TrainingMode.TRAINING,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
        )
    proto = onnx.load(str(path))
    params = dict(wrapper.named_parameters())
    mapping = {name: peft_key(name) for name in params}
    in_graph = {init.name for init in proto.graph.initializer}
    missing = [n for n, p in params.items() if p.requires_grad and n not in in_graph]
    if missing:
        raise ExportError(f"trainable parameters were folded away by the exporter: {missing[:3]}")
    _rename_initializers(proto, mapping)
    onnx.save(proto, str(path))
    trainable = [mapping[n] for n, p in params.items() if p.requires_grad]
    frozen = [mapping[n] for n, p in params.items() if not p.requires_grad and n in in_graph]
    return trainable, frozen


def generate(onnx_path: Path, trainable: list[str], frozen: list[str], task: str, out: Path) -> None:
    import onnx
    from onnxruntime.training import artifacts, onnxblock

    from export.proximal import add_proximal_parameters, proximal_loss

    model = onnx.load(str(onnx_path))
    # Causal LM: the loss block gets (logits, LABELED_TARGETS), both outputs of the model, and uses
    # the existing LABELED_TARGETS rather than adding a labels input; "labels" is already an input.
    loss = (
        onnxblock.loss.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
        if task == "causal-lm"
        else artifacts.LossType.CrossEntropyLoss
    )
    frozen = frozen + add_proximal_parameters(model, trainable)  # FedProx's mu and centres
    loss = proximal_loss(loss, trainable)
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as scratch, native_stderr_captured() as captured:
        os.chdir(scratch)  # generate_artifacts may write temp.onnx into the working directory
        try:
            artifacts.generate_artifacts(
                model,
                requires_grad=trainable,
                frozen_params=frozen,
                loss=loss,
                optimizer=artifacts.OptimType.AdamW,
                artifact_directory=str(out),
                additional_output_names=["logits"],
            )
        except Exception as exc:
            raise ExportError(f"generate_artifacts failed: {exc}\n{captured.text()[-4000:]}") from exc
        finally:
            os.chdir(cwd)


def _cpu_gradient_math(node, read: set[str], constants: dict[str, float]) -> list[tuple] | None:
    """The standard ops that compute ``node``'s used outputs, as (op, inputs, output, attributes);
    float32 scalars they need beyond the shared ones go into ``constants``."""
    if node.domain != "com.microsoft" or any(a.name == "axis" and a.i != -1 for a in node.attribute):
        return None

    def t(name: str) -> str:
        return f"{node.name or node.op_type}/cpu/{name}"

    if node.op_type == "LayerNormalizationGrad" and not read & set(node.output[1:]):
        # dX = inv_std * (g - mean(g) - xhat * mean(g * xhat)), g = dY * scale, xhat = (X - mean) * inv_std
        dy, x, scale, mean, inv_std = node.input[:5]
        return [
            ("Sub", [x, mean], t("xc"), {}),
            ("Mul", [t("xc"), inv_std], t("xhat"), {}),
            ("Mul", [dy, scale], t("g"), {}),
            ("ReduceMean", [t("g")], t("g_mean"), {"axes": [-1]}),
            ("Mul", [t("g"), t("xhat")], t("gx"), {}),
            ("ReduceMean", [t("gx")], t("gx_mean"), {"axes": [-1]}),
            ("Mul", [t("xhat"), t("gx_mean")], t("c"), {}),
            ("Sub", [t("g"), t("g_mean")], t("d"), {}),
            ("Sub", [t("d"), t("c")], t("e"), {}),
            ("Mul", [t("e"), inv_std], node.output[0], {}),
        ]
    if node.op_type == "SimplifiedLayerNormalizationGrad" and not read & set(node.output[1:]):
        # RMSNorm: dX = inv_std * (g - xhat * mean(g * xhat)), g = dY * scale, xhat = X * inv_std
        dy, x, scale, inv_std = node.input[:4]
        return [
            ("Mul", [x, inv_std], t("xhat"), {}),
            ("Mul", [dy, scale], t("g"), {}),
            ("Mul", [t("g"), t("xhat")], t("gx"), {}),
            ("ReduceMean", [t("gx")], t("gx_mean"), {"axes": [-1]}),
            ("Mul", [t("xhat"), t("gx_mean")], t("c"), {}),
            ("Sub", [t("g"), t("c")], t("e"), {}),
            ("Mul", [t("e"), inv_std], node.output[0], {}),
        ]
    if node.op_type == "QuickGeluGrad":
        # y = x * sigmoid(a x) (SiLU for a = 1): dX = dY * s * (1 + a x (1 - s)), s = sigmoid(a x)
        dy, x = node.input[:2]
        alpha = next((a.f for a in node.attribute if a.name == "alpha"), 1.702)
        name = f"fedlora.alpha_{np.float32(alpha)!r}"
        constants[name] = float(alpha)
        return [
            ("Mul", [x, name], t("ax"), {}),
            ("Sigmoid", [t("ax")], t("s"), {}),
            ("Sub", ["fedlora.one", t("s")], t("1-s"), {}),
            ("Mul", [t("ax"), t("1-s")], t("ax(1-s)"), {}),
            ("Add", [t("ax(1-s)"), "fedlora.one"], t("u"), {}),
            ("Mul", [t("s"), t("u")], t("slope"), {}),
            ("Mul", [dy, t("slope")], node.output[0], {}),
        ]
    if node.op_type == "GeluGrad":
        # dX = dY * (Phi(x) + x * phi(x)), Phi(x) = (1 + erf(x / sqrt 2)) / 2, phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
        dy, x = node.input[:2]
        return [
            ("Mul", [x, "fedlora.sqrt1_2"], t("xs"), {}),
            ("Erf", [t("xs")], t("erf"), {}),
            ("Add", [t("erf"), "fedlora.one"], t("erf1"), {}),
            ("Mul", [t("erf1"), "fedlora.half"], t("cdf"), {}),
            ("Mul", [x, x], t("x2"), {}),
            ("Mul", [t("x2"), "fedlora.minus_half"], t("x2h"), {}),
            ("Exp", [t("x2h")], t("ex"), {}),
            ("Mul", [t("ex"), "fedlora.inv_sqrt_2pi"], t("pdf"), {}),
            ("Mul", [x, t("pdf")], t("xpdf"), {}),
            ("Add", [t("cdf"), t("xpdf")], t("slope"), {}),
            ("Mul", [dy, t("slope")], node.output[0], {}),
        ]
    if node.op_type == "SoftmaxGrad_13":
        # dX = Y * (dY - sum(dY * Y))
        dy, y = node.input[:2]
        return [
            ("Mul", [dy, y], t("dyy"), {}),
            ("ReduceSum", [t("dyy"), "fedlora.last_axis"], t("s"), {}),
            ("Sub", [dy, t("s")], t("d"), {}),
            ("Mul", [y, t("d")], node.output[0], {}),
        ]
    return None


def rewrite_cpu_gradients(training_model: Path) -> dict[str, int]:
    """Swap ORT's single-threaded CPU gradient kernels for the same math in standard ONNX ops.

    ORT's CPU LayerNormalizationGrad, SimplifiedLayerNormalizationGrad (RMSNorm), GeluGrad,
    QuickGeluGrad (SiLU) and SoftmaxGrad_13 are Eigen loops on one thread, and the norms' kernels
    also compute the scale (and bias) gradients that frozen norms throw away. On a 2-core device they took a fifth of a MiniLM training step; Sub, Mul,
    ReduceMean, Erf and Exp run on the intra-op pool (docs/benchmarks.md). The constants are
    float32, as load_model's models are. Returns how many nodes of each type were replaced; the
    self-check then compares the trained losses with PyTorch.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(training_model), load_external_data=False)
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if not 13 <= opset < 18:  # ReduceMean takes axes as an attribute, ReduceSum as an input
        return {}
    read = {name for node in graph.node for name in node.input} | {out.name for out in graph.output}
    nodes: list[onnx.NodeProto] = []
    counts: dict[str, int] = {}
    constants = {
        "fedlora.half": 0.5,
        "fedlora.one": 1.0,
        "fedlora.minus_half": -0.5,
        "fedlora.sqrt1_2": 0.5**0.5,
        "fedlora.inv_sqrt_2pi": (2 * np.pi) ** -0.5,
    }
    for node in graph.node:
        math = _cpu_gradient_math(node, read, constants)
        if math is None:
            nodes.append(node)
            continue
        nodes += [
            helper.make_node(kind, inputs, [output], name=f"{output}/{kind}", **attrs)
            for kind, inputs, output, attrs in math
        ]
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    if counts:
        graph.initializer.extend(numpy_helper.from_array(np.array(v, np.float32), k) for k, v in constants.items())
        graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), "fedlora.last_axis"))
        del graph.node[:]
        graph.node.extend(nodes)
        onnx.save(model, str(training_model))
    return counts


def verification_batch(loaded: LoadedModel, cfg: ExportConfig, vocab_size: int):
    """Deterministic batch with padding in one row, so masking is exercised too."""
    rng = np.random.default_rng(cfg.seed)
    seq = min(cfg.max_length, 24)
    ids = rng.integers(5, min(vocab_size, 1000), size=(2, seq), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, seq * 2 // 3 :] = 0
    ids[1, seq * 2 // 3 :] = loaded.tokenizer.pad_token_id
    if loaded.task == "causal-lm":
        labels = np.full_like(ids, IGNORE_INDEX)
        labels[:, :-1] = np.where(mask[:, 1:] == 1, ids[:, 1:], IGNORE_INDEX)
    else:
        labels = rng.integers(0, len(loaded.labels), size=(2,), dtype=np.int64)
    return ids, mask, labels


def torch_two_losses(wrapper, batch, lr: float) -> tuple[float, float]:
    """Loss, one AdamW step in ORT's variant (HF AdamW: eps 1e-6 added after bias correction), loss."""
    import torch

    from export.wrappers import CausalLMWrapper

    ids, mask, labels = (torch.from_numpy(x) for x in batch)
    if isinstance(wrapper, CausalLMWrapper):

        def loss_fn():
            logits, targets = wrapper(ids, mask, labels)
            return torch.nn.functional.cross_entropy(logits, targets)

        with torch.no_grad():  # the labeled rows alone must give the loss of the whole model's logits
            full = wrapper.model(input_ids=ids, attention_mask=mask).logits
            whole = torch.nn.functional.cross_entropy(
                full.reshape(-1, full.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX
            )
            if abs(float(loss_fn()) - float(whole)) > 1e-5 * max(abs(float(whole)), 1e-12):
                raise ExportError(
                    f"the loss over the labeled positions ({float(loss_fn()):.6f}) differs from the loss over "
                    f"the model's full logits ({float(whole):.6f}): this model's forward reshapes the logits"
                )
    else:

        def loss_fn():
            return torch.nn.functional.cross_entropy(wrapper(ids, mask), labels)

    trainable = [p for p in wrapper.parameters() if p.requires_grad]
    loss1 = loss_fn()
    loss1.backward()
    beta1, beta2, eps = 0.9, 0.999, 1e-6
    with torch.no_grad():
        for p in trainable:
            g = p.grad
            m = (1 - beta1) * g
            v = (1 - beta2) * g * g
            step_size = lr * (1 - beta2) ** 0.5 / (1 - beta1)
            p.sub_(step_size * m / (v.sqrt() + eps))
        loss2 = loss_fn()
    return float(loss1.detach()), float(loss2)


def ort_two_losses(bundle_dir: Path, batch, lr: float) -> tuple[float, float]:
    from edge_client.data import Batch
    from edge_client.runtime import Trainer

    trainer = Trainer(Bundle(bundle_dir))
    trainer.set_learning_rate(lr)
    b = Batch(*batch)
    loss1 = trainer.train_step(b)
    loss2, _ = trainer.eval_batch(b)
    return loss1, loss2


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import peft
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def token_fields(loaded: LoadedModel, tokenizer_json: Path) -> dict:
    """The manifest's token facts, for devices that format and tokenize conversations themselves.

    vocab_size: rows of the model's embedding (and columns of a causal LM's logits).
    bos_token_id, eos_token_id: the tokenizer's; for a chat model eos is the end-of-turn token
        that closes the response (``<|im_end|>``, ``<end_of_turn>``, ``<|eot_id|>``).
    add_bos_token: whether the bundle's tokenizer.json (what the device's tokenizers library
        loads) adds BOS itself when encoding with special tokens.
    chat_format: the template's literal parts and slots (``export.chat_format``), when it has one.
    """
    from tokenizers import Tokenizer

    tokenizer = loaded.tokenizer
    bos = tokenizer.bos_token_id
    device_tokenizer = Tokenizer.from_file(str(tokenizer_json))
    with_special = device_tokenizer.encode("hello", add_special_tokens=True).ids
    plain = device_tokenizer.encode("hello", add_special_tokens=False).ids
    fields = {
        "vocab_size": int(loaded.model.config.vocab_size),
        "bos_token_id": bos,
        "eos_token_id": tokenizer.eos_token_id,
        "add_bos_token": bos is not None and with_special[:1] == [bos] and plain[:1] != [bos],
    }
    plan = loaded.plan
    if plan is not None and plan.chat_format is not None:
        fields["chat_format"] = plan.chat_format.to_json()
        fields["eos_token_id"] = end_of_turn_id(tokenizer, plan.chat_format)
    if plan is not None and plan.source.gguf:
        fields["gguf"] = dict(plan.source.gguf)
    return fields


def model_id(cfg: ExportConfig) -> str:
    """The name recorded in manifests (``export.preflight.model_id``)."""
    from export.preflight import find_source
    from export.preflight import model_id as source_model_id

    return source_model_id(cfg, find_source(cfg))


def export_rank(loaded: LoadedModel, cfg: ExportConfig, rank: int, tokenizer_dir: Path) -> Path:
    """One rank's bundle in ``output_dir/r<rank>``: training artifacts, tokenizer and manifest, then
    the self-check and the step measurement recorded in the manifest; re-read and verified."""
    timings: dict[str, float] = {}
    out = _empty_dir(cfg.output_dir / f"r{rank}")
    wrapper, targets = build_peft(loaded, cfg, rank)
    trainable, frozen = build_artifacts(wrapper, cfg, loaded.task, rank, out, timings)
    rewrites = {}
    if cfg.cpu_gradient_ops:
        rewrites = rewrite_cpu_gradients(out / "training_model.onnx")
        log(f"r={rank}: gradient kernels rewritten for multi-core CPUs: {rewrites}")
    shutil.copytree(tokenizer_dir, out / "tokenizer")
    extra = {
        "model_type": loaded.model_type,
        **token_fields(loaded, out / "tokenizer" / "tokenizer.json"),
        "versions": _versions(),
        "export_seconds": timings,
        "frozen_params": len(frozen),
        "gradient_rewrites": rewrites,
    }
    write_manifest(
        out, rank_manifest(loaded, cfg, rank, out, targets, param_specs(wrapper, trainable), extra).to_json()
    )
    if cfg.verify:
        check = self_check(loaded, cfg, rank, wrapper, out, timings)
        update_manifest(out, self_check=check, export_seconds=timings)
    if cfg.measure:
        memory = measure_rank(cfg, rank, out, timings)
        update_manifest(out, memory=memory, export_seconds=timings)
    Bundle(out)  # re-read and verify what we wrote
    return out


def _empty_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def build_artifacts(
    wrapper, cfg: ExportConfig, task: str, rank: int, out: Path, timings: dict[str, float]
) -> tuple[list[str], list[str]]:
    """The LoRA model exported to ONNX (in a scratch folder), then ORT's training, eval and
    optimizer models and checkpoint in ``out``; returns the (trainable, frozen) graph names."""
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        with stage(f"r={rank}: torch.onnx.export", timings):
            trainable, frozen = export_onnx(wrapper, cfg, onnx_path)
        with stage(f"r={rank}: generate_artifacts", timings):
            generate(onnx_path, trainable, frozen, task, out)
    return trainable, frozen


def param_specs(wrapper, trainable: list[str]) -> tuple[ParamSpec, ...]:
    """Name, shape and role of each trainable parameter, in graph order."""
    params = dict((peft_key(n), p) for n, p in wrapper.named_parameters())
    return tuple(ParamSpec(name, tuple(params[name].shape), role_of(name)) for name in trainable)


def rank_manifest(
    loaded: LoadedModel,
    cfg: ExportConfig,
    rank: int,
    out: Path,
    targets: tuple[str, ...],
    specs: tuple[ParamSpec, ...],
    extra: dict,
) -> Manifest:
    """The manifest of the bundle in ``out``, with the sha256 of every file already there."""
    files = {p.relative_to(out).as_posix(): sha256_file(p) for p in sorted(out.rglob("*")) if p.is_file()}
    return Manifest(
        model_id=loaded.plan.model_id if loaded.plan is not None else model_id(cfg),
        task=loaded.task,
        rank=rank,
        alpha=cfg.alpha_for(rank),
        targets=tuple(targets),
        max_length=cfg.max_length,
        pad_token_id=int(loaded.tokenizer.pad_token_id),
        trainable=specs,
        input_names=("input_ids", "attention_mask"),
        files=files,
        labels=loaded.labels,
        tokenizer="tokenizer/tokenizer.json",
        extra=extra,
    )


def write_manifest(out: Path, data: dict) -> None:
    (out / MANIFEST_NAME).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def update_manifest(out: Path, **fields) -> None:
    """Set top-level manifest fields (the self-check, the measurement) after the first write."""
    data = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
    data.update(fields)
    write_manifest(out, data)


def self_check(
    loaded: LoadedModel, cfg: ExportConfig, rank: int, wrapper, bundle_dir: Path, timings: dict[str, float]
) -> dict:
    """One training step in ORT and in PyTorch on the same batch: the losses before and after it
    must agree within ``verify_tolerance`` (else ExportError). Returns the record for the manifest."""
    with stage(f"r={rank}: self-check (one step in PyTorch and ORT)", timings):
        batch = verification_batch(loaded, cfg, loaded.model.config.vocab_size)
        ort1, ort2 = ort_two_losses(bundle_dir, batch, cfg.verify_lr)
        pt1, pt2 = torch_two_losses(wrapper, batch, cfg.verify_lr)
        rel_diff = [abs(ort1 - pt1) / max(abs(pt1), 1e-12), abs(ort2 - pt2) / max(abs(pt2), 1e-12)]
        check = {
            "torch_loss": [pt1, pt2],
            "ort_loss": [ort1, ort2],
            "rel_diff": rel_diff,
            "tolerance": cfg.verify_tolerance,
        }
        log(f"r={rank}: loss before step torch {pt1:.6f} ort {ort1:.6f}; after step torch {pt2:.6f} ort {ort2:.6f}")
        if max(rel_diff) > cfg.verify_tolerance:
            raise ExportError(
                f"self-check failed for rank {rank}: ORT and PyTorch losses differ by "
                f"{max(rel_diff):.2e} relative (> {cfg.verify_tolerance:g}): {check}"
            )
    return check


def measure_rank(cfg: ExportConfig, rank: int, bundle_dir: Path, timings: dict[str, float]) -> dict:
    """Peak memory and step time of the bundle at ``measure_batch`` x ``max_length``, logged."""
    with stage(f"r={rank}: measure one training step (batch {cfg.measure_batch} x {cfg.max_length})", timings):
        memory = measure_step(bundle_dir, cfg.measure_batch, cfg.max_length)
    log(f"r={rank}: peak RSS {memory['peak_rss_bytes'] / 2**20:.0f} MiB, step {memory['step_time_s'] * 1000:.0f} ms")
    return memory


def measure_step(bundle_dir: Path, batch: int, seq: int) -> dict:
    """Peak memory and step time of one training step, in a fresh torch-free process."""
    import subprocess

    cmd = [
        sys.executable,
        "-m",
        "edge_client.probe",
        str(bundle_dir),
        "--batch",
        str(batch),
        "--seq",
        str(seq),
        "--steps",
        "2",
        "--threads",
        "1",
    ]
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    if proc.returncode != 0:
        raise ExportError(f"measuring the training step failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def export(cfg: ExportConfig) -> list[Path]:
    """Export every rank of the ladder; returns the bundle folders."""
    timings: dict[str, float] = {}
    with stage("pre-load checks", timings):
        plan = preflight(cfg)
    log(plan.summary())
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    with stage(f"load {plan.source.path}", timings):
        loaded = load_model(cfg, plan)
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = save_tokenizer(loaded.tokenizer, Path(tmp) / "tokenizer", plan.source.path)
        bundles = []
        for i, rank in enumerate(cfg.ranks, start=1):
            log(f"rank {rank} ({i}/{len(cfg.ranks)})")
            bundles.append(export_rank(loaded, cfg, rank, tok_dir))
    ranks: dict[str, dict[str, object]] = {str(r): {"path": f"r{r}"} for r in cfg.ranks}
    ladder = {"model_id": plan.model_id, "task": loaded.task, "ranks": ranks}
    for rank, path in zip(cfg.ranks, bundles):
        m = Bundle(path, verify=False).manifest
        ranks[str(rank)]["adapter_parameters"] = m.adapter_size
        ranks[str(rank)]["adapter_bytes_fp32"] = 4 * m.adapter_size
        if "memory" in m.extra:
            ranks[str(rank)]["peak_rss_bytes"] = m.extra["memory"]["peak_rss_bytes"]
            ranks[str(rank)]["step_time_s"] = m.extra["memory"]["step_time_s"]
    (cfg.output_dir / "ladder.json").write_text(json.dumps(ladder, indent=1) + "\n", encoding="utf-8")
    log(f"wrote {len(bundles)} bundle(s) to {cfg.output_dir}")
    return bundles


def save_tokenizer(tokenizer, folder: Path, source: Path) -> Path:
    """The tokenizer's files for the bundle: tokenizer.json (what the device loads), its config,
    and the chat template's source when it has one."""
    tokenizer.save_pretrained(folder)
    for extra in folder.glob("*"):
        if extra.name not in TOKENIZER_FILES:
            shutil.rmtree(extra) if extra.is_dir() else extra.unlink()
    if not (folder / "tokenizer.json").is_file():
        raise ExportError(f"{source}: the tokenizer did not produce tokenizer.json")
    return folder
