"""Unit tests (no I/O): migration files and flavour sections, record decoding."""

from __future__ import annotations

import base64

import asyncpg
import orjson
import pytest

from citypulse.events import Reading, ReadingBatch, Rejection, RejectReason
from storage import DecodeError, Flavour, MigrationError, decode_readings, decode_rejection
from storage.migrate import load_migrations, select_flavour
from storage.writer import _is_transient

TEXT = """\
CREATE TABLE a (x int);
-- @if timescaledb
SELECT create_hypertable('a', 'x');
-- @else
CREATE INDEX a_x ON a (x);
-- @end
SELECT 1;
"""


def test_flavour_sections_pick_one_branch_and_keep_line_numbers() -> None:
    """Each flavour gets its own branch; line numbers stay aligned for error messages."""
    plain = select_flavour(TEXT, Flavour.PLAIN)
    ts = select_flavour(TEXT, Flavour.TIMESCALEDB)
    assert "CREATE INDEX" in plain
    assert "create_hypertable" not in plain
    assert "create_hypertable" in ts
    assert "CREATE INDEX" not in ts
    assert plain.splitlines()[4] == "CREATE INDEX a_x ON a (x);"
    assert ts.splitlines()[2] == "SELECT create_hypertable('a', 'x');"
    assert len(plain.splitlines()) == len(TEXT.splitlines())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("-- @else\n", "outside"),
        ("-- @if timescaledb\nSELECT 1;\n", "without"),
        ("-- @if oracle\n-- @end\n", "unknown flavour"),
        ("-- @if plain\n-- @if plain\n-- @end\n-- @end\n", "nested"),
    ],
)
def test_malformed_sections_are_refused(text: str, message: str) -> None:
    """A broken directive fails loudly instead of running the wrong SQL."""
    with pytest.raises(MigrationError, match=message):
        select_flavour(text, Flavour.PLAIN, "f.sql")


def test_shipped_migrations_load_in_order_with_both_flavours() -> None:
    """Every shipped file is well named, unique, ordered, and resolves for both flavours."""
    migs = load_migrations()
    versions = [m.version for m in migs]
    assert versions == sorted(versions)
    assert versions[:3] == [1, 2, 3]
    tiers = next(m for m in migs if m.name == "tiers")
    assert "timescaledb.continuous" in tiers.sql(Flavour.TIMESCALEDB)
    assert "add_retention_policy" in tiers.sql(Flavour.TIMESCALEDB)
    assert "create_hypertable" not in tiers.sql(Flavour.PLAIN)
    assert "CREATE TABLE IF NOT EXISTS readings_1m" in tiers.sql(Flavour.PLAIN)


def test_decode_reading_batch_round_trips_the_wire_format() -> None:
    """A ReadingBatch as the collector encodes it becomes (ts_ms, sensor, metric, value, ...)."""
    batch = ReadingBatch(
        sensor="s1",
        vendor="v",
        received_ms=1000,
        source="h",
        readings=[
            Reading(ts_ms=5, metric="p", value=1.5, unit="bar"),
            Reading(ts_ms=6, metric="q", value=2, unit="bar", quality=1),
        ],
    )
    assert decode_readings(batch.encode()) == [
        (5, "s1", "p", 1.5, 0, 1000),
        (6, "s1", "q", 2.0, 1, 1000),
    ]


@pytest.mark.parametrize(
    "raw",
    [
        None,
        b"not json",
        b"[]",
        orjson.dumps({"v": 2, "sensor": "s", "received_ms": 1, "readings": []}),
        orjson.dumps(
            {
                "v": 1,
                "sensor": "s",
                "received_ms": 1,
                "readings": [{"ts_ms": 1, "metric": "m", "value": "7"}],
            }
        ),
        orjson.dumps(
            {
                "v": 1,
                "sensor": "s",
                "received_ms": 1,
                "readings": [{"ts_ms": -1, "metric": "m", "value": 7}],
            }
        ),
        orjson.dumps({"v": 1, "sensor": "s\x00", "received_ms": 1, "readings": []}),
        orjson.dumps(
            {
                "v": 1,
                "sensor": "s",
                "received_ms": 1,
                "readings": [{"ts_ms": 1, "metric": "m", "value": 7, "quality": 70000}],
            }
        ),
    ],
)
def test_unstorable_records_raise_decode_error(raw: bytes | None) -> None:
    """Anything that would make the database refuse a whole batch is caught at decode time."""
    with pytest.raises(DecodeError):
        decode_readings(raw)


def test_decode_rejection() -> None:
    """A dead-letter record becomes a rejections row (without the raw payload)."""
    rej = Rejection(
        reason=RejectReason.UNKNOWN_SENSOR,
        detail="no such sensor",
        topic="t/x",
        vendor="v",
        sensor=None,
        received_ms=42,
        message_hash="abcd",
        raw_b64=base64.b64encode(b"{}").decode(),
    )
    assert decode_rejection(rej.encode()) == (
        42,
        "v",
        None,
        "unknown_sensor",
        "no such sensor",
        "t/x",
        "abcd",
    )
    with pytest.raises(DecodeError):
        decode_rejection(b'{"v": 1}')


def test_a_connection_left_mid_operation_is_retried_not_fatal() -> None:
    """A pooled connection that a database outage left mid-operation raises asyncpg's
    ``InternalClientError``; the writer must retry (the pool replaces the connection) rather
    than exit, like any other outage error. Programming errors still stop it."""
    busy = asyncpg.InternalClientError(
        "cannot switch to state 15; another operation (2) is in progress"
    )
    assert _is_transient(busy)
    assert _is_transient(ConnectionResetError())
    assert not _is_transient(KeyError("x"))
