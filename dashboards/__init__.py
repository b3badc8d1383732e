"""Grafana dashboards as code, generated from the sensor registry (see README.md)."""

from dashboards._generate import build_all, iter_targets, silo_metrics, to_json
from dashboards._postgres import (
    POSTGRES,
    PROMETHEUS,
    PostgresQuery,
    PostgresQueryBuilder,
    SqlFormat,
)
from dashboards._provision import (
    DashboardsError,
    PushError,
    dashboards_provider_yaml,
    datasources_yaml,
    detect_timescaledb,
    push,
    write_all,
)
from dashboards._sql import Tier
from dashboards.macros import MacroError, Variable, expand

__all__ = [
    "POSTGRES",
    "PROMETHEUS",
    "DashboardsError",
    "MacroError",
    "PostgresQuery",
    "PostgresQueryBuilder",
    "PushError",
    "SqlFormat",
    "Tier",
    "Variable",
    "build_all",
    "dashboards_provider_yaml",
    "datasources_yaml",
    "detect_timescaledb",
    "expand",
    "iter_targets",
    "push",
    "silo_metrics",
    "to_json",
    "write_all",
]
