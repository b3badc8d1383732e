"""The sensor registry: the city's record of its data assets.

A YAML file lists every sensor with its vendor, silo, district, asset, location, metrics (unit
and physically valid range) and expected reporting interval. Collectors validate readings
against it, rules select sensors by its fields, dashboards are generated from it, and storage
loads it into the database so all of them can join on it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StringConstraints,
    ValidationError,
    model_validator,
)

from citypulse.durations import Duration
from citypulse.yamlsrc import Located, YamlSourceError, parse_located

Name = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")]
"""Ids, vendors, metrics: lower case, digits, ``_ . -``; safe in MQTT topics and SQL labels."""


class Silo(StrEnum):
    WATER = "water"
    ENERGY = "energy"
    TRANSPORT = "transport"
    AIR = "air"
    LIGHTING = "lighting"
    WASTE = "waste"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Location(_Strict):
    lat: float = Field(ge=-90, le=90)
    lon: float = Field(ge=-180, le=180)


class Metric(_Strict):
    """One measured quantity. ``min``/``max`` is the physically valid range (inclusive)."""

    unit: str = Field(min_length=1, max_length=32, description="SenML unit symbol, e.g. 'bar'")
    min: float | None = None
    max: float | None = None
    description: str | None = None

    @model_validator(mode="after")
    def _range_ordered(self) -> Metric:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self

    def in_range(self, value: float) -> bool:
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)


class Sensor(_Strict):
    id: Name
    vendor: Name
    silo: Silo
    district: Name
    asset: str = Field(min_length=1, max_length=128, description="the asset it measures")
    location: Location
    interval: Duration = Field(description="expected reporting interval, e.g. 60s")
    metrics: dict[Name, Metric] = Field(min_length=1)
    labels: dict[str, str] = Field(default_factory=dict, description="free-form selectors")
    actuator: bool = Field(False, description="accepts commands on .../down")

    @property
    def interval_s(self) -> float:
        return self.interval.total_seconds()


class Registry(_Strict):
    version: int = Field(1, description="file format version")
    city: str = "citypulse"
    sensors: list[Sensor]
    _by_id: tuple[list[Sensor], dict[str, Sensor]] | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _unique_ids(self) -> Registry:
        seen: set[str] = set()
        for s in self.sensors:
            if s.id in seen:
                raise ValueError(f"sensor id {s.id!r} appears twice")
            seen.add(s.id)
        return self

    def by_id(self) -> dict[str, Sensor]:
        """Sensors by id (built once: hot paths call this per record)."""
        # Keyed on the list itself: model_copy(update=...) copies private attributes too.
        if self._by_id is None or self._by_id[0] is not self.sensors:
            self._by_id = (self.sensors, {s.id: s for s in self.sensors})
        return self._by_id[1]

    def __iter__(self) -> Iterator[Sensor]:  # type: ignore[override]
        return iter(self.sensors)

    def __len__(self) -> int:
        return len(self.sensors)

    def districts(self) -> list[str]:
        return sorted({s.district for s in self.sensors})

    def vendors(self) -> list[str]:
        return sorted({s.vendor for s in self.sensors})


class RegistryError(YamlSourceError):
    """The registry file has problems; each is located as ``file:line:col: message``."""


def parse_registry(text: str, file: str = "<registry>") -> Registry:
    """Validate registry YAML text, collecting every problem with its place."""
    try:
        data, locator = parse_located(text, file)
    except YamlSourceError as exc:
        raise RegistryError(exc.problems) from exc
    problems: list[Located] = []
    if not isinstance(data, dict) or not isinstance(data.get("sensors"), list):
        raise RegistryError([locator.at([], "expected a mapping with a 'sensors' list")])
    # Validate sensor by sensor so one bad entry does not hide the others' problems.
    seen: dict[str, int] = {}
    good: list[Sensor] = []
    for i, raw in enumerate(data["sensors"]):
        try:
            sensor = Sensor.model_validate(raw)
        except ValidationError as exc:
            problems.extend(locator.pydantic_errors(exc, ["sensors", i]))
            continue
        for name, metric in sensor.metrics.items():
            for bound in (metric.min, metric.max):
                if bound is not None and not math.isfinite(bound):
                    problems.append(
                        locator.at(["sensors", i, "metrics", name], f"{name}: range must be finite")
                    )
        if sensor.interval <= timedelta(0):
            problems.append(locator.at(["sensors", i, "interval"], "interval must be positive"))
        if sensor.id in seen:
            problems.append(
                locator.at(
                    ["sensors", i, "id"],
                    f"sensor id {sensor.id!r} already used by sensors[{seen[sensor.id]}]",
                )
            )
        seen[sensor.id] = i
        good.append(sensor)
    rest = {k: v for k, v in data.items() if k != "sensors"}
    try:
        header = Registry.model_validate({**rest, "sensors": []})
    except ValidationError as exc:
        problems.extend(locator.pydantic_errors(exc))
        header = None
    if problems or header is None:
        raise RegistryError(problems)
    return header.model_copy(update={"sensors": good})


def load_registry(path: Path) -> Registry:
    """Read and validate a registry file; raise :class:`RegistryError` listing every problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RegistryError([Located(str(path), 1, 1, f"cannot read: {exc}")]) from exc
    return parse_registry(text, str(path))


def dump_registry(registry: Registry) -> str:
    """YAML text of ``registry`` that :func:`parse_registry` reads back unchanged."""
    import yaml

    return yaml.safe_dump(
        registry.model_dump(mode="json", exclude_defaults=False), sort_keys=False, width=100
    )
