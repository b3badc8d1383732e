"""Ceilings of the raw components on this machine, with the benchmark's own payloads.

* MQTT: the bench publishers -> Mosquitto -> one bare paho subscriber process (QoS 1), the
  offered rate following what the subscriber takes.
* Kafka: aiokafka produce (batched, not awaited one by one) then consume of the collector's
  encoded records.
* PostgreSQL: ``COPY`` into the (indexed) ``readings`` table of a scratch database, in batches
  the size of the writer's.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import statistics
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
from aiokafka.structs import TopicPartition

from citypulse.settings import Settings
from deploy.bench._load import Publishers, Template, connect
from stream import ensure_topics, make_consumer, make_producer

CEILING_PREFIX = "bench-ceiling/"
"""Topic prefix of the MQTT ceiling: nothing of citypulse subscribes to it."""


def _subscriber_main(url: str, count: Any, ready: Any, stop: Any) -> None:
    """A bare paho subscriber: QoS 1, counts messages, nothing else."""
    client = connect(url, f"bench-sub-{uuid.uuid4().hex[:6]}")
    n = [0]

    def on_message(c: Any, u: Any, msg: Any) -> None:
        n[0] += 1
        count.value = n[0]

    subscribed = threading.Event()
    client.on_message = on_message
    client.on_subscribe = lambda *a, **k: subscribed.set()
    client.subscribe(CEILING_PREFIX + "#", qos=1)
    subscribed.wait(10)
    ready.set()
    stop.wait()
    client.disconnect()
    client.loop_stop()


OVERDRIVE = 1.2
"""The MQTT ceiling offers this times what the subscriber took in the last second."""


def mqtt_ceiling(
    url: str, shards: Sequence[Sequence[Template]], seconds: float, readings_per_msg: float
) -> dict[str, float]:
    """Messages/s a bare paho subscriber receives while the publishers keep it saturated.

    The offered rate follows the subscriber: each second it is :data:`OVERDRIVE` times what
    the subscriber took in the second before. Flat out, the lean publishers offer ~10 times
    what one subscriber takes, and the broker's and publishers' CPU to accept and drop that
    surplus would come out of the subscriber's core.

    Returns:
        ``messages_per_s`` and ``readings_per_s`` received (median of 1-second rates once the
        offered rate has settled), ``messages_per_s_range`` (slowest and fastest second), and
        ``published_readings_per_s`` (PUBACKed).
    """
    ctx = mp.get_context("spawn")
    count = ctx.Value("q", 0, lock=False)
    ready, stop = ctx.Event(), ctx.Event()
    sub = ctx.Process(target=_subscriber_main, args=(url, count, ready, stop), daemon=True)
    sub.start()
    ready.wait(30)
    pubs = Publishers(url, shards, topic_prefix=CEILING_PREFIX)
    pubs.start()
    try:
        offered = 10_000.0  # messages/s
        pubs.set_rate(offered * readings_per_msg)
        # Spawned publishers take a moment to import and connect.
        deadline = time.monotonic() + 30
        while count.value == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        marks = [(count.value, pubs.acked, time.monotonic())]
        saturated_at = 0  # index of the first mark of the measured seconds
        while not saturated_at or len(marks) - saturated_at <= seconds:
            time.sleep(1.0)
            marks.append((count.value, pubs.acked, time.monotonic()))
            (n0, _, t0), (n1, _, t1) = marks[-2], marks[-1]
            took = (n1 - n0) / (t1 - t0)
            if took >= 0.95 * offered and not saturated_at and len(marks) < 12:
                offered *= 1.5  # it keeps up: not the ceiling yet
            else:
                saturated_at = saturated_at or len(marks) - 1
                offered = OVERDRIVE * took
            pubs.set_rate(offered * readings_per_msg)
    finally:
        pubs.set_rate(0)
        pubs.stop()
        stop.set()
        sub.join(10)
        if sub.is_alive():
            sub.kill()
    marks = marks[saturated_at:]
    # The median of 1-second rates: one slow or fast second (the shared machine) moves a
    # single average over a few seconds by ±20 %, and every ratio against it with it.
    per_s = [(b[0] - a[0]) / (b[2] - a[2]) for a, b in itertools.pairwise(marks)]
    msgs = statistics.median(per_s)
    (_, a0, t0), (_, a1, t1) = marks[0], marks[-1]
    return {
        "messages_per_s": round(msgs, 1),
        "messages_per_s_range": [round(min(per_s), 1), round(max(per_s), 1)],
        "readings_per_s": round(msgs * readings_per_msg, 1),
        "published_readings_per_s": round((a1 - a0) / (t1 - t0), 1),
    }


async def kafka_ceiling(
    settings: Settings, records: Sequence[tuple[bytes, bytes]], total: int
) -> dict[str, float]:
    """aiokafka produce then consume ``total`` records (cycling ``records``: key, value).

    Returns:
        ``produce_records_per_s`` and ``consume_records_per_s``.
    """
    name = "bench-ceiling"
    await ensure_topics(settings, (name,))
    topic = settings.topic(name)
    producer = make_producer(settings)
    await producer.start()
    try:
        t0 = time.monotonic()
        futures = []
        for i in range(total):
            key, value = records[i % len(records)]
            futures.append(await producer.send(topic, value, key=key))
            if len(futures) >= 10_000:
                for f in futures:
                    await f
                futures.clear()
        for f in futures:
            await f
        produce_s = time.monotonic() - t0
    finally:
        await producer.stop()
    consumer = make_consumer(settings, topic, group_id=f"bench-ceiling-{uuid.uuid4().hex[:6]}")
    await consumer.start()
    try:
        got = 0
        t0 = time.monotonic()
        deadline = t0 + 120
        while got < total and time.monotonic() < deadline:
            batch: dict[TopicPartition, list[Any]] = await consumer.getmany(
                timeout_ms=500, max_records=10_000
            )
            got += sum(len(v) for v in batch.values())
        consume_s = time.monotonic() - t0
    finally:
        await consumer.stop()
    return {
        "produce_records_per_s": round(total / produce_s, 1),
        "consume_records_per_s": round(got / consume_s, 1),
    }


async def copy_ceiling(dsn: str, rows: int, batch: int = 5000) -> dict[str, float]:
    """``COPY`` ``rows`` readings into the ``readings`` table at ``dsn`` (migrated, empty).

    One transaction per ``batch`` rows (the writer's default batch size).
    """
    conn = await asyncpg.connect(dsn)
    try:
        base = datetime.now(UTC)
        sensors = [f"bench-{i:05d}" for i in range(1000)]
        t0 = time.monotonic()
        done = 0
        while done < rows:
            recs = [
                (
                    base.fromtimestamp(base.timestamp() + (done + i) / 1000, UTC),
                    sensors[(done + i) % 1000],
                    "pressure",
                    5.6,
                    0,
                    base,
                )
                for i in range(min(batch, rows - done))
            ]
            async with conn.transaction():
                await conn.copy_records_to_table(
                    "readings",
                    records=recs,
                    columns=["ts", "sensor_id", "metric", "value", "quality", "received_at"],
                )
            done += len(recs)
        elapsed = time.monotonic() - t0
    finally:
        await conn.close()
    return {"rows_per_s": round(rows / elapsed, 1)}
