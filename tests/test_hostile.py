"""Hostile input against the real processes: a running ``fedlora-server`` and a running device
(``fedlora-edge run``, torch-free), a real Mosquitto, and a client that publishes malformed
messages in every format of docs/protocol.md, retained where a topic is retained. Both
processes must stay up, /healthz must answer, restarts with the hostile retained messages
still on the broker must come up, and an honest round must still complete."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import BBC_LABELS, free_port
from faultkit import http_get as get
from faultkit import metric
from hostile import hostile_chunks, hostile_json, hostile_topics

from core.bundle import Bundle
from core.protocol import Topics
from core.transport import BrokerConfig, MqttLink

JOB = "hostile"


def wait_for(predicate, timeout, what, procs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc, log in procs:
            if proc.poll() is not None:
                raise AssertionError(f"{what}: a process exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


class Hostile:
    """A plain MQTT client that publishes whatever it is given."""

    def __init__(self, url: str):
        self.link = MqttLink(BrokerConfig(url=url, protocol="3.1.1"), client_id="hostile-client").connect()
        self.topics = Topics(JOB)

    def send(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.link.publish(topic, payload, retain=retain).wait_for_publish(10)

    def retained_garbage(self) -> None:
        """Retained messages a restart meets again: statuses, an announcement, chunk topics."""
        for i, payload in enumerate(hostile_json()):
            self.send(self.topics.status(f"evil{i}"), payload, retain=True)
        self.send(self.topics.round, hostile_json()[0], retain=True)
        self.send(self.topics.global_chunk(4, 7), b"FLC1 retained garbage", retain=True)
        self.send(self.topics.delta_chunk(4, 0), b"\x00" * 64, retain=True)

    def flood(self, tensor: str) -> int:
        """Everything else, once: JSON on every JSON topic, chunks on update and downlink topics,
        malformed topics. Returns how many messages went out."""
        sent = 0
        for payload in hostile_json():
            for topic in (self.topics.status("evil-live"), self.topics.ack("dev1"), self.topics.round):
                self.send(topic, payload)
                sent += 1
        for chunk in hostile_chunks(JOB, "evil-up", tensor):
            for topic in (self.topics.update("evil-up"), self.topics.global_chunk(4, 0), self.topics.delta_chunk(4, 1)):
                self.send(topic, chunk)
                sent += 1
        for topic in hostile_topics(self.topics.base):
            self.send(topic, hostile_json()[0])
            sent += 1
        return sent


def start(command: list[str], log: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=log.open("ab"), stderr=subprocess.STDOUT, **kw)


def test_hostile_messages_leave_the_aggregator_and_the_device_up_across_restarts(
    tmp_path, minilm_bundle, mosquitto, edge_python
):
    root = Path(__file__).resolve().parent.parent
    port = free_port()
    server_cfg = tmp_path / "server.json"
    server_cfg.write_text(
        json.dumps(
            {
                "job": JOB,
                "bundle": str(minilm_bundle),
                "state_dir": str(tmp_path / "state"),
                "http_host": "127.0.0.1",
                "http_port": port,
                "broker": {"url": mosquitto.url, "protocol": "3.1.1"},
                "exit_when_finished": False,
                "rounds": {"rounds": 0, "min_devices": 1, "round_timeout": 120},
                "chunk_repair_after_s": 1.0,
                "train": {"local_steps": 2, "batch_size": 4},
            }
        )
    )
    data = tmp_path / "local.csv"
    data.write_text("text,label\n" + "".join(f"story number {i},{BBC_LABELS[i % 5]}\n" for i in range(24)))
    device_cfg = tmp_path / "device.json"
    device_cfg.write_text(
        json.dumps(
            {
                "device_id": "dev1",
                "job": JOB,
                "bundle": str(minilm_bundle),
                "data": str(data),
                "state_dir": str(tmp_path / "device"),
                "threads": 1,
                "broker": {"url": mosquitto.url, "protocol": "3.1.1"},
            }
        )
    )
    server_cmd = [str(Path(sys.executable).parent / "fedlora-server"), "--config", str(server_cfg)]
    device_cmd = [edge_python, "-m", "edge_client.cli", "run", "--config", str(device_cfg)]
    logs = {"server": tmp_path / "server.log", "device": tmp_path / "device.log"}
    tensor = Bundle(minilm_bundle).manifest.trainable[0].name
    hostile = Hostile(mosquitto.url)
    procs: dict[str, subprocess.Popen] = {}

    def up():
        return [(procs[k], logs[k]) for k in procs]

    def scrape() -> str:
        code, text = get(f"http://127.0.0.1:{port}/metrics")
        return text if code == 200 else ""

    try:
        hostile.retained_garbage()  # waiting on the broker before either process starts
        procs["server"] = start(server_cmd, logs["server"], cwd=root)
        procs["device"] = start(device_cmd, logs["device"], cwd=root)
        wait_for(
            lambda: metric(scrape(), "fedlora_messages_refused_total") > 0, 60, "the retained garbage refused", up()
        )
        wait_for(lambda: "round 1: training" in logs["device"].read_text(), 120, "round 1 to start training", up())
        sent = hostile.flood(tensor)
        assert sent > 500
        wait_for(lambda: metric(scrape(), "fedlora_rounds_completed_total") >= 3, 120, "rounds after the flood", up())
        code, body = get(f"http://127.0.0.1:{port}/healthz")
        assert code == 200 and body.strip() == "ok", body
        text = scrape()
        assert metric(text, 'fedlora_messages_refused_total{kind="status",reason="malformed"}') >= len(hostile_json())
        assert metric(text, 'fedlora_messages_refused_total{kind="status",reason="internal_error"}') == 0
        assert metric(text, 'fedlora_messages_refused_total{kind="updates",reason="internal_error"}') == 0
        assert metric(text, 'fedlora_updates_total{reason="malformed",result="rejected"}') >= 10
        assert metric(text, 'fedlora_messages_refused_total{kind="round",reason="foreign_announcement"}') >= 1

        # Restarts meet the retained garbage again (SIGKILL: no clean shutdown either).
        for name in ("server", "device"):
            procs[name].send_signal(signal.SIGKILL)
            procs[name].wait(10)
        hostile.retained_garbage()
        procs["server"] = start(server_cmd, logs["server"], cwd=root)
        procs["device"] = start(device_cmd, logs["device"], cwd=root)
        hostile.flood(tensor)
        wait_for(lambda: metric(scrape(), "fedlora_rounds_completed_total") >= 2, 120, "rounds after the restart", up())
        code, body = get(f"http://127.0.0.1:{port}/healthz")
        assert code == 200, body
        assert all(p.poll() is None for p in procs.values())
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
        hostile.link.close()
    from server.store import StateStore

    saved = StateStore(tmp_path / "state").load()
    assert saved["completed"] >= 5 and all(h["ok"] for h in saved["history"])
    device_log = logs["device"].read_text()
    server_log = logs["server"].read_text()
    for log in (device_log, server_log):
        assert "Traceback" not in log, log[-4000:]
    assert "update accepted" in device_log
    assert "refused a" in device_log  # the device saw the garbage and said so
