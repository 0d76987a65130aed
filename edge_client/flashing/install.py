"""Install an unpacked edge bundle on a device: the steps its install.sh runs.

``verify`` checks every file against BUNDLE-MANIFEST.json; ``install-files`` puts the artifacts,
config, credentials and unit under PREFIX. Standard library only (tests/test_architecture.py
keeps it so): install.sh runs ``verify`` from the client wheel itself (a zip on ``sys.path``)
before the venv exists, and ``install-files`` from the new venv right after.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from pathlib import Path

from core.bundle import Bundle, sha256_file
from core.errors import BundleError, ConfigError
from edge_client.flashing.layout import (
    BUNDLE_FORMAT,
    BUNDLE_MANIFEST,
    CREDENTIAL_ENV,
    PLACEHOLDER_MARK,
    UNIT_NAME,
    read_env_file,
    render_text,
)

Owner = tuple[int, int]


def verify_tree(root: Path) -> dict:
    """Check every file BUNDLE-MANIFEST.json lists; raise BundleError naming the first bad one."""
    path = root / BUNDLE_MANIFEST
    if not path.is_file():
        raise BundleError(f"{root}: no {BUNDLE_MANIFEST}; is this an unpacked fedlora edge bundle?")
    doc = json.loads(path.read_text(encoding="utf-8"))
    if doc.get("format_version") != BUNDLE_FORMAT:
        raise BundleError(f"{path}: format_version {doc.get('format_version')!r}, this installer reads {BUNDLE_FORMAT}")
    for rel, info in sorted(doc["files"].items()):
        file = root / rel
        if not file.is_file():
            raise BundleError(f"{root}: {rel} is missing")
        if file.stat().st_size != info["size"] or sha256_file(file) != info["sha256"]:
            raise BundleError(f"{root}: {rel} does not match {BUNDLE_MANIFEST} (corrupted or changed)")
    return doc


def install_files(
    source: Path,
    prefix: Path,
    state_dir: Path,
    data: str | None = None,
    user: str | None = None,
    unit_path: str | None = None,
) -> dict:
    """Put the verified bundle's artifacts, config, credentials and unit under ``prefix``.

    A provisioned credentials.env already there is kept when the new bundle brings only the
    placeholder (re-flashing a device keeps its identity).
    """
    doc = verify_tree(source)
    owner = _owner(user)
    if user is None:
        import getpass

        user = getpass.getuser()
    subs = {"@PREFIX@": str(prefix), "@STATE_DIR@": str(state_dir), "@USER@": user}
    prefix.mkdir(parents=True, exist_ok=True)
    swap_in_artifacts(source / "artifacts", prefix)
    config = write_device_config(source, prefix / "config", subs, data)
    env_path = write_credentials(source, prefix / "config", subs, owner)
    env = read_env_file(env_path)
    provisioned = bool(config.get("device_id") or env.get(CREDENTIAL_ENV["device_id"]))
    copy_unit_and_uninstaller(source, prefix, subs)
    make_state_dir(state_dir, owner)
    settings = {
        "PREFIX": str(prefix),
        "STATE_DIR": str(state_dir),
        "SERVICE_USER": user if owner else "",
        "UNIT_PATH": unit_path or "",
        "PROVISIONED": "yes" if provisioned else "no",
        "BUNDLE_RANK": str(doc["rank"]),
        "BUNDLE_CREATED": doc["created"],
    }
    _write(
        prefix / "install.env",
        "# Written by install.sh; read by uninstall.sh.\n"
        + "".join(f"{k}={shlex.quote(v)}\n" for k, v in settings.items()),
        0o644,
    )
    print(
        f"[install] {doc['model_id']} rank {doc['rank']} in {prefix}/artifacts; state in {state_dir}; "
        f"credentials {'provisioned' if provisioned else 'to provision'} ({env_path})"
    )
    return settings


def swap_in_artifacts(artifacts: Path, prefix: Path) -> None:
    """Copy ``artifacts`` to ``prefix/artifacts`` whole: copied and verified beside the old ones,
    then swapped in."""
    new = prefix / "artifacts.new"
    shutil.rmtree(new, ignore_errors=True)
    shutil.copytree(artifacts, new)
    Bundle(new, verify=True)
    old = prefix / "artifacts.old"
    shutil.rmtree(old, ignore_errors=True)
    if (prefix / "artifacts").exists():
        os.replace(prefix / "artifacts", old)
    os.replace(new, prefix / "artifacts")
    shutil.rmtree(old, ignore_errors=True)


def write_device_config(source: Path, config_dir: Path, subs: dict[str, str], data: str | None) -> dict:
    """config/device.json with its placeholders filled in (and ``data`` if given); returns it."""
    config_dir.mkdir(exist_ok=True)
    os.chmod(config_dir, 0o755)
    config = _render_json(json.loads((source / "config" / "device.json").read_text(encoding="utf-8")), subs)
    if data:
        config["data"] = data
    _write(config_dir / "device.json", json.dumps(config, indent=2) + "\n", 0o644)
    return config


def write_credentials(source: Path, config_dir: Path, subs: dict[str, str], owner: Owner | None) -> Path:
    """The TLS files and credentials.env, mode 600 and owned by the service user; a provisioned
    credentials.env is kept when the bundle brings only the placeholder. Returns its path."""
    cred_dir = config_dir / "credentials"
    cred_dir.mkdir(exist_ok=True)
    for file in sorted((source / "config" / "credentials").iterdir()):
        _write(cred_dir / file.name, file.read_bytes(), 0o600, owner)
    os.chmod(cred_dir, 0o700)
    if owner:
        os.chown(cred_dir, *owner)
    env_new = render_text((source / "config" / "credentials.env").read_text(), subs)
    env_path = config_dir / "credentials.env"
    keep = env_path.is_file() and PLACEHOLDER_MARK in env_new and read_env_file(env_path)
    if keep:
        print(f"[install] keeping the provisioned {env_path}")
        if owner:
            os.chown(env_path, *owner)
    else:
        _write(env_path, env_new, 0o600, owner)
    return env_path


def copy_unit_and_uninstaller(source: Path, prefix: Path, subs: dict[str, str]) -> None:
    """The unit and README.txt filled in, BUNDLE-MANIFEST.json and uninstall.sh as they are."""
    _write(prefix / UNIT_NAME, render_text((source / UNIT_NAME).read_text(), subs), 0o644)
    _write(prefix / "README.txt", render_text((source / "README.txt").read_text(), subs), 0o644)
    shutil.copyfile(source / BUNDLE_MANIFEST, prefix / BUNDLE_MANIFEST)
    shutil.copyfile(source / "uninstall.sh", prefix / "uninstall.sh")
    os.chmod(prefix / "uninstall.sh", 0o755)


def make_state_dir(state_dir: Path, owner: Owner | None) -> None:
    """The client's state folder, mode 700, owned (with what is in it) by the service user."""
    state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)
    if owner:
        os.chown(state_dir, *owner)
        for path in state_dir.rglob("*"):
            os.chown(path, *owner)


def _owner(user: str | None) -> Owner | None:
    if not user:
        return None
    import pwd

    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"user {user!r} does not exist") from None
    return entry.pw_uid, entry.pw_gid


def _write(path: Path, content: str | bytes, mode: int, owner: Owner | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(content, bytes):
        tmp.write_bytes(content)
    else:
        tmp.write_text(content)
    os.chmod(tmp, mode)
    if owner:
        os.chown(tmp, *owner)
    os.replace(tmp, path)


def _render_json(value, subs: dict[str, str]):
    if isinstance(value, str):
        return render_text(value, subs)
    if isinstance(value, dict):
        return {k: _render_json(v, subs) for k, v in value.items()}
    if isinstance(value, list):
        return [_render_json(v, subs) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    """The device-side steps install.sh runs (``verify``, ``install-files``)."""
    parser = argparse.ArgumentParser(prog="python -m edge_client.flashing.install", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="check an unpacked bundle against BUNDLE-MANIFEST.json")
    verify.add_argument("source", type=Path)
    files = sub.add_parser("install-files", help="install artifacts, config, credentials and unit under PREFIX")
    files.add_argument("--source", type=Path, required=True)
    files.add_argument("--prefix", type=Path, required=True)
    files.add_argument("--state-dir", type=Path, required=True)
    files.add_argument("--data")
    files.add_argument("--user", help="the service user: owns the state and the credentials")
    files.add_argument("--unit-path", help="where install.sh puts the unit (recorded for uninstall.sh)")
    args = parser.parse_args(argv)
    try:
        if args.command == "verify":
            doc = verify_tree(args.source)
            print(
                f"[install] bundle verified: {len(doc['files'])} files, {doc['model_id']} rank {doc['rank']}, "
                f"built {doc['created']}"
            )
        else:
            install_files(args.source, args.prefix, args.state_dir, args.data, args.user, args.unit_path)
    except (BundleError, ConfigError, OSError) as exc:
        print(f"install: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
