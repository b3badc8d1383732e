"""The ticker on a backfilling stream (issue 3, bug A): staleness runs on the stream's event
time, so sensors replaying history at their interval are not "silent", and sensors that stop
are reported after 3 intervals of idle wall time, stamped in event time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from citypulse.settings import Settings
from rules.runtime import WorkerOptions
from stream import ensure_topics, make_producer

from .helpers import alert_rows, batch, eventually, running_worker

pytestmark = pytest.mark.integration

REGISTRY = """version: 1
city: testville
sensors:
"""
SENSOR = """  - id: {id}
    vendor: aquasense
    silo: water
    district: north
    asset: main {id}
    location: {{lat: 52.5, lon: 13.4}}
    interval: 1s
    metrics:
      pressure: {{unit: bar, min: 0, max: 16}}
"""
SENSORS = ("wtr-0101", "wtr-0102", "wtr-0103")
RULES = """groups:
  - name: liveness
    rules:
      - name: SensorSilent
        expr: stale(3)
        severity: warning
"""


@pytest.fixture
async def fast_settings(settings_factory: Callable[..., Settings], tmp_path: Path) -> Settings:
    """Three water sensors reporting every second, and one stale(3) rule over them."""
    from storage.migrate import migrate

    (tmp_path / "registry.yaml").write_text(
        REGISTRY + "".join(SENSOR.format(id=s) for s in SENSORS)
    )
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "live.yaml").write_text(RULES)
    s = settings_factory(
        registry=tmp_path / "registry.yaml", rules=tmp_path / "rules", partitions=2
    )
    await migrate(s.dsn)
    return s


async def test_backfill_is_not_stale_and_silence_is(fast_settings: Settings) -> None:
    """Readings an hour old, one per second of event time (4 x real speed), with the ticker
    running: no staleness alert. Then the stream stops: each sensor is reported silent once,
    after ~3 s of idle wall time, at an event time just past its last reading + 3 s."""
    await ensure_topics(fast_settings)
    start = time.time_ns() // 1_000_000 - 3_600_000
    steps = 16
    options = WorkerOptions(tick_s=0.1, checkpoint_s=0.5, reload_poll_s=0.2)
    async with running_worker(fast_settings, options):
        producer = make_producer(fast_settings)
        await producer.start()
        try:
            for i in range(steps):
                for sensor in SENSORS:
                    b = batch(sensor, start + i * 1000, pressure=3.0)
                    await producer.send_and_wait(
                        fast_settings.topic("readings"), b.encode(), key=sensor.encode()
                    )
                await asyncio.sleep(0.25)
        finally:
            await producer.stop()
        assert await alert_rows(fast_settings) == []  # ~40 ticks ran meanwhile
        silent_at = time.monotonic()
        rows = await eventually(
            lambda: alert_rows(fast_settings), lambda r: len(r) >= len(SENSORS), timeout_s=15
        )
        waited_s = time.monotonic() - silent_at
        await asyncio.sleep(1.0)  # time for a wrong extra event (a resolve, a duplicate)
        rows = await alert_rows(fast_settings)
    assert sorted((r["labels"]["sensor"], r["state"]) for r in rows) == [
        (s, "firing") for s in SENSORS
    ]
    assert waited_s >= 2.0  # about 3 intervals of idle wall time, not at once
    last = start + (steps - 1) * 1000
    for r in rows:
        ts_ms = int(r["ts"].timestamp() * 1000)
        # Event time: just after last + 3 s (+ tick granularity), not the wall clock.
        assert last + 3000 < ts_ms < last + 3000 + 2500, (ts_ms - last, r)
