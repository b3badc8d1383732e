"""A partition's state larger than Kafka's 1 MB default still checkpoints and restores."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from citypulse.settings import Settings
from rules.runtime.changelog import (
    STATE_MAX_BYTES,
    STATE_TOPIC,
    Snapshot,
    ensure_runtime_topics,
    read_snapshots,
)
from stream import make_producer

pytestmark = pytest.mark.integration


async def test_a_snapshot_of_several_megabytes_round_trips(
    settings_factory: Callable[..., Settings],
) -> None:
    """A 3 MB (incompressible) engine state is written and read back whole (a 10,000-sensor
    city's partition state once stopped a worker with MessageSizeTooLargeError)."""
    settings = settings_factory()
    await ensure_runtime_topics(settings)
    state = os.urandom(3 * 1024 * 1024)
    snap = Snapshot(stage="sensor", partition=1, offset=1234, engine=state, clock_ms=42)
    assert len(snap.encode()) > 1024 * 1024
    producer = make_producer(settings, max_request_size=STATE_MAX_BYTES)
    await producer.start()
    try:
        await producer.send_and_wait(
            settings.topic(STATE_TOPIC), snap.encode(), key=snap.key.encode()
        )
    finally:
        await producer.stop()
    got = await read_snapshots(settings, [snap.key])
    assert got[snap.key].engine == state
    assert (got[snap.key].offset, got[snap.key].clock_ms) == (1234, 42)
