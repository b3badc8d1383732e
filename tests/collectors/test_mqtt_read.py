"""The collector's buffered paho client: every message intact and in order, far fewer reads."""

from __future__ import annotations

import socket
import threading
import uuid
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from collectors.mqtt_read import CHUNK, BufferedClient, BufferedSocket
from deploy.bench._wire import WirePublisher
from deploy.embedded import EmbeddedStack


def test_small_reads_are_served_across_chunk_boundaries() -> None:
    """Reads of 1, 2 and 1,000 bytes return the stream unchanged over several 64 KiB chunks,
    and ``pending()`` counts what is buffered."""
    a, b = socket.socketpair()
    data = bytes(range(256)) * ((3 * CHUNK) // 256 + 7)
    threading.Thread(target=a.sendall, args=(data,), daemon=True).start()
    sock = BufferedSocket(b)
    got = bytearray()
    sizes = (1, 2, 1000)
    i = 0
    while len(got) < len(data):
        got += sock.recv(sizes[i % 3])
        i += 1
    a.close()
    assert bytes(got) == data
    assert sock.pending() == 0
    assert sock.reads < len(data) // 1000
    assert sock.recv(10) == b""  # closed: paho sees the end of the stream
    b.close()


@pytest.mark.integration
def test_collector_client_receives_a_burst_in_order_with_few_reads(stack: EmbeddedStack) -> None:
    """3,000 QoS 1 messages published in one burst reach a ``BufferedClient`` (MQTT v5) intact
    and in order, read from the socket in far fewer ``recv`` calls than messages (stock paho
    needs three or more per message)."""
    url = urlsplit(stack.mosquitto.url)
    host, port = url.hostname or "", url.port or 0
    topic = f"mqtt-read-{uuid.uuid4().hex[:6]}/s1"
    n = 3000
    got: list[bytes] = []
    done, subscribed = threading.Event(), threading.Event()

    client = BufferedClient(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

    def on_message(c: Any, u: Any, msg: Any) -> None:
        got.append(msg.payload)
        if len(got) == n:
            done.set()

    client.on_message = on_message
    client.on_subscribe = lambda *a: subscribed.set()
    client.connect(host, port)
    client.loop_start()
    try:
        client.subscribe(topic, qos=1)
        assert subscribed.wait(10)
        sock = client.socket()
        assert isinstance(sock, BufferedSocket)  # paho still opens its socket through us
        reads0 = sock.reads
        pub = WirePublisher(host, port, f"pub-{uuid.uuid4().hex[:6]}")
        sent = [b"%06d" % i + b"x" * (i % 200) for i in range(n)]
        for payload in sent:
            pub.publish(topic.encode(), payload)
        pub.close()
        assert done.wait(20), f"{len(got)} of {n} arrived"
        reads = sock.reads - reads0
    finally:
        client.disconnect()
        client.loop_stop()
    assert got == sent
    assert reads < n // 4, reads
