"""Publish a simulator's messages over MQTT v5 (paho-mqtt 2.x, QoS 1), paced in wall time.

paho runs its network loop in its own thread; this module paces and counts in the caller's
thread. :func:`publish_async` runs the same in a worker thread for asyncio callers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from deploy.simulator._model import Incident
from deploy.simulator._sim import Message, Simulator

MAX_QUEUED = 20_000
"""Messages paho may hold unsent; beyond it the publisher waits (bounded memory)."""


class PublishError(RuntimeError):
    """The simulator could not connect to or publish on the MQTT broker."""


@dataclass(slots=True)
class SimulationReport:
    """What a publisher run sent. Counts are of messages acknowledged by the broker (PUBACK)."""

    messages: int = 0
    readings: int = 0
    records: int = 0
    malformed: Counter[str] = field(default_factory=Counter)
    formats: Counter[str] = field(default_factory=Counter)
    incidents: list[Incident] = field(default_factory=list)
    elapsed_s: float = 0.0
    first_event: datetime | None = None
    last_event: datetime | None = None

    @property
    def readings_per_s(self) -> float:
        return self.readings / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "messages": self.messages,
            "readings": self.readings,
            "records": self.records,
            "malformed": dict(self.malformed),
            "formats": dict(self.formats),
            "incidents": [i.as_dict() for i in self.incidents],
            "elapsed_s": round(self.elapsed_s, 3),
            "readings_per_s": round(self.readings_per_s, 1),
            "first_event": self.first_event.isoformat() if self.first_event else None,
            "last_event": self.last_event.isoformat() if self.last_event else None,
        }


@dataclass(frozen=True, slots=True)
class MqttTarget:
    """Where and as whom to publish. ``credentials`` maps vendor to (username, password)."""

    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    credentials: dict[str, tuple[str, str]] = field(default_factory=dict)


def _connect(target: MqttTarget, username: str | None, password: str | None) -> mqtt.Client:
    parts = urlsplit(target.url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise PublishError(f"unsupported MQTT URL scheme {parts.scheme!r}: use mqtt:// or mqtts://")
    tls = parts.scheme == "mqtts"
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"simulator-{uuid.uuid4().hex[:10]}",
        protocol=mqtt.MQTTv5,
    )
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(MAX_QUEUED)
    if tls:
        client.tls_set(ca_certs=str(target.ca_file) if target.ca_file else None)
    if username is not None:
        client.username_pw_set(username, password)
    connected = threading.Event()
    result: list[Any] = []

    def on_connect(c: mqtt.Client, u: Any, flags: Any, rc: Any, props: Any = None) -> None:
        result.append(rc)
        connected.set()

    client.on_connect = on_connect
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 0
    try:
        client.connect(
            parts.hostname or "127.0.0.1",
            parts.port or (8883 if tls else 1883),
            keepalive=30,
            clean_start=True,
            properties=props,
        )
    except (OSError, ssl.SSLError) as exc:
        raise PublishError(f"cannot connect to {target.url}: {exc}") from exc
    client.loop_start()
    if not connected.wait(10) or (result and result[0].is_failure):
        client.loop_stop()
        reason = result[0] if result else "timeout"
        raise PublishError(f"MQTT connect to {target.url} refused: {reason}")
    return client


def publish(
    sim: Simulator,
    target: MqttTarget,
    duration_s: float | None = None,
    max_messages: int | None = None,
    start: datetime | None = None,
    stop: threading.Event | None = None,
    on_progress: Callable[[SimulationReport], None] | None = None,
    messages: Iterable[Message] | None = None,
    backfill_s: float = 0.0,
) -> SimulationReport:
    """Publish ``sim``'s messages on schedule until ``duration_s`` or ``max_messages`` or ``stop``.

    Args:
        sim: the simulated city.
        target: broker URL and credentials.
        duration_s: wall-clock seconds to run; ``None`` = until stopped.
        max_messages: stop after this many messages.
        start: real time at the start (default now); see :meth:`Simulator.messages`.
        stop: set it to stop early (e.g. on SIGTERM); in-flight messages are still awaited.
        on_progress: called about 4 times a second with the running report.
        messages: publish these instead of ``sim.messages(start)`` (still paced by offset).
        backfill_s: simulated seconds of history replayed (at ``speedup``) before real time.

    Returns:
        The report: messages and readings the broker acknowledged, malformed ones, incidents.
    """
    stop = stop or threading.Event()
    clients: dict[str | None, mqtt.Client] = {}

    def client_for(vendor: str) -> mqtt.Client:
        key = vendor if vendor in target.credentials else None
        if key not in clients:
            user, pw = target.credentials.get(vendor, (target.username, target.password))
            clients[key] = _connect(target, user, pw)
        return clients[key]

    report = SimulationReport()
    pending: list[tuple[mqtt.MQTTMessageInfo, Message]] = []
    began = time.monotonic()
    last_progress = 0.0

    def settle(block: bool) -> None:
        still = []
        for info, msg in pending:
            if block and not info.is_published():
                with contextlib.suppress(RuntimeError, ValueError):
                    info.wait_for_publish(timeout=10)
            if info.is_published():
                report.messages += 1
                report.readings += msg.readings
                report.records += msg.records
                report.formats[msg.fmt] += 1
                if msg.malformed:
                    report.malformed[msg.malformed] += 1
                report.first_event = report.first_event or msg.event_time
                report.last_event = msg.event_time
            elif not block:
                still.append((info, msg))
        pending[:] = still

    source = (
        messages if messages is not None else sim.messages(start or datetime.now(UTC), backfill_s)
    )
    if max_messages is not None:
        source = itertools.islice(source, max_messages)
    try:
        for msg in source:
            if stop.is_set() or (duration_s is not None and msg.wall_offset_s >= duration_s):
                break
            ahead = msg.wall_offset_s - (time.monotonic() - began)
            if ahead > 0:
                stop.wait(ahead)
                if stop.is_set():
                    break
            client = client_for(msg.vendor)
            while True:
                info = client.publish(msg.topic, msg.payload, qos=1)
                if info.rc != mqtt.MQTT_ERR_QUEUE_SIZE:
                    break
                settle(block=False)  # broker slower than the schedule: wait, do not buffer
                time.sleep(0.01)
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                raise PublishError(f"publish failed: {mqtt.error_string(info.rc)}")
            pending.append((info, msg))
            if len(pending) >= 512:
                settle(block=False)
            now = time.monotonic()
            if on_progress is not None and now - last_progress >= 0.25:
                last_progress = now
                report.elapsed_s = now - began
                on_progress(report)
        settle(block=True)
    finally:
        for c in clients.values():
            c.disconnect()
            c.loop_stop()
        report.elapsed_s = time.monotonic() - began
        last = report.last_event
        report.incidents = [i for i in sim.incidents if last is None or i.start <= last]
    if on_progress is not None:
        on_progress(report)
    return report


async def publish_async(
    sim: Simulator,
    target: MqttTarget,
    duration_s: float | None = None,
    max_messages: int | None = None,
    start: datetime | None = None,
    stop: threading.Event | None = None,
    backfill_s: float = 0.0,
) -> SimulationReport:
    """:func:`publish` in a worker thread, for asyncio code (tests, benchmarks)."""
    return await asyncio.to_thread(
        publish,
        sim,
        target,
        duration_s,
        max_messages,
        start,
        stop,
        None,
        None,
        backfill_s,
    )
