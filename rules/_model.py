"""The rule file format as pydantic models (unknown keys rejected; the JSON Schema comes from here).

A rule file::

    groups:
      - name: water
        rules:
          - name: WaterLowPressure
            select: {silo: water}
            expr: pressure < 2.0
            clear: pressure > 2.5
            for: 5m
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

from citypulse.durations import Duration
from citypulse.registry import Sensor

RuleName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")]
"""Alert names the Prometheus way: ``WaterLowPressure``."""
LevelName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,31}$")]
OneOrMany = str | list[str]
GROUP_FIELDS = ("silo", "district", "asset", "vendor", "sensor")
"""Registry fields a rule can ``group_by``; ``labels.<key>`` groups by a sensor label."""


def _expr_text(value: Any) -> Any:
    # YAML reads `value: 30` as a number; an expression is text either way.
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return value


ExprText = Annotated[str, BeforeValidator(_expr_text), Field(min_length=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Selector(_Strict):
    """Which sensors a rule covers, by registry fields; every given field must match.

    A list means any of its values. ``labels`` matches the sensor's free-form labels;
    ``metric`` requires the sensor to have that metric (or all of them, for a list).
    """

    silo: OneOrMany | None = None
    district: OneOrMany | None = None
    asset: OneOrMany | None = None
    vendor: OneOrMany | None = None
    sensor: OneOrMany | None = Field(None, description="sensor ids")
    metric: OneOrMany | None = Field(None, description="the sensor has this metric (all of them)")
    labels: dict[str, OneOrMany] = Field(default_factory=dict)
    actuator: bool | None = None

    def matches(self, s: Sensor) -> bool:
        for name in ("silo", "district", "asset", "vendor"):
            want = getattr(self, name)
            if want is not None and not _one_of(str(getattr(s, name)), want):
                return False
        if self.sensor is not None and not _one_of(s.id, self.sensor):
            return False
        if self.metric is not None and not all(m in s.metrics for m in values_of(self.metric)):
            return False
        for key, want in self.labels.items():
            have = s.labels.get(key)
            if have is None or not _one_of(have, want):
                return False
        return self.actuator is None or s.actuator == self.actuator


def values_of(want: OneOrMany) -> list[str]:
    """A selector field's values: one, or the list given."""
    return [want] if isinstance(want, str) else want


def _one_of(have: str, want: OneOrMany) -> bool:
    return have == want if isinstance(want, str) else have in want


class Level(_Strict):
    """One severity level: the alert reaches ``level`` when ``expr`` held for ``for``."""

    level: LevelName
    expr: ExprText
    for_: Duration = Field(timedelta(0), alias="for")


class Guardrails(_Strict):
    """Limits on what an action may command."""

    min: float | None = Field(None, description="lowest allowed value")
    max: float | None = Field(None, description="highest allowed value")
    out_of_range: Literal["clamp", "refuse"] = Field(
        "clamp", description="clamp to [min, max], or refuse (suppress) the command"
    )
    max_change_per_min: float | None = Field(
        None, gt=0, description="largest change per minute since the previous command"
    )
    cooldown: Duration = Field(timedelta(0), description="minimum time between two commands")


class Command(_Strict):
    """What to set: ``setting`` of the target actuators to ``value`` (an expression)."""

    setting: str = Field(min_length=1, max_length=64)
    value: ExprText
    select: Selector | None = Field(
        None, description="target actuators (group rules: within the group); default: the sensor"
    )
    sensor: str | None = Field(None, description="one explicit target sensor id")


class Action(_Strict):
    """An optimisation: when the rule's condition holds, command actuators (guardrails applied)."""

    command: Command
    guardrails: Guardrails = Field(default_factory=Guardrails)
    dry_run: bool = Field(False, description="emit the command as dry_run; nothing is sent")


class RuleSpec(_Strict):
    """One alert or optimisation rule."""

    name: RuleName
    select: Selector = Field(default_factory=Selector)
    group_by: str | None = Field(
        None, description="silo, district, asset, vendor, sensor or labels.<key>: group rule"
    )
    expr: ExprText | None = Field(None, description="the condition (or use severity levels)")
    severity: LevelName | list[Level] = Field(
        "warning", description="a severity name, or levels from lowest to highest"
    )
    for_: Duration = Field(timedelta(0), alias="for", description="pending this long to fire")
    keep_firing_for: Duration = Field(timedelta(0))
    clear: ExprText | None = Field(
        None, description="hysteresis: once firing, resolve only when this is true"
    )
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    action: Action | None = None


class GroupSpec(_Strict):
    name: str = Field(min_length=1, max_length=128)
    interval: Duration = Field(
        timedelta(0),
        description="evaluate the group's group_by rules at most once per this much event time "
        "per group (at its latest reading); 0: on every reading of a member",
    )
    rules: list[RuleSpec]


class RuleFileSpec(_Strict):
    """A rule file: ``groups`` of ``rules``."""

    groups: list[GroupSpec]


def rules_json_schema() -> dict[str, Any]:
    """The JSON Schema of rule files (for editors)."""
    schema = RuleFileSpec.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "citypulse rule file"
    return schema


def write_rules_schema(path: Path) -> Path:
    """Write :func:`rules_json_schema` to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rules_json_schema(), indent=2) + "\n", encoding="utf-8")
    return path


def group_value(sensor: Sensor, group_by: str) -> str | None:
    """The value of ``group_by`` (a registry field or ``labels.<key>``) for ``sensor``."""
    if group_by.startswith("labels."):
        return sensor.labels.get(group_by.removeprefix("labels."))
    if group_by == "sensor":
        return sensor.id
    if group_by in GROUP_FIELDS:
        return str(getattr(sensor, group_by))
    return None
