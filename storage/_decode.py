"""Fast decoding of Kafka records into database rows (orjson into tuples, no pydantic).

The writer sees every reading, so this is the hot path: a :class:`citypulse.events.ReadingBatch`
is checked only as far as the database needs (types and ranges that would make COPY fail), since
the collector validated it against the registry already. Anything else raises
:class:`DecodeError` and the record is skipped (counted, logged).
"""

from __future__ import annotations

from typing import Any

import orjson

from storage.errors import StorageError

ReadingRow = tuple[int, str, str, float, int, int]
"""``(ts_ms, sensor_id, metric, value, quality, received_ms)``, times in epoch milliseconds."""

RejectionRow = tuple[int, str | None, str | None, str, str, str, str]
"""``(received_ms, vendor, sensor_id, reason, detail, topic, message_hash)``."""

_MAX_MS = 10**13  # year 2286: beyond it (or below 0) the value is garbage, not a time
_MAX_QUALITY = 2**15 - 1  # smallint


class DecodeError(StorageError):
    """A Kafka record that can't be stored (not JSON, wrong shape, out-of-range values)."""


def _text(value: Any, what: str) -> str:
    # PostgreSQL text can't hold NUL: one such string would fail the whole COPY.
    if type(value) is not str or "\x00" in value:
        raise DecodeError(f"{what} must be a string without NUL")
    return value


def _ms(value: Any, what: str) -> int:
    if type(value) is not int or not 0 <= value < _MAX_MS:
        raise DecodeError(f"{what} must be epoch milliseconds")
    return value


def decode_readings(raw: bytes | None) -> list[ReadingRow]:
    """Rows of one ``ReadingBatch`` record value.

    Raises:
        DecodeError: the record is not a storable reading batch.
    """
    if raw is None:
        raise DecodeError("empty record (tombstone)")
    try:
        return _readings(orjson.loads(raw))
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise DecodeError(f"not a reading batch: {type(exc).__name__}: {exc}") from exc


def _version(obj: Any) -> None:
    if obj.get("v") != 1:
        raise DecodeError(f"unsupported schema version {obj.get('v')!r}")


def _readings(obj: Any) -> list[ReadingRow]:
    _version(obj)
    sensor = _text(obj["sensor"], "sensor")
    received = _ms(obj["received_ms"], "received_ms")
    rows: list[ReadingRow] = []
    append = rows.append
    for r in obj["readings"]:
        ts = r["ts_ms"]
        value = r["value"]
        quality = r.get("quality", 0)
        metric = r["metric"]
        if type(ts) is not int or not 0 <= ts < _MAX_MS:
            raise DecodeError("ts_ms must be epoch milliseconds")
        tv = type(value)
        if tv is not float:
            # orjson never yields NaN/inf, so a float is always storable.
            if tv is not int:
                raise DecodeError("value must be a number")
            value = float(value)
        if type(quality) is not int or not 0 <= quality <= _MAX_QUALITY:
            raise DecodeError("quality must be a small non-negative integer")
        if type(metric) is not str or "\x00" in metric:
            raise DecodeError("metric must be a string without NUL")
        append((ts, sensor, metric, value, quality, received))
    return rows


def decode_rejection(raw: bytes | None) -> RejectionRow:
    """The row of one ``Rejection`` record value (the raw payload itself is not stored).

    Raises:
        DecodeError: the record is not a storable rejection.
    """
    if raw is None:
        raise DecodeError("empty record (tombstone)")
    try:
        return _rejection(orjson.loads(raw))
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise DecodeError(f"not a rejection: {type(exc).__name__}: {exc}") from exc


def _rejection(obj: Any) -> RejectionRow:
    _version(obj)
    vendor = obj.get("vendor")
    sensor = obj.get("sensor")
    return (
        _ms(obj["received_ms"], "received_ms"),
        None if vendor is None else _text(vendor, "vendor"),
        None if sensor is None else _text(sensor, "sensor"),
        _text(obj["reason"], "reason"),
        _text(obj["detail"], "detail"),
        _text(obj["topic"], "topic"),
        _text(obj["message_hash"], "message_hash"),
    )
