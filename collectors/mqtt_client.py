"""The collector's paho client: buffered reads, lean v5 PUBLISH decoding, batched PUBACKs.

Stock paho spends most of its time per QoS 1 message on four things, each fixed here without
changing what reaches ``on_message`` or what goes on the wire:

* **Reads.** paho reads a packet in several ``recv`` calls (the fixed header, each length byte,
  the rest) and handles one incoming packet per ``select`` when it has nothing of its own in
  flight. :class:`BufferedSocket` serves those small reads from one 64 KiB ``recv`` and reports
  the bytes it holds through ``pending()`` (the hook paho already has for TLS, whose decrypted
  bytes the kernel no longer sees, so paho skips the wait in ``select``), and
  :meth:`LeanClient.loop_read` handles every complete packet of the buffer.
* **MQTT v5 properties.** paho builds a ``Properties`` object for every PUBLISH, and its
  constructor builds a table of every property name and type. Brokers send most PUBLISH
  packets with no properties at all; :meth:`LeanClient._handle_publish` decodes a v5 QoS 1
  PUBLISH itself and gives such a message a copy of one empty ``Properties`` made up front.
* **Dispatch.** For every message paho decodes the topic twice and walks its matcher of
  per-topic callbacks (``message_callback_add``), building a list, before it calls
  ``on_message``: 4.4 us of 4.9 here. :meth:`LeanClient._handle_on_message` calls
  ``on_message`` straight away when no per-topic callback exists (the collector has none).
* **Acks.** ``Client.ack`` queues one 4-byte PUBACK, writes a byte to paho's wake-up socket pair
  and later ``send``s that packet on its own: three system calls per message.
  :meth:`LeanClient.ack_all` queues the PUBACKs of a whole batch as one packet: one wake-up, one
  ``send``, and one TCP segment for the broker to read.

It relies on paho internals (``_create_socket``, ``_sock``, ``_in_packet``, ``_packet_queue``,
``_handle_on_message``, ``_on_message_filtered``, ``_callback_mutex``, ``_in_callback_mutex``,
``_manual_ack``, ``_protocol``); ``tests/collectors/test_mqtt_client.py``
fails if a paho release changes them in a way that matters.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

CHUNK = 65536

_PUBACK = struct.Struct("!BBH").pack
_PUBACK_BYTE = 0x40  # PUBACK; remaining length 2: the message id, reason "success" implied
_EMPTY = Properties(PacketTypes.PUBLISH).__dict__  # type: ignore[no-untyped-call]


def _no_properties() -> Any:
    """An empty PUBLISH ``Properties``, without building its tables again (they are only read)."""
    props = object.__new__(Properties)
    props.__dict__.update(_EMPTY)
    return props


class BufferedSocket:
    """A socket (TCP or TLS) whose ``recv`` is served from a buffer filled ``CHUNK`` at a time."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._buf = b""
        self._pos = 0
        self.reads = 0
        """``recv`` calls on the real socket (tests, and the curious)."""

    def recv(self, bufsize: int) -> bytes:
        if self._pos >= len(self._buf):
            data = self._sock.recv(CHUNK)  # BlockingIOError/SSLWantReadError go to paho
            self.reads += 1
            if not data:
                return b""  # closed by the broker: paho handles it
            self._buf, self._pos = data, 0
        out = self._buf[self._pos : self._pos + bufsize]
        self._pos += len(out)
        return out

    def pending(self) -> int:
        """Bytes readable without waiting: buffered here, plus what TLS has decrypted."""
        inner = self._sock.pending() if hasattr(self._sock, "pending") else 0
        return len(self._buf) - self._pos + int(inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class LeanClient(mqtt.Client):
    """``paho.mqtt.client.Client`` with the four changes of the module docstring."""

    def _create_socket(self) -> Any:
        return BufferedSocket(super()._create_socket())

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        rc = super().loop_read(max_packets)
        sock = self._sock
        while (
            rc == MQTTErrorCode.MQTT_ERR_SUCCESS
            and isinstance(sock, BufferedSocket)
            and sock.pending()
        ):
            rc = super().loop_read(1)
            sock = self._sock
        return rc

    def ack_all(self, mids: Iterable[int]) -> MQTTErrorCode:
        """PUBACK the QoS 1 messages ``mids`` (manual ack), all in one queued write.

        Like ``ack(mid, 1)`` for each, in order, on the current connection.
        """
        if not self._manual_ack:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        packet = b"".join([_PUBACK(_PUBACK_BYTE, 2, mid) for mid in mids])
        if not packet:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        return self._packet_queue(_PUBACK_BYTE, packet, 0, 0)

    def _handle_on_message(self, message: mqtt.MQTTMessage) -> None:
        if self._on_message_filtered._root._children:
            super()._handle_on_message(message)  # per-topic callbacks: paho matches them
            return
        with self._callback_mutex:
            on_message = self.on_message
        if on_message is None:
            return
        with self._in_callback_mutex:
            try:
                on_message(self, self._userdata, message)
            except Exception as err:
                self._easy_log(mqtt.MQTT_LOG_ERR, "Caught exception in on_message: %s", err)
                if not self.suppress_exceptions:
                    raise

    def _handle_publish(self) -> MQTTErrorCode:
        header: int = self._in_packet["command"]
        packet = bytes(self._in_packet["packet"])
        size = len(packet)
        if self._protocol != MQTTProtocolVersion.MQTTv5 or header & 0x06 != 0x02 or size < 5:
            return super()._handle_publish()  # not v5 QoS 1
        n = int.from_bytes(packet[:2], "big")
        pos = 2 + n
        if size < pos + 3:
            return super()._handle_publish()  # malformed
        if packet[pos + 2] == 0:  # property length 0
            props = _no_properties()
            start = pos + 3
        else:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            start = pos + 2 + props.unpack(packet[pos + 2 :])[1]  # type: ignore[no-untyped-call]
        mid = int.from_bytes(packet[pos : pos + 2], "big")
        message = mqtt.MQTTMessage(mid=mid, topic=packet[2:pos])
        message.dup = bool(header & 0x08)
        message.qos = 1
        message.retain = bool(header & 0x01)
        message.properties = props
        message.payload = packet[start:]
        message.timestamp = time.monotonic()
        self._handle_on_message(message)
        if self._manual_ack:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        return self._send_puback(mid)
