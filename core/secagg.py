"""Secure aggregation's core: the aggregator learns the sum of the round's updates, never one.

Pairwise masking after Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving
Machine Learning" (CCS 2017), with the sparse neighbourhoods of SecAgg+ (Bell et al., "Secure
Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020) as an option: the
functions take each device's peers explicitly, all of the round's devices or a subset.

One round, for devices u, v among those selected (``docs/protocol.md`` has the messages):

1. **Keys.** Each device makes two X25519 key pairs (``DeviceKeys``): ``cipher`` (to encrypt the
   shares it sends its peers) and ``mask`` (to agree pairwise mask seeds), and publishes both
   public keys through the aggregator.
2. **Shares.** Each device draws a 32-byte self-mask seed ``b_u`` and splits its mask secret key
   and ``b_u`` with Shamir's scheme (threshold t) among its peers, each pair of shares encrypted
   for its peer with AES-GCM under ``HKDF(X25519(cipher_u, cipher_v))`` (``seal_shares``).
3. **Masked input.** The device quantizes its update into the ring Z_{2^32} (``Quantizer``) and
   sends ``y_u = x_u + PRG(b_u) + sum_{v > u} PRG(s_uv) - sum_{v < u} PRG(s_uv)`` (mod 2^32),
   ``s_uv = HKDF(X25519(mask_u, mask_v))`` the seed u and v both compute, ``PRG`` AES-256-CTR.
   Pairwise masks cancel in the sum; the self mask hides y_u even if a pair's seed leaks.
4. **Unmasking.** The aggregator names the devices whose masked input arrived (survivors) and
   those that dropped after step 2. Each survivor reveals, per peer, *either* its share of the
   peer's self-mask seed (peer survived) *or* of its mask secret key (peer dropped), never both
   (``reveal``). With t shares the aggregator rebuilds the seeds and keys (``combine_secret``),
   subtracts the survivors' self masks and the dropped devices' pairwise masks with their
   surviving peers (``unmask``): what remains is ``sum_u x_u`` over the survivors, exact in
   the ring; ``Quantizer.decode`` turns it back into floats within the quantization bound.

Pure functions over bytes and numpy arrays: no network, no clock. Randomness comes from the
operating system unless a test passes its own. What it does not do: authenticate keys (a
malicious aggregator could substitute public keys: the CCS 2017 paper's active-adversary
variant signs them, which needs a PKI), or check that a device's input is well formed (a masked
input cannot be norm-checked: only robust-free, streaming sums compose with it).

Needs ``cryptography`` (X25519, HKDF, AES) and ``pycryptodome`` (Shamir's scheme over
GF(2^128)), the ``secagg`` extra. (pyshamir, Shamir over GF(256) in pure Python, was measured
too slow: 12 s to rebuild one 32-byte secret from 51 shares, 20 minutes a round at 100 devices.)
"""

from __future__ import annotations

import hashlib
import math
import secrets
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from core.errors import ProtocolError

RING_BITS = 32
RING = 1 << RING_BITS
SEED_BYTES = 32
MAX_PEERS = 1000  # shares a device makes (one per peer); SecAgg+ neighbourhoods are far smaller
SHARE_BYTES = 2 + SEED_BYTES  # a share of a 32-byte secret: its index and two 16-byte halves
NONCE_BYTES = 12
SEALED_BYTES = NONCE_BYTES + 2 * SHARE_BYTES + 16  # nonce, two shares, GCM tag

RandomBytes = Callable[[int], bytes]


# -- ring quantization ---------------------------------------------------------------------
@dataclass(frozen=True)
class Quantizer:
    """Fixed-point codes in Z_{2^32} that add without overflow for up to ``max_devices``.

    Each value is clipped to ``[-clip, clip]`` and coded as ``round(x * scale)`` (stochastic
    rounding: unbiased), ``scale = (floor((2^31 - 1) / max_devices) - 1) / clip``, so any sum of up to
    ``max_devices`` codes lies in (-2^31, 2^31) and reads back exactly as a signed 32-bit
    integer. Every device of a round must use the same ``clip`` and ``max_devices``: one
    common scale is what makes codes summable (the integer codecs' per-block scales are not).
    Bound of the decoded sum of n updates: ``n / scale`` per value, plus what clipping removed.
    """

    clip: float
    max_devices: int

    def __post_init__(self) -> None:
        if not (0 < self.clip < 1e30) or not (1 <= self.max_devices <= 1 << 20):
            raise ValueError(f"clip must be positive and max_devices in [1, 2^20], got {self.clip}, {self.max_devices}")

    @property
    def scale(self) -> float:
        # One code below the share of 2^31 - 1: stochastic rounding may round each one up by 1.
        return float(((1 << (RING_BITS - 1)) - 1) // self.max_devices - 1) / self.clip

    def encode(self, values: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """uint32 codes of ``values`` (any shape, flattened); non-finite values are refused."""
        flat = np.asarray(values, np.float64).ravel()
        if not np.isfinite(flat).all():
            raise ValueError("cannot quantize non-finite values")
        y = np.clip(flat, -self.clip, self.clip) * self.scale
        rng = rng or np.random.default_rng(secrets.randbits(128))
        q = np.floor(y + rng.random(y.size)).astype(np.int64)
        return (q % RING).astype(np.uint32)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """The float values of a sum of codes (uint32, read as signed 32-bit)."""
        return np.asarray(codes, np.uint32).view(np.int32).astype(np.float64) / self.scale


# -- keys and seeds ------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceKeys:
    """A device's two X25519 key pairs for one round: raw 32-byte keys."""

    cipher_secret: bytes
    cipher_public: bytes
    mask_secret: bytes
    mask_public: bytes

    @property
    def public(self) -> tuple[bytes, bytes]:
        return self.cipher_public, self.mask_public


def _x25519():
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

    return X25519PrivateKey, X25519PublicKey


def public_key(secret: bytes) -> bytes:
    """The X25519 public key of a raw 32-byte secret key."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    private, _ = _x25519()
    return private.from_private_bytes(secret).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def new_keys(random_bytes: RandomBytes = secrets.token_bytes) -> DeviceKeys:
    """Fresh key pairs (``random_bytes``: the operating system's, unless a test seeds them)."""
    cipher, mask = random_bytes(32), random_bytes(32)
    return DeviceKeys(cipher, public_key(cipher), mask, public_key(mask))


def _hkdf(material: bytes, info: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=info).derive(material)


def _context(purpose: bytes, job: str, round_id: int, a: str, b: str) -> bytes:
    """HKDF info binding a key to its purpose, job, round and ordered pair of devices."""
    parts = [purpose, job.encode(), struct.pack(">Q", round_id), a.encode(), b.encode()]
    return b"fedlora-secagg-v1\0" + b"\0".join(hashlib.sha256(p).digest() for p in parts)


def agree(secret: bytes, peer_public: bytes, purpose: bytes, job: str, round_id: int, me: str, peer: str) -> bytes:
    """The 32-byte key ``me`` and ``peer`` share for ``purpose`` in this round: HKDF-SHA256 of
    their X25519 agreement, bound to the pair (in sorted order, so both get the same key)."""
    private, public = _x25519()
    try:
        shared = private.from_private_bytes(secret).exchange(public.from_public_bytes(peer_public))
    except ValueError as exc:  # a wrong-length or low-order public key
        raise ProtocolError(f"public key of {peer!r} is not a usable X25519 key: {exc}") from None
    a, b = sorted((me, peer))
    return _hkdf(shared, _context(purpose, job, round_id, a, b))


def expand(seed: bytes, length: int) -> np.ndarray:
    """``length`` uint32 words of AES-256-CTR keystream under ``seed`` (the mask PRG)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    if len(seed) != SEED_BYTES:
        raise ValueError(f"a mask seed is {SEED_BYTES} bytes, got {len(seed)}")
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(b"\0" * 16)).encryptor()
    stream = encryptor.update(b"\0" * (4 * length)) + encryptor.finalize()
    return np.frombuffer(stream, "<u4").astype(np.uint32)


def pair_mask(seed: bytes, length: int, me: str, peer: str) -> np.ndarray:
    """The pairwise mask ``me`` adds: +PRG(s) if me < peer, -PRG(s) otherwise (mod 2^32)."""
    m = expand(seed, length)
    return m if me < peer else (np.uint32(0) - m).astype(np.uint32)


# -- masking -------------------------------------------------------------------------------
def masked_input(
    codes: np.ndarray,
    me: str,
    keys: DeviceKeys,
    self_seed: bytes,
    peers: Mapping[str, bytes],
    job: str,
    round_id: int,
) -> np.ndarray:
    """``codes + PRG(self_seed) + sum of pairwise masks`` (mod 2^32); ``peers``: id -> mask
    public key of every peer this device shares masks with (not itself)."""
    codes = np.asarray(codes, np.uint32)
    out = codes + expand(self_seed, codes.size)
    for peer, peer_public in sorted(peers.items()):
        if peer == me:
            raise ValueError("a device is not its own peer")
        seed = agree(keys.mask_secret, peer_public, b"mask", job, round_id, me, peer)
        out += pair_mask(seed, codes.size, me, peer)
    return out.astype(np.uint32)


# -- shares --------------------------------------------------------------------------------
def split_secret(secret: bytes, parts: int, threshold: int) -> list[bytes]:
    """Shamir shares of a 32-byte ``secret``: any ``threshold`` of them rebuild it, fewer reveal
    nothing. pycryptodome's Shamir over GF(2^128) shares 16 bytes at a time, so each share is
    its index (2 bytes, big-endian, 1..parts) and the two halves' shares (``SHARE_BYTES``)."""
    from Crypto.Protocol.SecretSharing import Shamir

    if len(secret) != SEED_BYTES:
        raise ValueError(f"a shared secret is {SEED_BYTES} bytes, got {len(secret)}")
    if not 2 <= threshold <= parts <= MAX_PEERS:
        raise ValueError(f"need 2 <= threshold <= parts <= {MAX_PEERS}, got threshold {threshold}, parts {parts}")
    low = Shamir.split(threshold, parts, secret[:16])
    high = Shamir.split(threshold, parts, secret[16:])
    return [struct.pack(">H", i) + a + b for (i, a), (j, b) in zip(low, high) if i == j]


def combine_secret(shares: Iterable[bytes], threshold: int) -> bytes:
    """The secret from at least ``threshold`` shares (Shamir cannot tell: fewer would give a
    wrong secret silently, so they are refused here)."""
    from Crypto.Protocol.SecretSharing import Shamir

    shares = list(shares)
    if len(shares) < max(2, threshold):
        raise ProtocolError(f"{len(shares)} shares cannot rebuild a secret split with threshold {threshold}")
    if any(len(s) != SHARE_BYTES for s in shares):
        raise ProtocolError(f"a share is {SHARE_BYTES} bytes, got {sorted({len(s) for s in shares})}")
    index = [struct.unpack(">H", s[:2])[0] for s in shares]
    if len(set(index)) != len(index) or not all(1 <= i <= MAX_PEERS for i in index):
        raise ProtocolError(f"share indices must be distinct and in 1..{MAX_PEERS}, got {sorted(index)[:8]}")
    low = Shamir.combine([(i, s[2:18]) for i, s in zip(index, shares)])
    high = Shamir.combine([(i, s[18:]) for i, s in zip(index, shares)])
    return low + high


@dataclass(frozen=True)
class Shares:
    """What ``owner`` gave one peer: its share of owner's mask secret key and of its self seed."""

    owner: str
    mask_secret: bytes
    self_seed: bytes


def seal_shares(
    me: str,
    keys: DeviceKeys,
    self_seed: bytes,
    peers: Mapping[str, bytes],
    threshold: int,
    job: str,
    round_id: int,
    random_bytes: RandomBytes = secrets.token_bytes,
) -> dict[str, bytes]:
    """Split this device's mask secret key and self seed among ``peers`` (id -> cipher public
    key); each peer's pair of shares sealed for it (AES-256-GCM): peer id -> ``SEALED_BYTES``."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    order = sorted(peers)
    secret_shares = split_secret(keys.mask_secret, len(order), threshold)
    seed_shares = split_secret(self_seed, len(order), threshold)
    sealed = {}
    for peer, s_share, b_share in zip(order, secret_shares, seed_shares):
        key = agree(keys.cipher_secret, peers[peer], b"shares", job, round_id, me, peer)
        nonce = random_bytes(NONCE_BYTES)
        ad = _context(b"sealed", job, round_id, me, peer)  # ordered: owner, recipient
        sealed[peer] = nonce + AESGCM(key).encrypt(nonce, s_share + b_share, ad)
    return sealed


def open_shares(
    me: str, keys: DeviceKeys, owner: str, owner_cipher_public: bytes, sealed: bytes, job: str, round_id: int
) -> Shares:
    """The shares ``owner`` sealed for this device; ProtocolError if they were not (a wrong
    length, key, round, job or pair, or tampered bytes)."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if len(sealed) != SEALED_BYTES:
        raise ProtocolError(f"sealed shares from {owner!r} are {len(sealed)} bytes, not {SEALED_BYTES}")
    key = agree(keys.cipher_secret, owner_cipher_public, b"shares", job, round_id, me, owner)
    ad = _context(b"sealed", job, round_id, owner, me)
    try:
        plain = AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], ad)
    except InvalidTag:
        raise ProtocolError(f"sealed shares from {owner!r} do not open (wrong key, round or tampered)") from None
    return Shares(owner, plain[:SHARE_BYTES], plain[SHARE_BYTES:])


def reveal(held: Mapping[str, Shares], survivors: Iterable[str], dropped: Iterable[str]) -> dict[str, bytes]:
    """What a surviving device tells the aggregator: per peer, its share of the self seed if
    the peer survived, of the mask secret key if it dropped; a peer named in both is refused
    (revealing both would unmask that peer's input)."""
    survivors, dropped = set(survivors), set(dropped)
    both = survivors & dropped
    if both:
        raise ProtocolError(f"{sorted(both)[0]!r} is named both surviving and dropped: refusing to reveal")
    out = {}
    for owner, shares in held.items():
        if owner in survivors:
            out[owner] = shares.self_seed
        elif owner in dropped:
            out[owner] = shares.mask_secret
    return out


# -- the aggregator's side -----------------------------------------------------------------
def unmask(
    masked_sum: np.ndarray,
    survivors: Mapping[str, bytes],
    dropped: Mapping[str, bytes],
    peers_of: Mapping[str, Iterable[str]],
    mask_public: Mapping[str, bytes],
    job: str,
    round_id: int,
) -> np.ndarray:
    """The sum of the survivors' codes from the sum of their masked inputs.

    survivors: surviving device -> its rebuilt self seed; dropped: dropped device -> its rebuilt
    mask secret key; peers_of: device -> the peers it masked with; mask_public: device -> mask
    public key. Pairwise masks between two survivors cancel; those between a dropped device and
    a surviving peer are recomputed from the dropped device's key and removed."""
    out = np.asarray(masked_sum, np.uint32).copy()
    n = out.size
    for seed in survivors.values():
        out -= expand(seed, n)
    for gone, secret in dropped.items():
        if public_key(secret) != mask_public.get(gone):
            raise ProtocolError(f"the rebuilt mask key of {gone!r} does not match its public key: shares were wrong")
        for peer in peers_of[gone]:
            if peer in survivors:
                seed = agree(secret, mask_public[peer], b"mask", job, round_id, gone, peer)
                out -= pair_mask(seed, n, peer, gone)  # the mask the survivor added for this pair
    return out.astype(np.uint32)


def ring_sum(arrays: Iterable[np.ndarray]) -> np.ndarray:
    """The sum mod 2^32 of uint32 arrays (what the aggregator accumulates, streaming)."""
    total: np.ndarray | None = None
    for a in arrays:
        a = np.asarray(a, np.uint32)
        total = a.copy() if total is None else (total + a).astype(np.uint32)
    if total is None:
        raise ValueError("no arrays to sum")
    return total


# -- layout and threshold shared by both sides ----------------------------------------------
def min_threshold(peers: int) -> int:
    """The least Shamir threshold a device accepts with ``peers`` peers: a strict majority of
    them (and at least 2, what Shamir's scheme needs)."""
    return max(2, peers // 2 + 1)


def flatten(tensors: Mapping[str, np.ndarray]) -> np.ndarray:
    """The tensors as one vector, in sorted name order (the order every mask is laid over)."""
    return np.concatenate([np.asarray(tensors[k], np.float64).ravel() for k in sorted(tensors)])


def split_words(words: np.ndarray, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """A vector laid out by ``flatten`` back into tensors of ``shapes``."""
    out, offset = {}, 0
    for name in sorted(shapes):
        size = math.prod(shapes[name])
        out[name] = words[offset : offset + size].reshape(shapes[name])
        offset += size
    if offset != words.size:
        raise ValueError(f"{words.size} values do not fill tensors of {offset}")
    return out
