"""Sharded aggregation in a simulated job (``fedlora simulate --shards N``).

The coordinator is the simulation's own ``Aggregator`` (its loop, evaluations and report as in
an unsharded job); the N workers are ``fedlora-server`` processes (``python -m server.cli``), each
with the coordinator's configuration, ``shards.role: worker``, its shard index and its own state
folder, as the chart's worker StatefulSet runs them. Devices learn the shard count from the
round announcement and send each update to their shard's topic; nothing else changes for them.
Each worker's log is ``<out>/shard-workers/worker-<k>.log``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from core.config import to_dict
from core.errors import FedloraError
from server.config import ServerConfig
from server.shards import WORKER, ShardSettings

START_TIMEOUT_S = 120.0
STARTED = "worker of shard {k} of {count} started"  # its log line once subscribed (server.shard_worker)


def coordinator_config(server_cfg: ServerConfig, count: int) -> ServerConfig:
    """The simulation's aggregator as the coordinator of ``count`` shards (1: unchanged)."""
    if count <= 1:
        return server_cfg
    return dataclasses.replace(server_cfg, shards=ShardSettings(count=count))


def start_workers(server_cfg: ServerConfig, out: Path) -> list[subprocess.Popen]:
    """One worker process per shard of ``server_cfg`` (a coordinator's config), each subscribed
    before this returns, so that no update of the first round finds its shard unserved."""
    count = server_cfg.shards.count
    if count <= 1:
        return []
    folder = out / "shard-workers"
    folder.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDLORA_")}  # the config file says it all
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")])
    workers: list[subprocess.Popen] = []
    logs: list[Path] = []
    try:
        for k in range(count):
            cfg = dataclasses.replace(
                server_cfg,
                state_dir=out / f"aggregator-worker-{k}",
                shards=ShardSettings(count=count, role=WORKER, index=k, resend_s=server_cfg.shards.resend_s),
            )
            config = folder / f"worker-{k}.json"
            config.write_text(json.dumps(to_dict(cfg), default=str, indent=1))
            logs.append(folder / f"worker-{k}.log")
            with open(logs[-1], "wb") as log:
                workers.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "server.cli", "--config", str(config)],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                    )
                )
        deadline = time.monotonic() + START_TIMEOUT_S
        for k, (proc, log_path) in enumerate(zip(workers, logs)):
            while STARTED.format(k=k, count=count) not in log_path.read_text(errors="replace"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = log_path.read_text(errors="replace")[-2000:]
                    raise FedloraError(f"aggregator worker {k} did not start (its log, {log_path}):\n{tail}")
                time.sleep(0.05)
    except BaseException:
        stop_workers(workers, 0.0)
        raise
    print(f"[simulate] {count} aggregator workers started, one per shard (logs: {folder}/)", flush=True)
    return workers


def stop_workers(workers: list[subprocess.Popen], grace_s: float) -> list[int]:
    """Wait up to ``grace_s`` for the workers to exit (they do once the coordinator's plan says
    the job is finished), then terminate, then kill; returns their exit codes."""
    deadline = time.monotonic() + grace_s
    for proc in workers:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    return [proc.returncode for proc in workers]
