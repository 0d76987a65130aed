"""Error feedback for compressed updates: what compression dropped is sent later, not lost.

EF-SGD (Seide et al., "1-bit stochastic gradient descent", Interspeech 2014; Karimireddy et
al., "Error Feedback Fixes SignSGD and other Gradient Compression Schemes", ICML 2019): the
device keeps the residual ``e`` and, each round, sends ``C(u + e)`` and keeps
``e <- (u + e) - decode(C(u + e))``. Summed over rounds, what the aggregator received differs
from what the device computed by exactly the current residual, which a contractive codec keeps
bounded, so a lossy codec delays information instead of discarding it.

The residual is computed from the very payload that goes on the wire (encoded, then decoded
back), so stochastic rounding and every codec stage are accounted for. It lives in a ``.npz``
file replaced atomically, so it survives a reboot.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from core.protocol import Envelope, EnvelopeLimits, decode_envelope, encode_envelope

log = logging.getLogger(__name__)


class ErrorFeedback:
    """The residual per tensor name: what earlier compressed updates left out."""

    def __init__(self, residual: dict[str, np.ndarray] | None = None):
        self.residual: dict[str, np.ndarray] = dict(residual or {})

    def compensate(self, update: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``update + residual`` per tensor. A residual whose shape no longer matches (the
        adapter changed, e.g. another rank) cannot be applied and is dropped."""
        out = {}
        for name, value in update.items():
            value = np.asarray(value, dtype=np.float32)
            r = self.residual.get(name)
            out[name] = value + r if r is not None and r.shape == value.shape else value.copy()
        return out

    def record(self, sent: dict[str, np.ndarray], decoded: dict[str, np.ndarray]) -> None:
        """Keep ``sent - decoded`` for every tensor sent; other tensors keep their residual.

        Non-finite entries are stored as 0: such an update is refused by the aggregator anyway,
        and an inf carried forward would poison every later round.
        """
        for name, value in sent.items():
            r = np.asarray(value, np.float32) - np.asarray(decoded[name], np.float32)
            self.residual[name] = np.where(np.isfinite(r), r, np.float32(0)).astype(np.float32)

    def norm(self) -> float:
        return float(np.sqrt(sum(float(np.square(r, dtype=np.float64).sum()) for r in self.residual.values())))

    def save(self, path: str | Path) -> None:
        """Write the residual to ``path`` (npz) atomically: a crash leaves the old file or the new."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        names = sorted(self.residual)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                # names travel as an array, not as keys: a tensor may be called anything
                np.savez(f, np.array(names, dtype=str), *(self.residual[n] for n in names))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)

    @classmethod
    def load(cls, path: str | Path) -> ErrorFeedback:
        """The residual saved at ``path``; empty if there is none or it cannot be read (losing a
        residual costs a little accuracy, refusing to start would cost the device)."""
        path = Path(path)
        if not path.exists():
            return cls()
        try:
            with np.load(path, allow_pickle=False) as data:
                names = [str(n) for n in data["arr_0"]]
                arrays = [data[f"arr_{i + 1}"] for i in range(len(names))]
            if any(a.dtype != np.float32 or not np.isfinite(a).all() for a in arrays):
                raise ValueError("residual arrays must be finite float32")
            return cls(dict(zip(names, arrays)))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            log.warning("ignoring unreadable error-feedback residual %s: %s", path, exc)
            return cls()


def encode_with_feedback(env: Envelope, feedback: ErrorFeedback, compensated: bool = False) -> bytes:
    """Encode an update envelope with error feedback: add the residual to ``env.tensors``
    (unless ``compensated``: the caller did, e.g. to clip the sum for differential privacy),
    encode with ``env.codec``, decode the payload back and record what it dropped.

    The caller persists the payload first and then ``feedback.save(...)``.
    """
    sent = env.tensors if compensated else feedback.compensate(env.tensors)
    payload = encode_envelope(dataclasses.replace(env, tensors=sent))
    limits = EnvelopeLimits.for_update({name: value.shape for name, value in sent.items()})
    feedback.record(sent, decode_envelope(payload, limits).tensors)
    return payload


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
