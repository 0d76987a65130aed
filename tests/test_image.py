"""The aggregator image, built from the repository's Dockerfile and run as the Helm chart runs it;
and the device bundle installed and trained in a clean Debian root file system without network.

No Docker engine is needed (devkit/image.py): buildah builds the Dockerfile from a debootstrapped
Debian bookworm base (cached in .cache/image/) passed as ``BASE_IMAGE``, in place of
``python:3.11-slim``. The image then runs from its own root file system the way the chart's
Deployment says, read from ``helm template``: its args, environment, uid/gid/fsGroup, read-only
root file system and volume mounts (the rendered ``server.yaml`` ConfigMap at its subPath, the state
and bundle claims, the /tmp emptyDir), on the host's network, against a real Mosquitto and a
loopback stand-in for the Kubernetes API (tests/fake_apiserver.py; its kubeconfig is mounted in place of the
service account token, the one thing not as in a cluster). Devices outside the container complete a round.

The integration tests skip, saying why, where root, buildah or debootstrap are missing (.ci/run
installs them).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import free_port
from fake_apiserver import FakeApiServer
from helm_tools import CHART, helm_binary

from devkit import image
from scripts.slim_venv import to_remove

ROOT = Path(__file__).resolve().parent.parent
TAG = "localhost/fedlora-aggregator:test"
SOURCE = "https://example.org/fedlora"  # the SOURCE build argument, checked in the label
JOB = "image"
NAMESPACE = "fedlora"
POD = {"metadata.name": "rel-fedlora-aggregator-7d9f-abcde", "metadata.namespace": NAMESPACE}
POD["metadata.uid"] = "0b8c1e9e-3f0e-4c1e-9d7a-6f1f2b3c4d5e"
# What the aggregator image must not carry (torch above all), and what it must.
NEVER_IN_IMAGE = ("torch", "sympy", "onnx", "h5py", "huggingface_hub", "aiohttp", "pip", "simulator", "export")
SCRIPTS = ("fedlora-server", "fedlora-edge")  # fedlora's console scripts whose packages the image holds
WHEEL_CACHE = ROOT / ".cache" / "edge-wheelhouse"


def test_slimming_removes_what_only_removed_distributions_require():
    requires = {
        "onnxruntime-training-cpu": {"numpy", "sympy", "packaging"},
        "sympy": {"mpmath"},
        "mpmath": set(),
        "dp-accounting": {"mpmath", "numpy"},
        "numpy": set(),
        "packaging": set(),
        "tokenizers": {"huggingface-hub"},
        "huggingface-hub": {"tqdm", "packaging", "httpx2"},
        "tqdm": set(),
        "httpx2": {"anyio"},
        "anyio": set(),
    }
    assert to_remove(requires, ["sympy", "huggingface_hub", "not-installed"]) == {
        "sympy",
        "huggingface-hub",
        "tqdm",
        "httpx2",
        "anyio",
    }  # mpmath stays for dp-accounting, packaging for ONNX Runtime
    del requires["dp-accounting"]
    assert "mpmath" in to_remove(requires, ["sympy"])


@pytest.fixture(scope="module")
def tools():
    reason = image.missing()
    if reason:
        pytest.skip(f"cannot build or run container images here: {reason}")


@pytest.fixture(scope="module")
def aggregator_image(tools, tmp_path_factory) -> str:
    """The Dockerfile built (layers cached in the local store, so an unchanged tree rebuilds in seconds)."""
    log = tmp_path_factory.mktemp("image") / "build.log"
    base = image.base_image(log=log)
    built = image.build_image(TAG, {"BASE_IMAGE": base, "SOURCE": SOURCE, "REVISION": "test"}, log=log)
    assert built.returncode == 0, f"the Dockerfile does not build:\n{log.read_text(errors='replace')[-5000:]}"
    return TAG


# ---------------------------------------------------------------------------------------------
# What the image is
# ---------------------------------------------------------------------------------------------

PROBE = """
import importlib.metadata as md, importlib.util, json, os, subprocess, sys
found = {name: importlib.util.find_spec(name) is not None for name in sys.argv[1].split(",")}
scripts = {}
for script in sys.argv[2].split(","):
    path = os.path.join("/opt/fedlora/bin", script)
    if os.path.exists(path):
        run = subprocess.run([path, "--help"], capture_output=True, text=True)
        scripts[script] = [run.returncode, run.stderr[-300:]]
root_writable = True
try:
    open("/probe", "w").close()
except OSError:
    root_writable = False
print(json.dumps({"found": found, "scripts": scripts, "uid": os.getuid(), "root_writable": root_writable,
                  "dists": sorted(d.metadata["Name"].lower() for d in md.distributions())}))
"""


@pytest.mark.integration
def test_image_metadata_labels_and_contents(aggregator_image, tmp_path):
    """OCI labels, the entrypoint the chart relies on, the user it runs as; no torch, nothing the
    aggregator never imports, and every Python console script left in the image runs."""
    config = image.image_config(aggregator_image)
    labels = config["Labels"]
    pyproject = (ROOT / "pyproject.toml").read_text()  # no tomllib on 3.10
    project = {
        "version": re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1),  # type: ignore[union-attr]
        "license": re.search(r'^license = \{ text = "([^"]+)" \}', pyproject, re.M).group(1),  # type: ignore[union-attr]
        "scripts": re.findall(r'^([a-z-]+) = "[\w.]+:\w+"$', pyproject.split("[project.scripts]")[1], re.M),
    }
    assert set(SCRIPTS) < set(project["scripts"]), project["scripts"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert labels["org.opencontainers.image.version"] == project["version"] == chart["appVersion"]
    assert labels["org.opencontainers.image.licenses"] == project["license"]
    assert labels["org.opencontainers.image.source"] == SOURCE
    assert labels["org.opencontainers.image.revision"] == "test"
    assert config["Entrypoint"] == ["fedlora-server"] and config["User"] == "10001:10001"
    assert config["WorkingDir"] == "/var/lib/fedlora"
    assert not any(e.startswith("PIP_") for e in config["Env"]), config["Env"]  # build settings stay out

    code, out = image.run_once(
        aggregator_image,
        tmp_path / "probe.log",
        command=[
            "python",
            "-c",
            PROBE,
            ",".join(NEVER_IN_IMAGE + ("server", "onnxruntime", "kubernetes")),
            ",".join(project["scripts"]),
        ],
        user=10001,
        group=10001,
    )
    assert code == 0, out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["uid"] == 10001 and not result["root_writable"]
    assert {k for k, v in result["found"].items() if v} == {"server", "onnxruntime", "kubernetes"}, result["found"]
    assert sorted(result["scripts"]) == sorted(SCRIPTS), result["scripts"]  # none whose package is not there
    assert all(code == 0 for code, _ in result["scripts"].values()), result["scripts"]
    assert "fedlora" in result["dists"] and "onnxruntime-training-cpu" in result["dists"]
    print(f"\nimage {image.image_size(aggregator_image) / 1e6:.0f} MB, {len(result['dists'])} distributions")


# ---------------------------------------------------------------------------------------------
# Run as the chart runs it
# ---------------------------------------------------------------------------------------------


def render_chart(*sets: str) -> list[dict]:
    home = str(ROOT / ".cache" / "helm" / "home")
    env = {"HELM_CACHE_HOME": home, "HELM_CONFIG_HOME": home, "HELM_DATA_HOME": home, "PATH": "/usr/bin:/bin"}
    args = [str(helm_binary()), "template", "rel", str(CHART), "--namespace", NAMESPACE]
    for s in sets:
        args += ["--set", s]
    out = subprocess.run(args, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def pod_mounts(deployment: dict, container: dict, sources: dict[str, Path]) -> list[image.Mount]:
    """The container's volumeMounts with the pod's volumes made on the host: a ConfigMap as its
    files, an emptyDir as a tmpfs, a claim as the folder ``sources`` names for it."""
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mounts = []
    for vm in container["volumeMounts"]:
        volume = volumes[vm["name"]]
        if "configMap" in volume:
            source = sources[f"configmap/{volume['configMap']['name']}"]
        elif "emptyDir" in volume:
            source = None
        elif "persistentVolumeClaim" in volume:
            source = sources[f"pvc/{volume['persistentVolumeClaim']['claimName']}"]
        else:
            raise AssertionError(f"a volume the test does not know how to provide: {volume}")
        if source is not None and vm.get("subPath"):
            source = source / vm["subPath"]
        mounts.append(image.Mount(vm["mountPath"], source, bool(vm.get("readOnly"))))
    return mounts


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


def wait_for(predicate, timeout: float, what: str, logs: tuple[Path, ...] = (), alive=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if alive is not None and not alive():
            break
        time.sleep(0.1)
    tails = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in logs if p.exists())
    raise AssertionError(f"timed out waiting for {what}\n{tails}")


def metric(text: str, name: str) -> float | None:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


@pytest.mark.integration
def test_image_runs_as_the_chart_runs_it_and_devices_complete_a_round(
    aggregator_image, minilm_bundle, mosquitto, edge_python, tmp_path
):
    from simulator.datasets import load_dataset, write_jsonl

    port = free_port()
    docs = render_chart(
        "broker.enabled=false",
        f"config.broker.url={mosquitto.url}",
        "mqtt.auth.username=",
        f"config.job={JOB}",
        f"service.port={port}",
        "config.rounds.rounds=1",
        "config.rounds.min_devices=2",
        "config.rounds.round_timeout=300",
        "config.train.local_steps=2",
        "config.train.batch_size=4",
        "extraEnv[0].name=KUBECONFIG",
        "extraEnv[0].value=/etc/fedlora-test/kubeconfig",
    )
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    configmap = next(d for d in docs if d["kind"] == "ConfigMap" and "server.yaml" in d.get("data", {}))
    pod = deployment["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "aggregator")
    server_yaml = yaml.safe_load(configmap["data"]["server.yaml"])
    assert server_yaml["kubernetes"]["leader_election"] and server_yaml["kubernetes"]["events"]  # chart defaults

    # The pod's volumes on the host: the ConfigMap's files, the state claim (owned by fsGroup, as
    # the kubelet makes it), the bundle claim holding the exported bundle.
    config_dir = tmp_path / "configmap"
    config_dir.mkdir()
    for key, text in configmap["data"].items():
        (config_dir / key).write_text(text)
    state = tmp_path / "state"
    state.mkdir()
    security = {**pod["securityContext"], **container["securityContext"]}
    shutil.chown(state, security["fsGroup"], security["fsGroup"])
    state.chmod(0o2775)
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v
    }
    mounts = pod_mounts(
        deployment,
        container,
        {
            f"configmap/{configmap['metadata']['name']}": config_dir,
            f"pvc/{claims['state']}": state,
            f"pvc/{claims['bundle']}": minilm_bundle,
        },
    )
    apiserver = FakeApiServer().start()
    kube = tmp_path / "kube"
    kube.mkdir()
    (kube / "kubeconfig").write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": apiserver.url}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u", "namespace": NAMESPACE}}],
                "current-context": "c",
            }
        )
    )
    mounts.append(image.Mount("/etc/fedlora-test", kube, read_only=True))
    env = {}
    for e in container["env"]:
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "fieldRef" in e.get("valueFrom", {}):
            env[e["name"]] = POD[e["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            raise AssertionError(f"an env source the test does not provide: {e}")
    assert security["readOnlyRootFilesystem"] and security["runAsNonRoot"] and not security["allowPrivilegeEscalation"]
    assert security["capabilities"]["drop"] == ["ALL"]

    log = tmp_path / "aggregator.log"
    server = image.Container(
        aggregator_image,
        log,
        args=container["args"],
        env=env,
        mounts=mounts,
        user=security["runAsUser"],
        group=security["runAsGroup"],
        groups=[security["fsGroup"]],
        read_only=security["readOnlyRootFilesystem"],
    ).start()
    base = f"http://127.0.0.1:{server_yaml['http_port']}"
    devices: list[subprocess.Popen] = []
    device_logs: list[Path] = []
    try:
        alive = lambda: server.proc.poll() is None  # noqa: E731
        wait_for(lambda: get(f"{base}/healthz")[0] == 200, 120, "/healthz", (log,), alive)
        pid = server.payload_pid()  # the aggregator as the host sees it: the pod's user, no privileges
        assert pid is not None, log.read_text()
        status = Path(f"/proc/{pid}/status").read_text()
        assert re.search(r"^Uid:\s+10001\s+10001\s+10001\s+10001$", status, re.M), status
        assert re.search(r"^Groups:\s+10001\s*$", status, re.M) and re.search(r"^NoNewPrivs:\s+1$", status, re.M)
        assert re.search(r"^CapEff:\s+0+$", status, re.M) and re.search(r"^CapPrm:\s+0+$", status, re.M)
        lease = server_yaml["kubernetes"]["lease_name"]
        wait_for(lambda: apiserver.holder(NAMESPACE, lease) == POD["metadata.name"], 60, "the Lease", (log,), alive)
        wait_for(lambda: get(f"{base}/readyz")[0] == 200, 60, "/readyz (leader, connected)", (log,), alive)

        # Two devices outside the container (the torch-free device environment).
        examples = load_dataset("bbc-news", max_examples=40).train
        for i in range(2):
            d = tmp_path / f"device{i}"
            d.mkdir()
            write_jsonl(d / "data.jsonl", examples[i::2])
            (d / "device.json").write_text(
                json.dumps(
                    {
                        "device_id": f"dev{i}",
                        "job": JOB,
                        "bundle": str(minilm_bundle),
                        "data": str(d / "data.jsonl"),
                        "state_dir": str(d / "state"),
                        "threads": 1,
                        "exit_when_finished": True,
                        "broker": {"url": mosquitto.url},
                    }
                )
            )
            device_logs.append(d / "device.log")
            devices.append(
                subprocess.Popen(
                    [edge_python, "-m", "edge_client.cli", "run", "--config", str(d / "device.json")],
                    stdout=device_logs[-1].open("wb"),
                    stderr=subprocess.STDOUT,
                    cwd=d,
                )
            )
        wait_for(
            lambda: metric(get(f"{base}/metrics")[1], "fedlora_rounds_completed_total") == 1.0,
            300,
            "round 1 through the image",
            (log, *device_logs),
            alive,
        )
        for proc, dlog in zip(devices, device_logs):
            assert proc.wait(120) == 0, dlog.read_text()[-3000:]  # exit_when_finished
            assert "round 1: update accepted" in dlog.read_text()
        status_code, metrics = get(f"{base}/metrics")
        assert status_code == 200 and metric(metrics, "fedlora_job_finished") == 1.0
        assert metric(metrics, "fedlora_leader") == 1.0
        accepted = [line for line in metrics.splitlines() if line.startswith("fedlora_updates_total{")]
        accepted = [line for line in accepted if 'result="accepted"' in line and 'reason="ok"' in line]
        assert accepted and accepted[0].endswith(" 2.0"), metrics
        assert get(f"{base}/healthz")[0] == 200 and get(f"{base}/readyz")[0] == 200

        # What the aggregator wrote went to the state volume, as its user; Events reached the API.
        adapter = state / "state" / "adapters" / "v000001" / "adapter_model.safetensors"
        assert adapter.is_file() and adapter.stat().st_uid == 10001
        events = [json.loads(x) for x in (state / "state" / "events.jsonl").read_text().splitlines()]
        assert [e["event"] for e in events].count("update_accepted") == 2
        assert any(e.get("reason") == "RoundCompleted" for e in apiserver.events), apiserver.events
        assert server.proc.poll() is None, log.read_text()[-3000:]
    finally:
        for proc in devices:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        code = server.stop()
        apiserver.stop()
    assert code == 0, f"SIGTERM did not stop the aggregator cleanly ({code}):\n{log.read_text()[-3000:]}"
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


# ---------------------------------------------------------------------------------------------
# The device side: a clean Debian, no network
# ---------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_device_bundle_installs_and_trains_in_a_clean_debian_without_network(tools, minilm_bundles, tmp_path):
    """The offline bundle's install.sh in a debootstrapped Debian bookworm (python3 only, no
    python3-venv, no ensurepip) with networking off, then a real training step there, torch-free."""
    from edge_client.flashing.build import build_client_wheel

    config = tmp_path / "device.json"
    config.write_text(
        json.dumps(
            {
                "device_id": "deb-1",
                "job": JOB,
                "bundle": "exporter-output",
                "data": "/srv/data.jsonl",
                "threads": 1,
                "broker": {"url": "mqtt://broker.invalid:1883"},
            }
        )
    )
    archive = tmp_path / "bundle.tar.gz"
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_client.cli",
            "bundle",
            "--artifacts",
            str(minilm_bundles),
            "--rank",
            "2",
            "--config",
            str(config),
            "-o",
            str(archive),
            "--cache",
            str(WHEEL_CACHE),
            "--client-wheel",
            str(build_client_wheel(tmp_path / "wheel")),
            "--compress-level",
            "1",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert built.returncode == 0, built.stderr[-3000:]

    rootfs = image.unpack_rootfs(tmp_path / "debian", log=tmp_path / "rootfs.log")
    shutil.copy(archive, rootfs / "root" / "bundle.tar.gz")
    with tarfile.open(archive) as tar:
        assert "fedlora-edge-bundle/install.sh" in tar.getnames()
    (rootfs / "srv").mkdir(exist_ok=True)
    (rootfs / "srv" / "data.jsonl").write_text(
        "".join(json.dumps({"text": f"a short story number {i}", "label": "tech"}) + "\n" for i in range(8))
    )

    # A clean device: Debian's python3 without venv's ensurepip, and no way out.
    check = image.run_in_rootfs(
        rootfs,
        [
            "python3",
            "-c",
            "import socket, sys, importlib.util\n"
            "print('ensurepip', importlib.util.find_spec('ensurepip') is not None)\n"
            "try:\n socket.create_connection(('192.0.2.1', 80), 3); print('network up')\n"
            "except OSError as e:\n print('network', e)\n",
        ],
    )
    assert check.returncode == 0, check.stderr
    assert "ensurepip False" in check.stdout and "network up" not in check.stdout, check.stdout

    install = image.run_in_rootfs(
        rootfs,
        ["sh", "-c", "tar -xzf bundle.tar.gz && PREFIX=/opt/fedlora-edge sh fedlora-edge-bundle/install.sh"],
        timeout=600,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    assert "no service installed" in install.stdout  # no systemd in the root file system

    step = image.run_in_rootfs(
        rootfs,
        [
            "/opt/fedlora-edge/venv/bin/python",
            "-m",
            "edge_client.probe",
            "/opt/fedlora-edge/artifacts",
            "--batch",
            "2",
            "--seq",
            "16",
            "--steps",
            "1",
        ],
        timeout=300,
    )
    assert step.returncode == 0, step.stderr[-3000:]
    result = json.loads(step.stdout)
    assert result["rank"] == 2 and result["torch_loaded"] is False, result
    assert (rootfs / "opt" / "fedlora-edge" / "venv" / "bin" / "fedlora-edge").is_file()
    assert not (rootfs / "opt" / "fedlora-edge" / "venv" / "lib" / "python3.11" / "site-packages" / "torch").exists()
