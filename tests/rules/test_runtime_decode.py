"""The rule worker's fast record decoding accepts and refuses exactly what pydantic does."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from citypulse.events import Reading, ReadingBatch
from rules.runtime.worker import (
    FastBatch,
    FastReading,
    _chunks,
    decode_batch,
    read_rekey,
    rekey_value,
)


def _batch() -> ReadingBatch:
    return ReadingBatch(
        sensor="wtr-north-001",
        vendor="aquasense",
        received_ms=1_780_000_000_123,
        source="abc",
        readings=[
            Reading(ts_ms=1_780_000_000_000, metric="pressure", value=3.5, unit="bar"),
            Reading(ts_ms=1_780_000_000_500, metric="flow", value=12, unit="l/s", quality=2),
        ],
    )


def _as_fast(b: ReadingBatch) -> FastBatch:
    return FastBatch(b.sensor, tuple(FastReading(r.ts_ms, r.metric, r.value) for r in b.readings))


def test_a_collector_batch_decodes_to_the_same_readings() -> None:
    """What the collectors write decodes to the sensor, times, metrics and values pydantic
    gives (ints as floats)."""
    b = _batch()
    fast = decode_batch(orjson.loads(b.encode()))
    assert fast == _as_fast(b)
    assert all(type(r.value) is float for r in fast.readings)


def _variants() -> list[Any]:
    good = orjson.loads(_batch().encode())
    out: list[Any] = []
    mutations: tuple[Callable[[dict[str, Any]], object], ...] = (
        lambda d: d.pop("source"),
        lambda d: d.update(extra=1),
        lambda d: d.update(v=2),
        lambda d: d.update(v=True),
        lambda d: d.update(sensor=7),
        lambda d: d.update(readings={}),
        lambda d: d.update(received_ms="1780000000123"),
        lambda d: d["readings"][0].update(ts_ms=1.78e12),
        lambda d: d["readings"][0].update(ts_ms="1780000000000"),
        lambda d: d["readings"][0].update(value="3.5"),
        lambda d: d["readings"][0].update(value=True),
        lambda d: d["readings"][0].update(value=None),
        lambda d: d["readings"][1].pop("unit"),
        lambda d: d["readings"][1].update(colour="red"),
        lambda d: d["readings"][1].update(quality=None),
        lambda d: d["readings"].append([1, 2]),
        lambda d: d["readings"].clear(),
    )
    for mutate in mutations:
        d = orjson.loads(orjson.dumps(good))
        mutate(d)
        out.append(d)
    return [*out, [], "x", {}]


@pytest.mark.parametrize("obj", _variants())
def test_odd_records_are_judged_by_pydantic(obj: Any) -> None:
    """Records that are not exactly the collectors' shape are accepted (converted the same
    way) or refused with a ValidationError, exactly as ReadingBatch.model_validate does."""
    try:
        want: FastBatch | None = _as_fast(ReadingBatch.model_validate(obj))
    except ValidationError:
        want = None
    if want is None:
        with pytest.raises(ValidationError):
            decode_batch(obj)
    else:
        assert decode_batch(obj) == want


def test_rekey_record_carries_a_polls_batches_for_one_key() -> None:
    """One re-key record holds the batches of one poll for one group key, each with its input
    offset, embedded as consumed; the group stage reads them back in order."""
    a, b = _batch(), _batch().model_copy(update={"sensor": "wtr-north-002"})
    value = rekey_value("district=north", 3, [(41, a.encode()), (44, b.encode())])
    key, origin, items = read_rekey(value)
    assert (key, origin) == ("district=north", 3)
    assert [o for o, _ in items] == [41, 44]
    assert [ReadingBatch.model_validate(obj) for _, obj in items] == [a, b]


def test_rekey_records_of_the_previous_version_are_still_read() -> None:
    """Records written before batching (one batch each, ``"v": 1``) left on the topic by an
    older worker are applied after an upgrade."""
    b = _batch()
    v1 = b'{"v":1,"key":"district=north","origin":[3,41],"batch":' + b.encode() + b"}"
    key, origin, items = read_rekey(v1)
    assert (key, origin, [o for o, _ in items]) == ("district=north", 3, [41])
    assert ReadingBatch.model_validate(items[0][1]) == b


@pytest.mark.parametrize(
    "value",
    [b"[1, 2]", b'"text"', b"{}", b'{"v": 2, "key": "k", "origin": 0}', b'{"v": 1, "key": 1}'],
)
def test_a_foreign_rekey_record_is_refused_with_a_decoding_error(value: bytes) -> None:
    """What the group stage skips as undecodable (and logs), instead of stopping the worker."""
    with pytest.raises((orjson.JSONDecodeError, KeyError, TypeError, ValueError)):
        read_rekey(value)


def test_rekey_batches_are_split_by_size_in_order() -> None:
    """A poll's batches for one key are split into records under the size limit, in offset
    order; a single batch over the limit still goes, alone."""
    items = [(i, b"x" * n) for i, n in enumerate([100, 100, 300, 50, 50, 50])]
    chunks = _chunks(items, 250)
    assert [[o for o, _ in c] for c in chunks] == [[0, 1], [2], [3, 4, 5]]
