"""Validation of messages against the registry: accepted readings and every reason code."""

from __future__ import annotations

import base64

import orjson
import pytest

from citypulse.events import Quality, ReadingBatch, Rejection, RejectReason
from collectors import EncodedBatch, Limits, Validator, message_hash, parse_payload, reject_notice

from .registry import registry

NOW_MS = 1_700_000_000_000
TOPIC = "citypulse/v1/aquasense/wtr-0001/up"
LAMP = "citypulse/v1/lumen/lgt-0001/up"


@pytest.fixture(scope="module")
def validator() -> Validator:
    return Validator(registry(), Limits(max_message_bytes=4096, max_readings=10))


def accept(validator: Validator, payload: object, topic: str = TOPIC) -> ReadingBatch:
    """``validate`` accepts; the collector's fast path yields the very same Kafka bytes."""
    raw = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    verdict = validator.validate(topic, raw, NOW_MS)
    assert isinstance(verdict, ReadingBatch), verdict
    fast = validator.validate_encoded(topic, raw, NOW_MS)
    assert isinstance(fast, EncodedBatch), fast
    assert fast.value == verdict.encode()
    assert ReadingBatch.decode(fast.value) == verdict
    assert (fast.sensor, fast.vendor, fast.received_ms, fast.source, fast.readings) == (
        verdict.sensor,
        verdict.vendor,
        verdict.received_ms,
        verdict.source,
        len(verdict.readings),
    )
    return verdict


def refuse(validator: Validator, payload: object, topic: str = TOPIC) -> Rejection:
    """``validate`` refuses; the fast path refuses with the identical rejection."""
    raw = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    verdict = validator.validate(topic, raw, NOW_MS)
    assert isinstance(verdict, Rejection), verdict
    assert validator.validate_encoded(topic, raw, NOW_MS) == verdict
    return verdict


def test_json_object_is_accepted_with_registry_units(validator: Validator) -> None:
    """A single object yields one reading per metric, in the registry's unit."""
    batch = accept(validator, {"ts": NOW_MS - 1000, "values": {"pressure": 3.2, "flow": 10}})
    assert (batch.sensor, batch.vendor, batch.received_ms) == ("wtr-0001", "aquasense", NOW_MS)
    assert [(r.metric, r.ts_ms, r.value, r.unit, r.quality) for r in batch.readings] == [
        ("pressure", NOW_MS - 1000, 3.2, "bar", Quality.GOOD),
        ("flow", NOW_MS - 1000, 10.0, "m3/h", Quality.GOOD),
    ]


def test_json_rfc3339_timestamps_with_offsets(validator: Validator) -> None:
    """RFC 3339 strings with Z or an offset mean the same instant as epoch ms."""
    batch = accept(
        validator,
        [
            {"ts": "2023-11-14T22:13:19Z", "values": {"pressure": 1}},
            {"ts": "2023-11-14T23:13:19.500+01:00", "values": {"pressure": 2}},
        ],
    )
    assert [r.ts_ms for r in batch.readings] == [NOW_MS - 1000, NOW_MS - 500]


def test_encoded_batch_round_trips(validator: Validator) -> None:
    """What goes to Kafka decodes to the same batch (the storage writer's view)."""
    raw = orjson.dumps({"ts": NOW_MS, "values": {"pressure": 99.0}})
    batch = accept(validator, raw)
    decoded = ReadingBatch.decode(batch.encode())
    assert decoded == batch
    assert decoded.source == message_hash(raw)


def test_out_of_range_is_kept_and_flagged(validator: Validator) -> None:
    """A value outside the valid range is stored with the OUT_OF_RANGE flag, not refused."""
    batch = accept(validator, {"ts": NOW_MS, "values": {"pressure": 99.0, "flow": -1}})
    assert [r.quality for r in batch.readings] == [Quality.OUT_OF_RANGE, Quality.OUT_OF_RANGE]


def test_senml_with_sensor_prefix_and_units(validator: Validator) -> None:
    """SenML names '<prefix><metric>' map to metrics; units are checked, bt/t resolved."""
    pack = [
        {"bn": "urn:dev:aquasense:wtr-0001:", "bt": NOW_MS / 1000, "bu": "bar"},
        {"n": "pressure", "t": -60, "v": 3.1},
        {"n": "pressure", "v": 3.3},
        {"n": "flow", "u": "m3/h", "v": 12.5},
    ]
    batch = accept(validator, pack)
    assert [(r.metric, r.ts_ms, r.value) for r in batch.readings] == [
        ("pressure", NOW_MS - 60_000, 3.1),
        ("pressure", NOW_MS, 3.3),
        ("flow", NOW_MS, 12.5),
    ]


def test_senml_plain_and_slash_names(validator: Validator) -> None:
    """'metric' alone and 'wtr-0001/metric' are both accepted; relative time is 'now'."""
    assert accept(validator, [{"n": "pressure", "v": 1}]).readings[0].ts_ms == NOW_MS
    assert accept(validator, [{"n": "wtr-0001/pressure", "v": 1}]).readings[0].metric == "pressure"


def test_senml_booleans_and_sums(validator: Validator) -> None:
    """vb is stored as 1/0; a record with only a sum stores the sum."""
    batch = accept(
        validator,
        [{"bn": "lgt-0001:", "n": "lamp_on", "vb": True}, {"n": "energy", "bs": 100, "s": 5}],
        LAMP,
    )
    assert [(r.metric, r.value) for r in batch.readings] == [("lamp_on", 1.0), ("energy", 105.0)]


def test_reject_notice_has_reason_detail_and_hash(validator: Validator) -> None:
    """The MQTT notice to the vendor carries the reason code, detail and message hash."""
    raw = b'{"ts": 1, "values": {"pressure": 1}'
    rejection = refuse(validator, raw)
    notice = orjson.loads(reject_notice(rejection))
    assert notice["reason"] == "malformed_json"
    assert notice["message_hash"] == message_hash(raw) == rejection.message_hash
    assert notice["detail"]
    assert base64.b64decode(rejection.raw_b64) == raw
    assert Rejection.decode(rejection.encode()) == rejection


OK = {"ts": NOW_MS, "values": {"pressure": 1.0}}

CASES: list[tuple[str, object, str, RejectReason]] = [
    ("topic", OK, "citypulse/v2/aquasense/wtr-0001/up", RejectReason.BAD_TOPIC),
    ("topic-dir", OK, "citypulse/v1/aquasense/wtr-0001/down", RejectReason.BAD_TOPIC),
    ("large", {"ts": NOW_MS, "values": {"pressure": 1.0}, "x": "y" * 5000}, TOPIC,
     RejectReason.TOO_LARGE),
    ("json", b"{not json", TOPIC, RejectReason.MALFORMED_JSON),
    ("utf8", b'{"ts": "\xff"}', TOPIC, RejectReason.MALFORMED_JSON),
    ("nan", b'{"ts": 1700000000000, "values": {"pressure": NaN}}', TOPIC, RejectReason.NON_FINITE),
    ("inf", b'{"ts": 1700000000000, "values": {"pressure": 1e999}}', TOPIC,
     RejectReason.NON_FINITE),
    ("senml-inf", [{"n": "pressure", "bv": 1.7e308, "v": 1.7e308}], TOPIC, RejectReason.NON_FINITE),
    ("scalar", 42, TOPIC, RejectReason.BAD_SCHEMA),
    ("empty", [], TOPIC, RejectReason.BAD_SCHEMA),
    ("no-values", {"ts": NOW_MS}, TOPIC, RejectReason.BAD_SCHEMA),
    ("extra-key", {**OK, "seq": 1}, TOPIC, RejectReason.BAD_SCHEMA),
    ("string-value", {"ts": NOW_MS, "values": {"pressure": "1.0"}}, TOPIC,
     RejectReason.BAD_SCHEMA),
    ("bool-value", {"ts": NOW_MS, "values": {"pressure": True}}, TOPIC, RejectReason.BAD_SCHEMA),
    ("mixed", [OK, {"n": "pressure", "v": 1}], TOPIC, RejectReason.BAD_SCHEMA),
    ("senml-bad", [{"n": "pressure", "v": 1, "x_": 1}], TOPIC, RejectReason.BAD_SENML),
    ("two-devices", [{"bn": "a:", "n": "pressure", "v": 1}, {"bn": "b:", "n": "pressure", "v": 1}],
     TOPIC, RejectReason.BAD_SENML),
    ("vs", [{"n": "pressure", "vs": "high"}], TOPIC, RejectReason.UNSUPPORTED_VALUE),
    ("vd", [{"n": "pressure", "vd": "aGk"}], TOPIC, RejectReason.UNSUPPORTED_VALUE),
    ("many", [{"n": "pressure", "t": -i, "v": 1} for i in range(11)], TOPIC,
     RejectReason.TOO_MANY_RECORDS),
    ("many-values", [{"ts": NOW_MS - i, "values": {"pressure": 1, "flow": 2}} for i in range(6)],
     TOPIC, RejectReason.TOO_MANY_RECORDS),
    ("sensor", OK, "citypulse/v1/aquasense/wtr-9999/up", RejectReason.UNKNOWN_SENSOR),
    ("vendor", OK, "citypulse/v1/lumen/wtr-0001/up", RejectReason.WRONG_VENDOR),
    ("metric", {"ts": NOW_MS, "values": {"temperature": 1}}, TOPIC, RejectReason.UNKNOWN_METRIC),
    ("unit", [{"n": "pressure", "u": "Pa", "v": 1}], TOPIC, RejectReason.WRONG_UNIT),
    ("base-unit", [{"bu": "psi", "n": "pressure", "v": 1}], TOPIC, RejectReason.WRONG_UNIT),
    ("ts-type", {"ts": True, "values": {"pressure": 1}}, TOPIC, RejectReason.BAD_TIMESTAMP),
    ("ts-str", {"ts": "yesterday", "values": {"pressure": 1}}, TOPIC, RejectReason.BAD_TIMESTAMP),
    ("ts-naive", {"ts": "2023-11-14T22:13:19", "values": {"pressure": 1}}, TOPIC,
     RejectReason.BAD_TIMESTAMP),
    ("ts-negative", {"ts": -5, "values": {"pressure": 1}}, TOPIC, RejectReason.BAD_TIMESTAMP),
    ("future", {"ts": NOW_MS + 301_000, "values": {"pressure": 1}}, TOPIC,
     RejectReason.TS_IN_FUTURE),
    ("old", {"ts": NOW_MS - 8 * 86_400_000, "values": {"pressure": 1}}, TOPIC,
     RejectReason.TS_TOO_OLD),
    ("senml-old", [{"bt": 1.6e9, "n": "pressure", "v": 1}], TOPIC, RejectReason.TS_TOO_OLD),
]  # fmt: skip


@pytest.mark.parametrize(
    ("payload", "topic", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_each_reason_code(
    validator: Validator, payload: object, topic: str, reason: RejectReason
) -> None:
    """Each kind of bad message is refused with its stable reason code and a detail."""
    rejection = refuse(validator, payload, topic)
    assert rejection.reason == reason, rejection.detail
    assert rejection.detail
    assert rejection.topic == topic


def test_one_bad_record_refuses_the_whole_message(validator: Validator) -> None:
    """Whole-message refusal: the good reading of a message with a bad one is not kept."""
    rejection = refuse(
        validator,
        [
            {"ts": NOW_MS, "values": {"pressure": 1}},
            {"ts": NOW_MS, "values": {"humidity": 1}},
        ],
    )
    assert rejection.reason == RejectReason.UNKNOWN_METRIC
    assert "reading 1" in rejection.detail
    assert (rejection.vendor, rejection.sensor) == ("aquasense", "wtr-0001")


def test_every_defined_reason_but_rate_limiting_is_reachable() -> None:
    """The table above covers every reason code the collector can give."""
    covered = {c[3] for c in CASES}
    assert set(RejectReason) - covered == {RejectReason.RATE_LIMITED}


def test_parse_payload_is_usable_without_a_registry() -> None:
    """The parser alone gives metric, time, value and stated unit."""
    raws = parse_payload(orjson.dumps([{"n": "x:temp", "u": "Cel", "v": 1}]), NOW_MS)
    assert [(r.metric, r.ts_ms, r.value, r.unit) for r in raws] == [("temp", NOW_MS, 1.0, "Cel")]


@pytest.mark.parametrize(
    "value",
    [0.0, -0.0, 21.5, 1e16, 1e22, 1.5e-7, 5e-324, 1.7976931348623157e308, 0.1, 1 / 3, 7],
)
def test_fast_encoding_is_byte_identical_for_awkward_floats(
    validator: Validator, value: float
) -> None:
    """Float formatting of the orjson fast path matches pydantic's (the writer hashes nothing,
    but dead-letter replays and the rules' decoders must see one wire format)."""
    accept(validator, {"ts": NOW_MS, "values": {"pressure": value}})
