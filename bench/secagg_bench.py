"""Secure aggregation's cost (core/secagg.py), in one process: bytes and seconds of one round
against plain aggregation, at 10 and 100 devices, with devices dropping after masking.

Per device: two key pairs, Shamir shares of two 32-byte secrets sealed for every peer, the
quantized update masked with every pairwise mask; the aggregator: the ring sum, rebuilding the
survivors' self seeds and the dropped devices' mask keys, and removing their masks. The update
is a MiniLM-L6 rank-8 adapter's size (``--values``). Compute is measured per step and summed
over devices (a real fleet runs the device steps in parallel: the per-device column is what one
device spends). Bytes are what crosses the broker beyond the update itself (the masked input
is one uint32 a value, the same 4 bytes as fp32).

    .venv/bin/python bench/secagg_bench.py [--values 73733] [--write-docs]

``--e2e`` measures whole rounds instead: the real aggregator (``server.aggregator``) and a real
Mosquitto, with ``devkit.secagg_device.ProtocolDevice`` participants in this process (every
message of the protocol over MQTT, the device's own ``SecureSession``; no ONNX training, so the
round time is the protocol's), one plain round and one secure round per device count, the
MiniLM-L6 rank-4 test bundle's adapter as the update. It writes its own section:

    .venv/bin/python bench/secagg_bench.py --e2e --devices 10,100 [--write-docs]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.secagg import (  # noqa: E402
    SEALED_BYTES,
    Quantizer,
    combine_secret,
    masked_input,
    new_keys,
    open_shares,
    reveal,
    ring_sum,
    seal_shares,
    unmask,
)
from devkit.docsection import DocSection, command_line  # noqa: E402

DOC_SECTION = DocSection("secagg_bench", "bench/secagg_bench.py", "## Secure aggregation: overhead")
E2E_SECTION = DocSection(
    "secagg_bench:e2e", "bench/secagg_bench.py", "## Secure aggregation: whole rounds through Mosquitto"
)
JOB, ROUND = "bench", 1


def one_round(n: int, dropped: int, values: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    devices = [f"dev{i:03d}" for i in range(n)]
    threshold = max(2, n // 2 + 1)
    q = Quantizer(clip=0.05, max_devices=n)
    updates = {d: rng.normal(0, 0.005, values) for d in devices}
    t = {"keys": 0.0, "shares": 0.0, "open": 0.0, "mask": 0.0, "reveal": 0.0}
    start = time.perf_counter()
    keys = {d: new_keys() for d in devices}
    seeds = {d: rng.bytes(32) for d in devices}
    t["keys"] = time.perf_counter() - start
    held: dict[str, dict] = {d: {} for d in devices}
    for d in devices:
        start = time.perf_counter()
        sealed = seal_shares(
            d, keys[d], seeds[d], {p: keys[p].cipher_public for p in devices if p != d}, threshold, JOB, ROUND
        )
        t["shares"] += time.perf_counter() - start
        start = time.perf_counter()
        for peer, box in sealed.items():
            held[peer][d] = open_shares(peer, keys[peer], d, keys[d].cipher_public, box, JOB, ROUND)
        t["open"] += time.perf_counter() - start
    drop = set(devices[:dropped])
    mask_public = {d: keys[d].mask_public for d in devices}
    masked = {}
    for d in devices:
        if d in drop:
            continue
        start = time.perf_counter()
        masked[d] = masked_input(
            q.encode(updates[d], rng), d, keys[d], seeds[d], {p: mask_public[p] for p in devices if p != d}, JOB, ROUND
        )
        t["mask"] += time.perf_counter() - start
    survivors = sorted(masked)
    start = time.perf_counter()
    revealed = {s: reveal(held[s], survivors, drop) for s in survivors}
    t["reveal"] = time.perf_counter() - start
    start = time.perf_counter()
    total = ring_sum(masked.values())
    # The aggregator needs only the first `threshold` shares of each secret (Shamir is O(t^2)).
    self_seeds = {
        u: combine_secret([revealed[s][u] for s in survivors if s != u][:threshold], threshold) for u in survivors
    }
    mask_secrets = {g: combine_secret([revealed[s][g] for s in survivors][:threshold], threshold) for g in drop}
    peers_of = {d: [p for p in devices if p != d] for d in devices}
    result = unmask(total, self_seeds, mask_secrets, peers_of, mask_public, JOB, ROUND)
    aggregator_s = time.perf_counter() - start
    start = time.perf_counter()
    plain_sum = sum(updates[d] for d in survivors)
    plain_s = time.perf_counter() - start
    error = float(np.max(np.abs(q.decode(result) - plain_sum)))
    assert error <= len(survivors) / q.scale + 1e-12, error
    extra_up = 64 + (n - 1) * SEALED_BYTES + (n - 1) * 33  # keys, sealed shares, revealed shares
    extra_down = n * 64 + (n - 1) * SEALED_BYTES + 8 * n  # everyone's keys, shares for it, the survivor list
    device_s = (t["keys"] + t["shares"] + t["open"] + t["mask"] + t["reveal"]) / n
    return {
        "devices": n,
        "dropped": dropped,
        "threshold": threshold,
        "device_s": device_s,
        "mask_s": t["mask"] / max(1, len(survivors)),
        "aggregator_s": aggregator_s,
        "plain_sum_s": plain_s,
        "extra_up_bytes": extra_up,
        "extra_down_bytes": extra_down,
        "update_bytes": 4 * values,
        "max_error": error,
        "bound": len(survivors) / q.scale,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| devices | dropped after masking | threshold | device compute (per device) | of it, masking | aggregator unmask | plain sum | extra uplink per device | extra downlink per device | update | max error / bound |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['devices']} | {r['dropped']} | {r['threshold']} | {r['device_s'] * 1000:.0f} ms | {r['mask_s'] * 1000:.0f} ms | "
            f"{r['aggregator_s'] * 1000:.0f} ms | {r['plain_sum_s'] * 1000:.1f} ms | {r['extra_up_bytes'] / 1024:.1f} KiB | "
            f"{r['extra_down_bytes'] / 1024:.1f} KiB | {r['update_bytes'] / 1024:.0f} KiB | {r['max_error']:.2g} / {r['bound']:.2g} |"
        )
    return "\n".join(lines)


# -- end to end: the aggregator and a broker --------------------------------------------------
def start_mosquitto(workdir: Path):
    """A loopback Mosquitto (Debian's ``mosquitto``) with a generated config; returns (process, url)."""
    import os
    import shutil
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    conf = workdir / "mosquitto.conf"
    user = "user root\n" if os.geteuid() == 0 else ""
    conf.write_text(f"{user}listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_connections -1\n")
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"mqtt://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("mosquitto did not start")


def e2e_round(bundle_dir: Path, n: int, secure: bool, dropped: int, workdir: Path) -> dict:
    """One round of n devices through Mosquitto and the real aggregator: its duration, the
    bytes every device sent and received beyond the global adapter, and the aggregator's work."""
    import threading

    from core.bundle import Bundle
    from core.transport import BrokerConfig, MqttLink
    from devkit.secagg_device import ProtocolDevice
    from server.aggregator import Aggregator
    from server.config import ServerConfig, TrainSettings
    from server.rounds import RoundSettings
    from server.secure_rounds import SecureAggregationSettings

    manifest = Bundle(bundle_dir).manifest
    rng = np.random.default_rng(n)
    ups = {
        f"dev{i:03d}": {p.name: rng.uniform(-0.01, 0.01, p.shape).astype(np.float32) for p in manifest.trainable}
        for i in range(n)
    }
    proc, url = start_mosquitto(workdir)
    tag = f"{'secure' if secure else 'plain'}-{n}-{dropped}"
    broker = BrokerConfig(url=url, protocol="3.1.1")
    cfg = ServerConfig(
        job=f"bench-{tag}",
        bundle=bundle_dir,
        state_dir=workdir / f"state-{tag}",
        http_port=0,
        broker=broker,
        rounds=RoundSettings(rounds=1, min_devices=n, round_timeout=3600, norm_clip_multiple=0),
        train=TrainSettings(local_steps=1),
        secure_aggregation=SecureAggregationSettings(enabled=secure, value_clip=0.05, setup_timeout_s=600),
    )
    link = MqttLink(broker, client_id=f"agg-{tag}").connect()
    agg = Aggregator(cfg, link)
    stop = threading.Event()
    thread = threading.Thread(target=agg.run, args=(stop,), daemon=True)
    drop = set(list(ups)[1 : 1 + dropped])
    devices = [
        ProtocolDevice(url, cfg.job, d, lambda r, d=d: ups[d], drop="after_shares" if d in drop else "", seed=i)
        for i, d in enumerate(ups)
    ]
    try:
        for dev in devices:
            dev.start()
        thread.start()
        deadline = time.monotonic() + 3600
        while not agg.history and time.monotonic() < deadline:
            time.sleep(0.1)
        row = agg.history[0]
        assert row["ok"], row
        errors = [e for d in devices for e in d.errors]
        assert not errors, errors[:3]
        return {
            "devices": n,
            "mode": "secure" if secure else "plain",
            "dropped": dropped,
            "round_s": row["duration_s"],
            "unmask_s": row.get("secagg", {}).get("unmask_s", 0.0),
            "up_bytes": sum(d.sent_bytes for d in devices) / n,
            "down_bytes": sum(d.received_bytes for d in devices) / n,
            "update_bytes": 4 * sum(p.size for p in manifest.trainable),
        }
    finally:
        stop.set()
        thread.join(30)
        link.close()
        for dev in devices:
            dev.stop()
        proc.terminate()
        proc.wait(10)


def e2e_table(rows: list[dict]) -> str:
    lines = [
        "| devices | aggregation | dropped after masking | round time | of it, unmasking | uplink per device | secagg downlink per device | vs plain: time, bytes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    plain = {r["devices"]: r for r in rows if r["mode"] == "plain"}
    for r in rows:
        base = plain.get(r["devices"])
        total = r["up_bytes"] + r["down_bytes"]
        ratio = (
            f"{r['round_s'] / base['round_s']:.1f}x, {total / (base['up_bytes'] + base['down_bytes']):.3f}x"
            if base is not None and r is not base
            else "1x, 1x"
        )
        lines.append(
            f"| {r['devices']} | {r['mode']} | {r['dropped']} | {r['round_s']:.2f} s | {r['unmask_s']:.2f} s | "
            f"{r['up_bytes'] / 1024:.1f} KiB | {r['down_bytes'] / 1024:.1f} KiB | {ratio} |"
        )
    return "\n".join(lines)


def e2e(args, argv) -> int:
    import tempfile

    from devkit.assets import minilm_bbc_export

    bundle_dir = minilm_bbc_export() / "r4"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.devices:
            for secure, dropped in ((False, 0), (True, 0), (True, max(1, n // 10))):
                work = Path(tmp) / f"{n}-{secure}-{dropped}"
                work.mkdir()
                t0 = time.perf_counter()
                rows.append(e2e_round(bundle_dir, n, secure, dropped, work))
                print(f"[secagg_bench] {rows[-1]} ({time.perf_counter() - t0:.0f} s)", flush=True)
    body = e2e_table(rows) + (
        f"\n\nOne round each, the MiniLM-L6 rank-4 test adapter ({rows[0]['update_bytes'] / 1024:.0f} KiB as fp32) "
        "as every device's change, all devices in one process with the aggregator (their compute adds up on "
        "this machine's 2 cores, where a fleet would run it in parallel), the global adapter's download left "
        "out (the same in both). Uplink: every payload a device publishes (the update or masked input in "
        "64 KiB chunks; keys, sealed shares and its reveal); secagg downlink: the key list, the shares "
        "forwarded to it and the unmask request. Unmasking: rebuilding every survivor's self seed and every "
        "dropped device's mask key from t shares, removing the masks and decoding."
    )
    command = command_line("bench/secagg_bench.py", argv if argv is not None else sys.argv[1:])
    print(E2E_SECTION.render(command, body))
    if args.write_docs:
        E2E_SECTION.write(command, body)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--values", type=int, default=73_733, help="values in an update (default: MiniLM-L6 r8 q/v + head)")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--e2e", action="store_true", help="whole rounds through Mosquitto and the real aggregator")
    ap.add_argument(
        "--devices",
        type=lambda t: [int(x) for x in t.split(",")],
        default=[10, 100],
        help="--e2e: device counts (default 10,100)",
    )
    args = ap.parse_args(argv)
    if args.e2e:
        return e2e(args, argv)
    rows = [one_round(n, d, args.values) for n, d in ((10, 0), (10, 1), (10, 3), (100, 0), (100, 10), (100, 30))]
    body = table(rows) + (
        "\n\nThe masked input is as large as an fp32 update (4 bytes a value); what secure aggregation adds is "
        "the keys and shares, O(devices) bytes per device, and the pairwise masks, O(devices x values) compute "
        "per device and, for each device that dropped, O(survivors x values) at the aggregator. SecAgg+ "
        "(peers = a random subset of O(log n) devices) would make both O(log n); the core takes the peer sets "
        "as arguments. Unmasking is exact in the ring: the error is the quantization's."
    )
    command = command_line("bench/secagg_bench.py", argv if argv is not None else sys.argv[1:])
    print(DOC_SECTION.render(command, body))
    if args.write_docs:
        DOC_SECTION.write(command, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
