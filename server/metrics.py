"""Prometheus metrics of the aggregator, and its HTTP endpoints (/metrics, /healthz, /readyz).

Thin on purpose: it translates events into metric updates and decides nothing. No
per-device labels, so thousands of devices do not explode cardinality.
"""

from __future__ import annotations

import platform
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# A `_created` series per counter and histogram would double the series for nothing.
disable_created_metrics()


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        self.rounds_completed = Counter(
            "fedlora_rounds_completed_total", "Rounds closed with a new global adapter", registry=r
        )
        self.rounds_failed = Counter("fedlora_rounds_failed_total", "Rounds closed without quorum", registry=r)
        self.round = Gauge("fedlora_round", "Id of the open (or last) round", registry=r)
        self.round_duration = Histogram(
            "fedlora_round_duration_seconds",
            "Open to close",
            registry=r,
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600),
        )
        self.devices_online = Gauge("fedlora_devices_online", "Devices whose status is online", registry=r)
        self.participants = Gauge("fedlora_round_participants", "Accepted updates in the last closed round", registry=r)
        self.updates = Counter(
            "fedlora_updates_total", "Updates received, by result and reason", ["result", "reason"], registry=r
        )
        self.messages_refused = Counter(
            "fedlora_messages_refused_total",
            "Messages refused before they could change anything, by topic kind and reason",
            ["kind", "reason"],
            registry=r,
        )
        self.buffer_staleness = Gauge(
            "fedlora_buffer_staleness",
            "Async rounds: staleness (global versions behind) of the updates in the last applied buffer",
            ["stat"],
            registry=r,
        )
        self.buffer_updates = Gauge(
            "fedlora_buffer_updates", "Async rounds: accepted updates in the buffer of the next version", registry=r
        )
        self.updates_bounded = Counter(
            "fedlora_updates_bounded_total",
            "Accepted updates whose norm was clipped or weight capped",
            ["bound"],
            registry=r,
        )
        self.store_errors = Counter("fedlora_store_errors_total", "Failed writes to the state volume", registry=r)
        self.bytes_in = Counter("fedlora_uplink_bytes_total", "Update bytes received", ["kind"], registry=r)
        self.chunk_repairs = Counter(
            "fedlora_chunk_repair_requests_total",
            "Requests to a device for the missing chunks of a stalled update",
            registry=r,
        )
        self.chunks_requested = Counter(
            "fedlora_chunks_requested_total", "Chunk indices named in those requests", registry=r
        )
        self.bytes_out = Counter("fedlora_downlink_bytes_total", "Global adapter bytes published", ["kind"], registry=r)
        self.aggregation_seconds = Histogram(
            "fedlora_aggregation_seconds",
            "Time to finalize a round",
            registry=r,
            buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
        )
        self.dp_epsilon = Gauge(
            "fedlora_dp_epsilon", "Differential privacy spent so far: epsilon at the configured delta", registry=r
        )
        self.dp_clip = Gauge(
            "fedlora_dp_clip_norm", "Differential privacy: the next round's update clip bound", registry=r
        )
        self.eval_loss = Gauge("fedlora_global_eval_loss", "Evaluation loss of the global adapter", registry=r)
        self.eval_accuracy = Gauge(
            "fedlora_global_eval_accuracy", "Evaluation accuracy of the global adapter", registry=r
        )
        self.device_step_seconds = Histogram(
            "fedlora_device_step_seconds",
            "Device-reported median training step time",
            registry=r,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
        )
        self.device_peak_rss = Histogram(
            "fedlora_device_peak_rss_bytes",
            "Device-reported peak resident memory",
            registry=r,
            buckets=tuple(2**i * 2**20 for i in range(5, 15)),
        )
        for kind in ("wire", "raw"):  # export 0 from the start, so rate() works before the first round
            self.bytes_in.labels(kind)
            self.bytes_out.labels(kind)
        self.updates.labels("accepted", "ok")
        # No evaluation yet is "unknown", not a loss of 0.
        self.eval_loss.set(float("nan"))
        self.eval_accuracy.set(float("nan"))
        self.selected = Gauge("fedlora_round_selected", "Devices selected for the last closed round", registry=r)
        self.last_progress = Gauge(
            "fedlora_last_progress_timestamp_seconds",
            "Unix time of the last round closed, or of the start of this leader's term",
            registry=r,
        )
        self.round_timeout = Gauge(
            "fedlora_round_timeout_seconds", "Configured time from opening a round to its deadline", registry=r
        )
        self.shard_updates = Gauge(
            "fedlora_shard_round_updates",
            "Sharded aggregation: updates each worker committed in the open round (the coordinator's view)",
            ["shard"],
            registry=r,
        )
        self.shard_partials_waiting = Gauge(
            "fedlora_shard_partials_waiting",
            "Sharded aggregation: workers whose sealed partial the coordinator still waits for",
            registry=r,
        )
        self.job_finished = Gauge("fedlora_job_finished", "1 once every configured round is done", registry=r)
        self.leader = Gauge(
            "fedlora_leader", "1 if this replica runs rounds (holds the leader Lease), else 0", registry=r
        )
        self.kubernetes_errors = Counter(
            "fedlora_kubernetes_errors_total",
            "Failed calls to the Kubernetes API, by operation",
            ["operation"],
            registry=r,
        )
        self.build_info = Info("fedlora_build", "Version of the aggregator", registry=r)
        self.build_info.info({"version": _version(), "python_version": platform.python_version()})


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedlora")
    except PackageNotFoundError:
        return "unknown"


class _IPv6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class HealthServer:
    """/metrics for Prometheus, /healthz (``health()``), /readyz (``ready()``).

    ``ready()`` returns True, or False / a short reason why not (the 503's body). ``health()``
    returns True (200 ``ok``), a reason starting with ``degraded`` (200 with that text: the
    process works but something needs an operator, e.g. a full state volume, which a restart
    would not mend), or another reason (503: restart me, e.g. a stuck main loop). ``host`` may
    be an IPv6 address (``::`` listens on every address of the pod).
    """

    def __init__(
        self,
        metrics: Metrics,
        host: str,
        port: int,
        ready: Callable[[], bool | str],
        health: Callable[[], bool | str] = lambda: True,
    ):
        registry = metrics.registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                if self.path.startswith("/metrics"):
                    body, ctype, code = generate_latest(registry), CONTENT_TYPE_LATEST, 200
                elif self.path == "/healthz":
                    result = health()
                    text = "ok" if result is True else str(result)
                    code = 200 if result is True or text.startswith("degraded") else 503
                    body, ctype = f"{text}\n".encode(), "text/plain"
                elif self.path == "/readyz":
                    result = ready()
                    reason = result if isinstance(result, str) else "not connected to the broker"
                    ok = result is True
                    body, ctype, code = (b"ready\n" if ok else f"{reason}\n".encode()), "text/plain", 200 if ok else 503
                else:
                    body, ctype, code = b"not found\n", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        server_class = _IPv6Server if ":" in host else ThreadingHTTPServer
        self.httpd = server_class((host, port), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="fedlora-http", daemon=True)

    def start(self) -> HealthServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
