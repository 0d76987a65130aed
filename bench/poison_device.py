"""A lying device, for the poisoning benchmark (never part of a deployment): it trains like an
honest device, then scales its update up to ``--norm`` and claims ``--claim`` training examples.

    python bench/poison_device.py [--norm 9900] [--claim 1e12] --config device.json
"""

from __future__ import annotations

import argparse
import logging
import sys

import numpy as np

from core.messages import Announcement, Presence, Status
from core.protocol import decode_envelope, encode_envelope
from edge_client.cli import setup_logging
from edge_client.device import Device, load_device_config

log = logging.getLogger("fedlora.poison")


class LyingDevice(Device):
    norm: float = 9900.0
    claim: int = 10**12

    def status_payload(self, state: Presence = Presence.ONLINE) -> bytes:
        return Status(state, self.rank, self.claim, self.manifest.model_id[:256]).to_bytes()  # lies here too

    def train_round(self, ann: Announcement) -> bytes:
        env = decode_envelope(super().train_round(ann))
        honest = float(np.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in env.tensors.values())))
        scale = self.norm / honest if honest > 0 else 0.0
        env.tensors = {k: (v * scale).astype(np.float32) for k, v in env.tensors.items()}
        env.num_examples = self.claim
        env.codec, env.tensor_codecs = "fp32", {}  # exactly the norm it wants
        log.warning(
            "round %s: sending the update scaled from norm %.3g to %.3g, claiming %d examples",
            ann.round,
            honest,
            self.norm,
            self.claim,
        )
        return encode_envelope(env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--norm", type=float, default=LyingDevice.norm)
    parser.add_argument("--claim", type=float, default=LyingDevice.claim)
    args = parser.parse_args(argv)
    setup_logging(False)
    LyingDevice.norm, LyingDevice.claim = args.norm, int(args.claim)
    LyingDevice(load_device_config(args.config)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
