"""A lying device, for the poisoning benchmarks (never part of a deployment): it trains like an
honest device, then scales its update up to ``--norm`` and claims ``--claim`` training examples;
or, with ``--factor``, multiplies its honest update by that factor (-1: sign-flipped, 100:
scaled up) and claims its true data size (``bench/robust_bench.py``).

    python bench/poison_device.py [--norm 9900] [--claim 1e12] [--factor F] --config device.json
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
    factor: float | None = None  # multiply the honest update instead (and claim the true size)

    def status_payload(self, state: Presence = Presence.ONLINE) -> bytes:
        if self.factor is not None:
            return super().status_payload(state)
        return Status(state, self.rank, self.claim, self.manifest.model_id[:256]).to_bytes()  # lies here too

    def train_round(self, ann: Announcement) -> bytes:
        env = decode_envelope(super().train_round(ann))
        honest = float(np.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in env.tensors.values())))
        if self.factor is not None:
            scale, claim = self.factor, env.num_examples
        else:
            scale, claim = (self.norm / honest if honest > 0 else 0.0), self.claim
        env.tensors = {k: (v * scale).astype(np.float32) for k, v in env.tensors.items()}
        env.num_examples = claim
        env.codec, env.tensor_codecs = "fp32", {}  # exactly the norm it wants
        log.warning(
            "round %s: sending the update scaled from norm %.3g to %.3g, claiming %d examples",
            ann.round,
            honest,
            abs(scale) * honest,
            claim,
        )
        return encode_envelope(env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--norm", type=float, default=LyingDevice.norm)
    parser.add_argument("--claim", type=float, default=LyingDevice.claim)
    parser.add_argument("--factor", type=float, help="multiply the honest update by this (-1: sign flip)")
    args = parser.parse_args(argv)
    setup_logging(False)
    LyingDevice.norm, LyingDevice.claim, LyingDevice.factor = args.norm, int(args.claim), args.factor
    LyingDevice(load_device_config(args.config)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
