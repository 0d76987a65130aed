"""Tensor codecs for updates and global adapters. Device and aggregator share this module.

A codec turns one float32 tensor into bytes plus a small JSON-able ``meta`` dict, and back.
The envelope records the codec spec per message, so a receiver never guesses.

A codec is named by a *spec*: up to three stages joined by ``+``, in this order::

    spec     = [sparsify "+"] values ["+" entropy]  |  sparsify ["+" entropy]  |  entropy
    sparsify = "topk" FRACTION                      keep the ceil(FRACTION * n) largest |x|
             | "randk" FRACTION                     keep each entry with probability FRACTION
    values   = "fp32" | "fp16" | "bf16"             (fp32 when left out)
             | ("int8" | "int4" | "int2") ["-b" BLOCK] ["-sr"]
             | "sign" ["-b" BLOCK]                  one bit per value times the block's mean |x|
    entropy  = "zlib" | "lzma" | "zstd"             lossless; zstd needs the zstandard package

FRACTION is a decimal in (0, 1) such as ``0.01`` or ``1e-3``; BLOCK is the quantization block
(8..65536 elements, default 64; 256 for ``sign``); ``-sr`` rounds stochastically (unbiased)
instead of to nearest. Examples: ``fp16``, ``int4-b32``, ``int8-sr``, ``int2``, ``topk0.05+int8``,
``topk0.01+int4+zlib``, ``sign``, ``topk0.1+sign``, ``randk0.7+sign``.

Every codec states its error bound in its docstring and as ``elementwise_bound(x)`` (the most
``|decode(encode(x)) - x|`` can be at each element of a finite ``x``) and ``bound(x, ord)`` (that
bound's norm: ``ord=inf`` for the max abs error, ``ord=2`` for the error's L2 norm).

Decoding trusts nothing: byte counts are checked against the shape, sparse indices against the
tensor's size, scales must be finite, decompression stops at the largest size the shape allows,
and no tensor may exceed ``MAX_ELEMENTS``. Every failure is a ``ProtocolError``.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import lzma
import math
import re
import zlib
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import numpy as np

from core.errors import ProtocolError

MAX_ELEMENTS = 1 << 26  # per tensor (256 MiB as float32): far above any LoRA factor
MAX_SPEC_CHARS = 80
DEFAULT_BLOCK = 64


class Codec(abc.ABC):
    """Base class: ``encode(array) -> (bytes, meta)``, ``decode(data, meta, shape) -> float32``.

    Subclasses implement ``_encode(flat float32) -> bytes`` and ``_decode(bytes, n) -> flat``.
    No codec here needs ``meta``: everything a decoder needs is in the bytes and the shape.
    """

    name: str = ""
    lossless: bool = False
    # The NumPy dtype the encoding is, when it is just the values in that dtype (fp32): a run of
    # such tensors decodes as views of one array (``protocol.decode_envelope``).
    raw_dtype: str | None = None

    def encode(self, array: np.ndarray) -> tuple[bytes, dict]:
        flat = np.ascontiguousarray(array, dtype=np.float32).reshape(-1)
        if flat.size > MAX_ELEMENTS:
            raise ProtocolError(f"a tensor of {flat.size} elements exceeds the limit of {MAX_ELEMENTS}")
        return self._encode(flat), {}

    def decode(self, data: bytes, meta: dict, shape: tuple[int, ...]) -> np.ndarray:
        flat = self._decode(bytes(data), element_count(shape))
        return flat.astype(np.float32, copy=False).reshape(shape)

    @abc.abstractmethod
    def elementwise_bound(self, array: np.ndarray) -> np.ndarray:
        """Upper bound on ``|decode(encode(x)) - x|`` at each element (finite ``x``)."""

    def bound(self, array: np.ndarray, ord: float = np.inf) -> float:
        """Norm of ``elementwise_bound``: max abs error (``ord=inf``) or error L2 norm (``ord=2``)."""
        e = np.asarray(self.elementwise_bound(array), dtype=np.float64).reshape(-1)
        return float(np.linalg.norm(e, ord)) if e.size else 0.0

    @abc.abstractmethod
    def max_nbytes(self, n: int) -> int:
        """The most bytes a valid encoding of ``n`` elements can take (the decompression limit)."""

    @abc.abstractmethod
    def _encode(self, flat: np.ndarray) -> bytes: ...

    @abc.abstractmethod
    def _decode(self, data: bytes, n: int) -> np.ndarray: ...

    def __repr__(self) -> str:
        return f"<codec {self.name}>"


def element_count(shape: tuple[int, ...]) -> int:
    count = math.prod(int(d) for d in shape)
    if any(int(d) < 0 for d in shape) or count > MAX_ELEMENTS:
        raise ProtocolError(f"tensor shape {tuple(shape)} is negative or exceeds {MAX_ELEMENTS} elements")
    return count


def _expect_size(data: bytes, size: int, what: str) -> None:
    if len(data) != size:
        raise ProtocolError(f"{what} needs {size} bytes, got {len(data)}")


# -- dense values --------------------------------------------------------------------------
class _FixedSize(Codec):
    """A value codec whose encoding of ``n`` elements is exactly ``nbytes(n)`` bytes."""

    @abc.abstractmethod
    def nbytes(self, n: int) -> int: ...

    def max_nbytes(self, n: int) -> int:
        return self.nbytes(n)


class Float32(_FixedSize):
    """Reference codec: little-endian float32, exact (error bound 0)."""

    name = "fp32"
    lossless = True
    raw_dtype = "<f4"

    def nbytes(self, n):
        return 4 * n

    def _encode(self, flat):
        return flat.astype("<f4", copy=False).tobytes()

    def _decode(self, data, n):
        _expect_size(data, 4 * n, f"fp32 tensor of {n} elements")
        return np.frombuffer(data, "<f4").astype(np.float32)

    def elementwise_bound(self, array):
        return np.zeros(np.shape(array), np.float32)


class Float16(_FixedSize):
    """IEEE half precision, round to nearest: 2x smaller than fp32.

    Bound: ``max(|x| * 2**-11, 2**-25)`` per element (half an ulp; the floor covers fp16's
    subnormals). Values with ``|x| >= 65520`` overflow to inf (bound inf): the aggregator then
    refuses the update as non-finite. Use bf16 for wide-range tensors.
    """

    name = "fp16"

    def nbytes(self, n):
        return 2 * n

    def _encode(self, flat):
        with np.errstate(over="ignore"):
            return flat.astype("<f2").tobytes()

    def _decode(self, data, n):
        _expect_size(data, 2 * n, f"fp16 tensor of {n} elements")
        return np.frombuffer(data, "<f2").astype(np.float32)

    def elementwise_bound(self, array):
        a = np.abs(np.asarray(array, np.float64))
        return np.where(a >= 65520.0, np.inf, np.maximum(a * 2.0**-11, 2.0**-25))


class BFloat16(_FixedSize):
    """bfloat16 (fp32's range, 8-bit significand), round to nearest even: 2x smaller than fp32.

    Bound: ``max(|x| * 2**-8, 2**-134)`` per element; only ``|x| >= (2 - 2**-8) * 2**127``
    overflows (bound inf). NaN stays NaN.
    """

    name = "bf16"
    _OVERFLOW = (2 - 2.0**-8) * 2.0**127

    def nbytes(self, n):
        return 2 * n

    def _encode(self, flat):
        return _to_bf16_bits(flat).astype("<u2").tobytes()

    def _decode(self, data, n):
        _expect_size(data, 2 * n, f"bf16 tensor of {n} elements")
        return _from_bf16_bits(np.frombuffer(data, "<u2"))

    def elementwise_bound(self, array):
        a = np.abs(np.asarray(array, np.float64))
        return np.where(a >= self._OVERFLOW, np.inf, np.maximum(a * 2.0**-8, 2.0**-134))


def _to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounding to nearest even; NaN kept as a quiet NaN."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    r = np.where(np.isnan(x), (u >> 16) | 0x0040, r)
    return r.astype(np.uint16)


def _from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _ceil_bf16(s: np.ndarray) -> np.ndarray:
    """Smallest bfloat16 >= each (non-negative, finite) float64 in ``s``, as bit patterns."""
    s32 = s.astype(np.float32)
    with np.errstate(over="ignore"):  # past bf16's largest finite value: inf, which callers clamp
        s32 = np.where(s32.astype(np.float64) < s, np.nextafter(s32, np.float32(np.inf)), s32)
    u = s32.view(np.uint32).astype(np.uint64)
    return ((u + 0xFFFF) >> 16).astype(np.uint16)


class _BlockScaled(_FixedSize):
    """A value codec that stores one bfloat16 scale per block of ``block`` elements first."""

    block: int

    def _blocks(self, n):
        return -(-n // self.block)

    def _element_scales(self, bits: np.ndarray, n: int) -> np.ndarray:
        return np.repeat(_from_bf16_bits(bits), self.block)[:n]

    def _check_finite(self, flat: np.ndarray) -> None:
        if not np.isfinite(flat).all():
            raise ProtocolError(f"{self.name} cannot encode non-finite values (NaN or inf in the update)")

    def _read_scale_bits(self, data: bytes, n: int) -> np.ndarray:
        """The block scales' bf16 bits at the start of ``data``, checked finite and >= 0."""
        bits = np.frombuffer(data, "<u2", count=self._blocks(n))
        scales = _from_bf16_bits(bits)
        if not (np.isfinite(scales).all() and (scales >= 0).all()):
            raise ProtocolError(f"{self.name} tensor has a negative, NaN or infinite block scale")
        return bits


class BlockQuant(_BlockScaled):
    """Blockwise symmetric integer quantization (int8, int4 or int2) with one scale per block.

    The flat tensor is cut into blocks of ``block`` elements; each block stores the scale
    ``s >= max|x| / qmax`` (qmax = 127 for int8, 7 for int4, 1 for int2) as bfloat16 rounded
    *up*, so no value clips, and codes ``q = round(x / s)`` in ``[-qmax, qmax]`` (int2 is
    ternary: -s, 0 or s). Narrow codes are packed into bytes low bits first (two int4 or four
    int2 codes a byte) as two's complement; the code ``-qmax - 1`` is invalid. Layout:
    ``ceil(n / block)`` little-endian bf16 scales, then the codes. Size: ``ceil(n * bits / 8) +
    2 ceil(n / block)`` bytes.

    Bound per element: ``s * (1/2 + qmax 2**-23) + 2**-149`` with nearest rounding, and
    ``s * (1 + qmax 2**-23) + 2**-149`` with stochastic rounding (``-sr``), where ``s`` is the
    element's block scale (so about ``max|block| / 254`` for int8, ``max|block| / 14`` for
    int4, ``max|block| / 2`` for int2); inf for blocks beyond ``|x| ~ 2**127``, whose decoded
    values may overflow. Stochastic rounding picks ``floor`` or ``ceil`` of ``x / s`` with the
    probabilities that make the decoded value unbiased; its RNG is seeded (``seed``), decoding
    needs none. Non-finite input cannot be quantized and is refused.
    """

    def __init__(self, bits: int, block: int = DEFAULT_BLOCK, stochastic: bool = False, seed=None):
        if bits not in (8, 4, 2):
            raise ValueError("bits must be 8, 4 or 2")
        self.bits, self.block, self.stochastic = bits, int(block), bool(stochastic)
        self.qmax = (1 << (bits - 1)) - 1
        self.rng = np.random.default_rng(seed)
        self.name = (
            f"int{bits}" + (f"-b{self.block}" if self.block != DEFAULT_BLOCK else "") + ("-sr" if stochastic else "")
        )

    def nbytes(self, n):
        return self._code_bytes(n) + 2 * self._blocks(n)

    def _code_bytes(self, n):
        return -(-n * self.bits // 8)

    def _scale_bits(self, flat: np.ndarray) -> np.ndarray:
        """Per block, the smallest bf16 scale with ``max|block| <= qmax * scale``."""
        nb = self._blocks(flat.size)
        padded = np.zeros(nb * self.block, np.float32)
        padded[: flat.size] = np.abs(flat)
        absmax = padded.reshape(nb, self.block).max(axis=1).astype(np.float64)
        # int2 (qmax 1) near fp32's limit would round up to inf: the largest finite bf16 clips
        # those values by less than 0.4%, well within the bound of half a scale
        return np.minimum(_ceil_bf16(absmax / self.qmax), np.uint16(0x7F7F))

    def _encode(self, flat):
        self._check_finite(flat)
        scale_bits = self._scale_bits(flat)
        s = self._element_scales(scale_bits, flat.size).astype(np.float64)
        y = np.divide(flat, s, out=np.zeros(flat.size), where=s > 0)
        q = np.floor(y + self.rng.random(flat.size)) if self.stochastic else np.rint(y)
        q = np.clip(q, -self.qmax, self.qmax).astype(np.int8)
        if self.bits == 8:
            codes = q.tobytes()
        else:
            per = 8 // self.bits
            fields = np.zeros(-(-q.size // per) * per, np.uint8)
            fields[: q.size] = q.astype(np.uint8) & ((1 << self.bits) - 1)
            fields = fields.reshape(-1, per) << (self.bits * np.arange(per, dtype=np.uint8))
            codes = np.bitwise_or.reduce(fields, axis=1).astype(np.uint8).tobytes()
        return scale_bits.astype("<u2").tobytes() + codes

    def _decode(self, data, n):
        _expect_size(data, self.nbytes(n), f"{self.name} tensor of {n} elements")
        scale_bits = self._read_scale_bits(data, n)
        raw = np.frombuffer(data, np.uint8, offset=2 * scale_bits.size)
        if self.bits == 8:
            q = raw.view(np.int8)
        else:
            per, half = 8 // self.bits, 1 << (self.bits - 1)
            fields = (raw[:, None] >> (self.bits * np.arange(per, dtype=np.uint8))) & ((1 << self.bits) - 1)
            fields = fields.reshape(-1)
            if fields[n:].any():
                raise ProtocolError(f"{self.name} tensor has non-zero padding bits")
            q = ((fields[:n] ^ half).astype(np.int8) - half).astype(np.int8)
        if q.size and (q == -self.qmax - 1).any():
            raise ProtocolError(f"{self.name} tensor has a code outside [-{self.qmax}, {self.qmax}]")
        with np.errstate(over="ignore"):  # only scales near fp32's limit overflow; the bound says so
            return q.astype(np.float32) * self._element_scales(scale_bits, n)

    def elementwise_bound(self, array):
        flat = np.asarray(array, np.float32).reshape(-1)
        s = self._element_scales(self._scale_bits(flat), flat.size).astype(np.float64)
        half = 1.0 if self.stochastic else 0.5
        bound = np.where(
            s * self.qmax > np.finfo(np.float32).max, np.inf, s * (half + self.qmax * 2.0**-23) + 2.0**-149
        )
        return bound.reshape(np.shape(array))


class ScaledSign(_BlockScaled):
    """One bit per element: the sign, times one scale per block, the block's mean ``|x|``.

    The compressor of EF-signSGD (Karimireddy et al., ICML 2019): the scaled sign is the best
    one-bit approximation of a block in L2 among ``s * sign(x)`` (``s = mean|x|``), and with error
    feedback it carries every coordinate's direction every round, where top-k delays small ones.
    Layout: ``ceil(n / block)`` little-endian bfloat16 scales (nearest), then the sign bits packed
    eight per byte, little bit order, 1 meaning negative. Size ``ceil(n / 8) + 2 ceil(n / block)``.

    Bound per element, exact: ``| |x| - s |`` (``s`` where ``x == 0``, which decodes as ``+s``).
    The relative L2 error is ``sqrt(1 - mean|x|^2 / mean x^2)``: about 0.6 for Gaussian blocks.
    """

    def __init__(self, block: int = 256):
        self.block = int(block)
        self.name = "sign" + (f"-b{self.block}" if self.block != 256 else "")

    def nbytes(self, n):
        return -(-n // 8) + 2 * self._blocks(n)

    def _scales(self, flat: np.ndarray) -> np.ndarray:
        nb = self._blocks(flat.size)
        padded = np.zeros(nb * self.block, np.float64)
        padded[: flat.size] = np.abs(flat)
        counts = np.full(nb, self.block, np.float64)
        if nb:
            counts[-1] = flat.size - (nb - 1) * self.block
        mean = padded.reshape(nb, self.block).sum(axis=1) / counts
        bits = _to_bf16_bits(mean.astype(np.float32))
        return np.where(np.isfinite(_from_bf16_bits(bits)), bits, np.uint16(0x7F7F)).astype(np.uint16)

    def _encode(self, flat):
        self._check_finite(flat)
        bits = self._scales(flat)
        return bits.astype("<u2").tobytes() + np.packbits(flat < 0, bitorder="little").tobytes()

    def _decode(self, data, n):
        _expect_size(data, self.nbytes(n), f"{self.name} tensor of {n} elements")
        scale_bits = self._read_scale_bits(data, n)
        raw = np.frombuffer(data, np.uint8, offset=2 * scale_bits.size)
        if n % 8 and raw[-1] >> (n % 8):
            raise ProtocolError(f"{self.name} tensor has non-zero padding bits")
        negative = np.unpackbits(raw, count=n, bitorder="little").astype(bool)
        values = self._element_scales(scale_bits, n).astype(np.float32)
        return np.where(negative, -values, values)

    def elementwise_bound(self, array):
        flat = np.asarray(array, np.float32).reshape(-1).astype(np.float64)
        s = self._element_scales(self._scales(flat.astype(np.float32)), flat.size).astype(np.float64)
        bound = np.where(flat == 0, s, np.abs(np.abs(flat) - s))
        return (bound * (1 + 2.0**-22) + 2.0**-149).reshape(np.shape(array))


# -- sparsification ------------------------------------------------------------------------
_IDX_BITMAP, _IDX_VARINT, _IDX_U8, _IDX_U16, _IDX_U32 = range(5)
_IDX_DTYPES = {_IDX_U8: "<u1", _IDX_U16: "<u2", _IDX_U32: "<u4"}


class _Sparse(Codec):
    """A sparsifier: keeps some entries (``_select``), sends them through a dense value codec
    (``values``, fp32 by default) in index order, and drops the rest.

    Bound per element: ``|x|`` where dropped, the value codec's bound where kept.
    """

    prefix: str

    def __init__(self, fraction: str | float, values: _FixedSize | None = None):
        # the shortest decimal of the float, taken exactly: the name and the selection always agree
        text = repr(float(fraction)).removesuffix(".0")
        self.fraction = Fraction(text)
        if not 0 < self.fraction < 1:
            raise ValueError(f"the {self.prefix} fraction must be in (0, 1), got {fraction}")
        self.values = values or Float32()
        self.name = f"{self.prefix}{text}" + ("" if isinstance(self.values, Float32) else f"+{self.values.name}")

    @abc.abstractmethod
    def _select(self, flat: np.ndarray) -> np.ndarray:
        """The sorted indices of the entries kept."""

    @abc.abstractmethod
    def _encode_sparse(self, flat: np.ndarray) -> bytes:
        """The encoding of a non-empty, finite ``flat``."""

    @abc.abstractmethod
    def _decode_sparse(self, data: bytes, n: int) -> np.ndarray:
        """The ``n > 0`` values ``data`` encodes (ProtocolError if it encodes none)."""

    def _encode(self, flat):
        if not flat.size:
            return b""
        if not np.isfinite(flat).all():
            raise ProtocolError(f"{self.name} cannot encode non-finite values (NaN or inf in the update)")
        return self._encode_sparse(flat)

    def _decode(self, data, n):
        if n == 0:
            _expect_size(data, 0, "an empty tensor")
            return np.zeros(0, np.float32)
        return self._decode_sparse(data, n)

    def elementwise_bound(self, array):
        flat = np.asarray(array, np.float32).reshape(-1)
        bound = np.abs(flat).astype(np.float64)
        if flat.size:
            idx = self._select(flat)
            bound[idx] = self.values.elementwise_bound(flat[idx])
        return bound.reshape(np.shape(array))


class TopK(_Sparse):
    """Top-k sparsification: keep the ``k = ceil(fraction * n)`` entries of largest magnitude.

    The kept values go through a dense value codec (``values``, fp32 by default) in index
    order; the positions are coded compactly, whichever is smallest: a bitmap (n/8 bytes), or
    the gaps between sorted indices as LEB128 varints or as u8/u16/u32. Layout: one byte naming
    the index coding, the indices, then the values. ``k`` follows from the shape, so it is not
    sent, and a decoder checks that exactly ``k`` in-range, increasing indices arrive.

    Bound per element: ``|x|`` where dropped, the value codec's bound where kept. Hence the max
    abs error is at most the (k+1)-th largest ``|x|`` (plus the values' bound), and
    ``bound(x, 2)`` is the L2 norm of the dropped part (exactly, for fp32 values), which is at
    most ``sqrt(1 - k/n) * ||x||``.
    """

    prefix = "topk"

    def k(self, n: int) -> int:
        return min(n, max(1, math.ceil(self.fraction * n))) if n else 0

    def max_nbytes(self, n):
        k = self.k(n)
        return (1 + max(-(-n // 8), 4 * k) + self.values.nbytes(k)) if n else 0

    def _select(self, flat: np.ndarray) -> np.ndarray:
        k = self.k(flat.size)
        if k == flat.size:
            return np.arange(flat.size)
        return np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :])

    def _encode_sparse(self, flat):
        idx = self._select(flat)
        gaps = np.diff(idx, prepend=-1) - 1
        top = int(gaps.max())
        options = {_IDX_BITMAP: _bitmap(idx, flat.size), _IDX_VARINT: _varint_encode(gaps)}
        for tag, limit in ((_IDX_U8, 1 << 8), (_IDX_U16, 1 << 16), (_IDX_U32, 1 << 32)):
            if top < limit:
                options[tag] = gaps.astype(_IDX_DTYPES[tag]).tobytes()
                break
        tag = min(options, key=lambda t: len(options[t]))
        return bytes([tag]) + options[tag] + self.values._encode(flat[idx])

    def _decode_sparse(self, data, n):
        k = self.k(n)
        vbytes = self.values.nbytes(k)
        if len(data) < 1 + vbytes:
            raise ProtocolError(f"{self.name} tensor of {n} elements is truncated ({len(data)} bytes)")
        tag, index_data = data[0], data[1 : len(data) - vbytes]
        if tag == _IDX_BITMAP:
            idx = _bitmap_decode(index_data, n)
        else:
            if tag == _IDX_VARINT:
                gaps = _varint_decode(index_data, k)
            elif tag in _IDX_DTYPES:
                _expect_size(index_data, k * np.dtype(_IDX_DTYPES[tag]).itemsize, f"{self.name} index list")
                gaps = np.frombuffer(index_data, _IDX_DTYPES[tag]).astype(np.int64)
            else:
                raise ProtocolError(f"{self.name} tensor has unknown index coding {tag}")
            if gaps.size and gaps.max() >= n:
                raise ProtocolError(f"{self.name} index gap out of range for {n} elements")
            idx = np.cumsum(gaps + 1) - 1
        if idx.size != k or (idx.size and idx[-1] >= n):
            raise ProtocolError(f"{self.name} tensor of {n} elements needs {k} indices below {n}, got {idx.size}")
        out = np.zeros(n, np.float32)
        out[idx] = self.values._decode(data[len(data) - vbytes :], k)
        return out


class RandK(_Sparse):
    """Random sparsification with a shared seed: keep each entry with probability ``fraction``.

    The positions cost nothing on the wire: they follow from an 8-byte seed that leads the
    payload, expanded with SHAKE-128 (the standard library's, so device and aggregator agree
    whatever their numpy versions) into one 16-bit draw per entry; entry ``i`` is kept when
    its draw is below ``round(fraction * 65536)``. The seed is a hash of the tensor itself, so
    an encoding is reproducible and a new update (error feedback changes it every round) gets
    new positions. Unlike top-k, every coordinate is sent at the same rate, so with error
    feedback nothing waits for many rounds; the cost is that the kept values are not the
    largest. Layout: the seed, then the kept values through the value codec, in index order.
    Size ``8 + values.nbytes(kept)``; ``kept`` is about ``fraction * n``.

    Bound per element: ``|x|`` where dropped, the value codec's bound where kept. In
    expectation over seeds, the dropped part's squared L2 norm is ``(1 - fraction) ||x||^2``.
    """

    prefix = "randk"
    SEED_BYTES = 8

    def threshold(self) -> int:
        return min(65535, max(1, round(self.fraction * 65536)))

    def _mask(self, seed: bytes, n: int) -> np.ndarray:
        draws = np.frombuffer(hashlib.shake_128(seed).digest(2 * n), "<u2")
        return draws < self.threshold()

    def _select(self, flat: np.ndarray) -> np.ndarray:
        return np.flatnonzero(self._mask(self._seed(flat), flat.size))

    @staticmethod
    def _seed(flat: np.ndarray) -> bytes:
        return hashlib.blake2b(flat.astype("<f4", copy=False).tobytes(), digest_size=RandK.SEED_BYTES).digest()

    def max_nbytes(self, n):
        return self.SEED_BYTES + self.values.nbytes(n) if n else 0

    def _encode_sparse(self, flat):
        seed = self._seed(flat)
        return seed + self.values._encode(flat[self._mask(seed, flat.size)])

    def _decode_sparse(self, data, n):
        if len(data) < self.SEED_BYTES:
            raise ProtocolError(f"{self.name} tensor of {n} elements is truncated ({len(data)} bytes)")
        mask = self._mask(data[: self.SEED_BYTES], n)
        kept = int(np.count_nonzero(mask))
        _expect_size(
            data, self.SEED_BYTES + self.values.nbytes(kept), f"{self.name} tensor of {n} elements ({kept} kept)"
        )
        out = np.zeros(n, np.float32)
        out[mask] = self.values._decode(data[self.SEED_BYTES :], kept)
        return out


def _bitmap(idx: np.ndarray, n: int) -> bytes:
    mask = np.zeros(n, bool)
    mask[idx] = True
    return np.packbits(mask, bitorder="little").tobytes()


def _bitmap_decode(data: bytes, n: int) -> np.ndarray:
    _expect_size(data, -(-n // 8), f"index bitmap of {n} elements")
    bits = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")
    if bits[n:].any():
        raise ProtocolError("index bitmap has bits set past the end of the tensor")
    return np.flatnonzero(bits[:n])


def _varint_encode(values: np.ndarray) -> bytes:
    """Unsigned LEB128, vectorized: 7 bits per byte, high bit set on all but the last byte."""
    v = values.astype(np.uint64)
    nbytes = np.maximum(1, (np.floor(np.log2(np.maximum(v, 1).astype(np.float64))).astype(np.int64) + 7) // 7)
    nbytes = np.where(v == 0, 1, nbytes)
    starts = np.cumsum(nbytes) - nbytes
    out = np.zeros(int(nbytes.sum()), np.uint8)
    for g in range(int(nbytes.max()) if v.size else 0):
        sel = nbytes > g
        more = (nbytes[sel] > g + 1).astype(np.uint8) << 7
        out[starts[sel] + g] = ((v[sel] >> np.uint64(7 * g)) & np.uint64(0x7F)).astype(np.uint8) | more
    return out.tobytes()


def _varint_decode(data: bytes, count: int, max_len: int = 4) -> np.ndarray:
    raw = np.frombuffer(data, np.uint8)
    ends = np.flatnonzero(raw < 0x80)
    if ends.size != count or (raw.size and not (ends.size and ends[-1] == raw.size - 1)):
        raise ProtocolError(f"varint index list holds {ends.size} complete values, expected {count}")
    if not count:
        return np.zeros(0, np.int64)
    starts = np.concatenate(([0], ends[:-1] + 1))
    if (ends - starts).max() >= max_len:
        raise ProtocolError(f"varint index longer than {max_len} bytes")
    pos = np.arange(raw.size) - np.repeat(starts, ends - starts + 1)
    parts = (raw & 0x7F).astype(np.int64) << (7 * pos)
    return np.add.reduceat(parts, starts)


# -- lossless entropy stage ----------------------------------------------------------------
_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 6, "dict_size": 1 << 20}]


class Entropy(Codec):
    """Lossless compression of another codec's bytes: ``zlib`` (level 6), ``lzma`` (raw LZMA2,
    1 MiB dictionary) or ``zstd`` (level 3, needs the optional ``zstandard`` package).

    Bound: the inner codec's, exactly (exact when the inner codec is lossless). Decompression
    stops at the inner codec's largest valid size for the shape, so a small hostile payload
    cannot expand into a large allocation.
    """

    METHODS = ("zlib", "lzma", "zstd")

    def __init__(self, inner: Codec, method: str):
        if method not in self.METHODS:
            raise ValueError(f"method must be one of {self.METHODS}")
        if method == "zstd":
            _zstandard()
        self.inner, self.method = inner, method
        self.name = f"{inner.name}+{method}"
        self.lossless = inner.lossless

    def max_nbytes(self, n):
        limit = self.inner.max_nbytes(n)
        return limit + limit // 100 + 1024  # any of the three stays below this on incompressible input

    def _encode(self, flat):
        raw = self.inner._encode(flat)
        if self.method == "zlib":
            return zlib.compress(raw, 6)
        if self.method == "lzma":
            return lzma.compress(raw, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
        return _zstandard().ZstdCompressor(level=3, write_content_size=True).compress(raw)

    def _decode(self, data, n):
        limit = self.inner.max_nbytes(n)
        raw = self._decompress(data, limit)
        return self.inner._decode(raw, n)

    def _decompress(self, data: bytes, limit: int) -> bytes:
        what = f"{self.method} stream of a {self.name} tensor"
        try:
            if self.method == "zstd":
                zstd = _zstandard()
                size = zstd.frame_content_size(data)
                if not 0 <= size <= limit:
                    raise ProtocolError(f"{what} announces {size} bytes; at most {limit} are allowed")
                return zstd.ZstdDecompressor().decompress(data, max_output_size=limit, allow_extra_data=False)
            d: Any
            if self.method == "zlib":
                d = zlib.decompressobj()
            else:
                d = lzma.LZMADecompressor(
                    format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "dict_size": 1 << 20}]
                )
            out = d.decompress(data, limit + 1)  # max_length 0 would mean "unlimited"
        except ProtocolError:
            raise
        except Exception as exc:  # zlib.error, LZMAError, ZstdError: corrupt stream
            raise ProtocolError(f"{what} is corrupt ({exc})") from exc
        if len(out) > limit:
            raise ProtocolError(f"{what} expands beyond {limit} bytes")
        if not d.eof:
            raise ProtocolError(f"{what} is truncated")
        if d.unused_data:
            raise ProtocolError(f"{what} has {len(d.unused_data)} trailing bytes")
        return out

    def elementwise_bound(self, array):
        return self.inner.elementwise_bound(array)


def _zstandard():
    try:
        import zstandard
    except ImportError:
        raise ProtocolError(
            "codec stage 'zstd' needs the optional package 'zstandard' (pip install zstandard); "
            "'zlib' and 'lzma' need nothing beyond the standard library"
        ) from None
    return zstandard


# -- specs ---------------------------------------------------------------------------------
_SPARSE = re.compile(r"(topk|randk)((?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)")
_SPARSIFIERS = {"topk": TopK, "randk": RandK}
_QUANT = re.compile(r"int(8|4|2)((?:-b\d+|-sr)*)")
_SIGN = re.compile(r"sign(?:-b(\d+))?")
_FLOATS: dict[str, Callable[[], _FixedSize]] = {"fp32": Float32, "fp16": Float16, "bf16": BFloat16}
GRAMMAR = "[topk<fraction>+|randk<fraction>+][fp32|fp16|bf16|int8|int4|int2[-b<block>][-sr]|sign[-b<block>]][+zlib|+lzma|+zstd]"


def parse_codec(spec: str, *, seed=None) -> Codec:
    """Build a fresh codec from a spec (see the module docstring); ``seed`` seeds stochastic
    rounding. Raises ProtocolError naming the offending stage."""
    if not isinstance(spec, str) or not spec or len(spec) > MAX_SPEC_CHARS:
        raise ProtocolError(
            f"unknown codec {spec!r}: a codec spec is a non-empty string of at most {MAX_SPEC_CHARS} characters"
        )
    sparsify: tuple[str, ...] | None = None
    values: _FixedSize | None = None
    entropy: str | None = None
    for stage in spec.split("+"):
        m_sparse, m_quant, m_sign = _SPARSE.fullmatch(stage), _QUANT.fullmatch(stage), _SIGN.fullmatch(stage)
        if m_sparse:
            if sparsify or values or entropy:
                raise ProtocolError(f"codec {spec!r}: topk/randk must come first, once")
            sparsify = m_sparse.groups()
            if not 0 < float(sparsify[1]) < 1:
                raise ProtocolError(f"codec {spec!r}: the {sparsify[0]} fraction must be in (0, 1), got {sparsify[1]}")
        elif stage in _FLOATS or m_quant or m_sign:
            if values or entropy:
                raise ProtocolError(f"codec {spec!r}: one value stage ({stage!r}), before any entropy stage")
            if m_sign:
                values = ScaledSign(_block_size(spec, m_sign.group(1) or "256"))
            else:
                values = _FLOATS[stage]() if stage in _FLOATS else _quantizer(spec, _matched(m_quant), seed)
        elif stage in Entropy.METHODS:
            if entropy:
                raise ProtocolError(f"codec {spec!r}: at most one entropy stage, last")
            entropy = stage
        else:
            raise ProtocolError(f"unknown codec {spec!r}: stage {stage!r} is not one of {GRAMMAR}")
    dense = values or Float32()
    codec: Codec = dense if sparsify is None else _SPARSIFIERS[sparsify[0]](sparsify[1], dense)
    return Entropy(codec, entropy) if entropy else codec


def _matched(m: re.Match[str] | None) -> re.Match[str]:
    assert m is not None
    return m


def _quantizer(spec: str, m: re.Match, seed) -> BlockQuant:
    options = re.findall(r"-(b\d+|sr)", m.group(2))
    if len({o[0] for o in options}) != len(options):
        raise ProtocolError(f"codec {spec!r}: an option of int{m.group(1)} is repeated")
    block = next((o[1:] for o in options if o[0] == "b"), str(DEFAULT_BLOCK))
    return BlockQuant(int(m.group(1)), _block_size(spec, block), stochastic="sr" in options, seed=seed)


def _block_size(spec: str, block: str) -> int:
    if block != str(int(block)) or not 8 <= int(block) <= 65536:
        raise ProtocolError(
            f"codec {spec!r}: block size must be an integer in 8..65536 without leading zeros, got {block}"
        )
    return int(block)


PRESETS = (
    "fp32",
    "fp16",
    "bf16",
    "int8",
    "int4",
    "int8-sr",
    "int4-sr",
    "fp32+zlib",
    "int8+zlib",
    "int4+zlib",
    "topk0.1",
    "topk0.1+int8",
    "topk0.05+int8",
    "topk0.01+int8",
    "topk0.1+int4",
    "topk0.05+int4+zlib",
    "sign",
    "sign-b64",
    "topk0.25+sign",
    "randk0.5",
    "randk0.7+sign",
)
CODECS: dict[str, Codec] = {c.name: c for c in map(parse_codec, PRESETS)}


@functools.lru_cache(maxsize=128)
def _cached(spec: str) -> Codec:
    return parse_codec(spec)


def get_codec(name: str) -> Codec:
    """The codec for a spec: a preset from ``CODECS`` or any valid spec (parsed once, cached)."""
    if isinstance(name, str) and name in CODECS:
        return CODECS[name]
    if not isinstance(name, str) or len(name) > MAX_SPEC_CHARS:
        return parse_codec(name)  # raises the right ProtocolError
    return _cached(name)
