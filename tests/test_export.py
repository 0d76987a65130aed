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
        assert set(m.files) >= {"training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint",
                                "tokenizer/tokenizer.json"}


def test_tiny_llama_causal_lm_exports_and_self_checks(tiny_llama_dir, tmp_path):
    out = tmp_path / "llama"
    (bundle_dir,) = export(ExportConfig(model_dir=tiny_llama_dir, output_dir=out, ranks=(2,), max_length=16))
    m = Bundle(bundle_dir).manifest
    assert m.task == "causal-lm" and m.targets == ("q_proj", "v_proj")
    assert max(m.extra["self_check"]["rel_diff"]) <= 1e-4
    assert {p.role for p in m.trainable} == {"lora_A", "lora_B"}
    assert m.extra["gradient_rewrites"].get("SoftmaxGrad_13", 0) > 0


def test_cli_can_keep_ort_gradient_kernels(tiny_llama_dir, tmp_path):
    import onnx

    from export.cli import main

    assert main([str(tiny_llama_dir), "-o", str(tmp_path / "out"), "--ranks", "2", "--max-length", "16",
                 "--no-cpu-gradient-ops", "--no-measure"]) == 0
    m = Bundle(tmp_path / "out" / "r2").manifest
    assert m.extra["gradient_rewrites"] == {} and "memory" not in m.extra
    ops = {n.op_type for n in onnx.load(str(tmp_path / "out" / "r2" / "training_model.onnx")).graph.node}
    assert "SoftmaxGrad_13" in ops


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


@pytest.mark.parametrize("kw, message", [
    (dict(ranks=(0,)), "ranks"), (dict(ranks=(4, 4)), "ranks"), (dict(task="vision"), "task"),
    (dict(opset=18), "opset"), (dict(max_length=4), "max_length"), (dict(alpha=-1.0), "alpha"),
])
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
    from edge_client.data import Batch
    from core.protocol import BASE_A_PREFIX, BASE_B_PREFIX
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
    glob = GlobalModel(8, {k: (v + rng.normal(scale=0.05, size=v.shape)).astype(np.float32) for k, v in tensors.items()})
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
