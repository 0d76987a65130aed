"""A loopback stand-in for the few Kubernetes API endpoints the aggregator calls.

No API server can run on this machine (FACTS.md), so this one speaks the exact surface the
aggregator uses, the way kube-apiserver does:

    GET  /apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{name}   200, or 404 NotFound
    POST /apis/coordination.k8s.io/v1/namespaces/{ns}/leases          201, or 409 AlreadyExists
    PUT  /apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{name}   200, or 409 Conflict when
         metadata.resourceVersion is not the stored one (optimistic concurrency)
    POST /api/v1/namespaces/{ns}/events                               201

Writes are serialized under one lock, each bumps a cluster-wide resourceVersion, and
MicroTime fields must carry six fractional digits (the API server's parser requires them).
Faults: ``block(agent)`` answers 503 to every request whose User-Agent contains ``agent``;
``conflict_next_write()`` bumps the resourceVersion just before the next write, as if a
concurrent writer got there first. ``history`` records every successful lease write.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LEASES = re.compile(r"^/apis/coordination\.k8s\.io/v1/namespaces/([a-z0-9.-]+)/leases(?:/([a-z0-9.-]+))?$")
EVENTS = re.compile(r"^/api/v1/namespaces/([a-z0-9.-]+)/events$")
MICRO_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(Z|[+-]\d\d:\d\d)$")
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")


def _status(code: int, reason: str, message: str) -> dict:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


class FakeApiServer:
    def __init__(self):
        self.lock = threading.Lock()
        self.leases: dict[tuple[str, str], dict] = {}
        self.events: list[dict] = []
        self.history: list[dict] = []  # {"time", "verb", "holder", "resourceVersion"} per successful lease write
        self.requests: list[tuple[str, str, int, str]] = []  # (method, path, status, user agent)
        self.blocked: set[str] = set()
        self._conflicts = 0
        self._rv = 1000
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _body(self) -> dict:
                length = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(length) or b"{}")

            def _send(self, code: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                with server.lock:
                    server.requests.append((self.command, self.path, code, self.headers.get("User-Agent", "")))

            def _handle(self):
                agent = self.headers.get("User-Agent", "")
                body = self._body() if self.command in ("POST", "PUT") else {}
                if any(b in agent for b in server.blocked):
                    return self._send(503, _status(503, "ServiceUnavailable", "blocked by the test"))
                path = self.path.split("?", 1)[0]
                m = LEASES.match(path)
                if m:
                    return self._send(*server.lease_request(self.command, m.group(1), m.group(2), body))
                m = EVENTS.match(path)
                if m and self.command == "POST":
                    return self._send(*server.event_request(m.group(1), body))
                return self._send(404, _status(404, "NotFound", f"no route for {self.command} {path}"))

            do_GET = do_POST = do_PUT = _handle  # noqa: N815 (http.server's naming)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> FakeApiServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- faults --------------------------------------------------------------------------
    def block(self, agent: str) -> None:
        self.blocked.add(agent)

    def unblock(self, agent: str) -> None:
        self.blocked.discard(agent)

    def conflict_next_write(self) -> None:
        with self.lock:
            self._conflicts += 1

    # -- views for assertions ------------------------------------------------------------
    def lease(self, namespace: str, name: str) -> dict | None:
        with self.lock:
            obj = self.leases.get((namespace, name))
            return json.loads(json.dumps(obj)) if obj else None

    def holder(self, namespace: str, name: str) -> str:
        obj = self.lease(namespace, name)
        return (obj or {}).get("spec", {}).get("holderIdentity") or ""

    def tenures(self) -> list[tuple[float, str]]:
        """(server time, holder) each time the holder changed, in order."""
        out: list[tuple[float, str]] = []
        with self.lock:
            for h in self.history:
                if not out or out[-1][1] != h["holder"]:
                    out.append((h["time"], h["holder"]))
        return out

    # -- the endpoints -------------------------------------------------------------------
    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _invalid(self, obj: dict) -> str | None:
        spec = obj.get("spec") or {}
        for key in ("acquireTime", "renewTime"):
            if spec.get(key) is not None and not MICRO_TIME.match(str(spec[key])):
                return f"spec.{key}: {spec[key]!r} is not a MicroTime (RFC 3339 with 6 fractional digits)"
        for key in ("leaseDurationSeconds", "leaseTransitions"):
            if spec.get(key) is not None and (not isinstance(spec[key], int) or spec[key] < 0):
                return f"spec.{key}: {spec[key]!r} must be a non-negative integer"
        if spec.get("holderIdentity") is not None and not isinstance(spec["holderIdentity"], str):
            return "spec.holderIdentity must be a string"
        return None

    def lease_request(self, verb: str, namespace: str, name: str | None, body: dict) -> tuple[int, dict]:
        with self.lock:
            if verb == "GET" and name:
                obj = self.leases.get((namespace, name))
                if obj is None:
                    return 404, _status(404, "NotFound", f'leases.coordination.k8s.io "{name}" not found')
                return 200, obj
            if verb == "POST" and not name:
                meta = body.get("metadata") or {}
                name = meta.get("name")
                if not name or body.get("kind", "Lease") != "Lease":
                    return 422, _status(422, "Invalid", "metadata.name is required")
                if (namespace, name) in self.leases:
                    return 409, _status(409, "AlreadyExists", f'leases.coordination.k8s.io "{name}" already exists')
                problem = self._invalid(body)
                if problem:
                    return 422, _status(422, "Invalid", problem)
                obj = {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {
                        "name": name,
                        "namespace": namespace,
                        "uid": str(uuid.uuid4()),
                        "resourceVersion": self._next_rv(),
                        "creationTimestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    },
                    "spec": body.get("spec") or {},
                }
                self.leases[(namespace, name)] = obj
                self.history.append(
                    {
                        "time": time.time(),
                        "verb": "create",
                        "holder": obj["spec"].get("holderIdentity") or "",
                        "resourceVersion": obj["metadata"]["resourceVersion"],
                    }
                )
                return 201, obj
            if verb == "PUT" and name:
                current = self.leases.get((namespace, name))
                if current is None:
                    return 404, _status(404, "NotFound", f'leases.coordination.k8s.io "{name}" not found')
                meta = body.get("metadata") or {}
                if meta.get("name") != name:
                    return 400, _status(400, "BadRequest", "the name of the object does not match the name on the URL")
                if not meta.get("resourceVersion"):
                    return 422, _status(422, "Invalid", "metadata.resourceVersion: must be specified for an update")
                if self._conflicts:
                    self._conflicts -= 1
                    current["metadata"]["resourceVersion"] = self._next_rv()
                if meta["resourceVersion"] != current["metadata"]["resourceVersion"]:
                    return 409, _status(
                        409,
                        "Conflict",
                        f"Operation cannot be fulfilled on leases.coordination.k8s.io "
                        f'"{name}": the object has been modified; please apply your '
                        f"changes to the latest version and try again",
                    )
                problem = self._invalid(body)
                if problem:
                    return 422, _status(422, "Invalid", problem)
                current["spec"] = body.get("spec") or {}
                current["metadata"]["resourceVersion"] = self._next_rv()
                self.history.append(
                    {
                        "time": time.time(),
                        "verb": "update",
                        "holder": current["spec"].get("holderIdentity") or "",
                        "resourceVersion": current["metadata"]["resourceVersion"],
                    }
                )
                return 200, current
            return 405, _status(405, "MethodNotAllowed", f"{verb} is not supported here")

    def event_request(self, namespace: str, body: dict) -> tuple[int, dict]:
        meta = body.get("metadata") or {}
        involved = body.get("involvedObject") or {}
        problems = []
        if not meta.get("name") and not meta.get("generateName"):
            problems.append("metadata.name is required")
        if meta.get("namespace", namespace) != namespace or involved.get("namespace", namespace) != namespace:
            problems.append("namespace does not match the request")
        if not involved.get("kind") or not involved.get("name"):
            problems.append("involvedObject.kind and .name are required")
        if body.get("type") not in ("Normal", "Warning"):
            problems.append(f"type must be Normal or Warning, not {body.get('type')!r}")
        if not body.get("reason"):
            problems.append("reason is required")
        for key in ("firstTimestamp", "lastTimestamp"):
            if body.get(key) is not None and not TIME.match(str(body[key])):
                problems.append(f"{key}: {body[key]!r} is not an RFC 3339 time")
        if problems:
            return 422, _status(422, "Invalid", "; ".join(problems))
        with self.lock:
            obj = {**body, "metadata": {**meta, "namespace": namespace, "resourceVersion": self._next_rv()}}
            self.events.append({**obj, "received": time.time()})
        return 201, obj
