"""``fedlora-edge doctor``: is this device ready to train?

One line per check, ``OK``, ``WARN`` or ``FAIL`` with a one-line reason; the command exits
non-zero if any check fails. The checks: Python and platform (against the bundle's target),
the installed wheels (against the bundle's list), ONNX Runtime's training API importing without
torch, secure aggregation (the optional ``secagg`` extra: available and working, or which
rounds the device will skip), the device config, the artifacts' hashes, free memory against
the rank's measured training peak, the training data, the state directory, the clock (TLS
needs a sane one), the training window, and the broker (reachable, and the credentials
accepted).
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

OK, WARN, FAIL = "OK", "WARN", "FAIL"
MIB = 2**20


@dataclass
class Check:
    name: str
    status: str
    detail: str


def _guard(name: str, fn: Callable[[], Check]) -> Check:
    from core.errors import FedloraError

    try:
        return fn()
    except Exception as exc:  # a check that breaks is a failed check, with its reason
        return Check(name, FAIL, str(exc) if isinstance(exc, FedloraError) else f"{type(exc).__name__}: {exc}")


def find_install(config_path: str | None) -> tuple[Path | None, dict | None]:
    """The install folder and its BUNDLE-MANIFEST.json, if this config belongs to one."""
    candidates = [Path(sys.prefix).parent]
    if config_path:
        candidates.insert(0, Path(config_path).resolve().parent.parent)
    for root in candidates:
        path = root / "BUNDLE-MANIFEST.json"
        if path.is_file():
            try:
                return root, json.loads(path.read_text(encoding="utf-8"))
            except ValueError:
                return root, None
    return None, None


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def check_python(doc: dict | None) -> Check:
    v = sys.version_info
    machine = platform.machine()
    libc, libc_version = platform.libc_ver()
    detail = f"{platform.python_implementation()} {platform.python_version()} on {platform.system()} {machine}"
    if libc:
        detail += f", {libc} {libc_version}"
    if v < (3, 10):
        return Check("python", FAIL, detail + "; fedlora needs Python >= 3.10")
    if doc:
        target = doc.get("target", {})
        want = f"CPython {target.get('python_version')} on {target.get('machine')}"
        if f"{v.major}.{v.minor}" != target.get("python_version") or machine != target.get("machine"):
            return Check("python", FAIL, f"{detail}; the bundle's wheels are for {want}")
        tag = str(target.get("platform", ""))
        if tag.startswith("manylinux_") and libc == "glibc":
            need = tuple(int(x) for x in tag.split("_")[1:3])
            have = tuple(int(x) for x in libc_version.split(".")[:2])
            if have < need:
                return Check("python", FAIL, f"{detail}; the bundle's wheels need glibc >= {need[0]}.{need[1]}")
        detail += f"; matches the bundle ({want})"
    if platform.system() != "Linux":
        return Check("python", WARN, detail + "; bundles and the service are made for Linux")
    return Check("python", OK, detail)


def check_packages(doc: dict) -> Check:
    from importlib.metadata import PackageNotFoundError, version

    missing, different = [], []
    for row in doc.get("wheels", []):
        try:
            have = version(row["name"])
        except PackageNotFoundError:
            missing.append(row["name"])
            continue
        if have != row["version"]:
            different.append(f"{row['name']} {have} (bundle: {row['version']})")
    n = len(doc.get("wheels", []))
    if missing:
        return Check("packages", FAIL, f"not installed: {', '.join(missing)}; run the bundle's install.sh again")
    if different:
        return Check("packages", WARN, f"differ from the bundle: {'; '.join(different)}")
    return Check("packages", OK, f"the bundle's {n} wheels are installed at their versions")


def check_onnxruntime() -> Check:
    import importlib.util

    heavy = {"torch", "transformers", "peft"}
    before = heavy & {m.split(".")[0] for m in sys.modules}
    from edge_client.runtime import training_api

    api = training_api()
    import onnxruntime

    loaded = (heavy & {m.split(".")[0] for m in sys.modules}) - before
    if loaded:
        return Check("onnxruntime", FAIL, f"importing the training API loaded {sorted(loaded)}")
    if not hasattr(api, "CheckpointState"):
        return Check("onnxruntime", FAIL, f"onnxruntime {onnxruntime.__version__} lacks the on-device training API")
    detail = f"onnxruntime {onnxruntime.__version__}: the training API imports without torch"
    if importlib.util.find_spec("torch") is not None:
        return Check("onnxruntime", WARN, detail + "; torch is installed in this environment too (a device needs none)")
    return Check("onnxruntime", OK, detail + " (torch not installed)")


def check_secagg(doc: dict | None) -> Check:
    """Whether this device can take part in secure-aggregation rounds: the ``secagg`` extra
    (cryptography, pycryptodome) imports and a small round trip works (two devices' keys agree,
    sealed shares open, a Shamir-split secret is rebuilt). Missing, it is a warning (a device
    skips secure rounds), unless the bundle shipped it: then the install is broken."""
    from importlib.metadata import version

    try:
        _secagg_round_trip()
    except ImportError as exc:
        if doc and doc.get("secagg"):
            return Check("secagg", FAIL, f"the bundle ships secure aggregation but it does not import ({exc})")
        return Check(
            "secagg",
            WARN,
            f"not available ({exc}): this device skips secure-aggregation rounds; build its bundle with "
            "--secagg (or pip install 'fedlora[secagg]')",
        )
    return Check(
        "secagg",
        OK,
        f"secure aggregation available: cryptography {version('cryptography')}, pycryptodome "
        f"{version('pycryptodome')} (keys agree, sealed shares open, a split secret is rebuilt)",
    )


def _secagg_round_trip() -> None:
    from core.secagg import combine_secret, new_keys, open_shares, seal_shares

    a, b, c = new_keys(), new_keys(), new_keys()
    seed = os.urandom(32)
    peers = {"b": b.cipher_public, "c": c.cipher_public}
    sealed = seal_shares("a", a, seed, peers, 2, "doctor", 1)
    held = [open_shares(me, keys, "a", a.cipher_public, sealed[me], "doctor", 1) for me, keys in (("b", b), ("c", c))]
    if combine_secret([h.self_seed for h in held], 2) != seed:
        raise RuntimeError("a Shamir-split secret did not rebuild")
    if combine_secret([h.mask_secret for h in held], 2) != a.mask_secret:
        raise RuntimeError("a sealed share did not open to what was sealed")


def load_config(config_path: str | None, env_file: str | None):
    from edge_client.device import load_device_config

    cfg = load_device_config(config_path)
    where = config_path or "FEDLORA_DEVICE_* environment"
    creds = f", credentials from {env_file}" if env_file else ""
    user = f" as {cfg.broker.username}" if cfg.broker.username else ""
    return cfg, Check(
        "config", OK, f"{where}: device {cfg.device_id}, job {cfg.job}, broker {cfg.broker.url}{user}{creds}"
    )


def check_bundle(cfg, install_root: Path | None, doc: dict | None):
    from core.bundle import Bundle, choose_bundle, sha256_file

    path = choose_bundle(cfg.bundle, cfg.memory_budget_mb * MIB, cfg.rank)
    bundle = Bundle(path, verify=True)
    m = bundle.manifest
    detail = f"{path}: {m.model_id} rank {m.rank}, {len(m.files)} files match manifest.json"
    if doc and install_root is not None and Path(path).resolve() == (install_root / "artifacts").resolve():
        for rel, info in doc.get("files", {}).items():
            if rel.startswith("artifacts/") and sha256_file(install_root / rel) != info["sha256"]:
                return bundle, Check("bundle", FAIL, f"{install_root / rel} differs from BUNDLE-MANIFEST.json")
        detail += " and BUNDLE-MANIFEST.json"
    return bundle, Check("bundle", OK, detail)


def _meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo", encoding="ascii") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[key] = int(parts[0]) * 1024
    return out


def _cgroup_limit() -> int | None:
    """This process's cgroup memory limit (v2 memory.max or v1 memory.limit_in_bytes)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            candidates = [Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.max"]
        elif "memory" in controllers.split(","):
            candidates = [Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.limit_in_bytes"]
        else:
            continue
        for file in candidates:
            try:
                text = file.read_text().strip()
            except OSError:
                continue
            if text.isdigit() and int(text) < 1 << 60:
                return int(text)
    return None


def check_memory(cfg, bundle, doc: dict | None) -> Check:
    m = bundle.manifest
    need = int((m.extra.get("memory") or {}).get("peak_rss_bytes") or 0)
    info = _meminfo()
    total, available = info.get("MemTotal", 0), info.get("MemAvailable", info.get("MemFree", 0))
    candidates = {
        "cgroup limit": _cgroup_limit(),
        "memory_budget_mb": cfg.memory_budget_mb * MIB or None,
        "service MemoryMax": ((doc or {}).get("memory", {}).get("memory_max_mb") or 0) * MIB or None,
    }
    limits = {k: v for k, v in candidates.items() if v}
    detail = f"{available / MIB:.0f} MiB available of {total / MIB:.0f} MiB"
    if limits:
        detail += "; " + ", ".join(f"{k} {v / MIB:.0f} MiB" for k, v in limits.items())
    if not need:
        return Check("memory", WARN, detail + f"; rank {m.rank} has no measured training peak in its manifest")
    detail = f"rank {m.rank} needs {need / MIB:.0f} MiB at its training peak (measured at export); " + detail
    tight = {k: v for k, v in limits.items() if v < need}
    if need > total or tight:
        why = "the machine's memory" if need > total else " and ".join(tight)
        return Check("memory", FAIL, f"{detail}: over {why}; ship a smaller rank")
    if need > available:
        return Check("memory", WARN, f"{detail}: more than is free now")
    return Check("memory", OK, detail)


def check_data(cfg) -> Check:
    from edge_client.data import read_records

    path = Path(cfg.data)
    if not path.is_file():
        return Check("data", FAIL, f"{path} does not exist (config key data, or install.sh DATA=...)")
    records = read_records(path, cfg.text_column, cfg.label_column)
    if not records:
        return Check("data", FAIL, f"{path} holds no records")
    return Check("data", OK, f"{path}: {len(records)} records ({cfg.text_column}, {cfg.label_column})")


def check_state_dir(cfg) -> Check:
    path = Path(cfg.state_dir).resolve()
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        return Check("state", FAIL, f"{path}: {probe} is not writable by uid {os.getuid()}")
    saved = []
    state = path / "state.json"
    if state.is_file():
        try:
            data = json.loads(state.read_text())
            saved.append(f"last round {data.get('last_round')}, pending {data.get('pending_round')}")
        except (OSError, ValueError):
            return Check("state", WARN, f"{state} is unreadable; the device starts over")
    note = f" ({'; '.join(saved)})" if saved else " (no state yet)"
    if probe != path:
        return Check("state", OK, f"{path} will be created{note}")
    if not os.access(path, os.W_OK):
        return Check("state", FAIL, f"{path} is not writable by uid {os.getuid()}")
    return Check("state", OK, f"{path} writable{note}")


def check_clock(cfg, doc: dict | None, now: float | None = None) -> Check:
    """TLS certificates are valid from a date: a device whose clock is years behind refuses the
    broker's certificate. The bundle's build time is a lower bound for the true time."""
    import subprocess

    now = time.time() if now is None else now
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now))
    doc = doc or {}
    floor = int(doc.get("created_unix") or 0)
    if floor and now < floor - 300:
        built = doc.get("created") or time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(floor))
        return Check(
            "clock",
            FAIL,
            f"{stamp} is before the bundle was built ({built}): set the time "
            "(NTP) or TLS will reject the broker's certificate",
        )
    if time.gmtime(now).tm_year < 2024:
        return Check("clock", FAIL, f"{stamp}: the clock is not set; TLS needs it (enable NTP)")
    if cfg.broker.tls and cfg.broker.ca_file:
        import ssl

        try:
            # the stdlib's own certificate decoder: undocumented (so untyped) but stable
            cert = ssl._ssl._test_decode_cert(cfg.broker.ca_file)  # type: ignore[attr-defined]
            start, end = ssl.cert_time_to_seconds(cert["notBefore"]), ssl.cert_time_to_seconds(cert["notAfter"])
            if not start <= now <= end:
                return Check(
                    "clock",
                    FAIL,
                    f"{stamp} is outside the CA certificate's validity ({cert['notBefore']} .. {cert['notAfter']})",
                )
        except (AttributeError, KeyError, ValueError, OSError, ssl.SSLError):
            pass  # the broker check reports unreadable TLS files
    synced = None
    try:
        out = subprocess.run(
            ["timedatectl", "show", "-p", "NTPSynchronized", "--value"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        synced = out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    if synced == "no":
        return Check("clock", WARN, f"{stamp}; not NTP-synchronized (timedatectl): TLS may fail if it drifts")
    return Check("clock", OK, stamp + ("; NTP-synchronized" if synced == "yes" else ""))


def check_window(cfg) -> Check:
    from datetime import datetime

    from edge_client.device import in_train_window

    inside = in_train_window(cfg.train_window, datetime.now())
    return Check(
        "window",
        OK,
        f"trains {cfg.train_window} local time; "
        f"{'inside the window now' if inside else 'outside it now: open rounds wait'}",
    )


def service_running(unit: str = "fedlora-edge.service") -> bool:
    """True if systemd reports the device's service active (False where there is no systemd)."""
    try:
        return subprocess.run(["systemctl", "is-active", "--quiet", unit], timeout=5).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def check_broker(cfg, timeout: float) -> Check:
    import dataclasses

    from core.transport import MqttLink, TransportError

    b = cfg.broker
    for name in ("ca_file", "cert_file", "key_file"):
        path = getattr(b, name)
        if path and not os.access(path, os.R_OK):
            return Check("broker", FAIL, f"{name} {path} is not readable")
    try:
        socket.create_connection((b.host, b.port), timeout=min(timeout, 5.0)).close()
    except OSError as exc:
        return Check("broker", FAIL, f"cannot reach {b.host}:{b.port}: {exc}")
    if service_running():
        # Brokers that pin client ids to user names (the chart's Mosquitto does) would hand the
        # service's session to this login and drop the messages queued for it.
        return Check(
            "broker",
            WARN,
            f"{b.host}:{b.port} reachable; the credentials are not tried while the "
            f"fedlora-edge service runs (stop it to check them)",
        )
    # Its own client id and a clean session: the running service's session stays untouched
    # where the broker keeps client ids apart.
    probe_cfg = dataclasses.replace(b, connect_timeout=timeout)
    link = MqttLink(probe_cfg, client_id=f"fedlora-doctor-{cfg.device_id}-{uuid.uuid4().hex[:6]}", persistent=False)
    try:
        link.connect()
    except TransportError as exc:
        hint = "; check the credentials" if "authori" in str(exc).lower() or "password" in str(exc).lower() else ""
        return Check("broker", FAIL, f"{exc}{hint}")
    finally:
        link.close()
    who = f" as {b.username}" if b.username else " anonymously"
    return Check("broker", OK, f"{b.url}: connected with MQTT {link.protocol}{who}{' over TLS' if b.tls else ''}")


# ---------------------------------------------------------------------------------------------


def run_checks(config_path: str | None, env_file: str | None = None, broker_timeout: float = 10.0) -> list[Check]:
    install_root, doc = find_install(config_path)
    checks = [_guard("python", lambda: check_python(doc))]
    if doc:
        checks.append(_guard("packages", lambda: check_packages(doc)))
    checks.append(_guard("onnxruntime", check_onnxruntime))
    checks.append(_guard("secagg", lambda: check_secagg(doc)))
    try:
        cfg, check = load_config(config_path, env_file)
    except Exception as exc:
        hint = "" if config_path else " (no --config given, and none found beside this venv)"
        checks.append(Check("config", FAIL, f"{exc}{hint}"))
        return checks
    checks.append(check)
    bundle = None

    def bundle_check() -> Check:
        nonlocal bundle
        bundle, result = check_bundle(cfg, install_root, doc)
        return result

    checks.append(_guard("bundle", bundle_check))
    if bundle is not None:
        checks.append(_guard("memory", lambda: check_memory(cfg, bundle, doc)))
    checks.append(_guard("data", lambda: check_data(cfg)))
    checks.append(_guard("state", lambda: check_state_dir(cfg)))
    checks.append(_guard("clock", lambda: check_clock(cfg, doc)))
    if cfg.train_window:
        checks.append(_guard("window", lambda: check_window(cfg)))
    checks.append(_guard("broker", lambda: check_broker(cfg, broker_timeout)))
    return checks


def print_report(checks: list[Check], out=None) -> int:
    out = out or sys.stdout
    width = max(len(c.name) for c in checks)
    for c in checks:
        print(f"{c.status:<4}  {c.name:<{width}}  {c.detail}", file=out)
    failed = [c.name for c in checks if c.status == FAIL]
    print(f"{len(checks)} checks: {'FAILED: ' + ', '.join(failed) if failed else 'ready'}", file=out)
    return 1 if failed else 0
