"""The storage writer: Kafka ``readings`` + ``deadletter`` → PostgreSQL, each reading once.

Delivery: Kafka gives at-least-once (offsets are committed only after the database transaction
that stored the records has committed); the insert is idempotent (``ON CONFLICT DO NOTHING`` on
``(sensor_id, metric, ts)``, after a plain insert that a duplicate fails and a savepoint undoes:
:data:`FAST_WRITE_SQL`), and ``sensor_status`` and the late-reading markers of the rollups
are written from the rows the insert *returned*, in the same transaction. So a reading
redelivered after a crash is stored, and counted in the rollups, exactly once. On plain
PostgreSQL the writer also runs the rollup refresher (:mod:`storage.rollups`).

Backpressure: when the database fails, the batch is retried with exponential backoff while the
assigned partitions are paused (the fetcher stops; memory stays bounded by one batch plus one
fetch) and ``getmany`` keeps the consumer in its group. Readiness turns false until a write
succeeds again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from citypulse.registry import Registry, load_registry
from citypulse.service import HEALTH
from citypulse.settings import Settings
from storage import _metrics as m
from storage import rollups
from storage._decode import (
    DecodeError,
    ReadingRow,
    RejectionRow,
    decode_readings,
    decode_rejection,
)
from storage.errors import Conn, SchemaMissingError
from storage.migrate import Flavour
from storage.registry_db import load_registry_into
from storage.retention import apply_retention, tiers
from stream.kafka import ensure_topics, make_consumer

log = logging.getLogger("citypulse.storage")

GROUP_ID = "{prefix}-writer"
"""Default consumer group, formatted with the topic prefix: ``citypulse-writer`` in production,
and a separate group per prefix (per test, per staging copy) on a shared broker."""
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 5.0  # also bounds how long a SIGTERM waits during a database outage

_STAGING = """
CREATE TEMP TABLE IF NOT EXISTS staging_readings (
    ts_ms bigint, sensor_id text, metric text, value float8, quality smallint, received_ms bigint
) ON COMMIT DELETE ROWS
"""
_STAGING_COLUMNS = ("ts_ms", "sensor_id", "metric", "value", "quality", "received_ms")

# Milliseconds → timestamptz by integer interval arithmetic: exact, unlike to_timestamp(float).
_INSERT_RAW = """
ins AS (
    INSERT INTO readings (ts, sensor_id, metric, value, quality, received_at)
    SELECT 'epoch'::timestamptz + ts_ms * interval '1 millisecond', sensor_id, metric, value,
           quality, 'epoch'::timestamptz + received_ms * interval '1 millisecond'
    FROM staging_readings
    {on_conflict}
    RETURNING ts, sensor_id, metric, value, quality, received_at
), st AS (
    -- Ordered so concurrent writers (during a rebalance) lock rows in the same order.
    INSERT INTO sensor_status AS s (sensor_id, last_ts, last_received_at, readings)
    SELECT sensor_id, max(ts), max(received_at), count(*) FROM ins GROUP BY 1 ORDER BY 1
    ON CONFLICT (sensor_id) DO UPDATE SET
        last_ts = GREATEST(s.last_ts, EXCLUDED.last_ts),
        last_received_at = GREATEST(s.last_received_at, EXCLUDED.last_received_at),
        readings = s.readings + EXCLUDED.readings
)"""


def _write_sql(on_conflict: str) -> dict[Flavour, str]:
    raw = _INSERT_RAW.format(on_conflict=on_conflict)
    return {
        # TimescaleDB maintains readings_1m/1h itself (continuous aggregates); on plain
        # PostgreSQL the refresher does (storage/rollups.py), told here which readings came late.
        Flavour.TIMESCALEDB: f"WITH {raw}\nSELECT count(*) FROM ins",
        Flavour.PLAIN: f"WITH {raw},\n{rollups.MARK_LATE}\nSELECT count(*) FROM ins",
    }


WRITE_SQL = _write_sql("ON CONFLICT (sensor_id, metric, ts) DO NOTHING")
"""The checked insert: skips readings already stored (each one probes the unique index first)."""
FAST_WRITE_SQL = _write_sql("")
"""The plain insert, tried first: a batch without duplicates (the rule) costs PostgreSQL ~25 %
less this way (storage/README.md "Plain insert first"); one duplicate fails it with a unique
violation, and the batch goes the checked way."""

CHECKED_BATCHES_AFTER_DUPLICATE = 8
"""After a batch with a duplicate, the writer sends this many batches the checked way before it
tries the plain insert again: a sensor replaying its readings costs ~1/9 of a failed attempt per
batch, not one per batch."""


_INSERT_REJECTIONS = """
INSERT INTO rejections (received_at, vendor, sensor_id, reason, detail, topic, message_hash)
SELECT 'epoch'::timestamptz + ms * interval '1 millisecond', vendor, sensor_id, reason, detail,
       topic, message_hash
FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
            $7::text[]) AS t(ms, vendor, sensor_id, reason, detail, topic, message_hash)
ON CONFLICT (message_hash, received_at) DO NOTHING
"""


def _is_data_error(exc: BaseException) -> bool:
    """A data exception or constraint violation: this data can never be stored, retrying won't
    help. Everything else (connection lost, shutdown, deadlock, missing table, permission)
    might heal, so it is retried rather than dropping data."""
    return isinstance(exc, asyncpg.PostgresError) and (exc.sqlstate or "")[:2] in ("22", "23")


@dataclass(slots=True)
class _Pending:
    """Decoded records of one partition not yet stored; ``next_offset`` is what to commit."""

    next_offset: int
    readings: list[list[ReadingRow]] = field(default_factory=list)
    rejections: list[RejectionRow] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class WriteResult:
    """Rows of one transaction: readings offered and inserted, rejections offered; ``checked``
    when the readings went the checked way (:data:`WRITE_SQL`)."""

    readings: int
    inserted: int
    rejections: int
    checked: bool = False


async def write_rows(
    conn: Conn,
    flavour: Flavour,
    readings: Iterable[ReadingRow],
    rejections: list[RejectionRow],
    *,
    checked: bool = False,
) -> WriteResult:
    """Store readings and rejections in one transaction, idempotently.

    Args:
        conn: a connection with the ``staging_readings`` temp table (see :data:`_STAGING`).
        flavour: decides whether the rollups are maintained here (plain) or by TimescaleDB.
        readings: ``(ts_ms, sensor_id, metric, value, quality, received_ms)`` rows.
        rejections: rows for the ``rejections`` table.
        checked: go the checked way at once instead of trying the plain insert first.

    Returns:
        Counts; ``readings - inserted`` were already stored (duplicates).
    """
    rows = readings if isinstance(readings, list) else list(readings)
    inserted = 0
    async with conn.transaction():
        if rows:
            if flavour is Flavour.PLAIN:
                await conn.execute(rollups.LOCK_SHARED, rollups.WRITE_LOCK)
            await conn.copy_records_to_table(
                "staging_readings", records=rows, columns=_STAGING_COLUMNS
            )
            if not checked:
                try:
                    async with conn.transaction():  # a savepoint: a duplicate undoes this only
                        inserted = int(await conn.fetchval(FAST_WRITE_SQL[flavour]))
                except asyncpg.UniqueViolationError:
                    checked = True
            if checked:
                inserted = int(await conn.fetchval(WRITE_SQL[flavour]))
        if rejections:
            await conn.execute(
                _INSERT_REJECTIONS, *[list(c) for c in zip(*rejections, strict=True)]
            )
    return WriteResult(len(rows), inserted, len(rejections), checked and bool(rows))


async def _init_connection(conn: Conn) -> None:
    await conn.execute(_STAGING)
    await conn.execute(rollups.CLAIMED_TABLE)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, writer: Writer) -> None:
        self._writer = writer

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        # Waiting for the lock lets a write in flight finish and commit its offsets before the
        # partitions move; what is still pending is dropped: the new owner reads it again from
        # the committed offset, and the idempotent insert makes that harmless.
        async with self._writer._lock:
            for tp in revoked:
                dropped = self._writer._pending.pop(tp, None)
                if dropped is not None:
                    self._writer._pending_readings -= sum(map(len, dropped.readings))
                with contextlib.suppress(KeyError):
                    m.CONSUMER_LAG.remove(tp.topic, str(tp.partition))
        log.info("partitions revoked", extra={"partitions": [str(tp) for tp in revoked]})

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("partitions assigned", extra={"partitions": [str(tp) for tp in assigned]})


class Writer:
    """The ``citypulse store`` service: run it with :func:`citypulse.service.run_service`.

    Args:
        settings: process settings (database, Kafka, ``writer_batch_*``, ``retention_*``).
        registry: loaded into the database at start-up; default: read ``settings.registry``.
        group_id: Kafka consumer group (one group = one copy of the data in the database);
            default :data:`GROUP_ID` with the topic prefix.
    """

    def __init__(
        self, settings: Settings, *, registry: Registry | None = None, group_id: str | None = None
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._group_id = group_id or GROUP_ID.format(prefix=settings.topic_prefix)
        self._readings_topic = settings.topic("readings")
        self._deadletter_topic = settings.topic("deadletter")
        self._pending: dict[TopicPartition, _Pending] = {}
        self._pending_readings = 0
        self._positions: dict[TopicPartition, int] = {}
        self._lock = asyncio.Lock()
        self._checked_left = 0  # batches still to go the checked way (CHECKED_BATCHES_...)
        self._db_ok = False
        self._consuming = False
        self._flavour = Flavour.PLAIN

    # -- lifecycle ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Consume and store until ``stop`` is set; then flush, commit and return."""
        HEALTH.add("writer_db", lambda: self._db_ok)
        HEALTH.add("writer_kafka", lambda: self._consuming)
        pool = await self._connect(stop)
        if pool is None:
            return
        try:
            await self._prepare(pool)
            await ensure_topics(self._settings, ("readings", "deadletter"))
            consumer = make_consumer(self._settings, group_id=self._group_id, bulk=True)
            consumer.subscribe(
                [self._readings_topic, self._deadletter_topic], listener=_Rebalance(self)
            )
            await consumer.start()
            self._consuming = True
            try:
                async with asyncio.TaskGroup() as tg:
                    if self._flavour is Flavour.PLAIN:
                        tg.create_task(self._retention_loop(pool, stop), name="writer-retention")
                        tg.create_task(self._rollup_loop(pool, stop), name="writer-rollups")
                    await self._consume(consumer, pool, stop)
            finally:
                self._consuming = False
                await consumer.stop()
        finally:
            await pool.close()

    async def _connect(self, stop: asyncio.Event) -> asyncpg.Pool | None:
        backoff = BACKOFF_MIN_S
        while not stop.is_set():
            try:
                pool = await asyncpg.create_pool(
                    self._settings.dsn,
                    min_size=1,
                    max_size=3,  # batches, rollup refresher, retention
                    init=_init_connection,
                    command_timeout=60,
                )
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                m.DB_ERRORS.inc()
                log.warning("database unavailable, retrying", extra={"error": repr(exc)})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
            else:
                self._db_ok = True
                return pool
        return None

    async def _prepare(self, pool: asyncpg.Pool) -> None:
        async with pool.acquire() as conn:
            if await conn.fetchval("SELECT to_regclass('public.readings')") is None:
                raise SchemaMissingError("table readings is missing: run `citypulse db migrate`")
            timescale = await conn.fetchval(
                "SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'"
            )
            self._flavour = Flavour.TIMESCALEDB if timescale else Flavour.PLAIN
            registry = self._registry or load_registry(self._settings.registry)
            loaded = await load_registry_into(conn, registry)
        log.info(
            "writer ready",
            extra={
                "flavour": self._flavour.value,
                "sensors": loaded.sensors,
                "retired": loaded.retired,
                "batch_max": self._settings.writer_batch_max,
                "batch_wait_ms": self._settings.writer_batch_wait_ms,
            },
        )

    # -- consume loop ---------------------------------------------------------------------------

    async def _consume(
        self, consumer: AIOKafkaConsumer, pool: asyncpg.Pool, stop: asyncio.Event
    ) -> None:
        while not stop.is_set():
            await self._fill(consumer, stop)
            if self._pending:
                await self._flush(consumer, pool, stop)
        # Graceful stop: what was fetched is stored and committed before leaving the group.
        if self._pending:
            await self._flush(consumer, pool, stop)
        log.info("writer stopping", extra={"uncommitted_partitions": len(self._pending)})

    async def _fill(self, consumer: AIOKafkaConsumer, stop: asyncio.Event) -> None:
        """Fetch until a batch is full (``writer_batch_max`` readings) or, once the first
        record is in, ``writer_batch_wait_ms`` has passed."""
        wait_s = self._settings.writer_batch_wait_ms / 1000
        batch_max = self._settings.writer_batch_max
        started: float | None = time.monotonic() if self._pending else None
        while not stop.is_set() and self._pending_readings < batch_max:
            if started is None:
                timeout_s = 0.2  # idle: wake up now and then to notice ``stop``
            else:
                timeout_s = started + wait_s - time.monotonic()
                if timeout_s <= 0:
                    break
            got = await consumer.getmany(
                timeout_ms=max(1, int(timeout_s * 1000)),
                max_records=max(1, batch_max - self._pending_readings),
            )
            self._absorb(consumer, got)
            if started is None and self._pending:
                started = time.monotonic()

    def _absorb(
        self, consumer: AIOKafkaConsumer, got: dict[TopicPartition, list[ConsumerRecord]]
    ) -> None:
        for tp, records in got.items():
            if not records:
                continue
            pending = self._pending.get(tp)
            if pending is None:
                pending = self._pending[tp] = _Pending(records[-1].offset + 1)
            pending.next_offset = records[-1].offset + 1
            readings_topic = tp.topic == self._readings_topic
            for rec in records:
                try:
                    if readings_topic:
                        rows = decode_readings(rec.value)
                        pending.readings.append(rows)
                        self._pending_readings += len(rows)
                    else:
                        pending.rejections.append(decode_rejection(rec.value))
                except DecodeError as exc:
                    # It can never be stored; its offset is committed with the batch so it
                    # doesn't block the partition. The producer's logs/DLQ keep the evidence.
                    m.UNDECODABLE.labels(tp.topic).inc()
                    log.warning(
                        "skipped undecodable record",
                        extra={
                            "topic": tp.topic,
                            "partition": tp.partition,
                            "offset": rec.offset,
                            "error": str(exc),
                        },
                    )
            self._positions[tp] = pending.next_offset
            highwater = consumer.highwater(tp)
            if highwater is not None:
                m.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(
                    max(0, highwater - pending.next_offset)
                )

    async def _flush(
        self, consumer: AIOKafkaConsumer, pool: asyncpg.Pool, stop: asyncio.Event
    ) -> None:
        """Store everything pending, retrying with backoff; commit offsets after the commit."""
        backoff = BACKOFF_MIN_S
        while self._pending:
            async with self._lock:
                assigned = consumer.assignment()
                batch = {tp: p for tp, p in self._pending.items() if tp in assigned}
                if not batch:
                    self._clear_pending()
                    return
                try:
                    await self._store(pool, batch)
                except Exception as exc:
                    if not _is_transient(exc):
                        raise
                    m.DB_ERRORS.inc()
                    self._db_ok = False
                    log.warning(
                        "database write failed, pausing consumption and retrying",
                        extra={"error": repr(exc), "retry_in_s": backoff},
                    )
                else:
                    self._clear_pending()
                    self._db_ok = True
                    await self._commit(consumer, {tp: p.next_offset for tp, p in batch.items()})
                    if consumer.paused():
                        consumer.resume(*consumer.paused())
                        log.info("database back, consumption resumed")
                    return
            consumer.pause(*consumer.assignment())
            if stop.is_set():
                log.warning("stopping during a database outage: pending records not committed")
                return
            # Sleeping inside getmany keeps the consumer in its group (max_poll_interval_ms);
            # partitions assigned by a rebalance meanwhile may still deliver a fetch: keep it.
            self._absorb(consumer, await consumer.getmany(timeout_ms=int(backoff * 1000)))
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    def _clear_pending(self) -> None:
        self._pending.clear()
        self._pending_readings = 0

    async def _store(self, pool: asyncpg.Pool, batch: dict[TopicPartition, _Pending]) -> None:
        readings = list(
            itertools.chain.from_iterable(
                itertools.chain.from_iterable(p.readings for p in batch.values())
            )
        )
        rejections = [r for p in batch.values() for r in p.rejections]
        started = time.perf_counter()
        async with pool.acquire() as conn:
            try:
                result = await write_rows(
                    conn, self._flavour, readings, rejections, checked=self._checked_left > 0
                )
            except asyncpg.PostgresError as exc:
                if not _is_data_error(exc):
                    raise
                log.warning(
                    "batch refused by the database, storing record by record",
                    extra={"error": repr(exc)},
                )
                result = await self._store_isolated(conn, batch)
        m.WRITE_SECONDS.observe(time.perf_counter() - started)
        if result.checked:
            m.CHECKED_BATCHES.inc()
        if result.inserted < result.readings:
            self._checked_left = CHECKED_BATCHES_AFTER_DUPLICATE
        elif self._checked_left:
            self._checked_left -= 1
        m.BATCH_SIZE.observe(result.readings)
        m.STORED.inc(result.inserted)
        m.DUPLICATES.inc(result.readings - result.inserted)
        m.REJECTIONS.inc(result.rejections)

    async def _store_isolated(
        self, conn: Conn, batch: dict[TopicPartition, _Pending]
    ) -> WriteResult:
        """One transaction per Kafka record, so one poisonous record can't block the rest."""
        offered = inserted = rejected = 0
        units: list[tuple[str, list[ReadingRow], list[RejectionRow]]] = []
        for tp, p in batch.items():
            units += [(tp.topic, rows, []) for rows in p.readings]
            units += [(tp.topic, [], [row]) for row in p.rejections]
        for topic, rows, rejections in units:
            try:
                r = await write_rows(conn, self._flavour, rows, rejections)
            except asyncpg.PostgresError as exc:
                if not _is_data_error(exc):
                    raise
                m.UNDECODABLE.labels(topic).inc()
                log.warning(
                    "skipped record the database refused",
                    extra={"topic": topic, "error": repr(exc)},
                )
                continue
            offered += r.readings
            inserted += r.inserted
            rejected += r.rejections
        return WriteResult(offered, inserted, rejected)

    async def _commit(self, consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int]) -> None:
        try:
            await consumer.commit(offsets)
        except KafkaError as exc:
            # The rows are in the database; whoever gets the partition re-reads them and the
            # idempotent insert ignores them. Nothing is lost.
            log.warning("offset commit failed", extra={"error": repr(exc)})

    # -- rollups and retention (plain PostgreSQL) -----------------------------------------------

    async def _every(
        self,
        pool: asyncpg.Pool,
        stop: asyncio.Event,
        every_s: float,
        what: str,
        job: Callable[[Conn], Awaitable[None]],
    ) -> None:
        """Run ``job`` on a pooled connection every ``every_s`` until ``stop``; a transient
        failure is logged and the job runs again next time."""
        while not stop.is_set():
            try:
                async with pool.acquire() as conn:
                    await job(conn)
            except Exception as exc:
                if not _is_transient(exc):
                    raise
                log.warning(f"{what} failed", extra={"error": repr(exc)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)

    async def _rollup_loop(self, pool: asyncpg.Pool, stop: asyncio.Event) -> None:
        settle = timedelta(seconds=self._settings.rollup_settle_s)

        async def refresh(conn: Conn) -> None:
            started = time.perf_counter()
            done = await rollups.refresh_rollups(conn, settle=settle)
            if not done.busy:
                m.ROLLUP_SECONDS.observe(time.perf_counter() - started)
                m.ROLLUP_LATE.inc(done.late)
                if done.done_at is not None:
                    m.ROLLUP_DONE.set(done.done_at.timestamp())

        await self._every(pool, stop, self._settings.rollup_refresh_s, "rollup refresh", refresh)

    async def _retention_loop(self, pool: asyncpg.Pool, stop: asyncio.Event) -> None:
        tier_list = tiers(self._settings)

        async def prune(conn: Conn) -> None:
            deleted = await apply_retention(conn, tier_list, datetime.now(UTC))
            for table, n in deleted.items():
                m.RETENTION_DELETED.labels(table).inc(n)
            if any(deleted.values()):
                log.info("retention job", extra={"deleted": deleted})

        await self._every(pool, stop, self._settings.retention_check_s, "retention job", prune)


def _is_transient(exc: BaseException) -> bool:
    """Failures worth retrying: the database is away, slow, or not (yet) as expected.

    ``InternalClientError`` ("cannot switch to state ...; another operation is in progress")
    is a pooled connection left mid-operation when the server went away; the pool discards it
    on release and the retry gets a fresh one. It once stopped the writer during a database
    outage (tests/faults, 1 run in ~10).
    """
    return isinstance(
        exc,
        OSError
        | TimeoutError
        | asyncpg.PostgresError
        | asyncpg.InterfaceError
        | asyncpg.InternalClientError,
    )
