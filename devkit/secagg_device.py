"""A secure-aggregation participant without a trainer, for tests and benchmarks (and, in a job
without secure aggregation, a plain one sending the same change as an fp32 update).

``ProtocolDevice`` speaks the real protocol over a real broker (``core.transport.MqttLink``):
status, the round announcement, the device's own ``edge_client.secure_update.SecureSession``
(keys, shares, masked input, reveal), acks. Its "training" is a fixed change the caller gives,
so a test knows exactly what the aggregator must sum; ``drop`` makes it leave at a chosen step.
The edge client (``edge_client.device.Device``) runs the same session around ONNX Runtime training.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np

from core.messages import (
    Presence,
    SecaggChannel,
    Status,
    TopicKind,
    parse_ack,
    parse_announcement,
    parse_secagg_forward,
    parse_secagg_key_list,
    parse_secagg_unmask,
)
from core.protocol import Envelope, Topics, encode_envelope, split_chunks
from core.transport import BrokerConfig, MqttLink
from edge_client.secure_update import SecureSession

DROP_STEPS = ("", "before_keys", "after_shares", "before_reveal")


class ProtocolDevice:
    """One device of a secure round with a given change ``update(round) -> tensors``.

    drop: ``after_shares`` goes offline once its shares are forwarded, before its masked input
    (the dropout SecAgg recovers from with Shamir shares); ``before_reveal`` sends its masked
    input but never reveals; ``before_keys`` never takes part. ``codes`` keeps each round's
    ring codes before masking (what the unmasked sum must add up to). ``hold``: the masked input
    waits until this event is set."""

    def __init__(
        self,
        url: str,
        job: str,
        device_id: str,
        update: Callable[[int], dict[str, np.ndarray]],
        drop: str = "",
        rank: int = 4,
        seed: int = 0,
        hold: threading.Event | None = None,
    ):
        assert drop in DROP_STEPS
        self.job, self.id, self.update, self.drop, self.rank = job, device_id, update, drop, rank
        self.topics = Topics(job)
        will = (self.topics.status(device_id), Status(Presence.OFFLINE).to_bytes())
        self.link = MqttLink(BrokerConfig(url=url, protocol="3.1.1"), client_id=f"pd-{job}-{device_id}", will=will)
        self.session: SecureSession | None = None
        self.codes: dict[int, np.ndarray] = {}
        self.acks: list = []
        self.sent_bytes = 0  # every payload this device published (secagg steps and update chunks)
        self.received_bytes = 0  # the secagg messages it received (key list, forward, unmask request)
        self.errors: list[str] = []
        self.rng = np.random.default_rng(seed)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._done_rounds: set[int] = set()
        self.hold = hold

    def start(self) -> ProtocolDevice:
        self.link.connect()
        for topic in (
            self.topics.round,
            self.topics.ack(self.id),
            self.topics.secagg_round("keys"),
            self.topics.secagg_round("unmask"),
            self.topics.secagg_to(self.id),
        ):
            self.link.subscribe(topic)
        self.link.publish(self.topics.status(self.id), Status(Presence.ONLINE, self.rank, 10).to_bytes(), retain=True)
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"device-{self.id}")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self.link.close()

    def go_offline(self) -> None:
        self.link.publish(self.topics.status(self.id), Status(Presence.OFFLINE).to_bytes(), retain=True)
        self._stop.set()

    def _send(self, topic: str, payload: bytes) -> None:
        self.sent_bytes += len(payload)
        self.link.publish(topic, payload)

    def _run(self) -> None:
        while not self._stop.is_set():
            s = self.session
            if s is not None and s.ready() and (self.hold is None or self.hold.is_set()):
                self._send_masked(s)
            try:
                msg = self.link.inbox.get(timeout=0.05)
            except Exception:
                continue
            try:
                self._handle(msg.topic, msg.payload)
            except Exception as exc:  # a test reads these: a device must never hit one
                self.errors.append(f"{type(exc).__name__}: {exc}")

    def _handle(self, topic: str, payload: bytes) -> None:
        if not payload:
            return
        ref = self.topics.parse(topic)
        s = self.session
        if ref.kind is TopicKind.SECAGG:
            self.received_bytes += len(payload)
        if ref.kind is TopicKind.ROUND:
            ann = parse_announcement(payload)
            if ann.is_open and not ann.secagg and self.id in ann.selected and ann.round not in self._done_rounds:
                self._send_plain(ann)
            elif ann.is_open and ann.secagg and self.id in ann.selected and ann.round not in self._done_rounds:
                if s is None or s.round != ann.round:
                    if self.drop == "before_keys":
                        return
                    self.session = SecureSession(self.job, ann.round, self.id)
                    self.session.update = Envelope(
                        kind="update",
                        job=self.job,
                        round=ann.round,
                        sender=self.id,
                        rank=self.rank,
                        codec="fp32",
                        tensors=self.update(ann.round),
                        base_version=ann.global_version,
                    )
                    self._send(self.topics.secagg(self.id), self.session.keys_message().to_bytes())
        elif ref.kind is TopicKind.ACK:
            self.acks.append(parse_ack(payload))
        elif ref.kind is TopicKind.SECAGG and s is not None:
            if ref.channel is SecaggChannel.KEYS:
                key_list = parse_secagg_key_list(payload)
                if key_list.round == s.round:
                    shares = s.take_key_list(key_list)
                    if shares is not None:
                        self._send(self.topics.secagg(self.id), shares.to_bytes())
            elif ref.channel is SecaggChannel.TO:
                forward = parse_secagg_forward(payload)
                if forward.round == s.round:
                    s.take_forward(forward)
                    if self.drop == "after_shares":
                        self.go_offline()
                        return
                    if self.hold is None or self.hold.is_set():
                        self._send_masked(s)
            elif ref.channel is SecaggChannel.UNMASK:
                request = parse_secagg_unmask(payload)
                if request.round == s.round and self.drop != "before_reveal":
                    revealed = s.take_unmask(request)
                    if revealed is not None:
                        self._send(self.topics.secagg(self.id), revealed.to_bytes())
                        self._done_rounds.add(s.round)

    def _send_plain(self, ann) -> None:
        """Without secure aggregation: the same change as a plain fp32 update (the baseline)."""
        env = Envelope(
            kind="update",
            job=self.job,
            round=ann.round,
            sender=self.id,
            rank=self.rank,
            codec="fp32",
            tensors=self.update(ann.round),
            num_examples=10,
            base_version=ann.global_version,
        )
        for chunk in split_chunks(encode_envelope(env), 64 * 1024):
            self._send(self.topics.update(self.id), chunk)
        self._done_rounds.add(ann.round)

    def _send_masked(self, s: SecureSession) -> None:
        if not s.ready():
            return
        # The codes before masking, drawn with the same generator the session will use.
        state = self.rng.bit_generator.state
        from core.secagg import Quantizer, flatten

        assert s.update is not None
        self.codes[s.round] = Quantizer(s.clip, s.devices).encode(flatten(s.update.tensors), self.rng)
        self.rng.bit_generator.state = state
        payload = encode_envelope(s.masked_update(self.rng))
        for chunk in split_chunks(payload, 64 * 1024):
            self._send(self.topics.update(self.id), chunk)


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
