"""Tensor codecs for updates and global adapters. Device and aggregator share this module.

A codec turns one float32 tensor into bytes plus a small JSON-able ``meta`` dict, and back.
The envelope records the codec name per message, so a receiver never guesses.
"""

from __future__ import annotations

import numpy as np

from edge_client.errors import ProtocolError


class Codec:
    name: str = ""
    lossless: bool = False

    def encode(self, array: np.ndarray) -> tuple[bytes, dict]:
        raise NotImplementedError

    def decode(self, data: bytes, meta: dict, shape: tuple[int, ...]) -> np.ndarray:
        raise NotImplementedError


class Float32(Codec):
    """Reference codec: little-endian float32, exact."""

    name = "fp32"
    lossless = True

    def encode(self, array):
        return np.ascontiguousarray(array, dtype="<f4").tobytes(), {}

    def decode(self, data, meta, shape):
        return _frombuffer(data, "<f4", shape).astype(np.float32)


class Float16(Codec):
    """IEEE half precision: 2x smaller, relative error <= 2**-11 in range."""

    name = "fp16"

    def encode(self, array):
        return np.ascontiguousarray(array, dtype="<f2").tobytes(), {}

    def decode(self, data, meta, shape):
        return _frombuffer(data, "<f2", shape).astype(np.float32)


def _frombuffer(data: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    count = int(np.prod(shape)) if shape else 1
    itemsize = np.dtype(dtype).itemsize
    if len(data) != count * itemsize:
        raise ProtocolError(f"tensor of shape {tuple(shape)} needs {count * itemsize} bytes as {dtype}, got {len(data)}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


CODECS: dict[str, Codec] = {c.name: c for c in (Float32(), Float16())}


def get_codec(name: str) -> Codec:
    try:
        return CODECS[name]
    except KeyError:
        raise ProtocolError(f"unknown codec {name!r} (known: {', '.join(sorted(CODECS))})") from None
