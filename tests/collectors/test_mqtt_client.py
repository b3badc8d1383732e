"""The collector's paho client: every message intact and in order with far fewer reads, the
same messages as stock paho from its own PUBLISH decoding, and batched acks that hold."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from collectors.mqtt_client import CHUNK, BufferedSocket, LeanClient
from deploy.bench._wire import WirePublisher
from deploy.embedded import EmbeddedStack

from .helpers import receive_burst


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
    """3,000 QoS 1 messages published in one burst reach a ``LeanClient`` (MQTT v5) intact
    and in order, read from the socket in far fewer ``recv`` calls than messages (stock paho
    needs three or more per message)."""
    url = urlsplit(stack.mosquitto.url)
    address = (url.hostname or "", url.port or 0)
    n = 3000
    client = LeanClient(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    reads = receive_burst(client, address, address, n)
    assert reads < n // 4, reads


def _publish_packet(
    qos: int, topic: bytes, mid: int, payload: bytes, props: Properties | None, flags: int = 0
) -> tuple[int, bytearray]:
    """``(fixed header byte, rest)`` of a PUBLISH, as paho holds it in ``_in_packet``."""
    body = bytearray(len(topic).to_bytes(2, "big") + topic)
    if qos:
        body += mid.to_bytes(2, "big")
    if props is not None:
        body += props.pack()  # type: ignore[no-untyped-call]
    body += payload
    return 0x30 | (qos << 1) | flags, body


def _delivered(client: Any, header: int, body: bytearray) -> dict[str, Any]:
    got: list[Any] = []
    client.on_message = lambda c, u, msg: got.append(msg)
    client._in_packet = {"command": header, "packet": bytearray(body)}
    client._handle_publish()
    (msg,) = got
    return {
        "topic": msg.topic,
        "payload": msg.payload,
        "mid": msg.mid,
        "qos": msg.qos,
        "dup": msg.dup,
        "retain": msg.retain,
        "properties": None if msg.properties is None else msg.properties.json(),
        "types": (type(msg.payload), type(msg.properties)),
    }


def test_lean_publish_decoding_delivers_what_stock_paho_delivers() -> None:
    """For PUBLISH packets with and without v5 properties, every QoS, the dup and retain flags,
    and MQTT 3.1.1, ``on_message`` gets the same message from ``LeanClient`` as from paho."""
    with_props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    with_props.ContentType = "application/senml+json"
    with_props.UserProperty = ("vendor", "acme")
    with_props.MessageExpiryInterval = 30
    cases = []
    for protocol in (mqtt.MQTTv5, mqtt.MQTTv311):
        v5 = protocol == mqtt.MQTTv5
        empty = Properties(PacketTypes.PUBLISH) if v5 else None  # type: ignore[no-untyped-call]
        for qos in (0, 1, 2):
            for props in (empty, with_props if v5 else None):
                for flags in (0, 0x08 | 0x01):
                    payload = b'{"v":1,"values":{"flow":1.5}}' * (qos + 1)
                    topic = b"citypulse/v1/acme/ws-00001/up"
                    cases.append(
                        (protocol, _publish_packet(qos, topic, 7 + qos, payload, props, flags))
                    )
    cases.append((mqtt.MQTTv5, _publish_packet(1, b"t", 65535, b"", None)))  # v5 without props
    for protocol, (header, body) in cases:
        stock = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=protocol, manual_ack=True)
        lean = LeanClient(CallbackAPIVersion.VERSION2, protocol=protocol, manual_ack=True)
        try:
            expected = _delivered(stock, header, body)
        except Exception as exc:  # a packet stock paho refuses: the lean path must refuse it
            with pytest.raises(type(exc)):
                _delivered(lean, header, body)
            continue
        assert _delivered(lean, header, body) == expected, (protocol, header)


def _dispatched(client: Any, topics: list[bytes], filtered: str | None) -> list[tuple[str, str]]:
    """Which callback got which topic, with or without a per-topic callback for ``filtered``."""
    got: list[tuple[str, str]] = []
    client.on_message = lambda c, u, msg: got.append(("on_message", msg.topic))
    if filtered is not None:
        client.message_callback_add(filtered, lambda c, u, msg: got.append(("filtered", msg.topic)))
    for topic in topics:
        client._handle_on_message(mqtt.MQTTMessage(mid=1, topic=topic))
    return got


def test_dispatch_reaches_the_callbacks_stock_paho_calls() -> None:
    """Without per-topic callbacks every message goes to ``on_message``; with one, messages
    it matches go to it alone, as with paho. An exception in ``on_message`` propagates (paho's
    default, ``suppress_exceptions`` off)."""
    topics = [b"citypulse/v1/acme/ws-1/up", b"citypulse/v1/acme/ws-1/rejects", b"other/x"]
    for filtered in (None, "citypulse/v1/+/+/rejects", "nothing/matches"):
        stock = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        lean = LeanClient(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        expected = _dispatched(stock, topics, filtered)
        assert _dispatched(lean, topics, filtered) == expected
        assert len(expected) == len(topics)
    lean = LeanClient(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

    def boom(c: Any, u: Any, msg: Any) -> None:
        raise ValueError("bad callback")

    lean.on_message = boom
    with pytest.raises(ValueError, match="bad callback"):
        lean._handle_on_message(mqtt.MQTTMessage(mid=1, topic=b"a/b"))


def test_empty_properties_are_independent_objects() -> None:
    """Messages without properties each get their own empty ``Properties``: setting one on a
    message (as an application may) leaves the next message's alone."""
    client = LeanClient(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, manual_ack=True)
    header, body = _publish_packet(1, b"a/b", 1, b"x", Properties(PacketTypes.PUBLISH))  # type: ignore[no-untyped-call]
    got: list[Any] = []
    client.on_message = lambda c, u, msg: got.append(msg)
    for _ in range(2):
        client._in_packet = {"command": header, "packet": bytearray(body)}
        client._handle_publish()
    got[0].properties.ContentType = "text/plain"
    assert got[0].properties.json() == {"ContentType": "text/plain"}
    assert got[1].properties.json() == {}


@pytest.mark.integration
def test_ack_all_acknowledges_exactly_the_messages_given(stack: EmbeddedStack) -> None:
    """With manual acks, ``ack_all`` PUBACKs the batch it is given: after a reconnect to the
    same session, the broker redelivers the messages left out and none of those acked."""
    url = urlsplit(stack.mosquitto.url)
    host, port = url.hostname or "", url.port or 0
    topic = f"ack-all-{uuid.uuid4().hex[:6]}/s1"
    client_id = f"lean-{uuid.uuid4().hex[:6]}"
    n = 600
    unacked = set(range(0, n, 7))  # payload numbers not acked

    def session(on_message: Any) -> Any:
        client = LeanClient(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 300
        subscribed = threading.Event()
        client.on_message = on_message
        client.on_subscribe = lambda *a: subscribed.set()
        client.connect(host, port, clean_start=False, properties=props)
        client.loop_start()
        client.subscribe(topic, qos=1)
        assert subscribed.wait(10)
        return client

    first: list[tuple[int, int]] = []  # (payload number, mid)
    all_in = threading.Event()

    def on_first(c: Any, u: Any, msg: Any) -> None:
        first.append((int(msg.payload), msg.mid))
        if len(first) == n:
            all_in.set()

    client = session(on_first)
    pub = WirePublisher(host, port, f"pub-{uuid.uuid4().hex[:6]}")
    for i in range(n):
        pub.publish(topic.encode(), b"%d" % i)
    pub.close()
    assert all_in.wait(20), f"{len(first)} of {n} arrived"
    mids = [mid for number, mid in first if number not in unacked]
    for k in range(0, len(mids), 100):  # in batches, as the collector does
        client.ack_all(mids[k : k + 100])
    client.ack_all([])
    time.sleep(0.5)  # let the PUBACKs leave before the connection drops
    client.disconnect()
    client.loop_stop()

    again: list[int] = []
    client = session(lambda c, u, msg: again.append(int(msg.payload)))
    try:
        deadline = time.monotonic() + 10
        while len(again) < len(unacked) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # anything more would be a wrongly redelivered message
    finally:
        client.disconnect()
        client.loop_stop()
    assert sorted(again) == sorted(unacked)
