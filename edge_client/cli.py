"""``fedlora-edge``: run the device client."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from edge_client.errors import FedloraError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedlora-edge", description="fedlora device client (torch-free)")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="join the job and train when rounds open")
    run.add_argument("--config", help="device config (.json; .yaml if pyyaml is installed)")
    run.add_argument("--device-id")
    run.add_argument("--bundle")
    run.add_argument("--data")
    run.add_argument("--state-dir")
    run.add_argument("--broker", help="mqtt://host:port")
    run.add_argument("--job")
    run.add_argument("--threads", type=int)
    run.add_argument("--exit-when-finished", action="store_true", default=None)
    run.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from edge_client.device import Device, load_device_config

    overrides = {"device_id": args.device_id, "bundle": args.bundle, "data": args.data, "state_dir": args.state_dir,
                 "job": args.job, "threads": args.threads, "exit_when_finished": args.exit_when_finished}
    if args.broker:
        overrides["broker"] = {"url": args.broker}
    try:
        cfg = load_device_config(args.config, overrides)
        device = Device(cfg)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        device.run(stop)
    except FedloraError as exc:
        print(f"fedlora-edge: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
