"""``citypulse rules test``: unit tests for rules written in YAML, like ``promtool test rules``.

A test file names rule files, feeds compact input series through a fresh engine at a fixed
evaluation interval, and compares the alerts (and commands) at given evaluation times.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from citypulse.durations import Duration
from citypulse.events import AlertEvent, CommandEvent, Reading, ReadingBatch
from citypulse.registry import Registry, RegistryError, load_registry
from citypulse.yamlsrc import YamlSourceError, load_located
from rules._engine import RuleEngine
from rules._load import RuleFileError, RuleSet, load_rules


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class InputSeries(_Strict):
    sensor: str
    metric: str
    values: str = Field(description="e.g. '3.1 3.1 1.2x5 _ 3.0' (a+bxN expands like promtool)")


class ExpAlert(_Strict):
    labels: dict[str, str] = Field(default_factory=dict, description="must be present (subset)")
    annotations: dict[str, str] = Field(default_factory=dict, description="must match exactly")
    state: Literal["pending", "firing"] = "firing"
    severity: str | None = None


class AlertTest(_Strict):
    eval_time: Duration
    alertname: str
    exp_alerts: list[ExpAlert] = Field(default_factory=list)


class ExpCommand(_Strict):
    sensor: str
    setting: str | None = None
    value: float
    status: Literal["sent", "dry_run", "suppressed"] = "sent"
    reason: str | None = Field(None, description="must be contained in the reason")


class CommandTest(_Strict):
    eval_time: Duration
    rule: str
    exp_commands: list[ExpCommand] = Field(
        default_factory=list, description="commands emitted at exactly this evaluation"
    )


class RuleTestCase(_Strict):
    name: str = ""
    interval: Duration | None = None
    input_series: list[InputSeries] = Field(default_factory=list)
    alert_rule_test: list[AlertTest] = Field(default_factory=list)
    command_test: list[CommandTest] = Field(default_factory=list)


class RuleTestFile(_Strict):
    rule_files: list[str] = Field(min_length=1, description="relative to this file")
    registry: str | None = Field(None, description="relative to this file; default: settings")
    evaluation_interval: Duration = timedelta(minutes=1)
    start_ms: int = Field(0, description="event time of step 0, epoch ms")
    tests: list[RuleTestCase]


@dataclass
class RuleTestResult:
    """Outcome of one test file: ``failures`` empty means it passed."""

    file: str
    passed: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


_ITEM = re.compile(r"^(_|[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)(?:([-+]\d+(?:\.\d+)?)?x(\d+))?$")


def expand_values(text: str) -> list[float | None]:
    """Expand the compact series notation.

    ``1 2 _ 3`` is four points (``_`` = missing); ``1x3`` is ``1 1 1 1``; ``1+2x3`` is
    ``1 3 5 7``; ``5-1x2`` is ``5 4 3``; ``_x3`` is three missing points.

    Raises:
        ValueError: naming the item it cannot read.
    """
    out: list[float | None] = []
    for item in text.split():
        m = _ITEM.match(item)
        if m is None:
            raise ValueError(f"bad series item {item!r}: use e.g. 3.1, _, 1x5, 1+0.5x4, _x3")
        start, step, times = m.groups()
        if start == "_":
            if step:
                raise ValueError(f"bad series item {item!r}: _ takes no step")
            out.extend([None] * (int(times) if times else 1))
            continue
        a = float(start)
        if times is None:
            out.append(a)
            continue
        b = float(step) if step else 0.0
        out.extend(a + b * k for k in range(int(times) + 1))
    return out


def run_test_file(path: Path, default_registry: Path | None = None) -> RuleTestResult:
    """Run every test in ``path``; errors in the file itself are reported as failures."""
    result = RuleTestResult(str(path))
    try:
        data, locator = load_located(path)
    except YamlSourceError as exc:
        result.failures.extend(str(p) for p in exc.problems)
        return result
    try:
        spec = RuleTestFile.model_validate(data)
    except ValidationError as exc:
        result.failures.extend(str(p) for p in locator.pydantic_errors(exc))
        return result
    base = path.parent
    reg_path = base / spec.registry if spec.registry else default_registry
    if reg_path is None:
        result.failures.append(f"{path}:1:1: no registry: set 'registry' or pass --registry")
        return result
    try:
        registry = load_registry(reg_path)
        ruleset = load_rules([base / f for f in spec.rule_files], registry)
    except (RegistryError, RuleFileError) as exc:
        result.failures.extend(str(p) for p in exc.problems)
        return result
    for i, case in enumerate(spec.tests):
        name = case.name or f"tests[{i}]"
        where = locator.at(["tests", i], "")
        problems = _run_case(case, spec, registry, ruleset)
        if problems:
            result.failures.append(
                f"{where.file}:{where.line}:{where.col}: test {name!r} failed:\n"
                + "\n".join(f"    {p}" for p in problems)
            )
        else:
            result.passed.append(name)
    return result


def _run_case(
    case: RuleTestCase, spec: RuleTestFile, registry: Registry, ruleset: RuleSet
) -> list[str]:
    engine = RuleEngine(ruleset, registry)
    sensors = registry.by_id()
    step_ms = round((case.interval or spec.evaluation_interval).total_seconds() * 1000)
    if step_ms <= 0:
        return ["evaluation interval must be positive"]
    problems: list[str] = []
    series: dict[str, dict[str, list[float | None]]] = {}
    for s in case.input_series:
        if s.sensor not in sensors:
            problems.append(f"input_series: unknown sensor {s.sensor!r}")
            continue
        if s.metric not in sensors[s.sensor].metrics:
            problems.append(f"input_series: sensor {s.sensor} has no metric {s.metric!r}")
            continue
        try:
            series.setdefault(s.sensor, {})[s.metric] = expand_values(s.values)
        except ValueError as exc:
            problems.append(f"input_series {s.sensor}/{s.metric}: {exc}")
    if problems:
        return problems
    checks_ms = [round(t.eval_time.total_seconds() * 1000) for t in case.alert_rule_test] + [
        round(t.eval_time.total_seconds() * 1000) for t in case.command_test
    ]
    longest = max((len(v) for m in series.values() for v in m.values()), default=0)
    last_step = max([longest - 1, *(t // step_ms for t in checks_ms)], default=0)
    alerts_at: dict[int, list[AlertEvent]] = {}
    commands_at: dict[int, list[CommandEvent]] = {}
    for k in range(last_step + 1):
        rel = k * step_ms
        now = spec.start_ms + rel
        effects = []
        for sid in sorted(series):
            readings = [
                Reading(
                    ts_ms=now, metric=metric, value=vals[k], unit=sensors[sid].metrics[metric].unit
                )
                for metric, vals in sorted(series[sid].items())
                if k < len(vals) and vals[k] is not None
            ]
            if readings:
                batch = ReadingBatch(
                    sensor=sid,
                    vendor=sensors[sid].vendor,
                    received_ms=now,
                    source="rules-test",
                    readings=readings,
                )
                effects.extend(engine.process(batch))
        effects.extend(engine.advance(now))
        alerts_at[rel] = engine.active_alerts()
        commands_at[rel] = [e for e in effects if isinstance(e, CommandEvent)]
    for t in case.alert_rule_test:
        rel = round(t.eval_time.total_seconds() * 1000)
        got = [a for a in _at(alerts_at, rel, step_ms) if a.rule == t.alertname]
        problems.extend(_compare_alerts(t, got))
    for ct in case.command_test:
        rel = round(ct.eval_time.total_seconds() * 1000)
        got_c = [c for c in commands_at.get(rel, []) if c.rule == ct.rule]
        problems.extend(_compare_commands(ct, got_c, rel % step_ms != 0))
    for rule, error in engine.unhealthy().items():
        problems.append(f"rule {rule!r} is unhealthy: {error}")
    return problems


def _at(by_time: dict[int, list[AlertEvent]], rel: int, step_ms: int) -> list[AlertEvent]:
    # An eval_time between steps sees the state of the last step before it.
    return by_time.get(rel - rel % step_ms, [])


def _fmt_alert(a: AlertEvent) -> str:
    return (
        f"state={a.state.value} severity={a.severity} labels={a.labels} annotations={a.annotations}"
    )


def _compare_alerts(t: AlertTest, got: list[AlertEvent]) -> list[str]:
    left = list(got)
    missing: list[ExpAlert] = []
    for exp in t.exp_alerts:
        for a in left:
            if (
                a.state.value == exp.state
                and (exp.severity is None or a.severity == exp.severity)
                and all(a.labels.get(k) == v for k, v in exp.labels.items())
                and all(a.annotations.get(k) == v for k, v in exp.annotations.items())
            ):
                left.remove(a)
                break
        else:
            missing.append(exp)
    if not missing and not left:
        return []
    when = f"alertname {t.alertname!r} at eval_time {_fmt_td(t.eval_time)}"
    lines = [f"{when}: alerts differ"]
    lines += [
        f"  - expected (not found): state={e.state} severity={e.severity or '*'} "
        f"labels⊇{e.labels} annotations⊇{e.annotations}"
        for e in missing
    ]
    lines += [f"  + got (unexpected):     {_fmt_alert(a)}" for a in left]
    matched = len(got) - len(left)
    if matched:
        lines.append(f"    ({matched} alert(s) matched)")
    return ["\n    ".join(lines)]


def _compare_commands(ct: CommandTest, got: list[CommandEvent], off_step: bool) -> list[str]:
    left = list(got)
    missing: list[ExpCommand] = []
    for exp in ct.exp_commands:
        for c in left:
            if (
                c.sensor == exp.sensor
                and (exp.setting is None or c.setting == exp.setting)
                and abs(c.value - exp.value) <= 1e-9 * max(1.0, abs(exp.value))
                and c.status == exp.status
                and (exp.reason is None or exp.reason in (c.reason or ""))
            ):
                left.remove(c)
                break
        else:
            missing.append(exp)
    if not missing and not left:
        return []
    when = f"rule {ct.rule!r} at eval_time {_fmt_td(ct.eval_time)}"
    lines = [f"{when}: commands differ" + (" (eval_time is not on a step)" if off_step else "")]
    lines += [
        f"  - expected (not found): sensor={e.sensor} value={e.value} status={e.status}"
        + (f" reason~{e.reason!r}" if e.reason else "")
        for e in missing
    ]
    lines += [
        f"  + got (unexpected):     sensor={c.sensor} value={c.value} status={c.status} "
        f"reason={c.reason!r}"
        for c in left
    ]
    return ["\n    ".join(lines)]


def _fmt_td(td: timedelta) -> str:
    from citypulse.durations import format_duration

    return format_duration(td)
