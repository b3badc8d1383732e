"""Vendor payload parsing: JSON readings and SenML (RFC 8428) packs. Pure, no I/O.

Two formats arrive on the same topic ``citypulse/v1/{vendor}/{sensor_id}/up``; they are told
apart by shape, never by guessing from content:

* **citypulse JSON**: an object ``{"ts": ..., "values": {"<metric>": <number>, ...}}`` or a
  non-empty array of such objects (every element has a ``values`` key).
* **SenML JSON**: a non-empty array of objects none of which has a ``values`` key (SenML
  records never do; a JSON object at the top level is never SenML, RFC 8428 section 5).

An array mixing both is refused (``bad_schema``). Parsing yields :class:`RawReading` values
(metric, event time, value, unit as sent) or raises :class:`PayloadError` with a stable
:class:`~citypulse.events.RejectReason`; checking them against the registry is
:mod:`collectors.validate`'s job.
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime
from typing import Any, NamedTuple

import orjson

from citypulse.events import RejectReason
from collectors.errors import CollectorError

SENML_VERSION = 10
"""Highest SenML version understood (RFC 8428); packs announcing a higher ``bver`` are refused."""

RELATIVE_TIME_LIMIT_S = 2**28
"""SenML times below this (seconds) are relative to "now" (RFC 8428 section 4.5.3)."""

_SENML_NAME = re.compile(r"^[A-Za-z0-9][-:./A-Za-z0-9_]*$")
_VALUE_KEYS = ("v", "vb", "vs", "vd")
_MAX_TS_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z: beyond it datetime cannot follow


class PayloadError(CollectorError):
    """A payload that cannot be read; ``reason`` is the stable code sent back to the vendor."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


class RawReading(NamedTuple):
    """One value as the vendor sent it, before the registry has been consulted.

    A named tuple: one is made per reading on the collector's hot path, in half the time of a
    frozen dataclass.

    Attributes:
        metric: metric name (for SenML, the last segment of the resolved name).
        ts_ms: event time, epoch milliseconds UTC.
        value: the number (SenML ``vb`` booleans become 1.0 / 0.0).
        unit: the unit the vendor stated (SenML ``u``/``bu``), ``None`` when not stated.
    """

    metric: str
    ts_ms: int
    value: float
    unit: str | None


class SenMLRecord(NamedTuple):
    """One resolved SenML record (RFC 8428 section 4.6): no base fields, absolute time.

    Attributes:
        name: base name + name.
        time: seconds since the Unix epoch (relative times already added to "now").
        unit: unit or base unit, ``None`` when neither is given.
        value: ``v`` (+ ``bv``), ``vb``, ``vs`` or ``vd``, whichever the record carries.
        sum: ``s`` (+ ``bs``), ``None`` when the record has no sum.
        update_time: ``ut`` in seconds, ``None`` when absent.
    """

    name: str
    time: float
    unit: str | None = None
    value: float | bool | str | bytes | None = None
    sum: float | None = None
    update_time: float | None = None


# -- JSON ------------------------------------------------------------------------------------


class _NonFinite(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _NonFinite(name)


def _reject_inf(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NonFinite(text)
    return value


def loads(raw: bytes) -> Any:
    """Decode JSON with orjson; tell a non-finite number from other malformed JSON.

    Raises:
        PayloadError: ``non_finite`` for ``NaN``/``Infinity`` literals or numbers overflowing a
            double, ``malformed_json`` for anything else that is not UTF-8 JSON.
    """
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # Off the hot path: ask the lenient stdlib parser whether it was only a NaN/Infinity.
        try:
            json.loads(raw, parse_constant=_reject_constant, parse_float=_reject_inf)
        except _NonFinite as nonfinite:
            raise PayloadError(RejectReason.NON_FINITE, f"non-finite number {nonfinite}") from None
        except (ValueError, UnicodeDecodeError):
            pass
        except RecursionError:
            # Nesting deeper than orjson's limit (1024) would otherwise crash the collector
            # on every redelivery of that message: a poison message. Found by the fuzz tests.
            pass
        raise PayloadError(RejectReason.MALFORMED_JSON, str(exc)) from None


# -- citypulse JSON --------------------------------------------------------------------------


def parse_ts(ts: object) -> int:
    """A citypulse JSON ``ts``: RFC 3339 string with an offset, or epoch milliseconds.

    Returns:
        Epoch milliseconds UTC.

    Raises:
        PayloadError: ``bad_timestamp``.
    """
    if isinstance(ts, bool):
        raise PayloadError(RejectReason.BAD_TIMESTAMP, f"ts must be a string or number: {ts!r}")
    if isinstance(ts, int):
        ms = ts
    elif isinstance(ts, float):
        if not math.isfinite(ts):
            raise PayloadError(RejectReason.BAD_TIMESTAMP, f"ts is not finite: {ts!r}")
        ms = round(ts)
    elif isinstance(ts, str):
        try:
            dt = datetime.fromisoformat(ts)
        except ValueError:
            raise PayloadError(
                RejectReason.BAD_TIMESTAMP, f"ts is not an RFC 3339 date-time: {ts[:64]!r}"
            ) from None
        if dt.tzinfo is None:
            raise PayloadError(
                RejectReason.BAD_TIMESTAMP,
                f"ts needs a date, a time and an offset (e.g. 'Z'): {ts[:64]!r}",
            )
        return round(dt.timestamp() * 1000)
    else:
        raise PayloadError(RejectReason.BAD_TIMESTAMP, f"ts must be a string or number: {ts!r}")
    if not 0 <= ms <= _MAX_TS_MS:
        raise PayloadError(RejectReason.BAD_TIMESTAMP, f"ts out of range: {ts!r}")
    return ms


def _parse_object(obj: object, where: str, out: list[RawReading]) -> None:
    if not isinstance(obj, dict):
        raise PayloadError(RejectReason.BAD_SCHEMA, f"{where}: expected an object")
    if "ts" not in obj or "values" not in obj or len(obj) != 2:
        extra = sorted(set(obj) - {"ts", "values"})
        raise PayloadError(
            RejectReason.BAD_SCHEMA,
            f"{where}: expected exactly the keys 'ts' and 'values'"
            + (f", unexpected {extra}" if extra else ""),
        )
    ts_ms = parse_ts(obj["ts"])
    values = obj["values"]
    if not isinstance(values, dict) or not values:
        raise PayloadError(RejectReason.BAD_SCHEMA, f"{where}: 'values' must be a non-empty object")
    for metric, value in values.items():
        # bool is an int subclass: refuse it explicitly, true is not 1.0 in this format.
        if type(value) is float:
            pass
        elif type(value) is int:
            value = float(value)
        else:
            raise PayloadError(
                RejectReason.BAD_SCHEMA, f"{where}: value of {metric!r} is not a number: {value!r}"
            )
        out.append(RawReading(metric, ts_ms, value, None))


def parse_json_readings(data: object) -> list[RawReading]:
    """Readings of a decoded citypulse JSON payload (object or array of objects)."""
    out: list[RawReading] = []
    if isinstance(data, dict):
        _parse_object(data, "payload", out)
    else:
        assert isinstance(data, list)
        for i, obj in enumerate(data):
            _parse_object(obj, f"[{i}]", out)
    return out


# -- SenML -----------------------------------------------------------------------------------


def _number(record: dict[str, Any], key: str, where: str) -> float | None:
    value = record.get(key)
    if value is None:
        return None
    if type(value) is not int and type(value) is not float:
        raise PayloadError(RejectReason.BAD_SENML, f"{where}: {key!r} must be a number")
    return float(value)


def _string(record: dict[str, Any], key: str, where: str) -> str | None:
    value = record.get(key)
    if value is None or isinstance(value, str):
        return value
    raise PayloadError(RejectReason.BAD_SENML, f"{where}: {key!r} must be a string")


def resolve_senml(pack: object, now_s: float) -> list[SenMLRecord]:
    """Resolve a decoded SenML JSON pack exactly as RFC 8428 section 4.6 describes.

    Base fields (``bn``, ``bt``, ``bu``, ``bv``, ``bs``, ``bver``) apply to their record and
    every later record until changed; name = bn + n; time = bt + t, and a result below
    2**28 s is relative to ``now_s``; unit = u, else bu; value = bv + v; sum = bs + s. A record
    carrying no value and no sum (e.g. one that only sets base fields) yields no record.
    Records come back in chronological order (stable for equal times).

    Args:
        pack: the decoded JSON (must be a non-empty list of objects).
        now_s: the current time, seconds since the epoch (for relative times).

    Raises:
        PayloadError: ``bad_senml`` for anything RFC 8428 does not allow (labels ending in
            ``_`` that we do not understand, a higher ``bver``, several value fields, bad names
            or types), ``bad_timestamp`` for a non-finite time.
    """
    if not isinstance(pack, list) or not pack:
        raise PayloadError(RejectReason.BAD_SENML, "a SenML pack is a non-empty array")
    bn = ""
    bt = 0.0
    bu: str | None = None
    bv = 0.0
    bs: float | None = None
    out: list[SenMLRecord] = []
    for i, record in enumerate(pack):
        where = f"record {i}"
        if not isinstance(record, dict):
            raise PayloadError(RejectReason.BAD_SENML, f"{where}: expected an object")
        for key in record:
            # RFC 8428 section 4.4: unknown labels ending in "_" are must-understand.
            if key.endswith("_"):
                raise PayloadError(
                    RejectReason.BAD_SENML, f"{where}: must-understand label {key!r} not supported"
                )
        if "bver" in record:
            bver = record["bver"]
            if type(bver) is not int or bver < 1:
                raise PayloadError(RejectReason.BAD_SENML, f"{where}: bver must be a positive int")
            if bver > SENML_VERSION:
                raise PayloadError(
                    RejectReason.BAD_SENML, f"{where}: SenML version {bver} is not supported"
                )
        if "bn" in record:
            bn = _string(record, "bn", where) or ""
        if "bt" in record:
            bt = _number(record, "bt", where) or 0.0
        if "bu" in record:
            bu = _string(record, "bu", where)
        if "bv" in record:
            bv = _number(record, "bv", where) or 0.0
        if "bs" in record:
            bs = _number(record, "bs", where)

        present = [k for k in _VALUE_KEYS if k in record]
        if len(present) > 1:
            raise PayloadError(
                RejectReason.BAD_SENML, f"{where}: more than one value field {present}"
            )
        value: float | bool | str | bytes | None = None
        if present:
            key = present[0]
            raw = record[key]
            if key == "v":
                if type(raw) is not int and type(raw) is not float:
                    raise PayloadError(RejectReason.BAD_SENML, f"{where}: 'v' must be a number")
                value = bv + raw
            elif key == "vb":
                if not isinstance(raw, bool):
                    raise PayloadError(RejectReason.BAD_SENML, f"{where}: 'vb' must be a boolean")
                value = raw
            elif key == "vs":
                if not isinstance(raw, str):
                    raise PayloadError(RejectReason.BAD_SENML, f"{where}: 'vs' must be a string")
                value = raw
            else:
                if not isinstance(raw, str):
                    raise PayloadError(RejectReason.BAD_SENML, f"{where}: 'vd' must be a string")
                value = raw.encode()
        s = _number(record, "s", where)
        total = None if s is None and bs is None else (bs or 0.0) + (s or 0.0)
        if value is None and s is None:
            continue  # only base fields (RFC 8428 section 5.1.7 starts a pack like this)

        name = bn + (_string(record, "n", where) or "")
        if not name:
            raise PayloadError(RejectReason.BAD_SENML, f"{where}: no name (neither bn nor n)")
        if _SENML_NAME.match(name) is None:
            raise PayloadError(RejectReason.BAD_SENML, f"{where}: invalid SenML name {name!r}")
        t = _number(record, "t", where) or 0.0
        time = bt + t
        if not math.isfinite(time):
            raise PayloadError(RejectReason.BAD_TIMESTAMP, f"{where}: time is not finite")
        if time < RELATIVE_TIME_LIMIT_S:
            time += now_s
        unit = _string(record, "u", where) or bu
        ut = _number(record, "ut", where)
        out.append(SenMLRecord(name, time, unit, value, total, ut))
    out.sort(key=lambda r: r.time)
    return out


def senml_metric(name: str) -> tuple[str, str]:
    """Split a resolved SenML name into ``(prefix, metric)``.

    The metric is what follows the last ``:`` or ``/``; the prefix (e.g.
    ``urn:dev:ow:10e2073a01080063:`` or ``wtr-0001/``) names the device in the vendor's terms
    and may be empty. The MQTT topic, not the prefix, says which sensor it is.
    """
    cut = max(name.rfind(":"), name.rfind("/")) + 1
    return name[:cut], name[cut:]


def parse_senml_readings(pack: object, now_ms: int) -> list[RawReading]:
    """Readings of a decoded SenML pack: resolved, then mapped to metrics.

    * ``v`` (+ ``bv``) is the value; ``vb`` becomes 1.0 / 0.0; a record with only a sum
      (``s`` + ``bs``) stores the sum as the value; with both, the value wins.
    * ``vs`` (string) and ``vd`` (data) cannot be stored as numbers: the message is refused with
      ``unsupported_value``.
    * Every record must carry the same name prefix: one pack describes one sensor, the one in
      the topic (a gateway publishes one pack per sensor topic).

    Raises:
        PayloadError: see :func:`resolve_senml`; ``unsupported_value``; ``bad_senml`` when the
            prefixes differ or a metric name is empty.
    """
    records = resolve_senml(pack, now_ms / 1000)
    out: list[RawReading] = []
    prefix0: str | None = None
    for r in records:
        prefix, metric = senml_metric(r.name)
        if prefix0 is None:
            prefix0 = prefix
        elif prefix != prefix0:
            raise PayloadError(
                RejectReason.BAD_SENML,
                f"names of more than one device in one pack ({prefix0!r}, {prefix!r})",
            )
        if not metric:
            raise PayloadError(RejectReason.BAD_SENML, f"name {r.name!r} has no metric part")
        value = r.value
        if isinstance(value, bool):
            number = 1.0 if value else 0.0
        elif isinstance(value, float | int):
            number = float(value)
        elif value is None:
            assert r.sum is not None
            number = r.sum
        else:
            kind = "string (vs)" if isinstance(value, str) else "data (vd)"
            raise PayloadError(
                RejectReason.UNSUPPORTED_VALUE,
                f"{r.name}: {kind} values are not stored; send numbers (v) or booleans (vb)",
            )
        out.append(RawReading(metric, round(r.time * 1000), number, r.unit))
    return out


def is_senml(data: object) -> bool:
    """True when a decoded payload has the shape of a SenML pack (see the module docstring).

    Raises:
        PayloadError: ``bad_schema`` for a shape that is neither format.
    """
    if isinstance(data, dict):
        return False
    if not isinstance(data, list) or not data:
        raise PayloadError(
            RejectReason.BAD_SCHEMA,
            "expected an object, an array of objects, or a SenML pack (non-empty array)",
        )
    with_values = sum(1 for obj in data if isinstance(obj, dict) and "values" in obj)
    if with_values == len(data):
        return False
    if with_values == 0:
        return True
    raise PayloadError(
        RejectReason.BAD_SCHEMA, "array mixes citypulse objects ('values') and SenML records"
    )


def parse_payload(raw: bytes, now_ms: int) -> list[RawReading]:
    """Decode and parse either format into readings (nothing checked against the registry).

    Args:
        raw: the MQTT payload.
        now_ms: the current time, epoch ms (SenML relative times).

    Raises:
        PayloadError: with the reason code.
    """
    data = loads(raw)
    if is_senml(data):
        return parse_senml_readings(data, now_ms)
    return parse_json_readings(data)
