"""Prometheus metrics of the aggregator, and its HTTP endpoints (/metrics, /healthz, /readyz).

Thin on purpose: it translates events into metric updates and decides nothing. No
per-device labels, so thousands of devices do not explode cardinality.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        self.rounds_completed = Counter("fedlora_rounds_completed_total", "Rounds closed with a new global adapter", registry=r)
        self.rounds_failed = Counter("fedlora_rounds_failed_total", "Rounds closed without quorum", registry=r)
        self.round = Gauge("fedlora_round", "Id of the open (or last) round", registry=r)
        self.round_duration = Histogram("fedlora_round_duration_seconds", "Open to close", registry=r,
                                        buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600))
        self.devices_online = Gauge("fedlora_devices_online", "Devices whose status is online", registry=r)
        self.participants = Gauge("fedlora_round_participants", "Accepted updates in the last closed round", registry=r)
        self.updates = Counter("fedlora_updates_total", "Updates received, by result and reason", ["result", "reason"], registry=r)
        self.bytes_in = Counter("fedlora_uplink_bytes_total", "Update bytes received", ["kind"], registry=r)
        self.bytes_out = Counter("fedlora_downlink_bytes_total", "Global adapter bytes published", ["kind"], registry=r)
        self.aggregation_seconds = Histogram("fedlora_aggregation_seconds", "Time to finalize a round", registry=r,
                                             buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 30))
        self.eval_loss = Gauge("fedlora_global_eval_loss", "Evaluation loss of the global adapter", registry=r)
        self.eval_accuracy = Gauge("fedlora_global_eval_accuracy", "Evaluation accuracy of the global adapter", registry=r)
        self.device_step_seconds = Histogram("fedlora_device_step_seconds", "Device-reported median training step time",
                                             registry=r, buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10))
        self.device_peak_rss = Histogram("fedlora_device_peak_rss_bytes", "Device-reported peak resident memory",
                                         registry=r, buckets=tuple(2**i * 2**20 for i in range(5, 15)))


class HealthServer:
    """/metrics for Prometheus, /healthz (the process serves), /readyz (connected to the broker)."""

    def __init__(self, metrics: Metrics, host: str, port: int, ready: Callable[[], bool]):
        registry = metrics.registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                if self.path.startswith("/metrics"):
                    body, ctype, code = generate_latest(registry), CONTENT_TYPE_LATEST, 200
                elif self.path == "/healthz":
                    body, ctype, code = b"ok\n", "text/plain", 200
                elif self.path == "/readyz":
                    ok = ready()
                    body, ctype, code = (b"ready\n" if ok else b"not connected to the broker\n"), "text/plain", 200 if ok else 503
                else:
                    body, ctype, code = b"not found\n", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="fedlora-http", daemon=True)

    def start(self) -> "HealthServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
