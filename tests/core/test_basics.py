"""Durations, topics, settings and wire records behave as the contract says."""

from __future__ import annotations

from datetime import timedelta

import pytest

from citypulse.durations import format_duration, parse_duration
from citypulse.events import Reading, ReadingBatch
from citypulse.settings import Settings, redact_url
from citypulse.topics import SensorTopic, TopicError


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("5m", 300), ("1h30m", 5400), ("7d", 604800), ("500ms", 0.5), ("1.5h", 5400)],
)
def test_durations_parse_and_format(text: str, seconds: float) -> None:
    td = parse_duration(text)
    assert td == timedelta(seconds=seconds)
    assert parse_duration(format_duration(td)) == td


@pytest.mark.parametrize("bad", ["", "5", "m5", "5 m", "5mm", "-5m", "5x"])
def test_bad_durations_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="bad duration"):
        parse_duration(bad)


def test_topic_parse_round_trip() -> None:
    t = SensorTopic.parse("citypulse/v1/aquasense/wtr-0001/up")
    assert (t.vendor, t.sensor_id, t.direction) == ("aquasense", "wtr-0001", "up")
    assert str(t.with_direction("rejects")) == "citypulse/v1/aquasense/wtr-0001/rejects"
    for bad in ("citypulse/v2/a/b/up", "citypulse/v1/a/up", "citypulse/v1//b/up", "x/v1/a/b/up"):
        with pytest.raises(TopicError):
            SensorTopic.parse(bad)


def test_settings_from_env_and_secrets_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CITYPULSE_DATABASE_URL", "postgresql://writer:hunter2@db:5432/citypulse")
    monkeypatch.setenv("CITYPULSE_MQTT_PASSWORD", "s3cret")
    monkeypatch.setenv("CITYPULSE_PARTITIONS", "12")
    s = Settings()
    assert s.partitions == 12
    assert s.topic("readings") == "citypulse.readings"
    shown = str(s.redacted())
    assert "hunter2" not in shown
    assert "s3cret" not in shown
    assert "hunter2" not in repr(s)
    assert redact_url("mqtt://u:p@h:1883") == "mqtt://u:***@h:1883"


def test_settings_from_toml_file(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    conf = tmp_path / "city.toml"
    conf.write_text('kafka_bootstrap = "kafka:9092"\npartitions = 9\n')
    monkeypatch.setenv("CITYPULSE_CONFIG", str(conf))
    monkeypatch.setenv("CITYPULSE_PARTITIONS", "4")
    s = Settings()
    assert s.kafka_bootstrap == "kafka:9092"
    assert s.partitions == 4  # the environment wins over the file


def test_reading_batch_round_trip() -> None:
    batch = ReadingBatch(
        sensor="wtr-1",
        vendor="aquasense",
        received_ms=1_700_000_000_500,
        source="abc",
        readings=[Reading(ts_ms=1_700_000_000_000, metric="pressure", value=3.2, unit="bar")],
    )
    assert ReadingBatch.decode(batch.encode()) == batch
    assert batch.readings[0].ts.year == 2023
