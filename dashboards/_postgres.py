"""A typed PostgreSQL data query for the Grafana Foundation SDK, which ships none.

The SDK's cog runtime dispatches a target's JSON to a *dataquery variant* by its data source
type; registering ours means dashboards we generate also load back into typed objects
(``Dashboard.from_json``) instead of an opaque ``UnknownDataquery`` bag.
"""

from __future__ import annotations

import typing
from enum import StrEnum

from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import runtime as cogruntime
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.models import dashboard as dm

POSTGRES_TYPE = "grafana-postgresql-datasource"
"""Plugin id of Grafana's built-in PostgreSQL data source (Grafana >= 10.2)."""
POSTGRES_UID = "citypulse-pg"
PROMETHEUS_UID = "citypulse-prom"

POSTGRES = dm.DataSourceRef(type_val=POSTGRES_TYPE, uid=POSTGRES_UID)
"""Reference to the provisioned citypulse PostgreSQL data source (stable uid)."""
PROMETHEUS = dm.DataSourceRef(type_val="prometheus", uid=PROMETHEUS_UID)
"""Reference to the provisioned Prometheus data source (stable uid)."""


class SqlFormat(StrEnum):
    """How Grafana turns the rows into data frames."""

    TIME_SERIES = "time_series"
    """Needs a ``time`` column sorted ascending; other text columns name the series."""
    TABLE = "table"


class PostgresQuery(cogvariants.Dataquery):
    """One SQL target of a panel (the JSON Grafana's PostgreSQL query editor writes in code mode).

    Attributes:
        raw_sql: the SQL text, with Grafana macros and template variables still unexpanded.
        format_val: frame shape, see :class:`SqlFormat`.
        ref_id: the target's id within its panel (``A``, ``B``...).
        datasource: the data source reference (always the citypulse PostgreSQL one here).
        hide: disable this target.
    """

    def __init__(
        self,
        raw_sql: str = "",
        format_val: SqlFormat = SqlFormat.TIME_SERIES,
        ref_id: str = "A",
        datasource: dm.DataSourceRef | None = None,
        hide: bool | None = None,
    ) -> None:
        self.raw_sql = raw_sql
        self.format_val = format_val
        self.ref_id = ref_id
        self.datasource = datasource if datasource is not None else POSTGRES
        self.hide = hide

    def to_json(self) -> dict[str, object]:
        payload: dict[str, object] = {
            "refId": self.ref_id,
            "datasource": self.datasource.to_json(),
            "editorMode": "code",
            "rawQuery": True,
            "rawSql": self.raw_sql,
            "format": str(self.format_val),
        }
        if self.hide is not None:
            payload["hide"] = self.hide
        return payload

    @classmethod
    def from_json(cls, data: dict[str, typing.Any]) -> typing.Self:
        ds = data.get("datasource")
        return cls(
            raw_sql=str(data.get("rawSql", "")),
            format_val=SqlFormat(data.get("format", SqlFormat.TIME_SERIES)),
            ref_id=str(data.get("refId", "A")),
            datasource=dm.DataSourceRef.from_json(ds) if isinstance(ds, dict) else None,
            hide=data.get("hide"),
        )


class PostgresQueryBuilder(cogbuilder.Builder[PostgresQuery]):
    """Builder in the SDK's style: ``PostgresQueryBuilder().raw_sql(...).format(...)``."""

    def __init__(self) -> None:
        self._internal = PostgresQuery()

    def build(self) -> PostgresQuery:
        return self._internal

    def raw_sql(self, sql: str) -> typing.Self:
        self._internal.raw_sql = sql
        return self

    def format(self, fmt: SqlFormat) -> typing.Self:
        self._internal.format_val = fmt
        return self

    def ref_id(self, ref_id: str) -> typing.Self:
        self._internal.ref_id = ref_id
        return self

    def datasource(self, ref: dm.DataSourceRef) -> typing.Self:
        self._internal.datasource = ref
        return self

    def hide(self, hide: bool) -> typing.Self:
        self._internal.hide = hide
        return self


def sql(
    raw: str, fmt: SqlFormat = SqlFormat.TIME_SERIES, ref_id: str = "A"
) -> PostgresQueryBuilder:
    """Shorthand for a PostgreSQL target."""
    return PostgresQueryBuilder().raw_sql(raw).format(fmt).ref_id(ref_id)


class PostgresAnnotationTarget(dm.AnnotationTarget):
    """Annotation target carrying a SQL query.

    The SDK models only the built-in Grafana annotation target (tags); a SQL data source
    annotation stores a normal query in ``target``, so we extend it with the query fields.
    """

    def __init__(self, raw_sql: str = "") -> None:
        super().__init__()
        self.raw_sql = raw_sql

    def to_json(self) -> dict[str, object]:
        return PostgresQuery(
            raw_sql=self.raw_sql, format_val=SqlFormat.TABLE, ref_id="Anno"
        ).to_json()


class PostgresAnnotationTargetBuilder(cogbuilder.Builder[dm.AnnotationTarget]):
    def __init__(self, raw_sql: str) -> None:
        self._internal = PostgresAnnotationTarget(raw_sql)

    def build(self) -> dm.AnnotationTarget:
        return self._internal


def register() -> None:
    """Register the PostgreSQL dataquery variant with the SDK's runtime (idempotent)."""
    cogruntime.register_dataquery_variant(
        cogruntime.DataqueryConfig(identifier=POSTGRES_TYPE, from_json_hook=PostgresQuery.from_json)
    )


register()
