"""Validation of one MQTT message against the sensor registry. Pure: ``now`` is a parameter.

A message is accepted whole or refused whole: one bad record refuses the message, with the
first problem found as the reason. That keeps the vendor contract simple (a message is either
in or out, the vendor gets one reason code back) and makes a dead-letter replay exact (the
replayed message yields the very readings a first acceptance would have).

Checks, in this order (the first failure is the reason): size (``too_large``), topic
(``bad_topic``), sensor (``unknown_sensor``, ``wrong_vendor``), JSON (``malformed_json``,
``non_finite``), shape (``bad_schema``, ``bad_senml``, ``bad_timestamp``,
``unsupported_value``), count (``too_many_records``), then per reading ``unknown_metric``,
``wrong_unit``, ``non_finite``, ``ts_in_future``, ``ts_too_old``. A value outside the
metric's valid range is accepted with :attr:`~citypulse.events.Quality.OUT_OF_RANGE`.
"""

from __future__ import annotations

import base64
import hashlib
import math
from dataclasses import dataclass
from typing import Any

import orjson

from citypulse.events import Quality, Reading, ReadingBatch, Rejection, RejectReason
from citypulse.registry import Registry
from citypulse.settings import Settings
from citypulse.topics import SensorTopic, TopicError
from collectors.payload import PayloadError, is_senml, loads, parse_json_readings
from collectors.payload import parse_senml_readings as _parse_senml


@dataclass(frozen=True, slots=True)
class Limits:
    """What a single message may contain.

    Attributes:
        future_tolerance_ms: readings further ahead of ``now`` are refused (ms).
        past_tolerance_ms: readings older than ``now`` minus this are refused (ms).
        max_message_bytes: larger payloads are refused unread (bytes).
        max_readings: more readings in one message are refused.
    """

    future_tolerance_ms: int = 300_000
    past_tolerance_ms: int = 7 * 86_400_000
    max_message_bytes: int = 256 * 1024
    max_readings: int = 1000

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            future_tolerance_ms=round(settings.future_tolerance_s * 1000),
            past_tolerance_ms=round(settings.past_tolerance_s * 1000),
            max_message_bytes=settings.max_message_bytes,
            max_readings=settings.max_records_per_message,
        )


@dataclass(frozen=True, slots=True)
class _MetricSpec:
    unit: str
    min: float
    max: float


@dataclass(frozen=True, slots=True)
class _SensorSpec:
    id: str
    vendor: str
    metrics: dict[str, _MetricSpec]


class _Refused(Exception):  # control flow inside this module only
    def __init__(self, reason: RejectReason, detail: str) -> None:
        self.reason = reason
        self.detail = detail


_GOOD = int(Quality.GOOD)
_OUT_OF_RANGE = int(Quality.OUT_OF_RANGE)


@dataclass(frozen=True, slots=True)
class EncodedBatch:
    """An accepted message already encoded as its Kafka record (``validate_encoded``).

    Attributes:
        sensor: sensor id (the Kafka key).
        vendor: the sensor's vendor.
        received_ms: time of reception, epoch ms.
        source: :func:`message_hash` of the MQTT payload.
        readings: how many readings ``value`` carries.
        value: the JSON of the equivalent :class:`ReadingBatch` (UTF-8 bytes).
    """

    sensor: str
    vendor: str
    received_ms: int
    source: str
    readings: int
    value: bytes


def _rejection(
    refused: _Refused, topic: str, where: list[str | None], now_ms: int, digest: str, raw: bytes
) -> Rejection:
    return Rejection.model_construct(
        reason=refused.reason,
        detail=refused.detail,
        topic=topic,
        vendor=where[0],
        sensor=where[1],
        received_ms=now_ms,
        message_hash=digest,
        raw_b64=base64.b64encode(raw).decode("ascii"),
        v=1,
    )


def message_hash(raw: bytes) -> str:
    """The message id vendors and operators see: sha256 of the raw payload, 16 hex chars."""
    return hashlib.sha256(raw).hexdigest()[:16]


class Validator:
    """Validates messages against one registry snapshot (build a new one to reload).

    Args:
        registry: the sensor registry.
        limits: message limits; defaults match :class:`~citypulse.settings.Settings`.
    """

    def __init__(self, registry: Registry, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._sensors: dict[str, _SensorSpec] = {
            s.id: _SensorSpec(
                s.id,
                s.vendor,
                {
                    name: _MetricSpec(
                        m.unit,
                        -math.inf if m.min is None else m.min,
                        math.inf if m.max is None else m.max,
                    )
                    for name, m in s.metrics.items()
                },
            )
            for s in registry
        }

    def validate(self, topic: str, raw: bytes, now_ms: int) -> ReadingBatch | Rejection:
        """Accept the message as one :class:`ReadingBatch` or refuse it as a :class:`Rejection`.

        Args:
            topic: the MQTT topic it arrived on.
            raw: the MQTT payload.
            now_ms: the time of reception, epoch ms (also ``received_ms`` of the result).
        """
        digest = message_hash(raw)
        where: list[str | None] = [None, None]  # vendor, sensor: known once the topic parsed
        try:
            spec = self._sensor_of(topic, raw, where)
            readings = self._readings(spec, raw, now_ms)
        except _Refused as refused:
            return _rejection(refused, topic, where, now_ms, digest, raw)
        # model_construct: every field was checked above; re-validating costs ~40% of the path.
        construct = Reading.model_construct
        return ReadingBatch.model_construct(
            v=1,
            sensor=spec.id,
            vendor=spec.vendor,
            received_ms=now_ms,
            source=digest,
            readings=[construct(**r) for r in readings],
        )

    def validate_encoded(self, topic: str, raw: bytes, now_ms: int) -> EncodedBatch | Rejection:
        """Like :meth:`validate`, but an accepted message comes back as its Kafka value.

        The collector's hot path: no pydantic object per reading, the value is ``orjson`` of
        plain dicts with exactly :class:`ReadingBatch`'s JSON (same keys in the same order,
        floats as floats; byte-identical to ``validate(...).encode()``, see the tests).
        Refusals are the same :class:`Rejection` as :meth:`validate` returns.
        """
        digest = message_hash(raw)
        where: list[str | None] = [None, None]
        try:
            spec = self._sensor_of(topic, raw, where)
            readings = self._readings(spec, raw, now_ms)
        except _Refused as refused:
            return _rejection(refused, topic, where, now_ms, digest, raw)
        value = orjson.dumps(
            {
                "v": 1,
                "sensor": spec.id,
                "vendor": spec.vendor,
                "received_ms": now_ms,
                "source": digest,
                "readings": readings,
            }
        )
        return EncodedBatch(spec.id, spec.vendor, now_ms, digest, len(readings), value)

    def _sensor_of(self, topic: str, raw: bytes, where: list[str | None]) -> _SensorSpec:
        if len(raw) > self.limits.max_message_bytes:
            raise _Refused(
                RejectReason.TOO_LARGE,
                f"{len(raw)} bytes, the limit is {self.limits.max_message_bytes}",
            )
        try:
            parsed = SensorTopic.parse(topic)
        except TopicError as exc:
            raise _Refused(RejectReason.BAD_TOPIC, str(exc)) from None
        vendor, sensor = parsed.vendor, parsed.sensor_id
        where[:] = [vendor, sensor]
        if parsed.direction != "up":
            raise _Refused(RejectReason.BAD_TOPIC, f"readings go to .../up, not {topic!r}")
        spec = self._sensors.get(sensor)
        if spec is None:
            raise _Refused(RejectReason.UNKNOWN_SENSOR, f"sensor {sensor!r} is not registered")
        if spec.vendor != vendor:
            raise _Refused(
                RejectReason.WRONG_VENDOR,
                f"sensor {sensor!r} belongs to vendor {spec.vendor!r}, not {vendor!r}",
            )
        return spec

    def _readings(self, spec: _SensorSpec, raw: bytes, now_ms: int) -> list[dict[str, Any]]:
        """The readings as dicts with :class:`Reading`'s fields, in its field order."""
        limits = self.limits
        try:
            data = loads(raw)
            senml = is_senml(data)
            if isinstance(data, list) and len(data) > limits.max_readings:
                raise _Refused(
                    RejectReason.TOO_MANY_RECORDS,
                    f"{len(data)} records, the limit is {limits.max_readings}",
                )
            raws = _parse_senml(data, now_ms) if senml else parse_json_readings(data)
        except PayloadError as exc:
            raise _Refused(exc.reason, exc.detail) from None
        if len(raws) > limits.max_readings:
            raise _Refused(
                RejectReason.TOO_MANY_RECORDS,
                f"{len(raws)} readings, the limit is {limits.max_readings}",
            )
        latest = now_ms + limits.future_tolerance_ms
        earliest = now_ms - limits.past_tolerance_ms
        metrics = spec.metrics
        out: list[dict[str, Any]] = []
        for i, r in enumerate(raws):
            m = metrics.get(r.metric)
            if m is None:
                raise _Refused(
                    RejectReason.UNKNOWN_METRIC,
                    f"reading {i}: metric {r.metric!r} is not registered for this sensor "
                    f"(known: {', '.join(sorted(metrics))})",
                )
            if r.unit is not None and r.unit != m.unit:
                raise _Refused(
                    RejectReason.WRONG_UNIT,
                    f"reading {i}: {r.metric} in {r.unit!r}, the registry says {m.unit!r}",
                )
            value = r.value
            if not math.isfinite(value):
                raise _Refused(RejectReason.NON_FINITE, f"reading {i}: {r.metric} is {value}")
            if r.ts_ms > latest:
                raise _Refused(
                    RejectReason.TS_IN_FUTURE,
                    f"reading {i}: ts {r.ts_ms} is {(r.ts_ms - now_ms) / 1000:.0f}s ahead "
                    f"(tolerance {limits.future_tolerance_ms / 1000:.0f}s)",
                )
            if r.ts_ms < earliest:
                raise _Refused(
                    RejectReason.TS_TOO_OLD,
                    f"reading {i}: ts {r.ts_ms} is {(now_ms - r.ts_ms) / 1000:.0f}s old "
                    f"(tolerance {limits.past_tolerance_ms / 1000:.0f}s)",
                )
            out.append(
                {
                    "ts_ms": r.ts_ms,
                    "metric": r.metric,
                    "value": value,
                    "unit": m.unit,
                    "quality": _GOOD if m.min <= value <= m.max else _OUT_OF_RANGE,
                }
            )
        return out


def encode_rejection(rejection: Rejection) -> bytes:
    """The Kafka value of ``rejection`` (dead-letter topic)."""
    return rejection.encode()


def reject_notice(rejection: Rejection) -> bytes:
    """The JSON published to the vendor on ``citypulse/v1/{vendor}/{sensor}/rejects``."""
    return orjson.dumps(
        {
            "reason": rejection.reason.value,
            "detail": rejection.detail,
            "message_hash": rejection.message_hash,
            "received_ms": rejection.received_ms,
            "topic": rejection.topic,
        }
    )
