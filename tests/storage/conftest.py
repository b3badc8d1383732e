"""Storage test helpers: a small registry, migrated databases, batch builders."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import asyncpg
import pytest

from citypulse.events import Reading, ReadingBatch
from citypulse.settings import Settings
from storage import migrate

T = TypeVar("T")

REGISTRY_YAML = """\
version: 1
city: testville
sensors:
  - id: wtr-north-001
    vendor: aquasense
    silo: water
    district: north
    asset: pump-1
    location: {lat: 52.1, lon: 4.3}
    interval: 60s
    metrics:
      pressure: {unit: bar, min: 0, max: 16}
      flow: {unit: m3/h, min: 0, max: 500}
  - id: wtr-north-002
    vendor: aquasense
    silo: water
    district: north
    asset: main-2
    location: {lat: 52.2, lon: 4.4}
    interval: 60s
    metrics:
      pressure: {unit: bar, min: 0, max: 16}
  - id: air-harbour-001
    vendor: airly
    silo: air
    district: harbour
    asset: station-1
    location: {lat: 52.0, lon: 4.2}
    interval: 30s
    labels: {height: street}
    metrics:
      pm25: {unit: ug/m3, min: 0, max: 1000}
"""

SENSORS = {
    "wtr-north-001": ("pressure", "flow"),
    "wtr-north-002": ("pressure",),
    "air-harbour-001": ("pm25",),
}
# Recent, whole hour: inside every retention horizon, so the writer's retention job keeps it.
T0_MS = (int(time.time()) // 3600 - 2) * 3600 * 1000


@pytest.fixture
def registry_file(tmp_path: Path) -> Path:
    path = tmp_path / "registry.yaml"
    path.write_text(REGISTRY_YAML)
    return path


@pytest.fixture
def storage_settings(settings_factory: Callable[..., Settings], registry_file: Path) -> Settings:
    """Settings with a fresh database, unique topics and the small test registry."""
    return settings_factory(registry=registry_file, writer_batch_wait_ms=20)


@pytest.fixture
async def migrated(storage_settings: Settings) -> Settings:
    """``storage_settings`` whose database has every migration applied."""
    await migrate(storage_settings.dsn)
    return storage_settings


@pytest.fixture
async def conn(migrated: Settings) -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(migrated.dsn)
    yield c
    await c.close()


def make_batches(n: int, *, start_ms: int = T0_MS, step_ms: int = 7_000) -> list[ReadingBatch]:
    """``n`` batches per sensor, one reading per metric each, spread over several minutes and
    hours; every 10th pressure value is out of range (quality 1), as the collector flags it."""
    out = []
    for sensor, metrics in SENSORS.items():
        for i in range(n):
            ts = start_ms + i * step_ms
            readings = [
                Reading(
                    ts_ms=ts,
                    metric=m,
                    value=(i % 10 == 9 and 99.0) or float(i % 13) + 0.25 * k,
                    unit="x",
                    quality=1 if (i % 10 == 9) else 0,
                )
                for k, m in enumerate(metrics)
            ]
            out.append(
                ReadingBatch(
                    sensor=sensor,
                    vendor="v",
                    received_ms=ts + 500,
                    source=f"{sensor}-{i}",
                    readings=readings,
                )
            )
    return out


def count_readings(batches: Iterable[ReadingBatch]) -> int:
    return len({(b.sensor, r.metric, r.ts_ms) for b in batches for r in b.readings})


async def _poll(
    dsn: str,
    read: Callable[[asyncpg.Connection], Awaitable[T]],
    done: Callable[[T], bool],
    timeout_s: float,
) -> T:
    """Read every 0.1 s until ``done(value)`` or ``timeout_s``; return the last value."""
    c = await asyncpg.connect(dsn)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            value = await read(c)
            if done(value) or loop.time() > deadline:
                return value
            await asyncio.sleep(0.1)
    finally:
        await c.close()


async def wait_for_rows(
    dsn: str, expected: int, table: str = "readings", timeout_s: float = 20.0
) -> int:
    """Poll until ``table`` holds ``expected`` rows (or time out); return the last count."""

    async def count(c: asyncpg.Connection) -> int:
        return int(await c.fetchval(f"SELECT count(*) FROM {table}"))

    return await _poll(dsn, count, lambda n: n >= expected, timeout_s)


ROLLUP_MISMATCH_SQL = """
WITH truth AS (
    SELECT date_trunc({unit!r}, ts, 'UTC') AS bucket, sensor_id, metric,
           avg(value) AS avg, min(value) AS min, max(value) AS max, count(*) AS count
    FROM readings WHERE quality = 0 AND ts < $1 GROUP BY 1, 2, 3
)
SELECT count(*) FROM truth t FULL JOIN {table} r USING (bucket, sensor_id, metric)
WHERE t.count IS DISTINCT FROM r.count OR t.min IS DISTINCT FROM r.min
   OR t.max IS DISTINCT FROM r.max OR abs(t.avg - r.avg) > 1e-9 OR r.avg IS NULL
"""


async def rollup_mismatches(
    c: asyncpg.Connection, before: datetime | None = None
) -> dict[str, int]:
    """Rows where a rollup disagrees with a GROUP BY over the raw readings older than
    ``before`` (default: all of them); 0 = agree."""
    out = {}
    for table, unit in (("readings_1m", "minute"), ("readings_1h", "hour")):
        sql = ROLLUP_MISMATCH_SQL.format(unit=unit, table=table)
        out[table] = int(await c.fetchval(sql, before or datetime.max.replace(tzinfo=UTC)))
    return out


async def wait_for_rollups(dsn: str, timeout_s: float = 30.0) -> dict[str, int]:
    """Poll until the rollups agree with the raw rows (the writer's refresher has folded them
    and recomputed the late ones) or time out; return the last mismatch counts."""
    return await _poll(dsn, rollup_mismatches, lambda found: not any(found.values()), timeout_s)
