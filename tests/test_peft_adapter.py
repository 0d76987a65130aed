"""The global adapter out as a PEFT folder: PyTorch + PEFT on the original model computes the
same logits as ONNX Runtime's eval graph with that adapter, for both tasks, and with the dense
changes of folding strategies (FLoRA, FedEx-LoRA) folded into the factors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from core.bundle import Bundle
from core.errors import BundleError, ConfigError
from server.peft_adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    fold_change,
    head_modules,
    peft_adapter,
    write_peft_adapter,
)
from server.strategies.base import AdapterLayout

TEXTS = [
    "Shares of the carmaker rose after strong quarterly results.",
    "The striker scored twice in the final minutes of the match.",
    "Parliament voted on the new budget late on Tuesday night.",
]


def random_adapter(manifest, seed: int, scale: float = 0.05) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {p.name: (scale * rng.standard_normal(p.shape)).astype(np.float32) for p in manifest.trainable}


def random_changes(manifest, seed: int, rank: int = 3, scale: float = 0.02) -> dict[str, np.ndarray]:
    """Low-rank dense changes to each adapted layer's frozen weight, as FLoRA accumulates them."""
    rng = np.random.default_rng(seed)
    layout = AdapterLayout.from_manifest(manifest)
    return {
        m.base: (
            scale * rng.standard_normal((m.out_features, rank)) @ rng.standard_normal((rank, m.in_features))
        ).astype(np.float32)
        for m in layout.modules
    }


def ort_logits(bundle: Bundle, adapter: dict, changes: dict, batch) -> np.ndarray:
    from edge_client.runtime import Trainer

    trainer = Trainer(bundle)
    trainer.set_adapter(adapter)
    for name, delta in changes.items():
        trainer.set_base_delta(name, delta)
    return np.asarray(trainer.eval_batch(batch)[1])


def assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float = 1e-4) -> None:
    err = np.abs(actual - expected).max() / np.abs(expected).max()
    assert err <= rtol, f"max difference {err:.2e} of the largest logit"


# -- unit: the folder's contents ------------------------------------------------------------
def test_a_folded_change_is_exact_and_of_its_numerical_rank():
    rng = np.random.default_rng(0)
    delta = rng.standard_normal((6, 2)) @ rng.standard_normal((2, 5))
    a, b = fold_change(delta, scale=2.0)
    assert a.shape == (2, 5) and b.shape == (6, 2)
    np.testing.assert_allclose(2.0 * b.astype(np.float64) @ a, delta, rtol=1e-5, atol=1e-6)
    assert fold_change(np.zeros((3, 4)), 2.0)[0].shape == (0, 4)


def test_the_config_names_targets_rank_alpha_task_and_the_head(minilm_bundle):
    m = Bundle(minilm_bundle).manifest
    config, weights = peft_adapter(m, random_adapter(m, 0))
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS"
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (m.rank, m.alpha, sorted(m.targets))
    assert config["modules_to_save"] == ["classifier"] and config["rank_pattern"] == {}
    assert set(weights) == {p.name for p in m.trainable}
    assert head_modules({"base_model.model.score.weight": (2, 3), "base_model.model.pooler.dense.bias": (3,)}) == [
        "pooler.dense",
        "score",
    ]


def test_changes_widen_the_rank_of_their_modules_only(minilm_bundle):
    m = Bundle(minilm_bundle).manifest
    layout = AdapterLayout.from_manifest(m)
    one = layout.modules[0]
    config, weights = peft_adapter(m, random_adapter(m, 1), {one.base: random_changes(m, 2, rank=2)[one.base]})
    key = one.name.removeprefix("base_model.model.")
    assert config["rank_pattern"] == {key: m.rank + 2}
    assert config["alpha_pattern"] == {key: layout.scale * (m.rank + 2)}
    assert weights[one.a].shape == (m.rank + 2, one.in_features) and weights[one.b].shape == (
        one.out_features,
        m.rank + 2,
    )
    assert weights[layout.modules[1].a].shape == (m.rank, layout.modules[1].in_features)


def test_incomplete_or_foreign_tensors_are_refused_by_name(minilm_bundle):
    m = Bundle(minilm_bundle).manifest
    adapter = random_adapter(m, 0)
    name = sorted(adapter)[0]
    with pytest.raises(BundleError, match="lacks 1 tensors"):
        peft_adapter(m, {k: v for k, v in adapter.items() if k != name})
    with pytest.raises(BundleError, match="no adapted layer owns"):
        peft_adapter(m, adapter, {"base_model.model.bert.pooler.dense.weight": np.ones((2, 2), np.float32)})


def test_the_folder_is_written_whole_or_not_at_all(minilm_bundle, tmp_path, monkeypatch):
    from safetensors.numpy import load_file

    m = Bundle(minilm_bundle).manifest
    folder = write_peft_adapter(tmp_path / "adapter", m, random_adapter(m, 0), about={"round": 3})
    assert json.loads((folder / ADAPTER_CONFIG).read_text())["r"] == m.rank
    assert set(load_file(folder / ADAPTER_WEIGHTS)) == {p.name for p in m.trainable}
    import safetensors.numpy

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", full_disk)
    with pytest.raises(OSError, match="No space"):
        write_peft_adapter(tmp_path / "adapter", m, random_adapter(m, 1))
    assert json.loads((folder / ADAPTER_CONFIG).read_text())["r"] == m.rank  # the old one stands
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary left behind


# -- round trips through PyTorch + PEFT ------------------------------------------------------
@pytest.mark.parametrize("folded", [False, True], ids=["factors", "factors+folded-changes"])
def test_peft_logits_equal_ort_logits_for_classification(minilm_bundle, tmp_path, folded):
    import torch
    from conftest import minilm_dir
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from edge_client.data import Record, TextEncoder, encode_classification

    bundle = Bundle(minilm_bundle)
    m = bundle.manifest
    adapter = random_adapter(m, 3)
    changes = random_changes(m, 4) if folded else {}
    encoder = TextEncoder(bundle.path(m.tokenizer), m.max_length, m.pad_token_id)
    data = encode_classification([Record(t, m.labels[i]) for i, t in enumerate(TEXTS)], encoder, m.labels)
    batch = next(data.batches(len(TEXTS)))
    expected = ort_logits(bundle, adapter, changes, batch)

    folder = write_peft_adapter(tmp_path / "adapter", m, adapter, changes)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=len(m.labels))
    model = PeftModel.from_pretrained(base, folder).eval()
    inputs = {
        "input_ids": torch.from_numpy(batch.input_ids).long(),
        "attention_mask": torch.from_numpy(batch.attention_mask).long(),
    }
    with torch.no_grad():
        got = model(**inputs).logits.numpy()
        with model.disable_adapter():
            plain = model(**inputs).logits.numpy()
    assert_close(got, expected)
    assert not np.allclose(got, plain, atol=1e-3)  # the adapter matters


def test_peft_logits_equal_ort_logits_for_a_causal_lm(tiny_llama_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from edge_client.data import Batch
    from export.config import ExportConfig
    from export.exporter import export

    (bundle_dir,) = export(
        ExportConfig(model_dir=tiny_llama_dir, output_dir=tmp_path / "llama", ranks=(2,), max_length=16, measure=False)
    )
    bundle = Bundle(bundle_dir)
    m = bundle.manifest
    adapter = random_adapter(m, 5, scale=0.2)
    rng = np.random.default_rng(6)
    ids = rng.integers(4, 18, size=(2, 16)).astype(np.int64)  # the tiny vocabulary: 19 tokens
    mask = np.ones_like(ids)
    mask[1, 12:] = 0
    batch = Batch(ids, mask, np.where(mask == 1, ids, -100))  # the graph computes the labeled positions' logits
    keep = mask.astype(bool)  # padded positions are not compared
    for changes in ({}, random_changes(m, 7, rank=2, scale=0.05)):
        expected = ort_logits(bundle, adapter, changes, batch)
        folder = write_peft_adapter(tmp_path / "adapter", m, adapter, changes)
        assert json.loads((folder / ADAPTER_CONFIG).read_text())["task_type"] == "CAUSAL_LM"
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
        model = PeftModel.from_pretrained(base, folder).eval()
        with torch.no_grad():
            got = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
        assert len(expected) == keep.sum()
        assert_close(got[keep], expected)


def test_the_merged_model_computes_what_the_adapter_does_for_both_tasks(minilm_bundle, tiny_llama_dir, tmp_path):
    """``fedlora-export MODEL --merge ADAPTER``: a plain transformers folder (no PEFT) whose logits
    are the PEFT model's, classification head and class names included."""
    import torch
    from conftest import minilm_dir
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from export.cli import main as export_main
    from export.config import ExportConfig
    from export.exporter import export
    from export.merge import LABELS_METADATA
    from server.peft_adapter import LABELS_METADATA as WRITTEN

    assert LABELS_METADATA == WRITTEN
    ids = torch.from_numpy(np.random.default_rng(8).integers(4, 18, size=(2, 12)).astype(np.int64))
    mask = torch.ones_like(ids)
    m = Bundle(minilm_bundle).manifest
    cases = [(minilm_dir(), m, AutoModelForSequenceClassification)]
    (llama,) = export(
        ExportConfig(model_dir=tiny_llama_dir, output_dir=tmp_path / "llama", ranks=(2,), max_length=16, measure=False)
    )
    cases.append((tiny_llama_dir, Bundle(llama).manifest, AutoModelForCausalLM))
    for i, (model_dir, manifest, cls) in enumerate(cases):
        folder = write_peft_adapter(tmp_path / f"adapter{i}", manifest, random_adapter(manifest, 9, scale=0.2))
        merged_dir = tmp_path / f"merged{i}"
        assert export_main([str(model_dir), "--merge", str(folder), "-o", str(merged_dir)]) == 0
        assert not (merged_dir / ADAPTER_CONFIG).exists()
        kwargs = {"num_labels": len(manifest.labels)} if cls is AutoModelForSequenceClassification else {}
        peft_model = PeftModel.from_pretrained(cls.from_pretrained(model_dir, **kwargs), folder).eval()
        merged = cls.from_pretrained(merged_dir).eval()
        with torch.no_grad():
            expected = peft_model(input_ids=ids, attention_mask=mask).logits.numpy()
            got = merged(input_ids=ids, attention_mask=mask).logits.numpy()
        assert_close(got, expected, rtol=1e-5)
        if cls is AutoModelForSequenceClassification:
            assert [merged.config.id2label[j] for j in range(len(manifest.labels))] == list(manifest.labels)
    # a folder that is not an adapter is refused by name, before any weights load
    assert export_main([str(tiny_llama_dir), "--merge", str(tmp_path), "-o", str(tmp_path / "x")]) == 2


# -- where the adapter comes out: the aggregator per version, the CLI, the simulator ---------
def test_the_aggregator_writes_each_version_keeps_the_latest_and_the_cli_writes_it_again(
    tmp_path, minilm_bundle, mosquitto, monkeypatch
):
    from safetensors.numpy import load_file
    from test_aggregator import FakeDevice, start_aggregator, update_payload, wait_for

    import server.aggregator as aggregator_module
    from server.cli import server_main

    bundle = Bundle(minilm_bundle)
    state = tmp_path / "state"

    def full_disk(folder, *args, **kwargs):
        raise OSError(28, "No space left on device")

    agg, stop, thread, link = start_aggregator(
        minilm_bundle, state, mosquitto.url, job="peft", rounds=3, adapter_versions=1
    )
    dev = FakeDevice(mosquitto.url, "peft", "d1")
    try:
        dev.online()
        for rnd in (1, 2, 3):
            if rnd == 3:
                monkeypatch.setattr(aggregator_module, "write_peft_adapter", full_disk)  # v3: the disk is full
            wait_for(lambda r=rnd: (dev.open_round() or {}).get("round") == r, what=f"round {rnd}")
            tensors = {p.name: np.full(p.shape, 0.01 * rnd, np.float32) for p in bundle.manifest.trainable}
            dev.send(update_payload(bundle, "peft", "d1", rnd, tensors=tensors))
            wait_for(lambda r=rnd: agg.coordinator.completed == r, what=f"round {rnd} to complete")
            if rnd == 2:  # the round counts as completed a moment before its adapter folder is written
                wait_for(
                    lambda: sorted(p.name for p in (state / "adapters").iterdir()) == ["v000002"],
                    what="v2's folder, v1's dropped",
                )
                saved = load_file(state / "adapters" / "v000002" / ADAPTER_WEIGHTS)
                for name, value in agg.global_adapter.items():
                    np.testing.assert_array_equal(saved[name], value)
        wait_for(lambda: agg.metrics.store_errors._value.get() >= 1, what="the failed write counted")
        assert agg.coordinator.completed == 3 and agg.history[-1]["ok"]  # a full disk for the adapter stops nothing
    finally:
        stop.set()
        thread.join(10)
        link.close()
        dev.link.close()
    out = tmp_path / "exported"
    assert (
        server_main(
            ["--bundle", str(minilm_bundle), "--state-dir", str(state), "--job", "peft", "--export-adapter", str(out)]
        )
        == 0
    )
    exported = load_file(out / ADAPTER_WEIGHTS)
    for name, value in agg.global_adapter.items():
        np.testing.assert_array_equal(exported[name], value)
    assert (
        server_main(
            [
                "--bundle",
                str(minilm_bundle),
                "--state-dir",
                str(tmp_path / "empty"),
                "--export-adapter",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )  # no state there: a clear error


@pytest.mark.parametrize(
    "config, labels, message",
    [
        ({"task_type": ["SEQ_CLS"]}, '["a"]', "task_type must be one of"),
        ({"task_type": {"x": 1}}, '["a"]', "task_type must be one of"),
        ([1, 2], '["a"]', "task_type must be one of"),
        ({"task_type": "SEQ_CLS"}, "not json", "not a JSON list of class names"),
        ({"task_type": "SEQ_CLS"}, '{"a": 1}', "not a JSON list of class names"),
        ({"task_type": "SEQ_CLS"}, "[1, 2]", "not a JSON list of class names"),
    ],
)
def test_a_malformed_adapter_folder_is_refused_with_a_reason(tmp_path, config, labels, message):
    from safetensors.numpy import save_file

    from export.merge import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LABELS_METADATA, adapter_task_and_labels

    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps(config), encoding="utf-8")
    save_file({"w": np.zeros(2, np.float32)}, str(tmp_path / ADAPTER_WEIGHTS), metadata={LABELS_METADATA: labels})
    with pytest.raises(ConfigError, match=message):
        adapter_task_and_labels(tmp_path)
