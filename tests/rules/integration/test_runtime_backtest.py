"""Backtest on readings stored in PostgreSQL, compared with recorded alert events."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from typer.testing import CliRunner

from citypulse.registry import load_registry
from citypulse.settings import Settings
from rules import RuleEngine
from rules.runtime import RuleSource, backtest
from storage.registry_db import load_registry_into

from .conftest import DATA
from .test_runtime_crash import _env

pytestmark = pytest.mark.integration

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)


async def _store(settings: Settings) -> None:
    """Two low-pressure episodes at wtr-0001, one at wtr-0003; all minute-spaced."""
    values = {
        "wtr-0001": [3.0, 1.5, 1.4, 3.1, 3.0, 1.0, 3.2, 3.0],
        "wtr-0003": [3.0, 3.0, 1.2, 1.1, 2.2, 2.9, 3.0, 3.0],
    }
    conn = await asyncpg.connect(settings.dsn)
    try:
        await load_registry_into(conn, load_registry(DATA / "registry.yaml"))
        await conn.executemany(
            "INSERT INTO readings (ts, sensor_id, metric, value, quality, received_at)"
            " VALUES ($1, $2, 'pressure', $3, 0, $1)",
            [
                (T0 + timedelta(minutes=i), sensor, v)
                for sensor, vs in values.items()
                for i, v in enumerate(vs)
            ],
        )
    finally:
        await conn.close()


def ms(minutes: int) -> int:
    return round((T0 + timedelta(minutes=minutes)).timestamp() * 1000)


def _engine(settings: Settings) -> RuleEngine:
    registry = load_registry(DATA / "registry.yaml")
    return RuleEngine(RuleSource(settings.rules, registry).load().ruleset, registry)


async def test_backtest_reports_when_alerts_would_have_fired(rt_settings: Settings) -> None:
    """Replaying stored readings finds each episode's firing and resolved times; compared with
    alert_events, recorded ones are 'same', unrecorded 'new', and recorded-only 'missing'."""
    await _store(rt_settings)
    end = T0 + timedelta(hours=1)
    first = await backtest(rt_settings.dsn, _engine(rt_settings), T0, end)
    assert first.readings == 16
    got = sorted(
        (a.labels["sensor"], a.state, a.ts_ms) for a in first.new if a.rule == "WaterLowPressure"
    )
    assert got == [
        ("wtr-0001", "firing", ms(1)),
        ("wtr-0001", "firing", ms(5)),
        ("wtr-0001", "resolved", ms(3)),
        ("wtr-0001", "resolved", ms(6)),
        ("wtr-0003", "firing", ms(2)),
        ("wtr-0003", "resolved", ms(5)),
    ]
    assert first.same == []
    assert first.missing == []

    # Record one of them as really raised, plus one the rules would not raise.
    real = next(a for a in first.new if a.state == "firing" and a.ts_ms == ms(1))
    conn = await asyncpg.connect(rt_settings.dsn)
    try:
        for fp, state, minute in ((real.fingerprint, "firing", 1), ("deadbeef", "firing", 30)):
            await conn.execute(
                "INSERT INTO alert_events (fingerprint, rule, rule_version, rule_group, state,"
                " severity, ts, evaluated_at) VALUES ($1, 'WaterLowPressure', 'x', 'water', $2,"
                " 'critical', $3, $3)",
                fp,
                state,
                T0 + timedelta(minutes=minute),
            )
    finally:
        await conn.close()
    second = await backtest(rt_settings.dsn, _engine(rt_settings), T0, end)
    assert [a.ts_ms for a in second.same] == [ms(1)]
    assert [a.fingerprint for a in second.missing] == ["deadbeef"]
    assert len(second.new) == len(first.new) - 1

    # The command line gives the same answer as JSON.
    from citypulse.cli import app

    # The CLI installs its log handler on the runner's (soon closed) stderr: put ours back.
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        await _cli_checks(app, rt_settings, end, second.new)
    finally:
        root.handlers[:], root.level = saved[0], saved[1]


async def _cli_checks(app: Any, rt_settings: Settings, end: datetime, new: list[Any]) -> None:
    result = await asyncio.to_thread(
        CliRunner().invoke,
        app,
        ["rules", "backtest", "--from", T0.isoformat(), "--to", end.isoformat(), "--json"],
        env=_env(rt_settings),
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["counts"] == {"new": len(new), "missing": 1, "same": 1}
    table = await asyncio.to_thread(
        CliRunner().invoke,
        app,
        ["rules", "backtest", "--from", T0.isoformat(), "--to", end.isoformat()],
        env={**_env(rt_settings), "COLUMNS": "200"},
    )
    assert table.exit_code == 0, table.output
    assert "missing" in table.stdout
    assert "sensor=wtr-0003" in table.stdout
    assert f"new {len(new)}, missing 1, same 1" in table.stdout
