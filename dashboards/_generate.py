"""Generate the citypulse dashboards from the sensor registry with the Grafana Foundation SDK.

The registry decides the *structure* (which silo dashboards exist, which metric panels each
has, the valid-range thresholds); the *contents* (which sensors, districts, assets) come from
SQL on the registry tables at view time, through template variables, so a sensor added to the
registry and loaded into the database shows up without regenerating anything.
"""

# This module writes SQL *text* for Grafana panels, not queries run with user input: the only
# values spliced in are registry names (silo, metric), which the registry's `Name` pattern
# restricts to [a-z0-9_.-], and Grafana template variables, which Grafana itself quotes.
# ruff: noqa: S608

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import geomap, stat, statetimeline, table, timeseries
from grafana_foundation_sdk.builders import prometheus as prom
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm

from citypulse.registry import Registry
from dashboards import _sql
from dashboards._postgres import (
    POSTGRES,
    PROMETHEUS,
    PostgresAnnotationTargetBuilder,
    SqlFormat,
    sql,
)

SCHEMA_VERSION = 41
"""Dashboard JSON schema version of Grafana 12 (the SDK defaults to 36; the panel JSON it
writes is already in the current shape, and Grafana would migrate an older number on load)."""
TAGS = ["citypulse"]
PREFIX = "citypulse-"

UID_CITY = f"{PREFIX}city"
UID_DISTRICT = f"{PREFIX}district"
UID_SENSOR = f"{PREFIX}sensor"
UID_QUALITY = f"{PREFIX}quality"
UID_PIPELINE = f"{PREFIX}pipeline"


def uid_silo(silo: str) -> str:
    return f"{PREFIX}silo-{silo}"


@dataclass(frozen=True)
class MetricInfo:
    """A metric of a silo as the registry describes it (thresholds = widest valid range)."""

    name: str
    unit: str
    min: float | None
    max: float | None


def silo_metrics(registry: Registry) -> dict[str, list[MetricInfo]]:
    """Silo -> its metrics (sorted), with unit and the widest valid range across sensors."""
    acc: dict[str, dict[str, MetricInfo]] = {}
    for s in registry:
        per = acc.setdefault(str(s.silo), {})
        for name, m in s.metrics.items():
            old = per.get(name)
            if old is None:
                per[name] = MetricInfo(name, m.unit, m.min, m.max)
                continue
            lo = None if old.min is None or m.min is None else min(old.min, m.min)
            hi = None if old.max is None or m.max is None else max(old.max, m.max)
            per[name] = MetricInfo(name, old.unit, lo, hi)
    return {silo: sorted(ms.values(), key=lambda m: m.name) for silo, ms in sorted(acc.items())}


# -- building blocks --------------------------------------------------------------------------

# Grafana's "units" ids for the SenML symbols the registry uses; others are shown as suffix.
_UNITS = {
    "%": "percent",
    "bar": "pressurebar",
    "kW": "kwatt",
    "W": "watt",
    "V": "volt",
    "A": "amp",
    "ug/m3": "conμgm3",
    "Cel": "celsius",
    "km/h": "velocitykmh",
    "m3/h": "flowcmh",
    "dB": "dB",
}


def grafana_unit(unit: str) -> str:
    return _UNITS.get(unit, f"suffix: {unit}")


def _links() -> list[cogbuilder.Builder[dm.DashboardLink]]:
    return [
        db.DashboardLink("citypulse")
        .type(dm.DashboardLinkType.DASHBOARDS)
        .tags(TAGS)
        .as_dropdown(True)
        .include_vars(False)
        .keep_time(True)
    ]


def _sensor_link(field: str = "sensor") -> db.DashboardLink:
    return (
        db.DashboardLink("Sensor drill-down")
        .url(f"/d/{UID_SENSOR}?var-sensor=${{__data.fields.{field}}}&${{__url_time_range}}")
        .target_blank(False)
    )


def _dashboard(uid: str, title: str, description: str) -> db.Dashboard:
    return (
        db.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(TAGS)
        .timezone("browser")
        .editable()
        .time("now-6h", "now")
        .refresh("1m")
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .links(_links())
    )


def _query_var(
    name: str,
    label: str,
    query: str,
    *,
    multi: bool = True,
) -> db.QueryVariable:
    var = (
        db.QueryVariable(name)
        .label(label)
        .datasource(POSTGRES)
        .query(query)
        .refresh(dm.VariableRefresh.ON_DASHBOARD_LOAD)
        .sort(dm.VariableSort.ALPHABETICAL_ASC)
        .multi(multi)
        .include_all(multi)
    )
    if multi:
        var = var.current(dm.VariableOption(selected=True, text=["All"], value=["$__all"]))
    return var


VAR_SILO = "SELECT DISTINCT silo FROM sensors ORDER BY 1"
VAR_DISTRICT = "SELECT DISTINCT district FROM sensors WHERE silo IN ($silo) ORDER BY 1"
VAR_DISTRICT_ALL = "SELECT DISTINCT district FROM sensors ORDER BY 1"
VAR_SENSOR = "SELECT id FROM sensors WHERE silo IN ($silo) AND district IN ($district) ORDER BY 1"
VAR_METRIC = (
    "SELECT DISTINCT m.metric FROM sensor_metrics m JOIN sensors s ON s.id = m.sensor_id"
    " WHERE s.id = '${sensor}' ORDER BY 1"
)
VAR_VENDOR = "SELECT DISTINCT vendor FROM sensors ORDER BY 1"


def _silo_district_vars(silo: bool = True) -> list[db.QueryVariable]:
    out = [_query_var("silo", "Silo", VAR_SILO)] if silo else []
    out.append(_query_var("district", "District", VAR_DISTRICT if silo else VAR_DISTRICT_ALL))
    return out


def _alert_annotation(cond: str = "true") -> db.AnnotationQuery:
    return (
        db.AnnotationQuery()
        .name("Alert state changes")
        .datasource(POSTGRES)
        .enable(True)
        .icon_color("red")
        .target(PostgresAnnotationTargetBuilder(_sql.alert_annotations(cond)))
    )


def _thresholds(lo: float | None, hi: float | None) -> db.ThresholdsConfig:
    steps = [dm.Threshold(value=None, color="red" if lo is not None else "green")]
    if lo is not None:
        steps.append(dm.Threshold(value=lo, color="green"))
    if hi is not None:
        steps.append(dm.Threshold(value=hi, color="red"))
    return db.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps(steps)


def _timeseries(
    title: str,
    query: str,
    *,
    unit: str | None = None,
    metric: MetricInfo | None = None,
    span: int = 12,
    height: int = 8,
    description: str | None = None,
) -> timeseries.Panel:
    p = (
        timeseries.Panel()
        .title(title)
        .datasource(POSTGRES)
        .with_target(sql(query))
        .span(span)
        .height(height)
        .line_width(1)
        .fill_opacity(8)
        .legend(
            cb.VizLegendOptions()
            .display_mode(cm.LegendDisplayMode.TABLE)
            .placement(cm.LegendPlacement.RIGHT)
            .show_legend(True)
            .calcs(["mean", "min", "max", "lastNotNull"])
        )
    )
    if description:
        p = p.description(description)
    if metric is not None:
        unit = grafana_unit(metric.unit)
        if metric.min is not None or metric.max is not None:
            # Valid range from the registry: dashed lines where a reading stops being plausible.
            p = p.thresholds(_thresholds(metric.min, metric.max)).thresholds_style(
                cb.GraphThresholdsStyleConfig().mode(cm.GraphTresholdsStyleMode.DASHED)
            )
    if unit:
        p = p.unit(unit)
    return p


def _table(
    title: str,
    query: str,
    *,
    span: int = 12,
    height: int = 8,
    sensor_link: bool = False,
) -> table.Panel:
    p = (
        table.Panel()
        .title(title)
        .datasource(POSTGRES)
        .with_target(sql(query, SqlFormat.TABLE))
        .span(span)
        .height(height)
    )
    if sensor_link:
        p = p.override_by_name(
            "sensor",
            [
                dm.DynamicConfigValue(
                    id_val="links",
                    value=[
                        {
                            "title": "Sensor drill-down",
                            "url": f"/d/{UID_SENSOR}?var-sensor=${{__value.raw}}"
                            "&${__url_time_range}",
                        }
                    ],
                )
            ],
        )
    return p


_STATE_MAPPINGS: list[dm.ValueMapping] = [
    dm.ValueMap(
        options={
            "0": dm.ValueMappingResult(text="ok", color="green", index=0),
            "1": dm.ValueMappingResult(text="stale", color="orange", index=1),
            "2": dm.ValueMappingResult(text="alerting", color="red", index=2),
        }
    )
]
_ALERT_MAPPINGS: list[dm.ValueMapping] = [
    dm.ValueMap(
        options={
            "0": dm.ValueMappingResult(text="resolved", color="green", index=0),
            "1": dm.ValueMappingResult(text="pending", color="yellow", index=1),
            "2": dm.ValueMappingResult(text="firing", color="red", index=2),
        }
    )
]


def _stat(
    title: str,
    query: str,
    *,
    fields: str,
    span: int = 6,
    height: int = 4,
    color: str = "blue",
) -> stat.Panel:
    return (
        stat.Panel()
        .title(title)
        .datasource(POSTGRES)
        .with_target(sql(query, SqlFormat.TABLE))
        .span(span)
        .height(height)
        .color_scheme(db.FieldColor().mode(dm.FieldColorModeId.FIXED).fixed_color(color))
        .reduce_options(cb.ReduceDataOptions().values(True).calcs(["lastNotNull"]).fields(fields))
        .graph_mode(cm.BigValueGraphMode.NONE)
    )


def _geomap(title: str, query: str, *, span: int = 12, height: int = 12) -> geomap.Panel:
    markers = (
        cb.MapLayerOptions()
        .type("markers")
        .name("sensors")
        .location(
            cb.FrameGeometrySource()
            .mode(cm.FrameGeometrySourceMode.COORDS)
            .latitude("latitude")
            .longitude("longitude")
        )
        .tooltip(True)
        .config(
            {
                "showLegend": True,
                "style": {
                    "color": {"field": "state", "fixed": "green"},
                    "size": {"fixed": 6},
                    "opacity": 0.9,
                    "symbol": {"mode": "fixed", "fixed": "img/icons/marker/circle.svg"},
                },
            }
        )
    )
    return (
        geomap.Panel()
        .title(title)
        .datasource(POSTGRES)
        .with_target(sql(query, SqlFormat.TABLE))
        .span(span)
        .height(height)
        .view(geomap.MapViewConfig().id("fit").all_layers(True))
        .basemap(cb.MapLayerOptions().type("default").name("Basemap"))
        .layers([markers])
        .mappings(_STATE_MAPPINGS)
        .thresholds(
            db.ThresholdsConfig()
            .mode(dm.ThresholdsMode.ABSOLUTE)
            .steps(
                [
                    dm.Threshold(value=None, color="green"),
                    dm.Threshold(value=1, color="orange"),
                    dm.Threshold(value=2, color="red"),
                ]
            )
        )
        .color_scheme(db.FieldColor().mode(dm.FieldColorModeId.THRESHOLDS))
        .data_links([_sensor_link()])
    )


def _alert_timeline(title: str, cond: str = "true", *, span: int = 24) -> statetimeline.Panel:
    return (
        statetimeline.Panel()
        .title(title)
        .datasource(POSTGRES)
        .with_target(sql(_sql.alert_timeline(cond)))
        .span(span)
        .height(8)
        .mappings(_ALERT_MAPPINGS)
        .merge_values(True)
        .show_value(cm.VisibilityMode.NEVER)
        .color_scheme(db.FieldColor().mode(dm.FieldColorModeId.FIXED))
    )


def _finish(d: db.Dashboard) -> dm.Dashboard:
    model = d.build()
    model.schema_version = SCHEMA_VERSION
    # Stable panel ids in layout order: links like /d/uid?viewPanel=N keep working across builds.
    n = 0
    for p in model.panels or []:
        n += 1
        p.id_val = n
        for sub in getattr(p, "panels", None) or []:
            n += 1
            sub.id_val = n
    return model


# -- the dashboards ---------------------------------------------------------------------------

SILO_DISTRICT = "silo IN ($silo) AND district IN ($district)"


def city_overview(registry: Registry) -> dm.Dashboard:
    """1. The city at a glance: every silo side by side, the map, alerts, throughput."""
    d = _dashboard(
        UID_CITY,
        f"City overview - {registry.city}",
        "Every silo side by side: sensors reporting vs stale, active alerts, map, throughput.",
    ).time("now-24h", "now")
    for v in _silo_district_vars():
        d = d.with_variable(v)
    d = d.annotation(_alert_annotation())
    d = d.with_row(db.Row("Now"))
    d = d.with_panel(
        _stat(
            "Sensors reporting",
            _sql.status_counts("silo", SILO_DISTRICT),
            fields="/^reporting$/",
            color="green",
        )
    )
    d = d.with_panel(
        _stat(
            "Stale sensors",
            _sql.status_counts("silo", SILO_DISTRICT),
            fields="/^stale$/",
            color="orange",
        )
    )
    d = d.with_panel(
        _stat(
            "Active alerts by severity",
            _sql.active_alerts_by_severity(),
            fields="/^alerts$/",
            span=12,
            color="red",
        )
    )
    d = d.with_panel(_geomap("Sensors by state", _sql.status(SILO_DISTRICT), span=14, height=14))
    d = d.with_panel(
        _table(
            "Silos: reporting vs stale",
            _sql.status_counts("silo", SILO_DISTRICT),
            span=10,
            height=7,
        )
    )
    d = d.with_panel(_table("Active alerts", _sql.active_alerts(), span=10, height=7))
    d = d.with_row(db.Row("History"))
    d = d.with_panel(_alert_timeline("Alert timeline"))
    d = d.with_panel(
        _timeseries(
            "Readings per second by silo",
            _sql.readings_per_second(_sql.in_sensors(SILO_DISTRICT)),
            unit="reqps",
            span=24,
        )
    )
    for silo in silo_metrics(registry):
        d = d.link(
            db.DashboardLink(f"Silo: {silo}")
            .type(dm.DashboardLinkType.LINK)
            .url(f"/d/{uid_silo(silo)}")
            .keep_time(True)
        )
    return _finish(d)


def silo_dashboard(registry: Registry, silo: str, metrics: list[MetricInfo]) -> dm.Dashboard:
    """2. One silo: each metric per district and per asset, valid ranges as thresholds."""
    d = _dashboard(
        uid_silo(silo),
        f"Silo - {silo}",
        f"The {silo} silo of {registry.city}: every metric per district and per asset.",
    )
    d = d.with_variable(
        _query_var(
            "district",
            "District",
            f"SELECT DISTINCT district FROM sensors WHERE silo = '{silo}' ORDER BY 1",
        )
    )
    d = d.annotation(_alert_annotation())
    cond = f"silo = '{silo}' AND district IN ($district)"
    d = d.with_panel(_table("Sensors", _sql.status(cond), span=12, height=8, sensor_link=True))
    d = d.with_panel(
        _table("Districts: reporting vs stale", _sql.status_counts("district", cond), span=12)
    )
    for m in metrics:
        where = f"metric = '{m.name}' AND {_sql.in_sensors(cond)}"
        d = d.with_row(db.Row(f"{m.name} ({m.unit})"))
        d = d.with_panel(
            _timeseries(f"{m.name} by district", _sql.series(where, "se.district"), metric=m)
        )
        d = d.with_panel(
            _timeseries(
                f"{m.name} by asset",
                _sql.series(where, "se.asset || ' (' || se.id || ')'"),
                metric=m,
            )
        )
    return _finish(d)


def district_dashboard(registry: Registry) -> dm.Dashboard:
    """3. One district, every silo together."""
    d = _dashboard(
        UID_DISTRICT, "District view", "Every silo of one district side by side."
    ).with_variable(_query_var("district", "District", VAR_DISTRICT_ALL, multi=False))
    d = d.annotation(
        _alert_annotation(
            "(labels->>'district' = '${district}' OR coalesce(labels->>'sensor_id',"
            " labels->>'sensor') IN (SELECT id FROM sensors WHERE district = '${district}'))"
        )
    )
    cond = "district = '${district}'"
    d = d.with_panel(_stat("Reporting", _sql.status_counts("silo", cond), fields="/^reporting$/"))
    d = d.with_panel(
        _stat("Stale", _sql.status_counts("silo", cond), fields="/^stale$/", color="orange")
    )
    d = d.with_panel(_table("Sensors", _sql.status(cond), span=12, height=4, sensor_link=True))
    d = d.with_panel(_geomap("District map", _sql.status(cond), span=24, height=10))
    for silo, metrics in silo_metrics(registry).items():
        d = d.with_row(db.Row(silo))
        for m in metrics:
            silo_cond = f"silo = '{silo}' AND {cond}"
            where = f"metric = '{m.name}' AND {_sql.in_sensors(silo_cond)}"
            d = d.with_panel(
                _timeseries(f"{silo}: {m.name}", _sql.series(where, "se.asset"), metric=m, span=8)
            )
    return _finish(d)


def sensor_dashboard() -> dm.Dashboard:
    """4. One sensor: its metrics, quality flags, refused messages, alert history."""
    d = _dashboard(UID_SENSOR, "Sensor drill-down", "One sensor in detail.")
    for v in _silo_district_vars():
        d = d.with_variable(v)
    d = d.with_variable(_query_var("sensor", "Sensor", VAR_SENSOR, multi=False))
    d = d.annotation(
        _alert_annotation("coalesce(labels->>'sensor_id', labels->>'sensor') = '${sensor}'")
    )
    me = "sensor_id = '${sensor}'"
    d = d.with_panel(
        _table(
            "Registry and status",
            "SELECT se.id AS sensor, se.vendor, se.silo, se.district, se.asset, se.lat, se.lon,\n"
            "  se.interval_s, m.metric, m.unit, m.min, m.max, st.last_ts, st.last_received_at,\n"
            "  st.readings\n"
            "FROM sensors se JOIN sensor_metrics m ON m.sensor_id = se.id\n"
            "LEFT JOIN sensor_status st ON st.sensor_id = se.id\n"
            "WHERE se.id = '${sensor}' ORDER BY m.metric",
            span=24,
            height=5,
        )
    )
    d = d.with_panel(_timeseries("Metrics (mean)", _sql.series(me, "p.metric"), span=24, height=9))
    d = d.with_panel(
        _timeseries(
            "Metrics (min / max)", _sql.series(me, "p.metric || ' min'", "min(p.lo)"), span=12
        )
    )
    d = d.with_panel(
        _timeseries(
            "Quality flags (raw readings flagged per bucket)",
            "SELECT $__timeGroupAlias(ts, $__interval), metric || ' q' || quality AS metric,\n"
            "  count(*) AS value\n"
            "FROM readings WHERE sensor_id = '${sensor}' AND quality <> 0 AND $__timeFilter(ts)\n"
            "GROUP BY 1, 2 ORDER BY 1, 2",
            span=12,
            description="Readings kept but flagged (e.g. 1 = outside the registry's valid range).",
        )
    )
    d = d.with_panel(
        _table(
            "Refused messages",
            "SELECT received_at, vendor, reason, detail, topic, message_hash FROM rejections\n"
            "WHERE sensor_id = '${sensor}' AND $__timeFilter(received_at)\n"
            "ORDER BY received_at DESC LIMIT 500",
        )
    )
    d = d.with_panel(
        _table(
            "Alert history",
            "SELECT ts, state, severity, rule, rule_group, annotations->>'summary' AS summary,\n"
            '  "values"::text AS "values", notify FROM alert_events\n'
            "WHERE coalesce(labels->>'sensor_id', labels->>'sensor') = '${sensor}'\n"
            "  AND $__timeFilter(ts)\n"
            "ORDER BY ts DESC LIMIT 500",
        )
    )
    return _finish(d)


def quality_dashboard() -> dm.Dashboard:
    """5. Vendors' data quality: refusals per vendor and reason, stale sensors per vendor."""
    d = _dashboard(
        UID_QUALITY, "Vendor data quality", "Refused messages and stale sensors per vendor."
    ).with_variable(_query_var("vendor", "Vendor", VAR_VENDOR))
    d = d.with_panel(
        _timeseries(
            "Refused messages per vendor and reason",
            "SELECT $__timeGroupAlias(received_at, $__interval),\n"
            "  coalesce(vendor, '?') || ' ' || reason AS metric, count(*) AS value\n"
            "FROM rejections WHERE $__timeFilter(received_at)\n"
            "  AND (vendor IN ($vendor) OR vendor IS NULL)\n"
            "GROUP BY 1, 2 ORDER BY 1, 2",
            span=24,
        )
    )
    d = d.with_panel(
        _table(
            "Refusals by vendor and reason",
            "SELECT coalesce(vendor, '?') AS vendor, reason, count(*) AS messages,\n"
            "  count(DISTINCT sensor_id) AS sensors, max(received_at) AS last\n"
            "FROM rejections WHERE $__timeFilter(received_at)\n"
            "  AND (vendor IN ($vendor) OR vendor IS NULL)\n"
            "GROUP BY 1, 2 ORDER BY messages DESC",
        )
    )
    d = d.with_panel(
        _table(
            "Stale sensors per vendor",
            _sql.status_counts("vendor", "vendor IN ($vendor)"),
        )
    )
    d = d.with_panel(
        _table(
            "Stale sensors",
            f"SELECT * FROM ({_sql.status('vendor IN ($vendor)')}) s WHERE state = 1",
            span=24,
            sensor_link=True,
        )
    )
    return _finish(d)


def _promql(expr: str, legend: str, ref: str = "A") -> prom.Dataquery:
    return prom.Dataquery().expr(expr).legend_format(legend).ref_id(ref).range()


PIPELINE_QUERIES: dict[str, list[tuple[str, str]]] = {
    "Throughput per stage (readings/s)": [
        ("sum(rate(citypulse_collector_readings_accepted_total[$__rate_interval]))", "collected"),
        ("sum(rate(citypulse_writer_readings_stored_total[$__rate_interval]))", "stored"),
        ("sum(rate(citypulse_writer_readings_duplicate_total[$__rate_interval]))", "duplicates"),
        ("sum(rate(citypulse_rules_evaluations_total[$__rate_interval]))", "rule evaluations"),
    ],
    "Refused messages by reason (msg/s)": [
        (
            "sum by (reason) (rate(citypulse_collector_messages_refused_total[$__rate_interval]))",
            "{{reason}}",
        ),
    ],
    "Writer consumer lag (records)": [
        ("sum by (partition) (citypulse_writer_consumer_lag)", "partition {{partition}}"),
    ],
    "Write latency (s)": [
        (
            "histogram_quantile(0.5, sum by (le) (rate(citypulse_writer_write_seconds_bucket"
            "[$__rate_interval])))",
            "p50",
        ),
        (
            "histogram_quantile(0.99, sum by (le) (rate(citypulse_writer_write_seconds_bucket"
            "[$__rate_interval])))",
            "p99",
        ),
    ],
    "Collector produce latency (s)": [
        (
            "histogram_quantile(0.99, sum by (le) ("
            "rate(citypulse_collector_produce_seconds_bucket[$__rate_interval])))",
            "p99",
        ),
    ],
    "Rule evaluation (s)": [
        (
            "histogram_quantile(0.99, sum by (le) ("
            "rate(citypulse_rules_evaluation_seconds_bucket[$__rate_interval])))",
            "p99",
        ),
    ],
    "Alerts by state": [("sum by (state) (citypulse_rules_alerts)", "{{state}}")],
    "Errors": [
        ("sum(rate(citypulse_writer_db_errors_total[$__rate_interval]))", "writer db errors/s"),
        ("sum(citypulse_rules_unhealthy)", "unhealthy rules"),
        (
            "sum by (status) (rate(citypulse_rules_commands_total[$__rate_interval]))",
            "commands {{status}}",
        ),
    ],
}
"""PromQL of the pipeline dashboard, by panel (also checked by ``promtool`` in the tests)."""


def pipeline_dashboard() -> dm.Dashboard:
    """6. The health of the data pipeline itself, from the services' Prometheus metrics."""
    d = (
        _dashboard(
            UID_PIPELINE,
            "Pipeline health",
            "Collector -> Kafka -> writer / rules, from Prometheus metrics.",
        )
        .refresh("30s")
        .time("now-1h", "now")
    )
    units = {"(s)": "s", "(readings/s)": "reqps", "(msg/s)": "reqps", "(records)": "short"}
    for title, queries in PIPELINE_QUERIES.items():
        p = timeseries.Panel().title(title).datasource(PROMETHEUS).span(12).height(8)
        for i, (expr, legend) in enumerate(queries):
            p = p.with_target(_promql(expr, legend, chr(ord("A") + i)))
        unit = next((u for k, u in units.items() if title.endswith(k)), None)
        if unit:
            p = p.unit(unit)
        d = d.with_panel(p)
    return _finish(d)


def build_all(registry: Registry) -> dict[str, dm.Dashboard]:
    """Every dashboard, by file name stem (= uid)."""
    out = [city_overview(registry), district_dashboard(registry), sensor_dashboard()]
    out += [silo_dashboard(registry, s, ms) for s, ms in silo_metrics(registry).items()]
    out += [quality_dashboard(), pipeline_dashboard()]
    result: dict[str, dm.Dashboard] = {}
    for dash in out:
        assert dash.uid is not None
        result[dash.uid] = dash
    return result


def to_json(dash: dm.Dashboard) -> str:
    """Stable JSON text of a dashboard (sorted keys, 2-space indent, trailing newline)."""
    return json.dumps(dash, cls=JSONEncoder, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def iter_targets(dash_json: dict[str, object]) -> Iterable[tuple[str, dict[str, object]]]:
    """(panel title, target) of every panel target, rows included, of dashboard JSON."""
    panels = dash_json.get("panels") or []
    assert isinstance(panels, list)
    for p in panels:
        for t in p.get("targets") or []:
            yield str(p.get("title")), t
        for sub in p.get("panels") or []:
            for t in sub.get("targets") or []:
                yield str(sub.get("title")), t
