"""``fedlora-server``: the aggregator's command line."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time

from core.errors import FedloraError


def server_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedlora-server", description="fedlora aggregator")
    parser.add_argument("--config", help="YAML or JSON config file; FEDLORA_* environment variables override it")
    parser.add_argument("--bundle")
    parser.add_argument("--state-dir")
    parser.add_argument("--broker", help="mqtt://host:port")
    parser.add_argument("--job")
    parser.add_argument("--http-port", type=int)
    parser.add_argument(
        "--export-adapter",
        metavar="FOLDER",
        help="write the current global adapter in the state dir as a PEFT adapter folder, then exit",
    )
    parser.add_argument(
        "--strategies",
        action="store_true",
        help="list the strategies and each one's settings (config key strategy_settings), then exit",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.strategies:
        from server.strategies import describe_strategies

        print(describe_strategies())
        return 0
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )

    from server.config import load_server_config

    overrides = {"bundle": args.bundle, "state_dir": args.state_dir, "job": args.job, "http_port": args.http_port}
    if args.broker:
        overrides["broker"] = {"url": args.broker}
    try:
        cfg = load_server_config(args.config, overrides)
        if args.export_adapter:
            return _export_adapter(cfg, args.export_adapter)
        return _serve(cfg)
    except FedloraError as exc:
        print(f"fedlora-server: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _export_adapter(cfg, folder: str) -> int:
    """``--export-adapter``: the committed global adapter (and folded changes) as a PEFT folder."""
    from core.bundle import Bundle, choose_bundle
    from core.errors import ConfigError
    from server.peft_adapter import write_peft_adapter
    from server.store import DB_NAME, StateStore

    if not (cfg.state_dir / DB_NAME).is_file():
        raise ConfigError(f"state dir {cfg.state_dir} holds no aggregator state (state.db)")
    saved = StateStore(cfg.state_dir).load()
    if saved is None:
        raise ConfigError(f"state dir {cfg.state_dir} holds no committed round yet")
    manifest = Bundle(choose_bundle(cfg.bundle)).manifest
    out = write_peft_adapter(
        folder, manifest, saved["global"], saved["base_delta"], about={"job": saved["job"], "version": saved["version"]}
    )
    print(f"wrote the global adapter of job {saved['job']}, version {saved['version']}, to {out}")
    return 0


def _serve(cfg) -> int:
    """Run the aggregator until the job is done (or forever, with exit_when_finished off) or
    SIGTERM. With leader election, rounds run only while this replica holds the Lease: each
    term connects to the broker, resumes from the persisted state, and ends the moment the
    Lease is lost; the Lease is released only after the last step, for a quick hand-over."""
    from core.bundle import Bundle, choose_bundle
    from server.metrics import HealthServer, Metrics

    log = logging.getLogger("fedlora.server")
    Bundle(choose_bundle(cfg.bundle))  # every replica fails fast on a bad bundle, not only the one that leads
    metrics = Metrics()
    metrics.round_timeout.set(cfg.rounds.round_timeout)
    stop = threading.Event()  # SIGTERM / SIGINT
    term_over = threading.Event()  # stop, or leadership lost: ends one term of running rounds

    def on_signal(*_):
        stop.set()
        term_over.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    kube = cfg.kubernetes
    elector = recorder = None
    identity = lease = ""
    worker = cfg.shards.role == "worker"  # a sharded worker: its shard is its own, no Lease to hold
    if (kube.leader_election and not worker) or kube.events:
        from kubernetes import client

        from server import k8s
        from server.leader import LeaderElector, LeaseLock

        identity = kube.identity or k8s.default_identity()
        namespace = kube.namespace or k8s.default_namespace()
        lease = f"{namespace}/{kube.lease_name}"
        api = k8s.api_client(f"fedlora-aggregator ({identity})")
        timeout = min(5.0, kube.renew_deadline / 2)
        if kube.events:

            def count_failures(ok: bool) -> None:
                if not ok:
                    metrics.kubernetes_errors.labels("event_create").inc()

            recorder = k8s.EventRecorder(
                client.CoreV1Api(api),
                namespace,
                identity,
                kube.pod_uid,
                request_timeout=timeout,
                on_result=count_failures,
            ).start()
        if kube.leader_election and not worker:
            elector = LeaderElector(
                LeaseLock(client.CoordinationV1Api(api), namespace, kube.lease_name, request_timeout=timeout),
                identity,
                lease_duration=kube.lease_duration,
                renew_deadline=kube.renew_deadline,
                retry_period=kube.retry_period,
                on_stopped_leading=term_over.set,
                on_api_error=lambda op, exc: metrics.kubernetes_errors.labels(f"lease_{op}").inc(),
            )

    current: dict = {"link": None}

    def ready():
        link = current["link"]
        if link is not None:
            return True if link.connected.is_set() else "leader, not connected to the broker"
        if elector is not None:
            return True if elector.healthy() else "standby, cannot reach the Kubernetes API"
        return "starting"

    def health():
        aggregator = current.get("aggregator")
        if aggregator is None:
            return True  # standby or starting: nothing to be stuck in
        stalled = time.monotonic() - aggregator.last_step
        if stalled > cfg.health_stall_s:
            return f"main loop made no progress for {stalled:.0f}s"
        state = aggregator.store.healthy()
        return True if state is True else f"degraded: {state}"

    http = (
        HealthServer(metrics, cfg.http_host, cfg.http_port, ready=ready, health=health).start()
        if cfg.http_port
        else None
    )
    election_stop = threading.Event()
    try:
        if elector is not None:
            elector.start(election_stop)
            log.info("%s campaigning for lease %s", identity, lease)
        while not stop.is_set():
            if elector is not None:
                if not elector.wait_for_leadership(timeout=1.0):
                    continue
                term_over.clear()
                if not elector.is_leader():
                    continue
                if recorder is not None:
                    recorder.leader_elected(identity, lease)
            leading = elector.is_leader if elector is not None else (lambda: True)
            metrics.leader.set(0 if worker else 1)  # a worker runs no rounds
            finished = _lead(cfg, metrics, current, leading, term_over, recorder)
            metrics.leader.set(0)
            if elector is None or (finished and cfg.exit_when_finished):
                break
            log.info("stopped running rounds (%s)", "shutting down" if stop.is_set() else "lost the lease")
    finally:
        election_stop.set()
        if elector is not None:
            elector.join(timeout=kube.retry_period + 10)
            elector.release()
        if recorder is not None:
            recorder.stop()
        if http:
            http.stop()
    return 0


def _lead(cfg, metrics, current: dict, leading, term_over: threading.Event, recorder) -> bool:
    """One term: connect, resume from the persisted state, step while leading. True if the job is done."""
    from core.transport import MqttLink
    from server.aggregator import Aggregator
    from server.store import StaleTerm

    # One client id for every replica: the broker hands the session (and the updates queued
    # while no aggregator was connected) to the new leader, and drops an old one still on. A
    # sharded worker's is its shard's, so a restarted worker gets what was queued for it.
    shard = cfg.shards.shard_index() if cfg.shards.role == "worker" else -1
    client_id = f"fedlora-{cfg.job}-aggregator" if shard < 0 else f"fedlora-{cfg.job}-worker-{shard}"
    link = MqttLink(cfg.broker, client_id=client_id)
    current["link"] = link
    try:
        link.connect_retrying(term_over)
        if term_over.is_set() or not leading():
            return False
        aggregator: Aggregator
        if shard >= 0:
            from server.shard_worker import ShardWorker

            aggregator = ShardWorker(cfg, link, shard, metrics)
        else:
            # Under leader election each term claims the store: a deposed leader that still runs
            # (a long pause, a partition) can no longer write.
            aggregator = Aggregator(
                cfg,
                link,
                metrics,
                on_round_closed=recorder.round_closed if recorder else None,
                claim_term=cfg.kubernetes.leader_election,
            )
        current["aggregator"] = aggregator
        return aggregator.run(term_over, leading=leading, exit_when_finished=cfg.exit_when_finished)
    except StaleTerm as exc:
        logging.getLogger("fedlora.server").error("stopped leading: %s", exc)
        return False
    finally:
        link.close()
        current["link"] = None
        current["aggregator"] = None


if __name__ == "__main__":
    sys.exit(server_main())
