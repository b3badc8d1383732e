"""Backtest: replay stored readings through the engine and compare with recorded alerts.

Readings come from PostgreSQL (``readings`` joined with ``sensors``) in event-time order,
grouped into one :class:`~citypulse.events.ReadingBatch` per sensor and timestamp, and go
through one engine evaluating every scope (``scope="all"``). Time is advanced with
``engine.advance`` at each new timestamp and every ``step_s`` of gaps, then to the range end,
so staleness and ``for`` timers behave as they would have live. Nothing reads the wall clock.

Only ``firing`` and ``resolved`` events are compared, by ``(fingerprint, state, ts)``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from citypulse.events import AlertEvent, AlertState, Reading, ReadingBatch, dt_to_ms, ms_to_dt

_COMPARED = (AlertState.FIRING, AlertState.RESOLVED)

_READINGS = """
SELECT r.ts, r.sensor_id, s.vendor, r.metric, r.value, r.quality, r.received_at,
       COALESCE(m.unit, '') AS unit
FROM readings r
JOIN sensors s ON s.id = r.sensor_id
LEFT JOIN sensor_metrics m ON m.sensor_id = r.sensor_id AND m.metric = r.metric
WHERE r.ts >= $1 AND r.ts < $2
ORDER BY r.ts, r.sensor_id, r.metric
"""

_RECORDED = """
SELECT fingerprint, rule, state, ts, labels::text AS labels
FROM alert_events
WHERE ts >= $1 AND ts < $2 AND state = ANY($3::text[])
ORDER BY ts, fingerprint
"""


@dataclass(frozen=True, slots=True)
class BacktestAlert:
    """One alert state change, from the backtest or from ``alert_events``."""

    fingerprint: str
    rule: str
    state: str
    ts_ms: int
    labels: dict[str, str]

    @property
    def identity(self) -> tuple[str, str, int]:
        return (self.fingerprint, self.state, self.ts_ms)

    def as_json(self, status: str) -> dict[str, Any]:
        return {
            "status": status,
            "fingerprint": self.fingerprint,
            "rule": self.rule,
            "state": self.state,
            "ts": ms_to_dt(self.ts_ms).isoformat(),
            "labels": self.labels,
        }


@dataclass(frozen=True, slots=True)
class BacktestReport:
    """What the rules would have raised, compared with what was recorded.

    Attributes:
        new: raised by the backtest, not recorded.
        missing: recorded, not raised by the backtest.
        same: both.
        readings: readings replayed.
    """

    new: list[BacktestAlert]
    missing: list[BacktestAlert]
    same: list[BacktestAlert]
    readings: int

    def as_json(self) -> dict[str, Any]:
        rows = [
            *(a.as_json("new") for a in self.new),
            *(a.as_json("missing") for a in self.missing),
            *(a.as_json("same") for a in self.same),
        ]
        rows.sort(key=lambda r: (r["ts"], r["fingerprint"], r["state"]))
        return {
            "readings": self.readings,
            "counts": {"new": len(self.new), "missing": len(self.missing), "same": len(self.same)},
            "alerts": rows,
        }


async def _batches(
    conn: asyncpg.Connection, start: datetime, end: datetime
) -> AsyncIterator[ReadingBatch]:
    current: tuple[int, str] | None = None
    vendor = ""
    readings: list[Reading] = []
    async with conn.transaction():
        async for row in conn.cursor(_READINGS, start, end, prefetch=2000):
            ts_ms = dt_to_ms(row["ts"])
            key = (ts_ms, row["sensor_id"])
            if key != current and current is not None and readings:
                yield _batch(current, vendor, readings)
                readings = []
            current, vendor = key, row["vendor"]
            readings.append(
                Reading(
                    ts_ms=ts_ms,
                    metric=row["metric"],
                    value=row["value"],
                    unit=row["unit"],
                    quality=row["quality"] or 0,
                )
            )
        if current is not None and readings:
            yield _batch(current, vendor, readings)


def _batch(key: tuple[int, str], vendor: str, readings: list[Reading]) -> ReadingBatch:
    ts_ms, sensor = key
    return ReadingBatch(
        sensor=sensor,
        vendor=vendor,
        received_ms=ts_ms,
        source=f"backtest:{sensor}:{ts_ms}",
        readings=readings,
    )


def _from_event(e: AlertEvent) -> BacktestAlert:
    return BacktestAlert(e.fingerprint, e.rule, str(e.state), e.ts_ms, dict(e.labels))


async def backtest(
    dsn: str,
    engine: Any,
    start: datetime,
    end: datetime,
    step_s: float = 60.0,
) -> BacktestReport:
    """Replay readings in ``[start, end)`` through ``engine`` and diff with ``alert_events``.

    Args:
        dsn: PostgreSQL URL of the citypulse database.
        engine: a fresh ``rules.RuleEngine`` (its state is consumed).
        start: range start (aware datetime, inclusive).
        end: range end (aware datetime, exclusive).
        step_s: advance the engine's clock at least this often through gaps, seconds.
    """
    import orjson

    step_ms = max(1, round(step_s * 1000))
    end_ms = dt_to_ms(end)
    raised: list[AlertEvent] = []
    count = 0
    conn = await asyncpg.connect(dsn)
    try:
        clock: int | None = None
        async for batch in _batches(conn, start, end):
            ts = batch.readings[0].ts_ms
            if clock is None:
                clock = ts
            while clock + step_ms < ts:
                clock += step_ms
                raised.extend(_alerts(engine.advance(clock)))
            if ts > clock:
                clock = ts
                raised.extend(_alerts(engine.advance(clock)))
            raised.extend(_alerts(engine.process(batch, scope="all")))
            count += len(batch.readings)
        if clock is not None:
            while clock + step_ms < end_ms:
                clock += step_ms
                raised.extend(_alerts(engine.advance(clock)))
            raised.extend(_alerts(engine.advance(end_ms - 1)))
        rows = await conn.fetch(_RECORDED, start, end, [str(s) for s in _COMPARED])
    finally:
        await conn.close()
    recorded = [
        BacktestAlert(
            r["fingerprint"], r["rule"], r["state"], dt_to_ms(r["ts"]), orjson.loads(r["labels"])
        )
        for r in rows
    ]
    ours = {a.identity: a for a in map(_from_event, raised) if a.state in _COMPARED}
    theirs = {a.identity: a for a in recorded}
    return BacktestReport(
        new=[a for k, a in ours.items() if k not in theirs],
        missing=[a for k, a in theirs.items() if k not in ours],
        same=[a for k, a in ours.items() if k in theirs],
        readings=count,
    )


def _alerts(effects: Sequence[Any]) -> list[AlertEvent]:
    return [e for e in effects if isinstance(e, AlertEvent) and e.ts_ms >= 0]
