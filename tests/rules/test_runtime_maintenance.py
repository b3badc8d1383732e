"""Maintenance windows: file validation with located errors and event-time evaluation."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from citypulse.registry import Registry, load_registry
from rules.runtime import MaintenanceFileError, parse_maintenance

REGISTRY = Path(__file__).parent / "integration" / "data" / "registry.yaml"
BERLIN = ZoneInfo("Europe/Berlin")

WINDOWS = """
windows:
  - name: north-pumps-tuesday
    every: [tue]
    start: "02:00"
    duration: 2h
    timezone: Europe/Berlin
    match: {district: north, silo: water, asset: pump}
"""


@pytest.fixture(scope="module")
def registry() -> Registry:
    return load_registry(REGISTRY)


def ms(year: int, month: int, day: int, hour: int, minute: int) -> int:
    return round(datetime(year, month, day, hour, minute, tzinfo=BERLIN).timestamp() * 1000)


def test_window_covers_scoped_sensors_in_local_time(registry: Registry) -> None:
    """Tuesday 02:00-04:00 Berlin covers the north pumps, in summer and in winter time."""
    m = parse_maintenance(WINDOWS, registry)
    pump = {"sensor": "wtr-0001"}
    # 2026-07-07 and 2026-01-06 are Tuesdays (CEST and CET).
    for day in ((2026, 7, 7), (2026, 1, 6)):
        assert m.active(pump, ms(*day, 2, 0)) == ("north-pumps-tuesday", ms(*day, 4, 0))
        assert m.active(pump, ms(*day, 3, 59)) is not None
        assert m.active(pump, ms(*day, 4, 0)) is None
        assert m.active(pump, ms(*day, 1, 59)) is None
    # Wednesday, another district, another silo: not covered.
    assert m.active(pump, ms(2026, 7, 8, 3, 0)) is None
    assert m.active({"sensor": "wtr-0003"}, ms(2026, 7, 7, 3, 0)) is None
    assert m.active({"sensor": "lgt-0001"}, ms(2026, 7, 7, 3, 0)) is None


def test_group_alert_matched_by_labels(registry: Registry) -> None:
    """A group alert (no sensor label) is matched on its district/silo labels."""
    text = "windows:\n  - {name: w, start: '00:00', duration: 1d, match: {district: north}}\n"
    m = parse_maintenance(text, registry)
    assert m.active({"district": "north"}, 0) is not None
    assert m.active({"district": "south"}, 0) is None


def test_window_crossing_midnight_belongs_to_its_start_day(registry: Registry) -> None:
    """A Sunday 23:00 + 3h window still covers Monday 01:30."""
    text = "windows:\n  - {name: w, every: [sun], start: '23:00', duration: 3h, timezone: UTC}\n"
    m = parse_maintenance(text, registry)
    monday = round(datetime(2026, 7, 6, 1, 30, tzinfo=ZoneInfo("UTC")).timestamp() * 1000)
    assert m.active({"sensor": "wtr-0003"}, monday) is not None


def test_errors_are_located_and_all_reported(registry: Registry) -> None:
    """Unknown keys, bad zones, unquoted times and unknown sensors are each reported with place."""
    text = """windows:
  - name: a
    start: 2:00
    duration: 1h
  - name: b
    start: "02:00"
    duration: 1h
    timezone: Mars/Olympus
    colour: red
    match: {sensors: [nope-1]}
"""
    with pytest.raises(MaintenanceFileError) as exc:
        parse_maintenance(text, registry, "m.yaml")
    text_out = "\n".join(str(p) for p in exc.value.problems)
    assert "m.yaml:3:12" in text_out
    assert "quoted" in text_out
    assert "m.yaml:8:15" in text_out
    assert "unknown time zone" in text_out
    assert "m.yaml:9:" in text_out
    assert "colour" in text_out


def test_unknown_sensor_is_refused(registry: Registry) -> None:
    """A window naming a sensor missing from the registry is refused with its place."""
    text = "windows:\n  - {name: w, start: '01:00', duration: 1h, match: {sensors: [nope-1]}}\n"
    with pytest.raises(MaintenanceFileError, match=r"m.yaml:2:.*unknown nope-1"):
        parse_maintenance(text, registry, "m.yaml")
