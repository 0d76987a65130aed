"""Instruction data on the device and the evaluation of a generative model, torch-free.

Readers and their errors, classification as instruction, chat templates and the Alpaca
fallback, response-only labels, truncation, length bucketing (unit tests on a word-level
tokenizer built here), then label scoring, greedy decoding and training on a real tiny Llama
bundle (integration).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math

import numpy as np
import pytest

from core.bundle import REQUIRED_FILES, Bundle, Manifest
from core.errors import BundleError, DataError
from edge_client.data import IGNORE_INDEX, Batch, EncodedDataset, Record
from edge_client.instruct import (
    ChatFormat,
    DataFormat,
    Example,
    InstructionEncoder,
    SpecialTokens,
    Turn,
    check_label_words,
    detect_format,
    encode_instructions,
    fit_example,
    labeled_to_instructions,
    normalize_answer,
    read_instruction_examples,
)

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
PAD, UNK, BOS, EOS, IM_START, IM_END = range(6)
CORPUS = """### Instruction : Input Response system user assistant Classify the text into one of these categories
, . Answer with category only you are a helpful bot what is capital of france paris and germany berlin
say hello hi there sport tech politics match won by ten goals new phone released vote held today
a b c d e f g h i j k l m n o p q r s t u v w x y z"""

CHATML = {
    "prompt": [
        ["text", "<|im_start|>system\n"],
        ["slot", "system"],
        ["text", "<|im_end|>\n<|im_start|>user\n"],
        ["slot", "user"],
        ["text", "<|im_end|>\n<|im_start|>assistant\n"],
    ],
    "prompt_no_system": [
        ["text", "<|im_start|>user\n"],
        ["slot", "user"],
        ["text", "<|im_end|>\n<|im_start|>assistant\n"],
    ],
    "turn": [["text", "<|im_start|>user\n"], ["slot", "user"], ["text", "<|im_end|>\n<|im_start|>assistant\n"]],
    "response": [["slot", "assistant"], ["text", "<|im_end|>\n"]],
}


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([CORPUS] * 2, trainers.WordLevelTrainer(special_tokens=SPECIALS))
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def manifest(**extra) -> Manifest:
    return Manifest(
        model_id="tiny",
        task="causal-lm",
        rank=2,
        alpha=4.0,
        targets=("q_proj",),
        max_length=64,
        pad_token_id=PAD,
        trainable=(),
        input_names=("input_ids", "attention_mask"),
        files={},
        labels=tuple(extra.pop("labels", ())),
        extra=extra,
    )


def encoder(tokenizer_file, chat_format=None, max_length=64, bos=BOS, eos=EOS, add_bos=False) -> InstructionEncoder:
    fmt = chat_format or ChatFormat.alpaca()
    return InstructionEncoder(tokenizer_file, max_length, PAD, fmt, SpecialTokens(bos, eos, add_bos))


def chatml(eos=IM_END) -> ChatFormat:
    return ChatFormat.from_manifest(manifest(chat_format=CHATML, eos_token_id=eos))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# -- readers -------------------------------------------------------------------------------
def test_alpaca_rows_read_the_same_from_jsonl_json_and_csv(tmp_path):
    import csv

    rows = [
        {"instruction": "say hello", "input": "", "output": "hi there"},
        {"instruction": "what is the capital", "input": "france", "output": "paris", "system": "you are a bot"},
    ]
    jsonl = write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "a.json").write_text(json.dumps(rows), encoding="utf-8")
    with open(tmp_path / "a.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["instruction", "input", "output", "system"])
        writer.writeheader()
        writer.writerows(rows)
    read = [read_instruction_examples(p) for p in (jsonl, tmp_path / "a.json", tmp_path / "a.csv")]
    for examples in read:
        assert [e.turns for e in examples] == [
            (Turn("say hello", "hi there"),),
            (Turn("what is the capital", "paris", context="france"),),
        ]
        assert [e.system for e in examples] == ["", "you are a bot"]
    assert read[0][1].where == f"{jsonl}:2"


def test_a_chat_keeps_its_turns_and_only_the_last_answer_is_the_response(tmp_path, tokenizer_file):
    messages = [
        {"role": "system", "content": "you are a bot"},
        {"role": "user", "content": "say hello"},
        {"role": "assistant", "content": "hi there"},
        {"role": "user", "content": "capital of france"},
        {"role": "assistant", "content": "paris"},
    ]
    (example,) = read_instruction_examples(write_jsonl(tmp_path / "c.jsonl", [{"messages": messages}]))
    assert example.system == "you are a bot" and example.answer == "paris"
    assert example.turns == (Turn("say hello", "hi there"), Turn("capital of france", "paris"))
    prompt, response = chatml().render(example)
    assert prompt == (
        "<|im_start|>system\nyou are a bot<|im_end|>\n<|im_start|>user\nsay hello<|im_end|>\n"
        "<|im_start|>assistant\nhi there<|im_end|>\n<|im_start|>user\ncapital of france<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert response == "paris<|im_end|>\n"


def test_a_chat_in_a_csv_cell_is_parsed(tmp_path):
    cell = json.dumps([{"role": "user", "content": "say hello"}, {"role": "assistant", "content": "hi"}])
    path = tmp_path / "c.csv"
    path.write_text('messages\n"' + cell.replace('"', '""') + '"\n', encoding="utf-8")
    (example,) = read_instruction_examples(path)
    assert example.turns == (Turn("say hello", "hi"),)


def _chat(*pairs):
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


BAD_ROWS = [
    ({"instruction": "say hello"}, "no field 'output'"),
    ({"output": "hi"}, "no field 'instruction'"),
    ({"instruction": "  ", "output": "hi"}, "field 'instruction' is empty"),
    ({"instruction": "say hello", "output": ""}, "field 'output' is empty"),
    ({"instruction": "say hello", "output": 5}, "field 'output' is not text (int)"),
    ({"instruction": "say hello", "input": ["x"], "output": "hi"}, "field 'input' is not text (list)"),
    ({"text": "no instruction here"}, "neither 'messages' nor 'instruction' + 'output'"),
    ({"messages": []}, "must be a non-empty list"),
    ({"messages": "[not json"}, "'messages' is not valid JSON"),
    ({"messages": ["hello"]}, "message 1 is not an object"),
    ({"messages": [{"role": "user"}]}, "message 1 has no 'content'"),
    (_chat(("user", "hi"), ("tool", "x")), "message 2 has unknown role 'tool' (known: system, user, assistant)"),
    (_chat(("user", "hi"), ("assistant", " ")), "message 2 (assistant): content is empty"),
    (_chat(("user", "hi"), ("assistant", "hello"), ("user", "bye")), "the last message must be the assistant's"),
    (_chat(("user", "hi"), ("user", "again"), ("assistant", "x")), "message 2 has role 'user': expected 'assistant'"),
    (_chat(("assistant", "hi")), "message 1 has role 'assistant': expected 'user'"),
    (
        _chat(("user", "hi"), ("system", "late"), ("assistant", "x")),
        "message 2 has role 'system': a system message may only come first",
    ),
    (_chat(("system", "only")), "has a system message only"),
]


@pytest.mark.parametrize("row, message", BAD_ROWS, ids=[m for _, m in BAD_ROWS])
def test_bad_instruction_rows_name_the_file_the_line_and_the_problem(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "say hello", "output": "hi"}, row])
    with pytest.raises(DataError) as err:
        read_instruction_examples(path)
    assert f"{path}:2: " in str(err.value) and message in str(err.value)


# -- classification as instruction ----------------------------------------------------------
def test_labeled_records_become_instructions_naming_the_label_words():
    words = ("sport", "tech", "politics")
    examples = labeled_to_instructions([Record("match won by ten goals", "sport"), Record("new phone", "tech")], words)
    assert [e.answer for e in examples] == ["sport", "tech"]
    turn = examples[0].turns[0]
    assert turn.user.startswith("Classify the text into one of these categories: sport, tech, politics.")
    assert turn.context == "match won by ten goals"
    prompt, response = ChatFormat.alpaca().render(examples[0])
    assert prompt == f"### Instruction:\n{turn.user}\n\n### Input:\nmatch won by ten goals\n\n### Response:\n"
    assert response == "sport"
    assert chatml().render_prompt(examples[0]).startswith(f"<|im_start|>user\n{turn.user}\n\nmatch won by ten goals")


@pytest.mark.parametrize(
    "words, message",
    [
        (("sport", ""), "is empty"),
        (("sport", "tech\nnews"), "spans several lines"),
        (("sport", " tech"), "leading or trailing whitespace"),
        (("sport", "Sport!"), "are the same answer once normalized"),
        (("sport", "?!"), "has no letters or digits"),
    ],
)
def test_label_words_that_are_not_a_single_answer_are_refused(words, message):
    with pytest.raises(DataError, match=message):
        check_label_words(words)
    with pytest.raises(DataError, match=message):
        labeled_to_instructions([Record("x", "sport")], words)


def test_labels_outside_the_label_words_and_no_label_words_are_refused():
    with pytest.raises(DataError, match=r"labels not among the label words \['sport', 'tech'\]: \['cooking'\]"):
        labeled_to_instructions([Record("x", "sport"), Record("y", "cooking")], ("sport", "tech"))
    with pytest.raises(DataError, match="needs label words"):
        labeled_to_instructions([Record("x", "sport")], ())


def test_answers_are_compared_normalized():
    assert normalize_answer("  Paris.\nThe capital") == "paris"
    assert normalize_answer("\n\nSci.Space!") == "sci space"
    assert normalize_answer("") == ""


@pytest.mark.parametrize(
    "row, labels, expected",
    [
        ({"messages": [], "text": "x"}, (), DataFormat.CHAT),
        ({"instruction": "a", "output": "b"}, ("x",), DataFormat.ALPACA),
        ({"text": "a", "label": "sport"}, ("sport",), DataFormat.CLASSIFICATION),
        ({"text": "a", "label": "sport"}, (), DataFormat.PLAIN),
        ({"text": "a"}, ("sport",), DataFormat.PLAIN),
    ],
)
def test_the_format_of_a_data_file_is_detected_from_its_fields(row, labels, expected):
    assert detect_format(row, "text", "label", labels) is expected


def test_rows_of_no_known_format_are_refused():
    with pytest.raises(DataError, match="neither 'messages', 'instruction' \\+ 'output', nor a 'text' column"):
        detect_format({"body": "x"})


# -- chat formats --------------------------------------------------------------------------
def test_without_a_chat_template_the_alpaca_layout_is_used_with_eos_after_the_response(tokenizer_file):
    fmt = ChatFormat.from_manifest(manifest())
    assert not fmt.template and fmt.append_eos
    example = Example((Turn("say hello", "hi there"),), system="you are a bot")
    assert fmt.render(example) == ("you are a bot\n\n### Instruction:\nsay hello\n\n### Response:\n", "hi there")
    enc = encoder(tokenizer_file, fmt)
    (prompt,) = enc.prompt_ids([example])
    (response,) = enc.response_ids([example.answer])
    assert prompt[0] == BOS and prompt.count(BOS) == 1
    assert response[-1] == EOS and enc.decode(response) == "hi there"


def test_the_alpaca_layout_renders_earlier_turns_into_the_prompt():
    example = Example((Turn("say hello", "hi"), Turn("what is the capital", "paris", context="france")))
    assert ChatFormat.alpaca().render_prompt(example) == (
        "### Instruction:\nsay hello\n\n### Response:\nhi\n\n### Instruction:\nwhat is the capital\n\n"
        "### Input:\nfrance\n\n### Response:\n"
    )


def test_a_template_without_a_system_slot_puts_the_system_message_before_the_user_message():
    spec = dict(CHATML, prompt=CHATML["prompt_no_system"])
    fmt = ChatFormat.from_manifest(manifest(chat_format=spec))
    example = Example((Turn("say hello", "hi"),), system="you are a bot")
    assert (
        fmt.render_prompt(example) == "<|im_start|>user\nyou are a bot\n\nsay hello<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize(
    "spec, message",
    [
        ("chatml", "must be an object"),
        ({k: v for k, v in CHATML.items() if k != "turn"}, "lacks turn"),
        (dict(CHATML, response=[["slot", "assistant"], ["bold", "x"]]), "unknown part"),
        (dict(CHATML, response=[["slot", "tool"]]), "unknown part"),
        (dict(CHATML, prompt=[["text"]]), "malformed part"),
        (dict(CHATML, response=[["text", "<|im_end|>"]]), "response has no assistant slot"),
    ],
)
def test_a_malformed_chat_format_is_a_bundle_error(spec, message):
    with pytest.raises(BundleError, match=message):
        ChatFormat.from_manifest(manifest(chat_format=spec))


def test_bos_is_added_under_a_template_only_when_the_tokenizer_adds_it_and_never_twice(tokenizer_file):
    example = Example((Turn("say hello", "hi"),))
    assert encoder(tokenizer_file, chatml()).prompt_ids([example])[0][:2] == [IM_START, ids_of(tokenizer_file, "user")]
    assert encoder(tokenizer_file, chatml(), add_bos=True).prompt_ids([example])[0][:2] == [BOS, IM_START]
    with_bos = dict(CHATML, prompt_no_system=[["text", "<s>"]] + CHATML["prompt_no_system"])
    fmt = ChatFormat.from_manifest(manifest(chat_format=with_bos))
    prompt = encoder(tokenizer_file, fmt, add_bos=True).prompt_ids([example])[0]
    assert prompt[0] == BOS and prompt.count(BOS) == 1
    assert encoder(tokenizer_file, bos=None).prompt_ids([example])[0][0] != BOS  # no BOS in the model


def ids_of(tokenizer_file, word: str) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_file)).token_to_id(word)


def test_special_tokens_come_from_the_manifest_else_the_tokenizer_config(tokenizer_file, tmp_path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    assert SpecialTokens.from_bundle(manifest(), tok, folder / "tokenizer.json") == SpecialTokens(BOS, EOS, False)
    given = manifest(bos_token_id=None, eos_token_id=IM_END, add_bos_token=True)
    assert SpecialTokens.from_bundle(given, tok, folder / "tokenizer.json") == SpecialTokens(None, IM_END, True)
    assert SpecialTokens.from_bundle(manifest(), tok, tmp_path / "none" / "tokenizer.json") == SpecialTokens(
        None, None, False
    )


# -- encoding ------------------------------------------------------------------------------
def learned(data: EncodedDataset, row: int) -> list[int]:
    return [int(t) for t in data.labels[row] if t != IGNORE_INDEX]


def test_labels_cover_exactly_the_response_tokens(tokenizer_file):
    examples = [
        Example((Turn("say hello", "hi there"),), system="you are a bot"),
        Example((Turn("say hello", "hi"), Turn("capital of france", "paris and berlin"))),
    ]
    for fmt, response_text in ((chatml(), "paris and berlin<|im_end|>\n"), (ChatFormat.alpaca(), "paris and berlin")):
        enc = encoder(tokenizer_file, fmt)
        data = encode_instructions(examples, enc)
        ids, labels, mask = data.input_ids[1], data.labels[1], data.attention_mask[1]
        n = int(mask.sum())
        (prompt,) = enc.prompt_ids(examples[1:])
        response = learned(data, 1)
        # labels[t] is ids[t + 1] on every learned position, and those are the last tokens
        assert all(labels[t] == ids[t + 1] for t in range(n - 1) if labels[t] != IGNORE_INDEX)
        assert list(ids[:n]) == prompt + response
        assert (labels[: len(prompt) - 1] == IGNORE_INDEX).all() and (labels[n - 1 :] == IGNORE_INDEX).all()
        if fmt.append_eos:
            assert response[-1] == EOS
        # a word-level tokenizer decodes words joined by spaces and drops newlines
        assert enc.tokenizer.decode(response, skip_special_tokens=False).replace(" ", "") == response_text.replace(
            " ", ""
        ).replace("\n", "") + ("</s>" if fmt.append_eos else "")
        # the earlier assistant turn ("hi") is in the prompt, not learned
        assert ids_of(tokenizer_file, "hi") in prompt and ids_of(tokenizer_file, "hi") not in response


def test_fitting_cuts_the_prompt_middle_then_the_response_end():
    assert fit_example([1, 2, 3], [7, 8], 8) == fit_example([1, 2, 3], [7, 8], 5)
    fitted = fit_example([9, 1, 2, 3, 4], [7, 8], 5, keep_first=True)
    assert (fitted.ids, fitted.n_prompt, fitted.cut) == ([9, 3, 4, 7, 8], 3, "prompt")
    fitted = fit_example([9, 1, 2, 3, 4], [7, 8], 5)
    assert (fitted.ids, fitted.n_prompt, fitted.cut) == ([9, 3, 4, 7, 8], 3, "prompt")
    fitted = fit_example(list(range(10, 30)), [7], 9)  # the instruction's start and the prompt's end stay
    assert (fitted.ids, fitted.n_prompt) == ([10, 11, 12, 13, 26, 27, 28, 29, 7], 8)
    fitted = fit_example([9, 1, 2], [5, 6, 7, 8, 10, 11], 4, keep_first=True)
    assert (fitted.ids, fitted.n_prompt, fitted.cut) == ([2, 5, 6, 7], 1, "response")


def test_long_examples_are_truncated_and_counted_never_a_crash(tokenizer_file, caplog):
    long_text = " ".join("abcdefghijklmnopqrstuvwxyz" * 4)
    examples = [
        Example((Turn("say hello", "hi"),)),
        Example((Turn(long_text, "paris"),)),
        Example((Turn("say hello", long_text),)),
    ]
    enc = encoder(tokenizer_file, max_length=24)
    with caplog.at_level(logging.WARNING, logger="fedlora.data"):
        data = encode_instructions(examples, enc)
    assert (
        "2 of 3 examples truncated to max_length 24 (1 lost the middle of the prompt, 1 the end of the response)"
        in caplog.text
    )
    assert data.input_ids.shape == (3, 24) and data.attention_mask[1:].sum(axis=1).tolist() == [24, 24]
    assert data.input_ids[1, 0] == BOS and learned(data, 1) == enc.response_ids(["paris"])[0]
    assert len(learned(data, 2)) == 23  # everything after the one prompt token kept


def test_bucketing_cuts_padding_and_keeps_every_example_once(tokenizer_file):
    rng = np.random.default_rng(0)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    examples = [
        Example((Turn(" ".join(rng.choice(letters, size=int(n))), "paris"),)) for n in rng.integers(1, 50, size=96)
    ]
    enc = encoder(tokenizer_file)
    bucketed = encode_instructions(examples, enc, bucket_batches=2)
    plain = EncodedDataset(bucketed.input_ids, bucketed.attention_mask, bucketed.labels)

    def padded_tokens(data: EncodedDataset) -> int:
        return sum(b.input_ids.size - int(b.attention_mask.sum()) for b in data.batches(8, np.random.default_rng(1)))

    assert padded_tokens(bucketed) * 3 < padded_tokens(plain)
    order = np.concatenate(bucketed.batch_indices(8, np.random.default_rng(1)))
    assert sorted(order.tolist()) == list(range(96))
    again = np.concatenate(bucketed.batch_indices(8, np.random.default_rng(1)))
    other = np.concatenate(bucketed.batch_indices(8, np.random.default_rng(2)))
    assert (order == again).all() and not (order == other).all()
    assert bucketed.subset(np.arange(10)).bucket_batches == 2
    assert sum(len(b.labels) for b in bucketed.sample_batches(8, 30, np.random.default_rng(3))) == 30 * 8


# -- a device's data file, without a real model --------------------------------------------
@pytest.fixture
def fake_bundle(tmp_path, tokenizer_file):
    """A bundle folder whose artifacts are placeholders (never loaded: data only)."""

    def make(**extra) -> Bundle:
        root = tmp_path / "bundle"
        (root / "tokenizer").mkdir(parents=True, exist_ok=True)
        (root / "tokenizer" / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
        data = manifest(**extra).to_json()
        data["max_length"] = 48
        data["files"] = {
            name: hashlib.sha256(name.encode()).hexdigest() for name in REQUIRED_FILES + ("tokenizer/tokenizer.json",)
        }
        (root / "manifest.json").write_text(json.dumps(data))
        return Bundle(root, verify=False)

    return make


def test_load_local_data_reads_each_format_for_a_causal_lm(tmp_path, fake_bundle):
    from edge_client.device import DeviceConfig, load_local_data

    files = {
        "alpaca": write_jsonl(tmp_path / "a.jsonl", [{"instruction": "say hello", "output": "hi there"}] * 10),
        "chat": write_jsonl(tmp_path / "c.jsonl", [_chat(("user", "say hello"), ("assistant", "hi"))] * 10),
        "classification": write_jsonl(tmp_path / "l.jsonl", [{"text": "new phone", "label": "tech"}] * 10),
        "plain": write_jsonl(tmp_path / "p.jsonl", [{"text": "say hello to paris"}] * 10),
    }
    bundle = fake_bundle(labels=("sport", "tech"), bos_token_id=BOS, eos_token_id=EOS, add_bos_token=False)
    for name, path in files.items():
        cfg = DeviceConfig(device_id="d1", bundle=bundle.root, data=path, eval_fraction=0.2)
        local = load_local_data(cfg, bundle)
        assert len(local.train) == 8 and local.test is not None and len(local.test) == 2, name
        assert local.train.bucket_batches > 0
        n = int(local.train.attention_mask[0].sum())
        kept = local.train.labels[0][local.train.labels[0] != IGNORE_INDEX]
        if name == "plain":
            assert len(kept) == n - 1  # every next token
        else:
            assert 0 < len(kept) < n - 1
        if name == "classification":
            assert kept.tolist() == [ids_of(bundle.path("tokenizer/tokenizer.json"), "tech"), EOS]


def test_load_local_data_refuses_bad_instruction_data_with_the_line(tmp_path, fake_bundle):
    from edge_client.device import DeviceConfig, load_local_data

    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "say hello", "output": "hi"}, {"instruction": "x"}])
    bundle = fake_bundle()
    with pytest.raises(DataError, match=f"{path}:2: no field 'output'"):
        load_local_data(DeviceConfig(device_id="d1", bundle=bundle.root, data=path), bundle)
    words = write_jsonl(tmp_path / "l.jsonl", [{"text": "x", "label": "a"}])
    with pytest.raises(DataError, match="are the same answer once normalized"):
        load_local_data(DeviceConfig(device_id="d1", bundle=bundle.root, data=words), fake_bundle(labels=("a", "A")))


# -- on a real tiny Llama bundle -----------------------------------------------------------
@pytest.fixture(scope="module")
def llama(tiny_llama_dir, tmp_path_factory):
    from edge_client.runtime import Trainer
    from export.config import ExportConfig
    from export.exporter import export

    out = tmp_path_factory.mktemp("llama-bundle")
    (bundle_dir,) = export(
        ExportConfig(model_dir=tiny_llama_dir, output_dir=out, ranks=(2,), max_length=32, measure=False)
    )
    return Trainer(Bundle(bundle_dir))


def logits_of(trainer, ids: list[int]) -> np.ndarray:
    arr = np.array([ids], dtype=np.int64)
    _, logits = trainer.eval_batch(Batch(arr, np.ones_like(arr), np.zeros_like(arr)))  # every position labeled
    return np.asarray(logits).reshape(len(ids), -1)


def log_probs(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def test_greedy_generation_is_the_argmax_of_the_eval_graph_step_by_step(llama):
    from edge_client.generate import generate_greedy

    prompts = [[2, 4, 5, 6], [2, 7], [2, 8, 9, 10, 11, 12, 13]]
    by_hand = []
    for prompt in prompts:
        seq = list(prompt)
        for _ in range(5):
            seq.append(int(logits_of(llama, seq)[-1].argmax()))
        by_hand.append(seq[len(prompt) :])
    assert generate_greedy(llama, prompts, 5, eos_id=None, batch_size=2) == by_hand  # right padding is harmless
    assert generate_greedy(llama, prompts[:1], 5, eos_id=by_hand[0][0]) == [[]]  # stops before EOS
    stop = by_hand[0][2]
    expected = by_hand[0][: by_hand[0].index(stop)]
    assert generate_greedy(llama, prompts[:1], 5, eos_id=stop) == [expected]
    with pytest.raises(DataError, match="empty prompt"):
        generate_greedy(llama, [[]], 3, None)


def test_label_scores_are_the_summed_log_probabilities_of_the_label_tokens(llama):
    from edge_client.generate import label_scores

    prompts = [[2, 4, 5, 6], [2, 7, 8]]
    labels = [[9, 3], [10, 11, 3], [9, 12, 3]]  # two share their first token: the full path
    scores = label_scores(llama, prompts, labels, batch_size=4)
    by_hand = np.zeros_like(scores)
    for p, prompt in enumerate(prompts):
        for j, label in enumerate(labels):
            lp = log_probs(logits_of(llama, prompt + label))
            by_hand[p, j] = sum(lp[len(prompt) - 1 + k, token] for k, token in enumerate(label))
    np.testing.assert_allclose(scores, by_hand, atol=1e-4)
    assert (scores.argmax(axis=1) == by_hand.argmax(axis=1)).all()
    # every first token differs: one pass per prompt, the first token's log-probability decides
    distinct = [[9, 3], [10, 11, 3], [12, 3]]
    fast = label_scores(llama, prompts, distinct)
    full = label_scores(llama, prompts, distinct, first_token=False)
    for p, prompt in enumerate(prompts):
        first = log_probs(logits_of(llama, prompt))[-1]
        np.testing.assert_allclose(fast[p], [first[9], first[10], first[12]], atol=1e-4)
    np.testing.assert_allclose(full[:, 0], scores[:, 0], atol=1e-5)


def test_training_on_instruction_data_lowers_the_response_loss(llama, tmp_path):
    from edge_client.instruct import encode_causal_lm_file

    path = write_jsonl(
        tmp_path / "a.jsonl",
        [
            {"instruction": "the device trains an adapter", "output": "on local data"},
            {"instruction": "the device sends its update", "input": "to", "output": "the aggregator"},
            {"messages": [{"role": "user", "content": "a device"}, {"role": "assistant", "content": "trains"}]},
        ],
    )
    data = encode_causal_lm_file(path, llama.bundle)
    (batch,) = data.batches(8)
    before = llama.get_adapter()
    try:
        llama.set_learning_rate(0.05)
        losses = [llama.train_step(batch) for _ in range(10)]
        assert all(math.isfinite(x) for x in losses)
        assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.2
        result = llama.evaluate(data)
        assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
        # a batch with nothing to predict adds nothing (and costs no forward pass)
        blank = np.full_like(data.labels[:1], IGNORE_INDEX)
        padded = EncodedDataset(
            np.concatenate([data.input_ids[:1], data.input_ids]),
            np.concatenate([data.attention_mask[:1], data.attention_mask]),
            np.concatenate([blank, data.labels]),
        )
        assert llama.evaluate(padded, batch_size=1)["loss"] == pytest.approx(llama.evaluate(data, batch_size=1)["loss"])
    finally:
        llama.set_adapter(before)


def test_evaluate_instructions_reports_loss_label_and_answer_accuracy(llama):
    from edge_client.generate import evaluate_instructions

    words = ("device", "adapter", "aggregator")
    examples = labeled_to_instructions(
        [
            Record("the device trains", "device"),
            Record("an adapter", "adapter"),
            Record("sends its update to the", "aggregator"),
        ],
        words,
    )
    result = evaluate_instructions(llama, examples, label_words=words, max_new_tokens=3, samples=2)
    assert math.isfinite(result.loss) and result.perplexity == pytest.approx(math.exp(result.loss))
    assert result.label_accuracy in (0.0, 1 / 3, 2 / 3, 1.0) and result.answer_accuracy in (0.0, 1 / 3, 2 / 3, 1.0)
    assert [s.expected for s in result.samples] == ["device", "adapter"]
    assert result.samples[0].prompt.startswith("### Instruction:\nClassify the text")
    assert set(result.metrics()) == {
        "loss",
        "perplexity",
        "token_accuracy",
        "examples",
        "label_accuracy",
        "answer_accuracy",
    }
    no_gen = evaluate_instructions(llama, examples, max_new_tokens=0)
    assert no_gen.answer_accuracy is None and no_gen.label_accuracy is None and no_gen.loss == result.loss
    with pytest.raises(DataError, match="answers not among the label words"):
        evaluate_instructions(llama, examples, label_words=("device", "adapter"), max_new_tokens=0)
