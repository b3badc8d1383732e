"""Rollups on plain PostgreSQL: minutes materialised once closed, open buckets read raw.

TimescaleDB keeps ``readings_1m``/``readings_1h`` itself (continuous aggregates). Without it,
migration 0005 makes them views over ``readings_1m_mat``/``readings_1h_mat`` (the minutes before
``rollup_state.done_1m``) and the raw rows from ``done_1m`` on. :func:`refresh_rollups`, run by
the writer every ``rollup_refresh_s``, moves ``done_1m`` forward and recomputes the minutes of
late readings, which the write transaction flags with :data:`MARK_LATE`.

Why nothing is missed or counted twice:

* ``mark_from`` (readings behind it are flagged) moves under an exclusive advisory lock that
  every write transaction holds shared (:data:`WRITE_LOCK`): once the move commits, every
  earlier write has committed and every later one sees the new mark.
* One transaction claims the dirty markers (``SKIP LOCKED``: a marker a write in flight holds
  stays for the next round; a write that finds its marker claimed waits, then leaves a new
  one), then, in later statements and so later snapshots, computes the minutes
  ``[done_1m, min(mark_from, done_1m + MAX_SPAN))`` of every sensor from the raw rows, adds
  them to their hours, recomputes the claimed (sensor, metric, minute)s and their hours, and
  moves ``done_1m``: all or nothing.
* A recomputation replaces a row only when it counts more readings (``EXCLUDED.count >
  r.count``): raw rows are only ever added, except by retention, so a recomputation after raw
  retention pruned a minute keeps the old row instead of shrinking it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from storage.errors import Conn

WRITE_LOCK = 0x43_50_52_4F_4C_57  # "CPROLW": held shared by writes, exclusive to move the mark
REFRESH_LOCK = 0x43_50_52_4F_4C_52  # "CPROLR": one refresher at a time across writers
MAX_SPAN = timedelta(minutes=5)
"""Raw time materialised per refresh, at most: catching up after an outage (writers were down,
Kafka kept the readings) stays in transactions of seconds even at 50,000 readings/s, and the
views read the raw rows meanwhile, so nothing is missing."""

LOCK_SHARED = "SELECT pg_advisory_xact_lock_shared($1)"
"""The write transaction's first statement (with :data:`WRITE_LOCK`)."""

MARK_LATE = """late AS (
    INSERT INTO rollup_dirty AS d (sensor_id, metric, bucket)
    SELECT DISTINCT sensor_id, metric, date_trunc('minute', ts, 'UTC') FROM ins
    WHERE quality = 0 AND ts < (SELECT mark_from FROM rollup_state)
    ORDER BY 1, 2, 3
    -- DO UPDATE, not NOTHING: the row lock keeps a refresher from claiming the marker before
    -- this transaction's readings are visible to it.
    ON CONFLICT (sensor_id, metric, bucket) DO UPDATE SET bucket = EXCLUDED.bucket
)"""
"""CTE of the write statement: a marker per late (sensor, metric, minute) it inserted."""

CLAIMED_TABLE = """
CREATE TEMP TABLE IF NOT EXISTS rollup_claimed (
    sensor_id text, metric text, bucket timestamptz
) ON COMMIT DELETE ROWS
"""

_CLAIM = """
WITH gone AS (
    DELETE FROM rollup_dirty
    WHERE ctid = ANY(ARRAY(SELECT ctid FROM rollup_dirty FOR UPDATE SKIP LOCKED))
    RETURNING sensor_id, metric, bucket
)
INSERT INTO rollup_claimed SELECT * FROM gone
"""

_REPLACE_1M = """
ON CONFLICT (sensor_id, metric, bucket) DO UPDATE SET
    avg = EXCLUDED.avg, min = EXCLUDED.min, max = EXCLUDED.max, count = EXCLUDED.count,
    sum = EXCLUDED.sum
WHERE EXCLUDED.count > r.count"""

_MINUTES = f"""
INSERT INTO readings_1m_mat AS r (bucket, sensor_id, metric, avg, min, max, count, sum)
SELECT date_trunc('minute', ts, 'UTC'), sensor_id, metric, avg(value), min(value), max(value),
       count(*), sum(value)
FROM readings
WHERE quality = 0 AND ts >= $1 AND ts < $2
GROUP BY 1, 2, 3{_REPLACE_1M}"""  # noqa: S608 (constants only)

_LATE_MINUTES = f"""
INSERT INTO readings_1m_mat AS r (bucket, sensor_id, metric, avg, min, max, count, sum)
SELECT k.bucket, k.sensor_id, k.metric, avg(x.value), min(x.value), max(x.value), count(*),
       sum(x.value)
FROM rollup_claimed k
JOIN readings x ON x.sensor_id = k.sensor_id AND x.metric = k.metric
               AND x.ts >= k.bucket AND x.ts < k.bucket + interval '1 minute'
WHERE x.quality = 0 AND k.bucket < $1
GROUP BY 1, 2, 3{_REPLACE_1M}"""  # noqa: S608 (constants only)

# The new minutes were not in the hour rows yet (they hold minutes before done_1m): adding them
# once is exact, and cheaper than re-reading the hour.
_ADD_HOURS = """
INSERT INTO readings_1h_mat AS r (bucket, sensor_id, metric, avg, min, max, count, sum)
SELECT date_trunc('hour', bucket, 'UTC'), sensor_id, metric, sum(sum) / sum(count), min(min),
       max(max), sum(count)::bigint, sum(sum)
FROM readings_1m_mat
WHERE bucket >= $1 AND bucket < $2
GROUP BY 1, 2, 3
ON CONFLICT (sensor_id, metric, bucket) DO UPDATE SET
    sum = r.sum + EXCLUDED.sum,
    count = r.count + EXCLUDED.count,
    avg = (r.sum + EXCLUDED.sum) / (r.count + EXCLUDED.count),
    min = LEAST(r.min, EXCLUDED.min),
    max = GREATEST(r.max, EXCLUDED.max)"""

_LATE_HOURS = f"""
INSERT INTO readings_1h_mat AS r (bucket, sensor_id, metric, avg, min, max, count, sum)
SELECT h.hour, h.sensor_id, h.metric, sum(m.sum) / sum(m.count), min(m.min), max(m.max),
       sum(m.count)::bigint, sum(m.sum)
FROM (SELECT DISTINCT sensor_id, metric, date_trunc('hour', bucket, 'UTC') AS hour
      FROM rollup_claimed WHERE bucket < $1) h
JOIN readings_1m_mat m ON m.sensor_id = h.sensor_id AND m.metric = h.metric
                      AND m.bucket >= h.hour AND m.bucket < h.hour + interval '1 hour'
WHERE m.bucket < $2
GROUP BY 1, 2, 3{_REPLACE_1M}"""  # noqa: S608 (constants only)


@dataclass(frozen=True, slots=True)
class RefreshResult:
    """What one :func:`refresh_rollups` did.

    Attributes:
        done_1m: the minute table is complete before this (the views read raw rows after).
        minutes: minute rows written (closed minutes and recomputed late ones).
        late: dirty markers claimed and recomputed.
        busy: another refresher held the lock; nothing was done.
    """

    done_1m: datetime | None
    minutes: int = 0
    late: int = 0
    busy: bool = False


def closed_minute(now: datetime, settle: timedelta) -> datetime:
    """The newest minute boundary at least ``settle`` in the past: minutes before it are closed."""
    t = now - settle
    return t.replace(second=0, microsecond=0)


def _rows(status: str) -> int:
    return int(status.split()[-1])


async def refresh_rollups(
    conn: Conn,
    now: datetime | None = None,
    *,
    settle: timedelta = timedelta(seconds=10),
    max_span: timedelta = MAX_SPAN,
) -> RefreshResult:
    """Move the rollups' watermark to the last closed minute and recompute late minutes.

    Args:
        conn: a connection with the ``rollup_claimed`` temp table (:data:`CLAIMED_TABLE`),
            of a role with the writer's grants; not inside a transaction.
        now: the wall clock (aware); default: now.
        settle: how long after its end a minute is closed; readings for a closed minute are
            late (flagged and recomputed) rather than simply included.
        max_span: raw time materialised by this call, at most.
    """
    target = closed_minute(now or datetime.now(UTC), settle)
    async with conn.transaction():
        # Not while a refresh runs: a write waiting on a claimed marker, that refresh waiting
        # on this row, this waiting on that write's shared lock would be a deadlock.
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", REFRESH_LOCK):
            return RefreshResult(None, busy=True)
        if target > await conn.fetchval("SELECT mark_from FROM rollup_state"):
            await conn.execute("SET LOCAL lock_timeout = '10s'")
            await conn.execute("SELECT pg_advisory_xact_lock($1)", WRITE_LOCK)
            await conn.execute(
                "UPDATE rollup_state SET mark_from = $1 WHERE mark_from < $1", target
            )
    async with conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", REFRESH_LOCK):
            return RefreshResult(None, busy=True)
        late = _rows(await conn.execute(_CLAIM))
        state = await conn.fetchrow("SELECT mark_from, done_1m FROM rollup_state")
        assert state is not None  # one row, made by migration 0005
        start: datetime = state["done_1m"]
        end: datetime = min(state["mark_from"], start + max_span)
        minutes = 0
        if end > start:
            minutes += _rows(await conn.execute(_MINUTES, start, end))
        if late:
            minutes += _rows(await conn.execute(_LATE_MINUTES, start))
        if end > start:
            await conn.execute(_ADD_HOURS, start, end)
            await conn.execute("UPDATE rollup_state SET done_1m = $1", end)
        if late:
            await conn.execute(_LATE_HOURS, start, end)
    return RefreshResult(end, minutes, late)
