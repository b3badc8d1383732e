"""The simulator proper: a deterministic stream of prepared MQTT (topic, payload) messages.

Time model: messages are laid out on a wall-clock schedule (``wall_offset_s``, seconds after
the start) at ``rate`` readings per second; the simulated event time of a message is
``start + wall_offset_s * speedup``. A sensor's readings inside one batched message are spaced
by its revisit period and end at the message's event time, so no timestamp lies in the future.
A *reading* is one value of one metric (what the pipeline stores as one row); a *record* is one
timestamp of one sensor with all its metrics.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from citypulse.registry import Registry, Sensor
from citypulse.topics import SensorTopic
from deploy.simulator._model import Incident, IncidentKind, affected, values_at

FORMATS = ("json", "senml")
"""Payload families of the vendor contract; ``json`` batches become a JSON array."""

VENDOR_FORMATS: dict[str, tuple[str, str]] = {
    # vendor: (payload family, timestamp style for JSON: "rfc3339" | "epoch_ms")
    "aquasense": ("json", "rfc3339"),
    "hydrix": ("senml", ""),
    "voltiq": ("senml", ""),
    "trafficore": ("json", "epoch_ms"),
    "airly": ("senml", ""),
    "lumen": ("json", "epoch_ms"),
    "binsense": ("json", "rfc3339"),
}
"""How each example vendor talks; vendors not listed get a style chosen from their name."""

MALFORMED_KINDS = (
    "malformed_json",
    "unknown_metric",
    "wrong_vendor",
    "unknown_sensor",
    "bad_timestamp",
    "bad_schema",
)
"""The defects injected, named by the :class:`citypulse.events.RejectReason` they should get."""


def default_backfill_s(
    speedup: float, duration_s: float | None, max_s: float = 6 * 86400.0
) -> float:
    """History to replay so a sped-up run ends at real time: ``duration x (speedup - 1)``.

    Without a duration, one simulated day. Capped at ``max_s`` (the collector refuses readings
    older than ``past_tolerance_s``, 7 days by default).
    """
    if speedup <= 1:
        return 0.0
    wanted = duration_s * (speedup - 1) if duration_s is not None else 86400.0
    return min(wanted, max_s)


class SimulatorError(ValueError):
    """The simulator was configured with values it cannot honour."""


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    """How the simulated city behaves. Times in seconds; ``rate`` in readings per second."""

    rate: float | None = None
    """Readings per wall-clock second; ``None`` = realistic: every sensor once per interval,
    times ``speedup``."""
    speedup: float = 1.0
    """Simulated seconds per wall-clock second."""
    seed: int = 1
    readings_per_message: int = 1
    """Records (timestamps) per message: 1 = single object / SenML pack of one instant."""
    malformed_fraction: float = 0.01
    """Probability that a message is followed by an extra, defective one."""
    incident_every_s: float = 900.0
    """Simulated seconds between incident starts (0 = no incidents)."""
    incident_duration_s: float = 300.0
    """Simulated seconds an incident lasts."""
    first_incident_after_s: float = 60.0
    """Simulated seconds from the start to the first incident."""

    def __post_init__(self) -> None:
        if self.rate is not None and self.rate <= 0:
            raise SimulatorError("rate must be positive")
        if self.speedup <= 0:
            raise SimulatorError("speedup must be positive")
        if self.readings_per_message < 1:
            raise SimulatorError("readings_per_message must be at least 1")
        if not 0 <= self.malformed_fraction <= 1:
            raise SimulatorError("malformed_fraction must be within 0..1")


@dataclass(frozen=True, slots=True)
class Message:
    """One prepared MQTT message and what it carries."""

    topic: str
    payload: bytes
    sensor: str
    vendor: str
    readings: int
    """Metric values carried (0 for a malformed message)."""
    records: int
    fmt: str
    """``json``, ``json-batch``, ``senml`` or ``raw`` (malformed)."""
    malformed: str | None
    """For injected defects: the reject reason the collector should give."""
    event_time: datetime
    """Simulated time of the newest record."""
    wall_offset_s: float
    """When to publish it, seconds after the publisher starts (wall clock)."""


@dataclass(slots=True)
class _Cursor:
    wall_s: float = 0.0
    next_incident_s: float = 0.0
    incidents: list[Incident] = field(default_factory=list)


def _whole_ms(t: datetime) -> datetime:
    # Every wire format carries milliseconds; truncating here keeps encodings exact.
    return t.replace(microsecond=t.microsecond // 1000 * 1000)


def _rfc3339(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _ms(t: datetime) -> int:
    return round(t.timestamp() * 1000)


def vendor_style(vendor: str) -> tuple[str, str]:
    """(payload family, JSON timestamp style) the vendor uses."""
    if vendor in VENDOR_FORMATS:
        return VENDOR_FORMATS[vendor]
    n = sum(map(ord, vendor))
    return (FORMATS[n % 2], ("rfc3339", "epoch_ms")[(n // 2) % 2])


def encode_json(records: list[tuple[datetime, dict[str, float]]], ts_style: str) -> bytes:
    """The JSON form: one object, or an array of objects for a batch."""
    objs = [
        {"ts": _rfc3339(t) if ts_style == "rfc3339" else _ms(t), "values": values}
        for t, values in records
    ]
    return orjson.dumps(objs[0] if len(objs) == 1 else objs)


def encode_senml(
    sensor: Sensor, records: list[tuple[datetime, dict[str, float]]], base_name: str = ""
) -> bytes:
    """A SenML JSON pack (RFC 8428): base time ``bt`` in seconds, ``t`` relative to it.

    When every metric of the sensor shares one unit it is sent once as ``bu``.
    """
    units = {m.unit for m in sensor.metrics.values()}
    common = units.pop() if len(units) == 1 else None
    t0 = records[0][0]
    pack: list[dict[str, Any]] = []
    for t, values in records:
        for name, v in values.items():
            rec: dict[str, Any] = {"n": name, "v": v}
            if common is None:
                rec["u"] = sensor.metrics[name].unit
            rel = round((t - t0).total_seconds(), 3)
            if rel:
                rec["t"] = rel
            pack.append(rec)
    head = pack[0]
    head["bt"] = round(t0.timestamp(), 3)
    if base_name:
        head["bn"] = base_name
    if common is not None:
        head["bu"] = common
    return orjson.dumps(pack)


class Simulator:
    """A simulated city: prepared messages, deterministic for a given registry, config, start.

    Example:
        >>> sim = Simulator(registry, SimulatorConfig(seed=3, speedup=60))
        >>> for msg in itertools.islice(sim.messages(start), 100): ...
    """

    def __init__(self, registry: Registry, config: SimulatorConfig | None = None) -> None:
        if len(registry) == 0:
            raise SimulatorError("the registry has no sensors")
        self.registry = registry
        self.config = config or SimulatorConfig()
        self.incidents: list[Incident] = []
        """Incidents injected so far by the last :meth:`messages` iteration."""

    @property
    def rate(self) -> float:
        """Readings per wall-clock second actually used."""
        if self.config.rate is not None:
            return self.config.rate
        per_sim_s = sum(len(s.metrics) / s.interval_s for s in self.registry)
        return per_sim_s * self.config.speedup

    def messages(self, start: datetime | None = None, backfill_s: float = 0.0) -> Iterator[Message]:
        """Yield messages forever, in publishing order.

        Simulated time runs ``speedup`` times faster than the wall clock but never ahead of
        it: it starts ``backfill_s`` in the past and, once it has caught up with real time, it
        runs at real speed. So every timestamp is honest (never in the future).

        Args:
            start: real (wall-clock) time of the first message, aware; default: now.
            backfill_s: simulated seconds of history to replay quickly before real time.
        """
        cfg = self.config
        real_start = start or datetime.now(UTC)
        if real_start.tzinfo is None:
            raise SimulatorError("start must be timezone-aware")
        if backfill_s < 0:
            raise SimulatorError("backfill_s must not be negative")
        start = real_start - timedelta(seconds=backfill_s)
        rng = random.Random(cfg.seed)  # noqa: S311 - simulation, reproducible on purpose
        sensors = list(self.registry)
        rng.shuffle(sensors)
        rate = self.rate
        per_cycle = sum(len(s.metrics) for s in sensors) * cfg.readings_per_message
        # Simulated seconds between two records of one sensor.
        period_s = per_cycle / rate * cfg.speedup / cfg.readings_per_message
        self.incidents = []
        next_incident_s = cfg.first_incident_after_s if cfg.incident_every_s > 0 else None
        wall = 0.0
        while True:
            for sensor in sensors:
                now = min(
                    start + timedelta(seconds=wall * cfg.speedup),
                    real_start + timedelta(seconds=wall),
                )
                if next_incident_s is not None and (now - start).total_seconds() >= next_incident_s:
                    self.incidents.append(self._incident(rng, start, next_incident_s))
                    next_incident_s += cfg.incident_every_s
                n = cfg.readings_per_message
                now = _whole_ms(now)
                times = [
                    _whole_ms(now - timedelta(seconds=period_s * (n - 1 - j))) for j in range(n)
                ]
                records = [(t, values_at(sensor, t, self.incidents, rng)) for t in times]
                yield self._encode(sensor, records, now, wall)
                if rng.random() < cfg.malformed_fraction:
                    yield self._malformed(rng, sensor, records, now, wall)
                wall += len(sensor.metrics) * n / rate

    def _incident(self, rng: random.Random, start: datetime, at_s: float) -> Incident:
        kind = rng.choice(list(IncidentKind))
        districts = self.registry.districts()
        # Prefer a district that has sensors the incident would touch.
        candidates = [
            d
            for d in districts
            if any(s.district == d and affected(kind, s) for s in self.registry)
        ] or districts
        district = rng.choice(candidates)
        sensors = tuple(s.id for s in self.registry if s.district == district and affected(kind, s))
        begin = start + timedelta(seconds=at_s)
        return Incident(
            kind=kind,
            district=district,
            start=begin,
            end=begin + timedelta(seconds=self.config.incident_duration_s),
            sensors=sensors,
        )

    def _encode(
        self,
        sensor: Sensor,
        records: list[tuple[datetime, dict[str, float]]],
        now: datetime,
        wall: float,
    ) -> Message:
        family, ts_style = vendor_style(sensor.vendor)
        if family == "senml":
            payload = encode_senml(sensor, records, f"urn:dev:citypulse:{sensor.id}:")
            fmt = "senml"
        else:
            payload = encode_json(records, ts_style)
            fmt = "json" if len(records) == 1 else "json-batch"
        return Message(
            topic=str(SensorTopic(sensor.vendor, sensor.id)),
            payload=payload,
            sensor=sensor.id,
            vendor=sensor.vendor,
            readings=sum(len(v) for _, v in records),
            records=len(records),
            fmt=fmt,
            malformed=None,
            event_time=now,
            wall_offset_s=wall,
        )

    def _malformed(
        self,
        rng: random.Random,
        sensor: Sensor,
        records: list[tuple[datetime, dict[str, float]]],
        now: datetime,
        wall: float,
    ) -> Message:
        kind = rng.choice(MALFORMED_KINDS)
        vendor, sensor_id = sensor.vendor, sensor.id
        t, values = records[-1]
        good: dict[str, Any] = {"ts": _rfc3339(t), "values": values}
        if kind == "malformed_json":
            payload = orjson.dumps(good)[: rng.randint(1, 20)]
        elif kind == "unknown_metric":
            payload = orjson.dumps({**good, "values": {**values, "humidity_x": 42.0}})
        elif kind == "wrong_vendor":
            others = [v for v in self.registry.vendors() if v != vendor] or ["nobody"]
            vendor = rng.choice(others)
            payload = orjson.dumps(good)
        elif kind == "unknown_sensor":
            sensor_id = f"{sensor.id}-ghost"
            payload = orjson.dumps(good)
        elif kind == "bad_timestamp":
            payload = orjson.dumps({**good, "ts": "yesterday at noon"})
        else:  # bad_schema: valid JSON, not a reading
            payload = orjson.dumps({"temperature": "warm", "values": "n/a"})
        return Message(
            topic=str(SensorTopic(vendor, sensor_id)),
            payload=payload,
            sensor=sensor_id,
            vendor=vendor,
            readings=0,
            records=0,
            fmt="raw",
            malformed=kind,
            event_time=now,
            wall_offset_s=wall,
        )
