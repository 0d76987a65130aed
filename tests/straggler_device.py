"""A straggler, for the async-round tests: it trains like any device, then holds its update back
until the job has made a newer global version than the one it trained on, so the update it sends
is stale by construction (no timing involved).

    python tests/straggler_device.py --config device.json
"""

from __future__ import annotations

import argparse
import logging
import sys

from core.messages import Announcement, RoundState
from edge_client.cli import setup_logging
from edge_client.device import Device, load_device_config

log = logging.getLogger("fedlora.straggler")


class Straggler(Device):
    def train_round(self, ann: Announcement) -> bytes:
        payload = super().train_round(ann)
        log.info("round %s: holding the update back until a version after %d", ann.round, ann.global_version)
        while True:
            now = self.announcement
            if now is not None and (now.global_version > ann.global_version or now.state is RoundState.FINISHED):
                return payload
            self._handle_inbox(timeout=0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    setup_logging(False)
    Straggler(load_device_config(args.config)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
