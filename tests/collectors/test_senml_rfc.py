"""RFC 8428 section 5 examples resolve to the records the RFC lists (section 4.6 rules)."""

from __future__ import annotations

import pytest

from collectors.payload import PayloadError, SenMLRecord, resolve_senml

NOW = 1_700_000_000.0
DEV = "urn:dev:ow:10e2073a01080063"


def _rows(records: list[SenMLRecord]) -> list[tuple[str, float, str | None, object]]:
    return [(r.name, pytest.approx(r.time, abs=1e-6), r.unit, r.value) for r in records]


def test_single_datapoint() -> None:
    """5.1.1: a reading without a time is taken "now"."""
    pack = [{"n": DEV, "u": "Cel", "v": 23.1}]
    assert _rows(resolve_senml(pack, NOW)) == [(DEV, NOW, "Cel", 23.1)]


def test_multiple_datapoints_now() -> None:
    """5.1.2: base name concatenated, each record keeps its own unit."""
    pack = [
        {"bn": f"{DEV}:", "n": "voltage", "u": "V", "v": 120.1},
        {"n": "current", "u": "A", "v": 1.2},
    ]
    assert _rows(resolve_senml(pack, NOW)) == [
        (f"{DEV}:voltage", NOW, "V", 120.1),
        (f"{DEV}:current", NOW, "A", 1.2),
    ]


def test_multiple_datapoints_base_time_and_unit() -> None:
    """5.1.2: bt + t, negative t before bt, bu unless u, bver 5 understood; chronological."""
    pack = [
        {"bn": f"{DEV}:", "bt": 1.276020076001e09, "bu": "A", "bver": 5, "n": "voltage",
         "u": "V", "v": 120.1},
        {"n": "current", "t": -5, "v": 1.2},
        {"n": "current", "t": -4, "v": 1.3},
        {"n": "current", "t": -3, "v": 1.4},
        {"n": "current", "t": -2, "v": 1.5},
        {"n": "current", "t": -1, "v": 1.6},
        {"n": "current", "v": 1.7},
    ]  # fmt: skip
    bt = 1276020076.001
    assert _rows(resolve_senml(pack, NOW)) == [
        (f"{DEV}:current", bt - 5, "A", 1.2),
        (f"{DEV}:current", bt - 4, "A", 1.3),
        (f"{DEV}:current", bt - 3, "A", 1.4),
        (f"{DEV}:current", bt - 2, "A", 1.5),
        (f"{DEV}:current", bt - 1, "A", 1.6),
        (f"{DEV}:voltage", bt, "V", 120.1),
        (f"{DEV}:current", bt, "A", 1.7),
    ]


MULTIPLE_MEASUREMENTS = [
    {"bn": DEV, "bt": 1.320067464e09, "bu": "%RH", "v": 20},
    {"u": "lon", "v": 24.30621},
    {"u": "lat", "v": 60.07965},
    {"t": 60, "v": 20.3},
    {"u": "lon", "t": 60, "v": 24.30622},
    {"u": "lat", "t": 60, "v": 60.07965},
    {"t": 120, "v": 20.7},
    {"u": "lon", "t": 120, "v": 24.30623},
    {"u": "lat", "t": 120, "v": 60.07966},
    {"u": "%EL", "t": 150, "v": 98},
    {"t": 180, "v": 21.2},
    {"u": "lon", "t": 180, "v": 24.30628},
    {"u": "lat", "t": 180, "v": 60.07967},
]

# RFC 8428 section 5.1.4 "Resolved Data": the example above in resolved form.
RESOLVED = [
    {"n": DEV, "u": "%RH", "t": 1.320067464e09, "v": 20},
    {"n": DEV, "u": "lon", "t": 1.320067464e09, "v": 24.30621},
    {"n": DEV, "u": "lat", "t": 1.320067464e09, "v": 60.07965},
    {"n": DEV, "u": "%RH", "t": 1.320067524e09, "v": 20.3},
    {"n": DEV, "u": "lon", "t": 1.320067524e09, "v": 24.30622},
    {"n": DEV, "u": "lat", "t": 1.320067524e09, "v": 60.07965},
    {"n": DEV, "u": "%RH", "t": 1.320067584e09, "v": 20.7},
    {"n": DEV, "u": "lon", "t": 1.320067584e09, "v": 24.30623},
    {"n": DEV, "u": "lat", "t": 1.320067584e09, "v": 60.07966},
    {"n": DEV, "u": "%EL", "t": 1.320067614e09, "v": 98},
    {"n": DEV, "u": "%RH", "t": 1.320067644e09, "v": 21.2},
    {"n": DEV, "u": "lon", "t": 1.320067644e09, "v": 24.30628},
    {"n": DEV, "u": "lat", "t": 1.320067644e09, "v": 60.07967},
]


def test_multiple_measurements_resolve_to_the_resolved_data_example() -> None:
    """5.1.3 resolves to exactly the records of 5.1.4, which are already resolved."""
    expected = [(r["n"], pytest.approx(r["t"]), r["u"], r["v"]) for r in RESOLVED]
    assert _rows(resolve_senml(MULTIPLE_MEASUREMENTS, NOW)) == expected
    assert _rows(resolve_senml(RESOLVED, NOW)) == expected


def test_multiple_data_types() -> None:
    """5.1.5: v, vs, vb and vd keep their types (vd is base64url, decoded by the reader)."""
    pack = [
        {"bn": f"{DEV}:", "n": "temp", "u": "Cel", "v": 23.1},
        {"n": "label", "vs": "Machine Room"},
        {"n": "open", "vb": False},
        {"n": "nfc-reader", "vd": "aGkgCg"},
    ]
    assert _rows(resolve_senml(pack, NOW)) == [
        (f"{DEV}:temp", NOW, "Cel", 23.1),
        (f"{DEV}:label", NOW, None, "Machine Room"),
        (f"{DEV}:open", NOW, None, False),
        (f"{DEV}:nfc-reader", NOW, None, b"aGkgCg"),
    ]


def test_collection_of_resources() -> None:
    """5.1.6: the last record uses the third record's bn and the first record's bt."""
    pack = [
        {"bn": "2001:db8::2/", "bt": 1.320078429e09, "n": "temperature", "u": "Cel", "v": 27.2},
        {"n": "humidity", "u": "%RH", "v": 80},
        {"bn": "2001:db8::1/", "n": "temperature", "u": "Cel", "v": 12.3},
        {"n": "humidity", "u": "%RH", "v": 67},
    ]
    t = 1320078429.0
    assert _rows(resolve_senml(pack, NOW)) == [
        ("2001:db8::2/temperature", t, "Cel", 27.2),
        ("2001:db8::2/humidity", t, "%RH", 80),
        ("2001:db8::1/temperature", t, "Cel", 12.3),
        ("2001:db8::1/humidity", t, "%RH", 67),
    ]


def test_setting_an_actuator() -> None:
    """5.1.7: a first record with only a base name yields no record of its own."""
    pack = [
        {"bn": f"{DEV}:"},
        {"n": "temp", "u": "Cel", "v": 23.1},
        {"n": "heat", "u": "/", "v": 1},
        {"n": "fan", "u": "/", "v": 0},
    ]
    assert _rows(resolve_senml(pack, NOW)) == [
        (f"{DEV}:temp", NOW, "Cel", 23.1),
        (f"{DEV}:heat", NOW, "/", 1),
        (f"{DEV}:fan", NOW, "/", 0),
    ]


def test_base_value_and_base_sum_are_added() -> None:
    """Section 4.6: bv is added to v and bs to s, for every following record."""
    pack = [
        {"bn": "m:", "bv": 100, "bs": 1000, "n": "a", "v": 1, "s": 5},
        {"n": "b", "v": -2},
        {"n": "c", "s": 7},
    ]
    got = resolve_senml(pack, NOW)
    assert [(r.name, r.value, r.sum) for r in got] == [
        ("m:a", 101, 1005),
        ("m:b", 98, 1000),
        ("m:c", None, 1007),
    ]


def test_times_below_2_pow_28_are_relative_to_now() -> None:
    """Section 4.5.3: a positive time under 2**28 s is also relative to now."""
    pack = [{"n": "x", "t": 10, "v": 1}, {"n": "x", "t": 2**28, "v": 2}]
    assert [r.time for r in resolve_senml(pack, NOW)] == [2**28, NOW + 10]


@pytest.mark.parametrize(
    ("pack", "fragment"),
    [
        ([{"n": "x", "v": 1, "foo_": 1}], "must-understand"),
        ([{"bver": 11, "n": "x", "v": 1}], "version 11"),
        ([{"n": "x", "v": 1, "vb": True}], "more than one value"),
        ([{"n": "bad name", "v": 1}], "invalid SenML name"),
        ([{"n": "_x", "v": 1}], "invalid SenML name"),
        ([{"v": 1}], "no name"),
        ([{"n": "x", "v": "1"}], "'v' must be a number"),
        ([{"n": "x", "vb": 1}], "'vb' must be a boolean"),
        ([{"bn": 3, "n": "x", "v": 1}], "'bn' must be a string"),
        ([], "non-empty"),
        ([1, 2], "expected an object"),
    ],
)
def test_packs_rfc_8428_forbids_are_refused(pack: object, fragment: str) -> None:
    """Must-understand labels, newer versions, double values, bad names and types: refused."""
    with pytest.raises(PayloadError) as info:
        resolve_senml(pack, NOW)
    assert info.value.reason == "bad_senml"
    assert fragment in info.value.detail


def test_unknown_labels_are_ignored() -> None:
    """Section 4.4: labels we do not know (and not ending in _) are ignored."""
    assert _rows(resolve_senml([{"n": "x", "v": 1, "l": "link", "xyz": 1}], NOW)) == [
        ("x", NOW, None, 1)
    ]
