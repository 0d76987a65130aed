"""The exporter on real models: MiniLM (real weights) and a random-init Llama causal LM."""

import json
import shutil

import numpy as np
import pytest

from core.bundle import Bundle
from core.errors import BundleError, ConfigError
from export.config import ExportConfig
from export.exporter import ExportError, export


def test_minilm_ladder_is_self_checked_and_only_lora_and_head_train(minilm_bundles):
    ladder = json.loads((minilm_bundles / "ladder.json").read_text())
    assert sorted(ladder["ranks"], key=int) == ["2", "4", "8"]
    for rank in (2, 4):
        bundle = Bundle(minilm_bundles / f"r{rank}")
        m = bundle.manifest
        assert m.task == "seq-cls" and m.rank == rank and m.alpha == 2 * rank and m.targets == ("query", "value")
        assert m.labels == ("business", "entertainment", "politics", "sports", "tech")
        check = m.extra["self_check"]
        assert max(check["rel_diff"]) <= 1e-4 and check["torch_loss"][0] != check["torch_loss"][1]
        roles = {p.role for p in m.trainable}
        assert roles == {"lora_A", "lora_B", "head"}
        # 6 layers x (query, value) x (A, B) + classifier weight and bias
        assert len(m.trainable) == 6 * 2 * 2 + 2
        a = next(p for p in m.trainable if p.role == "lora_A")
        assert a.shape == (rank, 384)
        assert m.extra["frozen_params"] > 90  # base weights live in the checkpoint, frozen
        assert set(m.files) >= {
            "training_model.onnx",
            "eval_model.onnx",
            "optimizer_model.onnx",
            "checkpoint",
            "tokenizer/tokenizer.json",
        }


def test_tiny_llama_causal_lm_exports_and_self_checks(tiny_llama_dir, tmp_path):
    out = tmp_path / "llama"
    (bundle_dir,) = export(ExportConfig(model_dir=tiny_llama_dir, output_dir=out, ranks=(2,), max_length=16))
    m = Bundle(bundle_dir).manifest
    assert m.task == "causal-lm" and m.targets == ("q_proj", "v_proj")
    assert max(m.extra["self_check"]["rel_diff"]) <= 1e-4
    assert {p.role for p in m.trainable} == {"lora_A", "lora_B"}
    # the one-thread kernels of attention's softmax, RMSNorm and SiLU are rewritten, one per use
    rewrites = m.extra["gradient_rewrites"]
    assert rewrites.get("SoftmaxGrad_13", 0) > 0
    assert rewrites.get("SimplifiedLayerNormalizationGrad", 0) > rewrites["SoftmaxGrad_13"]
    assert rewrites.get("QuickGeluGrad", 0) == rewrites["SoftmaxGrad_13"]


def test_cli_can_keep_ort_gradient_kernels(tiny_llama_dir, tmp_path):
    import onnx

    from export.cli import main

    assert (
        main(
            [
                str(tiny_llama_dir),
                "-o",
                str(tmp_path / "out"),
                "--ranks",
                "2",
                "--max-length",
                "16",
                "--no-cpu-gradient-ops",
                "--no-measure",
            ]
        )
        == 0
    )
    m = Bundle(tmp_path / "out" / "r2").manifest
    assert m.extra["gradient_rewrites"] == {} and "memory" not in m.extra
    ops = {n.op_type for n in onnx.load(str(tmp_path / "out" / "r2" / "training_model.onnx")).graph.node}
    assert {"SoftmaxGrad_13", "SimplifiedLayerNormalizationGrad", "QuickGeluGrad"} <= ops


def test_corrupted_artifact_is_named(minilm_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(minilm_bundle, copy)
    with open(copy / "eval_model.onnx", "r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00\x01\x02")
    with pytest.raises(BundleError, match="eval_model.onnx is corrupted"):
        Bundle(copy)
    shutil.copy(minilm_bundle / "eval_model.onnx", copy / "eval_model.onnx")
    Bundle(copy)
    (copy / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="tokenizer/tokenizer.json listed in the manifest is missing"):
        Bundle(copy)


def test_model_without_tokenizer_fails_clearly(tiny_llama_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        if (tiny_llama_dir / name).exists():
            shutil.copy(tiny_llama_dir / name, bare / name)
    with pytest.raises(ExportError, match="tokenizer"):
        export(ExportConfig(model_dir=bare, output_dir=tmp_path / "out", ranks=(2,), verify=False))


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(ranks=(0,)), "ranks"),
        (dict(ranks=(4, 4)), "ranks"),
        (dict(task="vision"), "task"),
        (dict(opset=18), "opset"),
        (dict(max_length=4), "max_length"),
        (dict(alpha=-1.0), "alpha"),
    ],
)
def test_bad_export_options(tmp_path, kw, message):
    with pytest.raises(ConfigError, match=message):
        ExportConfig(model_dir=tmp_path, output_dir=tmp_path / "o", **kw)


def test_missing_model_dir(tmp_path):
    with pytest.raises(ConfigError, match="not a folder"):
        ExportConfig(model_dir=tmp_path / "nope", output_dir=tmp_path / "o")


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    from export.cli import main

    assert main([str(tmp_path / "nope"), "-o", str(tmp_path / "o")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_ort_trainer_learns_and_adapter_round_trips(minilm_bundle):
    from edge_client.data import Batch
    from edge_client.runtime import Trainer

    trainer = Trainer(Bundle(minilm_bundle))
    adapter = trainer.get_adapter()
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 2000, size=(4, 16)).astype(np.int64)
    batch = Batch(ids, np.ones_like(ids), np.array([0, 1, 2, 3], dtype=np.int64))
    trainer.set_learning_rate(5e-3)
    losses = [trainer.train_step(batch) for _ in range(15)]
    assert losses[-1] < 0.5 * losses[0]
    trainer.set_adapter(adapter)  # back to the start: same loss as the first step
    assert abs(trainer.eval_batch(batch)[0] - losses[0]) < 1e-4
    name = next(iter(adapter))
    with pytest.raises(BundleError, match="shape"):
        trainer.set_adapter({name: np.zeros((1, 1), np.float32)})


def test_a_low_rank_device_with_the_tail_folded_computes_what_the_whole_adapter_does(minilm_bundles):
    """flexlora-delta's downlink: a rank-2 device gets A[:2], B[:, :2] to train and the rest of
    a rank-8 global as frozen factors; its model is then exactly the rank-8 model (real
    artifacts of both ranks, same exported base weights)."""
    from core.protocol import BASE_A_PREFIX, BASE_B_PREFIX
    from edge_client.data import Batch
    from edge_client.runtime import Trainer
    from server.strategies import make_strategy
    from server.strategies.base import AdapterLayout, GlobalModel

    big, small = Trainer(Bundle(minilm_bundles / "r8")), Trainer(Bundle(minilm_bundles / "r2"))
    rng = np.random.default_rng(3)
    tensors = {k: (v + rng.normal(scale=0.05, size=v.shape)).astype(np.float32) for k, v in big.get_adapter().items()}
    strategy = make_strategy("flexlora-delta", AdapterLayout.from_manifest(big.manifest), rank=8)
    glob = GlobalModel(8, tensors)
    big.apply_global(strategy.for_device(glob, 8))
    sent = {**strategy.for_device(glob, 2), **strategy.frozen_for_device(glob, 2)}
    assert any(k.startswith(BASE_A_PREFIX) for k in sent) and any(k.startswith(BASE_B_PREFIX) for k in sent)
    small.apply_global(sent)
    ids = rng.integers(1000, 2000, size=(4, 16)).astype(np.int64)
    batch = Batch(ids, np.ones_like(ids), np.array([0, 1, 2, 3], dtype=np.int64))
    truncated = Trainer(Bundle(minilm_bundles / "r2"))
    truncated.apply_global(strategy.for_device(glob, 2))
    assert abs(small.eval_batch(batch)[0] - big.eval_batch(batch)[0]) < 1e-4
    assert abs(truncated.eval_batch(batch)[0] - big.eval_batch(batch)[0]) > 1e-3  # the tail matters here
    # the next version replaces the folded change rather than adding to it
    glob = GlobalModel(
        8, {k: (v + rng.normal(scale=0.05, size=v.shape)).astype(np.float32) for k, v in tensors.items()}
    )
    big.apply_global(strategy.for_device(glob, 8))
    small.apply_global({**strategy.for_device(glob, 2), **strategy.frozen_for_device(glob, 2)})
    assert abs(small.eval_batch(batch)[0] - big.eval_batch(batch)[0]) < 1e-4


def test_ladder_records_memory_and_devices_choose_a_rank(minilm_bundles):
    from core.bundle import choose_bundle

    ladder = json.loads((minilm_bundles / "ladder.json").read_text())["ranks"]
    for rank in ("2", "4", "8"):
        m = Bundle(minilm_bundles / f"r{rank}").manifest
        assert m.extra["memory"]["peak_rss_bytes"] == ladder[rank]["peak_rss_bytes"] > 100 * 2**20
        assert m.extra["memory"]["torch_loaded"] is False
        assert ladder[rank]["adapter_parameters"] == m.adapter_size
    assert choose_bundle(minilm_bundles).name == "r8"  # no budget: the largest rank
    assert choose_bundle(minilm_bundles, rank=2).name == "r2"
    need = {int(r): ladder[r]["peak_rss_bytes"] for r in ladder}
    for budget in sorted(need.values()):
        expected = max(r for r, n in need.items() if n <= budget)
        assert choose_bundle(minilm_bundles, memory_budget_bytes=budget).name == f"r{expected}"
    small = min(need.values())
    with pytest.raises(BundleError, match="no rank fits"):
        choose_bundle(minilm_bundles, memory_budget_bytes=small - 1)
    with pytest.raises(BundleError, match="not in the ladder"):
        choose_bundle(minilm_bundles, rank=16)
    assert choose_bundle(minilm_bundles / "r2").name == "r2"


# --- Decoder LLMs for real: pre-load checks, the architecture table, chat templates, GGUF files ---

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a tiny helpful model.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Gemma's shape: BOS in the template, no system role (it raises), "model" for the assistant
GEMMA_LIKE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else "
    "message['role'] %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
# Llama 3's shape: BOS and headers, a system block only when there is a system message
LLAMA3_LIKE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# Qwen3's shape: the last answer gets an (empty) thinking block, earlier ones do not
THINKS_LAST = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' and loop.last %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{{ message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "Is the adapter trained?"}],
    [{"role": "system", "content": "Answer with one word."}, {"role": "user", "content": "Is it\nlocal?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "the device"},
        {"role": "assistant", "content": "trains an adapter"},
        {"role": "user", "content": "and then?"},
    ],
    [
        {"role": "user", "content": "the data"},
        {"role": "assistant", "content": "stays local."},
        {"role": "user", "content": "the update"},
        {"role": "assistant", "content": "goes to the aggregator"},
    ],
]


def _template_tokenizer(template: str):
    """A small fast tokenizer that renders ``template`` (no files, no model)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = template
    return fast


def _render(tokenizer, messages, generation):
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def _assert_reassembles(chat_format: dict, tokenizer) -> None:
    """The manifest's parts, filled the way a device fills them, give exactly the template's text."""
    from export.chat_format import ChatFormat, format_conversation

    fmt = ChatFormat(**chat_format)
    for messages in CONVERSATIONS:
        merge = tokenizer.chat_template == GEMMA_LIKE and messages[0]["role"] == "system"
        rendered = (
            messages
            if not merge
            else [{"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}, *messages[2:]]
        )
        generation = messages[-1]["role"] == "user"
        assert format_conversation(fmt, messages, generation) == _render(tokenizer, rendered, generation)


@pytest.mark.parametrize("template", [CHATML, GEMMA_LIKE, LLAMA3_LIKE], ids=["chatml", "gemma", "llama3"])
def test_chat_format_reassembles_the_templates_render(template):
    from export.chat_format import derive_chat_format

    tokenizer = _template_tokenizer(template)
    fmt = derive_chat_format(lambda m, g: _render(tokenizer, m, g))
    _assert_reassembles(fmt.to_json(), tokenizer)
    for part in fmt.prompt + fmt.prompt_no_system + fmt.turn + fmt.response:
        assert part[0] in ("text", "slot") and (part[0] == "text" or part[1] in ("system", "user", "assistant"))
    assert fmt.system_in_user == (template == GEMMA_LIKE)
    if template == CHATML:  # the default system prompt is literal text of the first turn without a system message
        assert fmt.prompt_no_system[0] == [
            "text",
            "<|im_start|>system\nYou are a tiny helpful model.<|im_end|>\n<|im_start|>user\n",
        ]
        assert fmt.response == [["slot", "assistant"], ["text", "<|im_end|>\n"]]
    if template == GEMMA_LIKE:
        assert fmt.prompt == [
            ["text", "<s><start_of_turn>user\n"],
            ["slot", "system"],
            ["text", "\n\n"],
            ["slot", "user"],
            ["text", "<end_of_turn>\n<start_of_turn>model\n"],
        ]


def test_a_template_that_is_not_prefix_consistent_gets_no_chat_format(capsys):
    from export.chat_format import ChatFormatError, derive_chat_format
    from export.preflight import chat_format_of

    tokenizer = _template_tokenizer(THINKS_LAST)
    with pytest.raises(ChatFormatError, match="not prefix-consistent"):
        derive_chat_format(lambda m, g: _render(tokenizer, m, g))
    fmt, note = chat_format_of(tokenizer)
    assert fmt is None and "not prefix-consistent" in note
    assert "chat template left out of the manifest" in capsys.readouterr().err
    assert chat_format_of(_template_tokenizer(None)) == (None, "no chat template (devices use their own prompt format)")


def make_chat_llama(folder, template: str = CHATML):
    """The conftest's tiny Llama with ChatML's special tokens and a chat template (embedding resized)."""
    from conftest import make_tiny_llama
    from transformers import AutoTokenizer, LlamaForCausalLM

    make_tiny_llama(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = template
    tokenizer.save_pretrained(folder)
    model = LlamaForCausalLM.from_pretrained(folder)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(folder)
    return folder


@pytest.mark.integration  # a real export
def test_tiny_chat_llama_exports_its_chat_format_token_ids_and_label_words(tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    folder = make_chat_llama(tmp_path / "chat-llama")
    (bundle_dir,) = export(
        ExportConfig(
            model_dir=folder,
            output_dir=tmp_path / "out",
            ranks=(2,),
            max_length=16,
            labels=("yes", "no"),
            measure=False,
        )
    )
    m = Bundle(bundle_dir).manifest
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert m.task == "causal-lm" and m.labels == ("yes", "no") and m.model_id == "chat-llama"
    assert max(m.extra["self_check"]["rel_diff"]) <= 1e-4
    assert set(m.extra["chat_format"]) == {"prompt", "prompt_no_system", "turn", "response"}
    _assert_reassembles(m.extra["chat_format"], tokenizer)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert m.extra["eos_token_id"] == im_end != tokenizer.eos_token_id  # the end of a turn, not </s>
    assert m.extra["bos_token_id"] == tokenizer.bos_token_id and m.extra["add_bos_token"] is False
    assert m.extra["vocab_size"] == len(tokenizer)
    # the device's tokenizer keeps the template's markers whole
    device = Tokenizer.from_file(str(bundle_dir / m.tokenizer))
    assert device.encode("<|im_start|>user\nthe device<|im_end|>", add_special_tokens=False).ids[-1] == im_end


def test_a_model_without_chat_template_records_token_facts_only(tiny_llama_dir, tmp_path):
    (bundle_dir,) = export(
        ExportConfig(
            model_dir=tiny_llama_dir, output_dir=tmp_path / "o", ranks=(2,), max_length=16, measure=False, verify=False
        )
    )
    from transformers import AutoTokenizer

    extra = Bundle(bundle_dir).manifest.extra
    assert "chat_format" not in extra
    assert (extra["bos_token_id"], extra["eos_token_id"]) == (2, 3)  # <s>, </s>
    assert extra["vocab_size"] == len(AutoTokenizer.from_pretrained(tiny_llama_dir))


# Small configs for every row of the architecture table (one rank, 16 tokens: a few seconds each).
SMALL = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    head_dim=8,
    pad_token_id=0,
    bos_token_id=2,
    eos_token_id=3,
)
SMALL_BY_TYPE = {
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0, bos_token_id=2, eos_token_id=3),
    "gpt_neox": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    ),
    "bert": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        pad_token_id=0,
    ),
    "distilbert": dict(dim=32, hidden_dim=64, n_layers=2, n_heads=4, pad_token_id=0),
}
SMALL_BY_TYPE["roberta"] = SMALL_BY_TYPE["bert"]


def make_tiny_model(folder, model_type: str, tokenizer_dir, weights: bool = True):
    """A random-init model of ``model_type`` (its config only when ``weights`` is False) with the
    tiny Llama's word-level tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from export.architectures import FAMILIES

    folder.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, folder / name)
    vocab = len(json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"])
    config = AutoConfig.for_model(model_type, vocab_size=vocab, **SMALL_BY_TYPE.get(model_type, SMALL))
    causal = "causal-lm" in FAMILIES[model_type].tasks if model_type in FAMILIES else True
    cls = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    config.architectures = [cls._model_mapping[type(config)].__name__]
    if not weights:
        config.save_pretrained(folder)
        return folder
    torch.manual_seed(0)
    cls.from_config(config).save_pretrained(folder)
    return folder


def _family_ids():
    from export.architectures import FAMILIES

    return sorted(FAMILIES)


@pytest.mark.parametrize("model_type", _family_ids())
def test_every_architecture_in_the_table_exports_with_all_its_targets(model_type, tiny_llama_dir, tmp_path):
    """Each row's attention and MLP names are real layers of transformers' model, and LoRA on all
    of them exports and passes the self-check."""
    from export.architectures import FAMILIES

    family = FAMILIES[model_type]
    folder = make_tiny_model(tmp_path / model_type, model_type, tiny_llama_dir)
    labels = ("a", "b") if family.tasks == ("seq-cls",) else ()
    (bundle_dir,) = export(
        ExportConfig(
            model_dir=folder,
            output_dir=tmp_path / "o",
            ranks=(2,),
            max_length=16,
            targets=("all",),
            labels=labels,
            measure=False,
        )
    )
    m = Bundle(bundle_dir).manifest
    assert m.task == family.tasks[0] and max(m.extra["self_check"]["rel_diff"]) <= 1e-4
    names = family.attention + family.mlp
    assert list(m.targets) == [t.format(layer=i) for t in names for i in (range(2) if "{layer}" in t else [0])]
    # every name adapts one layer in each of the 2 blocks (a {layer} name, expanded, one each)
    adapted = {p.name.rsplit(".lora_", 1)[0] for p in m.trainable if p.role != "head"}
    assert len(adapted) == 2 * len(names)


def _no_weights_load(monkeypatch):
    """Fail the test if the export gets as far as loading weights."""
    from export import exporter

    def refuse(*args, **kwargs):
        raise AssertionError("the weights were loaded before the option was refused")

    monkeypatch.setattr(exporter, "_load_weights", refuse)


@pytest.mark.parametrize(
    "case, message",
    [
        ("unsupported", "model type 'mamba' .* not in fedlora-export's architecture table"),
        ("known-failure", "model type 'cohere' .* is not supported: ONNX Runtime's training step fails"),
        (
            "unknown-target",
            "LoRA target 'nope' matches no linear layer of model type 'llama'; its linear layers end in: "
            "self_attn.q_proj, .*lm_head",
        ),
        ("preset-without-table", "model type 'mamba' .* not in fedlora-export's architecture table"),
        ("seq-cls-without-labels", "seq-cls export needs the class labels"),
        ("encoder-as-causal-lm", "model type 'distilbert' is not exported for causal-lm \\(it is for: seq-cls\\)"),
        ("output-is-a-file", "the output .* is a file, not a folder"),
        ("rank-folder-is-a-file", "holds a file r2 where the rank-2 bundle goes"),
        ("label-on-two-lines", "each label must be a single line"),
        ("empty-label", "labels must be non-empty text"),
    ],
)
def test_preflight_refuses_before_any_weights_load(case, message, tiny_llama_dir, tmp_path, monkeypatch):
    """Folders hold config.json and the tokenizer only: no weights to load, and none are loaded."""
    _no_weights_load(monkeypatch)
    model_type = {
        "unsupported": "mamba",
        "known-failure": "cohere",
        "preset-without-table": "mamba",
        "encoder-as-causal-lm": "distilbert",
    }.get(case, "llama")
    folder = make_tiny_model(tmp_path / "m", model_type, tiny_llama_dir, weights=False)
    kw = dict(model_dir=folder, output_dir=tmp_path / "out", ranks=(2,))
    kw.update(
        {
            "unknown-target": dict(targets=("q_proj", "nope")),
            "preset-without-table": dict(targets=("mlp",)),
            "seq-cls-without-labels": dict(task="seq-cls"),
            "encoder-as-causal-lm": dict(task="causal-lm"),
            "label-on-two-lines": dict(task="causal-lm", labels=("yes", "no\nmaybe")),
            "empty-label": dict(labels=("yes", " ")),
        }.get(case, {})
    )
    if case == "output-is-a-file":
        (tmp_path / "out").write_text("not a folder")
    if case == "rank-folder-is-a-file":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "r2").write_text("not a folder")
    with pytest.raises(ConfigError, match=message):
        export(ExportConfig(**kw))


def test_a_table_less_architecture_exports_with_named_targets(tiny_llama_dir, tmp_path, capsys):
    """A model type outside the table is tried with the modules named; the pre-load check still
    matches the names against its layers."""
    from export.cli import main

    folder = make_tiny_model(tmp_path / "olmo", "olmo", tiny_llama_dir, weights=False)
    assert main([str(folder), "-o", str(tmp_path / "o"), "--targets", "q_proj,down_proj", "--check"]) == 0
    assert "model type olmo, task causal-lm, LoRA targets q_proj,down_proj" in capsys.readouterr().out
    assert not (tmp_path / "o").exists()  # --check writes nothing


def test_target_presets_resolve_per_architecture(tiny_llama_dir, tmp_path):
    from export.preflight import preflight

    folder = make_tiny_model(tmp_path / "bert", "bert", tiny_llama_dir, weights=False)

    def targets(*names):
        return preflight(
            ExportConfig(model_dir=folder, output_dir=tmp_path / "o", labels=("a", "b"), targets=names)
        ).targets

    assert targets() == ("query", "value")
    assert targets("mlp") == ("intermediate.dense", "layer.0.output.dense", "layer.1.output.dense")
    assert targets("attention", "value") == ("query", "key", "value", "attention.output.dense")
    llama = make_tiny_model(tmp_path / "llama", "llama", tiny_llama_dir, weights=False)
    plan = preflight(ExportConfig(model_dir=llama, output_dir=tmp_path / "o", targets=("all", "lm_head")))
    assert plan.targets == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


def make_tiny_gguf(
    path, chat_template: str | None = CHATML, architecture: str = "llama", name: str = "tiny chat llama"
):
    """A real GGUF file of a tiny random Llama (float32 tensors) with a byte-level BPE tokenizer
    trained here, ChatML's special tokens and ``chat_template``, written with the gguf package."""
    try:
        import gguf
    except ImportError:
        pytest.fail("the gguf package is missing (scripts/setup.sh installs it)")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    text = "the device trains an adapter on local data and sends its update to the aggregator"
    tok.train_from_iterator(
        [text] * 8,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=specials,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    hidden, ffn, layers, heads, kv_heads = 32, 64, 2, 4, 2
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name(name)
    writer.add_block_count(layers)
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in specials else 1 for t in tokens])  # 3: control (special) tokens
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab["<|im_start|>"])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_pad_token_id(vocab["<|endoftext|>"])
    writer.add_add_bos_token(False)
    if chat_template:
        writer.add_chat_template(chat_template)
    rng = np.random.default_rng(0)

    def tensor(tname, *shape):
        writer.add_tensor(tname, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    tensor("token_embd.weight", len(tokens), hidden)
    kv = kv_heads * hidden // heads
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        for tname, shape in (
            ("attn_q", (hidden, hidden)),
            ("attn_k", (kv, hidden)),
            ("attn_v", (kv, hidden)),
            ("attn_output", (hidden, hidden)),
            ("ffn_gate", (ffn, hidden)),
            ("ffn_up", (ffn, hidden)),
            ("ffn_down", (hidden, ffn)),
        ):
            tensor(f"blk.{i}.{tname}.weight", *shape)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.integration
def test_a_gguf_file_exports_directly_with_its_chat_template(tmp_path):
    """The GGUF file itself is the model argument: causal LM by default, named after the file,
    the template from the GGUF metadata in the manifest."""
    from transformers import AutoTokenizer

    from export.cli import main

    (tmp_path / "models").mkdir()
    gguf_path = make_tiny_gguf(tmp_path / "models" / "tiny-chat.F32.gguf")
    assert (
        main(
            [
                str(gguf_path),
                "-o",
                str(tmp_path / "out"),
                "--ranks",
                "2",
                "--max-length",
                "16",
                "--no-measure",
                "--targets",
                "attention",
            ]
        )
        == 0
    )
    m = Bundle(tmp_path / "out" / "r2").manifest
    assert m.model_id == "tiny-chat.F32" and m.task == "causal-lm"
    assert m.targets == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert m.extra["gguf"] == {"file": "tiny-chat.F32.gguf", "name": "tiny chat llama", "architecture": "llama"}
    assert max(m.extra["self_check"]["rel_diff"]) <= 1e-4
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    _assert_reassembles(m.extra["chat_format"], tokenizer)
    assert m.extra["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert m.extra["vocab_size"] == 300 and m.extra["add_bos_token"] is False
    # the folder that holds it is the same model
    from export.preflight import preflight

    plan = preflight(ExportConfig(model_dir=gguf_path.parent, output_dir=tmp_path / "o2"))
    assert plan.model_id == "tiny-chat.F32" and plan.source.gguf_file == gguf_path.name


def test_gguf_files_are_checked_from_their_metadata(tmp_path, monkeypatch):
    _no_weights_load(monkeypatch)
    folder = tmp_path / "g"
    folder.mkdir()
    make_tiny_gguf(folder / "a.gguf", architecture="rwkv6")
    with pytest.raises(
        ConfigError, match="model type 'rwkv6' \\(GGUF architecture 'rwkv6'\\) is not in fedlora-export"
    ):
        export(ExportConfig(model_dir=folder / "a.gguf", output_dir=tmp_path / "o"))
    make_tiny_gguf(folder / "b.gguf")
    with pytest.raises(ConfigError, match="several .gguf files"):
        export(ExportConfig(model_dir=folder, output_dir=tmp_path / "o"))
    with pytest.raises(ConfigError, match="gguf_file names c.gguf"):
        ExportConfig(model_dir=folder / "b.gguf", output_dir=tmp_path / "o", gguf_file="c.gguf")
    (folder / "not-a-model.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match="not a folder and not a .gguf file"):
        ExportConfig(model_dir=folder / "not-a-model.bin", output_dir=tmp_path / "o")
