"""The event schema every stage shares: what travels on the Kafka topics.

Every record is JSON (UTF-8) with a ``v`` schema version. Times on the wire are epoch
milliseconds (UTC); in Python they are exposed as timezone-aware UTC datetimes.

Topics (prefix configurable, see ``Settings.topic``):

* ``citypulse.readings``  key = sensor id, value = :class:`ReadingBatch`
* ``citypulse.deadletter`` key = vendor, value = :class:`Rejection`
* ``citypulse.alerts``     key = alert fingerprint (rule engine)
* ``citypulse.commands``   key = sensor id (rule engine)
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from enum import IntEnum, StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


def ms_to_dt(ms: int) -> datetime:
    """Epoch milliseconds to an aware UTC datetime."""
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def dt_to_ms(dt: datetime) -> int:
    """Aware datetime to epoch milliseconds."""
    return round(dt.timestamp() * 1000)


class Quality(IntEnum):
    """Quality flag stored with every reading (a bit set; 0 is good)."""

    GOOD = 0
    OUT_OF_RANGE = 1
    """Outside the metric's physically valid range in the registry: kept, flagged."""


class RejectReason(StrEnum):
    """Stable reason codes for refused messages (part of the vendor contract)."""

    BAD_TOPIC = "bad_topic"
    TOO_LARGE = "too_large"
    MALFORMED_JSON = "malformed_json"
    BAD_SCHEMA = "bad_schema"
    BAD_SENML = "bad_senml"
    TOO_MANY_RECORDS = "too_many_records"
    UNKNOWN_SENSOR = "unknown_sensor"
    WRONG_VENDOR = "wrong_vendor"
    UNKNOWN_METRIC = "unknown_metric"
    WRONG_UNIT = "wrong_unit"
    NON_FINITE = "non_finite"
    BAD_TIMESTAMP = "bad_timestamp"
    TS_IN_FUTURE = "ts_in_future"
    TS_TOO_OLD = "ts_too_old"
    RATE_LIMITED = "rate_limited"
    UNSUPPORTED_VALUE = "unsupported_value"
    """A SenML string (vs) or data (vd) value: only numbers and booleans are stored."""


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Reading(_Record):
    """One value of one metric of one sensor at one instant."""

    ts_ms: int = Field(description="event time, epoch milliseconds UTC")
    metric: str
    value: float
    unit: str
    quality: int = Field(Quality.GOOD, description="Quality bit set; 0 = good")

    @property
    def ts(self) -> datetime:
        return ms_to_dt(self.ts_ms)


class ReadingBatch(_Record):
    """The readings of one accepted MQTT message, all from one sensor (Kafka key = sensor)."""

    v: Literal[1] = 1
    sensor: str
    vendor: str
    received_ms: int = Field(description="when the collector received the message")
    source: str = Field(description="hash of the MQTT message the readings came from")
    readings: list[Reading]

    def encode(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def decode(cls, raw: bytes) -> ReadingBatch:
        return cls.model_validate_json(raw)


class Rejection(_Record):
    """A refused message on the dead-letter topic, with enough to replay it."""

    v: Literal[1] = 1
    reason: RejectReason
    detail: str
    topic: str = Field(description="MQTT topic it arrived on")
    vendor: str | None
    sensor: str | None
    received_ms: int
    message_hash: str = Field(description="sha256 of the raw payload, hex (first 16 chars)")
    raw_b64: str = Field(description="the raw MQTT payload, base64")

    @property
    def raw(self) -> bytes:
        return base64.b64decode(self.raw_b64)

    def encode(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def decode(cls, raw: bytes) -> Rejection:
        return cls.model_validate_json(raw)


class AlertState(StrEnum):
    INACTIVE = "inactive"
    PENDING = "pending"
    FIRING = "firing"
    RESOLVED = "resolved"


class AlertEvent(_Record):
    """One state change of one alert (Kafka key = fingerprint). Explains itself."""

    v: Literal[1] = 1
    fingerprint: str = Field(description="stable hash of rule name and alert labels")
    rule: str
    rule_version: str = Field(description="content hash of the rule file")
    group: str = Field(description="rule group name")
    state: AlertState
    severity: str
    labels: dict[str, str]
    annotations: dict[str, str]
    values: dict[str, float] = Field(description="the computed values that decided the state")
    window_s: float | None = Field(None, description="window behind the values, seconds")
    active_since_ms: int | None = Field(None, description="when it went pending")
    ts_ms: int = Field(description="event time of this change, epoch ms")
    evaluated_ms: int = Field(description="event time of the evaluation")
    notify: bool = Field(True, description="false inside a maintenance window")

    def encode(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def decode(cls, raw: bytes) -> AlertEvent:
        return cls.model_validate_json(raw)


class CommandEvent(_Record):
    """A command to an actuator (Kafka key = sensor id), sent or suppressed by guardrails."""

    v: Literal[1] = 1
    command_id: str
    rule: str
    rule_version: str
    sensor: str
    vendor: str
    setting: str = Field(description="what is set, e.g. 'dim_level'")
    value: float
    previous: float | None
    status: Literal["sent", "dry_run", "suppressed"]
    reason: str | None = Field(None, description="why suppressed / clamped")
    ts_ms: int

    def encode(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def decode(cls, raw: bytes) -> CommandEvent:
        return cls.model_validate_json(raw)
