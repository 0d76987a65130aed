"""Multi-process federated runs on a real model and real data, against both real brokers.

Device processes run in the torch-free device environment (.venv-edge)."""

import json
import subprocess

import numpy as np
import pytest

from core.transport import BrokerConfig
from simulator.broker import retained_topics
from simulator.run import SimulateConfig, run_simulation


def _small(tmp_path, bundle, edge_python, **kw):
    return SimulateConfig(
        bundle=bundle,
        dataset="bbc-news",
        devices=3,
        rounds=2,
        local_steps=3,
        batch_size=4,
        max_train=90,
        eval_max=40,
        out=tmp_path / "run",
        device_python=edge_python,
        **kw,
    )


def _check_run(result, out):
    history = result["history"]
    assert [h["round"] for h in history] == [1, 2]
    assert all(h["ok"] and h["participants"] == 3 and h["uplink_bytes_wire"] > 0 for h in history)
    assert all(0.0 <= h["eval"]["accuracy"] <= 1.0 and np.isfinite(h["eval"]["loss"]) for h in history)
    assert all(h["device_peak_rss_bytes_max"] > 50 * 2**20 for h in history)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2]
    report = (out / "report.md").read_text()
    assert "| 2 |" in report and "Final test accuracy" in report
    for png in ("accuracy.png", "loss.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())  # the trained adapter, for PEFT
    assert adapter["peft_type"] == "LORA" and (out / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    best = json.loads((out / "adapter-best" / "adapter_config.json").read_text())  # the best-evaluated version
    assert best["peft_type"] == "LORA" and (out / "adapter-best" / "adapter_model.safetensors").stat().st_size > 0
    assert "best evaluated adapter | adapter-best/ (version " in report
    events = [json.loads(line) for line in (out / "aggregator" / "events.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "update_accepted" for e in events) == 6
    assert not any(e["event"] == "update_rejected" for e in events)


def test_simulate_with_embedded_amqtt(tmp_path, minilm_bundle, edge_python, capfd):
    cfg = _small(tmp_path, minilm_bundle, edge_python, centralized=True, embedded_broker="amqtt")
    result = run_simulation(cfg)
    _check_run(result, cfg.out)
    assert len(result["centralized"]) == 2
    assert "Centralized baseline" in (cfg.out / "report.md").read_text()
    terminal = capfd.readouterr()
    assert "embedded broker (amqtt)" in terminal.out and (cfg.out / "broker.log").exists()
    assert "Traceback" not in terminal.out + terminal.err  # the broker's log goes to the run's file


def test_simulate_against_mosquitto_mqtt5(tmp_path, minilm_bundle, edge_python, mosquitto, capfd):
    cfg = _small(tmp_path, minilm_bundle, edge_python, broker=mosquitto.url, split="iid")
    _check_run(run_simulation(cfg), cfg.out)
    logs = "".join(p.read_text() for p in (cfg.out / "devices").glob("*/device.log"))
    assert "with MQTT 5" in logs  # mosquitto offers v5 and the client takes it
    # The job's round, global adapter and device status were retained on the broker: all cleared.
    assert retained_topics(BrokerConfig(url=mosquitto.url), "fedlora/#") == set()
    terminal = capfd.readouterr()
    assert "cleared" in terminal.out and "Traceback" not in terminal.out + terminal.err


@pytest.mark.parametrize("broker", ["mosquitto", "embedded-amqtt"])
def test_simulate_with_sharded_aggregators(tmp_path, minilm_bundle, edge_python, broker, request, capfd):
    """``--shards 2``: two fedlora-server workers take the updates, the simulation's aggregator
    coordinates; the rounds, their history and the report are those of one aggregator. Through
    Mosquitto and through the embedded amqtt fallback (the shards are topics: no broker feature
    beyond MQTT 3.1.1)."""
    where = (
        {"broker": request.getfixturevalue("mosquitto").url} if broker == "mosquitto" else {"embedded_broker": "amqtt"}
    )
    cfg = _small(tmp_path, minilm_bundle, edge_python, split="iid", shards=2, **where)
    result = run_simulation(cfg)
    history = result["history"]
    assert [h["round"] for h in history] == [1, 2]
    assert all(h["ok"] and h["participants"] == 3 for h in history), history
    values = 4 * sum(int(np.prod(s)) for s in _update_shapes(minilm_bundle))
    for h in history:  # what the workers took, reported with their sealed partials
        assert h["uplink_bytes_raw"] == 3 * values and h["uplink_bytes_wire"] > values, h
        assert h["device_peak_rss_bytes_max"] > 50 * 2**20 and np.isfinite(h["device_train_loss_median"]), h
    accepted = [
        json.loads(line)
        for k in range(2)
        for line in (cfg.out / f"aggregator-worker-{k}" / "events.jsonl").read_text().splitlines()
        if json.loads(line)["event"] == "update_accepted"
    ]
    assert len(accepted) == 6 and {e["device"] for e in accepted} == {"dev000", "dev001", "dev002"}
    assert (cfg.out / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    logs = "".join((cfg.out / "shard-workers" / f"worker-{k}.log").read_text() for k in range(2))
    assert "Traceback" not in logs
    terminal = capfd.readouterr()
    assert "2 aggregator workers started" in terminal.out and "Traceback" not in terminal.out + terminal.err


def _update_shapes(bundle_dir):
    from core.bundle import Bundle, choose_bundle

    return [p.shape for p in Bundle(choose_bundle(bundle_dir)).manifest.trainable]


def test_device_environment_has_no_torch(edge_python, minilm_bundle):
    assert subprocess.run([edge_python, "-c", "import torch"], capture_output=True).returncode != 0
    code = (
        "import sys; from core.bundle import Bundle; from edge_client.runtime import Trainer;"
        f"t = Trainer(Bundle({str(minilm_bundle)!r})); print(len(t.get_adapter()));"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'peft', 'prometheus_client')];"
        "assert not bad, bad"
    )
    out = subprocess.run([edge_python, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "26"


@pytest.mark.parametrize(
    "strategy, ranks",
    [
        ("fedavg", (4,)),
        ("ffa-lora", (4,)),
        ("fedsa-lora", (4,)),
        ("fedex-lora", (4,)),
        ("hetlora", (2, 4, 8)),
        ("flexlora", (2, 4, 8)),
        ("flexlora-delta", (2, 4, 8)),
        ("flora", (2, 4, 8)),
    ],
)
def test_every_strategy_completes_rounds_with_real_artifacts(
    tmp_path, minilm_bundles, edge_python, mosquitto, strategy, ranks
):
    """Devices of ranks 2, 4 and 8 (or one rank for the same-rank methods) in one job."""
    from core.bundle import Bundle

    # one mixed-rank job also runs the rank-dependent lr and the rank-normalized average
    power = 0.5 if strategy == "flexlora-delta" else 0.0
    cfg = _small(
        tmp_path,
        minilm_bundles,
        edge_python,
        broker=mosquitto.url,
        split="iid",
        strategy=strategy,
        ranks=ranks,
        centralized=False,
        lr_rank_power=power,
        strategy_settings={"rank_norm_power": power} if power else {},
    )
    if len(ranks) == 1:
        cfg.bundle = minilm_bundles / f"r{ranks[0]}"
    result = run_simulation(cfg)
    _check_run(result, cfg.out)
    import re

    logs = [p.read_text() for p in (cfg.out / "devices").glob("*/device.log")]
    trained = sorted(int(re.search(r"training examples, rank (\d+)", log).group(1)) for log in logs)
    assert trained == sorted(ranks * (3 // len(ranks)))
    for log in logs:  # lr * (max rank / rank) ** power
        rank = int(re.search(r"training examples, rank (\d+)", log).group(1))
        lrs = [float(x) for x in re.findall(r"local steps \(batch \d+, lr ([0-9.e-]+)\)", log)]
        assert lrs == [pytest.approx(cfg.lr * (max(ranks) / rank) ** power, rel=1e-4)] * 2
    state = cfg.out / "aggregator"
    if strategy in ("flora", "fedex-lora"):
        import numpy as np

        from server.store import StateStore

        deltas = StateStore(state).load()["base_delta"]
        assert deltas and any(np.abs(v).max() > 0 for v in deltas.values())
    assert Bundle(minilm_bundles / "r8").manifest.rank == 8


def test_hetlora_devices_prune_their_rank_and_keep_training(tmp_path, minilm_bundles, edge_python, mosquitto):
    """With a threshold near 1 a device keeps components only up to its strongest one, so most
    devices prune: a device announces the smaller rank and trains and sends that rank from the
    next round on (the update of the round it pruned in, at the old rank, carries the zeroed tail)."""
    import re

    cfg = _small(
        tmp_path,
        minilm_bundles,
        edge_python,
        broker=mosquitto.url,
        split="iid",
        strategy="hetlora",
        ranks=(2, 4, 8),
        strategy_settings={"prune_threshold": 0.99},
    )
    result = run_simulation(cfg)
    _check_run(result, cfg.out)
    events = [json.loads(line) for line in (cfg.out / "aggregator" / "events.jsonl").read_text().splitlines()]
    sent = {(e["device"], e["round"]): e["rank"] for e in events if e["event"] == "update_accepted"}
    pruned = {}
    for log in (cfg.out / "devices").glob("*/device.log"):
        device, rank, rnd = log.parent.name, None, None
        for line in log.read_text().splitlines():
            if m := re.search(r"training examples, rank (\d+)", line):
                rank = int(m.group(1))
            elif m := re.search(r"round (\d+): training", line):
                rnd = int(m.group(1))
                assert sent[(device, rnd)] == rank  # every update goes out at the rank trained
            elif m := re.search(r"rank self-pruning: rank (\d+) -> (\d+)", line):
                assert int(m.group(1)) == rank > int(m.group(2))
                rank = int(m.group(2))
                pruned.setdefault(device, []).append((rnd, rank))
    assert any(steps[0][0] == 1 for steps in pruned.values()), f"no device pruned in round 1: {pruned}"
    state = json.loads((cfg.out / "devices" / next(iter(pruned)) / "state" / "state.json").read_text())
    assert state["rank"] == pruned[next(iter(pruned))][-1][1]  # kept across restarts


def test_compressed_uplink_with_error_feedback(tmp_path, minilm_bundle, edge_python, amqtt_broker):
    fp32 = run_simulation(_small(tmp_path / "fp32", minilm_bundle, edge_python, broker=amqtt_broker.url))
    cfg = _small(
        tmp_path / "small",
        minilm_bundle,
        edge_python,
        broker=amqtt_broker.url,
        codec="topk0.1+int8+zlib",
        head_codec="int8",
        downlink_codec="int8+zlib",
    )
    small = run_simulation(cfg)
    _check_run(small, cfg.out)
    up = lambda r: sum(h["uplink_bytes_wire"] for h in r["history"])  # noqa: E731
    assert up(small) * 8 < up(fp32)
    down = lambda r: r["history"][-1]["downlink_bytes_wire"]  # noqa: E731
    assert down(small) * 3 < down(fp32)  # round 2's global went out as an int8 delta
    # what compression dropped is kept on each device, across restarts
    assert all((d / "state" / "feedback.npz").is_file() for d in (cfg.out / "devices").iterdir())


def test_fedadam_on_the_server_and_fedprox_on_the_devices_run_end_to_end(tmp_path, minilm_bundle, edge_python):
    """The announced fedprox_mu reaches every device's training (each update reports the mu it
    trained with), and the aggregator's FedAdam state is in its store after the run."""
    from server.store import StateStore

    cfg = _small(
        tmp_path,
        minilm_bundle,
        edge_python,
        strategy_settings={"server_optimizer": "fedadam", "fedprox_mu": 0.1},
    )
    result = run_simulation(cfg)
    _check_run(result, cfg.out)
    events = [json.loads(line) for line in (cfg.out / "aggregator" / "events.jsonl").read_text().splitlines()]
    accepted = [e for e in events if e["event"] == "update_accepted"]
    assert accepted and all(e["metrics"]["fedprox_mu"] == 0.1 for e in accepted)
    t, moments = StateStore(cfg.out / "aggregator").load()["server_optimizer"]
    assert t == 2 and moments and all(np.isfinite(v).all() for v in moments.values())
