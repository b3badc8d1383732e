"""A realistic-size rule set generated from templates over districts, silos and thresholds.

The thresholds sit above the values the benchmark publishes, so the generated rules evaluate
(windows, hysteresis, staleness, group aggregates) on every reading without flooding the alert
topic; the one rule that fires is :data:`MARKER_RULE`, on the probe sensors' marker value.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from citypulse.registry import Registry, Sensor

MARKER_RULE = "BenchMarker"
"""The rule that fires when a probe sensor reports :data:`MARKER_VALUE` (alert latency)."""
GROUP_MARKER_RULE = "BenchGroupMarker"
"""The same as a group rule (one group per probe sensor) with the cross-sensor rules'
evaluation interval: its alerts go through the re-key hop and the group stage (group alert
latency)."""
MARKER_METRIC = "pressure"
MARKER_VALUE = 15.5
"""Pressure (bar) of a marker reading: valid (range 0-16) and above every normal value."""
NORMAL_FRACTION = 0.35
"""Published values sit at this fraction of each metric's valid range."""


def _metrics_by_silo(registry: Registry) -> dict[tuple[str, str], tuple[float, float]]:
    """(silo, metric) -> (min, max) valid range, over the registry."""
    out: dict[tuple[str, str], tuple[float, float]] = {}
    for s in registry.sensors:
        for name, m in s.metrics.items():
            lo = m.min if m.min is not None else 0.0
            hi = m.max if m.max is not None else lo + 100.0
            out.setdefault((str(s.silo), name), (lo, hi))
    return out


def _threshold(lo: float, hi: float, fraction: float) -> float:
    return round(lo + (hi - lo) * fraction, 3)


def _candidates(registry: Registry) -> Iterator[tuple[str, dict[str, Any]]]:
    """(group name, rule) in an interleaved order, so any prefix mixes every template."""
    districts = sorted({s.district for s in registry.sensors})
    metrics = sorted(_metrics_by_silo(registry).items())
    silos = sorted({silo for silo, _ in _metrics_by_silo(registry)})
    for tier in itertools.count():
        frac = 0.80 + 0.05 * (tier % 4)  # never reached by the published values (0.35)
        suffix = f"_t{tier}" if tier else ""
        for (silo, metric), (lo, hi) in metrics:
            # Cross-sensor: a district-wide aggregate over the silo's sensors.
            yield (
                "bench_group",
                {
                    "name": f"District_{silo}_{metric}{suffix}",
                    "group_by": "district",
                    "expr": (
                        f"group.avg(avg({metric}, 10m), silo={silo}) > {_threshold(lo, hi, frac)}"
                        f" and group.count({metric} > {_threshold(lo, hi, frac)}, silo={silo}) > 2"
                    ),
                    "for": "2m",
                    "severity": "critical",
                    "labels": {"team": silo},
                },
            )
        for d in districts:
            for (silo, metric), (lo, hi) in metrics:
                # Windowed average with two severity levels and hysteresis.
                yield (
                    f"bench_window_{d}",
                    {
                        "name": f"Avg_{silo}_{metric}_{d}{suffix}",
                        "select": {"silo": silo, "district": d},
                        "severity": [
                            {
                                "level": "warning",
                                "expr": f"avg({metric}, 5m) > {_threshold(lo, hi, frac)}",
                                "for": "2m",
                            },
                            {
                                "level": "critical",
                                "expr": f"avg({metric}, 5m) > {_threshold(lo, hi, frac + 0.1)}",
                                "for": "1m",
                            },
                        ],
                        "clear": f"avg({metric}, 5m) < {_threshold(lo, hi, frac - 0.1)}",
                        "labels": {"team": silo},
                        "annotations": {"summary": "{{ $asset }}: " + metric + " high"},
                    },
                )
                # Instant threshold with hysteresis and keep_firing_for.
                yield (
                    f"bench_instant_{d}",
                    {
                        "name": f"High_{silo}_{metric}_{d}{suffix}",
                        "select": {"silo": silo, "district": d},
                        "expr": f"{metric} > {_threshold(lo, hi, frac + 0.05)}",
                        "clear": f"{metric} < {_threshold(lo, hi, frac - 0.05)}",
                        "for": "1m",
                        "keep_firing_for": "2m",
                        "severity": "warning",
                        "labels": {"team": silo},
                    },
                )
            for silo in silos:
                yield (
                    f"bench_stale_{d}",
                    {
                        "name": f"Stale_{silo}_{d}{suffix}",
                        "select": {"silo": silo, "district": d},
                        "expr": f"stale({3 + tier})",
                        "severity": "warning",
                        "labels": {"team": "operations"},
                    },
                )


def probe_sensors(registry: Registry, count: int) -> list[Sensor]:
    """The sensors that carry latency probes: the first ``count`` with a pressure metric."""
    found = [s for s in registry.sensors if MARKER_METRIC in s.metrics]
    return found[:count]


def generate_rules(
    registry: Registry, count: int, probes: Sequence[Sensor], group_interval_s: float = 0.0
) -> dict[str, str]:
    """Rule files (name -> YAML text) holding ``count`` generated rules plus the marker rule.

    Args:
        registry: the benchmark's registry (districts, silos and metric ranges come from it).
        count: generated rules (windowed, instant, stale-sensor and cross-sensor, interleaved).
        probes: the probe sensors the marker rule watches.
        group_interval_s: ``interval`` of the cross-sensor rules' group, seconds (0: none).

    Returns:
        One file per rule group, plus ``bench_marker.yaml`` and ``bench_group_marker.yaml``.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for group, rule in itertools.islice(_candidates(registry), count):
        groups.setdefault(group, []).append(rule)
    # The cross-sensor rules and the group marker are evaluated once per interval.
    interval = {"interval": f"{round(group_interval_s * 1000)}ms"} if group_interval_s else {}
    files = {}
    for group, rules in groups.items():
        spec = {"name": group, **(interval if group == "bench_group" else {}), "rules": rules}
        files[f"{group}.yaml"] = yaml.safe_dump({"groups": [spec]}, sort_keys=False, width=120)
    marker = {
        "name": MARKER_RULE,
        "select": {"sensor": [s.id for s in probes]},
        "expr": f"{MARKER_METRIC} > {MARKER_VALUE - 0.5}",
        "severity": "info",
        "labels": {"team": "bench"},
    }
    files["bench_marker.yaml"] = yaml.safe_dump(
        {"groups": [{"name": "bench_marker", "rules": [marker]}]}, sort_keys=False
    )
    group_marker = {
        "name": GROUP_MARKER_RULE,
        "select": {"sensor": [s.id for s in probes]},
        "group_by": "sensor",
        "expr": f"group.max({MARKER_METRIC}) > {MARKER_VALUE - 0.5}",
        "severity": "info",
        "labels": {"team": "bench"},
    }
    spec = {"name": "bench_group_marker", **interval, "rules": [group_marker]}
    files["bench_group_marker.yaml"] = yaml.safe_dump({"groups": [spec]}, sort_keys=False)
    return files


def write_rules(directory: Path, files: dict[str, str]) -> None:
    """Write the rule files into ``directory`` (created; previous ``*.yaml`` removed)."""
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.yaml"):
        old.unlink()
    for name, text in files.items():
        (directory / name).write_text(text)
