"""The load generator's lean publisher against the real Mosquitto, checked by a paho subscriber."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import pytest

from deploy.bench._load import connect
from deploy.bench._wire import WirePublisher, publish_packet
from deploy.embedded import EmbeddedStack


def test_publish_packet_has_qos1_header_and_multibyte_length() -> None:
    """A 200-byte payload needs a two-byte remaining length (MQTT §2.2.3)."""
    pkt = publish_packet(b"a/b", 7, b"x" * 200)
    assert pkt[0] == 0x32
    assert pkt[1:3] == bytes([(207 % 128) | 0x80, 207 // 128])
    assert pkt[3:8] == b"\x00\x03a/b"
    assert pkt[8:10] == b"\x00\x07"
    assert len(pkt) == 3 + 207


@pytest.mark.integration
def test_every_message_arrives_intact_and_is_acked(stack: EmbeddedStack) -> None:
    """5,000 QoS 1 messages over more than one inflight window and packet-id wrap-around
    arrive at a paho subscriber byte for byte, and the publisher counts 5,000 PUBACKs."""
    url = stack.mosquitto.url
    prefix = f"wire-{uuid.uuid4().hex[:6]}"
    got: list[tuple[str, bytes]] = []
    done = threading.Event()
    n = 5_000

    sub = connect(url, f"{prefix}-sub")
    subscribed = threading.Event()
    sub.on_subscribe = lambda *a: subscribed.set()

    def on_message(c: Any, u: Any, msg: Any) -> None:
        got.append((msg.topic, msg.payload))
        if len(got) == n:
            done.set()

    sub.on_message = on_message
    sub.subscribe(f"{prefix}/#", qos=1)
    assert subscribed.wait(10)

    parts = urlsplit(url)
    pub = WirePublisher(parts.hostname or "", parts.port or 0, f"{prefix}-pub", inflight=300)
    pub._mid = 65_000  # packet identifiers wrap from 65535 to 1 during the run
    sent = []
    for i in range(n):
        topic, payload = f"{prefix}/s{i % 7}".encode(), b'{"i": %d}' % i + b" " * (i % 300)
        sent.append((topic.decode(), payload))
        pub.publish(topic, payload)
    pub.flush()
    deadline = time.monotonic() + 10
    while pub.acked < n and time.monotonic() < deadline:
        pub.poll(timeout_s=0.05)
    pub.close()
    try:
        assert done.wait(10), f"{len(got)} of {n} messages arrived"
    finally:
        sub.disconnect()
        sub.loop_stop()
    assert pub.acked == pub.sent == n
    assert sorted(got) == sorted(sent)
    # One connection, so MQTT keeps each topic's order.
    per_topic = [p for t, p in got if t.endswith("/s3")]
    assert per_topic == [p for t, p in sent if t.endswith("/s3")]
