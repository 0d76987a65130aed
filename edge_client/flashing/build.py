"""Build a device bundle on a build host: ``fedlora-edge bundle`` (no torch needed).

One offline-installable tar.gz per device class (its tree: ``edge_client.flashing``): the client
wheel and its runtime wheels for the device's platform and Python, one rank's training
artifacts chosen as the device would, the device config with its secrets moved into
credentials.env, and install.sh, uninstall.sh and the systemd unit from ``templates/``. What
the device runs of it is ``edge_client.flashing.install``.
"""

from __future__ import annotations

import email.parser
import hashlib
import json
import logging
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from core.bundle import MANIFEST_NAME, Bundle, Manifest, choose_bundle, sha256_file
from core.errors import BundleError, ConfigError
from edge_client.flashing.layout import (
    BUNDLE_FORMAT,
    BUNDLE_MANIFEST,
    CREDENTIAL_ENV,
    UNIT_NAME,
    format_env_file,
    render_text,
)

log = logging.getLogger("fedlora.flashing")

TOP = "fedlora-edge-bundle"
DEFAULT_PLATFORM = "manylinux_2_28_x86_64"  # glibc >= 2.28: Debian 10+, Ubuntu 18.10+, RHEL 8+
DEFAULT_PYTHON = "3.11"
TEMPLATES = Path(__file__).with_name("templates")
# TLS files get fixed names under config/credentials/, so per-device provisioning knows where
# to put them.
TLS_FILES = {"ca_file": "ca.pem", "cert_file": "client.crt", "key_file": "client.key"}
# What pyproject.toml's [tool.setuptools.packages.find] includes: the client wheel's sources.
SOURCE_PACKAGES = ("core", "edge_client", "server", "export", "simulator")
SOURCE_FILES = ("pyproject.toml", "README.md", "LICENSE")

_MANYLINUX = re.compile(r"^manylinux_(\d+)_(\d+)_(\w+)$")
_LEGACY_MANYLINUX = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}


# ---------------------------------------------------------------------------------------------
# Target platform and wheels
# ---------------------------------------------------------------------------------------------


def expand_platform(platform: str) -> list[str]:
    """The platform tags a device of ``platform`` accepts, newest first.

    ``pip download --platform`` matches tags literally, so ``manylinux_2_28_x86_64`` alone
    would miss wheels tagged only ``manylinux2014_x86_64`` (glibc 2.17), which run on the same
    device. A ``linux_<arch>`` tag (a wheel built from source) is taken as given.
    """
    match = _MANYLINUX.match(platform)
    if match:
        glibc, arch = (int(match[1]), int(match[2])), match[3]
    else:
        legacy, _, arch = platform.partition("_")
        if legacy == "linux" and arch:
            return [platform]
        if legacy not in _LEGACY_MANYLINUX or not arch:
            raise ConfigError(
                f"platform {platform!r} is not a Linux wheel platform tag "
                "(e.g. manylinux_2_28_x86_64, manylinux2014_aarch64, linux_aarch64)"
            )
        glibc = _LEGACY_MANYLINUX[legacy]
    tags = [f"manylinux_{glibc[0]}_{minor}_{arch}" for minor in range(glibc[1], 4, -1)]
    for legacy, version in _LEGACY_MANYLINUX.items():
        # manylinux1 and 2010 were defined for x86 only
        if version <= glibc and (legacy == "manylinux2014" or arch in ("x86_64", "i686")):
            tags.append(f"{legacy}_{arch}")
    return tags


def platform_machine(platform: str) -> str:
    """``platform.machine()`` on a device of this platform tag (x86_64, aarch64, ...)."""
    match = _MANYLINUX.match(platform)
    return match[3] if match else platform.partition("_")[2]


def parse_wheel_filename(name: str) -> tuple[str, str, list[str]]:
    """(distribution, version, platform tags) of a wheel file name (PEP 427)."""
    if not name.endswith(".whl"):
        raise BundleError(f"{name} is not a wheel")
    parts = name[:-4].split("-")
    if len(parts) not in (5, 6):
        raise BundleError(f"{name}: not a valid wheel file name")
    return parts[0], parts[1], parts[-1].split(".")


def canonical_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return canonical_name(re.split(r"[\s<>=!~;\[(@]", requirement.strip(), maxsplit=1)[0])


def wheel_requirements(wheel: Path, extra: str = "edge") -> list[str]:
    """The wheel's Requires-Dist for a plain install plus ``[extra]``, extra markers removed."""
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        if not names:
            raise BundleError(f"{wheel}: no METADATA")
        meta = email.parser.Parser().parsestr(zf.read(names[0]).decode("utf-8"))
    return select_requirements(meta.get_all("Requires-Dist") or [], extra)


def device_requirements(wheel: Path, secagg: bool = False) -> list[str]:
    """What a device installs of the client wheel: its plain requirements and the ``edge`` extra,
    and with ``secagg`` the ``secagg`` extra's too (cryptography, its cffi, pycryptodome: for
    secure-aggregation rounds), each once."""
    requirements = wheel_requirements(wheel, "edge")
    if secagg:
        extra = wheel_requirements(wheel, "secagg")
        if extra == wheel_requirements(wheel, "none"):
            raise BundleError(f"{wheel.name} declares no secagg extra: it predates secure aggregation")
        requirements += [r for r in extra if r not in requirements]
    return requirements


def select_requirements(requires_dist: list[str], extra: str = "edge") -> list[str]:
    """The Requires-Dist entries of a plain install plus ``[extra]``, extra markers removed.

    A slim bundle installs exactly these (and scripts/setup.sh the device environment), each
    without its own declared dependencies: fedlora must declare every distribution a device
    imports."""
    out = []
    wanted = re.compile(r"""extra\s*==\s*["']""" + re.escape(extra) + r"""["']""")
    for req in requires_dist:
        spec, _, marker = (part.strip() for part in req.partition(";"))
        if "extra" in marker:
            if not wanted.search(marker):
                continue
            marker = re.sub(r"\s*\band\s+" + wanted.pattern, "", marker)
            marker = re.sub(wanted.pattern + r"\s*(\band\b)?\s*", "", marker).strip()
        out.append(f"{spec}; {marker}" if marker else spec)
    return out


def source_root() -> Path | None:
    """The fedlora source checkout this module runs from, if it does."""
    root = Path(__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and re.search(r'^name\s*=\s*"fedlora"', pyproject.read_text(encoding="utf-8"), re.M):
        return root
    return None


def _setuptools_builds_wheels() -> bool:
    """True if this interpreter's setuptools builds wheels alone (>= 70.1 has bdist_wheel)."""
    try:
        from importlib.metadata import version

        major, minor = (int(x) for x in re.findall(r"\d+", version("setuptools"))[:2])
        return (major, minor) >= (70, 1)
    except Exception:
        return False


def build_client_wheel(dest: Path, source: Path | None = None) -> Path:
    """``pip wheel --no-deps`` of the fedlora sources, from a clean copy (nothing stray gets in,
    and the checkout gets no build/ folder)."""
    source = source or source_root()
    if source is None:
        raise BundleError("not running from a fedlora source checkout: pass --client-wheel (pip wheel --no-deps .)")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedlora-wheel-") as tmp:
        stage = Path(tmp) / "src"
        stage.mkdir()
        for name in SOURCE_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, stage / name)
        for pkg in SOURCE_PACKAGES:
            if (source / pkg).is_dir():
                shutil.copytree(source / pkg, stage / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        out = Path(tmp) / "dist"
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--quiet",
            "--disable-pip-version-check",
            "--wheel-dir",
            str(out),
            str(stage),
        ]
        if _setuptools_builds_wheels():
            cmd.insert(4, "--no-build-isolation")  # offline and quick; else pip fetches setuptools
        _run(cmd, "building the client wheel")
        built = sorted(out.glob("fedlora-*.whl"))
        if len(built) != 1:
            raise BundleError(f"pip wheel produced {[p.name for p in out.iterdir()]}, expected one fedlora wheel")
        target = dest / built[0].name
        shutil.copy2(built[0], target)
    return target


def download_command(
    requirements: list[str], dest: Path, platforms: list[str], python_version: str, constraints: Path | None = None
) -> list[str]:
    """``pip download`` of binary wheels for another platform and Python (resolves the closure)."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--only-binary=:all:",
        "--dest",
        str(dest),
        "--python-version",
        python_version,
        "--implementation",
        "cp",
        "--disable-pip-version-check",
        "--progress-bar",
        "off",
    ]
    for tag in platforms:
        cmd += ["--platform", tag]
    if constraints is not None:
        cmd += ["--constraint", str(constraints)]
    return cmd + list(requirements)


def plan_download(requirements: list[str], platform: str, ort_wheel: Path | None = None) -> tuple[list[str], list[str]]:
    """What to download, for which platform tags. A from-source ORT wheel replaces the
    onnxruntime requirement (whatever its distribution name), and its own platform tag
    (``linux_aarch64``: not manylinux-audited) is accepted for it."""
    platforms = expand_platform(platform)
    if ort_wheel is None:
        return list(requirements), platforms
    tags = parse_wheel_filename(ort_wheel.name)[2]
    arch = platform_machine(platform)
    if not any(tag == "any" or tag.endswith("_" + arch) for tag in tags):
        raise ConfigError(f"--ort-wheel {ort_wheel.name} is not for {arch} (platform {platform})")
    kept = [r for r in requirements if not requirement_name(r).startswith("onnxruntime")]
    return kept + [str(ort_wheel)], platforms + [t for t in tags if t not in platforms and t != "any"]


def _run(cmd: list[str], what: str) -> None:
    log.debug("running %s", " ".join(shlex.quote(c) for c in cmd))
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        noise = "is ignored: it is neither a file nor a directory"  # stale find-links in pip.conf
        err = "\n".join(line for line in (done.stderr + done.stdout).splitlines() if noise not in line)
        raise BundleError(f"{what} failed (exit {done.returncode}): {' '.join(cmd[:6])} ...\n{err[-3000:]}")


def fetch_wheelhouse(
    requirements: list[str],
    platforms: list[str],
    python_version: str,
    constraints: Path | None,
    cache_dir: Path,
    no_deps: bool = False,
) -> Path:
    """The wheels of ``requirements`` and (unless ``no_deps``) their dependencies for the target,
    + pip, downloaded once into ``cache_dir/<key>``; the key covers all that decides the set."""
    key_doc = {
        "format": 1,
        "requirements": [_requirement_key(r) for r in requirements],
        "platforms": platforms,
        "python_version": python_version,
        "no_deps": no_deps,
        "constraints": constraints.read_text(encoding="utf-8") if constraints else None,
    }
    key = hashlib.sha256(json.dumps(key_doc, sort_keys=True).encode()).hexdigest()[:16]
    target = cache_dir / key
    if (target / ".complete").is_file():
        log.info("wheelhouse: cached %s", target)
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{key}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    log.info(
        "wheelhouse: downloading %d requirements for %s, CPython %s", len(requirements), platforms[0], python_version
    )
    _run(
        download_command(requirements, tmp, platforms, python_version, constraints)
        + (["--no-deps"] if no_deps else []),
        "pip download",
    )
    pip_dir = tmp / "pip"
    _run(download_command(["pip"], pip_dir, platforms, python_version) + ["--no-deps"], "pip download pip")
    (tmp / ".complete").write_text(json.dumps(key_doc, indent=1, sort_keys=True))
    try:
        os.replace(tmp, target)
    except OSError:  # another build filled it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _requirement_key(req: str) -> str:
    path = Path(req)
    return f"{path.name}#{sha256_file(path)}" if req.endswith(".whl") and path.is_file() else req


# ---------------------------------------------------------------------------------------------
# Config and credentials
# ---------------------------------------------------------------------------------------------


@dataclass
class DeviceFiles:
    """The device's config as it goes into the bundle."""

    config: dict  # device.json, with @PREFIX@ / @STATE_DIR@ placeholders
    env: dict[str, str]  # credentials.env assignments
    tls: dict[str, Path]  # file name under config/credentials/ -> source file
    placeholder: bool  # credentials.env is a template to fill in per device


def prepare_device_files(config_path: Path, credentials: Path | None, placeholder: bool) -> DeviceFiles:
    """Split ``config_path`` into device.json (no secrets; paths into the install) and
    credentials.env (the broker username and password, the device id if given there)."""
    from core.config import read_config_file

    raw = read_config_file(config_path)
    base = config_path.resolve().parent
    broker = dict(raw.get("broker") or {})
    env: dict[str, str] = {}
    tls: dict[str, Path] = {}
    for key in ("username", "password"):
        if broker.get(key) is not None:
            env[CREDENTIAL_ENV[key]] = str(broker.pop(key))
    for key, name in TLS_FILES.items():
        if broker.get(key):
            tls[name] = (base / broker[key]).resolve()
            broker[key] = f"@PREFIX@/config/credentials/{name}"
    if credentials is not None:
        creds = read_config_file(credentials)
        unknown = sorted(set(creds) - set(CREDENTIAL_ENV) - set(TLS_FILES))
        if unknown:
            raise ConfigError(
                f"{credentials}: unknown key(s) {unknown} (known: {sorted(set(CREDENTIAL_ENV) | set(TLS_FILES))})"
            )
        for key, var in CREDENTIAL_ENV.items():
            if creds.get(key) is not None:
                env[var] = str(creds[key])
        for key, name in TLS_FILES.items():
            if creds.get(key):
                tls[name] = (credentials.resolve().parent / creds[key]).resolve()
                broker[key] = f"@PREFIX@/config/credentials/{name}"
    for name, path in tls.items():
        if not path.is_file():
            raise ConfigError(f"TLS file {path} (for config/credentials/{name}) does not exist")
    raw["bundle"] = "@PREFIX@/artifacts"
    raw["state_dir"] = "@STATE_DIR@"
    raw.pop("rank", None)  # the bundle holds one rank
    if broker:
        raw["broker"] = broker
    if not raw.get("data"):
        raise ConfigError(
            f"{config_path}: 'data' is required (the training data file's path on the device; "
            "install.sh DATA=... can change it per device)"
        )
    has_id = bool(raw.get("device_id") or env.get(CREDENTIAL_ENV["device_id"]))
    if not has_id and not placeholder:
        raise ConfigError(
            f"{config_path}: no device_id: set it in the config or in --credentials, "
            "or build with --placeholder to provision each device after install"
        )
    _validate_config(raw, env, config_path)
    return DeviceFiles(raw, env, tls, placeholder=placeholder and credentials is None)


def _validate_config(raw: dict, env: dict[str, str], where: Path) -> None:
    """Build DeviceConfig from what the device will see, so a bad value fails on the build host."""
    from core.config import build
    from edge_client.device import DeviceConfig

    values = json.loads(render_text(json.dumps(raw), {"@PREFIX@": "/opt/fedlora-edge", "@STATE_DIR@": "/var/lib/x"}))
    broker = dict(values.get("broker") or {})
    for key in ("username", "password"):
        if CREDENTIAL_ENV[key] in env:
            broker[key] = env[CREDENTIAL_ENV[key]]
    values["broker"] = broker
    values["device_id"] = env.get(CREDENTIAL_ENV["device_id"]) or values.get("device_id") or "provisioned-later"
    build(DeviceConfig, values, where=str(where))


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------


@dataclass
class BundleOptions:
    """What ``fedlora-edge bundle`` builds.

    artifacts: exporter output (rank ladder) or one rank's bundle folder.
    config: the device class's device.json (see edge_client.device.DeviceConfig).
    output: the tar.gz to write.
    rank: the rank to ship (0: the device's own rule: the config's rank, else the largest rank
        whose measured training peak fits memory_budget_mb).
    platform / python_version: the device's wheel platform tag and CPython version.
    ort_wheel: an onnxruntime training wheel built from source (no aarch64 wheel on PyPI).
    credentials: JSON with device_id, username, password, ca_file, cert_file, key_file (any).
    placeholder: ship a credentials.env template to fill in on each device.
    slim: ship only the distributions the client declares (fedlora, onnxruntime-training-cpu,
        numpy, paho-mqtt, tokenizers: what it imports) and install them with --no-deps (the
        default). ORT's declared onnx, sympy, h5py, ... serve artifact generation, tokenizers'
        huggingface_hub the hub download: none is imported on the device, and scripts/setup.sh
        makes .venv-edge, where the tests run devices, the same way. About 40% of the full
        closure's installed packages; ``pip check`` names the declared dependencies left out.
        False (``--full``): the full declared closure.
    secagg: also ship the ``secagg`` extra (cryptography, cffi, pycryptodome: about 7 MB of
        wheels) so that the device can take part in secure-aggregation rounds; without it (the
        default) a device skips a secure round and says so in its log.
    client_wheel: a prebuilt fedlora wheel (default: built from this source checkout).
    cache_dir: where downloaded wheelhouses are kept, keyed by what decides them.
    constraints: pip constraints for the download (default: the checkout's constraints.txt).
    """

    artifacts: Path
    config: Path
    output: Path
    rank: int = 0
    platform: str = DEFAULT_PLATFORM
    python_version: str = DEFAULT_PYTHON
    ort_wheel: Path | None = None
    credentials: Path | None = None
    placeholder: bool = False
    slim: bool = True
    secagg: bool = False
    client_wheel: Path | None = None
    cache_dir: Path | None = None
    constraints: Path | None = None
    compress_level: int = 6

    def __post_init__(self) -> None:
        if self.credentials is not None and self.placeholder:
            raise ConfigError("give --credentials or --placeholder, not both")
        if not re.fullmatch(r"3\.\d+", self.python_version):
            raise ConfigError(f"python version must look like 3.11, not {self.python_version!r}")
        expand_platform(self.platform)  # validates
        if self.ort_wheel is not None and not Path(self.ort_wheel).is_file():
            raise ConfigError(f"--ort-wheel {self.ort_wheel} does not exist")
        if not 0 <= self.compress_level <= 9:
            raise ConfigError("compress level must be 0-9")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fedlora" / "wheelhouse"


@dataclass
class ShippedRank:
    """The rank a bundle ships and what its memory figures say."""

    manifest: Manifest
    budget_mb: int  # the config's memory_budget_mb (0: none)
    peak_rss: int  # the rank's training peak measured at export (0: not measured)

    @property
    def memory_max_mb(self) -> int:
        """The unit's MemoryMax: the budget, else 1.5 x the measured peak (0: not set)."""
        return self.budget_mb or (math.ceil(self.peak_rss * 1.5 / 2**20) if self.peak_rss else 0)


@dataclass
class ShippedWheels:
    """What went into wheelhouse/."""

    client: str  # the fedlora wheel's file name
    pip: str  # the pip wheel's file name (install.sh runs pip from it; not installed)
    rows: list[dict]  # file, name, version of every wheel requirements.txt installs
    platforms: list[str]  # the platform tags they were downloaded for


def stage_bundle(opts: BundleOptions, stage_dir: Path) -> dict:
    """Write the bundle's tree into ``stage_dir/fedlora-edge-bundle``; return its manifest."""
    device = prepare_device_files(opts.config, opts.credentials, opts.placeholder)  # fail fast on a bad config
    root = stage_dir / TOP
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    created = time.time()
    rank = stage_artifacts(opts, root / "artifacts")
    wheels = stage_wheelhouse(opts, root / "wheelhouse")
    write_requirements(root / "requirements.txt", wheels)
    stage_config(device, root / "config")
    render_unit_and_scripts(root, opts, rank, wheels)
    (root / "README.txt").write_text(_readme(rank.manifest, opts, device, rank.memory_max_mb))
    doc = bundle_manifest(root, opts, created, rank, wheels, device)
    (root / BUNDLE_MANIFEST).write_text(json.dumps(doc, indent=1) + "\n")
    normalize_modes(root)
    return doc


def stage_artifacts(opts: BundleOptions, dest: Path) -> ShippedRank:
    """One rank's artifacts, chosen as the device would, checked before and after the copy."""
    from core.config import read_config_file

    raw_config = read_config_file(opts.config)
    budget_mb = int(raw_config.get("memory_budget_mb") or 0)
    chosen = choose_bundle(opts.artifacts, budget_mb * 2**20, opts.rank or int(raw_config.get("rank") or 0))
    manifest = Bundle(chosen).manifest
    for name in sorted(set(manifest.files) | {MANIFEST_NAME}):
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(chosen / name, dest / name)
    Bundle(dest)
    peak_rss = int((manifest.extra.get("memory") or {}).get("peak_rss_bytes") or 0)
    if budget_mb and peak_rss > budget_mb * 2**20:
        log.warning(
            "rank %d measured %.0f MiB at its training peak, above memory_budget_mb=%d",
            manifest.rank,
            peak_rss / 2**20,
            budget_mb,
        )
    return ShippedRank(manifest, budget_mb, peak_rss)


def stage_wheelhouse(opts: BundleOptions, wheelhouse: Path) -> ShippedWheels:
    """The client wheel, its runtime wheels for the target (their closure unless slim), and pip."""
    wheelhouse.mkdir()
    with tempfile.TemporaryDirectory(prefix="fedlora-bundle-") as tmp:
        client = Path(opts.client_wheel) if opts.client_wheel else build_client_wheel(Path(tmp))
        shutil.copyfile(client, wheelhouse / client.name)
        requirements, platforms = plan_download(
            device_requirements(client, opts.secagg),
            opts.platform,
            Path(opts.ort_wheel).resolve() if opts.ort_wheel else None,
        )
        cache = Path(opts.cache_dir) if opts.cache_dir else Path(tmp) / "cache"
        fetched = fetch_wheelhouse(
            requirements, platforms, opts.python_version, _constraints(opts), cache, no_deps=opts.slim
        )
        # copied before tmp goes: without a cache_dir the download is under it
        wheels = sorted(
            p for p in fetched.glob("*.whl") if canonical_name(parse_wheel_filename(p.name)[0]) != "fedlora"
        )
        for wheel in wheels:
            shutil.copyfile(wheel, wheelhouse / wheel.name)
        pip_wheels = sorted((fetched / "pip").glob("pip-*.whl"))
        if not pip_wheels:
            raise BundleError(f"{fetched}: no pip wheel")
        shutil.copyfile(pip_wheels[-1], wheelhouse / pip_wheels[-1].name)
    rows = []
    for path in [wheelhouse / client.name] + [wheelhouse / w.name for w in wheels]:
        name, version, _ = parse_wheel_filename(path.name)
        rows.append({"file": path.name, "name": canonical_name(name), "version": version})
    return ShippedWheels(client.name, pip_wheels[-1].name, rows, platforms)


def _constraints(opts: BundleOptions) -> Path | None:
    """The download's pins: ``opts.constraints``, else the source checkout's constraints.txt."""
    if opts.constraints is not None:
        return opts.constraints
    root = source_root()
    if root is not None and (root / "constraints.txt").is_file():
        return root / "constraints.txt"
    return None


def write_requirements(path: Path, wheels: ShippedWheels) -> None:
    """requirements.txt: every wheel install.sh installs, pinned with its sha256."""
    lines = [
        "# Every wheel of wheelhouse/ with its sha256; install.sh runs",
        "#   pip install --no-index --find-links wheelhouse --require-hashes -r requirements.txt",
    ]
    for row in wheels.rows:
        digest = sha256_file(path.parent / "wheelhouse" / row["file"])
        lines.append(f"{row['name']}=={row['version']} --hash=sha256:{digest}")
    path.write_text("\n".join(lines) + "\n")


def stage_config(device: DeviceFiles, config_dir: Path) -> None:
    """config/: device.json, credentials.env (mode 600) and the TLS files (600, in a 700 folder)."""
    config_dir.mkdir()
    (config_dir / "device.json").write_text(json.dumps(device.config, indent=2) + "\n")
    cred_dir = config_dir / "credentials"
    cred_dir.mkdir()
    for name, path in device.tls.items():
        shutil.copyfile(path, cred_dir / name)
        os.chmod(cred_dir / name, 0o600)
    os.chmod(cred_dir, 0o700)
    env_path = config_dir / "credentials.env"
    env_path.write_text(format_env_file(device.env, device.placeholder))
    os.chmod(env_path, 0o600)


def render_unit_and_scripts(root: Path, opts: BundleOptions, rank: ShippedRank, wheels: ShippedWheels) -> None:
    """The systemd unit, install.sh and uninstall.sh from ``templates/``, filled in for this bundle
    (the @PREFIX@, @STATE_DIR@ and @USER@ left in them are the device's, filled in at install)."""
    memory_max = rank.memory_max_mb
    memory_line = f"MemoryMax={memory_max}M" if memory_max else "# MemoryMax: no budget and no measured need"
    subs = {
        "@MODEL_ID@": rank.manifest.model_id,
        "@RANK@": str(rank.manifest.rank),
        "@MEMORY_LINE@": memory_line,
        "@PY_VERSION@": opts.python_version,
        "@MACHINE@": platform_machine(opts.platform),
        "@FEDLORA_WHEEL@": wheels.client,
        "@PIP_WHEEL@": wheels.pip,
        "@PIP_NO_DEPS@": "--no-deps" if opts.slim else "",
    }
    for name, mode in ((UNIT_NAME, 0o644), ("install.sh", 0o755), ("uninstall.sh", 0o755)):
        (root / name).write_text(render_text((TEMPLATES / name).read_text(encoding="utf-8"), subs))
        os.chmod(root / name, mode)


def bundle_manifest(
    root: Path, opts: BundleOptions, created: float, rank: ShippedRank, wheels: ShippedWheels, device: DeviceFiles
) -> dict:
    """BUNDLE-MANIFEST.json: the target, the rank, the wheels, and the sha256 and size of every
    file already under ``root``."""
    from edge_client import __version__

    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        files[path.relative_to(root).as_posix()] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return {
        "format_version": BUNDLE_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created)),
        "created_unix": int(created),
        "fedlora_version": __version__,
        "target": {
            "platform": opts.platform,
            "platform_tags": wheels.platforms,
            "machine": platform_machine(opts.platform),
            "python_version": opts.python_version,
            "custom_ort_wheel": bool(opts.ort_wheel),
        },
        "slim": opts.slim,
        "secagg": opts.secagg,
        "model_id": rank.manifest.model_id,
        "task": rank.manifest.task,
        "rank": rank.manifest.rank,
        "memory": {
            "training_peak_rss_bytes": rank.peak_rss,
            "memory_budget_mb": rank.budget_mb,
            "memory_max_mb": rank.memory_max_mb,
        },
        "credentials": "placeholder" if device.placeholder else ("provided" if device.env or device.tls else "none"),
        "wheels": wheels.rows,
        "pip": wheels.pip,
        "files": files,
    }


def normalize_modes(root: Path) -> None:
    """Folders 755 and files 644, except the scripts (755) and the secrets (credentials/ 700 and
    what is in it, credentials.env 600), whatever the build host's umask."""
    cred_dir = root / "config" / "credentials"
    env_path = root / "config" / "credentials.env"
    for path in [root, *root.rglob("*")]:
        if path.is_dir() and path != cred_dir:
            os.chmod(path, 0o755)
        elif path.is_file() and path.parent != cred_dir and path != env_path and path.suffix != ".sh":
            os.chmod(path, 0o644)


def _readme(manifest, opts: BundleOptions, device: DeviceFiles, memory_max: int) -> str:
    wheels = (
        "the distributions it declares (what it imports), installed with --no-deps"
        if opts.slim
        else "its full dependency closure"
    )
    secagg = (
        "included (cryptography, cffi, pycryptodome)"
        if opts.secagg
        else "not included: this device skips secure rounds (build with --secagg to include it)"
    )
    credentials = (
        "a placeholder: fill in PREFIX/config/credentials.env on each device, then start the service"
        if device.placeholder
        else "included (PREFIX/config/credentials.env, mode 600)"
    )
    return f"""fedlora edge bundle: {manifest.model_id}, LoRA rank {manifest.rank}, {manifest.task}
for CPython {opts.python_version} on {opts.platform} ({platform_machine(opts.platform)}).

Install (offline; as root on a systemd host it also installs and starts the service):
    sudo ./install.sh
    PREFIX=/some/folder ./install.sh      # elsewhere, without the service
Settings: PREFIX, STATE_DIR, DATA, PYTHON, SERVICE_USER, SYSTEMD=0, START=0 (see install.sh).

Wheels: the client and {wheels}.
Secure aggregation: {secagg}.
Credentials: {credentials}.
Memory: the service's MemoryMax is {f"{memory_max} MiB" if memory_max else "not set"}.

Check a device:   PREFIX/venv/bin/fedlora-edge doctor
Logs:             journalctl -u fedlora-edge -f
Remove:           sudo PREFIX/uninstall.sh   (PURGE=1 also deletes the state)
"""


def write_archive(root: Path, output: Path, mtime: int, level: int = 6) -> None:
    """tar.gz of ``root`` (one top folder), owned by root, modes kept (credentials stay 600)."""

    def normalize(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mtime = mtime
        return info

    output.parent.mkdir(parents=True, exist_ok=True)
    part = output.with_name(output.name + ".part")
    with tarfile.open(part, "w:gz", compresslevel=level) as tar:
        tar.add(root, arcname=root.name, filter=normalize)
    os.replace(part, output)


def build_bundle(opts: BundleOptions) -> dict:
    """Build the archive; return BUNDLE-MANIFEST with the archive's path and size added."""
    output = Path(opts.output)
    with tempfile.TemporaryDirectory(prefix="fedlora-bundle-", dir=output.resolve().parent) as tmp:
        doc = stage_bundle(opts, Path(tmp))
        write_archive(Path(tmp) / TOP, output, doc["created_unix"], opts.compress_level)
    doc["archive"] = {"path": str(output), "size": output.stat().st_size}
    return doc
