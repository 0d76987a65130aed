"""Thin paho-mqtt adapter shared by the device and the aggregator.

It translates, it does not decide: connect (MQTT 5 when the broker offers it, else 3.1.1),
re-subscribe after every reconnect, publish QoS 1, cut payloads into chunks below the
broker's packet limit, and hand every received message to a bounded queue the owner drains.

Refused subscriptions. A broker that refuses a subscription says so in its SUBACK: reason
code 0x87 (Not authorized) or another code >= 0x80 under MQTT 5, the failure code 0x80
under MQTT 3.1.1. The link logs an ERROR naming the topic, keeps it in
``refused_subscriptions`` until a later subscription to the topic is granted, and calls
``on_subscribe_refused_hooks``. Not every broker refuses at subscribe time: Mosquitto's
``acl_file`` grants every subscription and drops, at delivery, the messages the ACL does not
let the client read, so a subscription it will never serve looks granted (its dynamic
security plugin and EMQX do refuse in the SUBACK). See docs/security.md.

The inbox is bounded (``inbox_max`` messages). When the owner falls behind and it is full,
paho's network thread waits up to ``inbox_put_timeout`` seconds for room: while it waits it
reads nothing more and acknowledges nothing, so the broker stops sending once its in-flight
window is used up (backpressure through the broker and TCP, nothing lost). Waiting forever
would stall the keepalive and the acks of our own publishes, so after that time the message
is dropped, counted in ``inbox_dropped`` and reported in a rate-limited warning; a dropped
QoS 1 message is lost (its PUBACK has been sent). The owner's own retries (a device resends
unacknowledged updates, the aggregator re-asks for missing chunks, retained state is fetched
again) recover from such a loss.
"""

from __future__ import annotations

import logging
import math
import queue
import random
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from core.errors import ConfigError, FedloraError
from core.protocol import CHUNK_HEADER, split_chunks

log = logging.getLogger("fedlora.transport")

PROTOCOLS = ("auto", "5", "3.1.1")
# Room for the fixed header, topic, packet id and MQTT 5 properties inside one packet.
PACKET_OVERHEAD = 512
V5_PROBE_S = 2.0
INBOX_MAX = 10_000
INBOX_PUT_TIMEOUT_S = 5.0
DROP_WARNING_EVERY_S = 10.0


class TransportError(FedloraError):
    """The broker cannot be reached, refused us, or did not acknowledge in time."""


@dataclass
class BrokerConfig:
    """How to reach the broker.

    url: ``mqtt://host:port`` or ``mqtts://host:port`` (TLS).
    protocol: ``auto`` (MQTT 5, falling back to 3.1.1 if refused), ``5`` or ``3.1.1``.
    max_packet_size: the packet limit to chunk below when the broker does not announce one
        (MQTT 5 CONNACK); brokers commonly cap packets, and paho would otherwise send an
        oversize packet and loop on reconnects.
    """

    url: str = "mqtt://127.0.0.1:1883"
    protocol: str = "auto"
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    keepalive: int = 30
    max_packet_size: int = 128 * 1024
    connect_timeout: float = 10.0
    session_expiry: int = 3600

    def __post_init__(self) -> None:
        parsed = urlparse(self.url)
        if parsed.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not parsed.hostname:
            raise ConfigError(f"broker url {self.url!r} must look like mqtt://host:port or mqtts://host:port")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"broker protocol must be one of {PROTOCOLS}, not {self.protocol!r}")
        if self.max_packet_size < 1024:
            raise ConfigError(f"max_packet_size must be at least 1024 bytes, got {self.max_packet_size}")
        if self.keepalive < 5:
            raise ConfigError("keepalive must be at least 5 seconds")

    @property
    def host(self) -> str:
        return urlparse(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parsed = urlparse(self.url)
        return parsed.port or (8883 if self.tls else 1883)

    @property
    def tls(self) -> bool:
        return urlparse(self.url).scheme in ("mqtts", "ssl")


@dataclass
class Message:
    topic: str
    payload: bytes
    retain: bool
    received_at: float = field(default_factory=time.monotonic)


class MqttLink:
    """One MQTT connection. Received messages land in ``self.inbox`` (a bounded queue of Message).

    inbox_max: the inbox's capacity in messages. inbox_put_timeout: how long paho's network
    thread waits for room in a full inbox before it drops the message (see the module doc).
    Counters: ``reconnects`` (connections after the first), ``inbox_dropped``.
    """

    def __init__(
        self,
        cfg: BrokerConfig,
        client_id: str | None = None,
        will: tuple[str, bytes] | None = None,
        persistent: bool = True,
        inbox_max: int = INBOX_MAX,
        inbox_put_timeout: float = INBOX_PUT_TIMEOUT_S,
    ):
        if inbox_max < 1:
            raise ConfigError(f"inbox_max must be at least 1, got {inbox_max}")
        if inbox_put_timeout < 0:
            raise ConfigError(f"inbox_put_timeout must not be negative, got {inbox_put_timeout}")
        self.cfg = cfg
        self.client_id = client_id or f"fedlora-{uuid.uuid4().hex[:12]}"
        self.will = will
        self.persistent = persistent
        self.inbox_max = inbox_max
        # Never wait for as long as the keepalive: the broker would drop a silent client.
        self.inbox_put_timeout = min(inbox_put_timeout, cfg.keepalive / 3)
        self.inbox: queue.Queue[Message] = queue.Queue(maxsize=inbox_max)
        self.inbox_dropped = 0
        self.reconnects = 0
        self.connected = threading.Event()
        self.protocol: str | None = None
        self.broker_max_packet: int | None = None
        self.on_connect_hooks: list[Callable[[], None]] = []
        # topic -> the broker's reason, for subscriptions the broker refused (see the module doc)
        self.refused_subscriptions: dict[str, str] = {}
        self.on_subscribe_refused_hooks: list[Callable[[str, str], None]] = []
        self._subscriptions: dict[str, int] = {}
        self._lock = threading.Lock()
        self._sub_lock = threading.Lock()  # guards _pending_subacks: mid -> topics of a SUBSCRIBE
        self._pending_subacks: dict[int, list[str]] = {}
        self._client: mqtt.Client | None = None
        self._refused: str | None = None
        self._connecting = False
        self._ever_connected = False
        self._dropped_since_warning = 0
        self._last_drop_warning = -math.inf

    # -- connection ----------------------------------------------------------------------
    def _make_client(self, protocol: str) -> mqtt.Client:
        v5 = protocol == "5"
        client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else not self.persistent,
        )
        if self.cfg.username is not None:
            client.username_pw_set(self.cfg.username, self.cfg.password)
        if self.cfg.tls:
            client.tls_set(
                ca_certs=self.cfg.ca_file,
                certfile=self.cfg.cert_file,
                keyfile=self.cfg.key_file,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        if self.will is not None:
            client.will_set(self.will[0], self.will[1], qos=1, retain=True)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.max_inflight_messages_set(32)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = lambda c, u: setattr(self, "_refused", self._refused or "connection failed")
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def connect(self) -> MqttLink:
        """Connect, trying MQTT 5 first under ``auto``; raise TransportError if it fails."""
        order = ["5", "3.1.1"] if self.cfg.protocol == "auto" else [self.cfg.protocol]
        errors = []
        for protocol in order:
            client = self._make_client(protocol)
            self._client = client  # on-connect hooks publish through it
            self._connecting = True
            self._refused = None
            self.connected.clear()
            props = None
            if protocol == "5":
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = self.cfg.session_expiry if self.persistent else 0
            try:
                client.connect(
                    self.cfg.host,
                    self.cfg.port,
                    keepalive=self.cfg.keepalive,
                    clean_start=not self.persistent if protocol == "5" else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                    properties=props,
                )
            except (OSError, ssl.SSLError) as exc:
                self._client = None
                self._connecting = False
                raise TransportError(f"cannot reach broker {self.cfg.url}: {exc}") from exc
            client.loop_start()
            # Under auto, a broker that ignores an MQTT 5 CONNECT (amqtt waits silently) costs
            # at most V5_PROBE_S before we fall back to 3.1.1.
            wait = (
                min(self.cfg.connect_timeout, V5_PROBE_S)
                if len(order) > 1 and protocol == "5"
                else self.cfg.connect_timeout
            )
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and not self.connected.is_set() and self._refused is None:
                time.sleep(0.01)
            self._connecting = False
            if self.connected.is_set():
                self.protocol = protocol
                log.info("connected to %s with MQTT %s as %s", self.cfg.url, protocol, self.client_id)
                return self
            self._refused = self._refused or "no CONNACK"
            client.disconnect()
            client.loop_stop()
            self._client = None
            errors.append(f"MQTT {protocol}: {self._refused or f'no CONNACK within {wait:.0f}s'}")
        raise TransportError(f"broker {self.cfg.url} refused the connection ({'; '.join(errors)})")

    def connect_retrying(self, stop: threading.Event | None = None, max_delay: float = 30.0) -> MqttLink:
        """connect(), retried with exponential backoff and jitter until it works or ``stop`` is set.

        A device boots before the network or the broker is up; it must keep trying, not exit.
        """
        delay = 0.5
        while True:
            try:
                return self.connect()
            except TransportError as exc:
                log.warning("%s; retrying in %.1fs", exc, delay)
                if stop is None:
                    time.sleep(delay)
                elif stop.wait(delay):
                    return self  # stopped while offline: the caller checks ``stop``
                delay = min(max_delay, delay * 2) * random.uniform(0.8, 1.2)

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self._refused = str(reason_code)
            return
        if properties is not None and hasattr(properties, "MaximumPacketSize"):
            self.broker_max_packet = int(properties.MaximumPacketSize)
        if self._ever_connected:
            self.reconnects += 1
        self._ever_connected = True
        with self._sub_lock:
            self._pending_subacks.clear()  # SUBSCRIBEs of a lost connection get no SUBACK: sent again below
        with self._lock:
            subs = list(self._subscriptions.items())
        for topic, qos in subs:
            self._send_subscribe(client, topic, qos)
        self.connected.set()
        for hook in list(self.on_connect_hooks):
            try:
                hook()
            except Exception:  # a hook must not kill paho's network thread
                log.exception("on-connect hook failed")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        if self._connecting and self._refused is None:
            # Closed before CONNACK during connect(): a broker that does not speak this
            # protocol version (amqtt and MQTT 5) just drops the socket.
            self._refused = f"connection closed before CONNACK ({reason_code})"
        self.connected.clear()
        if reason_code.value != 0:
            log.warning("disconnected from %s (%s); paho reconnects with backoff", self.cfg.url, reason_code)

    def _on_message(self, client, userdata, msg):
        message = Message(msg.topic, bytes(msg.payload), bool(msg.retain))
        try:
            self.inbox.put(message, timeout=self.inbox_put_timeout)
        except queue.Full:
            self.inbox_dropped += 1
            self._dropped_since_warning += 1
            now = time.monotonic()
            if now - self._last_drop_warning >= DROP_WARNING_EVERY_S:
                log.warning(
                    "inbox full (%d messages, nothing taken for %.1fs): dropped %d message(s) since the "
                    "last warning, %d in all, the latest on %s",
                    self.inbox_max,
                    self.inbox_put_timeout,
                    self._dropped_since_warning,
                    self.inbox_dropped,
                    msg.topic,
                )
                self._last_drop_warning = now
                self._dropped_since_warning = 0

    def _send_subscribe(self, client: mqtt.Client, topic: str, qos: int) -> None:
        # Hold the lock until the mid is recorded: the SUBACK may arrive before subscribe() returns.
        with self._sub_lock:
            rc, mid = client.subscribe(topic, qos)
            if rc == mqtt.MQTT_ERR_SUCCESS and mid is not None:
                self._pending_subacks[mid] = [topic]

    def _on_subscribe(self, client, userdata, mid, reason_code_list, properties):
        with self._sub_lock:
            topics = self._pending_subacks.pop(mid, None)
        if topics is None:
            return
        for topic, rc in zip(topics, reason_code_list):
            value = getattr(rc, "value", rc)
            if value >= 0x80:
                reason = f"{rc} (0x{value:02x})" if hasattr(rc, "value") else f"0x{value:02x}"
                log.error(
                    "broker %s refused the subscription to %s: %s; nothing on it will arrive",
                    self.cfg.url,
                    topic,
                    reason,
                )
                self.refused_subscriptions[topic] = reason
                for hook in list(self.on_subscribe_refused_hooks):
                    try:
                        hook(topic, reason)
                    except Exception:  # a hook must not kill paho's network thread
                        log.exception("subscribe-refused hook failed")
            elif self.refused_subscriptions.pop(topic, None) is not None:
                log.info("broker %s granted the subscription to %s now", self.cfg.url, topic)

    def close(self) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None
        self.connected.clear()

    # -- traffic -------------------------------------------------------------------------
    @property
    def client(self) -> mqtt.Client:
        if self._client is None:
            raise TransportError("not connected; call connect() first")
        return self._client

    def subscribe(self, topic: str, qos: int = 1) -> None:
        with self._lock:
            self._subscriptions[topic] = qos
        if self.connected.is_set():
            self._send_subscribe(self.client, topic, qos)

    def unsubscribe(self, topic: str) -> None:
        with self._lock:
            self._subscriptions.pop(topic, None)
        self.refused_subscriptions.pop(topic, None)  # no longer wanted: no longer a problem
        if self.connected.is_set():
            self.client.unsubscribe(topic)

    def resubscribe(self, topic: str, qos: int = 1) -> None:
        """Subscribe again so the broker re-sends the topic's retained message."""
        self.subscribe(topic, qos)

    def max_chunk_data(self, topic: str) -> int:
        """Bytes of chunk data that fit one packet on this topic under the effective limit."""
        limit = self.cfg.max_packet_size
        if self.broker_max_packet:
            limit = min(limit, self.broker_max_packet)
        room = limit - PACKET_OVERHEAD - len(topic.encode()) - CHUNK_HEADER.size
        if room < 64:
            raise TransportError(f"packet limit {limit} leaves no room for data on topic {topic}")
        return room

    def chunk_count(self, topic: str, size: int) -> int:
        """How many chunks ``publish_chunked`` cuts a payload of ``size`` bytes into on ``topic``."""
        return max(1, math.ceil(size / self.max_chunk_data(topic)))

    def publish(self, topic: str, payload: bytes, retain: bool = False, qos: int = 1) -> mqtt.MQTTMessageInfo:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise TransportError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        return info

    def publish_chunked(
        self,
        topic: str,
        payload: bytes,
        retain_topic: Callable[[int], str] | None = None,
        timeout: float = 120.0,
        indices: set[int] | None = None,
    ) -> int:
        """Send ``payload`` as chunks and wait for every PUBACK; returns how many were sent.

        With ``retain_topic``, chunk i goes retained to ``retain_topic(i)`` (global adapters);
        otherwise every chunk goes to ``topic`` (updates). ``indices``: send only these chunks
        (a repair; see ``chunk_count``), all of them when None.
        """
        probe = retain_topic(0) if retain_topic else topic
        chunks = split_chunks(payload, self.max_chunk_data(probe))
        infos = []
        for i, chunk in enumerate(chunks):
            if indices is not None and i not in indices:
                continue
            if retain_topic:
                infos.append(self.publish(retain_topic(i), chunk, retain=True))
            else:
                infos.append(self.publish(topic, chunk))
        deadline = time.monotonic() + timeout
        for info in infos:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TransportError(
                    f"broker did not acknowledge all {len(infos)} chunks on {probe} within {timeout:.0f}s"
                )
            try:
                info.wait_for_publish(timeout=remaining)
            except (RuntimeError, ValueError) as exc:
                raise TransportError(f"publish on {probe} failed: {exc}") from exc
            if not info.is_published():
                raise TransportError(
                    f"broker did not acknowledge all {len(infos)} chunks on {probe} within {timeout:.0f}s"
                )
        return len(infos)

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)
