"""Test helpers: MQTT publishing/subscribing with paho, reading Kafka topics from the start."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from aiokafka import AIOKafkaConsumer, TopicPartition
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from citypulse.settings import Settings
from collectors.mqtt_client import BufferedSocket
from deploy.bench._wire import WirePublisher
from stream import client_options


class MqttPeer:
    """A vendor-side MQTT client: publish QoS 1 (waiting for the broker's ack), collect topics."""

    def __init__(self, url: str, subscribe: str | None = None) -> None:
        parts = urlsplit(url)
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"peer-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.received: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        connected = threading.Event()

        def on_connect(c: Any, u: Any, f: Any, rc: Any, p: Any) -> None:
            connected.set()
            if subscribe:
                c.subscribe(subscribe, qos=1)
            else:
                subscribed.set()

        def on_message(c: Any, u: Any, msg: Any) -> None:
            with self._lock:
                self.received.append((msg.topic, bytes(msg.payload)))

        self.client.on_connect = on_connect
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = on_message
        self.client.max_inflight_messages_set(100)
        self.client.connect(parts.hostname or "127.0.0.1", parts.port or 1883)
        self.client.loop_start()
        assert connected.wait(10), "MQTT peer did not connect"
        assert subscribed.wait(10), "MQTT peer did not subscribe"

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def messages(self) -> list[tuple[str, bytes]]:
        with self._lock:
            return list(self.received)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def read_topic(
    settings: Settings,
    name: str,
    until: int,
    timeout_s: float = 20.0,
    settle_s: float = 0.5,
) -> list[tuple[bytes | None, bytes]]:
    """(key, value) of every record of ``settings.topic(name)``: read from the beginning until
    at least ``until`` records arrived (or the timeout), then ``settle_s`` longer for extras."""
    topic = settings.topic(name)
    consumer = AIOKafkaConsumer(
        **client_options(settings),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
    )
    await consumer.start()
    out: list[tuple[bytes | None, bytes]] = []
    try:
        deadline = time.monotonic() + timeout_s
        parts: set[int] = set()
        while not parts and time.monotonic() < deadline:
            await consumer.topics()
            parts = consumer.partitions_for_topic(topic) or set()
            if not parts:
                await asyncio.sleep(0.1)
        assert parts, f"topic {topic} does not exist"
        tps = [TopicPartition(topic, p) for p in parts]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        settle_until: float | None = None
        while True:
            now = time.monotonic()
            if len(out) >= until and settle_until is None:
                settle_until = now + settle_s
            if now > deadline or (settle_until is not None and now > settle_until):
                break
            batches = await consumer.getmany(timeout_ms=100)
            for records in batches.values():
                out.extend((r.key, r.value) for r in records)
    finally:
        await consumer.stop()
    return out


def receive_burst(client: Any, connect: tuple[str, int], publish: tuple[str, int], n: int) -> int:
    """Publish ``n`` QoS 1 messages in one burst (plain MQTT, at ``publish``) to a ``LeanClient``
    subscribed at ``connect``; assert they all arrive intact and in order. Returns the ``recv``
    calls on the client's socket during the burst."""
    topic = f"burst-{uuid.uuid4().hex[:6]}/s1"
    got: list[bytes] = []
    done, subscribed = threading.Event(), threading.Event()

    def on_message(c: Any, u: Any, msg: Any) -> None:
        got.append(msg.payload)
        if len(got) == n:
            done.set()

    client.on_message = on_message
    client.on_subscribe = lambda *a: subscribed.set()
    client.connect(*connect)
    client.loop_start()
    try:
        client.subscribe(topic, qos=1)
        assert subscribed.wait(10)
        sock = client.socket()
        assert isinstance(sock, BufferedSocket)  # paho still opens its socket through us
        reads0 = sock.reads
        pub = WirePublisher(*publish, f"pub-{uuid.uuid4().hex[:6]}")
        sent = [b"%06d" % i + b"x" * (i % 200) for i in range(n)]
        for payload in sent:
            pub.publish(topic.encode(), payload)
        pub.close()
        assert done.wait(20), f"{len(got)} of {n} arrived"
        reads: int = sock.reads - reads0
    finally:
        client.disconnect()
        client.loop_stop()
    assert got == sent
    return reads
