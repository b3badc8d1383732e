"""The registry file: valid city loads, every problem is reported with file:line:col."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from citypulse.cli import app
from citypulse.registry import RegistryError, dump_registry, parse_registry

GOOD = """\
city: testville
sensors:
  - id: wtr-001
    vendor: aquasense
    silo: water
    district: north
    asset: pump-1
    location: {lat: 52.5, lon: 13.4}
    interval: 60s
    metrics:
      pressure: {unit: bar, min: 0, max: 10}
      flow: {unit: m3/h, min: 0}
  - id: air-001
    vendor: airly
    silo: air
    district: south
    asset: station-1
    location: {lat: 52.4, lon: 13.3}
    interval: 5m
    labels: {zone: school}
    metrics:
      pm25: {unit: ug/m3, min: 0, max: 1000}
"""

BAD = """\
sensors:
  - id: wtr-001
    vendor: aquasense
    silo: sewage
    district: north
    asset: pump-1
    location: {lat: 152.5, lon: 13.4}
    interval: 60s
    metrics:
      pressure: {unit: bar, min: 10, max: 0}
  - id: wtr-001
    vendor: aquasense
    silo: water
    district: north
    asset: pump-2
    location: {lat: 52.5, lon: 13.4}
    interval: soon
    metrics:
      pressure: {unit: bar, colour: red}
"""


def test_valid_registry_loads_with_typed_fields() -> None:
    reg = parse_registry(GOOD, "good.yaml")
    sensors = reg.by_id()
    assert sensors["wtr-001"].interval == timedelta(seconds=60)
    assert sensors["air-001"].interval_s == 300
    assert sensors["wtr-001"].metrics["pressure"].in_range(3.2)
    assert not sensors["wtr-001"].metrics["pressure"].in_range(10.5)
    assert reg.districts() == ["north", "south"]
    assert sensors["air-001"].labels == {"zone": "school"}


def test_every_problem_is_reported_with_its_line() -> None:
    with pytest.raises(RegistryError) as info:
        parse_registry(BAD, "bad.yaml")
    lines = [str(p) for p in info.value.problems]
    text = "\n".join(lines)
    assert any(p.startswith("bad.yaml:4:") and "silo" in p for p in lines), text
    assert any(p.startswith("bad.yaml:7:") and "lat" in p for p in lines), text
    assert any(p.startswith("bad.yaml:10:") and "above max" in p for p in lines), text
    assert any(p.startswith("bad.yaml:17:") and "duration" in p for p in lines), text
    assert any(p.startswith("bad.yaml:19:") and "colour" in p for p in lines), text


def test_duplicate_ids_and_duplicate_keys_are_refused() -> None:
    twice = GOOD.replace("id: air-001", "id: wtr-001")
    with pytest.raises(RegistryError, match="already used"):
        parse_registry(twice, "dup.yaml")
    dup_key = GOOD.replace("    silo: water\n", "    silo: water\n    silo: air\n", 1)
    with pytest.raises(RegistryError, match=r"dup\.yaml:6:\d+: .*duplicate key"):
        parse_registry(dup_key, "dup.yaml")


def test_yaml_syntax_error_has_a_place() -> None:
    with pytest.raises(RegistryError, match=r"broken\.yaml:3:"):
        parse_registry("sensors:\n  - id: x\n  bad: [\n", "broken.yaml")


def test_dump_reads_back_unchanged() -> None:
    reg = parse_registry(GOOD)
    assert parse_registry(dump_registry(reg)) == reg


def test_cli_validate_exit_codes(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(GOOD)
    bad.write_text(BAD)
    runner = CliRunner()
    ok = runner.invoke(app, ["registry", "validate", str(good)])
    assert ok.exit_code == 0, ok.output
    assert "2 sensors" in ok.output
    failed = runner.invoke(app, ["registry", "validate", str(bad)])
    assert failed.exit_code == 1
    assert f"{bad}:4:" in failed.output


def test_by_id_follows_a_copy_with_other_sensors() -> None:
    reg = parse_registry(GOOD)
    assert set(reg.by_id()) == {"wtr-001", "air-001"}
    fewer = reg.model_copy(update={"sensors": reg.sensors[:1]})
    assert set(fewer.by_id()) == {"wtr-001"}
    assert set(reg.by_id()) == {"wtr-001", "air-001"}


def test_a_city_sized_registry_loads() -> None:
    """A registry of 10,000 sensors loads whole (parsed once, by libyaml when present)."""
    sensors = "".join(
        GOOD.split("sensors:\n", 1)[1]
        .split("  - id: air-001")[0]
        .replace("wtr-001", f"wtr-{i:05d}")
        for i in range(10_000)
    )
    reg = parse_registry(f"sensors:\n{sensors}", "big.yaml")
    assert len(reg) == 10_000
