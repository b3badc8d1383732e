"""The ticker's event-time watermark (issue 3, bug A): time passes at wall speed only while a
partition is idle, and never goes back."""

from __future__ import annotations

from rules.runtime.worker import watermark_ms

HOUR = 3_600_000
WALL = 1_800_000_000_000  # some wall-clock instant, epoch ms


def test_backfill_ticks_at_the_streams_event_time_not_the_wall_clock() -> None:
    """Records an hour old arriving now: the tick is at their event time, not an hour later."""
    event = WALL - HOUR
    assert watermark_ms(event, WALL, WALL) == event
    assert watermark_ms(event, WALL - 200, WALL) == event + 200  # 200 ms since the last record


def test_idle_partition_advances_at_wall_speed() -> None:
    """With no record for 3 minutes, event time has moved on by 3 minutes."""
    event = WALL - HOUR
    assert watermark_ms(event, WALL, WALL + 180_000) == event + 180_000


def test_watermark_never_goes_back() -> None:
    """After an idle spell, older records arriving do not move the tick back in time."""
    event = WALL - HOUR
    idle = watermark_ms(event, WALL, WALL + 60_000)
    assert idle == event + 60_000
    # A record 1 s later in event time arrives 60 s later in wall time.
    assert watermark_ms(event + 1_000, WALL + 60_000, WALL + 60_000, idle) == idle
    assert watermark_ms(event + 1_000, WALL + 60_000, WALL + 61_000, idle) == idle
    assert watermark_ms(event + 1_000, WALL + 60_000, WALL + 120_000, idle) == event + 61_000


def test_no_event_time_yet_keeps_the_previous_tick() -> None:
    """A partition that saw nothing has no watermark of its own."""
    assert watermark_ms(None, 0, WALL) is None
    assert watermark_ms(None, 0, WALL, 5) == 5


def test_wall_clock_behind_the_record_does_not_subtract() -> None:
    """A wall clock that steps back (NTP) never makes event time run backwards."""
    assert watermark_ms(WALL, WALL, WALL - 5_000) == WALL
