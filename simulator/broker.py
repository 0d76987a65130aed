"""The embedded MQTT broker for one-machine runs: amqtt, in-process, on its own event loop.

amqtt speaks MQTT 3.1.1 only and has no packet size option; clients fall back to 3.1.1 and
chunk below their configured limit. Production uses an existing broker (Mosquitto, EMQX...).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading

from core.errors import FedloraError


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
    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.host = host
        self.port = port or free_port(host)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> EmbeddedBroker:
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # amqtt logs a traceback for every QoS 1 delivery a busy client acknowledged late (ORT's
        # training step holds the device's GIL); the client's own resend covers it, so in the
        # researcher's terminal it is noise: only amqtt's critical messages pass, on one line.
        amqtt_log = logging.getLogger("amqtt")
        if not any(isinstance(f, _OneLine) for h in amqtt_log.handlers for f in h.filters):
            handler = logging.StreamHandler()
            handler.setLevel(logging.CRITICAL)
            handler.addFilter(_OneLine())
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
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

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
