"""``fedlora simulate --task causal-lm`` end to end on a tiny chat Llama: labeled data become
classification-as-instruction examples on the devices, rounds run over a real broker, the
aggregator scores the base model (round 0) and every round (best-scoring label word, greedy
answers, response-only perplexity), and the report and the PEFT adapter come out."""

from __future__ import annotations

import json

import numpy as np

from simulator.run import SimulateConfig, run_simulation

WORDS = {"device": "the device trains an adapter on local data", "aggregator": "the aggregator sends its update"}


def labeled_csv(path, n: int = 24):
    rng = np.random.default_rng(0)
    rows = ["text,label"]
    for i in range(n):
        label = ("device", "aggregator")[i % 2]
        words = WORDS[label].split()
        rows.append(f"{' '.join(rng.permutation(words))},{label}")
    path.write_text("\n".join(rows) + "\n")
    return path


def test_a_decoder_llm_is_instruction_tuned_evaluated_and_handed_out(tmp_path, edge_python, mosquitto):
    from test_export import make_chat_llama

    model = make_chat_llama(tmp_path / "chat-llama")
    cfg = SimulateConfig(
        task="causal-lm",
        model=model,
        dataset=str(labeled_csv(tmp_path / "tiny.csv")),
        devices=2,
        split="iid",
        rounds=2,
        local_steps=4,
        batch_size=4,
        lr=5e-3,
        rank=2,
        max_length=48,
        broker=mosquitto.url,
        device_python=edge_python,
        out=tmp_path / "run",
        cache=tmp_path / "cache",
        centralized=True,
    )
    result = run_simulation(cfg)
    history = result["history"]
    assert [h["round"] for h in history] == [1, 2] and all(h["ok"] and h["participants"] == 2 for h in history)
    for h in history:
        ev = h["eval"]
        assert 0 <= ev["accuracy"] <= 1 and 0 <= ev["answer_accuracy"] <= 1
        assert np.isfinite(ev["loss"]) and abs(ev["perplexity"] - np.exp(ev["loss"])) <= 1e-6 * ev["perplexity"]
        assert ev["samples"] and {"prompt", "generated", "expected"} <= set(ev["samples"][0])
        assert h["device_eval_perplexity_median"] > 1  # the devices' own held-out data
    assert "<|im_start|>user" in history[-1]["eval"]["samples"][0]["prompt"]  # the model's chat template
    assert len(result["centralized"]) == 2 and "perplexity" in result["centralized"][0]

    out = cfg.out
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["round"] for e in lines] == [0, 1, 2]  # round 0: the base model, before training
    assert history[-1]["eval"]["loss"] < lines[0]["eval"]["loss"]  # training lowered the response loss
    report = (out / "report.md").read_text()
    assert "Before training (round 0" in report and "Sample generations" in report and "test perplexity" in report
    assert (out / "perplexity.png").read_bytes()[:4] == b"\x89PNG"
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "CAUSAL_LM" and adapter["modules_to_save"] is None
    logs = [p.read_text() for p in (out / "devices").glob("*/device.log")]
    assert all("classification" in log.lower() for log in logs), logs[0][-2000:]
