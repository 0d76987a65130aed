"""Flashing a device: build the bundle, install it with networking switched off, and run the
installed client the way its service does, against a real Mosquitto (with passwords) and a
running aggregator; kill it with SIGKILL mid-training and restart it.

The wheelhouse is downloaded from PyPI on the build side once and cached in
``.cache/edge-wheelhouse`` (keyed by what decides it); later runs build offline."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from core.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
WHEEL_CACHE = ROOT / ".cache" / "edge-wheelhouse"
JOB = "flash"
LOCAL_STEPS = 40  # a few seconds of training per round on 1 thread: long enough to kill it mid-way


# ---------------------------------------------------------------------------------------------
# Pure parts
# ---------------------------------------------------------------------------------------------


def test_platform_tags_include_older_manylinux():
    from edge_client.flashing.build import expand_platform, platform_machine

    tags = expand_platform("manylinux_2_28_x86_64")
    assert tags[0] == "manylinux_2_28_x86_64" and "manylinux_2_17_x86_64" in tags
    assert {"manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"} <= set(tags)
    arm = expand_platform("manylinux2014_aarch64")
    assert "manylinux_2_17_aarch64" in arm and "manylinux2014_aarch64" in arm
    assert not any(t.startswith(("manylinux1", "manylinux2010")) for t in arm)  # x86-only tags
    assert expand_platform("linux_aarch64") == ["linux_aarch64"]
    assert platform_machine("manylinux_2_28_aarch64") == platform_machine("linux_aarch64") == "aarch64"
    with pytest.raises(ConfigError, match="not a Linux wheel platform"):
        expand_platform("win_amd64")


def test_a_from_source_ort_wheel_replaces_the_pypi_one():
    from edge_client.flashing.build import plan_download

    reqs = ["numpy>=1.24", "paho-mqtt<3,>=2.1", "tokenizers>=0.15", "onnxruntime-training-cpu==1.19.2"]
    ort = Path("/wheels/onnxruntime_training-1.19.2+cpu-cp311-cp311-linux_aarch64.whl")
    plan, tags = plan_download(reqs, "manylinux_2_28_aarch64", ort)
    assert plan == reqs[:3] + [str(ort)]
    assert tags[0] == "manylinux_2_28_aarch64" and tags[-1] == "linux_aarch64"
    with pytest.raises(ConfigError, match="not for x86_64"):
        plan_download(reqs, "manylinux_2_28_x86_64", ort)


def test_the_client_wheel_carries_every_package_pyproject_lists():
    from edge_client.flashing.build import SOURCE_PACKAGES

    include = re.search(r"^include = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.M)[1]
    assert sorted(SOURCE_PACKAGES) == sorted(name.strip(' "*') for name in include.split(","))


def test_credentials_env_round_trip(tmp_path):
    from edge_client.flashing.layout import format_env_file, read_env_file

    env = {"FEDLORA_DEVICE_BROKER_PASSWORD": 'p "a" $s #1\\', "FEDLORA_DEVICE_BROKER_USERNAME": "dev-1"}
    path = tmp_path / "credentials.env"
    path.write_text(format_env_file(env, placeholder=True) + "export EXTRA='x y'\n")
    assert read_env_file(path) == {**env, "EXTRA": "x y"}
    path.write_text("not an assignment\n")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        read_env_file(path)


def test_train_window():
    from edge_client.device import DeviceConfig, in_train_window, parse_train_window

    assert parse_train_window("22:00-06:00") == (22 * 60, 6 * 60)
    night = [
        in_train_window("22:00-06:00", datetime(2026, 1, 1, h, m))
        for h, m in ((21, 59), (22, 0), (23, 59), (0, 0), (5, 59), (6, 0), (12, 0))
    ]
    assert night == [False, True, True, True, True, False, False]
    assert in_train_window("09:30-17:00", datetime(2026, 1, 1, 9, 30))
    assert not in_train_window("09:30-17:00", datetime(2026, 1, 1, 17, 0))
    assert in_train_window("", datetime(2026, 1, 1, 3, 0))
    for bad in ("22-06", "25:00-01:00", "10:00-10:00", "10:61-11:00"):
        with pytest.raises(ConfigError, match="train_window"):
            DeviceConfig(device_id="d", bundle=Path("b"), data=Path("x"), train_window=bad)


def test_due_round_waits_outside_the_training_window(monkeypatch):
    import types

    import edge_client.device as device
    from core.messages import Announcement, RoundState

    ann = Announcement(job="j", state=RoundState.OPEN, round=3, global_version=2, rank=4, selected=("d",))
    fake = types.SimpleNamespace(
        announcement=ann,
        cfg=types.SimpleNamespace(device_id="d", train_window="22:00-06:00"),
        state=types.SimpleNamespace(last_round=2, pending_round=None),
        global_version=2,
        _window_wait_round=None,
        _online=True,
    )
    for hour, due in ((12, None), (23, ann)):
        monkeypatch.setattr(device, "datetime", types.SimpleNamespace(now=lambda h=hour: datetime(2026, 1, 1, h, 0)))
        assert device.Device.due_round(fake) == due
    assert fake._window_wait_round == 3  # logged once for the round


def test_logs_for_the_journal_carry_priorities_and_no_timestamps(tmp_path, monkeypatch):
    from edge_client.cli import JournalFormatter, stderr_is_journal

    with open(tmp_path / "stream", "w") as fh:
        st = os.fstat(fh.fileno())
        monkeypatch.setattr(sys, "stderr", fh)
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert stderr_is_journal()
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
        assert not stderr_is_journal()  # inherited by a child whose stderr goes elsewhere
    fmt = JournalFormatter("%(name)s: %(message)s")
    record = logging.LogRecord("fedlora.device", logging.WARNING, __file__, 1, "two\nlines", None, None)
    assert fmt.format(record) == "<4>fedlora.device: two\n<4>lines"
    assert fmt.format(logging.LogRecord("x", logging.ERROR, __file__, 1, "m", None, None)) == "<3>x: m"


def test_doctor_fails_a_clock_behind_the_bundle():
    import types

    from edge_client.doctor import FAIL, OK, check_clock

    cfg = types.SimpleNamespace(broker=types.SimpleNamespace(tls=False, ca_file=None))
    doc = {"created_unix": 1_800_000_000, "created": "2027-01-15T08:00:00Z"}
    assert check_clock(cfg, doc, now=1_700_000_000).status == FAIL
    assert check_clock(cfg, doc, now=1_800_000_100).status in (OK, "WARN")
    # a build record without its readable time still says when the bundle was built
    behind = check_clock(cfg, {"created_unix": 1_800_000_000}, now=1_700_000_000)
    assert behind.status == FAIL and "2027-01-15 08:00:00 UTC" in behind.detail


# ---------------------------------------------------------------------------------------------
# Bundle contents (staging only: no archive, no venv)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client_wheel(tmp_path_factory) -> Path:
    """``pip wheel --no-deps`` of this checkout, once for the module's bundles."""
    from edge_client.flashing.build import build_client_wheel

    return build_client_wheel(tmp_path_factory.mktemp("client-wheel"))


def test_placeholder_bundle_for_a_memory_budget(tmp_path, minilm_bundles, client_wheel):
    """A device class with a memory budget and per-device credentials: the rank is picked as the
    device would, the unit is capped and hardened, and a re-install keeps a provisioned device."""
    from core.bundle import Bundle
    from edge_client.flashing.build import BundleOptions, stage_bundle
    from edge_client.flashing.install import install_files, verify_tree
    from edge_client.flashing.layout import PLACEHOLDER_MARK, read_env_file

    ladder = json.loads((minilm_bundles / "ladder.json").read_text())["ranks"]
    peaks = {int(r): info["peak_rss_bytes"] for r, info in ladder.items()}
    budget = (min(peaks.values()) >> 20) + 1  # the smallest rank fits (and any within 1 MiB of it)
    expected = max(r for r, peak in peaks.items() if peak <= budget << 20)  # the device's own rule
    config = tmp_path / "class.json"
    config.write_text(
        json.dumps(
            {
                "job": JOB,
                "bundle": "x",
                "data": "/srv/data.csv",
                "memory_budget_mb": budget,
                "broker": {"url": "mqtts://broker.example:8883", "password": "leaked"},
            }
        )
    )
    with pytest.raises(ConfigError, match="no device_id"):
        stage_bundle(
            BundleOptions(minilm_bundles, config, tmp_path / "o.tgz", cache_dir=WHEEL_CACHE, client_wheel=client_wheel),
            tmp_path / "s0",
        )
    doc = stage_bundle(
        BundleOptions(
            minilm_bundles,
            config,
            tmp_path / "o.tgz",
            placeholder=True,
            cache_dir=WHEEL_CACHE,
            client_wheel=client_wheel,
        ),
        tmp_path / "stage",
    )
    root = tmp_path / "stage" / "fedlora-edge-bundle"
    assert verify_tree(root) == doc and doc["rank"] == expected and doc["credentials"] == "placeholder"
    assert Bundle(root / "artifacts").manifest.rank == expected
    assert sorted(p.name for p in (root / "artifacts").iterdir()) == sorted(
        {"manifest.json"} | {n.split("/")[0] for n in Bundle(root / "artifacts").manifest.files}
    )
    device = json.loads((root / "config" / "device.json").read_text())
    assert device["bundle"] == "@PREFIX@/artifacts" and device["state_dir"] == "@STATE_DIR@"
    assert "password" not in device["broker"] and "device_id" not in device
    env = (root / "config" / "credentials.env").read_text()
    assert PLACEHOLDER_MARK in env and "FEDLORA_DEVICE_BROKER_PASSWORD=leaked" in env  # moved out of device.json
    assert stat.S_IMODE((root / "config" / "credentials.env").stat().st_mode) == 0o600
    unit = (root / "fedlora-edge.service").read_text()
    for line in (
        f"MemoryMax={budget}M",
        "Restart=always",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "ReadWritePaths=@STATE_DIR@",
        "User=@USER@",
        "StandardOutput=journal",
        "StartLimitIntervalSec=0",
    ):
        assert line in unit.splitlines(), line
    requirements = (root / "requirements.txt").read_text()
    assert re.search(r"^onnxruntime-training-cpu==1\.19\.2 --hash=sha256:[0-9a-f]{64}$", requirements, re.M)
    assert not re.search(r"^(torch|transformers|peft)==", requirements, re.M)

    prefix, state = tmp_path / "prefix", tmp_path / "prefix" / "state"
    settings = install_files(root, prefix, state)
    assert settings["PROVISIONED"] == "no"  # no device id anywhere yet
    assert "@PREFIX@" not in (prefix / "config" / "credentials.env").read_text()
    (prefix / "config" / "credentials.env").write_text("FEDLORA_DEVICE_DEVICE_ID=dev-7\n")  # provisioning
    settings = install_files(root, prefix, state)  # re-flash with the same class bundle
    assert settings["PROVISIONED"] == "yes"
    assert read_env_file(prefix / "config" / "credentials.env") == {"FEDLORA_DEVICE_DEVICE_ID": "dev-7"}
    (root / "artifacts" / "checkpoint").write_bytes(b"tampered")
    from core.errors import BundleError

    with pytest.raises(BundleError, match="artifacts/checkpoint does not match"):
        verify_tree(root)


# ---------------------------------------------------------------------------------------------
# The whole story
# ---------------------------------------------------------------------------------------------


def extract(archive: Path, dest: Path) -> Path:
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:
            tar.extractall(dest)
    return dest / "fedlora-edge-bundle"


def offline_wrapper() -> list[str]:
    """A command prefix that runs its command without any network (a fresh network namespace)."""
    for cmd in (["unshare", "--net"], ["unshare", "--map-root-user", "--net"]):
        if shutil.which(cmd[0]) and subprocess.run(cmd + ["true"], capture_output=True).returncode == 0:
            return cmd
    pytest.skip("cannot switch networking off here (unshare --net needs root or user namespaces)")


def device_env(**extra: str) -> dict:
    """The host's environment minus whatever would leak this checkout or its venvs into the
    installed client."""
    drop = ("PYTHON", "PIP_", "VIRTUAL_ENV", "FEDLORA_", "CONDA")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return {**env, **extra}


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.05)
    tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


def start_aggregator(bundle_dir: Path, state_dir: Path, url: str, rounds: int):
    from core.transport import BrokerConfig, MqttLink
    from server.aggregator import Aggregator
    from server.config import ServerConfig, TrainSettings
    from server.rounds import RoundSettings

    cfg = ServerConfig(
        job=JOB,
        bundle=bundle_dir,
        state_dir=state_dir,
        http_port=0,
        uplink_codec="topk0.1+int8+zlib",
        broker=BrokerConfig(url=url, username="aggregator", password="agg-secret"),
        rounds=RoundSettings(rounds=rounds, min_devices=1, round_timeout=300),
        train=TrainSettings(local_steps=LOCAL_STEPS, batch_size=4, lr=1e-3),
    )
    link = MqttLink(cfg.broker, client_id="agg-flash").connect()
    agg = Aggregator(cfg, link)
    stop = threading.Event()
    thread = threading.Thread(target=agg.run, args=(stop,), daemon=True)
    thread.start()
    return agg, stop, thread, link


def test_bundle_installs_offline_and_the_installed_client_survives_sigkill(
    tmp_path, minilm_bundles, client_wheel, mosquitto_factory
):
    from simulator.datasets import load_dataset, write_jsonl

    offline = offline_wrapper()
    # A broker that wants passwords: the device's come from the bundle's credentials.
    passwd = tmp_path / "passwd"
    for i, (user, password) in enumerate((("dev1", "s3cret pass#1"), ("aggregator", "agg-secret"))):
        subprocess.run(["mosquitto_passwd", "-b"] + ([] if i else ["-c"]) + [str(passwd), user, password], check=True)
    broker = mosquitto_factory(f"allow_anonymous false\npassword_file {passwd}\n")

    # 1. Build (host side, torch not needed): rank 4, real credentials.
    config = tmp_path / "device.json"
    config.write_text(
        json.dumps(
            {
                "device_id": "dev1",
                "job": JOB,
                "bundle": "exporter-output",
                "data": "/srv/data.jsonl",
                "threads": 1,
                "exit_when_finished": True,
                "broker": {"url": broker.url},
            }
        )
    )
    creds = tmp_path / "creds.json"
    creds.write_text(json.dumps({"username": "dev1", "password": "s3cret pass#1"}))
    archive = tmp_path / "device-bundle.tar.gz"
    t0 = time.monotonic()
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_client.cli",
            "bundle",
            "--artifacts",
            str(minilm_bundles),
            "--rank",
            "4",
            "--config",
            str(config),
            "--credentials",
            str(creds),
            "-o",
            str(archive),
            "--cache",
            str(WHEEL_CACHE),
            "--client-wheel",
            str(client_wheel),
            "--compress-level",
            "1",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    build_s = time.monotonic() - t0
    with tarfile.open(archive) as tar:
        members = {m.name: m for m in tar.getmembers()}
        top = "fedlora-edge-bundle/"
        assert stat.S_IMODE(members[top + "config/credentials.env"].mode) == 0o600
        assert not any(n.startswith(top + "artifacts/") and "/r2" in n for n in members)
    src = extract(archive, tmp_path / "unpacked")
    bundle_doc = json.loads((src / "BUNDLE-MANIFEST.json").read_text())
    assert bundle_doc["rank"] == 4 and bundle_doc["credentials"] == "provided"

    # 2. Install with networking switched off.
    probe = subprocess.run(
        offline + [sys.executable, "-c", "import socket; socket.create_connection(('pypi.org', 443), 3)"],
        capture_output=True,
        text=True,
    )
    assert probe.returncode != 0, "the offline wrapper still reaches the network"
    data = tmp_path / "data.jsonl"
    write_jsonl(data, load_dataset("bbc-news", max_examples=80).train)
    prefix = tmp_path / "opt" / "fedlora-edge"
    base_python = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    t0 = time.monotonic()
    install = subprocess.run(
        offline + ["sh", str(src / "install.sh")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=device_env(PREFIX=str(prefix), PYTHON=base_python, DATA=str(data)),
    )
    install_s = time.monotonic() - t0
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-3000:]
    assert "no service installed" in install.stdout  # no systemd here: the unit is rendered, not enabled
    py = prefix / "venv" / "bin" / "python"
    edge = prefix / "venv" / "bin" / "fedlora-edge"

    # 3. The installed environment: the installed client, and no torch.
    where = subprocess.run(
        [str(py), "-c", "import edge_client; print(edge_client.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=device_env(),
    )
    assert where.stdout.startswith(str(prefix / "venv")), where
    no_torch = subprocess.run([str(py), "-c", "import torch"], capture_output=True, text=True, env=device_env())
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    unit = (prefix / "fedlora-edge.service").read_text()
    assert (
        f"ExecStart={edge} run --config {prefix}/config/device.json --env-file {prefix}/config/credentials.env" in unit
    )
    assert f"ReadWritePaths={prefix}/state" in unit and "@" not in unit.replace("@system-service", "")
    cfg = json.loads((prefix / "config" / "device.json").read_text())
    assert cfg["bundle"] == f"{prefix}/artifacts" and cfg["data"] == str(data) and "password" not in cfg["broker"]
    if shutil.which("systemd-analyze"):  # the unit as systemd reads it (no systemd needs to run)
        verify = subprocess.run(
            ["systemd-analyze", "verify", "--man=no", str(prefix / "fedlora-edge.service")],
            capture_output=True,
            text=True,
        )
        complaints = [
            line
            for line in verify.stderr.splitlines()  # systemd < 254 lacks the backoff keys
            if not re.search(r"Unknown key '(RestartSteps|RestartMaxDelaySec)'", line)
        ]
        assert verify.returncode == 0 and not complaints, verify.stderr
        security = subprocess.run(
            ["systemd-analyze", "security", "--offline=yes", str(prefix / "fedlora-edge.service")],
            capture_output=True,
            text=True,
        )
        exposure = re.search(r"Overall exposure level for \S+: ([\d.]+)", security.stdout)
        if security.returncode == 0 and exposure:  # systemd >= 250
            assert float(exposure[1]) <= 3.0, security.stdout[-2000:]

    # 4. doctor: all good; then a wrong password is a FAIL with a non-zero exit.
    doctor = subprocess.run([str(edge), "doctor"], capture_output=True, text=True, cwd=tmp_path, env=device_env())
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    lines = doctor.stdout.splitlines()
    for name in ("python", "packages", "onnxruntime", "config", "bundle", "memory", "data", "state", "clock", "broker"):
        assert any(re.match(rf"(OK|WARN)\s+{name}\s", line) for line in lines), (name, doctor.stdout)
    assert "torch not installed" in doctor.stdout and "as dev1" in doctor.stdout
    bad = subprocess.run(
        [str(edge), "doctor"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=device_env(FEDLORA_DEVICE_BROKER_PASSWORD="wrong"),
    )
    assert bad.returncode == 1 and re.search(r"^FAIL\s+broker\s+.*(authori|refused)", bad.stdout, re.M | re.I), (
        bad.stdout
    )

    # 5. The installed client, started as the unit starts it, completes round 1.
    agg, stop, thread, link = start_aggregator(minilm_bundles / "r4", tmp_path / "aggregator", broker.url, rounds=2)
    command = unit.split("ExecStart=", 1)[1].splitlines()[0].split()
    state = prefix / "state"
    logs = [tmp_path / "client-1.log", tmp_path / "client-2.log"]
    procs = []
    try:
        procs.append(
            subprocess.Popen(command, stdout=logs[0].open("wb"), stderr=subprocess.STDOUT, cwd=state, env=device_env())
        )
        wait_for(lambda: agg.coordinator.completed >= 1, 240, "round 1 with the installed client", procs[0], logs[0])
        wait_for(lambda: "round 1: update accepted" in logs[0].read_text(), 30, "the ack", procs[0], logs[0])
        assert (state / "feedback.npz").is_file() and (state / "adapter.npz").is_file()

        # 6. SIGKILL during round 2's local training.
        wait_for(lambda: "round 2: training" in logs[0].read_text(), 120, "round 2 training", procs[0], logs[0])
        time.sleep(0.5)
        procs[0].send_signal(signal.SIGKILL)
        assert procs[0].wait(10) == -signal.SIGKILL
        text = logs[0].read_text()
        assert "round 2: update sent" not in text, "killed too late: training had finished"
        assert agg.coordinator.completed == 1
        saved = json.loads((state / "state.json").read_text())
        assert saved["last_round"] == 1 and saved["pending_round"] is None

        # 7. Restarted (as Restart=always would), it continues from its state: round 1 stays
        #    done, round 2 is trained again from the retained global adapter, and its update arrives.
        procs.append(
            subprocess.Popen(command, stdout=logs[1].open("wb"), stderr=subprocess.STDOUT, cwd=state, env=device_env())
        )
        wait_for(lambda: agg.coordinator.completed >= 2, 240, "round 2 after the restart", procs[1], logs[1])
        assert procs[1].wait(60) == 0  # exit_when_finished
        text = logs[1].read_text()
        assert "round 2: training" in text and "round 2: update accepted" in text
        assert "round 1: training" not in text
        assert json.loads((state / "state.json").read_text())["last_round"] == 2
        accepted = [e for e in agg.store.events() if e["event"] == "update_accepted"]
        assert [(e["round"], e["device"]) for e in accepted] == [(1, "dev1"), (2, "dev1")]
        assert [h["round"] for h in agg.history if h["ok"]] == [1, 2]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        stop.set()
        thread.join(10)
        link.close()

    # 8. Uninstall keeps the state unless PURGE=1.
    removed = subprocess.run(
        ["sh", str(prefix / "uninstall.sh")], capture_output=True, text=True, env=device_env(PREFIX=str(prefix))
    )
    assert removed.returncode == 0, removed.stderr
    assert not (prefix / "venv").exists() and (state / "state.json").is_file()
    print(
        f"\nbundle {archive.stat().st_size / 2**20:.1f} MiB built in {build_s:.1f}s, installed offline in {install_s:.1f}s"
    )


def test_slim_placeholder_bundle_installs_offline_and_is_provisioned_after(tmp_path, minilm_bundles, client_wheel):
    """--slim ships only what the client imports; --placeholder leaves the identity to each device.
    Installed offline, the client trains a step without torch; doctor fails until provisioned."""
    offline = offline_wrapper()
    config = tmp_path / "class.json"
    config.write_text(
        json.dumps(
            {"job": JOB, "bundle": "x", "data": "/srv/data.jsonl", "rank": 2, "broker": {"url": "mqtt://127.0.0.1:9"}}
        )
    )
    archive = tmp_path / "slim.tar.gz"
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_client.cli",
            "bundle",
            "--artifacts",
            str(minilm_bundles),
            "--config",
            str(config),
            "--placeholder",
            "--slim",
            "-o",
            str(archive),
            "--cache",
            str(WHEEL_CACHE),
            "--client-wheel",
            str(client_wheel),
            "--compress-level",
            "1",
        ],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    src = extract(archive, tmp_path / "unpacked")
    doc = json.loads((src / "BUNDLE-MANIFEST.json").read_text())
    assert doc["slim"] and doc["rank"] == 2 and doc["credentials"] == "placeholder"
    names = sorted(row["name"] for row in doc["wheels"])
    assert names == ["fedlora", "numpy", "onnxruntime-training-cpu", "paho-mqtt", "tokenizers"]

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"story {i}", "label": "tech"}) + "\n" for i in range(4)))
    prefix = tmp_path / "edge"
    base_python = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    install = subprocess.run(
        offline + ["sh", str(src / "install.sh")],
        capture_output=True,
        text=True,
        env=device_env(PREFIX=str(prefix), PYTHON=base_python, DATA=str(data)),
    )
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-3000:]
    assert "PROVISIONED=no" in (prefix / "install.env").read_text()
    py, edge = prefix / "venv" / "bin" / "python", prefix / "venv" / "bin" / "fedlora-edge"
    step = subprocess.run(
        [str(py), "-m", "edge_client.probe", str(prefix / "artifacts"), "--batch", "2", "--seq", "16", "--steps", "1"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=device_env(),
    )
    assert step.returncode == 0, step.stderr[-3000:]
    result = json.loads(step.stdout)
    assert result["rank"] == 2 and result["torch_loaded"] is False and 50 * 2**20 < result["peak_rss_bytes"]

    unprovisioned = subprocess.run(
        [str(edge), "doctor"], capture_output=True, text=True, cwd=tmp_path, env=device_env()
    )
    assert unprovisioned.returncode == 1 and re.search(r"^FAIL\s+config\s+.*device_id", unprovisioned.stdout, re.M)
    with open(prefix / "config" / "credentials.env", "a") as fh:
        fh.write("FEDLORA_DEVICE_DEVICE_ID=edge-42\n")
    provisioned = subprocess.run(
        [str(edge), "doctor", "--timeout", "2"], capture_output=True, text=True, cwd=tmp_path, env=device_env()
    )
    failed = re.findall(r"^FAIL\s+(\w+)", provisioned.stdout, re.M)
    assert failed == ["broker"], provisioned.stdout  # nothing listens on port 9: the only failure
    assert re.search(r"^OK\s+config\s+.*device edge-42", provisioned.stdout, re.M)
    assert re.search(r"^OK\s+packages\s+the bundle's 5 wheels", provisioned.stdout, re.M)
    assert re.search(r"^WARN\s+secagg\s+not available .*skips secure-aggregation rounds", provisioned.stdout, re.M)


def test_secagg_bundle_ships_the_secagg_extra_and_the_installed_device_can_run_secure_rounds(
    tmp_path, minilm_bundles, client_wheel
):
    """--secagg adds the secagg extra (cryptography, its cffi, pycryptodome) to a slim bundle; the
    default leaves it out. Installed offline, the device's doctor finds secure aggregation working
    (keys, sealed shares and Shamir: cryptography's bindings need cffi, which --no-deps would miss
    were it not declared)."""
    from edge_client.flashing.build import BundleOptions, stage_bundle

    offline = offline_wrapper()
    config = tmp_path / "class.json"
    config.write_text(json.dumps({"device_id": "sa-1", "job": JOB, "bundle": "x", "data": "/srv/d.jsonl", "rank": 2}))
    base = ["fedlora", "numpy", "onnxruntime-training-cpu", "paho-mqtt", "tokenizers"]
    docs = {}
    for secagg in (False, True):
        opts = BundleOptions(
            minilm_bundles, config, tmp_path / "o.tgz", secagg=secagg, client_wheel=client_wheel, cache_dir=WHEEL_CACHE
        )
        docs[secagg] = stage_bundle(opts, tmp_path / f"stage-{secagg}")
    assert not docs[False]["secagg"] and sorted(w["name"] for w in docs[False]["wheels"]) == base
    assert docs[True]["secagg"] and sorted(w["name"] for w in docs[True]["wheels"]) == sorted(
        base + ["cffi", "cryptography", "pycryptodome"]
    )
    root = tmp_path / "stage-True" / "fedlora-edge-bundle"
    assert re.search(
        r"^cryptography==[\d.]+ --hash=sha256:[0-9a-f]{64}$", (root / "requirements.txt").read_text(), re.M
    )
    assert "Secure aggregation: included" in (root / "README.txt").read_text()
    assert (
        "Secure aggregation: not included"
        in (tmp_path / "stage-False" / "fedlora-edge-bundle" / "README.txt").read_text()
    )

    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": "a story", "label": "tech"}) + "\n")
    prefix = tmp_path / "edge"
    base_python = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    install = subprocess.run(
        offline + ["sh", str(root / "install.sh")],
        capture_output=True,
        text=True,
        env=device_env(PREFIX=str(prefix), PYTHON=base_python, DATA=str(data)),
    )
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-3000:]
    doctor = subprocess.run(
        [str(prefix / "venv" / "bin" / "fedlora-edge"), "doctor", "--timeout", "1"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=device_env(),
    )
    assert re.search(r"^OK\s+secagg\s+secure aggregation available: cryptography", doctor.stdout, re.M), doctor.stdout
    assert re.search(r"^OK\s+packages\s+the bundle's 8 wheels", doctor.stdout, re.M), doctor.stdout
    torch_free = subprocess.run(
        [str(prefix / "venv" / "bin" / "python"), "-c", "import importlib.util as u; print(u.find_spec('torch'))"],
        capture_output=True,
        text=True,
        env=device_env(),
    )
    assert torch_free.stdout.strip() == "None"


def test_an_ort_wheel_file_is_bundled_in_place_of_the_pypi_requirement(tmp_path, minilm_bundle, client_wheel):
    """The --ort-wheel plumbing, with the PyPI wheel as the "from-source" file (no aarch64 here)."""
    from core.bundle import sha256_file
    from edge_client.flashing.build import (
        DEFAULT_PLATFORM,
        BundleOptions,
        fetch_wheelhouse,
        plan_download,
        stage_bundle,
        wheel_requirements,
    )

    reqs, tags = plan_download(wheel_requirements(client_wheel), DEFAULT_PLATFORM)
    ort = next(fetch_wheelhouse(reqs, tags, "3.11", ROOT / "constraints.txt", WHEEL_CACHE).glob("onnxruntime*.whl"))
    local = tmp_path / "built" / ort.name
    local.parent.mkdir()
    shutil.copyfile(ort, local)
    config = tmp_path / "device.json"
    config.write_text(json.dumps({"device_id": "arm-1", "bundle": "x", "data": "/srv/d.csv"}))
    doc = stage_bundle(
        BundleOptions(
            minilm_bundle,
            config,
            tmp_path / "o.tgz",
            ort_wheel=local,
            slim=True,
            client_wheel=client_wheel,
            cache_dir=WHEEL_CACHE,
        ),
        tmp_path / "stage",
    )
    assert doc["target"]["custom_ort_wheel"] and f"wheelhouse/{ort.name}" in doc["files"]
    assert doc["files"][f"wheelhouse/{ort.name}"]["sha256"] == sha256_file(local)
    assert sorted(w["name"] for w in doc["wheels"]) == [
        "fedlora",
        "numpy",
        "onnxruntime-training-cpu",
        "paho-mqtt",
        "tokenizers",
    ]
