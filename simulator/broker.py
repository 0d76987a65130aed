"""The embedded MQTT broker of one-machine runs, and the clean-up after a run on someone else's.

``start_embedded_broker`` starts Mosquitto (``MosquittoBroker``: a child process with a
generated config, its log in the run's folder) when its binary is installed, else amqtt
(``EmbeddedBroker``: in-process, on its own event loop). Mosquitto is the well-kept choice:
it speaks MQTT 5 and 3.1.1, and it waits for a busy client's PUBACK instead of giving the
delivery up. amqtt speaks MQTT 3.1.1 only, has no packet size option (clients chunk below
their configured limit) and drops a QoS 1 delivery after 5 s without a PUBACK (a constant in
amqtt), logging a traceback; its log goes to the run's file, never to the researcher's terminal.

``clear_retained`` removes what a job left retained on a broker that outlives the run.
Production uses an existing broker (Mosquitto, EMQX...).
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from core.errors import FedloraError
from core.protocol import Topics
from core.transport import BrokerConfig, MqttLink

if TYPE_CHECKING:
    from amqtt.broker import Broker

log = logging.getLogger("fedlora.simulate")

EMBEDDED_BROKERS = ("auto", "mosquitto", "amqtt")
# Mosquitto's default queue per client is 1000 messages: the aggregator's subscription takes
# every device's chunks at once (thousands of simulated devices), so allow far more.
MOSQUITTO_MAX_QUEUED = 1_000_000


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class _OneLine(logging.Filter):
    """Folds a record's traceback into one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            exc = record.exc_info[1]
            record.msg, record.args = f"{record.getMessage()} ({type(exc).__name__}: {exc})", ()
            record.exc_info, record.exc_text = None, None
        return True


class EmbeddedBroker:
    """amqtt in this process. ``log_file``: where its log goes (warnings and above, tracebacks
    folded to one line); None: nowhere."""

    name = "amqtt"
    protocol = "3.1.1"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, log_file: str | Path | None = None):
        self.host = host
        self.port = port or free_port(host)
        self.log_file = Path(log_file) if log_file is not None else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: Broker | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> EmbeddedBroker:
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # amqtt logs a traceback for every QoS 1 delivery a client acknowledged late; the
        # client's own resend covers it. Contained: the run's broker log has it on one line,
        # the researcher's terminal nothing.
        amqtt_log = logging.getLogger("amqtt")
        for old in [h for h in amqtt_log.handlers if any(isinstance(f, _OneLine) for f in h.filters)]:
            amqtt_log.removeHandler(old)
            old.close()
        handler: logging.Handler = logging.NullHandler()
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(self.log_file)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.addFilter(_OneLine())
        amqtt_log.addHandler(handler)
        amqtt_log.propagate = False
        self._thread = threading.Thread(target=self._run, name="fedlora-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            raise FedloraError(f"embedded broker did not start on {self.url}: {self._error}")
        return self

    def _run(self) -> None:
        from amqtt.broker import Broker

        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        # amqtt drops an MQTT 5 CONNECT by closing the socket and asyncio prints the
        # resulting traceback; clients fall back to 3.1.1, so it is noise.
        self._loop.set_exception_handler(lambda loop, ctx: logging.getLogger("amqtt").debug("%s", ctx.get("message")))
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        try:
            self._broker = Broker(config, loop=self._loop)
            self._loop.run_until_complete(self._broker.start())
        except BaseException as exc:  # report to the starting thread, which raises it
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    def stop(self) -> None:
        if self._loop is None or self._broker is None:
            return
        future = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop)
        try:
            future.result(timeout=10)
        except Exception:
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        for handler in [
            h for h in logging.getLogger("amqtt").handlers if any(isinstance(f, _OneLine) for f in h.filters)
        ]:
            logging.getLogger("amqtt").removeHandler(handler)
            handler.close()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def mosquitto_binary() -> str | None:
    """The installed Mosquitto (on PATH, or Debian's /usr/sbin), or None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for folder in ("/usr/sbin", "/usr/local/sbin"):
        candidate = Path(folder) / "mosquitto"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


class MosquittoBroker:
    """Mosquitto as a child process on a free local port; its config and log in ``folder``."""

    name = "mosquitto"
    protocol = "auto"

    def __init__(self, folder: str | Path, host: str = "127.0.0.1", port: int = 0, binary: str | None = None):
        self.folder = Path(folder)
        self.host = host
        self.port = port or free_port(host)
        self.binary = binary or mosquitto_binary()
        self.log_file = self.folder / "broker.log"
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> MosquittoBroker:
        if self.binary is None:
            raise FedloraError("mosquitto is not installed (apt-get install mosquitto)")
        self.folder.mkdir(parents=True, exist_ok=True)
        conf = self.folder / "mosquitto.conf"
        user = "user root\n" if hasattr(os, "geteuid") and os.geteuid() == 0 else ""
        conf.write_text(
            f"{user}listener {self.port} {self.host}\nallow_anonymous true\npersistence false\n"
            f"max_queued_messages {MOSQUITTO_MAX_QUEUED}\nmax_queued_bytes 0\n"
        )
        with open(self.log_file, "ab") as out:
            self._proc = subprocess.Popen(
                [self.binary, "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return self
            except OSError:
                if self._proc.poll() is not None:
                    break
                time.sleep(0.02)
        self.stop()
        raise FedloraError(f"mosquitto did not start on {self.url}; see {self.log_file}")

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=10)
        self._proc = None

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def start_embedded_broker(kind: str, folder: str | Path) -> MosquittoBroker | EmbeddedBroker:
    """``kind``: mosquitto, amqtt, or auto (Mosquitto when installed, else amqtt); its log in
    ``folder``/broker.log."""
    if kind not in EMBEDDED_BROKERS:
        raise FedloraError(f"embedded broker must be one of {EMBEDDED_BROKERS}, not {kind!r}")
    if kind == "mosquitto" or (kind == "auto" and mosquitto_binary()):
        return MosquittoBroker(folder).start()
    return EmbeddedBroker(log_file=Path(folder) / "broker.log").start()


def retained_topics(broker: BrokerConfig, topic_filter: str, wait: float = 10.0) -> set[str]:
    """The topics matching ``topic_filter`` that hold a (non-empty) retained message."""
    link = MqttLink(broker, persistent=False).connect()
    try:
        return _collect_retained(link, topic_filter, wait)
    finally:
        link.close()


def _collect_retained(link: MqttLink, topic_filter: str, wait: float) -> set[str]:
    marker = f"fedlora-probe/{link.client_id}"
    link.subscribe(topic_filter)
    link.subscribe(marker)
    # The broker sends a subscription's retained messages before anything published after it
    # on the same connection: the marker's arrival says all of them have come.
    link.publish(marker, b"end")
    retained: set[str] = set()
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            msg = link.inbox.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise FedloraError(f"broker {link.cfg.url} did not return our marker within {wait:.0f}s") from None
        if msg.topic == marker:
            return retained
        if msg.retain and msg.payload:
            retained.add(msg.topic)
    raise FedloraError(f"broker {link.cfg.url} did not return our marker within {wait:.0f}s")


def clear_retained(broker: BrokerConfig, job: str, wait: float = 10.0) -> int:
    """Publish an empty retained message on every topic of ``job`` that holds a retained one
    (round, global adapter chunks, device status): a broker that outlives the run keeps
    nothing of it. Returns how many topics were cleared."""
    link = MqttLink(broker, client_id=f"fedlora-{job}-cleanup", persistent=False).connect()
    try:
        retained = _collect_retained(link, f"{Topics(job).base}/#", wait)
        infos = [link.publish(topic, b"", retain=True) for topic in sorted(retained)]
        for info in infos:
            info.wait_for_publish(timeout=wait)
        return len(retained)
    finally:
        link.close()
