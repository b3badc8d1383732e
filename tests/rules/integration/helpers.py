"""Helpers of the runtime integration tests: produce readings, read back what the worker did."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from citypulse.events import AlertEvent, Reading, ReadingBatch
from citypulse.settings import Settings
from rules.runtime import RuleWorker, WorkerOptions
from stream import ensure_topics, make_consumer, make_producer

T = TypeVar("T")

UNITS = {"pressure": "bar", "lux": "lx"}
VENDORS = {"wtr": "aquasense", "lgt": "lumina"}


def batch(sensor: str, ts_ms: int, **values: float) -> ReadingBatch:
    return ReadingBatch(
        sensor=sensor,
        vendor=VENDORS[sensor[:3]],
        received_ms=ts_ms,
        source=uuid.uuid4().hex[:16],
        readings=[
            Reading(ts_ms=ts_ms, metric=m, value=v, unit=UNITS[m]) for m, v in values.items()
        ],
    )


async def produce(settings: Settings, *batches: ReadingBatch) -> None:
    await ensure_topics(settings)
    producer = make_producer(settings)
    await producer.start()
    try:
        for b in batches:
            await producer.send_and_wait(
                settings.topic("readings"), b.encode(), key=b.sensor.encode()
            )
    finally:
        await producer.stop()


async def eventually(
    probe: Callable[[], Awaitable[T]], ok: Callable[[T], object], timeout_s: float = 20.0
) -> T:
    """Poll ``probe`` until ``ok(result)``; fail with the last result after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = await probe()
        if ok(result):
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in {timeout_s}s; last: {result!r}")
        await asyncio.sleep(0.2)


async def alert_rows(settings: Settings) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(settings.dsn)
    try:
        rows = await conn.fetch(
            "SELECT rule, state, labels::text AS labels, notify, ts FROM alert_events ORDER BY ts"
        )
    finally:
        await conn.close()
    return [{**dict(r), "labels": json.loads(r["labels"])} for r in rows]


async def command_rows(settings: Settings) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(settings.dsn)
    try:
        return [dict(r) for r in await conn.fetch("SELECT * FROM commands ORDER BY ts")]
    finally:
        await conn.close()


async def kafka_alerts(
    settings: Settings, expect: int, timeout_s: float = 10.0
) -> list[AlertEvent]:
    """Read the alerts topic from the start until ``expect`` records (or the timeout)."""
    consumer = make_consumer(settings, settings.topic("alerts"), group_id=uuid.uuid4().hex)
    await consumer.start()
    out: list[AlertEvent] = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(out) < expect and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                out.extend(AlertEvent.decode(r.value) for r in records)
    finally:
        await consumer.stop()
    return out


@contextlib.asynccontextmanager
async def running_worker(
    settings: Settings, options: WorkerOptions | None = None
) -> AsyncIterator[RuleWorker]:
    """A :class:`RuleWorker` running in this event loop; stopped (cleanly) on exit."""
    worker = RuleWorker(
        settings, options or WorkerOptions(tick_s=0, checkpoint_s=0.5, reload_poll_s=0.2)
    )
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop), name="test-worker")
    try:
        # Ready once both stages own partitions.
        await eventually(lambda: _ready(worker, task), bool, timeout_s=30)
        yield worker
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def _ready(worker: RuleWorker, task: asyncio.Task[None]) -> bool:
    if task.done():
        task.result()  # raise what stopped it
    return all(stage.parts for stage in worker.stages)


class MqttInbox:
    """A paho subscriber collecting messages of one topic filter."""

    def __init__(self, settings: Settings, topic: str) -> None:
        from urllib.parse import urlsplit

        url = urlsplit(settings.mqtt_url)
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self._subscribed = asyncio.Event()
        loop = asyncio.get_running_loop()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:8]}")

        def on_connect(c: mqtt.Client, *_: Any) -> None:
            c.subscribe(topic, qos=1)

        def on_subscribe(*_: Any) -> None:
            loop.call_soon_threadsafe(self._subscribed.set)

        def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
            self.messages.append((msg.topic, json.loads(msg.payload)))

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = on_message
        client.connect(url.hostname or "127.0.0.1", url.port or 1883)
        client.loop_start()
        self._client = client

    async def ready(self) -> None:
        await asyncio.wait_for(self._subscribed.wait(), 10)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
