"""Time the city overview's queries over 30 days of 2,000 sensors, with and without rollups.

Run: ``python -m dashboards.bench_queries [--dsn URL] [--sensors 2000] [--days 30]
[--interval-s 60]``. Without ``--dsn`` it starts an embedded PostgreSQL in a temporary
directory. It fills a fresh database with ``generate_series`` (one metric per sensor, one
reading every ``--interval-s``), builds the rollups, then runs each city-overview query,
expanded as Grafana would for a 30-day range, three ways: auto (the interval picks
``readings_1h``), forced raw and forced 1m. Prints figures; it is not a test and asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from citypulse.registry import Location, Metric, Registry, Sensor, Silo
from dashboards import _sql
from dashboards._generate import city_overview, to_json
from dashboards.macros import Variable, expand


def _registry(n: int) -> Registry:
    silos = list(Silo)
    sensors = [
        Sensor(
            id=f"s-{i:05d}",
            vendor=f"v{i % 6}",
            silo=silos[i % len(silos)],
            district=f"d{i % 8}",
            asset=f"asset {i}",
            location=Location(lat=45.7 + (i % 100) / 1000, lon=4.8 + (i // 100) / 1000),
            interval=timedelta(minutes=1),
            metrics={"value": Metric(unit="%", min=0, max=100)},
        )
        for i in range(n)
    ]
    return Registry(city="bench", sensors=sensors)


async def _fill(
    conn: asyncpg.Connection, reg: Registry, days: int, end: datetime, interval_s: int
) -> float:
    t0 = time.perf_counter()
    await conn.executemany(
        "INSERT INTO sensors (id, vendor, silo, district, asset, lat, lon, interval_s)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        [
            (
                s.id,
                s.vendor,
                str(s.silo),
                s.district,
                s.asset,
                s.location.lat,
                s.location.lon,
                interval_s,
            )
            for s in reg
        ],
    )
    await conn.execute("INSERT INTO sensor_metrics SELECT id, 'value', '%', 0, 100 FROM sensors")
    start = end - timedelta(days=days)
    await conn.execute(
        "INSERT INTO readings (ts, sensor_id, metric, value, quality, received_at)"
        " SELECT t, s.id, 'value', 50 + 40 * sin(extract(epoch from t) / 3600 + s.n), 0, t"
        " FROM (SELECT id, row_number() OVER () AS n FROM sensors) s,"
        " generate_series($1::timestamptz, $2::timestamptz - $3::interval, $3::interval) t",
        start,
        end,
        timedelta(seconds=interval_s),
    )
    for tier, unit in (("readings_1m", "minute"), ("readings_1h", "hour")):
        await conn.execute(
            f"INSERT INTO {tier} (bucket, sensor_id, metric, avg, min, max, count, sum)"  # noqa: S608
            f" SELECT date_trunc('{unit}', ts), sensor_id, metric, avg(value), min(value),"
            " max(value), count(*), sum(value) FROM readings GROUP BY 1, 2, 3"
        )
    await conn.execute(
        "INSERT INTO sensor_status SELECT sensor_id, max(ts), max(received_at), count(*)"
        " FROM readings GROUP BY 1"
    )
    await conn.execute("VACUUM ANALYZE")
    return time.perf_counter() - t0


async def _time(conn: asyncpg.Connection, sql: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    rows = await conn.fetch(sql)
    return time.perf_counter() - t0, len(rows)


async def bench(dsn: str, sensors: int, days: int, interval_s: int) -> None:
    from storage.migrate import migrate

    await migrate(dsn)
    reg = _registry(sensors)
    end = datetime(2025, 6, 1, tzinfo=UTC)
    conn = await asyncpg.connect(dsn)
    try:
        fill_s = await _fill(conn, reg, days, end, interval_s)
        n = await conn.fetchval("SELECT count(*) FROM readings")
        print(
            f"filled {n:,} raw readings ({sensors} sensors x {days} d, one per {interval_s} s)"
            f" in {fill_s:.0f} s"
        )
        kw = {
            "time_from": end - timedelta(days=days),
            "time_to": end,
            "interval": timedelta(hours=1),  # Grafana: 30 d on ~1000 px; forces the 1h tier
            "variables": {
                "silo": Variable.many(*sorted(str(s) for s in Silo)),
                "district": Variable.many(*reg.districts()),
            },
        }
        dash = json.loads(to_json(city_overview(reg)))
        print(f"{'panel':45} {'auto (tiered)':>14} {'rows':>6}")
        for p in dash["panels"]:
            for t in p.get("targets", []):
                secs, rows = await _time(conn, expand(t["rawSql"], **kw))  # type: ignore[arg-type]
                print(f"{p['title'][:45]:45} {secs * 1000:11.1f} ms {rows:6}")
        where = _sql.in_sensors("silo IN ($silo) AND district IN ($district)")
        print(f"readings/s by silo, {days} d, by tier:")
        for tier in _sql.Tier:
            secs, rows = await _time(
                conn,
                expand(_sql.readings_per_second(where, tier=tier), **kw),  # type: ignore[arg-type]
            )
            print(f"  {tier.value:12} {secs * 1000:10.1f} ms {rows:6} rows")
        mean = _sql.series(where, "se.silo")
        print(f"mean value by silo, {days} d, by tier:")
        for tier in _sql.Tier:
            secs, rows = await _time(
                conn,
                expand(_sql.series(where, "se.silo", tier=tier), **kw),  # type: ignore[arg-type]
            )
            print(f"  {tier.value:12} {secs * 1000:10.1f} ms {rows:6} rows")
        secs, rows = await _time(conn, expand(mean, **kw))  # type: ignore[arg-type]
        print(f"  auto         {secs * 1000:10.1f} ms {rows:6} rows")
    finally:
        await conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dsn", help="empty database to fill (default: embedded PostgreSQL)")
    ap.add_argument("--sensors", type=int, default=2000)
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--interval-s", type=int, default=60, help="seconds between readings")
    args = ap.parse_args()
    if args.dsn:
        asyncio.run(bench(args.dsn, args.sensors, args.days, args.interval_s))
        return
    from deploy.embedded import Postgres

    with tempfile.TemporaryDirectory() as tmp:
        pg = Postgres(Path(tmp))
        pg.start()
        try:
            asyncio.run(bench(pg.url("postgres"), args.sensors, args.days, args.interval_s))
        finally:
            pg.stop()


if __name__ == "__main__":
    main()
