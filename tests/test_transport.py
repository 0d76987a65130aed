"""Chunked transport through a real Mosquitto whose packet and message limits are smaller
than the update, with chunks dropped, duplicated and reordered, a device that loses its
connection in the middle of an update, and the aggregator asking a real device for the
chunks it is missing."""

import json
import os
import random
import time
from collections import Counter

import numpy as np
import pytest

from edge_client.protocol import (
    Envelope, Reassembler, Topics, decode_envelope, encode_envelope, message_id, split_chunks,
)
from edge_client.transport import BrokerConfig, MqttLink
from tests.test_aggregator import FakeDevice, start_aggregator, update_payload, wait_for

LIMITS = "max_packet_size 20000\nmessage_size_limit 15000\n"


def big_envelope(n=80_000):
    rng = np.random.default_rng(1)
    return encode_envelope(Envelope(kind="update", job="j", round=1, sender="d1", rank=8, codec="fp32",
                                    tensors={"w": rng.normal(size=n).astype(np.float32)}, num_examples=3))


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
    from edge_client.bundle import Bundle

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
    from edge_client.bundle import Bundle
    from edge_client.device import Device, DeviceConfig

    job, topics = "repair", Topics("repair")
    agg, stop, thread, link = start_aggregator(minilm_bundle, tmp_path / "state", mosquitto.url, job=job, rounds=1,
                                               chunk_repair_after_s=1.0)
    data = tmp_path / "local.csv"
    data.write_text("text,label\n" + "".join(f"story {i},{BBC_LABELS[i % 5]}\n" for i in range(20)))
    dev = Device(DeviceConfig(device_id="d1", job=job, bundle=minilm_bundle, data=data, state_dir=tmp_path / "dev",
                              broker=BrokerConfig(url=mosquitto.url, protocol="3.1.1", max_packet_size=20_000)))
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
            return ann if ann and ann.get("state") == "open" else None

        rnd = wait_for(pump, what="round 1")["round"]
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
        stale = {"round": rnd, "result": "incomplete", "msg_id": message_id(payload).hex(), "count": len(chunks),
                 "missing": sorted(lost)}
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
        dev.handle(topics.ack("d1"), json.dumps({"result": "incomplete", "msg_id": os.urandom(16).hex(), "count": 3,
                                                 "missing": [0]}).encode())
        time.sleep(0.3)
        assert spy.inbox.empty()
    finally:
        stop.set()
        thread.join(10)
        link.close()
        dev.link.close()
        spy.close()
