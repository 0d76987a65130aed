"""What the bundle builder writes and the device installer reads: file names, the format version
of BUNDLE-MANIFEST.json, the ``@KEY@`` placeholders filled in at install, and credentials.env
(written by ``build``; read by ``install`` and by ``fedlora-edge run|doctor --env-file``).

Standard library only, like ``install``, which imports it before the device's venv exists.
"""

from __future__ import annotations

import re
from pathlib import Path

from core.errors import ConfigError

BUNDLE_FORMAT = 1
BUNDLE_MANIFEST = "BUNDLE-MANIFEST.json"
UNIT_NAME = "fedlora-edge.service"
PLACEHOLDER_MARK = "# fedlora-credentials: placeholder"
# Keys of a --credentials JSON file and the variables they become in credentials.env.
CREDENTIAL_ENV = {
    "device_id": "FEDLORA_DEVICE_DEVICE_ID",
    "username": "FEDLORA_DEVICE_BROKER_USERNAME",
    "password": "FEDLORA_DEVICE_BROKER_PASSWORD",
}


def format_env_file(env: dict[str, str], placeholder: bool) -> str:
    lines = [
        "# fedlora edge device credentials, read by `fedlora-edge run|doctor --env-file`.",
        "# KEY=VALUE lines; they override config/device.json. Keep this file mode 600.",
    ]
    if placeholder:
        lines += [
            PLACEHOLDER_MARK,
            "# Provision this device: set the lines below (uncomment them), put TLS files into",
            "# @PREFIX@/config/credentials/ if the broker wants them, then start the service",
            "# (systemctl start fedlora-edge) and check it: @PREFIX@/venv/bin/fedlora-edge doctor",
            "#FEDLORA_DEVICE_DEVICE_ID=",
            "#FEDLORA_DEVICE_BROKER_USERNAME=",
            "#FEDLORA_DEVICE_BROKER_PASSWORD=",
            "#FEDLORA_DEVICE_BROKER_CERT_FILE=@PREFIX@/config/credentials/client.crt",
            "#FEDLORA_DEVICE_BROKER_KEY_FILE=@PREFIX@/config/credentials/client.key",
        ]
    lines += [f"{key}={_env_quote(value)}" for key, value in sorted(env.items())]
    return "\n".join(lines) + "\n"


def _env_quote(value: str) -> str:
    if value and re.fullmatch(r"[A-Za-z0-9_@%+=:,./-]+", value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$") + '"'


def read_env_file(path: str | Path) -> dict[str, str]:
    """``KEY=VALUE`` lines (``export`` allowed, ``#`` comments, single or double quotes)."""
    out: dict[str, str] = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[7:].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ConfigError(f"{path}:{number}: expected KEY=VALUE, got {line[:40]!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == "'":
            value = value[1:-1]
        elif len(value) >= 2 and value[0] == value[-1] == '"':
            value = re.sub(r'\\(["\\$`])', r"\1", value[1:-1])
        out[key] = value
    return out


def render_text(text: str, subs: dict[str, str]) -> str:
    """``text`` with each ``@KEY@`` of ``subs`` replaced by its value."""
    for key, value in subs.items():
        text = text.replace(key, value)
    return text
