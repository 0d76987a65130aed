"""The device's ``Trainer`` in a child process, so that the device stays responsive while it trains.

ONNX Runtime's training API holds the GIL for the whole of a step (measured: a thread that
ticks every millisecond does not tick once during a 1.5 s step), so in one process paho's
network thread answers nothing while the device trains: no PUBACK, no PINGREQ, no ack read.
A broker that gives up on an unanswered QoS 1 delivery (amqtt after 5 s) drops it; one that
waits longer delays everything queued behind it. Calling paho's ``loop()`` between steps
would bound the silence to one step, but one step of an LLM on a busy device lasts seconds.
Here the parent only waits on a pipe (which releases the GIL), so its network thread runs
throughout; the child holds the one ONNX Runtime session and the adapter.

``TrainerProcess`` has the methods of ``Trainer`` the device uses; each call is one request
and one answer over the pipe (a batch of 8 x 128 tokens is 16 KB). An exception the child
raises comes back and is raised here with the child's traceback in its message (its type kept
for the fedlora errors, e.g. a ``BundleError``). If the child dies, calls raise
``TrainerProcessDied``: the device then exits and its supervisor starts it again (its state is
crash-safe; see ``edge_client.device_state``).

Standard library, NumPy and the runtime: this runs on the device.
"""

from __future__ import annotations

import importlib
import multiprocessing
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from core.bundle import Bundle
from core.errors import FedloraError
from edge_client.data import Batch, EncodedDataset
from edge_client.runtime import RuntimeOptions, peak_rss_bytes

START_TIMEOUT_S = 300.0


class TrainerProcessDied(FedloraError):
    """The training process exited (killed, out of memory, crashed in ONNX Runtime)."""


class TrainerProcess:
    """A ``Trainer`` of ``bundle`` in a child process (see the module doc)."""

    def __init__(self, bundle: Bundle, checkpoint: str | Path | None = None, options: RuntimeOptions | None = None):
        self.bundle = bundle
        self.manifest = bundle.manifest
        # spawn: a fresh interpreter, with none of this process's threads (paho's) half-copied
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_trainer_main,
            args=(
                child,
                str(bundle.root),
                None if checkpoint is None else str(checkpoint),
                options or RuntimeOptions(),
            ),
            name="fedlora-trainer",
            daemon=True,
        )
        self._proc.start()
        child.close()
        if not self._conn.poll(START_TIMEOUT_S):
            self.close()
            raise TrainerProcessDied(f"the training process did not load {bundle.root} within {START_TIMEOUT_S:.0f}s")
        self.has_proximal: bool = self._receive()

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def _receive(self) -> Any:
        try:
            status, value = self._conn.recv()
        except (EOFError, OSError):
            raise TrainerProcessDied(
                f"the training process exited (code {self._proc.exitcode}); the device must restart"
            ) from None
        if status == "error":
            raise _rebuilt(*value)
        return value

    def _call(self, method: str, *args: Any) -> Any:
        try:
            self._conn.send((method, args))
        except (OSError, ValueError):
            raise TrainerProcessDied(f"the training process exited (code {self._proc.exitcode})") from None
        return self._receive()

    # -- the Trainer's methods the device uses ------------------------------------------
    def get_adapter(self) -> dict[str, np.ndarray]:
        return self._call("get_adapter")

    def set_adapter(self, tensors: dict[str, np.ndarray]) -> None:
        self._call("set_adapter", tensors)

    def set_base_delta(self, name: str, delta: np.ndarray) -> None:
        self._call("set_base_delta", name, delta)

    def apply_global(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._call("apply_global", tensors)

    def set_proximal(self, mu: float, center: dict[str, np.ndarray] | None = None) -> None:
        self._call("set_proximal", mu, center)

    def save(self, path: str | Path) -> None:
        self._call("save", str(path))

    def set_learning_rate(self, lr: float) -> None:
        self._call("set_learning_rate", lr)

    def train_step(self, batch: Batch) -> float:
        return self._call("train_step", batch)

    def eval_batch(self, batch: Batch) -> tuple[float, np.ndarray]:
        return self._call("eval_batch", batch)

    def evaluate(self, data: EncodedDataset, batch_size: int = 32) -> dict[str, float]:
        return self._call("evaluate", data, batch_size)

    def peak_rss_bytes(self) -> int:
        """The training process's peak resident memory (``edge_client.runtime.peak_rss_bytes``)."""
        return self._call("peak_rss_bytes")

    def close(self) -> None:
        try:
            self._conn.send(None)
        except (OSError, ValueError):
            pass
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=10)
        self._conn.close()


ALLOWED = frozenset(
    (
        "get_adapter",
        "set_adapter",
        "set_base_delta",
        "apply_global",
        "set_proximal",
        "save",
        "set_learning_rate",
        "train_step",
        "eval_batch",
        "evaluate",
    )
)


def _trainer_main(conn, bundle_root: str, checkpoint: str | None, options: RuntimeOptions) -> None:
    from edge_client.runtime import Trainer

    try:
        trainer = Trainer(Bundle(bundle_root), checkpoint=checkpoint, options=options)
        reply: tuple = ("ok", trainer.has_proximal)
    except Exception as exc:
        trainer, reply = None, ("error", _described(exc))
    while True:
        try:
            conn.send(reply)
            if trainer is None:
                return
            request = conn.recv()
        except (EOFError, OSError):  # the device process is gone (killed mid-call: a broken pipe)
            return
        if request is None:
            return
        reply = _answer(trainer, *request)


def _answer(trainer, method: str, args: tuple) -> tuple:
    """One call of the device's, answered as ("ok", result) or ("error", the exception)."""
    try:
        if method == "peak_rss_bytes":
            return ("ok", peak_rss_bytes())
        if method not in ALLOWED:
            raise FedloraError(f"the training process has no method {method!r}")
        return ("ok", getattr(trainer, method)(*args))
    except Exception as exc:
        return ("error", _described(exc))


def _described(exc: Exception) -> tuple[str, str, str, str]:
    return type(exc).__module__, type(exc).__qualname__, str(exc), traceback.format_exc()


def _rebuilt(module: str, name: str, message: str, text: str) -> Exception:
    """The child's exception: of its own type for fedlora's errors (a caller may catch a
    ``BundleError``), else a RuntimeError; the child's traceback in the message."""
    try:
        cls = getattr(importlib.import_module(module), name)
        if isinstance(cls, type) and issubclass(cls, FedloraError):
            return cls(f"{message} (in the training process:\n{text})")
    except Exception:  # not importable here, or not built from one message: say what it was
        pass
    return RuntimeError(f"{module}.{name} in the training process: {message}\n{text}")
