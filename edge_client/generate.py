"""Evaluating a generative model, torch-free: label scoring, greedy decoding, and both together
on instruction examples (``evaluate_instructions``).

Everything runs the bundle's eval graph through ``Trainer.eval_batch``, which returns the logits
of the positions a call labels, [labeled, vocabulary] (``logits_at``). There is no KV cache: each generated
token costs a forward pass over the whole sequence, fine for the short answers of label tasks.
Rows are right-padded: under a causal mask a token never sees the padding after it, so a
row's logits do not depend on the other rows of its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from core.errors import DataError
from edge_client.data import IGNORE_INDEX, Batch
from edge_client.instruct import (
    ChatFormat,
    Example,
    InstructionEncoder,
    check_label_words,
    encode_instructions,
    normalize_answer,
)
from edge_client.runtime import Trainer


def logits_at(trainer: Trainer, rows: Sequence[Sequence[int]], positions: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """For each of the right-padded ``rows``, the next-token logits at its ``positions``:
    one array [len(positions[i]), vocabulary] per row. The graph computes the output projection
    for these positions only (``Trainer.eval_batch``)."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), trainer.manifest.pad_token_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
        labels[i, sorted(set(positions[i]))] = 0  # any token id: it selects the position
    _, logits = trainer.eval_batch(Batch(ids, mask, labels))
    logits = np.asarray(logits, dtype=np.float32)
    out, start = [], 0
    for i in range(len(rows)):
        ordered = sorted(set(positions[i]))
        block = logits[start : start + len(ordered)]
        start += len(ordered)
        out.append(block[[ordered.index(p) for p in positions[i]]])
    return out


def last_logits(trainer: Trainer, rows: Sequence[Sequence[int]]) -> np.ndarray:
    """The next-token logits after each row's last token, [len(rows), vocabulary]."""
    return np.stack([block[0] for block in logits_at(trainer, rows, [[len(r) - 1] for r in rows])])


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _check_prompts(prompts_ids: Sequence[Sequence[int]]) -> None:
    if any(len(p) == 0 for p in prompts_ids):
        raise DataError("an empty prompt: a prompt needs at least one token to predict from")


def label_scores(
    trainer: Trainer,
    prompts_ids: Sequence[Sequence[int]],
    label_ids: Sequence[Sequence[int]],
    batch_size: int = 8,
    first_token: bool = True,
) -> np.ndarray:
    """Log-probability of each label after each prompt, [prompts, labels]; the best label is
    the row's argmax.

    ``label_ids``: each label word's response tokens (``InstructionEncoder.response_ids``: the
    word and its end of turn or EOS). A label's score is the sum of its tokens' log-probabilities
    after the prompt (one row per prompt and label). With ``first_token`` and every label
    starting with a different token, the first token decides: one forward pass per prompt, the
    score being that token's log-probability.
    """
    _check_prompts(prompts_ids)
    if not label_ids or any(len(ids) == 0 for ids in label_ids):
        raise DataError("label scoring needs labels of at least one token each")
    n_prompts, n_labels = len(prompts_ids), len(label_ids)
    scores = np.zeros((n_prompts, n_labels), dtype=np.float64)
    firsts = [ids[0] for ids in label_ids]
    if first_token and len(set(firsts)) == n_labels:
        for start in range(0, n_prompts, batch_size):
            chunk = prompts_ids[start : start + batch_size]
            scores[start : start + len(chunk)] = log_softmax(last_logits(trainer, chunk))[:, firsts]
        return scores
    pairs = [(p, lab) for p in range(n_prompts) for lab in range(n_labels)]
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        rows = [list(prompts_ids[p]) + list(label_ids[lab]) for p, lab in chunk]
        # where each label token is predicted: from the prompt's last token on
        positions = [
            list(range(len(prompts_ids[p]) - 1, len(prompts_ids[p]) - 1 + len(label_ids[lab]))) for p, lab in chunk
        ]
        for block, (p, lab) in zip(logits_at(trainer, rows, positions), chunk):
            label = np.asarray(label_ids[lab])
            scores[p, lab] = float(log_softmax(block)[np.arange(len(label)), label].sum())
    return scores


def generate_greedy(
    trainer: Trainer, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, eos_id: int | None, batch_size: int = 8
) -> list[list[int]]:
    """Each prompt's greedy continuation (argmax at every step), at most ``max_new_tokens``
    tokens, ending before ``eos_id`` (not included). A row that has reached EOS leaves its
    batch, so later passes run on the unfinished rows only."""
    _check_prompts(prompt_ids)
    generated: list[list[int]] = [[] for _ in prompt_ids]
    for start in range(0, len(prompt_ids), batch_size):
        active = list(range(start, min(start + batch_size, len(prompt_ids))))
        sequences = {i: list(prompt_ids[i]) for i in active}
        for _ in range(max_new_tokens):
            if not active:
                break
            chosen = last_logits(trainer, [sequences[i] for i in active]).argmax(axis=-1)
            still = []
            for i, token in zip(active, chosen.tolist()):
                if token == eos_id:
                    continue
                sequences[i].append(token)
                generated[i].append(token)
                still.append(i)
            active = still
    return generated


@dataclass(frozen=True)
class Sample:
    prompt: str
    generated: str
    expected: str


@dataclass
class InstructionEval:
    """``evaluate_instructions``' result. Loss, perplexity and token accuracy are over response
    tokens; ``label_accuracy`` (best-scoring label word) only with label words,
    ``answer_accuracy`` (greedy answer equal to the expected one, normalized) only when
    generating."""

    loss: float
    perplexity: float
    token_accuracy: float
    examples: int
    label_accuracy: float | None = None
    answer_accuracy: float | None = None
    samples: list[Sample] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        out = {
            "loss": self.loss,
            "perplexity": self.perplexity,
            "token_accuracy": self.token_accuracy,
            "examples": float(self.examples),
        }
        if self.label_accuracy is not None:
            out["label_accuracy"] = self.label_accuracy
        if self.answer_accuracy is not None:
            out["answer_accuracy"] = self.answer_accuracy
        return out


def evaluate_instructions(
    trainer: Trainer,
    examples: Sequence[Example],
    chat_format: ChatFormat | None = None,
    label_words: Sequence[str] = (),
    max_new_tokens: int = 16,
    samples: int = 3,
    batch_size: int = 8,
    generate_examples: int | None = None,
) -> InstructionEval:
    """Response-only loss and perplexity of ``examples``; with ``label_words`` (each example's
    answer one of them), the accuracy of the best-scoring label word; with ``max_new_tokens`` > 0,
    the accuracy of the greedy answer (on the first ``generate_examples``; None: all: decoding
    costs a forward pass per token) and the first ``samples`` (prompt, generated, expected).

    ``chat_format``: default, the bundle's (``ChatFormat.from_manifest``). Prompts are cut in
    their middle (``fit_example``) to leave room for the answer within the bundle's ``max_length``.
    """
    if not examples:
        raise DataError("no examples to evaluate")
    encoder = InstructionEncoder.from_bundle(trainer.bundle, chat_format)
    scored = trainer.evaluate(encode_instructions(examples, encoder), batch_size=batch_size)
    result = InstructionEval(
        loss=scored["loss"], perplexity=scored["perplexity"], token_accuracy=scored["accuracy"], examples=len(examples)
    )
    prompts = encoder.prompt_ids(examples)
    if label_words:
        result.label_accuracy = _label_accuracy(trainer, encoder, prompts, examples, label_words, batch_size)
    if max_new_tokens > 0:
        room = max(1, encoder.max_length - max_new_tokens)
        chosen = prompts[:generate_examples] if generate_examples is not None else prompts
        outputs = generate_greedy(
            trainer, [encoder.fit_prompt(p, room) for p in chosen], max_new_tokens, encoder.specials.eos_id, batch_size
        )
        answers = [encoder.decode(ids) for ids in outputs]
        result.answer_accuracy = float(
            np.mean([normalize_answer(a) == normalize_answer(e.answer) for a, e in zip(answers, examples)])
        )
        result.samples = [
            Sample(encoder.chat_format.render_prompt(e), a, e.answer) for e, a in zip(examples[:samples], answers)
        ]
    return result


def _label_accuracy(
    trainer: Trainer,
    encoder: InstructionEncoder,
    prompts: list[list[int]],
    examples: Sequence[Example],
    label_words: Sequence[str],
    batch_size: int,
) -> float:
    words = check_label_words(label_words)
    index = {w: i for i, w in enumerate(words)}
    unknown = sorted({e.answer for e in examples if e.answer not in index})
    if unknown:
        raise DataError(f"answers not among the label words {list(words)}: {unknown[:5]}")
    label_ids = encoder.response_ids(words)
    room = max(1, encoder.max_length - max(len(ids) for ids in label_ids))
    scores = label_scores(trainer, [encoder.fit_prompt(p, room) for p in prompts], label_ids, batch_size)
    expected = np.array([index[e.answer] for e in examples])
    return float((scores.argmax(axis=1) == expected).mean())
