"""Hostile payloads: the collector's parser and validator never crash.

Property: for any bytes on any topic, ``Validator.validate`` returns either a
:class:`ReadingBatch` (whose readings are all finite, registered, within the time window) or a
:class:`Rejection` with a :class:`RejectReason`. Thousands of cases per test: JSON and SenML
shapes, nesting, huge and deep documents, non-UTF-8, NaN/Infinity, duplicate keys, giant
numbers, far-future and far-past times.
"""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from citypulse.events import ReadingBatch, Rejection, RejectReason
from collectors import Limits, Validator
from tests.collectors.registry import registry

NOW_MS = 1_767_225_600_000
VALIDATOR = Validator(registry(), Limits(max_message_bytes=64 * 1024, max_readings=12))
TOPICS = [
    "citypulse/v1/aquasense/wtr-0001/up",
    "citypulse/v1/lumen/lgt-0001/up",
    "citypulse/v1/lumen/wtr-0001/up",
    "citypulse/v1/aquasense/nope/up",
    "citypulse/v1/aquasense/wtr-0001/down",
    "citypulse/v2/x",
    "",
]
FUZZ = settings(
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

numbers = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0, -1, 2**28, 2**53, 2**63, 10**20, NOW_MS, NOW_MS // 1000]),
)
names = st.one_of(
    st.sampled_from(["pressure", "flow", "dim_level", "lamp_on", "energy", "bogus", ""]),
    st.text(max_size=30),
)
timestamps = st.one_of(
    numbers,
    st.sampled_from(
        [
            "2026-01-01T00:00:00Z",
            "2026-01-01T00:00:00+02:00",
            "9999-12-31T23:59:59Z",
            "0001-01-01T00:00:00Z",
            "2026-01-01T00:00:00",
            "2026-13-45T99:99:99Z",
            "",
        ]
    ),
    st.text(max_size=40),
)
json_values: st.SearchStrategy[Any] = st.recursive(
    st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(names, inner, max_size=4)),
    max_leaves=12,
)
citypulse_record = st.fixed_dictionaries(
    {"ts": timestamps, "values": st.dictionaries(names, st.one_of(numbers, json_values))},
    optional={"extra": json_values},
)
senml_record = st.fixed_dictionaries(
    {},
    optional={
        "bn": st.one_of(st.sampled_from(["urn:dev:x:", "wtr-0001/"]), st.text(max_size=20)),
        "bt": numbers,
        "bu": st.sampled_from(["bar", "psi", "%", "Wh", ""]),
        "bv": numbers,
        "bs": numbers,
        "bver": st.integers(min_value=-5, max_value=20),
        "n": names,
        "t": numbers,
        "u": st.sampled_from(["bar", "m3/h", "%", "/", "Wh", "x"]),
        "v": st.one_of(numbers, json_values),
        "vb": st.one_of(st.booleans(), json_values),
        "vs": st.text(max_size=10),
        "vd": st.text(max_size=10),
        "s": numbers,
        "ut": numbers,
        "foo_": json_values,
    },
)
documents = st.one_of(
    citypulse_record,
    st.lists(citypulse_record, max_size=16),
    st.lists(senml_record, max_size=16),
    json_values,
)


def check(verdict: ReadingBatch | Rejection) -> None:
    if isinstance(verdict, Rejection):
        assert isinstance(verdict.reason, RejectReason)
        assert verdict.detail
        verdict.encode()  # the dead-letter record always serialises
        return
    assert isinstance(verdict, ReadingBatch)
    # A SenML pack of base records only (e.g. ``[{}]``) is accepted with no readings (the
    # contract: such a record yields none).
    assert len(verdict.readings) <= VALIDATOR.limits.max_readings
    for r in verdict.readings:
        assert math.isfinite(r.value)
        assert NOW_MS - VALIDATOR.limits.past_tolerance_ms <= r.ts_ms
        assert r.ts_ms <= NOW_MS + VALIDATOR.limits.future_tolerance_ms
    ReadingBatch.decode(verdict.encode())  # what goes to Kafka reads back


@FUZZ
@given(topic=st.sampled_from(TOPICS), doc=documents)
def test_structured_documents_are_accepted_or_refused_with_a_reason(topic: str, doc: Any) -> None:
    check(VALIDATOR.validate(topic, json.dumps(doc).encode(), NOW_MS))


@FUZZ
@given(raw=st.binary(max_size=2048))
def test_arbitrary_bytes_are_refused_with_a_reason(raw: bytes) -> None:
    check(VALIDATOR.validate(TOPICS[0], raw, NOW_MS))


def _mangle(text: str, how: int) -> bytes:
    if how == 0:  # NaN / Infinity literals (not JSON, but some encoders emit them)
        return text.replace("1", "NaN", 1).replace("2", "Infinity", 1).encode()
    if how == 1:  # a giant number
        return text.replace("1", "1" + "9" * 400, 1).encode()
    if how == 2:  # duplicate keys
        return text.replace("{", '{"values": {}, "ts": 1, ', 1).encode()
    if how == 3:  # invalid UTF-8
        return text.encode()[:10] + b"\xff\xfe\xc3(" + text.encode()[10:]
    if how == 4:  # deep nesting
        return ("[" * 5000 + "]" * 5000).encode()
    if how == 5:  # huge
        return b'{"ts": 1, "values": {"pressure": ' + b" " * 70_000 + b"1}}"
    return text.encode()[: len(text) // 2]  # truncated


@FUZZ
@given(doc=documents, how=st.integers(min_value=0, max_value=6))
def test_mangled_json_is_refused_or_accepted_never_crashes(doc: Any, how: int) -> None:
    raw = _mangle(json.dumps(doc), how)
    check(VALIDATOR.validate(TOPICS[0], raw, NOW_MS))


def test_specific_hostile_inputs_get_the_documented_reason() -> None:
    topic = TOPICS[0]
    cases = {
        b'{"ts": 1767225600000, "values": {"pressure": NaN}}': RejectReason.MALFORMED_JSON,
        b'{"ts": 1767225600000, "values": {"pressure": 1e400}}': RejectReason.MALFORMED_JSON,
        b"\xff\xfe": RejectReason.MALFORMED_JSON,
        b"[" * 100_000: RejectReason.TOO_LARGE,
        b'{"ts": 99999999999999999, "values": {"pressure": 1}}': RejectReason.BAD_TIMESTAMP,
        b'{"ts": 4102444800000, "values": {"pressure": 1}}': RejectReason.TS_IN_FUTURE,
        b"[" * 5000 + b"]" * 5000: RejectReason.MALFORMED_JSON,
        b'{"ts": 1767225600000, "values": {"pressure": 1, "pressure": 2}}': None,
    }
    for raw, reason in cases.items():
        verdict = VALIDATOR.validate(topic, raw, NOW_MS)
        check(verdict)
        if reason is not None:
            assert isinstance(verdict, Rejection), raw[:60]
            assert verdict.reason in {reason, RejectReason.NON_FINITE}, (raw[:60], verdict)
