"""Rollups on plain PostgreSQL, folded from the raw rows every few seconds.

TimescaleDB keeps ``readings_1m``/``readings_1h`` itself (continuous aggregates). Without it,
:func:`refresh_rollups`, run by the writer every ``rollup_refresh_s``, adds the good readings
of ``[done_at, now - settle)`` to both tables, moves ``rollup_state.done_at``, and recomputes
the minutes of late readings (stored behind ``mark_from``), which the write transaction flags
with :data:`MARK_LATE`. The tables hold exactly the good readings older than ``done_at``.

Why nothing is missed or counted twice:

* ``mark_from`` moves under an exclusive advisory lock that every write transaction holds
  shared (:data:`WRITE_LOCK`): once the move commits, every earlier write has committed and
  every later one sees the new mark and flags its readings behind it.
* One transaction claims the dirty markers (``SKIP LOCKED``: a marker a write in flight holds
  stays for the next round; a write that finds its marker claimed waits, then leaves a new
  one), then, in later statements and so later snapshots, adds the stretch
  ``[done_at, min(mark_from, done_at + MAX_SPAN))`` once (stretches never overlap), moves
  ``done_at``, and recomputes each claimed minute from its raw rows before ``done_at``, then its
  hour from the minute rows: all or nothing. A recomputation replaces a row, so a reading both
  added with its stretch and flagged is still counted once.
* A recomputation replaces a row only when it counts more readings (``EXCLUDED.count >
  r.count``): raw rows are only ever added, except by retention, so recomputing a minute whose
  raw rows retention pruned keeps the old row instead of shrinking it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from storage.errors import Conn

WRITE_LOCK = 0x43_50_52_4F_4C_57  # "CPROLW": held shared by writes, exclusive to move the mark
REFRESH_LOCK = 0x43_50_52_4F_4C_52  # "CPROLR": one refresher at a time across writers
SETTLE = timedelta(seconds=5)
"""Default: readings this close to now are left for the next refresh, not yet late."""
MAX_SPAN = timedelta(minutes=5)
"""Raw time folded per refresh, at most: catching up after an outage (writers were down, Kafka
kept the readings) stays in transactions of seconds even at 50,000 readings/s."""

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

_ADD = """
ON CONFLICT (sensor_id, metric, bucket) DO UPDATE SET
    sum = r.sum + EXCLUDED.sum,
    count = r.count + EXCLUDED.count,
    avg = (r.sum + EXCLUDED.sum) / (r.count + EXCLUDED.count),
    min = LEAST(r.min, EXCLUDED.min),
    max = GREATEST(r.max, EXCLUDED.max)"""

_REPLACE = """
ON CONFLICT (sensor_id, metric, bucket) DO UPDATE SET
    avg = EXCLUDED.avg, min = EXCLUDED.min, max = EXCLUDED.max, count = EXCLUDED.count,
    sum = EXCLUDED.sum
WHERE EXCLUDED.count > r.count"""

# The stretch is read once and added to both tiers.
_FOLD = f"""
WITH new AS (
    SELECT date_trunc('minute', ts, 'UTC') AS bucket, sensor_id, metric, min(value) AS min,
           max(value) AS max, count(*) AS count, sum(value) AS sum
    FROM readings
    WHERE quality = 0 AND ts >= $1 AND ts < $2
    GROUP BY 1, 2, 3
), minutes AS (
    INSERT INTO readings_1m AS r (bucket, sensor_id, metric, avg, min, max, count, sum)
    SELECT bucket, sensor_id, metric, sum / count, min, max, count, sum FROM new{_ADD}
), hours AS (
    INSERT INTO readings_1h AS r (bucket, sensor_id, metric, avg, min, max, count, sum)
    SELECT date_trunc('hour', bucket, 'UTC'), sensor_id, metric, sum(sum) / sum(count),
           min(min), max(max), sum(count)::bigint, sum(sum)
    FROM new GROUP BY 1, 2, 3{_ADD}
)
SELECT count(*) FROM new"""  # noqa: S608 (constants only)

# The minute's raw rows before done_at ($1): the later ones belong to future stretches.
_LATE_MINUTES = f"""
INSERT INTO readings_1m AS r (bucket, sensor_id, metric, avg, min, max, count, sum)
SELECT k.bucket, k.sensor_id, k.metric, avg(x.value), min(x.value), max(x.value), count(*),
       sum(x.value)
FROM rollup_claimed k
JOIN readings x ON x.sensor_id = k.sensor_id AND x.metric = k.metric
               AND x.ts >= k.bucket AND x.ts < LEAST(k.bucket + interval '1 minute', $1)
WHERE x.quality = 0
GROUP BY 1, 2, 3{_REPLACE}"""  # noqa: S608 (constants only)

_LATE_HOURS = f"""
INSERT INTO readings_1h AS r (bucket, sensor_id, metric, avg, min, max, count, sum)
SELECT h.hour, h.sensor_id, h.metric, sum(m.sum) / sum(m.count), min(m.min), max(m.max),
       sum(m.count)::bigint, sum(m.sum)
FROM (SELECT DISTINCT sensor_id, metric, date_trunc('hour', bucket, 'UTC') AS hour
      FROM rollup_claimed WHERE bucket < $1) h
JOIN readings_1m m ON m.sensor_id = h.sensor_id AND m.metric = h.metric
                  AND m.bucket >= h.hour AND m.bucket < h.hour + interval '1 hour'
GROUP BY 1, 2, 3{_REPLACE}"""  # noqa: S608 (constants only)


@dataclass(frozen=True, slots=True)
class RefreshResult:
    """What one :func:`refresh_rollups` did.

    Attributes:
        done_at: the rollup tables hold every good reading older than this.
        folded: (sensor, metric, minute) rows the new stretch added to.
        late: dirty markers claimed: minutes recomputed for late readings.
        busy: another refresher held the lock; nothing was done.
    """

    done_at: datetime | None
    folded: int = 0
    late: int = 0
    busy: bool = False


def _rows(status: str) -> int:
    return int(status.split()[-1])


async def refresh_rollups(
    conn: Conn,
    now: datetime | None = None,
    *,
    settle: timedelta = SETTLE,
    max_span: timedelta = MAX_SPAN,
) -> RefreshResult:
    """Fold the raw rows up to ``now - settle`` into the rollups; recompute late minutes.

    Args:
        conn: a connection with the ``rollup_claimed`` temp table (:data:`CLAIMED_TABLE`),
            of a role with the writer's grants; not inside a transaction.
        now: the wall clock (aware); default: now.
        settle: readings this close to ``now`` wait for the next refresh; older ones arriving
            after it are late (flagged, their minute recomputed).
        max_span: raw time folded by this call, at most.
    """
    target = ((now or datetime.now(UTC)) - settle).replace(microsecond=0)
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
        state = await conn.fetchrow("SELECT mark_from, done_at FROM rollup_state")
        assert state is not None  # one row, made by migration 0005
        done: datetime = state["done_at"]
        end: datetime = min(state["mark_from"], done + max_span)
        folded = 0
        if end > done:
            folded = int(await conn.fetchval(_FOLD, done, end))
            await conn.execute("UPDATE rollup_state SET done_at = $1", end)
            done = end
        if late:
            await conn.execute(_LATE_MINUTES, done)
            await conn.execute(_LATE_HOURS, done)
    return RefreshResult(done, folded, late)
