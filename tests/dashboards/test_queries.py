"""Every panel query of every dashboard runs on a real, migrated, filled database (integration).

Queries are expanded exactly as Grafana's PostgreSQL data source would (dashboards.macros), run
as the read-only role ``citypulse_grafana``, over three ranges that pick the three tiers.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from citypulse.registry import Registry, load_registry
from citypulse.settings import Settings
from dashboards import SqlFormat, Tier, Variable, build_all, expand, iter_targets, to_json
from dashboards._sql import series
from storage.migrate import migrate
from storage.registry_db import load_registry_into

from .test_generate import ROOT

pytestmark = pytest.mark.integration

END = datetime(2025, 6, 2, 12, 0, tzinfo=UTC)
HOURS = 3
STALE_SENSOR_INDEX = 0  # this sensor stops reporting an hour before END


async def _fill(conn: asyncpg.Connection, reg: Registry) -> None:
    """3 h of minute readings for every sensor and metric; rollups as the writer keeps them."""
    rows = []
    start = END - timedelta(hours=HOURS)
    for i, s in enumerate(reg):
        last = END - timedelta(hours=1) if i == STALE_SENSOR_INDEX else END
        for k, (name, m) in enumerate(s.metrics.items()):
            lo = m.min if m.min is not None else 0.0
            hi = m.max if m.max is not None else lo + 100
            t = start
            n = 0
            while t < last:
                v = lo + (hi - lo) * (0.5 + 0.4 * math.sin(n / 17 + i + k))
                q = 1 if n % 97 == 5 else 0
                if q:
                    v = hi + 1
                for sec in (0, 20, 40):
                    rows.append((t + timedelta(seconds=sec), s.id, name, v + sec / 100, q, t))
                t += timedelta(minutes=1)
                n += 1
    await conn.copy_records_to_table(
        "readings",
        records=rows,
        columns=["ts", "sensor_id", "metric", "value", "quality", "received_at"],
    )
    for tier, unit in (("readings_1m", "minute"), ("readings_1h", "hour")):
        await conn.execute(
            f"INSERT INTO {tier} (bucket, sensor_id, metric, avg, min, max, count, sum)"
            f" SELECT date_trunc('{unit}', ts), sensor_id, metric, avg(value), min(value),"
            " max(value), count(*), sum(value) FROM readings WHERE quality = 0 GROUP BY 1, 2, 3"
        )
    await conn.execute(
        "INSERT INTO sensor_status SELECT sensor_id, max(ts), max(received_at), count(*)"
        " FROM readings GROUP BY 1"
    )
    s0 = reg.sensors[1]
    await conn.execute(
        "INSERT INTO rejections VALUES ($1, $2, $3, 'unknown_metric', 'no metric x', 't', 'h1'),"
        " ($1, $2, $3, 'bad_schema', 'missing ts', 't', 'h2')",
        END - timedelta(minutes=30),
        s0.vendor,
        s0.id,
    )
    for state, minutes in (("pending", 50), ("firing", 45), ("resolved", 10)):
        await conn.execute(
            "INSERT INTO alert_events (fingerprint, rule, rule_version, rule_group, state,"
            " severity, labels, annotations, ts, evaluated_at)"
            " VALUES ('fp1', 'low_pressure', 'v1', 'water', $1, 'critical', $2, $3, $4, $4)",
            state,
            json.dumps({"sensor_id": s0.id, "district": s0.district}),
            json.dumps({"summary": "pressure low"}),
            END - timedelta(minutes=minutes),
        )
    await conn.execute(
        "INSERT INTO alert_events (fingerprint, rule, rule_version, rule_group, state,"
        " severity, labels, ts, evaluated_at)"
        " VALUES ('fp2', 'pm25_high', 'v1', 'air', 'firing', 'warning', $1, $2, $2)",
        json.dumps({"sensor_id": reg.sensors[2].id}),
        END - timedelta(minutes=5),
    )


@pytest.fixture
async def city(settings: Settings) -> AsyncIterator[tuple[asyncpg.Connection, Registry]]:
    reg = load_registry(ROOT / "deploy" / "registry.example.yaml")
    await migrate(settings.dsn)
    conn = await asyncpg.connect(settings.dsn)
    try:
        await load_registry_into(conn, reg)
        await _fill(conn, reg)
        # Grafana logs in as the read-only role: every panel must work with SELECT only.
        await conn.execute("SET ROLE citypulse_grafana")
        yield conn, reg
    finally:
        await conn.close()


RANGES = {
    # range, Grafana's interval for a ~1000 px panel, tier it should read
    "6h/raw": (timedelta(hours=6), timedelta(seconds=20)),
    "2d/1m": (timedelta(days=2), timedelta(minutes=5)),
    "30d/1h": (timedelta(days=30), timedelta(hours=1)),
}


async def _variables(conn: asyncpg.Connection, reg: Registry) -> dict[str, Variable]:
    """Template variables at 'All' (every option value, as Grafana sends it)."""
    silos = sorted({str(s.silo) for s in reg})
    return {
        "silo": Variable.many(*silos),
        "district": Variable.many(*reg.districts()),
        "vendor": Variable.many(*reg.vendors()),
        "sensor": Variable.single(reg.sensors[1].id),
    }


async def _dashboard_variables(
    conn: asyncpg.Connection, data: dict[str, Any], time_from: datetime, interval: timedelta
) -> dict[str, Variable]:
    """Resolve a dashboard's variables in order, as Grafana does: run each variable's query
    (expanded with the ones before it); multi -> All (every option), single -> first option."""
    out: dict[str, Variable] = {}
    for v in data["templating"].get("list", []):
        sql = expand(v["query"], time_from=time_from, time_to=END, interval=interval, variables=out)
        options = [str(r[0]) for r in await conn.fetch(sql)]
        assert options, f"variable {v['name']} has no options"
        if v.get("multi") or v.get("includeAll"):
            out[v["name"]] = Variable(tuple(options), multi=bool(v.get("multi")), include_all=True)
        else:
            out[v["name"]] = Variable.single(options[0])
    return out


async def _run(conn: asyncpg.Connection, sql: str) -> list[asyncpg.Record]:
    return list(await conn.fetch(sql))


async def test_every_panel_query_runs_and_has_the_panel_shape(
    city: tuple[asyncpg.Connection, Registry],
) -> None:
    """All SQL targets, variables and annotations execute as citypulse_grafana on 3 ranges."""
    conn, reg = city
    checked = 0
    nonempty_series = 0
    for label, (span, interval) in RANGES.items():
        for uid, dash in build_all(reg).items():
            data: dict[str, Any] = json.loads(to_json(dash))
            targets = list(iter_targets(data))
            variables = await _dashboard_variables(conn, data, END - span, interval)
            geomaps = {p["title"] for p in data["panels"] if p["type"] == "geomap"}
            for v in data["templating"].get("list", []):
                if v.get("type") == "query":
                    targets.append((f"var {v['name']}", {"rawSql": v["query"], "format": "table"}))
            for a in data["annotations"].get("list", []):
                targets.append((f"annotation {a['name']}", a["target"]))
            for title, target in targets:
                if "rawSql" not in target:
                    continue  # PromQL (pipeline dashboard)
                sql = expand(
                    target["rawSql"],
                    time_from=END - span,
                    time_to=END,
                    interval=interval,
                    variables=variables,
                )
                where = f"{label} {uid} / {title}"
                try:
                    rows = await _run(conn, sql)
                except asyncpg.PostgresError as exc:
                    pytest.fail(f"{where}: {exc}\n{sql}")
                checked += 1
                if target.get("format") == SqlFormat.TIME_SERIES and rows:
                    nonempty_series += 1
                    assert next(iter(rows[0].keys())) == "time", where
                    times = [r["time"] for r in rows]
                    assert times == sorted(times), f"{where}: time not ascending"
                if title in geomaps:
                    assert rows, where
                    assert {"latitude", "longitude", "state"} <= set(rows[0].keys()), where
    assert checked > 250  # 89 SQL targets, variables and annotations x 3 ranges
    assert nonempty_series > 100


async def test_stale_alerting_and_ok_states(city: tuple[asyncpg.Connection, Registry]) -> None:
    """The map's state: stale sensor = 1, sensor with a firing alert = 2, others 0."""
    conn, reg = city
    dash = json.loads(to_json(build_all(reg)["citypulse-city"]))
    geo = next(p for p in dash["panels"] if p["type"] == "geomap")
    sql = expand(
        geo["targets"][0]["rawSql"],
        time_from=END - timedelta(hours=6),
        time_to=END,
        interval=timedelta(seconds=20),
        variables=await _variables(conn, reg),
    )
    state = {r["sensor"]: r["state"] for r in await conn.fetch(sql)}
    assert len(state) == len(reg)
    assert state[reg.sensors[STALE_SENSOR_INDEX].id] == 1
    assert state[reg.sensors[2].id] == 2  # pm25_high firing
    assert state[reg.sensors[1].id] == 0  # its alert resolved
    assert sum(1 for v in state.values() if v == 0) == len(reg) - 2


async def test_tiers_agree_for_the_same_range(city: tuple[asyncpg.Connection, Registry]) -> None:
    """Raw, 1m and 1h tiers give the same hourly means; the auto query picks the right one."""
    conn, reg = city
    sensor = reg.sensors[3]
    metric = next(iter(sensor.metrics))
    where = f"sensor_id = '{sensor.id}' AND metric = '{metric}'"
    kw: dict[str, Any] = {
        "time_from": END - timedelta(hours=HOURS),
        "time_to": END,
        "interval": timedelta(hours=1),
    }
    results = {}
    for tier in Tier:
        rows = await conn.fetch(expand(series(where, "p.metric", tier=tier), **kw))
        results[tier] = [(r["time"], r["value"]) for r in rows]
    assert len(results[Tier.RAW]) == HOURS
    for tier in (Tier.MINUTE, Tier.HOUR):
        assert [t for t, _ in results[tier]] == [t for t, _ in results[Tier.RAW]]
        for (_, a), (_, b) in zip(results[tier], results[Tier.RAW], strict=True):
            assert a == pytest.approx(b, rel=1e-9)
    auto = await conn.fetch(expand(series(where, "p.metric"), **kw))
    assert [(r["time"], r["value"]) for r in auto] == results[Tier.HOUR]
    # With a 1 m interval the auto query reads readings_1m; same means per minute as raw.
    kw["interval"] = timedelta(minutes=1)
    auto_m = await conn.fetch(expand(series(where, "p.metric"), **kw))
    raw_m = await conn.fetch(expand(series(where, "p.metric", tier=Tier.RAW), **kw))
    assert len(auto_m) == len(raw_m) > 100
    for a, b in zip(auto_m, raw_m, strict=True):
        assert a["value"] == pytest.approx(b["value"], rel=1e-9)
    plan = await conn.fetch("EXPLAIN " + expand(series(where, "p.metric"), **kw))
    text = "\n".join(r[0] for r in plan)
    assert "readings_1m" in text
    assert "readings_1h" not in text  # the false guards are folded away at plan time


async def test_timescaledb_variant(city: tuple[asyncpg.Connection, Registry]) -> None:
    """With the TimescaleDB option $__timeGroup becomes time_bucket; executed only if present."""
    conn, _ = city
    sql = expand(
        series("true", "p.metric"),
        time_from=END - timedelta(hours=6),
        time_to=END,
        interval=timedelta(minutes=5),
        timescaledb=True,
    )
    assert "time_bucket('300.000s',p.t) AS \"time\"" in sql
    has_ts = await conn.fetchval("SELECT count(*) FROM pg_extension WHERE extname='timescaledb'")
    if has_ts:
        assert await conn.fetch(sql)
    else:
        # Plain PostgreSQL (this machine): the function does not exist, as expected.
        with pytest.raises(asyncpg.UndefinedFunctionError):
            await conn.fetch(sql)
