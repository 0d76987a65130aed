"""``fedlora-edge``: run the device client, check a device, build a device bundle."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from core.errors import FedloraError

# Python logging level -> syslog priority, as sd-daemon(3) prefixes ("<3>" error ... "<7>" debug).
SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class JournalFormatter(logging.Formatter):
    """``<priority>name: message`` on every line: journald takes the priority from the prefix
    and adds its own timestamps."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{SYSLOG_PRIORITY.get(record.levelno, 6)}>"
        return prefix + super().format(record).replace("\n", "\n" + prefix)


def stderr_is_journal() -> bool:
    """True when stderr is connected to journald (systemd sets JOURNAL_STREAM=device:inode)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


def setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if stderr_is_journal():
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True)


def default_config() -> str | None:
    """The config of the install this client runs from (``PREFIX/venv`` -> ``PREFIX/config``)."""
    candidate = Path(sys.prefix).parent / "config" / "device.json"
    return str(candidate) if candidate.is_file() else None


def apply_env_file(path: str | None, config: str | None) -> str | None:
    """Load ``KEY=VALUE`` credentials into the environment (variables already set win).

    Default: ``credentials.env`` beside the config, where install.sh puts it."""
    from edge_client.flashing.layout import read_env_file

    if path is None and config:
        beside = Path(config).parent / "credentials.env"
        path = str(beside) if beside.is_file() else None
    if path is None:
        return None
    for key, value in read_env_file(path).items():
        os.environ.setdefault(key, value)
    return path


def _run(args) -> int:
    from edge_client.device import Device, load_device_config

    overrides = {
        "device_id": args.device_id,
        "bundle": args.bundle,
        "data": args.data,
        "state_dir": args.state_dir,
        "job": args.job,
        "threads": args.threads,
        "exit_when_finished": args.exit_when_finished,
    }
    if args.broker:
        overrides["broker"] = {"url": args.broker}
    apply_env_file(args.env_file, args.config)
    cfg = load_device_config(args.config, overrides)
    device = Device(cfg)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    device.run(stop)
    return 0


def _doctor(args) -> int:
    from edge_client.doctor import print_report, run_checks

    config = args.config or default_config()
    env_file = apply_env_file(args.env_file, config)
    checks = run_checks(config, env_file=env_file, broker_timeout=args.timeout)
    return print_report(checks)


def _bundle(args) -> int:
    from edge_client.flashing.build import BundleOptions, build_bundle, default_cache_dir

    opts = BundleOptions(
        artifacts=args.artifacts,
        config=args.config,
        output=args.output,
        rank=args.rank,
        platform=args.platform,
        python_version=args.python_version,
        ort_wheel=args.ort_wheel,
        credentials=args.credentials,
        placeholder=args.placeholder,
        slim=args.slim,
        secagg=args.secagg,
        client_wheel=args.client_wheel,
        cache_dir=args.cache,
        constraints=args.constraints,
        compress_level=args.compress_level,
    )
    if opts.cache_dir is None:
        opts.cache_dir = default_cache_dir()
    doc = build_bundle(opts)
    wheels = sum(info["size"] for name, info in doc["files"].items() if name.startswith("wheelhouse/"))
    artifacts = sum(info["size"] for name, info in doc["files"].items() if name.startswith("artifacts/"))
    print(
        f"{doc['archive']['path']}: {doc['archive']['size'] / 2**20:.1f} MiB "
        f"({doc['model_id']} rank {doc['rank']}; {len(doc['wheels'])} wheels {wheels / 2**20:.1f} MiB, "
        f"artifacts {artifacts / 2**20:.1f} MiB; for CPython {doc['target']['python_version']} on "
        f"{doc['target']['platform']}, {'slim' if doc['slim'] else 'full closure'}{', secure aggregation' if doc['secagg'] else ''}; "
        f"credentials: {doc['credentials']})"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedlora-edge", description="fedlora device client (torch-free)")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="join the job and train when rounds open")
    run.add_argument("--config", help="device config (.json; .yaml if pyyaml is installed)")
    run.add_argument("--env-file", help="KEY=VALUE credentials (default: credentials.env beside --config)")
    run.add_argument("--device-id")
    run.add_argument("--bundle")
    run.add_argument("--data")
    run.add_argument("--state-dir")
    run.add_argument("--broker", help="mqtt://host:port")
    run.add_argument("--job")
    run.add_argument("--threads", type=int)
    run.add_argument("--exit-when-finished", action="store_true", default=None)
    run.add_argument("-v", "--verbose", action="store_true")

    doctor = sub.add_parser("doctor", help="check this device: Python, ONNX Runtime, bundle, broker, memory, clock")
    doctor.add_argument("--config", help="device config (default: the config of the install this runs from)")
    doctor.add_argument("--env-file", help="KEY=VALUE credentials (default: credentials.env beside --config)")
    doctor.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the broker")
    doctor.add_argument("-v", "--verbose", action="store_true")

    bundle = sub.add_parser(
        "bundle",
        help="build an offline-installable device bundle (tar.gz)",
        description="Build one archive for one device class: the client wheel and its runtime "
        "wheels for the target, one rank's artifacts, config, credentials, a "
        "systemd unit, install.sh and uninstall.sh.",
    )
    bundle.add_argument("--artifacts", type=Path, required=True, help="exporter output (rank ladder) or one bundle")
    bundle.add_argument(
        "--rank",
        type=int,
        default=0,
        help="rank to ship (default: the config's rank, else the largest whose training peak fits memory_budget_mb)",
    )
    bundle.add_argument("--config", type=Path, required=True, help="the device class's device.json")
    bundle.add_argument("-o", "--output", type=Path, required=True, help="archive to write (.tar.gz)")
    bundle.add_argument(
        "--platform",
        default="manylinux_2_28_x86_64",
        help="the device's wheel platform tag (older manylinux tags are included)",
    )
    bundle.add_argument("--python-version", default="3.11", help="the device's CPython version")
    bundle.add_argument(
        "--ort-wheel",
        type=Path,
        help="onnxruntime training wheel built from source (e.g. for aarch64: see docs/edge-bundle.md)",
    )
    creds = bundle.add_mutually_exclusive_group()
    creds.add_argument(
        "--credentials",
        type=Path,
        help="JSON with device_id, username, password, ca_file, cert_file, key_file (any of them)",
    )
    creds.add_argument(
        "--placeholder", action="store_true", help="ship a credentials template to fill in on each device"
    )
    wheels = bundle.add_mutually_exclusive_group()
    wheels.add_argument(
        "--slim",
        action="store_true",
        default=True,
        help="the default: only the wheels the client declares (what it imports), installed with --no-deps",
    )
    wheels.add_argument(
        "--full",
        dest="slim",
        action="store_false",
        help="also every wheel those declare (ORT's onnx, sympy, h5py, ...; tokenizers' "
        "huggingface_hub): the closure pip check expects; a device imports none of them",
    )
    bundle.add_argument(
        "--secagg",
        action="store_true",
        help="also ship the secagg extra (cryptography, cffi, pycryptodome; about 7 MB) so that the device can "
        "take part in secure-aggregation rounds (default: not shipped; the device skips them)",
    )
    bundle.add_argument("--client-wheel", type=Path, help="prebuilt fedlora wheel (default: build from this checkout)")
    bundle.add_argument("--cache", type=Path, help="wheelhouse cache (default: ~/.cache/fedlora/wheelhouse)")
    bundle.add_argument("--constraints", type=Path, help="pip constraints (default: the checkout's constraints.txt)")
    bundle.add_argument("--compress-level", type=int, default=6)
    bundle.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)

    setup_logging(args.verbose)
    try:
        return {"run": _run, "doctor": _doctor, "bundle": _bundle}[args.command](args)
    except FedloraError as exc:
        print(f"fedlora-edge: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
