"""Chunked transport through a real Mosquitto whose packet and message limits are smaller
than the update, with chunks dropped, duplicated and reordered, a device that loses its
connection in the middle of an update, and the aggregator asking a real device for the
chunks it is missing. Then the link itself against real Mosquitto: subscriptions the broker
refuses (dynamic-security plugin: 0x87 on MQTT 5, 0x80 on 3.1.1) and the ones it grants but
never serves (acl_file), the bounded inbox (drops counted after a timeout; backpressure for a
slow reader), and on-connect hooks after a broker restart."""

import base64
import hashlib
import json
import os
import queue
import random
import subprocess
import time
from collections import Counter

import numpy as np
import pytest

from core.protocol import (
    Envelope,
    Reassembler,
    Topics,
    decode_envelope,
    encode_envelope,
    message_id,
    split_chunks,
)
from core.transport import BrokerConfig, MqttLink
from tests.test_aggregator import FakeDevice, start_aggregator, update_payload, wait_for

LIMITS = "max_packet_size 20000\nmessage_size_limit 15000\n"


def big_envelope(n=80_000):
    rng = np.random.default_rng(1)
    return encode_envelope(
        Envelope(
            kind="update",
            job="j",
            round=1,
            sender="d1",
            rank=8,
            codec="fp32",
            tensors={"w": rng.normal(size=n).astype(np.float32)},
            num_examples=3,
        )
    )


def receive(link: MqttLink, reassembler: Reassembler, timeout=20.0) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            msg = link.inbox.get(timeout=0.2)
        except Exception:
            continue
        payload = reassembler.add("d1", msg.payload)
        if payload is not None:
            return payload
    raise AssertionError("the update did not arrive")


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_update_larger_than_broker_limits_arrives_whole(mosquitto_factory, protocol):
    broker = mosquitto_factory(LIMITS)
    payload = big_envelope()
    assert len(payload) > 15 * 20000
    # message_size_limit is not announced by the broker: the configured limit must respect it.
    cfg = BrokerConfig(url=broker.url, protocol=protocol, max_packet_size=12000)
    rx = MqttLink(cfg).connect()
    rx.subscribe("fedlora/j/updates/+")
    tx = MqttLink(cfg).connect()
    try:
        time.sleep(0.2)
        chunks = tx.publish_chunked("fedlora/j/updates/d1", payload, timeout=30)
        assert chunks >= len(payload) // 12000
        got = receive(rx, Reassembler(1 << 24))
        assert got == payload
        np.testing.assert_array_equal(decode_envelope(got).tensors["w"], decode_envelope(payload).tensors["w"])
    finally:
        tx.close()
        rx.close()


def test_mqtt5_chunks_below_the_announced_maximum_packet_size(mosquitto_factory):
    broker = mosquitto_factory("max_packet_size 20000\n")
    link = MqttLink(BrokerConfig(url=broker.url, protocol="5")).connect()  # configured limit 128 KiB
    rx = MqttLink(BrokerConfig(url=broker.url, protocol="5")).connect()
    rx.subscribe("fedlora/j/updates/+")
    try:
        assert link.broker_max_packet == 20000
        assert link.max_chunk_data("fedlora/j/updates/d1") < 20000
        payload = big_envelope(30_000)
        time.sleep(0.2)
        link.publish_chunked("fedlora/j/updates/d1", payload, timeout=30)
        assert receive(rx, Reassembler(1 << 24)) == payload
    finally:
        link.close()
        rx.close()


def test_dropped_duplicated_reordered_chunks_still_give_the_exact_update(mosquitto_factory):
    broker = mosquitto_factory(LIMITS)
    cfg = BrokerConfig(url=broker.url, protocol="5", max_packet_size=12000)
    rx = MqttLink(cfg).connect()
    rx.subscribe("fedlora/j/updates/+")
    tx = MqttLink(cfg).connect()
    payload = big_envelope()
    chunks = split_chunks(payload, tx.max_chunk_data("fedlora/j/updates/d1"))
    rng = random.Random(7)
    first = [c for i, c in enumerate(chunks) if i not in (1, 4)]  # two lost
    first += rng.sample(first, 5)  # five duplicated
    rng.shuffle(first)  # all reordered
    reassembler = Reassembler(1 << 24)
    try:
        time.sleep(0.2)
        for c in first:
            tx.publish("fedlora/j/updates/d1", c).wait_for_publish(5)
        time.sleep(0.5)
        while not rx.inbox.empty():
            assert reassembler.add("d1", rx.inbox.get().payload) is None  # incomplete: two missing
        resend = list(chunks)
        rng.shuffle(resend)  # the device resends the whole update, in any order
        for c in resend:
            tx.publish("fedlora/j/updates/d1", c).wait_for_publish(5)
        assert receive(rx, reassembler) == payload
        time.sleep(0.3)
        while not rx.inbox.empty():  # what is left is duplicates of a delivered message
            assert reassembler.add("d1", rx.inbox.get().payload) is None
    finally:
        tx.close()
        rx.close()


def test_device_disconnected_mid_update_finishes_it_after_reconnecting(tmp_path, minilm_bundle, mosquitto):
    from core.bundle import Bundle

    bundle = Bundle(minilm_bundle)
    agg, stop, thread, link = start_aggregator(minilm_bundle, tmp_path / "state", mosquitto.url, job="cut", rounds=1)
    dev = FakeDevice(mosquitto.url, "cut", "d1")
    try:
        dev.online()
        rnd = wait_for(dev.open_round, what="round 1")["round"]
        payload = update_payload(bundle, "cut", "d1", rnd)
        chunks = split_chunks(payload, 20_000)
        for c in chunks[: len(chunks) // 2]:
            dev.link.publish(dev.topics.update("d1"), c).wait_for_publish(5)
        dev.link.close()  # the link drops mid-update
        time.sleep(0.5)
        assert agg.coordinator.completed == 0 and agg.reassembler.pending_count() == 1
        dev2 = FakeDevice(mosquitto.url, "cut", "d1")  # back online: resend the pending update
        dev2.send(payload, chunk=20_000)
        wait_for(lambda: agg.coordinator.completed == 1, what="the round to complete")
        wait_for(lambda: dev2.ack_count() >= 1, what="the ack")
        assert dev2.acks[-1]["result"] == "accepted"
        assert [e["event"] for e in agg.store.events()].count("update_accepted") == 1
        dev2.link.close()
    finally:
        stop.set()
        thread.join(10)
        link.close()


def test_aggregator_asks_for_missing_chunks_and_the_device_resends_only_those(tmp_path, minilm_bundle, mosquitto):
    from conftest import BBC_LABELS

    from core.bundle import Bundle
    from edge_client.device import Device, DeviceConfig

    job, topics = "repair", Topics("repair")
    agg, stop, thread, link = start_aggregator(
        minilm_bundle, tmp_path / "state", mosquitto.url, job=job, rounds=1, chunk_repair_after_s=1.0
    )
    data = tmp_path / "local.csv"
    data.write_text("text,label\n" + "".join(f"story {i},{BBC_LABELS[i % 5]}\n" for i in range(20)))
    dev = Device(
        DeviceConfig(
            device_id="d1",
            job=job,
            bundle=minilm_bundle,
            data=data,
            state_dir=tmp_path / "dev",
            broker=BrokerConfig(url=mosquitto.url, protocol="3.1.1", max_packet_size=20_000),
        )
    )
    spy = MqttLink(BrokerConfig(url=mosquitto.url, protocol="3.1.1")).connect()
    spy.subscribe(topics.update("d1"))
    try:
        dev.link.connect()
        dev.link.subscribe(topics.round)
        dev.link.subscribe(topics.ack("d1"))
        dev.link.publish(topics.status("d1"), dev.status_payload(), retain=True)

        def pump():
            while not dev.link.inbox.empty():
                msg = dev.link.inbox.get()
                dev.handle(msg.topic, msg.payload)
            ann = dev.announcement
            return ann if ann and ann.is_open else None

        rnd = wait_for(pump, what="round 1").round
        payload = update_payload(Bundle(minilm_bundle), job, "d1", rnd)
        dev.state.set_pending(rnd, payload)
        chunks = split_chunks(payload, dev.link.max_chunk_data(topics.update("d1")))
        assert len(chunks) > 6
        lost = {1, 4, len(chunks) - 1}
        asked_before = time.monotonic()
        for i, c in enumerate(chunks):
            if i not in lost:  # the link loses three chunks
                dev.link.publish(topics.update("d1"), c).wait_for_publish(5)
        dev._sent_whole_at = time.monotonic()  # as send_pending records it
        # A request that waited in the inbox while the whole update went out is stale: ignored.
        stale = {
            "round": rnd,
            "result": "incomplete",
            "msg_id": message_id(payload).hex(),
            "count": len(chunks),
            "missing": sorted(lost),
        }
        dev.handle(topics.ack("d1"), json.dumps(stale).encode(), received_at=asked_before)
        time.sleep(0.3)
        assert agg.reassembler.pending_count() == 1 and spy.inbox.qsize() == len(chunks) - len(lost)
        # The device does not resend on its own here (its 30 s resend is not driven): only the
        # aggregator's request for the missing chunks can complete the update.
        wait_for(lambda: (pump(), dev.state.pending_round is None)[1], what="the device's ack")
        events = [e["event"] for e in agg.store.events()]
        assert events.count("update_accepted") == 1 and "update_rejected" not in events, events
        wait_for(lambda: agg.coordinator.completed == 1, what="the round to complete")
        assert agg.metrics.chunk_repairs._value.get() >= 1 and agg.metrics.chunks_requested._value.get() >= len(lost)
        time.sleep(0.3)
        seen = []
        while not spy.inbox.empty():
            seen.append(spy.inbox.get().payload)
        assert sorted(set(seen)) == sorted(chunks)
        # Nothing the aggregator held was sent again: extra copies (a re-ask on a slow machine) are of lost chunks only.
        assert set(Counter(seen) - Counter(chunks)) <= {chunks[i] for i in lost}
        # A request for a message the device no longer holds is ignored.
        dev.handle(
            topics.ack("d1"),
            json.dumps({"result": "incomplete", "msg_id": os.urandom(16).hex(), "count": 3, "missing": [0]}).encode(),
        )
        time.sleep(0.3)
        assert spy.inbox.empty()
    finally:
        stop.set()
        thread.join(10)
        link.close()
        dev.link.close()
        spy.close()


# -- refused subscriptions, the bounded inbox, reconnects ---------------------------------
def dynsec_client(username: str, password: str, roles: list[str]) -> dict:
    """A client entry of Mosquitto's dynamic-security JSON (PBKDF2-SHA512, as mosquitto_ctrl writes it)."""
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101)
    return {
        "username": username,
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": 101,
        "roles": [{"rolename": r} for r in roles],
    }


def dynsec_broker(mosquitto_factory, tmp_path):
    """Mosquitto with its dynamic-security plugin, which checks subscriptions at SUBSCRIBE time:
    the device may read the round, not the deltas; the admin may change roles."""
    plugin = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"
    if not os.path.exists(plugin):
        pytest.skip(f"{plugin} is missing (Debian's mosquitto package ships it)")
    config = {
        "clients": [
            dynsec_client("admin", "admin-pw", ["admin"]),
            dynsec_client("dev1", "pw1", ["device"]),
            dynsec_client("agg", "agg-pw", ["aggregator"]),
        ],
        "roles": [
            {
                "rolename": "admin",
                "acls": [
                    {"acltype": "publishClientSend", "topic": "$CONTROL/dynamic-security/#", "allow": True},
                    {"acltype": "publishClientReceive", "topic": "$CONTROL/dynamic-security/#", "allow": True},
                    {"acltype": "subscribePattern", "topic": "$CONTROL/dynamic-security/#", "allow": True},
                ],
            },
            {
                "rolename": "device",
                "acls": [
                    {"acltype": "subscribePattern", "topic": "fedlora/j/round", "allow": True},
                    {"acltype": "publishClientReceive", "topic": "fedlora/j/#", "allow": True},
                ],
            },
            {
                "rolename": "aggregator",
                "acls": [{"acltype": "publishClientSend", "topic": "fedlora/j/#", "allow": True}],
            },
        ],
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": False,
            "subscribe": False,
            "unsubscribe": True,
        },
    }
    path = tmp_path / "dynamic-security.json"
    path.write_text(json.dumps(config))
    return mosquitto_factory(f"allow_anonymous false\nplugin {plugin}\nplugin_opt_config_file {path}\n")


@pytest.mark.parametrize("protocol, code", [("5", 0x87), ("3.1.1", 0x80)])
def test_a_refused_subscription_is_reported_and_cleared_once_granted(
    mosquitto_factory, tmp_path, caplog, protocol, code
):
    broker = dynsec_broker(mosquitto_factory, tmp_path)
    link = MqttLink(BrokerConfig(url=broker.url, protocol=protocol, username="dev1", password="pw1")).connect()
    admin = MqttLink(BrokerConfig(url=broker.url, protocol="5", username="admin", password="admin-pw")).connect()
    agg = MqttLink(BrokerConfig(url=broker.url, protocol="5", username="agg", password="agg-pw")).connect()
    refused = []
    link.on_subscribe_refused_hooks.append(lambda topic, reason: refused.append((topic, reason)))
    try:
        with caplog.at_level("ERROR", logger="fedlora.transport"):
            link.subscribe("fedlora/j/round")
            link.subscribe("fedlora/j/gdelta/8/+")
            wait_for(lambda: refused, what="the SUBACK refusing the delta subscription")
        assert refused == [("fedlora/j/gdelta/8/+", link.refused_subscriptions["fedlora/j/gdelta/8/+"])]
        assert list(link.refused_subscriptions) == ["fedlora/j/gdelta/8/+"]  # the round was granted
        assert f"(0x{code:02x})" in refused[0][1]
        assert ("Not authorized" if protocol == "5" else "Unspecified error") in refused[0][1]
        errors = [r for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and "fedlora/j/gdelta/8/+" in errors[0].getMessage()
        agg.publish("fedlora/j/round", b"open").wait_for_publish(5)
        agg.publish("fedlora/j/gdelta/8/0", b"delta").wait_for_publish(5)
        msg = link.inbox.get(timeout=5)
        assert msg.topic == "fedlora/j/round"
        time.sleep(0.3)
        assert link.inbox.empty()  # the refused subscription delivers nothing

        # The operator fixes the ACL; the next subscription to the topic is granted and clears it.
        command = {
            "commands": [
                {
                    "command": "addRoleACL",
                    "rolename": "device",
                    "acltype": "subscribePattern",
                    "topic": "fedlora/j/gdelta/#",
                    "allow": True,
                }
            ]
        }
        admin.publish("$CONTROL/dynamic-security/v1", json.dumps(command).encode()).wait_for_publish(5)
        time.sleep(0.3)
        link.resubscribe("fedlora/j/gdelta/8/+")
        wait_for(lambda: not link.refused_subscriptions, what="the granted subscription to clear the refusal")
        agg.publish("fedlora/j/gdelta/8/0", b"delta").wait_for_publish(5)
        assert link.inbox.get(timeout=5).payload == b"delta"
        assert len(refused) == 1
    finally:
        for c in (link, admin, agg):
            c.close()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_mosquitto_acl_file_grants_a_subscription_it_will_not_serve(mosquitto_factory, tmp_path, protocol):
    """What is not detectable: Mosquitto 2's acl_file grants every SUBSCRIBE (both protocols) and
    filters at delivery, so the link sees no refusal and the messages never come."""
    acl = tmp_path / "acl"
    acl.write_text("user agg\ntopic write fedlora/#\n\npattern read fedlora/+/round\n")
    passwd = tmp_path / "passwd"
    passwd.write_text("agg:agg-pw\ndev1:pw1\n")
    subprocess.run(["mosquitto_passwd", "-U", str(passwd)], check=True)
    broker = mosquitto_factory(f"allow_anonymous false\npassword_file {passwd}\nacl_file {acl}\n")
    link = MqttLink(BrokerConfig(url=broker.url, protocol=protocol, username="dev1", password="pw1")).connect()
    agg = MqttLink(BrokerConfig(url=broker.url, protocol="5", username="agg", password="agg-pw")).connect()
    granted = []
    link.client.on_subscribe = lambda *a: (granted.append(a[3]), link._on_subscribe(*a))
    try:
        link.subscribe("fedlora/j/gdelta/8/+")
        link.subscribe("fedlora/j/round")
        wait_for(lambda: len(granted) == 2, what="two SUBACKs")
        assert [rc.value for rcs in granted for rc in rcs] == [1, 1] and link.refused_subscriptions == {}
        agg.publish("fedlora/j/gdelta/8/0", b"delta").wait_for_publish(5)
        agg.publish("fedlora/j/round", b"open").wait_for_publish(5)
        assert link.inbox.get(timeout=5).topic == "fedlora/j/round"
        time.sleep(0.3)
        assert link.inbox.empty()  # the delta was dropped at delivery
    finally:
        link.close()
        agg.close()


def test_a_full_inbox_drops_after_the_timeout_counts_and_warns_once(mosquitto, caplog):
    rx = MqttLink(BrokerConfig(url=mosquitto.url, protocol="5"), inbox_max=3, inbox_put_timeout=0.2).connect()
    tx = MqttLink(BrokerConfig(url=mosquitto.url, protocol="5")).connect()
    try:
        rx.subscribe("fedlora/j/updates/+")
        time.sleep(0.2)
        with caplog.at_level("WARNING", logger="fedlora.transport"):
            for i in range(10):
                tx.publish("fedlora/j/updates/d1", str(i).encode())
            wait_for(lambda: rx.inbox_dropped == 7, timeout=20, what="seven drops")
            time.sleep(0.5)
        assert rx.inbox_dropped == 7 and rx.inbox.qsize() == 3
        assert [rx.inbox.get_nowait().payload for _ in range(3)] == [b"0", b"1", b"2"]  # the oldest are kept
        warnings = [r for r in caplog.records if "inbox full" in r.getMessage()]
        assert len(warnings) == 1  # rate-limited: one warning for the burst
        assert rx.connected.is_set() and rx.reconnects == 0
        tx.publish("fedlora/j/updates/d1", b"after").wait_for_publish(5)
        assert rx.inbox.get(timeout=5).payload == b"after"  # room again: delivered
    finally:
        rx.close()
        tx.close()


def test_a_slow_reader_gets_backpressure_not_losses(mosquitto):
    """A full inbox blocks paho's thread (no PUBACK, so the broker holds the rest) while the
    owner drains it within the timeout: every QoS 1 message arrives, in order."""
    rx = MqttLink(BrokerConfig(url=mosquitto.url, protocol="5"), inbox_max=2, inbox_put_timeout=5.0).connect()
    tx = MqttLink(BrokerConfig(url=mosquitto.url, protocol="5")).connect()
    try:
        rx.subscribe("fedlora/j/updates/+")
        time.sleep(0.2)
        infos = [tx.publish("fedlora/j/updates/d1", str(i).encode()) for i in range(40)]
        got = []
        deadline = time.monotonic() + 30
        while len(got) < 40 and time.monotonic() < deadline:
            try:
                got.append(rx.inbox.get(timeout=1).payload)
            except queue.Empty:
                continue
            assert rx.inbox.qsize() <= 2
            time.sleep(0.02)  # a slow owner
        assert got == [str(i).encode() for i in range(40)] and rx.inbox_dropped == 0
        for info in infos:
            info.wait_for_publish(5)
    finally:
        rx.close()
        tx.close()


def test_inbox_size_must_be_positive():
    from core.errors import ConfigError

    with pytest.raises(ConfigError):
        MqttLink(BrokerConfig(), inbox_max=0)
    assert MqttLink(BrokerConfig()).inbox.maxsize == 10_000
    assert MqttLink(BrokerConfig(keepalive=6), inbox_put_timeout=30).inbox_put_timeout == 2.0  # < keepalive


def test_on_connect_hooks_run_again_after_the_broker_restarts(mosquitto):
    import subprocess as sp

    link = MqttLink(BrokerConfig(url=mosquitto.url, protocol="5"))
    runs = []
    link.on_connect_hooks.append(lambda: runs.append(time.monotonic()))
    link.connect()
    link.subscribe("fedlora/j/round")
    restarted = None
    try:
        assert len(runs) == 1 and link.reconnects == 0
        mosquitto.proc.terminate()
        mosquitto.proc.wait(10)
        wait_for(lambda: not link.connected.is_set(), what="the link to notice the broker is gone")
        # The same broker, same port (no persistence: the session and subscriptions are gone).
        binary = mosquitto.proc.args[0]
        restarted = sp.Popen(
            [binary, "-c", str(mosquitto.workdir / "mosquitto.conf")], stdout=mosquitto.log, stderr=sp.STDOUT
        )
        wait_for(lambda: link.connected.is_set(), timeout=30, what="paho to reconnect")
        wait_for(lambda: len(runs) == 2, what="the hook to run again")
        assert link.reconnects == 1
        tx = MqttLink(BrokerConfig(url=mosquitto.url, protocol="5")).connect()
        tx.publish("fedlora/j/round", b"open").wait_for_publish(5)
        assert link.inbox.get(timeout=5).payload == b"open"  # subscribed again after the restart
        tx.close()
    finally:
        link.close()
        if restarted is not None:
            restarted.terminate()
            restarted.wait(10)
            mosquitto.proc = restarted  # the fixture's stop() waits on it again: harmless
