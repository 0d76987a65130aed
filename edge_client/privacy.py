"""The device's half of client-level differential privacy (DP-FedAvg): clip, then add noise.

When the round announcement carries ``privacy`` (``core.messages.PrivacyInfo``), the change a
device sends is first clipped to L2 norm ``clip`` as one vector over all its tensors, then,
under distributed DP, each value gets Gaussian noise of std ``noise_std`` from a generator
seeded by the operating system. This runs after error feedback adds its residual and before
the codec encodes, so the residual keeps only what the codec dropped from the clipped (and
noised) change: the part above the bound is dropped, never carried into a later round, and
every round's update is within the bound whatever the device computed before. The aggregator
clips again (a lossy codec can push the decoded change slightly past the bound), so the
sensitivity the accountant relies on never depends on the device.

Standard library and numpy only: it ships to devices.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping

import numpy as np

from core.messages import PrivacyInfo


def l2_norm(tensors: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of all tensors as one vector (float64)."""
    return math.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in tensors.values()))


def clip_to_norm(tensors: Mapping[str, np.ndarray], clip: float) -> tuple[dict[str, np.ndarray], bool]:
    """``tensors`` scaled to L2 norm at most ``clip`` (float32), and whether they were within it."""
    norm = l2_norm(tensors)
    if norm <= clip:
        return {k: np.asarray(v, np.float32).copy() for k, v in tensors.items()}, True
    scale = clip / norm
    return {k: (np.asarray(v, np.float64) * scale).astype(np.float32) for k, v in tensors.items()}, False


class Privatizer:
    """Clips (and noises) one round's change as ``PrivacyInfo`` says; ``below_clip`` is the bit
    the update reports (``dp_below_clip``) for adaptive clipping."""

    def __init__(self, info: PrivacyInfo, rng: np.random.Generator | None = None):
        self.info = info
        self.rng = rng or np.random.default_rng(secrets.randbits(128))
        self.below_clip: bool | None = None

    def __call__(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        clipped, self.below_clip = clip_to_norm(tensors, self.info.clip)
        if self.info.noise_std > 0:
            for name in sorted(clipped):
                noise = self.rng.normal(0.0, self.info.noise_std, clipped[name].shape)
                clipped[name] = (clipped[name] + noise).astype(np.float32)
        return clipped
