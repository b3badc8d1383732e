"""The SQL behind the panels: one place, so tests and the benchmark run exactly these texts.

Storage tiers (see ``storage/SCHEMA.md``): raw ``readings``, ``readings_1m`` and
``readings_1h`` (avg/min/max/count of GOOD readings per bucket). A panel query selects from
a ``UNION ALL`` of the three tiers, each branch guarded by Grafana's ``$__interval_ms``, so
exactly one branch contributes rows; the guards are integer constants after expansion, so
PostgreSQL folds the false branches away at plan time and never touches those tables.

Why the interval and not the range: Grafana derives ``$__interval`` from range / panel width
and rounds it to 1s, 5s, ..., 1m, 2m, 5m, ..., 1h, 2h, ...; buckets of >= 1 minute are whole
minutes and buckets of >= 1 hour whole hours, so each bucket is an exact union of rollup
buckets and a weighted average over the rollup equals the average over the raw rows. Six
hours on a dashboard ~1000 px wide gives 20 s buckets (raw), seven days 10 min (1m tier),
90 days 2-3 h (1h tier).
"""

# This module writes SQL *text* for Grafana panels, not queries run with user input: the only
# values spliced in are registry names (silo, metric), which the registry's `Name` pattern
# restricts to [a-z0-9_.-], and Grafana template variables, which Grafana itself quotes.
# ruff: noqa: S608

from __future__ import annotations

from enum import StrEnum

RAW_BELOW_MS = 60_000
"""``$__interval_ms`` below this reads raw readings."""
HOURLY_FROM_MS = 3_600_000
"""``$__interval_ms`` from this on reads ``readings_1h``; in between, ``readings_1m``."""
STALE_FACTOR = 3
"""A sensor is stale when its last reading is older than this many reporting intervals."""


class Tier(StrEnum):
    RAW = "readings"
    MINUTE = "readings_1m"
    HOUR = "readings_1h"


_GUARD = {
    Tier.RAW: f"$__interval_ms < {RAW_BELOW_MS}",
    Tier.MINUTE: f"$__interval_ms >= {RAW_BELOW_MS} AND $__interval_ms < {HOURLY_FROM_MS}",
    Tier.HOUR: f"$__interval_ms >= {HOURLY_FROM_MS}",
}


def _branch(tier: Tier, where: str, guarded: bool) -> str:
    guard = f"{_GUARD[tier]} AND " if guarded else ""
    if tier is Tier.RAW:
        # Rollups summarise good readings only; the raw branch must agree with them.
        return (
            "SELECT ts AS t, sensor_id, metric, value AS s, 1::bigint AS n,"
            " value AS lo, value AS hi FROM readings"
            f" WHERE {guard}quality = 0 AND $__timeFilter(ts) AND {where}"
        )
    return (
        'SELECT bucket AS t, sensor_id, metric, "avg" * "count" AS s, "count" AS n,'
        f' "min" AS lo, "max" AS hi FROM {tier.value}'
        f" WHERE {guard}$__timeFilter(bucket) AND {where}"
    )


def tiered(where: str, tier: Tier | None = None) -> str:
    """Rows ``(t, sensor_id, metric, s, n, lo, hi)`` from the tier the interval picks.

    Args:
        where: a condition on ``sensor_id``/``metric`` (repeated in every branch so each can
            use its ``(sensor_id, metric, ts)`` index).
        tier: force one tier without guards (tests compare tiers for the same range).

    ``s``/``n`` are the sum and count of the values, so ``sum(s)/sum(n)`` is the exact mean
    of a bucket whatever the tier.
    """
    if tier is not None:
        return _branch(tier, where, guarded=False)
    return "\n  UNION ALL\n  ".join(_branch(t, where, guarded=True) for t in Tier)


def in_sensors(cond: str) -> str:
    """``sensor_id`` restricted to the sensors matching ``cond`` (a condition on ``sensors``)."""
    return f"sensor_id IN (SELECT id FROM sensors WHERE {cond})"


def series(
    where: str,
    series_expr: str,
    value: str = "sum(p.s) / sum(p.n)",
    tier: Tier | None = None,
) -> str:
    """A long-format time series over the tiers: ``time, metric, value`` sorted by time.

    Args:
        where: condition on ``sensor_id``/``metric`` of the readings.
        series_expr: the series name, over ``p`` (the points) and ``se`` (their sensor).
        value: aggregate over the bucket (default: exact mean).
        tier: force a tier (tests).
    """
    return (
        "WITH p AS (\n  "
        + tiered(where, tier)
        + "\n)\n"
        + "SELECT $__timeGroupAlias(p.t, $__interval), "
        + f"{series_expr} AS metric, {value} AS value\n"
        + "FROM p JOIN sensors se ON se.id = p.sensor_id\n"
        + "GROUP BY 1, 2\nORDER BY 1, 2"
    )


def readings_per_second(where: str = "true", tier: Tier | None = None) -> str:
    """Readings stored per second and silo, from the counts of the chosen tier."""
    return series(
        where,
        "se.silo",
        value="sum(p.n) / ($__interval_ms / 1000.0)",
        tier=tier,
    )


def status(cond: str = "true") -> str:
    """Per sensor: registry fields, position and ``state`` (0 ok, 1 stale, 2 alerting).

    Stale means no reading for ``STALE_FACTOR`` intervals before the end of the time range
    (``sensor_status.last_ts``, event time). Alerting means a firing alert whose labels name
    the sensor (``sensor_id`` or ``sensor`` label).
    """
    return (
        "SELECT se.id AS sensor, se.silo, se.district, se.vendor, se.asset,\n"
        "  se.lat AS latitude, se.lon AS longitude, st.last_ts,\n"
        "  CASE WHEN fa.sensor IS NOT NULL THEN 2\n"
        f"       WHEN st.last_ts IS NULL OR st.last_ts < $__timeTo()::timestamptz"
        f" - make_interval(secs => {STALE_FACTOR} * se.interval_s) THEN 1\n"
        "       ELSE 0 END AS state\n"
        "FROM sensors se\n"
        "LEFT JOIN sensor_status st ON st.sensor_id = se.id\n"
        "LEFT JOIN (SELECT DISTINCT coalesce(labels->>'sensor_id', labels->>'sensor') AS sensor\n"
        "           FROM alerts_current WHERE state = 'firing') fa ON fa.sensor = se.id\n"
        f"WHERE {cond}\n"
        "ORDER BY se.id"
    )


def status_counts(group: str, cond: str = "true") -> str:
    """Sensors, reporting and stale counts per ``group`` (a column of :func:`status`)."""
    return (
        f"SELECT {group}, count(*) AS sensors,\n"
        "  count(*) FILTER (WHERE state <> 1) AS reporting,\n"
        "  count(*) FILTER (WHERE state = 1) AS stale,\n"
        "  count(*) FILTER (WHERE state = 2) AS alerting\n"
        f"FROM ({status(cond)}) s\n"
        f"GROUP BY {group} ORDER BY {group}"
    )


ALERT_STATE_CODE = (
    "CASE state WHEN 'firing' THEN 2 WHEN 'pending' THEN 1 ELSE 0 END"  # resolved/inactive: 0
)
"""Numeric alert state for state timelines (value mappings turn it back into words)."""

ALERT_SUBJECT = (
    "rule || coalesce(' ' || coalesce(labels->>'sensor_id', labels->>'sensor',"
    " labels->>'district'), '')"
)
"""Human name of an alert: its rule and the sensor or district it is about."""


def alert_timeline(cond: str = "true") -> str:
    """Alert state changes in the range as numeric series per alert (state timeline)."""
    return (
        f'SELECT ts AS "time", {ALERT_SUBJECT} AS metric, {ALERT_STATE_CODE} AS value\n'
        f"FROM alert_events WHERE $__timeFilter(ts) AND {cond}\n"
        "ORDER BY 1, 2"
    )


def alert_annotations(cond: str = "true") -> str:
    """Alert state changes as annotations (``time``, ``text``, ``tags``)."""
    return (
        'SELECT ts AS "time", '
        f"upper(state) || ' ' || severity || ': ' || {ALERT_SUBJECT}"
        " || coalesce(' - ' || (annotations->>'summary'), '') AS text,\n"
        "  rule || ',' || state || ',' || severity AS tags\n"
        f"FROM alert_events WHERE $__timeFilter(ts) AND {cond}\n"
        "ORDER BY 1"
    )


def active_alerts_by_severity(cond: str = "true") -> str:
    return (
        "SELECT severity, count(*) AS alerts FROM alerts_current\n"
        f"WHERE state = 'firing' AND {cond}\n"
        "GROUP BY severity ORDER BY severity"
    )


def active_alerts(cond: str = "true") -> str:
    return (
        "SELECT active_since, ts AS last_change, severity, state, rule, "
        f"{ALERT_SUBJECT} AS subject,\n"
        "  annotations->>'summary' AS summary, labels::text AS labels\n"
        f"FROM alerts_current WHERE state IN ('firing', 'pending') AND {cond}\n"
        "ORDER BY CASE state WHEN 'firing' THEN 0 ELSE 1 END, severity, active_since"
    )
