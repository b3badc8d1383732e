"""A lean MQTT 3.1.1 QoS 1 publisher for the load generator: packets written straight to a socket.

The load generator shares the machine's cores with everything it measures, so what it spends
is taken from the pipeline and from the raw-component ceilings alike. paho spends ~85 µs of
Python per QoS 1 message (its packet objects, its network thread, a callback per PUBACK); this
writes pre-sized PUBLISH packets in batches and counts PUBACKs off the socket, a few µs a
message. Only the load generator uses it: latency probes and everything measured use paho.
"""

from __future__ import annotations

import select
import socket
import struct
import time

_PUBACK = 0x40
_PINGRESP = 0xD0
_PING_EVERY_S = 20.0
KEEPALIVE_S = 60


class WireError(ConnectionError):
    """The broker refused the connection or sent something a publisher does not expect."""


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("!H", len(raw)) + raw


def connect_packet(client_id: str, keepalive_s: int = KEEPALIVE_S) -> bytes:
    """CONNECT, MQTT 3.1.1 (protocol level 4), clean session, no credentials (§3.1)."""
    body = _utf8("MQTT") + bytes([4, 0x02]) + struct.pack("!H", keepalive_s) + _utf8(client_id)
    return b"\x10" + _varint(len(body)) + body


def publish_packet(topic: bytes, mid: int, payload: bytes) -> bytes:
    """PUBLISH at QoS 1 (fixed header 0x32) with packet identifier ``mid`` (§3.3)."""
    return b"".join(
        (
            b"\x32",
            _varint(2 + len(topic) + 2 + len(payload)),
            struct.pack("!H", len(topic)),
            topic,
            struct.pack("!H", mid),
            payload,
        )
    )


class WirePublisher:
    """One MQTT connection that publishes at QoS 1 and counts the broker's PUBACKs.

    ``publish`` buffers; ``flush`` writes the buffer. At most ``inflight`` messages wait for
    their PUBACK: past that, ``publish`` flushes and blocks until acks come back.
    """

    def __init__(self, host: str, port: int, client_id: str, inflight: int = 1000) -> None:
        self.inflight = inflight
        self.sent = 0
        self.acked = 0
        self._mid = 0
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._in = bytearray()
        self._last_write = time.monotonic()
        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(connect_packet(client_id))
        connack = self._recv_exact(4)
        if connack[0] != 0x20 or connack[3] != 0:
            raise WireError(f"CONNACK refused: {connack.hex()}")
        self.sock.setblocking(False)

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise WireError("broker closed the connection")
            buf += chunk
        return buf

    def publish(self, topic: bytes, payload: bytes) -> None:
        """Queue one QoS 1 message; flushes at 64 KiB and waits while ``inflight`` are unacked."""
        while self.sent - self.acked >= self.inflight:
            self.flush()
            self.poll(timeout_s=0.05)
        self._mid = self._mid % 65535 + 1  # packet identifiers are 1..65535
        pkt = publish_packet(topic, self._mid, payload)
        self._out.append(pkt)
        self._out_bytes += len(pkt)
        self.sent += 1
        if self._out_bytes >= 65536:
            self.flush()

    def flush(self) -> None:
        """Write everything queued (blocking until the kernel takes it), then read acks."""
        if self._out:
            data = memoryview(b"".join(self._out))
            self._out.clear()
            self._out_bytes = 0
            while data:
                try:
                    data = data[self.sock.send(data) :]
                except BlockingIOError:
                    # The broker is behind: read its acks so it can go on, then wait to write.
                    self.poll()
                    select.select([], [self.sock], [], 0.05)
            self._last_write = time.monotonic()
        self.poll()

    def idle(self) -> None:
        """Call while not publishing: reads acks and keeps the connection alive."""
        if time.monotonic() - self._last_write > _PING_EVERY_S:
            self._out.append(b"\xc0\x00")  # PINGREQ
            self._out_bytes += 2
            self.flush()
        self.poll()

    def poll(self, timeout_s: float = 0.0) -> int:
        """Read whatever the broker sent; returns the PUBACKs counted."""
        if timeout_s > 0:
            select.select([self.sock], [], [], timeout_s)
        got = 0
        while True:
            try:
                chunk = self.sock.recv(65536)
            except BlockingIOError:
                break
            if not chunk:
                raise WireError("broker closed the connection")
            self._in += chunk
        buf, pos = self._in, 0
        # The broker only sends PUBACK and PINGRESP to a publisher: 2-byte remaining lengths.
        while len(buf) - pos >= 2:
            kind, length = buf[pos] & 0xF0, buf[pos + 1]
            if kind not in (_PUBACK, _PINGRESP) or length > 2:
                raise WireError(
                    f"unexpected packet from the broker: {bytes(buf[pos : pos + 4]).hex()}"
                )
            if len(buf) - pos < 2 + length:
                break
            got += kind == _PUBACK
            pos += 2 + length
        del buf[:pos]
        self.acked += got
        return got

    def close(self, timeout_s: float = 10.0) -> None:
        """Flush, wait up to ``timeout_s`` for outstanding acks, DISCONNECT."""
        try:
            self.flush()
            deadline = time.monotonic() + timeout_s
            while self.acked < self.sent and time.monotonic() < deadline:
                self.poll(timeout_s=0.05)
            self.sock.setblocking(True)
            self.sock.sendall(b"\xe0\x00")
        except OSError:
            pass
        finally:
            self.sock.close()
