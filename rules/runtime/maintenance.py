"""Maintenance windows: recurring, registry-scoped quiet periods.

A YAML file in the rules directory (``maintenance.yaml``) lists windows::

    windows:
      - name: pumps-north-tuesday
        every: [tue]                 # weekdays (mon..sun); omit for every day
        start: "02:00"               # local wall time in ``timezone``
        duration: 2h
        timezone: Europe/Berlin
        match:                       # every given field must match (registry fields / labels)
          district: north
          silo: water
          asset: pump                # substring of the registry asset
          sensors: [wtr-0001]        # explicit ids (optional)
          labels: {zone: a}          # registry labels (optional)

Windows are evaluated in **event time** (the alert's ``ts_ms``), never the wall clock, so a
replay or a backtest decides the same way. A window crossing midnight belongs to the day it
starts on; daylight-saving gaps and folds follow :mod:`zoneinfo` (``fold=0``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from citypulse.durations import Duration
from citypulse.registry import Registry, Sensor
from citypulse.yamlsrc import Located, YamlSourceError, parse_located
from rules._load import MAINTENANCE_FILE
from rules.runtime.errors import MaintenanceFileError

Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
_WEEKDAYS: tuple[Weekday, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WindowMatch(_Strict):
    """Which alerts a window covers; every field given must match, none given = all."""

    district: str | None = None
    silo: str | None = None
    vendor: str | None = None
    asset: str | None = Field(None, description="substring of the sensor's registry asset")
    sensors: list[str] | None = None
    labels: dict[str, str] = Field(default_factory=dict)


class MaintenanceWindow(_Strict):
    """One recurring quiet period."""

    name: str = Field(min_length=1)
    every: list[Weekday] = Field(default_factory=lambda: list(_WEEKDAYS))
    start: time = Field(description="local start time (HH:MM) in ``timezone``")
    duration: Duration
    timezone: str = "UTC"
    match: WindowMatch = Field(default_factory=WindowMatch)

    @field_validator("start", mode="before")
    @classmethod
    def _quoted_time(cls, value: object) -> object:
        # YAML 1.1 reads an unquoted 02:00 as the base-60 integer 120.
        if isinstance(value, int):
            raise ValueError(  # noqa: TRY004 - pydantic reports ValueError as a field error
                'write the start time quoted, e.g. start: "02:00"'
            )
        return value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value

    @field_validator("duration")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0) or value > timedelta(days=7):
            raise ValueError("duration must be positive and at most 7d")
        return value

    def occurrence(self, ts_ms: int) -> tuple[int, int] | None:
        """The occurrence ``[start_ms, end_ms)`` containing ``ts_ms``, or None."""
        zone = ZoneInfo(self.timezone)
        local = datetime.fromtimestamp(ts_ms / 1000, tz=UTC).astimezone(zone)
        # An occurrence that contains ts started at most ``duration`` (<= 7 days) earlier.
        days_back = self.duration.days + 1
        for back in range(days_back + 1):
            day = (local - timedelta(days=back)).date()
            if _WEEKDAYS[day.weekday()] not in self.every:
                continue
            begin = datetime.combine(day, self.start, tzinfo=zone)
            start_ms = round(begin.timestamp() * 1000)
            end_ms = start_ms + round(self.duration.total_seconds() * 1000)
            if start_ms <= ts_ms < end_ms:
                return (start_ms, end_ms)
        return None

    def covers(self, labels: Mapping[str, str], sensor: Sensor | None) -> bool:
        """True when an alert with ``labels`` (and its registry sensor, if any) is in scope."""
        m = self.match
        fields = {
            "district": sensor.district if sensor else labels.get("district"),
            "silo": str(sensor.silo) if sensor else labels.get("silo"),
            "vendor": sensor.vendor if sensor else labels.get("vendor"),
        }
        for name, wanted in (("district", m.district), ("silo", m.silo), ("vendor", m.vendor)):
            if wanted is not None and fields[name] != wanted:
                return False
        if m.asset is not None:
            asset = sensor.asset if sensor else labels.get("asset", "")
            if m.asset.lower() not in asset.lower():
                return False
        if m.sensors is not None:
            sid = sensor.id if sensor else labels.get("sensor")
            if sid not in m.sensors:
                return False
        own = dict(sensor.labels) if sensor else {}
        return all(own.get(key, labels.get(key)) == value for key, value in m.labels.items())


class _File(_Strict):
    version: int = 1
    windows: list[MaintenanceWindow] = Field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Maintenance:
    """All maintenance windows, resolved against the registry."""

    windows: tuple[MaintenanceWindow, ...]
    sensors: Mapping[str, Sensor]

    @classmethod
    def empty(cls) -> Maintenance:
        return cls((), {})

    def _sensor(self, labels: Mapping[str, str]) -> Sensor | None:
        sid = labels.get("sensor") or labels.get("sensor_id")
        return self.sensors.get(sid) if sid else None

    def active(self, labels: Mapping[str, str], ts_ms: int) -> tuple[str, int] | None:
        """``(window name, end_ms)`` of a window covering the alert at event time ``ts_ms``.

        When several cover it, the one ending last wins (the alert is quiet until then).
        """
        sensor = self._sensor(labels)
        best: tuple[str, int] | None = None
        for window in self.windows:
            if not window.covers(labels, sensor):
                continue
            occ = window.occurrence(ts_ms)
            if occ is not None and (best is None or occ[1] > best[1]):
                best = (window.name, occ[1])
        return best


def parse_maintenance(text: str, registry: Registry, file: str = MAINTENANCE_FILE) -> Maintenance:
    """Validate maintenance YAML; raise :class:`MaintenanceFileError` with every problem."""
    try:
        data, locator = parse_located(text, file)
    except YamlSourceError as exc:
        raise MaintenanceFileError(exc.problems) from exc
    if data is None:
        return Maintenance((), registry.by_id())
    try:
        parsed = _File.model_validate(data)
    except ValidationError as exc:
        raise MaintenanceFileError(locator.pydantic_errors(exc)) from exc
    problems: list[Located] = []
    names: set[str] = set()
    known = registry.by_id()
    for i, window in enumerate(parsed.windows):
        if window.name in names:
            problems.append(locator.at(["windows", i, "name"], f"{window.name}: name used twice"))
        names.add(window.name)
        for sid in window.match.sensors or []:
            if sid not in known:
                problems.append(
                    locator.at(["windows", i, "match", "sensors"], f"{window.name}: unknown {sid}")
                )
    if problems:
        raise MaintenanceFileError(problems)
    return Maintenance(tuple(parsed.windows), known)


def load_maintenance(path: Path, registry: Registry) -> Maintenance:
    """Read ``path`` (a missing file means no windows); see :func:`parse_maintenance`."""
    if not path.exists():
        return Maintenance((), registry.by_id())
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MaintenanceFileError([Located(str(path), 1, 1, f"cannot read: {exc}")]) from exc
    return parse_maintenance(text, registry, str(path))
