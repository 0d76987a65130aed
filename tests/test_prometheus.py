"""A real Prometheus (Debian package) scrapes a real ``fedlora-server`` during a short
federated run of three torch-free device processes on BBC News, and is asked over its HTTP
API what it saw. It also evaluates the chart's alert rules on that data (none may fire, none
may fail) and every query of the Grafana dashboard."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import free_port

from simulator.datasets import load_dataset, partition, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "fedlora-aggregator"
JOB = "fedlora-aggregator"  # the scrape job name the rule file selects without the Prometheus Operator


class Prometheus:
    def __init__(self, workdir: Path, target: str, rule_file: Path):
        binary = shutil.which("prometheus") or "/usr/bin/prometheus"
        if not Path(binary).exists():
            pytest.fail("prometheus is not installed: apt-get install prometheus (.ci/run and scripts/test.sh do)")
        self.port = free_port()
        config = workdir / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(rule_file)],
                    "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [target]}]}],
                }
            )
        )
        self.log = open(workdir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def api(self, path: str, **params) -> dict:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        assert len(result) <= 1, (expr, result)
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def wait_for(predicate, timeout: float, what: str, logs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(0.5)
    tails = "\n".join(f"--- {p}\n{Path(p).read_text(errors='replace')[-3000:]}" for p in logs if Path(p).exists())
    raise AssertionError(f"timed out waiting for {what}\n{tails}")


def dashboard_queries() -> list[tuple[str, str]]:
    dash = json.loads((CHART / "files" / "dashboard.json").read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


def test_prometheus_scrapes_a_real_federated_run(tmp_path, minilm_bundle, edge_python, mosquitto):
    data = load_dataset("bbc-news", seed=0, max_examples=90)
    shards = partition(data.train, 3, "iid", seed=0)
    metrics_port = free_port()
    config = tmp_path / "server.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "job": "prom",
                "bundle": str(minilm_bundle),
                "state_dir": str(tmp_path / "state"),
                "broker": {"url": mosquitto.url},
                "http_host": "127.0.0.1",
                "http_port": metrics_port,
                "exit_when_finished": False,  # keep serving so Prometheus sees the final values
                "rounds": {"rounds": 2, "min_devices": 3, "round_timeout": 300},
                "train": {"local_steps": 3, "batch_size": 4, "lr": 2e-3},
            }
        )
    )
    server_log = tmp_path / "server.log"
    procs, logs = [], [server_log]
    prometheus = Prometheus(tmp_path, f"127.0.0.1:{metrics_port}", CHART / "files" / "alerts.yaml")
    logs.append(tmp_path / "prometheus.log")
    try:
        code = "import sys; from server.cli import server_main; sys.exit(server_main())"
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", code, "--config", str(config)],
                cwd=ROOT,
                stdout=open(server_log, "wb"),
                stderr=subprocess.STDOUT,
            )
        )
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        for i, idx in enumerate(shards):
            ddir = tmp_path / f"dev{i}"
            write_jsonl(ddir / "data.jsonl", [data.train[j] for j in idx])
            (ddir / "device.json").write_text(
                json.dumps(
                    {
                        "device_id": f"dev{i}",
                        "job": "prom",
                        "bundle": str(minilm_bundle),
                        "data": str(ddir / "data.jsonl"),
                        "state_dir": str(ddir / "state"),
                        "broker": {"url": mosquitto.url},
                        "threads": 1,
                        "exit_when_finished": True,
                    }
                )
            )
            logs.append(ddir / "device.log")
            procs.append(
                subprocess.Popen(
                    [edge_python, "-m", "edge_client.cli", "run", "--config", str(ddir / "device.json")],
                    stdout=open(ddir / "device.log", "wb"),
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=ROOT,
                )
            )

        def completed():
            for p in procs:
                assert p.poll() in (None, 0), f"a process exited with {p.returncode}\n" + "".join(
                    f"--- {f}\n{Path(f).read_text(errors='replace')[-2000:]}" for f in logs if Path(f).exists()
                )
            return (prometheus.value(f'fedlora_rounds_completed_total{{job="{JOB}"}}') or 0) >= 2

        wait_for(completed, 240, "Prometheus to see 2 completed rounds", logs)
        # The last round's counters are in the same scrape as its completion; one more for safety.
        time.sleep(2)

        assert prometheus.value(f'up{{job="{JOB}"}}') == 1
        assert prometheus.value("fedlora_rounds_completed_total") == 2
        assert prometheus.value("fedlora_rounds_failed_total") == 0
        assert prometheus.value("fedlora_round_participants") == 3
        assert prometheus.value("fedlora_round_selected") == 3
        assert prometheus.value('sum(fedlora_updates_total{result="accepted"})') == 6
        assert prometheus.value('sum(fedlora_updates_total{result="rejected"})') is None
        for direction in ("uplink", "downlink"):
            for kind in ("wire", "raw"):
                assert prometheus.value(f'fedlora_{direction}_bytes_total{{kind="{kind}"}}') > 0, (direction, kind)
        assert prometheus.value("fedlora_round_duration_seconds_count") == 2
        assert prometheus.value("fedlora_aggregation_seconds_count") == 2
        assert prometheus.value("fedlora_device_step_seconds_count") == 6  # one report per accepted update
        assert prometheus.value("fedlora_device_peak_rss_bytes_sum") / 6 > 50 * 2**20
        assert prometheus.value("fedlora_leader") == 1
        assert prometheus.value("fedlora_devices_online") is not None
        assert prometheus.value("fedlora_round_timeout_seconds") == 300
        wait_for(lambda: prometheus.value("fedlora_job_finished") == 1, 20, "the job to be finished", logs)
        (build,) = prometheus.query("fedlora_build_info")
        assert build["metric"]["version"] and build["metric"]["python_version"]
        series = prometheus.api("series", **{"match[]": '{__name__=~"fedlora_.*"}'})
        assert not any(k in s for s in series for k in ("device", "device_id")), "a per-device label"

        # The alert rules evaluate on real data without errors, and a healthy run fires none.
        groups = wait_for(
            lambda: [
                g
                for g in prometheus.api("rules")["groups"]
                if all(r.get("lastEvaluation", "").startswith("20") for r in g["rules"])
            ],
            30,
            "the rules to be evaluated",
            logs,
        )
        rules = [r for g in groups for r in g["rules"]]
        assert len(rules) == 7 and all(r["health"] == "ok" for r in rules), [
            (r["name"], r.get("lastError")) for r in rules
        ]
        assert prometheus.api("alerts")["alerts"] == []

        # Every dashboard query runs, with the Grafana variables as "All".
        empty = []
        for title, expr in dashboard_queries():
            q = (
                expr.replace("$__rate_interval", "1m")
                .replace("$__range", "5m")
                .replace('"$job"', '".*"')
                .replace('"$namespace"', '".*"')
            )
            result = prometheus.query(q)
            if not result:
                empty.append(title)
        assert set(empty) <= {"Kubernetes API errors"}, empty  # no API calls without Kubernetes
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        prometheus.stop()
    assert procs[0].returncode == 0, server_log.read_text()[-3000:]  # SIGTERM is a clean stop


def test_evaluation_gauges_start_unknown():
    """Evaluation gauges start as NaN ("not evaluated"), not 0 (a perfect loss)."""
    from server.metrics import Metrics

    m = Metrics()
    assert math.isnan(m.eval_loss._value.get()) and math.isnan(m.eval_accuracy._value.get())
