"""Instruction data for a causal LM on the device: read it, render it, encode it.

Three kinds of file become instruction examples (``docs/instruct.md``):

- Alpaca-style rows: ``instruction`` (+ optional ``input``, optional ``system``) and ``output``;
- chats: ``messages``, a list of ``{"role": "system"|"user"|"assistant", "content": ...}``
  ending with the assistant's message;
- classification as instruction: any text + label file, with the bundle's label words, becomes
  "Classify the text into one of these categories: ..." with the label word as the answer.

An example is rendered into a prompt and a response with the model's chat template (the
manifest's ``chat_format``), or without one in the Alpaca layout (``### Instruction:`` ...
``### Response:``, the response followed by EOS). In a multi-turn chat only the **last**
assistant message is the response: earlier turns are part of the prompt, seen but not trained
on. The loss covers the response tokens only: ``labels[t] = ids[t + 1]`` where ``t + 1`` is a
response token, else -100. An example longer than ``max_length`` loses the middle of its
prompt (its start, with the instruction, and its end, with the assistant prefix, stay); if the
response alone does not fit, its end is cut. Either is counted and logged once, never fatal.

Pure stdlib + numpy + ``tokenizers``, so it runs on the device.
"""

from __future__ import annotations

import enum
import json
import logging
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.bundle import Bundle, Manifest
from core.errors import BundleError, DataError
from edge_client.data import (
    IGNORE_INDEX,
    EncodedDataset,
    Record,
    TextEncoder,
    encode_causal_lm,
    read_records,
    read_rows,
)

log = logging.getLogger("fedlora.data")

ROLES = ("system", "user", "assistant")
SLOTS = ROLES
# Batches drawn from buckets of this many batches' worth of similar-length examples.
BUCKET_BATCHES = 4


# -- examples ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Turn:
    """One user message and the assistant's answer. ``context`` is Alpaca's ``input``: under a
    chat template it follows the instruction after a blank line, in the Alpaca layout it gets
    its own ``### Input:`` section."""

    user: str
    assistant: str
    context: str = ""


@dataclass(frozen=True)
class Example:
    """A conversation whose last assistant message is the response to learn."""

    turns: tuple[Turn, ...]
    system: str = ""
    where: str = ""  # file:line, for messages

    @property
    def answer(self) -> str:
        return self.turns[-1].assistant


class DataFormat(enum.Enum):
    """What a causal-LM device's data file holds (``detect_format``)."""

    CHAT = "chat"
    ALPACA = "alpaca"
    CLASSIFICATION = "classification"
    PLAIN = "plain"


def detect_format(
    row: dict, text_column: str = "text", label_column: str | None = "label", label_words: Sequence[str] = ()
) -> DataFormat:
    """A file's format from its first row: ``messages`` -> chat; ``instruction`` or ``output``
    -> Alpaca; text and label columns with label words in the bundle -> classification as
    instruction; a text column -> plain language modelling. Anything else: DataError."""
    if "messages" in row:
        return DataFormat.CHAT
    if "instruction" in row or "output" in row:
        return DataFormat.ALPACA
    if text_column in row and label_column is not None and label_column in row and label_words:
        return DataFormat.CLASSIFICATION
    if text_column in row:
        return DataFormat.PLAIN
    raise DataError(
        f"rows have neither 'messages', 'instruction' + 'output', nor a {text_column!r} column "
        f"(columns: {', '.join(map(str, row)) or 'none'})"
    )


def read_instruction_examples(path: str | Path) -> list[Example]:
    """Alpaca rows and chats (each row by its own fields) from a .jsonl/.json/.csv/.tsv file.

    Raises DataError naming the file, the line and what is wrong: a missing or empty field, a
    field that is not text, an unknown role, a chat not ending with the assistant's message.
    """
    path = Path(path)
    examples = []
    for line_no, row in read_rows(path):
        where = f"{path}:{line_no}"
        if "messages" in row:
            examples.append(chat_example(row, where))
        elif "instruction" in row or "output" in row:
            examples.append(alpaca_example(row, where))
        else:
            raise DataError(
                f"{where}: neither 'messages' nor 'instruction' + 'output' "
                f"(fields: {', '.join(map(str, row)) or 'none'})"
            )
    return examples


def _text_field(row: dict, name: str, where: str, required: bool = True) -> str:
    value = row.get(name)
    if value is None:
        if required:
            raise DataError(f"{where}: no field {name!r} (fields: {', '.join(map(str, row)) or 'none'})")
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} is not text ({type(value).__name__})")
    if required and not value.strip():
        raise DataError(f"{where}: field {name!r} is empty")
    return value


def alpaca_example(row: dict, where: str) -> Example:
    """``instruction`` and ``output`` (required, non-empty), ``input`` and ``system`` (optional)."""
    turn = Turn(
        user=_text_field(row, "instruction", where),
        assistant=_text_field(row, "output", where),
        context=_text_field(row, "input", where, required=False),
    )
    return Example((turn,), system=_text_field(row, "system", where, required=False), where=where)


def chat_example(row: dict, where: str) -> Example:
    """``messages``: an optional system message first, then user and assistant in turn, ending
    with the assistant's (a JSON string in a CSV cell is parsed)."""
    messages = row["messages"]
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: field 'messages' is not valid JSON ({exc.msg})") from exc
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    parsed = [_message(m, i, where) for i, m in enumerate(messages, start=1)]
    system = ""
    if parsed[0][0] == "system":
        system = parsed.pop(0)[1]
    if not parsed:
        raise DataError(f"{where}: the chat has a system message only; it needs a user and an assistant message")
    for i, (role, _) in enumerate(parsed):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            number = i + 1 + (1 if system else 0)
            detail = "a system message may only come first" if role == "system" else f"expected {expected!r} here"
            raise DataError(
                f"{where}: message {number} has role {role!r}: {detail} "
                "(a chat is [system], user, assistant, user, assistant, ...)"
            )
    if parsed[-1][0] != "assistant":
        raise DataError(
            f"{where}: the last message must be the assistant's (the response to learn), not the {parsed[-1][0]}'s"
        )
    turns = tuple(Turn(user=parsed[i][1], assistant=parsed[i + 1][1]) for i in range(0, len(parsed), 2))
    return Example(turns, system=system, where=where)


def _message(message: object, number: int, where: str) -> tuple[str, str]:
    if not isinstance(message, dict):
        raise DataError(f"{where}: message {number} is not an object with 'role' and 'content'")
    for name in ("role", "content"):
        if name not in message:
            raise DataError(f"{where}: message {number} has no {name!r}")
    role, content = message["role"], message["content"]
    if role not in ROLES:
        raise DataError(f"{where}: message {number} has unknown role {role!r} (known: {', '.join(ROLES)})")
    if not isinstance(content, str):
        raise DataError(f"{where}: message {number} ({role}): content is not text ({type(content).__name__})")
    if not content.strip():
        raise DataError(f"{where}: message {number} ({role}): content is empty")
    return role, content


# -- classification as instruction ---------------------------------------------------------
def normalize_answer(text: str) -> str:
    """How answers are compared: the first non-empty line, lowercased, without punctuation,
    whitespace collapsed."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    first = lines[0].lower() if lines else ""
    kept = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in first)
    return " ".join(kept.split())


def check_label_words(label_words: Sequence[str]) -> tuple[str, ...]:
    """The label words, if each is a single answer: non-empty, one line, no surrounding spaces,
    and distinct from the others after ``normalize_answer``. Else DataError."""
    seen: dict[str, str] = {}
    for word in label_words:
        if not isinstance(word, str) or not word.strip():
            raise DataError(f"label word {word!r} is empty: each label needs a word to answer with")
        if "\n" in word or "\r" in word:
            raise DataError(f"label word {word!r} spans several lines; an answer is one line")
        if word != word.strip():
            raise DataError(f"label word {word!r} has leading or trailing whitespace")
        key = normalize_answer(word)
        if not key:
            raise DataError(f"label word {word!r} has no letters or digits, so no answer can match it")
        if key in seen:
            raise DataError(f"label words {seen[key]!r} and {word!r} are the same answer once normalized ({key!r})")
        seen[key] = word
    return tuple(label_words)


def classification_instruction(label_words: Sequence[str]) -> str:
    return f"Classify the text into one of these categories: {', '.join(label_words)}. Answer with the category only."


def labeled_to_instructions(records: Sequence[Record], label_words: Sequence[str], where: str = "") -> list[Example]:
    """Each labeled record as an instruction naming the label words, the text as its input and
    the label word as the answer. Labels must be among ``label_words`` (checked by
    ``check_label_words``)."""
    words = check_label_words(label_words)
    if not words:
        raise DataError("classification as instruction needs label words (the bundle's labels are empty)")
    unknown = sorted({str(r.label) for r in records if r.label not in words})
    if unknown:
        raise DataError(f"{where or 'data'}: labels not among the label words {list(words)}: {unknown[:5]}")
    instruction = classification_instruction(words)
    return [
        Example(
            (Turn(user=instruction, assistant=str(r.label), context=r.text),),
            where=f"{where} record {i}" if where else f"record {i}",
        )
        for i, r in enumerate(records, start=1)
    ]


# -- chat format ---------------------------------------------------------------------------
Parts = tuple[tuple[str, str], ...]


def _parts(value: object, name: str, where: str) -> Parts:
    if not isinstance(value, list):
        raise BundleError(f"{where}: chat_format.{name} must be a list of [kind, value] pairs")
    parts = []
    for part in value:
        if not (isinstance(part, (list, tuple)) and len(part) == 2 and all(isinstance(x, str) for x in part)):
            raise BundleError(f"{where}: chat_format.{name} has a malformed part {part!r}")
        kind, text = part
        if kind not in ("text", "slot") or (kind == "slot" and text not in SLOTS):
            raise BundleError(
                f"{where}: chat_format.{name} has an unknown part {part!r} "
                f"(kinds: text, slot; slots: {', '.join(SLOTS)})"
            )
        parts.append((kind, text))
    return tuple(parts)


@dataclass(frozen=True)
class ChatFormat:
    """How a conversation becomes text: the manifest's ``chat_format`` parts, or ``alpaca()``.

    ``prompt``: the first turn with a system message, through the assistant prefix;
    ``prompt_no_system``: the same without one; ``turn``: a later user turn through the
    assistant prefix; ``response``: the assistant's content through its end of turn.
    ``append_eos``: the response is followed by the EOS token (the template has no end of turn).
    ``input_separator`` joins an Alpaca ``input`` to its instruction in the user slot.
    """

    prompt: Parts
    prompt_no_system: Parts
    turn: Parts
    response: Parts
    append_eos: bool = False
    input_separator: str = "\n\n"
    template: bool = True  # False: the Alpaca fallback

    @classmethod
    def from_manifest(cls, manifest: Manifest, where: str = "manifest") -> ChatFormat:
        """The model's chat template, or the Alpaca layout when the model has none."""
        spec = manifest.extra.get("chat_format")
        if spec is None:
            return cls.alpaca()
        if not isinstance(spec, dict):
            raise BundleError(f"{where}: chat_format must be an object with prompt, prompt_no_system, turn, response")
        missing = [k for k in ("prompt", "prompt_no_system", "turn", "response") if k not in spec]
        if missing:
            raise BundleError(f"{where}: chat_format lacks {', '.join(missing)}")
        fmt = cls(
            prompt=_parts(spec["prompt"], "prompt", where),
            prompt_no_system=_parts(spec["prompt_no_system"], "prompt_no_system", where),
            turn=_parts(spec["turn"], "turn", where),
            response=_parts(spec["response"], "response", where),
        )
        for name, slot in (
            ("prompt", "user"),
            ("prompt_no_system", "user"),
            ("turn", "user"),
            ("response", "assistant"),
        ):
            if ("slot", slot) not in getattr(fmt, name):
                raise BundleError(f"{where}: chat_format.{name} has no {slot} slot")
        return fmt

    @classmethod
    def alpaca(cls) -> ChatFormat:
        """The fallback for a model without a chat template."""
        instruction = (("text", "### Instruction:\n"), ("slot", "user"), ("text", "\n\n### Response:\n"))
        return cls(
            prompt=(("slot", "system"), ("text", "\n\n")) + instruction,
            prompt_no_system=instruction,
            turn=(("text", "\n\n"),) + instruction,
            response=(("slot", "assistant"),),
            append_eos=True,
            input_separator="\n\n### Input:\n",
            template=False,
        )

    def _user(self, turn: Turn) -> str:
        return f"{turn.user}{self.input_separator}{turn.context}" if turn.context else turn.user

    def render_prompt(self, example: Example) -> str:
        """Everything before the last assistant message, through its assistant prefix."""
        first = example.turns[0]
        user = self._user(first)
        if example.system and ("slot", "system") in self.prompt:
            text = _fill(self.prompt, system=example.system, user=user)
        else:  # a template without a system slot: the system message leads the first user message
            user = f"{example.system}\n\n{user}" if example.system else user
            text = _fill(self.prompt_no_system, user=user)
        for previous, turn in zip(example.turns, example.turns[1:]):
            text += _fill(self.response, assistant=previous.assistant) + _fill(self.turn, user=self._user(turn))
        return text

    def render_response(self, answer: str) -> str:
        """The assistant's answer through its end of turn (EOS, if ``append_eos``, is an id)."""
        return _fill(self.response, assistant=answer)

    def render(self, example: Example) -> tuple[str, str]:
        """(prompt text, response text) of ``example``."""
        return self.render_prompt(example), self.render_response(example.answer)


def _fill(parts: Parts, **slots: str) -> str:
    return "".join(value if kind == "text" else slots.get(value, "") for kind, value in parts)


# -- tokens --------------------------------------------------------------------------------
@dataclass(frozen=True)
class SpecialTokens:
    """BOS and EOS ids (EOS: the end of turn for chat models) and whether the tokenizer's own
    post-processor adds BOS."""

    bos_id: int | None
    eos_id: int | None
    add_bos: bool

    @classmethod
    def from_bundle(cls, manifest: Manifest, tokenizer, tokenizer_file: Path) -> SpecialTokens:
        """From the manifest (``bos_token_id``, ``eos_token_id``, ``add_bos_token``); a bundle
        exported before those existed: from ``tokenizer_config.json`` beside ``tokenizer.json``
        and from what the tokenizer does."""
        extra = manifest.extra
        config = _tokenizer_config(tokenizer_file.parent / "tokenizer_config.json")
        bos = extra["bos_token_id"] if "bos_token_id" in extra else _token_id(tokenizer, config.get("bos_token"))
        eos = extra["eos_token_id"] if "eos_token_id" in extra else _token_id(tokenizer, config.get("eos_token"))
        if "add_bos_token" in extra:
            add_bos = bool(extra["add_bos_token"])
        else:
            probe = tokenizer.encode("a", add_special_tokens=True).ids
            add_bos = bos is not None and bool(probe) and probe[0] == bos
        return cls(None if bos is None else int(bos), None if eos is None else int(eos), add_bos)


def _tokenizer_config(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _token_id(tokenizer, token: object) -> int | None:
    if isinstance(token, dict):  # {"content": "<s>", ...}
        token = token.get("content")
    return tokenizer.token_to_id(token) if isinstance(token, str) else None


@dataclass(frozen=True)
class Fitted:
    """One example's ids within ``max_length``: prompt then response, and what was cut."""

    ids: list[int]
    n_prompt: int
    cut: str = ""  # "", "prompt" or "response"


def fit_example(prompt: Sequence[int], response: Sequence[int], max_length: int, keep_first: bool = False) -> Fitted:
    """Prompt + response in at most ``max_length`` tokens: the response whole if it fits with at
    least one prompt token before it (else its end is cut), and of the prompt its middle is cut:
    the first and the last halves of the room are kept. Its beginning holds the system prompt
    and the instruction (for classification as instruction, the label words), its end the
    assistant prefix the answer follows; a long input text loses its end. ``keep_first`` (a
    BOS): kept whenever two or more prompt tokens fit, as the head always is."""
    prompt, response = list(prompt), list(response)
    if len(prompt) + len(response) <= max_length:
        return Fitted(prompt + response, len(prompt))
    cut = "prompt"
    room = max_length - min(len(prompt), 1)
    if len(response) > room:
        response, cut = response[:room], "response"
    keep = max_length - len(response)
    head = keep // 2 if keep >= 2 or not keep_first else 0
    kept = prompt[:head] + prompt[len(prompt) - (keep - head) :] if keep else []
    return Fitted(kept + response, len(kept), cut)


class InstructionEncoder:
    """Renders examples with a chat format and tokenizes them with the bundle's tokenizer.

    Prompt and response are tokenized apart, without the tokenizer's special tokens; BOS
    starts the prompt in the Alpaca layout whenever the model has one, and under a chat
    template when the tokenizer itself adds BOS and the template did not already put it there
    (so never twice); EOS follows the response when the format has no end of turn.
    """

    def __init__(
        self,
        tokenizer_file: str | Path,
        max_length: int,
        pad_token_id: int,
        chat_format: ChatFormat,
        specials: SpecialTokens,
    ):
        from tokenizers import Tokenizer

        if max_length < 2:
            raise DataError(f"max_length must be >= 2 for instruction data, got {max_length}")
        self.max_length = max_length
        self.pad_token_id = pad_token_id
        self.chat_format = chat_format
        self.specials = specials
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()

    @classmethod
    def from_bundle(cls, bundle: Bundle, chat_format: ChatFormat | None = None) -> InstructionEncoder:
        from tokenizers import Tokenizer

        m = bundle.manifest
        tokenizer_file = bundle.path(m.tokenizer)
        chat_format = chat_format or ChatFormat.from_manifest(m, where=str(bundle.root))
        specials = SpecialTokens.from_bundle(m, Tokenizer.from_file(str(tokenizer_file)), tokenizer_file)
        return cls(tokenizer_file, m.max_length, m.pad_token_id, chat_format, specials)

    @property
    def starts_with_bos(self) -> bool:
        """Whether the first token of a prompt is a BOS this encoder put there (kept when cut)."""
        return self.specials.bos_id is not None and (self.specials.add_bos or not self.chat_format.template)

    def _tokens(self, texts: Sequence[str]) -> list[list[int]]:
        return [enc.ids for enc in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def prompt_ids(self, examples: Sequence[Example]) -> list[list[int]]:
        """Each example's prompt, untruncated."""
        bos = self.specials.bos_id
        prompts = self._tokens([self.chat_format.render_prompt(e) for e in examples])
        if bos is None or not self.starts_with_bos:
            return prompts
        return [ids if ids[:1] == [bos] else [bos] + ids for ids in prompts]

    def response_ids(self, answers: Sequence[str]) -> list[list[int]]:
        """Each answer as the response tokens the model learns (end of turn or EOS included)."""
        eos = [self.specials.eos_id] if self.chat_format.append_eos and self.specials.eos_id is not None else []
        return [ids + eos for ids in self._tokens([self.chat_format.render_response(a) for a in answers])]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def fit(self, prompt: Sequence[int], response: Sequence[int]) -> Fitted:
        return fit_example(prompt, response, self.max_length, keep_first=self.starts_with_bos)

    def fit_prompt(self, prompt: Sequence[int], room: int) -> list[int]:
        """A prompt cut in its middle (``fit_example``) to at most ``room`` tokens, leaving the
        rest of ``max_length`` to an answer."""
        return fit_example(prompt, [], room, keep_first=self.starts_with_bos).ids


def encode_instructions(
    examples: Sequence[Example], encoder: InstructionEncoder, bucket_batches: int = BUCKET_BATCHES
) -> EncodedDataset:
    """Ids, mask and response-only next-token labels, bucketed by length.

    Examples longer than ``max_length`` are fitted (``fit_example``), counted and logged once.
    """
    if not examples:
        raise DataError("no instruction examples to encode")
    prompts = encoder.prompt_ids(examples)
    responses = encoder.response_ids([e.answer for e in examples])
    n, width = len(examples), encoder.max_length
    ids = np.full((n, width), encoder.pad_token_id, dtype=np.int64)
    mask = np.zeros((n, width), dtype=np.int64)
    labels = np.full((n, width), IGNORE_INDEX, dtype=np.int64)
    cut = {"prompt": 0, "response": 0}
    for row, (example, prompt, response) in enumerate(zip(examples, prompts, responses)):
        if not response:
            raise DataError(f"{example.where or 'an example'}: the response tokenizes to nothing")
        fitted = encoder.fit(prompt, response)
        if fitted.cut:
            cut[fitted.cut] += 1
        length = len(fitted.ids)
        ids[row, :length] = fitted.ids
        mask[row, :length] = 1
        # labels[t] predicts ids[t + 1]; only response tokens (t + 1 >= n_prompt) are learned.
        start = max(fitted.n_prompt - 1, 0)
        labels[row, start : length - 1] = fitted.ids[start + 1 : length]
    truncated = cut["prompt"] + cut["response"]
    if truncated:
        log.warning(
            "%d of %d examples truncated to max_length %d (%d lost the middle of the prompt, "
            "%d the end of the response)",
            truncated,
            n,
            width,
            cut["prompt"],
            cut["response"],
        )
    return EncodedDataset(ids, mask, labels, bucket_batches=bucket_batches)


# -- a device's data file ------------------------------------------------------------------
def detect_file_format(
    path: str | Path, label_words: Sequence[str] = (), text_column: str = "text", label_column: str | None = "label"
) -> DataFormat:
    """``detect_format`` of a data file's first row; DataError naming the file and line."""
    path = Path(path)
    line_no, first = read_rows(path)[0]
    try:
        return detect_format(first, text_column, label_column, label_words)
    except DataError as exc:
        raise DataError(f"{path}:{line_no}: {exc}") from None


def read_format_examples(
    path: str | Path,
    fmt: DataFormat,
    label_words: Sequence[str] = (),
    text_column: str = "text",
    label_column: str | None = "label",
) -> list[Example]:
    """The instruction examples of a file in ``fmt`` (chat, Alpaca or classification)."""
    if fmt is DataFormat.PLAIN:
        raise DataError(f"{path}: plain text is not instruction data")
    if fmt is DataFormat.CLASSIFICATION:
        if label_column is None:
            raise DataError(f"{path}: classification as instruction needs a label column")
        return labeled_to_instructions(read_records(path, text_column, label_column), label_words, str(path))
    return read_instruction_examples(path)


def encode_causal_lm_file(
    path: str | Path, bundle: Bundle, text_column: str = "text", label_column: str | None = "label"
) -> EncodedDataset:
    """A causal-LM device's data file, encoded for training and evaluation and bucketed by
    length: instruction data with response-only labels, or plain text for language modelling."""
    m = bundle.manifest
    fmt = detect_file_format(path, m.labels, text_column, label_column)
    if fmt is DataFormat.PLAIN:
        records = read_records(path, text_column, None)
        log.info("%s: %d texts, plain language modelling", path, len(records))
        plain = encode_causal_lm(records, TextEncoder(bundle.path(m.tokenizer), m.max_length, m.pad_token_id))
        return EncodedDataset(plain.input_ids, plain.attention_mask, plain.labels, bucket_batches=BUCKET_BATCHES)
    examples = read_format_examples(path, fmt, m.labels, text_column, label_column)
    encoder = InstructionEncoder.from_bundle(bundle)
    log.info(
        "%s: %d examples, %s%s",
        path,
        len(examples),
        fmt.value,
        "" if encoder.chat_format.template else " (the model has no chat template: Alpaca layout)",
    )
    return encode_instructions(examples, encoder)
