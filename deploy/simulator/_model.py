"""What each kind of sensor reads at a given simulated instant: daily cycles, noise, incidents.

Values are a pure function of (sensor, time, incidents, random stream), so a seed replays the
same city. Local time is UTC+1 (the city is in central Europe); daily cycles use it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from citypulse.registry import Sensor

LOCAL_OFFSET = timedelta(hours=1)


class IncidentKind(StrEnum):
    LEAK = "leak"
    """Pressure drops and flow rises at one district's water sensors."""
    OUTAGE = "outage"
    """A substation's power falls to 0; the district's pumps and lights stop with it."""
    POLLUTION = "pollution"
    """PM2.5 and NO2 rise several-fold at one district's air stations."""


@dataclass(frozen=True, slots=True)
class Incident:
    """An injected incident, in simulated (event) time."""

    kind: IncidentKind
    district: str
    start: datetime
    end: datetime
    sensors: tuple[str, ...] = field(default=())
    """Ids of the sensors whose readings it changes."""

    def active(self, t: datetime) -> bool:
        return self.start <= t < self.end

    def as_dict(self) -> dict[str, object]:
        return {
            "kind": str(self.kind),
            "district": self.district,
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "sensors": list(self.sensors),
        }


def affected(kind: IncidentKind, sensor: Sensor) -> bool:
    """Whether an incident of ``kind`` in the sensor's district changes its readings."""
    k = sensor.labels.get("kind", "")
    if kind is IncidentKind.LEAK:
        return sensor.silo == "water"
    if kind is IncidentKind.OUTAGE:
        return sensor.silo == "energy" or k == "pump" or sensor.silo == "lighting"
    return sensor.silo == "air"


def _hour(t: datetime) -> float:
    local = t + LOCAL_OFFSET
    return local.hour + local.minute / 60 + local.second / 3600


def _bump(h: float, centre: float, width: float) -> float:
    """A smooth daily peak (0..1) at hour ``centre``, wrapping around midnight."""
    d = min(abs(h - centre), 24 - abs(h - centre))
    return math.exp(-((d / width) ** 2))


def _demand(h: float) -> float:
    """Water/energy demand, 0..1: low at night, peaks at 07:30 and 19:30."""
    return 0.25 + 0.55 * _bump(h, 7.5, 1.8) + 0.6 * _bump(h, 19.5, 2.5) + 0.2 * _bump(h, 13, 3)


def _traffic(h: float) -> float:
    """Road traffic, 0..1: rush hours at 08:00 and 17:30."""
    return 0.03 + 0.9 * _bump(h, 8, 1.3) + 0.85 * _bump(h, 17.5, 1.6) + 0.35 * _bump(h, 13, 3)


def _darkness(h: float) -> float:
    """1 between dusk and dawn (20:00-06:30), 0 in daylight, ramping over half an hour."""
    if 6.5 <= h <= 19.5:
        return 0.0
    if 19.5 < h < 20.0:
        return (h - 19.5) * 2
    if 6.0 < h < 6.5:
        return (6.5 - h) * 2
    return 1.0


def _scale(sensor: Sensor) -> float:
    """A stable per-sensor size factor 0.7..1.3, so sensors of a kind differ."""
    return 0.7 + (sum(map(ord, sensor.id)) % 61) / 100


def values_at(
    sensor: Sensor, t: datetime, incidents: list[Incident], rng: random.Random
) -> dict[str, float]:
    """Every metric of ``sensor`` at simulated instant ``t`` (aware UTC), in registry units."""
    h = _hour(t)
    size = _scale(sensor)
    kind = sensor.labels.get("kind", "")
    active = {i.kind for i in incidents if i.active(t) and sensor.id in i.sensors}
    g = rng.gauss
    out: dict[str, float] = {}
    if sensor.silo == "water":
        d = _demand(h)
        base_flow = (350 if kind == "pump" else 60) * size
        flow = base_flow * (0.4 + d) * (1 + g(0, 0.03))
        pressure = (5.2 if kind == "pump" else 4.0) - 0.8 * d + g(0, 0.05)
        if IncidentKind.LEAK in active:
            flow *= 1.7
            pressure -= 1.8
        if IncidentKind.OUTAGE in active:
            flow = 0.0
            pressure = 1.0 + g(0, 0.05)
        out = {"pressure": pressure, "flow": flow}
    elif sensor.silo == "energy":
        d = _demand(h)
        power = 6000 * size * (0.5 + d) * (1 + g(0, 0.02))
        voltage = 11000 * (1.01 - 0.02 * d) + g(0, 15)
        if IncidentKind.OUTAGE in active:
            power, voltage = 0.0, 0.0
        out = {"power": power, "voltage": voltage}
    elif sensor.silo == "transport":
        x = _traffic(h)
        traffic = 2200 * size * x * (1 + g(0, 0.06))
        speed = 52 - 30 * min(1.0, x) + g(0, 2)
        out = {"traffic": traffic, "speed": speed}
    elif sensor.silo == "air":
        x = _traffic(h)
        pm25 = 8 * size + 22 * x + g(0, 1.5)
        no2 = 15 * size + 55 * x + g(0, 3)
        if IncidentKind.POLLUTION in active:
            pm25 = pm25 * 5 + 60
            no2 = no2 * 3 + 80
        out = {"pm25": pm25, "no2": no2}
    elif sensor.silo == "lighting":
        dark = _darkness(h)
        # Deep night (00:00-05:00) the city dims its lights to 60 % to save energy.
        dim = 100 * dark * (0.6 if 0 <= h < 5 else 1.0)
        power = 1200 * size * dim / 100 * (1 + g(0, 0.01)) + (15 if dim == 0 else 0)
        if IncidentKind.OUTAGE in active:
            power = 0.0
        out = {"dim_level": dim, "power": power}
    elif sensor.silo == "waste":
        # Each bin fills at its own pace and is emptied once a day at its own hour.
        emptied_at = (sum(map(ord, sensor.id)) * 7) % 24
        since = (h - emptied_at) % 24
        out = {"fill_level": min(100.0, since * 4.5 * size + abs(g(0, 0.5)))}
    else:  # a registry with other metrics: noise around the middle of each range
        for name, m in sensor.metrics.items():
            lo = m.min if m.min is not None else 0.0
            hi = m.max if m.max is not None else lo + 100.0
            out[name] = lo + (hi - lo) * (0.5 + 0.1 * g(0, 1))
    # Keep physically impossible noise out (a negative flow); keep only registered metrics.
    result: dict[str, float] = {}
    for name, m in sensor.metrics.items():
        v = out.get(name)
        if v is None:
            lo = m.min if m.min is not None else 0.0
            hi = m.max if m.max is not None else lo + 100.0
            v = (lo + hi) / 2
        v = max(v, m.min) if m.min is not None else v
        v = min(v, m.max) if m.max is not None else v
        result[name] = round(v, 3)
    return result
