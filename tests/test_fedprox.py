"""FedProx on the device: the proximal term exported into the loss (``export.proximal``) gives,
on ONNX Runtime, the step PyTorch takes on ``loss + mu/2 * ||w - w_global||^2``; mu 0 is the
plain loss; a bundle exported without the term refuses mu > 0 by name."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import BBC_LABELS, minilm_dir

from core.bundle import Bundle
from core.errors import BundleError
from core.lora import PROXIMAL_CENTER_PREFIX, PROXIMAL_MU
from edge_client.data import Batch
from edge_client.runtime import Trainer, training_api

RANK = 4
LR = 1e-3
MU = 0.5


def torch_fedprox_step(wrapper, batch, center: dict, mu: float, lr: float) -> tuple[float, dict[str, np.ndarray]]:
    """Loss with the proximal term and one AdamW step in ORT's variant (as
    ``export.exporter.torch_two_losses``: HF AdamW, eps 1e-6 after bias correction, no decay)."""
    import torch

    from export.exporter import IGNORE_INDEX, peft_key

    ids, mask, labels = (torch.from_numpy(x) for x in batch)
    named = {peft_key(n): p for n, p in wrapper.named_parameters() if p.requires_grad}
    logits = wrapper(ids, mask)
    loss = torch.nn.functional.cross_entropy(logits, labels.reshape(-1), ignore_index=IGNORE_INDEX)
    loss = loss + mu / 2 * sum(((p - torch.from_numpy(center[n])) ** 2).sum() for n, p in named.items())
    loss.backward()
    beta1, beta2, eps = 0.9, 0.999, 1e-6
    with torch.no_grad():
        for p in named.values():
            g = p.grad
            m, v = (1 - beta1) * g, (1 - beta2) * g * g
            p.sub_(lr * (1 - beta2) ** 0.5 / (1 - beta1) * m / (v.sqrt() + eps))
    return float(loss.detach()), {n: p.detach().numpy().copy() for n, p in named.items()}


def relative(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    diff = np.sqrt(sum(float(np.sum((a[k].astype(np.float64) - b[k]) ** 2)) for k in b))
    return diff / np.sqrt(sum(float(np.sum(b[k].astype(np.float64) ** 2)) for k in b))


@pytest.fixture(scope="module")
def torch_model(tmp_path_factory):
    """The PyTorch model the bundle was exported from (same seed, so the same LoRA init)."""
    from export.config import ExportConfig
    from export.exporter import build_peft, load_model, verification_batch

    cfg = ExportConfig(
        model_dir=minilm_dir(),
        output_dir=tmp_path_factory.mktemp("unused"),
        labels=BBC_LABELS,
        ranks=(RANK,),
        max_length=32,
    )
    loaded = load_model(cfg)
    wrapper, _ = build_peft(loaded, cfg, RANK)
    return wrapper, verification_batch(loaded, cfg, loaded.model.config.vocab_size)


def test_the_export_carries_mu_zero_and_centres_equal_to_the_initial_adapter(minilm_bundles):
    bundle = Bundle(minilm_bundles / f"r{RANK}")
    state = training_api().CheckpointState.load_checkpoint(str(bundle.path("checkpoint")))
    assert float(np.asarray(state.parameters[PROXIMAL_MU].data)) == 0.0
    for p in bundle.manifest.trainable:
        center = np.asarray(state.parameters[PROXIMAL_CENTER_PREFIX + p.name].data)
        assert np.array_equal(center, np.asarray(state.parameters[p.name].data)), p.name
    assert json.loads(bundle.path("manifest.json").read_text())["self_check"]["rel_diff"][1] < 1e-5  # plain loss


def test_one_fedprox_step_on_ort_equals_pytorch(minilm_bundles, torch_model):
    import torch

    from export.exporter import peft_key

    wrapper, batch = torch_model
    trainer = Trainer(Bundle(minilm_bundles / f"r{RANK}"))
    global_adapter = trainer.get_adapter()
    named = {peft_key(n): p for n, p in wrapper.named_parameters() if p.requires_grad}
    assert set(named) == set(global_adapter)
    # A device some way into its round: its adapter has moved off the global (the centre).
    rng = np.random.default_rng(3)
    local = {k: (v + rng.normal(0, 0.02, v.shape)).astype(np.float32) for k, v in global_adapter.items()}
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(torch.from_numpy(local[name]))
    trainer.set_adapter(local)
    trainer.set_proximal(MU, global_adapter)
    trainer.set_learning_rate(LR)

    ort_loss = trainer.train_step(Batch(*batch))
    ort_after = trainer.get_adapter()
    pt_loss, pt_after = torch_fedprox_step(wrapper, batch, global_adapter, MU, LR)

    assert abs(ort_loss - pt_loss) / abs(pt_loss) < 1e-5
    assert relative(ort_after, pt_after) < 1e-5
    steps = {k: ort_after[k] - local[k] for k in local}
    pt_steps = {k: pt_after[k] - local[k] for k in local}
    assert relative(steps, pt_steps) < 1e-3  # the step itself, not just where it lands

    # The term matters: the plain loss's step is elsewhere, and mu 0 turns it off.
    plain = Trainer(Bundle(minilm_bundles / f"r{RANK}"))
    plain.set_adapter(local)
    plain.set_proximal(MU, global_adapter)
    plain.set_proximal(0.0)
    plain.set_learning_rate(LR)
    plain_loss = plain.train_step(Batch(*batch))
    assert relative({k: plain.get_adapter()[k] - local[k] for k in local}, pt_steps) > 1e-2
    prox = MU / 2 * sum(float(np.sum((local[k].astype(np.float64) - global_adapter[k]) ** 2)) for k in local)
    assert ort_loss == pytest.approx(plain_loss + prox, rel=1e-5)


def test_a_bundle_without_the_term_refuses_mu_and_trains_the_plain_loss(minilm_bundles, tmp_path, monkeypatch):
    """An export as fedlora made it before FedProx (the generate step without the term)."""
    import export.proximal
    from devkit.assets import cached_export

    monkeypatch.setattr(export.proximal, "add_proximal_parameters", lambda model, trainable: [])
    monkeypatch.setattr(export.proximal, "proximal_loss", lambda inner, trainable: inner)
    settings = {"model_dir": minilm_dir(), "labels": BBC_LABELS, "ranks": (2,), "max_length": 16, "measure": False}
    old = cached_export(tmp_path, "before-fedprox", settings) / "r2"
    trainer = Trainer(Bundle(old))
    assert not trainer.has_proximal
    trainer.set_proximal(0.0)  # every round does this: fine
    with pytest.raises(BundleError, match="without FedProx's proximal term.*re-export"):
        trainer.set_proximal(0.1)
