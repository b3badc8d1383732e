"""Expand a panel's SQL exactly as Grafana does before it reaches PostgreSQL.

Grafana runs three passes over a PostgreSQL target's ``rawSql``:

1. the frontend's template service replaces template variables (``$var``, ``${var}``,
   ``${var:format}``, ``[[var]]``) and the built-ins ``$__interval``/``$__interval_ms``; for SQL
   data sources a multi-value or include-All variable becomes a comma-separated list of
   single-quoted literals, a single-value variable its value with ``'`` doubled (no quotes);
2. the backend's ``sqleng.Interpolate``: ``$__interval_ms``, ``$__interval``,
   ``$__unixEpochFrom()``, ``$__unixEpochTo()``;
3. the PostgreSQL macro engine (``pkg/tsdb/grafana-postgresql-datasource/macros.go``):
   ``$__timeFilter``, ``$__timeFrom``, ``$__timeGroup`` (``time_bucket`` with the TimescaleDB
   option) and friends; an unknown ``$__name(...)`` is an error.

Tests run every generated panel query through :func:`expand` against a real database, so a
query that would fail in Grafana fails here first. Text formats copy Go's (RFC3339Nano times,
``%v`` floats) so the SQL is byte-for-byte what Grafana would send.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

__all__ = [
    "MacroError",
    "Variable",
    "expand",
    "format_interval",
    "go_float",
    "parse_interval",
    "rfc3339nano",
]


class MacroError(ValueError):
    """The SQL uses a macro wrongly; Grafana would refuse to run it as well."""


@dataclass(frozen=True)
class Variable:
    """The current value of a dashboard template variable.

    Attributes:
        values: selected values (the option values, not their display text); "All" is the list
            of every option value, which is what Grafana sends when no custom all value is set.
        multi: the variable allows several values.
        include_all: the variable has an "All" option.
    """

    values: tuple[str, ...]
    multi: bool = False
    include_all: bool = False

    @classmethod
    def single(cls, value: str) -> Variable:
        return cls((value,))

    @classmethod
    def many(cls, *values: str, include_all: bool = True) -> Variable:
        return cls(tuple(values), multi=True, include_all=include_all)


VariableValue = Variable | str | Sequence[str]

# The frontend's variable regex (public/app/features/variables/utils.ts).
_VARIABLE = re.compile(
    r"\$(\w+)|\[\[(\w+?)(?::(\w+))?\]\]|\$\{(\w+)(?:\.([^:^\}]+))?(?::([^\}]+))?\}"
)
_MACRO = re.compile(r"\$([_a-zA-Z0-9]+)\(([^\)]*)\)")
_GO_DURATION_PART = re.compile(r"(\d*\.?\d*)(ns|us|µs|ms|s|m|h)")
_GO_UNITS_S = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def rfc3339nano(t: datetime) -> str:
    """Go's ``t.UTC().Format(time.RFC3339Nano)``: trailing zeros of the fraction dropped."""
    if t.tzinfo is None:
        raise MacroError("time range must be timezone-aware")
    u = t.astimezone(UTC)
    frac = f".{u.microsecond:06d}".rstrip("0") if u.microsecond else ""
    return u.strftime("%Y-%m-%dT%H:%M:%S") + frac + "Z"


def go_float(x: float) -> str:
    """Go's ``fmt.Sprintf("%v", x)`` for a float64: shortest round-trip digits, exponent form
    (``1e+06``) when the decimal exponent is < -4 or >= 6, as ``strconv``'s ``'g'`` does."""
    if x == 0:
        return "0"
    sign, digits, exponent = Decimal(repr(float(x))).normalize().as_tuple()
    assert isinstance(exponent, int)
    ds = "".join(map(str, digits))
    exp10 = len(ds) + exponent - 1
    neg = "-" if sign else ""
    if exp10 < -4 or exp10 >= 6:
        mant = ds[0] + ("." + ds[1:] if len(ds) > 1 else "")
        return f"{neg}{mant}e{'+' if exp10 >= 0 else '-'}{abs(exp10):02d}"
    if exponent >= 0:
        return neg + ds + "0" * exponent
    point = len(ds) + exponent
    if point > 0:
        return f"{neg}{ds[:point]}.{ds[point:]}"
    return f"{neg}0.{'0' * -point}{ds}"


def parse_interval(text: str) -> timedelta:
    """``gtime.ParseInterval``: Go durations (``90s``, ``1h30m``, ``500ms``) or ``Nd``/``Nw``.

    Raises:
        MacroError: empty, unit-less or unsupported (``M``/``y`` are calendar-relative to the
            wall clock in Grafana; dashboards here never use them).
    """
    inp = text.strip()
    if not inp:
        raise MacroError("empty interval")
    if inp[-1] in "dw" and inp[:-1].isdigit():
        return timedelta(days=int(inp[:-1]) * (7 if inp[-1] == "w" else 1))
    if inp[-1] in "My":
        raise MacroError(f"calendar interval {inp!r} is not supported")
    sign = -1.0 if inp.startswith("-") else 1.0
    body = inp.lstrip("+-")
    if body == "0":
        return timedelta(0)
    pos = 0
    total_s = 0.0
    for m in _GO_DURATION_PART.finditer(body):
        if m.start() != pos or m.group(1) in ("", "."):
            raise MacroError(f"error parsing interval {text}")
        total_s += float(m.group(1)) * _GO_UNITS_S[m.group(2)]
        pos = m.end()
    if pos != len(body) or pos == 0:
        raise MacroError(f"error parsing interval {text}")
    return timedelta(seconds=sign * total_s)


def format_interval(interval: timedelta) -> str:
    """``gtime.FormatInterval``: the largest whole unit, truncating (``90s`` -> ``1m``)."""
    ms = int(interval / timedelta(milliseconds=1))
    for unit, size in (("y", 365 * 86_400_000), ("d", 86_400_000), ("h", 3_600_000)):
        if ms >= size:
            return f"{ms // size}{unit}"
    if ms >= 60_000:
        return f"{ms // 60_000}m"
    if ms >= 1000:
        return f"{ms // 1000}s"
    if ms >= 1:
        return f"{ms}ms"
    return "1ms"


def _quote_literal(v: str) -> str:
    return "'" + v.replace("'", "''") + "'"


def _as_variable(v: VariableValue) -> Variable:
    if isinstance(v, Variable):
        return v
    if isinstance(v, str):
        return Variable.single(v)
    return Variable.many(*v)


def _format(var: Variable, fmt: str | None) -> str:
    vals = list(var.values)
    if fmt is None:
        # SqlDatasource.interpolateVariable
        if len(vals) == 1 and not (var.multi or var.include_all):
            return vals[0].replace("'", "''")
        return ",".join(_quote_literal(v) for v in vals)
    match fmt:
        case "csv" | "raw" | "text":
            return ",".join(vals)
        case "sqlstring":
            return ",".join(_quote_literal(v) for v in vals)
        case "singlequote":
            return ",".join("'" + v.replace("'", "\\'") + "'" for v in vals)
        case "doublequote":
            return ",".join('"' + v.replace('"', '\\"') + '"' for v in vals)
        case "pipe":
            return "|".join(vals)
        case "json":
            return json.dumps(vals if len(vals) != 1 or var.multi else vals[0])
        case _:
            raise MacroError(f"unsupported variable format {fmt!r}")


def _template(sql: str, variables: Mapping[str, Variable]) -> str:
    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(4)
        fmt = m.group(3) or m.group(6)
        var = variables.get(name)
        if var is None:
            return m.group(0)  # unknown: left for the backend (macros) or as typed
        return _format(var, fmt)

    return _VARIABLE.sub(repl, sql)


def _macro(
    name: str,
    args: list[str],
    time_from: datetime,
    time_to: datetime,
    timescaledb: bool,
) -> str:
    frm, to = rfc3339nano(time_from), rfc3339nano(time_to)
    need_col = {"__time", "__timeEpoch", "__timeFilter", "__unixEpochFilter"}
    if name in need_col and (not args or args == [""]):
        raise MacroError(f"missing time column argument for macro {name}")
    match name:
        case "__time":
            return f'{args[0]} AS "time"'
        case "__timeEpoch":
            return f'extract(epoch from {args[0]}) as "time"'
        case "__timeFilter":
            return f"{args[0]} BETWEEN '{frm}' AND '{to}'"
        case "__timeFrom":
            return f"'{frm}'"
        case "__timeTo":
            return f"'{to}'"
        case "__timeGroup" | "__unixEpochGroup":
            if len(args) < 2:
                raise MacroError(
                    f"macro {name} needs time column and interval and optional fill value"
                )
            secs = parse_interval(args[1].strip("'")).total_seconds()
            if len(args) == 3:
                fill = args[2]
                if fill not in ("NULL", "previous"):
                    try:
                        float(fill)
                    except ValueError:
                        raise MacroError(f"error parsing fill value {fill}") from None
            if name == "__unixEpochGroup":
                return f"floor(({args[0]})/{go_float(secs)})*{go_float(secs)}"
            if timescaledb:
                return f"time_bucket('{secs:.3f}s',{args[0]})"
            return f"floor(extract(epoch from {args[0]})/{go_float(secs)})*{go_float(secs)}"
        case "__timeGroupAlias" | "__unixEpochGroupAlias":
            base = name.removesuffix("Alias")
            return _macro(base, args, time_from, time_to, timescaledb) + ' AS "time"'
        case "__unixEpochFilter":
            f, t = int(time_from.timestamp()), int(time_to.timestamp())
            return f"{args[0]} >= {f} AND {args[0]} <= {t}"
        case "__unixEpochNanoFilter":
            f, t = _nanos(time_from), _nanos(time_to)
            return f"{args[0]} >= {f} AND {args[0]} <= {t}"
        case "__unixEpochNanoFrom":
            return str(_nanos(time_from))
        case "__unixEpochNanoTo":
            return str(_nanos(time_to))
        case _:
            raise MacroError(f"unknown macro {name!r}")


def _nanos(t: datetime) -> int:
    return int(Decimal(str(t.timestamp())) * 1_000_000_000)


def expand(
    sql: str,
    *,
    time_from: datetime,
    time_to: datetime,
    interval: timedelta,
    variables: Mapping[str, VariableValue] | None = None,
    timescaledb: bool = False,
) -> str:
    """Return ``sql`` as Grafana's PostgreSQL data source would send it to the database.

    Args:
        sql: the panel target's ``rawSql``.
        time_from: start of the dashboard time range (aware).
        time_to: end of the time range (aware).
        interval: Grafana's computed ``$__interval`` for the panel (range / max data points,
            rounded); drives ``$__interval``/``$__interval_ms``.
        variables: template variable name -> current value(s).
        timescaledb: the data source's TimescaleDB option (``$__timeGroup`` -> ``time_bucket``).

    Raises:
        MacroError: an unknown macro, a missing argument or an unparsable interval.
    """
    if time_from.tzinfo is None or time_to.tzinfo is None:
        raise MacroError("time range must be timezone-aware")
    interval_ms = int(interval / timedelta(milliseconds=1))
    scoped: dict[str, Variable] = {name: _as_variable(v) for name, v in (variables or {}).items()}
    scoped.setdefault("__interval", Variable.single(format_interval(interval)))
    scoped.setdefault("__interval_ms", Variable.single(str(interval_ms)))
    scoped.setdefault("__from", Variable.single(str(int(time_from.timestamp() * 1000))))
    scoped.setdefault("__to", Variable.single(str(int(time_to.timestamp() * 1000))))
    scoped.setdefault("__range_s", Variable.single(str(int((time_to - time_from).total_seconds()))))
    out = _template(sql, scoped)
    # sqleng.Interpolate (order matters: _ms before the shorter name)
    out = out.replace("$__interval_ms", str(interval_ms))
    out = out.replace("$__interval", format_interval(interval))
    out = out.replace("$__unixEpochFrom()", str(int(time_from.timestamp())))
    out = out.replace("$__unixEpochTo()", str(int(time_to.timestamp())))
    original = out

    def repl(m: re.Match[str]) -> str:
        name = m.group(1)
        if name == "__timeGroup":
            # Grafana < 5.3 compatibility kept by the macro engine: a ',' right after the call
            # (looked up at the first occurrence of the same text) means "add AS time".
            idx = original.find(m.group(0))
            if idx >= 0 and original[idx + len(m.group(0)) : idx + len(m.group(0)) + 1] == ",":
                name = "__timeGroupAlias"
        args = [a.strip(" ") for a in m.group(2).split(",")]
        return _macro(name, args, time_from, time_to, timescaledb)

    return _MACRO.sub(repl, out)
