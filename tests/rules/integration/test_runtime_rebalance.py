"""Rule state follows its partition when a second worker joins the group (a rebalance)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from citypulse.settings import Settings

from .helpers import alert_rows, batch, eventually, produce, running_worker

pytestmark = pytest.mark.integration

WATER = ("wtr-0001", "wtr-0002", "wtr-0003")  # keys on both of the 2 partitions


def _changes(rows: list[dict[str, Any]], state: str) -> list[str]:
    return sorted(
        str(r["labels"]["sensor"])
        for r in rows
        if r["rule"] == "WaterLowPressure" and r["state"] == state
    )


async def test_joining_worker_takes_partitions_with_their_state(rt_settings: Settings) -> None:
    """Alerts firing before the rebalance are neither raised again nor forgotten after it:
    still-low readings raise nothing new, and recovery resolves each alert exactly once."""
    t0 = time.time_ns() // 1_000_000 - 60_000
    async with running_worker(rt_settings) as first:
        await produce(rt_settings, *(batch(s, t0, pressure=1.8) for s in WATER))
        await eventually(
            lambda: alert_rows(rt_settings), lambda r: _changes(r, "firing") == list(WATER)
        )
        async with running_worker(rt_settings) as second:
            # Each worker now owns one partition of each stage, restored from the changelog.
            owned = [sorted(s.parts) for w in (first, second) for s in w.stages]
            assert owned in (
                [[0], [0], [1], [1]],
                [[1], [1], [0], [0]],
                [[0], [1], [1], [0]],
                [[1], [0], [0], [1]],
            )
            await produce(rt_settings, *(batch(s, t0 + 1000, pressure=1.7) for s in WATER))
            await produce(rt_settings, *(batch(s, t0 + 2000, pressure=3.0) for s in WATER))
            rows = await eventually(
                lambda: alert_rows(rt_settings), lambda r: _changes(r, "resolved") == list(WATER)
            )
    assert _changes(rows, "firing") == list(WATER)
    assert _changes(await alert_rows(rt_settings), "resolved") == list(WATER)
