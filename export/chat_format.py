"""A model's chat template as literal text and slots, for devices that have no template engine.

A chat template is a Jinja program (in ``tokenizer_config.json``, ``chat_template.jinja`` or a
GGUF's ``tokenizer.chat_template``); a device has neither transformers nor jinja2. On the build
host the template is rendered with sentinel contents, and the renders are cut at the sentinels
into parts: ``["text", literal]`` or ``["slot", "system" | "user" | "assistant"]``.

``chat_format`` (the manifest's field of that name):

    prompt            the first turn with a system message, through the assistant prefix
    prompt_no_system  the first turn without one (a template may add its default system prompt)
    turn              a later user turn, through the assistant prefix
    response          from the assistant's content through its end of turn

so that a conversation is ``prompt + response + turn + response + ...`` with the slots filled.
That holds only for a template that renders a conversation as the concatenation of its turns
(prefix-consistent); ``derive_chat_format`` checks it on several conversations with real text
and returns None, with the reason, for a template where it does not hold. A template that
refuses system messages (Gemma's) gets the system text before the first user message, as the
Gemma 3 template does itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

Render = Callable[[list[dict], bool], str]  # (messages, add_generation_prompt) -> text
SLOTS = ("system", "user", "assistant")
# Sentinels: letters and digits only, so templates that trim or escape content keep them whole.
_SENTINEL = "FEDLORASLOT{}{}Q"
# What a device's formatting is checked against: real text, with newlines and punctuation inside.
_CHECK_SYSTEM = "You are a careful assistant.\nAnswer briefly."
_CHECK_USERS = ["What is 2 + 2?", "And 3 + 3?\nThanks.", "Name a colour."]
_CHECK_ASSISTANTS = ["It is 4.", "6.\nYou are welcome.", "Blue."]
SYSTEM_JOIN = "\n\n"


class ChatFormatError(ValueError):
    """The template's renders cannot be cut into turns (not prefix-consistent, or it failed)."""


@dataclass
class ChatFormat:
    prompt: list[list[str]]
    prompt_no_system: list[list[str]]
    turn: list[list[str]]
    response: list[list[str]]
    system_in_user: bool = False  # the template refused system messages: the system text leads the first user turn

    def to_json(self) -> dict:
        return {
            "prompt": self.prompt,
            "prompt_no_system": self.prompt_no_system,
            "turn": self.turn,
            "response": self.response,
        }


def fill(parts: list[list[str]], values: dict[str, str]) -> str:
    """The text of ``parts`` with each slot replaced by ``values[slot]``: what a device does."""
    return "".join(value if kind == "text" else values[value] for kind, value in parts)


def format_conversation(fmt: ChatFormat, messages: list[dict], add_generation_prompt: bool) -> str:
    """A conversation (optional system message, then user/assistant alternating) through ``fmt``."""
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    rest = messages[1:] if system is not None else messages
    text = ""
    for i, message in enumerate(rest):
        if message["role"] == "user":
            if i == 0:
                text += (
                    fill(fmt.prompt, {"system": system, "user": message["content"]})
                    if system is not None
                    else fill(fmt.prompt_no_system, {"user": message["content"]})
                )
            else:
                text += fill(fmt.turn, {"user": message["content"]})
        else:
            text += fill(fmt.response, {"assistant": message["content"]})
    if not add_generation_prompt and rest and rest[-1]["role"] == "user":
        raise ValueError("a format renders a user turn only with its assistant prefix")
    return text


def _sentinel(role: str, i: int = 0) -> str:
    return _SENTINEL.format(role.upper(), i)


def split_at_sentinels(text: str, order: list[tuple[str, str]], where: str) -> list[list[str]]:
    """``text`` cut at each (slot, sentinel) of ``order``, which must occur once each and in order."""
    parts: list[list[str]] = []
    rest = text
    for slot, sentinel in order:
        if text.count(sentinel) != 1:
            raise ChatFormatError(
                f"{where}: the {slot} content appears {text.count(sentinel)} times in the render, not once"
            )
        before, _, rest = rest.partition(sentinel)
        if _SENTINEL.split("{")[0] in before:
            raise ChatFormatError(f"{where}: contents are rendered out of order")
        if before:
            parts.append(["text", before])
        parts.append(["slot", slot])
    if _SENTINEL.split("{")[0] in rest:
        raise ChatFormatError(f"{where}: the render holds a content twice")
    if rest:
        parts.append(["text", rest])
    return parts


def _after(prefix: str, text: str, what: str) -> str:
    if not text.startswith(prefix):
        raise ChatFormatError(f"not prefix-consistent: {what} does not begin with the render of the turns before it")
    return text[len(prefix) :]


def _messages(system: str | None, users: list[str], assistants: list[str], merge_system: bool) -> list[dict]:
    messages = []
    for i, user in enumerate(users):
        if i == 0 and system is not None:
            if merge_system:
                user = system + SYSTEM_JOIN + user
            else:
                messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": user})
        if i < len(assistants):
            messages.append({"role": "assistant", "content": assistants[i]})
    return messages


def _refuses_system(render: Render) -> bool:
    try:
        render(
            [{"role": "system", "content": _sentinel("system")}, {"role": "user", "content": _sentinel("user")}], True
        )
    except Exception:  # a template's raise_exception(...) or any error from its own checks
        try:
            render([{"role": "user", "content": _sentinel("user")}], True)
        except Exception as exc:
            raise ChatFormatError(f"the template fails on a one-message conversation: {exc}") from exc
        return True
    return False


def derive_chat_format(render: Render) -> ChatFormat:
    """The parts of a template, from renders with sentinel contents, checked against full renders
    of several conversations with real text. Raises ChatFormatError saying what did not hold."""
    merge = _refuses_system(render)
    s, u1, a1, u2 = _sentinel("system"), _sentinel("user", 1), _sentinel("assistant", 1), _sentinel("user", 2)

    def messages(system, users, assistants):
        return _messages(system, users, assistants, merge)

    try:
        first = render(messages(s, [u1], []), True)
        first_no_system = render(messages(None, [u1], []), True)
        answered = render(messages(s, [u1], [a1]), False)
        second = render(messages(s, [u1, u2], [a1]), True)
    except Exception as exc:
        raise ChatFormatError(f"the template fails on a simple conversation: {exc}") from exc
    fmt = ChatFormat(
        prompt=split_at_sentinels(first, [("system", s), ("user", u1)], "prompt"),
        prompt_no_system=split_at_sentinels(first_no_system, [("user", u1)], "prompt_no_system"),
        response=split_at_sentinels(
            _after(first, answered, "a conversation with an answer"), [("assistant", a1)], "response"
        ),
        turn=split_at_sentinels(_after(answered, second, "a second user turn"), [("user", u2)], "turn"),
        system_in_user=merge,
    )
    check_chat_format(fmt, render)
    return fmt


def check_chat_format(fmt: ChatFormat, render: Render) -> None:
    """Every conversation of the check set, formatted from the parts, equals the template's render."""
    system, users, assistants = _CHECK_SYSTEM, _CHECK_USERS, _CHECK_ASSISTANTS
    cases = []
    for with_system in (True, False):
        for turns in (1, 2, 3):
            for answered in (True, False):
                cases.append((with_system, users[:turns], assistants[:turns] if answered else assistants[: turns - 1]))
    for with_system, us, as_ in cases:
        sys_text = system if with_system else None
        merged = _messages(sys_text, us, as_, fmt.system_in_user)
        generation = len(as_) < len(us)
        try:
            expected = render(merged, generation)
        except Exception as exc:
            raise ChatFormatError(f"the template fails on a conversation of {len(us)} turns: {exc}") from exc
        plain = _messages(sys_text, us, as_, False)
        got = format_conversation(fmt, plain, generation)
        if got != expected:
            raise ChatFormatError(
                f"not prefix-consistent: a conversation of {len(us)} user turns ({'with' if with_system else 'no'} "
                f"system message, {'ending with the assistant prefix' if generation else 'answered'}) renders "
                f"{_first_difference(expected, got)}"
            )


def _first_difference(expected: str, got: str) -> str:
    i = next((k for k, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
    return f"{expected[max(0, i - 20) : i + 30]!r} where the turns give {got[max(0, i - 20) : i + 30]!r}"


def end_of_turn_id(tokenizer, fmt: ChatFormat) -> int | None:
    """The id of the special token that closes a response (``<|im_end|>``, ``<end_of_turn>``,
    ``<|eot_id|>``): the first special token of the response's closing text; the tokenizer's
    EOS when the closing text has none."""
    closing = fmt.response[-1][1] if fmt.response and fmt.response[-1][0] == "text" else ""
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    for token_id in tokenizer.encode(closing, add_special_tokens=False) if closing else ():
        if token_id in special:
            return int(token_id)
    return tokenizer.eos_token_id
