"""Smoke test of ``citypulse bench --quick``: it runs end to end and reports every figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from deploy.bench import Mode, generate_rules, probe_sensors, templates_for
from deploy.bench._cmd import summary
from deploy.simulator import generate_registry
from rules import check_rules


def test_generated_rules_are_valid_for_the_engine(tmp_path: Path) -> None:
    """200+ generated rules (windowed, stale, cross-sensor, both markers) pass the rules
    checker; the cross-sensor rules and the group marker carry the evaluation interval."""
    registry = generate_registry(8, 3, seed=1)
    files = generate_rules(registry, 220, probe_sensors(registry, 4), group_interval_s=1.0)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    ruleset, errors = check_rules([tmp_path], registry)
    assert errors == []
    assert ruleset is not None
    assert len(ruleset) == 222
    assert {r.interval_ms for r in ruleset if r.scope == "group"} == {1000}
    assert {r.interval_ms for r in ruleset if r.scope == "sensor"} == {0}
    text = "".join(files.values())
    assert "stale(" in text
    assert "group.avg(" in text
    assert "avg(" in text


def test_templates_carry_ten_readings_per_batch() -> None:
    """Batch and SenML templates hold 10 readings; the clock is written into every slot."""
    registry = generate_registry(1, 1, seed=1)
    for sensor in registry.sensors:
        for mode in (Mode.BATCH, Mode.SENML):
            (tpl,) = templates_for(sensor, mode)
            assert tpl.readings == 10
            assert b"1700000000" in tpl.render(1_700_000_000_123)


_CITYPULSE = (sys.executable, "-c", "from citypulse.cli import main; main()")


def _bench_quick(out: Path, *args: str, timeout_s: float) -> dict[str, Any]:
    """Run ``citypulse bench --quick --out OUT ARGS`` and return its ``latest.json``."""
    done = subprocess.run(
        [*_CITYPULSE, "bench", "--quick", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results: dict[str, Any] = json.loads((out / "latest.json").read_text())
    return results


@pytest.mark.integration
def test_bench_quick_writes_results(tmp_path: Path) -> None:
    """`citypulse bench --quick --mode batch --soak 12 --soak-fill 6 --at-rate 1500` writes
    JSON with non-zero rates, the rule workers' evaluated rate, a memory series of the soak
    phase (with the growth after the fill period), a latency phase at the fixed rate, and a
    plot."""
    results = _bench_quick(
        tmp_path,
        *("--mode", "batch", "--soak", "12", "--soak-fill", "6", "--at-rate", "1500"),
        timeout_s=300,
    )
    for key in ("machine", "ceilings", "modes", "ratios", "rss_mb", "timeseries"):
        assert key in results
    batch = results["modes"]["batch"]
    assert batch["sustained_readings_per_s"] > 0
    # Sustained means every stage kept up: the rule workers' rate is measured too, and each
    # phase drains them before the next one starts.
    ramp = batch["ramp"]
    assert ramp["rules_readings_per_s"] > 0
    assert ramp["drain"]["rules_backlog"] == 0
    # The bench's readings are unique: every writer batch took the plain insert.
    assert ramp["writer_checked_batches"] == 0
    soak = batch["soak"]
    assert len(soak["rss_series_mb"]) >= 2
    assert soak["rss_series_mb"][-1]["rules"] > 0
    assert soak["seconds"] >= 18  # the fill period comes on top of the measured soak
    assert soak["rss_after_fill_mb"]["rules"]["to_mb"] == soak["rss_series_mb"][-1]["rules"]
    assert set(batch["latency"]) == {"50%", "90%", "1500/s"}
    fixed = batch["latency"]["1500/s"]
    assert fixed["phase"] == "batch at 1500/s"
    assert fixed["offered_readings_per_s"] == pytest.approx(1500, rel=0.1)
    assert fixed["alert_latency_ms"]["n"] > 0
    assert batch["latency"]["50%"]["stored_latency_ms"]["n"] > 0
    assert batch["latency"]["50%"]["alert_latency_ms"]["n"] > 0
    # The same alerts as the rule worker sent them: each before it was consumed, after publish.
    half = batch["latency"]["50%"]
    sent, seen = half["alert_sent_latency_ms"], half["alert_latency_ms"]
    assert sent["n"] == seen["n"]
    assert 0 <= sent["p50"] <= seen["p50"]
    assert sent["max"] <= seen["max"]
    # The group marker (a group rule with the 1-s interval) fires through the group stage.
    assert batch["latency"]["50%"]["group_alert_latency_ms"]["n"] > 0
    assert set(batch["cpu_s_per_million"]) >= {"collector", "writer", "rules"}
    assert results["ceilings"]["batch"]["mqtt"]["messages_per_s"] > 0
    assert results["ceilings"]["batch"]["kafka"]["produce_records_per_s"] > 0
    assert results["ceilings"]["copy"]["rows_per_s"] > 0
    assert (tmp_path / "latest.png").stat().st_size > 0
    # The printed summary has a column for the fixed-rate phase, with its p99s.
    console = Console(record=True, width=400)
    console.print(summary(results))
    table = console.export_text()
    assert "1500/s: p99 stored/alert ms" in table
    assert f"{fixed['alert_latency_ms']['p99']:,.0f}" in table


def test_bench_refuses_a_rate_of_zero(tmp_path: Path) -> None:
    """`--at-rate 0` is an error before anything starts (a phase at 0/s measures nothing)."""
    done = subprocess.run(
        [*_CITYPULSE, "bench", "--out", str(tmp_path), "--at-rate", "3000", "--at-rate", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "--at-rate must be above 0" in done.stdout
    assert not any(tmp_path.iterdir())


@pytest.mark.integration
def test_bench_quick_all_modes_each_start_on_a_fresh_broker(tmp_path: Path) -> None:
    """`citypulse bench --quick --mode all`: every mode is measured (rates, latency at 50 %
    with alert probes seen), and each mode after the first starts on an emptied broker with
    fresh services (tansu's memory is back near its start, not grown by the earlier modes)."""
    results = _bench_quick(tmp_path, "--mode", "all", timeout_s=600)
    assert "error" not in results, results.get("error")
    assert list(results["modes"]) == ["single", "batch", "senml"]
    for name, mode in results["modes"].items():
        assert mode["sustained_readings_per_s"] > 0, name
        assert mode["ramp"]["drain"]["rules_backlog"] == 0, name
        assert mode["latency"]["50%"]["stored_latency_ms"]["n"] > 0, name
        assert mode["latency"]["50%"]["alert_latency_ms"]["n"] > 0, name
    rss = results["rss_mb"]
    for before, after in (("single", "batch"), ("batch", "senml")):
        grown = rss[before]["tansu"]["end"]
        assert rss[after]["tansu"]["start"] < grown, (before, after, rss)
        assert rss[after]["tansu"]["end"] > rss[after]["tansu"]["start"]
