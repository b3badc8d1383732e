"""Grafana PostgreSQL macro and template-variable expansion (unit, no I/O)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from dashboards.macros import (
    MacroError,
    Variable,
    expand,
    format_interval,
    go_float,
    parse_interval,
    rfc3339nano,
)

T0 = datetime(2025, 3, 1, 10, 0, tzinfo=UTC)
T1 = datetime(2025, 3, 1, 16, 0, 0, 250000, tzinfo=UTC)


def x(sql: str, interval: timedelta = timedelta(seconds=20), **kw: object) -> str:
    return expand(sql, time_from=T0, time_to=T1, interval=interval, **kw)  # type: ignore[arg-type]


def test_time_filter_is_between_rfc3339_utc() -> None:
    """$__timeFilter becomes BETWEEN two RFC3339Nano UTC literals, fraction trimmed."""
    assert x("WHERE $__timeFilter(ts)") == (
        "WHERE ts BETWEEN '2025-03-01T10:00:00Z' AND '2025-03-01T16:00:00.25Z'"
    )
    assert x("$__timeFrom() $__timeTo()") == "'2025-03-01T10:00:00Z' '2025-03-01T16:00:00.25Z'"


def test_time_group_plain_and_timescaledb() -> None:
    """$__timeGroup is floor(epoch/N)*N, or time_bucket('N.000s',col) with TimescaleDB."""
    assert x("GROUP BY $__timeGroup(ts, '5m')") == (
        "GROUP BY floor(extract(epoch from ts)/300)*300"
    )
    assert x("GROUP BY $__timeGroup(ts, '5m')", timescaledb=True) == (
        "GROUP BY time_bucket('300.000s',ts)"
    )
    assert x("SELECT $__timeGroupAlias(ts, 1h)") == (
        'SELECT floor(extract(epoch from ts)/3600)*3600 AS "time"'
    )


def test_time_group_followed_by_comma_gets_alias_like_grafana() -> None:
    """Grafana's pre-5.3 compatibility: `$__timeGroup(...),` adds AS "time"."""
    assert x("SELECT $__timeGroup(ts, 1m), avg(v)") == (
        'SELECT floor(extract(epoch from ts)/60)*60 AS "time", avg(v)'
    )


def test_interval_variables() -> None:
    """$__interval is Grafana's truncated text form, $__interval_ms the milliseconds."""
    out = x("$__interval_ms $__interval $__timeGroup(ts, $__interval)", timedelta(seconds=90))
    assert out == "90000 1m floor(extract(epoch from ts)/60)*60"
    assert x("${__interval_ms}", timedelta(hours=2)) == "7200000"


def test_unix_epoch_macros() -> None:
    f, t = int(T0.timestamp()), int(T1.timestamp())
    assert x("$__unixEpochFilter(e)") == f"e >= {f} AND e <= {t}"
    assert x("$__unixEpochFrom() $__unixEpochTo()") == f"{f} {t}"
    assert x("$__unixEpochGroupAlias(e, 1m)") == 'floor((e)/60)*60 AS "time"'


def test_unknown_macro_and_bad_arguments_fail() -> None:
    """What Grafana refuses, we refuse: unknown macro, missing column, unit-less interval."""
    with pytest.raises(MacroError, match="unknown macro"):
        x("$__nope(ts)")
    with pytest.raises(MacroError, match="missing time column"):
        x("$__timeFilter()")
    with pytest.raises(MacroError):
        x("$__timeGroup(ts, 60)")
    with pytest.raises(MacroError):
        x("$__timeGroup(ts)")


def test_variables_single_multi_all_and_formats() -> None:
    """SQL data source formatting: multi/All are quoted lists; single is raw with '' escaping."""
    v = {
        "silo": Variable.many("water", "air"),
        "sensor": "o'brien-1",
        "one": Variable(("x",), multi=True),
    }
    assert x("silo IN ($silo)", variables=v) == "silo IN ('water','air')"
    assert x("id = '$sensor'", variables=v) == "id = 'o''brien-1'"
    assert x("id = '${sensor}'", variables=v) == "id = 'o''brien-1'"
    assert x("IN ($one)", variables=v) == "IN ('x')"
    assert x("${silo:csv}", variables=v) == "water,air"
    assert x("${silo:sqlstring}", variables=v) == "'water','air'"
    assert x("${sensor:sqlstring}", variables=v) == "'o''brien-1'"
    assert x("[[silo]]", variables=v) == "'water','air'"
    # unknown names are left for the backend, e.g. a literal $1 or macros
    assert x("$unknown $1", variables=v) == "$unknown $1"


def test_go_formats() -> None:
    assert rfc3339nano(datetime(2025, 1, 2, 3, 4, 5, 120000, tzinfo=UTC)) == (
        "2025-01-02T03:04:05.12Z"
    )
    assert [go_float(v) for v in (60, 0.5, 86400, 1e6, 1.5e7)] == [
        "60",
        "0.5",
        "86400",
        "1e+06",
        "1.5e+07",
    ]
    assert format_interval(timedelta(seconds=90)) == "1m"
    assert format_interval(timedelta(days=2, hours=3)) == "2d"
    assert format_interval(timedelta(milliseconds=500)) == "500ms"
    assert parse_interval("1h30m") == timedelta(minutes=90)
    assert parse_interval("2d") == timedelta(days=2)
    assert parse_interval("250ms") == timedelta(milliseconds=250)


def test_naive_time_range_refused() -> None:
    with pytest.raises(MacroError):
        expand("x", time_from=datetime(2025, 1, 1), time_to=T1, interval=timedelta(seconds=1))
