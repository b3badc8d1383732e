"""Runtime pieces without I/O: snapshots, Alertmanager payloads, group-key ownership."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from citypulse.events import AlertEvent, AlertState, Reading, ReadingBatch
from citypulse.registry import Registry, load_registry
from rules import RuleEngine, RuleSet, load_rules
from rules._engine import Effect
from rules.runtime import Snapshot, alert_payload
from rules.runtime.worker import owned_effects, partition_of

DATA = Path(__file__).parent / "integration" / "data"

GROUP_RULES = """
groups:
  - name: water
    rules:
      - name: DistrictLow
        select: {silo: water}
        group_by: district
        expr: group.avg(pressure) < 1.5
      - name: SiloLow
        select: {silo: water}
        group_by: silo
        expr: group.avg(pressure) < 1.5
"""


@pytest.fixture(scope="module")
def registry() -> Registry:
    return load_registry(DATA / "registry.yaml")


def _event(state: AlertState = AlertState.FIRING) -> AlertEvent:
    return AlertEvent(
        fingerprint="f1",
        rule="WaterLowPressure",
        rule_version="v1",
        group="water",
        state=state,
        severity="critical",
        labels={"sensor": "wtr-0001"},
        annotations={"summary": "low"},
        values={"pressure": 1.25},
        active_since_ms=1_000,
        ts_ms=61_000,
        evaluated_ms=61_000,
    )


def _batch(sensor: str, ts_ms: int, pressure: float) -> ReadingBatch:
    return ReadingBatch(
        sensor=sensor,
        vendor="aquasense",
        received_ms=ts_ms,
        source="s",
        readings=[Reading(ts_ms=ts_ms, metric="pressure", value=pressure, unit="bar")],
    )


def test_snapshot_round_trip_keeps_everything() -> None:
    """A snapshot read back from its bytes resumes at the same offset with the same state."""
    snap = Snapshot(
        "group",
        3,
        1234,
        b"\x00engine\xff",
        99,
        {"f1": _event()},
        {"f2": (_event().model_copy(update={"fingerprint": "f2", "notify": False}), 5000)},
        {"0|district=north": 17},
    )
    back = Snapshot.decode(snap.encode())
    assert back == snap
    assert back.key == "group:3"


def test_alertmanager_payload_for_firing_and_resolved() -> None:
    """Firing alerts stay open for the hold time; resolved ones end when they resolved."""
    firing = alert_payload(_event(), now_ms=100_000, hold_ms=240_000, generator_url="g")
    assert firing["labels"] == {
        "sensor": "wtr-0001",
        "alertname": "WaterLowPressure",
        "severity": "critical",
        "rule_group": "water",
    }
    assert firing["annotations"] == {
        "summary": "low",
        "rule_version": "v1",
        "value_pressure": "1.25",
    }
    assert firing["startsAt"] == "1970-01-01T00:00:01.000Z"
    assert firing["endsAt"] == "1970-01-01T00:05:40.000Z"
    resolved = alert_payload(_event(AlertState.RESOLVED), 100_000, 240_000, "g")
    assert resolved["endsAt"] == "1970-01-01T00:01:01.000Z"


def test_alertmanager_payload_names_are_valid_label_names() -> None:
    """A group rule's values are named by expressions; Alertmanager refuses a whole post when
    one name in it is not a label name, so every name is made one."""
    event = _event().model_copy(
        update={
            "values": {"group.avg(pressure)": 1.25, "pressure": 2.0},
            "labels": {"sensor": "wtr-0001", "zone-id": "7"},
            "annotations": {"summary": "low", "2nd.note": "x"},
        }
    )
    payload = alert_payload(event, now_ms=100_000, hold_ms=240_000, generator_url="g")
    names = [*payload["labels"], *payload["annotations"]]  # type: ignore[misc]
    assert all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", n) for n in names), names
    assert payload["annotations"]["value_group_avg_pressure"] == "1.25"  # type: ignore[index]
    assert payload["annotations"]["value_pressure"] == "2"  # type: ignore[index]
    assert payload["labels"]["zone_id"] == "7"  # type: ignore[index]
    assert payload["annotations"]["_2nd_note"] == "x"  # type: ignore[index]


def test_group_stage_keeps_only_the_effects_of_its_own_key(
    registry: Registry, tmp_path: Path
) -> None:
    """A batch feeding two groups yields each group's alert only in the partition owning it,
    and exactly once when both keys share a partition (one engine): evaluating the other
    key's rules along the way used to move that alert's state without reporting it."""
    path = tmp_path / "g.yaml"
    path.write_text(GROUP_RULES)
    ruleset = load_rules([path], registry)
    keys = ("district=north", "silo=water")
    assert RuleEngine(ruleset, registry).group_keys(_batch("wtr-0001", 0, 1.0)) == keys

    def run(engine: RuleEngine, key: str) -> list[tuple[str, AlertState]]:
        effects = [
            *engine.process(_batch("wtr-0002", 1000, 1.0), "group", key),
            *engine.process(_batch("wtr-0001", 2000, 1.0), "group", key),
        ]
        return [(e.rule, e.state) for e in effects if isinstance(e, AlertEvent)]

    apart = {key: run(RuleEngine(ruleset, registry, scope="group"), key) for key in keys}
    shared = RuleEngine(ruleset, registry, scope="group")
    together = {key: run(shared, key) for key in keys}
    expected = {
        "district=north": [("DistrictLow", AlertState.FIRING)],
        "silo=water": [("SiloLow", AlertState.FIRING)],
    }
    assert apart == expected
    assert together == expected


def test_time_passing_is_reported_by_the_owning_partition_only(
    registry: Registry, tmp_path: Path
) -> None:
    """Every partition's engine sees every sensor go silent on a tick; after ownership
    filtering each silent sensor is reported by exactly one partition, its own."""
    path = tmp_path / "s.yaml"
    path.write_text(
        "groups:\n  - name: live\n    rules:\n"
        "      - {name: Silent, select: {silo: water}, expr: stale(3)}\n"
    )
    ruleset = load_rules([path], registry)
    reported: list[tuple[int, str]] = []
    for partition in (0, 1):
        engine = RuleEngine(ruleset, registry)
        engine.advance(0)
        raw = engine.advance(600_000)  # 10 minutes of silence, 60 s intervals
        assert len(raw) == 3  # each engine alone would report all three
        for e in owned_effects(raw, "sensor", partition, 2, ruleset, registry):
            assert isinstance(e, AlertEvent)
            reported.append((partition, e.labels["sensor"]))
    assert sorted(s for _, s in reported) == ["wtr-0001", "wtr-0002", "wtr-0003"]
    assert all(partition_of(s, 2) == p for p, s in reported)


def _stale_rules(registry: Registry, tmp_path: Path) -> RuleSet:
    """A silent-sensor rule and a district rule over its sensors' silence."""
    path = tmp_path / "s.yaml"
    path.write_text(
        "groups:\n  - name: live\n    rules:\n"
        "      - {name: Silent, select: {silo: water}, expr: stale(3)}\n"
        "      - {name: QuietDistrict, select: {silo: water}, group_by: district,\n"
        "         expr: group.count(stale(3)) >= 1}\n"
    )
    return load_rules([path], registry)


def test_an_engine_ticks_only_the_keys_it_owns(registry: Registry, tmp_path: Path) -> None:
    """Given an owner, an engine evaluates staleness only for its own sensors (and group
    keys): the others' silence is not even computed there, and nothing is lost overall."""
    ruleset = _stale_rules(registry, tmp_path)
    seen: dict[int, list[str]] = {}
    for partition in (0, 1):
        engine = RuleEngine(ruleset, registry, lambda k, p=partition: partition_of(k, 2) == p)
        engine.advance(0)
        raw = engine.advance(600_000)
        seen[partition] = sorted(
            e.labels.get("sensor") or f"district={e.labels['district']}"
            for e in raw
            if isinstance(e, AlertEvent)
        )
        assert all(partition_of(k, 2) == partition for k in seen[partition])
    every = sorted(seen[0] + seen[1])
    assert every == [
        "district=north",
        "district=south",
        "wtr-0001",
        "wtr-0002",
        "wtr-0003",
    ]


def test_a_snapshot_written_by_the_previous_version_still_restores() -> None:
    """Snapshots are durable: a ``Z1`` record (base64 engine in JSON) from before the ``Z2``
    layout decodes to the same snapshot, so an upgrade resumes where the old worker stopped."""
    import base64
    import zlib

    import orjson

    old = {
        "v": 1,
        "stage": "sensor",
        "partition": 2,
        "offset": 77,
        "engine": base64.b64encode(b'{"v":1}').decode(),
        "clock_ms": 5,
        "firing": [_event().model_dump(mode="json")],
        "quiet": [],
        "seen": {},
    }
    back = Snapshot.decode(b"Z1" + zlib.compress(orjson.dumps(old)))
    assert back == Snapshot("sensor", 2, 77, b'{"v":1}', 5, {"f1": _event()}, {}, {})


def test_a_tick_can_pause_between_evaluations_and_reports_the_same(
    registry: Registry, tmp_path: Path
) -> None:
    """The group stage walks a tick one evaluation at a time (letting the alert path run in
    between): it pauses once per evaluated key and reports what a tick in one go reports,
    in the same order."""
    ruleset = _stale_rules(registry, tmp_path)
    whole, stepped = RuleEngine(ruleset, registry), RuleEngine(ruleset, registry)
    for engine in (whole, stepped):
        engine.advance(0)
    expected = whole.advance(600_000)
    out: list[Effect] = []
    pauses = sum(1 for _ in stepped.advancing(600_000, out))
    assert out == expected
    # Three silent sensors and two districts, each evaluated on its own step.
    assert len([e for e in out if isinstance(e, AlertEvent)]) == 5
    assert pauses >= 5
    assert stepped.snapshot() == whole.snapshot()
