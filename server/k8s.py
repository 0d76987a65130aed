"""The aggregator's few calls to the Kubernetes API: a client, and Events about its pod.

Round completions (and leadership changes) are recorded as core/v1 Events on the
aggregator's Pod, so ``kubectl get events`` and ``kubectl describe pod`` show the job's
progress. Events are posted from a background thread: a slow or unreachable API server
never holds up a round, and a failed post is logged and counted, not raised.

Only the official ``kubernetes`` client is used; nothing here decides anything.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from core.errors import ConfigError

log = logging.getLogger("fedlora.k8s")

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
COMPONENT = "fedlora-aggregator"


def api_client(user_agent: str):
    """A ``kubernetes.client.ApiClient``: in-cluster credentials inside a pod, else the
    kubeconfig (``KUBECONFIG`` or ``~/.kube/config``)."""
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=configuration)  # re-reads the rotated token
        else:
            config.load_kube_config(client_configuration=configuration)
    except config.ConfigException as exc:
        raise ConfigError(
            f"kubernetes.leader_election / kubernetes.events need the Kubernetes API, but neither "
            f"in-cluster credentials nor a kubeconfig were found ({exc})"
        ) from exc
    api = client.ApiClient(configuration)
    api.user_agent = user_agent  # the API server's audit log names us
    return api


def default_namespace() -> str:
    """The pod's namespace (from its service account), else ``default``."""
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "default"
    except OSError:
        return "default"


def default_identity() -> str:
    """The pod name (``POD_NAME``), else the host name, which Kubernetes sets to the pod name."""
    return os.environ.get("POD_NAME") or socket.gethostname()


def _time(wall: float) -> datetime:
    """An Event's time: UTC to the second (the client writes it as RFC 3339, ``+00:00``)."""
    return datetime.fromtimestamp(int(wall), tz=timezone.utc)


class EventRecorder:
    """Posts Events about one Pod (``involvedObject``) from a background thread.

    core_api: a ``kubernetes.client.CoreV1Api``; pod_name / pod_uid: the Pod the Events are
    about (the uid lets ``kubectl describe pod`` find them); on_result: called with True or
    False after each post (for a metric).
    """

    def __init__(
        self,
        core_api,
        namespace: str,
        pod_name: str,
        pod_uid: str = "",
        instance: str = "",
        on_result: Callable[[bool], None] | None = None,
        request_timeout: float = 5.0,
        wall: Callable[[], float] = time.time,
    ):
        self.api = core_api
        self.namespace = namespace
        self.pod_name = pod_name
        self.pod_uid = pod_uid
        self.instance = instance or pod_name
        self.on_result = on_result
        self.request_timeout = request_timeout
        self.wall = wall
        self._queue: queue.Queue = queue.Queue(maxsize=1000)
        self._thread = threading.Thread(target=self._run, name="fedlora-k8s-events", daemon=True)

    def start(self) -> EventRecorder:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Post what is queued (for up to ``timeout`` seconds), then stop."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)

    # -- what the aggregator reports -----------------------------------------------------
    def record(self, reason: str, message: str, type_: str = "Normal") -> None:
        try:
            self._queue.put_nowait((reason, message, type_, self.wall()))
        except queue.Full:
            log.warning("event queue full; dropping event %s: %s", reason, message)

    def round_closed(self, entry: dict) -> None:
        """An Event for one closed round (the aggregator's history entry)."""
        if entry.get("ok"):
            text = (
                f"Round {entry['round']} completed: {entry['participants']}/{entry['selected']} devices, "
                f"{entry.get('examples', 0)} examples, {entry.get('duration_s', 0):.1f}s ({entry.get('reason')})"
            )
            self.record("RoundCompleted", text)
        else:
            text = (
                f"Round {entry['round']} failed: {entry.get('reason')}, "
                f"{entry.get('participants', 0)}/{entry.get('selected', 0)} devices"
            )
            self.record("RoundFailed", text, "Warning")

    def leader_elected(self, identity: str, lease: str) -> None:
        self.record("LeaderElected", f"{identity} holds lease {lease} and runs rounds")

    # -- the posting thread --------------------------------------------------------------
    def _body(self, reason: str, message: str, type_: str, wall: float):
        from kubernetes import client

        stamp = _time(wall)
        return client.CoreV1Event(
            metadata=client.V1ObjectMeta(name=f"{self.pod_name}.{time.time_ns():x}", namespace=self.namespace),
            involved_object=client.V1ObjectReference(
                api_version="v1", kind="Pod", name=self.pod_name, namespace=self.namespace, uid=self.pod_uid or None
            ),
            reason=reason,
            message=message[:1024],
            type=type_,
            count=1,
            first_timestamp=stamp,
            last_timestamp=stamp,
            source=client.V1EventSource(component=COMPONENT, host=self.instance),
            reporting_component=COMPONENT,
            reporting_instance=self.instance,
        )

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            reason, message, type_, wall = item
            try:
                self.api.create_namespaced_event(
                    self.namespace, self._body(reason, message, type_, wall), _request_timeout=self.request_timeout
                )
                ok = True
            except Exception as exc:  # RBAC, network: the round went on; say so and count it
                log.warning("could not record event %s (%s): %s", reason, message, str(exc).splitlines()[0])
                ok = False
            if self.on_result is not None:
                self.on_result(ok)
