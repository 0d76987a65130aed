"""Local data on the device: read CSV/JSONL records, tokenize them, batch them.

Pure stdlib + numpy + the ``tokenizers`` library, so it runs on the device.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import DataError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Record:
    text: str
    label: str | None


def read_records(path: str | Path, text_column: str = "text", label_column: str | None = "label") -> list[Record]:
    """Read a ``.csv``, ``.tsv``, ``.jsonl`` or ``.json`` (list of objects) file.

    ``label_column`` may be None for causal-LM data. Raises DataError naming the file,
    the line and the missing column instead of failing later in training.
    """
    path = Path(path)
    records = []
    for line_no, row in read_rows(path):
        require_columns(path, line_no, row, (text_column, label_column))
        text = row[text_column]
        if not isinstance(text, str):
            raise DataError(f"{path}:{line_no}: column {text_column!r} is not text")
        label = None if label_column is None else str(row[label_column])
        records.append(Record(text=text, label=label))
    return records


def read_rows(path: str | Path) -> list[tuple[int, dict]]:
    """Every row of a data file as (line number, columns), for readers that need more columns.

    Raises DataError if the file is missing, empty, not UTF-8, of an unknown format, or holds
    something other than objects.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            rows = _read_delimited(path, "\t" if suffix == ".tsv" else ",")
        elif suffix in (".jsonl", ".ndjson"):
            rows = _read_jsonl(path)
        elif suffix == ".json":
            rows = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(rows, list):
                raise DataError(f"{path}: a .json data file must hold a list of objects")
            rows = [(i + 1, r) for i, r in enumerate(rows)]
        else:
            raise DataError(f"{path}: unsupported data format {suffix!r} (use .csv, .tsv, .jsonl or .json)")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from exc
    for line_no, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{path}:{line_no}: expected an object with columns, got {type(row).__name__}")
    if not rows:
        raise DataError(f"{path}: no records")
    return rows


def require_columns(path: str | Path, line_no: int, row: dict, columns: Sequence[str | None]) -> None:
    """Raise DataError naming the first of ``columns`` (None entries skipped) absent from ``row``."""
    for column in columns:
        if column is not None and column not in row:
            raise DataError(f"{path}:{line_no}: no column {column!r} (columns: {', '.join(map(str, row)) or 'none'})")


def _read_delimited(path: Path, delimiter: str):
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        if reader.fieldnames is None:
            raise DataError(f"{path}: empty file, no header row")
        return [(i + 2, row) for i, row in enumerate(reader)]


def _read_jsonl(path: Path):
    rows = []
    with path.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rows.append((i, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{i}: invalid JSON ({exc.msg})") from exc
    return rows


class TextEncoder:
    """Tokenizes text with the bundle's ``tokenizer.json`` into fixed-length id arrays."""

    def __init__(self, tokenizer_file: str | Path, max_length: int, pad_token_id: int):
        from tokenizers import Tokenizer

        self.max_length = max_length
        self.pad_token_id = pad_token_id
        self._tok = Tokenizer.from_file(str(tokenizer_file))
        self._tok.no_padding()
        self._tok.enable_truncation(max_length)

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Return (input_ids, attention_mask), both int64 [len(texts), max_length]."""
        encodings = self._tok.encode_batch(list(texts))
        ids = np.full((len(texts), self.max_length), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(texts), self.max_length), dtype=np.int64)
        for row, enc in enumerate(encodings):
            n = min(len(enc.ids), self.max_length)
            ids[row, :n] = enc.ids[:n]
            mask[row, :n] = 1
        return ids, mask


@dataclass
class Batch:
    input_ids: np.ndarray
    attention_mask: np.ndarray
    labels: np.ndarray


class EncodedDataset:
    """Token ids and labels held in memory; yields shuffled fixed-size batches.

    ``bucket_batches`` > 0 draws each batch from a bucket of about that many batches' worth of
    examples of similar length (``length_batches``), so a trimmed batch carries little padding;
    0 draws batches from the whole set.
    """

    def __init__(self, input_ids: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray, bucket_batches: int = 0):
        if not (len(input_ids) == len(attention_mask) == len(labels)):
            raise DataError("input_ids, attention_mask and labels differ in length")
        if bucket_batches < 0:
            raise DataError(f"bucket_batches must be >= 0, got {bucket_batches}")
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.labels = labels
        self.bucket_batches = bucket_batches

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, index: np.ndarray) -> EncodedDataset:
        return EncodedDataset(
            self.input_ids[index], self.attention_mask[index], self.labels[index], self.bucket_batches
        )

    def batch_indices(self, batch_size: int, rng: np.random.Generator | None = None) -> list[np.ndarray]:
        """The examples of each batch, in the order ``batches`` yields them."""
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if self.bucket_batches:
            return length_batches(self.attention_mask.sum(axis=1), batch_size, self.bucket_batches, rng)
        order = rng.permutation(len(self)) if rng is not None else np.arange(len(self))
        return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]

    def batches(self, batch_size: int, rng: np.random.Generator | None = None, trim: bool = True) -> Iterator[Batch]:
        """Yield batches; shuffled when ``rng`` is given. ``trim`` cuts trailing all-pad columns."""
        for idx in self.batch_indices(batch_size, rng):
            ids, mask, labels = self.input_ids[idx], self.attention_mask[idx], self.labels[idx]
            if trim:
                width = max(1, int(mask.sum(axis=1).max()))
                ids, mask = ids[:, :width], mask[:, :width]
                if labels.ndim == 2:
                    labels = labels[:, :width]
            yield Batch(np.ascontiguousarray(ids), np.ascontiguousarray(mask), np.ascontiguousarray(labels))

    def sample_batches(self, batch_size: int, steps: int, rng: np.random.Generator) -> Iterator[Batch]:
        """Exactly ``steps`` batches, cycling through reshuffled epochs as needed."""
        produced = 0
        while produced < steps:
            for batch in self.batches(batch_size, rng):
                yield batch
                produced += 1
                if produced == steps:
                    return


def encode_classification(records: Sequence[Record], encoder: TextEncoder, labels: Sequence[str]) -> EncodedDataset:
    """Encode records whose labels must be among ``labels`` (the bundle's label list)."""
    index = {name: i for i, name in enumerate(labels)}
    given = [r.label for r in records if r.label is not None]
    if len(given) < len(records):
        raise DataError(f"{len(records) - len(given)} of {len(records)} records have no label: a classifier needs one")
    unknown = sorted({label for label in given if label not in index})
    if unknown:
        raise DataError(f"labels not in the bundle's label set {list(labels)}: {unknown[:5]}")
    ids, mask = encoder.encode([r.text for r in records])
    y = np.array([index[label] for label in given], dtype=np.int64)
    return EncodedDataset(ids, mask, y)


def encode_causal_lm(records: Sequence[Record], encoder: TextEncoder) -> EncodedDataset:
    """Next-token labels: labels[t] = input_ids[t + 1]; padding and the last position ignored."""
    ids, mask = encoder.encode([r.text for r in records])
    labels = np.full_like(ids, IGNORE_INDEX)
    labels[:, :-1] = np.where(mask[:, 1:] == 1, ids[:, 1:], IGNORE_INDEX)
    return EncodedDataset(ids, mask, labels)


def length_batches(
    lengths: np.ndarray, batch_size: int, bucket_batches: int, rng: np.random.Generator | None = None
) -> list[np.ndarray]:
    """Batches of similar-length examples: sort by length (ties in random order), cut into
    buckets of ``bucket_batches * batch_size``, shuffle within each bucket and cut it into
    batches, then shuffle the batches of all buckets. Without ``rng``: length order, unshuffled."""
    lengths = np.asarray(lengths)
    if rng is None:
        order = np.argsort(lengths, kind="stable")
        return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    order = rng.permutation(len(lengths))
    order = order[np.argsort(lengths[order], kind="stable")]
    bucket = batch_size * bucket_batches
    batches: list[np.ndarray] = []
    for start in range(0, len(order), bucket):
        members = rng.permutation(order[start : start + bucket])
        batches.extend(members[i : i + batch_size] for i in range(0, len(members), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]
