"""The aggregator image: how big it is, how long it takes to build, how fast it is ready.

    .venv/bin/python bench/image_bench.py              # build afresh, 5 starts, write docs/benchmarks.md
    .venv/bin/python bench/image_bench.py --cached --starts 3 --no-write

Builds the repository's Dockerfile as tests/test_image.py does (``devkit.image``: buildah, with a
debootstrapped Debian bookworm as ``BASE_IMAGE`` in place of ``python:3.11-slim``; every layer
afresh unless ``--cached``), and records the image's size (its layers uncompressed, and gzip'd as
a registry would store them) and the layer the Dockerfile adds. Then it starts the image
``--starts`` times the way the chart runs it (read-only root file system, uid 10001, server.yaml,
state and bundle volumes, /tmp a tmpfs) against a local Mosquitto, with a fresh state volume
each time, and measures from the start to ``/healthz`` answering 200 (the bundle verified, the
HTTP server up) and to ``/readyz`` 200 (connected to the broker). Leader election and Events are off
(no Kubernetes API here): a leader's first Lease write adds one API round trip.

The bundle is the tests' MiniLM-L6 export, rank 4 (``devkit.assets.cached_export``, exported once).
Needs root, buildah, debootstrap and mosquitto (``apt-get install buildah debootstrap mosquitto``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # devkit: the benchmarks' and tests' kit, not installed

from devkit import image  # noqa: E402
from devkit.docsection import DocSection, command_line  # noqa: E402

DOC_SECTION = DocSection("image_bench", "bench/image_bench.py", "## The aggregator image: size and time to ready")
TAG = "localhost/fedlora-aggregator:bench"
MB = 1e6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mosquitto(workdir: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    conf = workdir / "mosquitto.conf"
    user = "user root\n" if os.geteuid() == 0 else ""
    conf.write_text(f"{user}listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(500):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.02)
    raise RuntimeError("mosquitto did not start")


def status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def bundle_dir() -> Path:
    from devkit.assets import minilm_bbc_export

    return minilm_bbc_export() / "r4"


def one_start(tag: str, bundle: Path, broker_port: int, workdir: Path) -> tuple[float, float]:
    """Seconds from the start to /healthz 200 and to /readyz 200."""
    port = free_port()
    config = workdir / "server.yaml"
    config.write_text(
        "job: bench\nbundle: /bundle\nstate_dir: /var/lib/fedlora/state\n"
        f"http_host: 127.0.0.1\nhttp_port: {port}\nbroker: {{url: 'mqtt://127.0.0.1:{broker_port}'}}\n"
        "kubernetes: {leader_election: false, events: false}\nexit_when_finished: false\n"
    )
    state = workdir / "state"
    state.mkdir()
    shutil.chown(state, 10001, 10001)
    mounts = [
        image.Mount("/etc/fedlora/server.yaml", config, read_only=True),
        image.Mount("/var/lib/fedlora", state),
        image.Mount("/bundle", bundle, read_only=True),
    ]
    container = image.Container(tag, workdir / "aggregator.log", mounts=mounts, user=10001, group=10001, groups=[10001])
    t0 = time.perf_counter()
    container.start()
    healthy = ready = None
    try:
        while ready is None and time.perf_counter() - t0 < 120:
            assert container.proc is not None and container.proc.poll() is None, (
                workdir / "aggregator.log"
            ).read_text()
            if healthy is None and status(f"http://127.0.0.1:{port}/healthz") == 200:
                healthy = time.perf_counter() - t0
            if healthy is not None and status(f"http://127.0.0.1:{port}/readyz") == 200:
                ready = time.perf_counter() - t0
            time.sleep(0.01)
    finally:
        container.stop()
    if healthy is None or ready is None:
        raise RuntimeError(f"not ready in 120 s:\n{(workdir / 'aggregator.log').read_text()[-3000:]}")
    return healthy, ready


def gzip_size(tag: str, workdir: Path) -> int:
    """Bytes of the image's layers gzip'd, as `buildah push` stores them in a registry."""
    out = workdir / "oci"
    subprocess.run(
        [
            "buildah",
            "push",
            "--quiet",
            "--compression-format",
            "gzip",
            "--disable-compression=false",
            tag,
            f"oci:{out}",
        ],
        check=True,
        capture_output=True,
    )
    import json

    index = json.loads((out / "index.json").read_text())
    digest = index["manifests"][0]["digest"].split(":", 1)[1]
    manifest = json.loads((out / "blobs" / "sha256" / digest).read_text())
    return sum(layer["size"] for layer in manifest["layers"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--starts", type=int, default=5, help="starts to time (default 5)")
    parser.add_argument("--cached", action="store_true", help="reuse cached layers (the build time then means little)")
    parser.add_argument("--no-write", action="store_true", help="print the section, leave docs/benchmarks.md alone")
    args = parser.parse_args(argv)
    reason = image.missing()
    if reason:
        sys.exit(f"image_bench: {reason}")
    wall0 = time.monotonic()
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="image-bench-") as tmp:
        work = Path(tmp)
        t0 = time.monotonic()
        base = image.base_image(log=work / "base.log")
        base_s = time.monotonic() - t0
        t0 = time.monotonic()
        built = image.build_image(TAG, {"BASE_IMAGE": base}, log=work / "build.log", cache=args.cached)
        build_s = time.monotonic() - t0
        if built.returncode != 0:
            sys.exit((work / "build.log").read_text()[-5000:])
        layers = image.image_layers(TAG)
        base_layers = image.image_layers(base)
        gz = gzip_size(TAG, work)
        bundle = bundle_dir()
        bundle_mb = sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file()) / MB
        broker, broker_port = start_mosquitto(work)
        times = []
        try:
            for i in range(args.starts):
                run_dir = work / f"start{i}"
                run_dir.mkdir()
                times.append(one_start(TAG, bundle, broker_port, run_dir))
        finally:
            broker.terminate()
            broker.wait(10)
    healthy = [h for h, _ in times]
    ready = [r for _, r in times]
    added = sum(layers) - sum(base_layers)
    body = f"""Machine: {os.cpu_count()} cores, Linux {os.uname().release}; 1-min load average {load0:.1f} at start,
{os.getloadavg()[0]:.1f} at end (the host is shared: times stretch with the load). buildah, chroot isolation (no Docker engine).
Base: Debian {image.SUITE} minbase with python3 (3.11), venv and CA certificates, made by debootstrap
({sum(base_layers) / MB:.0f} MB; {"cached" if base_s < 30 else f"{base_s:.0f} s to make"}), standing in for `python:3.11-slim`.

| | |
|---|---:|
| image, uncompressed (all layers) | {sum(layers) / MB:.0f} MB |
| of which the Dockerfile adds (the venv in /opt/fedlora, the user) | {added / MB:.0f} MB |
| image, gzip'd layers (what a registry stores and a node pulls) | {gz / MB:.0f} MB |
| build, {"cached layers" if args.cached else "every layer afresh"} (pip downloads included) | {build_s:.0f} s |
| start to `/healthz` 200, median of {len(times)} (min-max) | {statistics.median(healthy):.2f} s ({min(healthy):.2f}-{max(healthy):.2f}) |
| start to `/readyz` 200, median of {len(times)} (min-max) | {statistics.median(ready):.2f} s ({min(ready):.2f}-{max(ready):.2f}) |

A start is `buildah from` + mount of the image, the namespaces, the read-only root and the volumes,
then `fedlora-server` importing its modules, verifying the bundle (MiniLM-L6 rank 4,
{bundle_mb:.0f} MB, every file's sha256), opening the state store and connecting to Mosquitto on loopback."""
    argv_used = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--no-write"]
    details = f"({time.monotonic() - wall0:.0f} s, {date.today().isoformat()})"
    if args.no_write:
        print(DOC_SECTION.render(command_line("bench/image_bench.py", argv_used), body, details))
    else:
        print(DOC_SECTION.write(command_line("bench/image_bench.py", argv_used), body, details))


if __name__ == "__main__":
    main()
