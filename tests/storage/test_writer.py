"""The writer end to end: tansu → Writer → PostgreSQL, including redelivery and a SIGKILL."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest
from aiokafka import TopicPartition
from prometheus_client import REGISTRY

from citypulse.events import Rejection, RejectReason
from citypulse.service import HEALTH
from citypulse.settings import Settings
from storage import Writer
from storage.writer import CHECKED_BATCHES_AFTER_DUPLICATE, _init_connection, _Pending
from stream import ensure_topics, make_producer

from .conftest import (
    T0_MS,
    count_readings,
    make_batches,
    rollup_mismatches,
    wait_for_rollups,
    wait_for_rows,
)

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


async def _produce(settings: Settings, values: list[tuple[bytes, bytes]], topic: str) -> None:
    producer = make_producer(settings)
    await producer.start()
    try:
        for key, value in values:
            await producer.send(settings.topic(topic), value, key=key)
        await producer.flush()
    finally:
        await producer.stop()


async def _run_writer(settings: Settings) -> tuple[asyncio.Event, asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(Writer(settings).run(stop), name="writer-under-test")
    return stop, task


async def test_writer_stores_each_reading_once_and_rollups_agree(migrated: Settings) -> None:
    """Batches produced twice (a redelivery) land once; rollups match the raw rows; rejections
    and undecodable records are handled without stopping the stream."""
    await ensure_topics(migrated, ("readings", "deadletter"))
    batches = make_batches(60)
    expected = count_readings(batches)
    records = [(b.sensor.encode(), b.encode()) for b in batches]
    stop, task = await _run_writer(migrated)
    try:
        await _produce(migrated, [*records, (b"x", b"{not json")], "readings")
        rej = Rejection(
            reason=RejectReason.BAD_SCHEMA,
            detail="missing ts",
            topic="citypulse/v1/a/b/up",
            vendor="a",
            sensor="b",
            received_ms=1_767_225_600_000,
            message_hash="deadbeef",
            raw_b64=base64.b64encode(b"{}").decode(),
        )
        await _produce(migrated, [(b"a", rej.encode()), (b"a", rej.encode())], "deadletter")
        assert await wait_for_rows(migrated.dsn, expected) == expected
        # Redelivery: the same records again, as after a crash before the offset commit.
        await _produce(migrated, records, "readings")
        await _produce(migrated, [(b"s", make_batches(61)[-1].encode())], "readings")
        assert await wait_for_rows(migrated.dsn, expected + 1) == expected + 1
        # The readings are hours old, so late: the writer's refresher recomputes their minutes.
        assert await wait_for_rollups(migrated.dsn) == {"readings_1m": 0, "readings_1h": 0}
        await asyncio.sleep(0.3)
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
    c = await asyncpg.connect(migrated.dsn)
    try:
        assert await c.fetchval("SELECT count(*) FROM readings") == expected + 1
        assert await rollup_mismatches(c) == {"readings_1m": 0, "readings_1h": 0}
        assert await c.fetchval("SELECT count(*) FROM rejections") == 1
        assert await c.fetchval("SELECT reason FROM rejections") == "bad_schema"
        status = await c.fetch("SELECT sensor_id, readings FROM sensor_status ORDER BY 1")
        assert sum(r["readings"] for r in status) == expected + 1
        assert await c.fetchval("SELECT count(*) FROM sensors") == 3  # registry loaded
    finally:
        await c.close()


async def test_after_a_duplicate_the_writer_checks_some_batches_then_goes_plain(
    migrated: Settings,
) -> None:
    """A batch holding a stored reading fails the plain insert; the next batches go the checked
    way at once (citypulse_writer_checked_batches_total), and the plain insert comes back after
    CHECKED_BATCHES_AFTER_DUPLICATE clean ones."""
    writer = Writer(migrated)
    pool = await asyncpg.create_pool(migrated.dsn, min_size=1, max_size=1, init=_init_connection)
    rows = [(T0_MS + i, "s1", "p", 1.0, 0, T0_MS) for i in range(100)]

    async def checked(batch: list[tuple[int, str, str, float, int, int]]) -> bool:
        before = REGISTRY.get_sample_value("citypulse_writer_checked_batches_total") or 0.0
        await writer._store(pool, {TopicPartition("r", 0): _Pending(0, readings=[batch])})
        return REGISTRY.get_sample_value("citypulse_writer_checked_batches_total") != before

    try:
        assert not await checked(rows[0:10])
        assert await checked(rows[5:20])  # a redelivery: five stored readings in it
        n = CHECKED_BATCHES_AFTER_DUPLICATE
        clean = [await checked(rows[20 + 5 * k : 25 + 5 * k]) for k in range(n + 2)]
        assert clean == [True] * n + [False] * 2
    finally:
        await pool.close()
    c = await asyncpg.connect(migrated.dsn)
    try:
        assert await c.fetchval("SELECT count(*) FROM readings") == 20 + 5 * (n + 2)
    finally:
        await c.close()


async def test_writer_rides_out_a_database_outage(migrated: Settings, stack: object) -> None:
    """With the database refusing writes the writer pauses and retries; afterwards every
    reading is stored once (no crash, no loss)."""
    await ensure_topics(migrated, ("readings", "deadletter"))
    batches = make_batches(20)
    expected = count_readings(batches)
    warmup = make_batches(1, start_ms=T0_MS - 3_600_000)
    admin = await asyncpg.connect(migrated.dsn)
    errors_before = REGISTRY.get_sample_value("citypulse_writer_db_errors_total") or 0.0
    stop, task = await _run_writer(migrated)
    try:
        # Wait until the writer demonstrably consumes (group joined, partitions assigned).
        await _produce(migrated, [(b.sensor.encode(), b.encode()) for b in warmup], "readings")
        warm = count_readings(warmup)
        assert await wait_for_rows(migrated.dsn, warm) == warm
        # The outage as the writer sees it: every write fails with a server error (as when the
        # database is restarting), until the table is back.
        await admin.execute("ALTER TABLE readings RENAME TO readings_away")
        await _produce(migrated, [(b.sensor.encode(), b.encode()) for b in batches], "readings")
        await asyncio.sleep(1.5)
        assert not task.done()
        assert HEALTH.status()["writer_db"] is False
        errors = REGISTRY.get_sample_value("citypulse_writer_db_errors_total") or 0.0
        assert errors - errors_before >= 2  # retried, with backoff
        await admin.execute("ALTER TABLE readings_away RENAME TO readings")
        assert await wait_for_rows(migrated.dsn, expected + warm) == expected + warm
        assert HEALTH.status()["writer_db"] is True
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        await admin.close()


def _writer_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CITYPULSE_")}
    env.update(
        CITYPULSE_DATABASE_URL=settings.dsn,
        CITYPULSE_KAFKA_BOOTSTRAP=settings.kafka_bootstrap,
        CITYPULSE_TOPIC_PREFIX=settings.topic_prefix,
        CITYPULSE_PARTITIONS=str(settings.partitions),
        CITYPULSE_REGISTRY=str(settings.registry),
        CITYPULSE_WRITER_BATCH_MAX="50",
        CITYPULSE_WRITER_BATCH_WAIT_MS="10",
        CITYPULSE_LOG_JSON="false",
    )
    return env


def _start_writer(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    exe = Path(sys.executable).parent / "citypulse"
    with log.open("ab") as out:
        return subprocess.Popen(
            [str(exe), "store"], env=_writer_env(settings), cwd=ROOT, stdout=out, stderr=out
        )


async def test_sigkill_mid_stream_loses_nothing_and_duplicates_nothing(
    migrated: Settings, tmp_path: Path
) -> None:
    """SIGKILL the writer process while records stream in, restart it: every reading is stored
    exactly once and the rollups still agree with the raw data."""
    await ensure_topics(migrated, ("readings", "deadletter"))
    batches = make_batches(300)
    expected = count_readings(batches)
    log = tmp_path / "writer.log"
    proc = _start_writer(migrated, log)
    try:
        producer = make_producer(migrated)
        await producer.start()
        try:
            for i, b in enumerate(batches):
                await producer.send(migrated.topic("readings"), b.encode(), key=b.sensor.encode())
                if i % 50 == 0:
                    await producer.flush()
                    await asyncio.sleep(0.02)
                if i == len(batches) // 2:
                    # Kill only once it is demonstrably writing: mid-stream, not before start.
                    await wait_for_rows(migrated.dsn, 1, timeout_s=20)
                    proc.send_signal(signal.SIGKILL)
                    proc.wait(10)
                    proc = _start_writer(migrated, log)
            await producer.flush()
        finally:
            await producer.stop()
        stored = await wait_for_rows(migrated.dsn, expected, timeout_s=30)
        assert stored == expected, log.read_text()[-3000:]
        await asyncio.sleep(0.5)  # a late duplicate would show up now
        assert await wait_for_rollups(migrated.dsn) == {"readings_1m": 0, "readings_1h": 0}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    c = await asyncpg.connect(migrated.dsn)
    try:
        assert await c.fetchval("SELECT count(*) FROM readings") == expected
        assert await rollup_mismatches(c) == {"readings_1m": 0, "readings_1h": 0}
        assert await c.fetchval("SELECT sum(readings) FROM sensor_status") == expected
    finally:
        await c.close()
