"""The rule engine: state machine, hysteresis, escalation, staleness, groups, guardrails, state."""

from __future__ import annotations

from collections.abc import Callable

import orjson
import pytest

from citypulse.events import AlertEvent, AlertState, CommandEvent, Reading, ReadingBatch
from citypulse.registry import Registry, parse_registry
from rules import RuleEngine, RuleSet, RuleStateError
from rules._load import parse_rules_text

REGISTRY_YAML = """
version: 1
sensors:
  - {id: wtr-n-1, vendor: aqua, silo: water, district: north, asset: pump n1,
     location: {lat: 45, lon: 4}, interval: 1m, labels: {kind: pump},
     metrics: {pressure: {unit: bar}, flow: {unit: m3/h}}}
  - {id: wtr-n-2, vendor: aqua, silo: water, district: north, asset: main n2,
     location: {lat: 45, lon: 4}, interval: 1m, labels: {kind: main},
     metrics: {pressure: {unit: bar}, flow: {unit: m3/h}}}
  - {id: wtr-s-1, vendor: aqua, silo: water, district: south, asset: pump s1,
     location: {lat: 45, lon: 4}, interval: 1m, labels: {kind: pump},
     metrics: {pressure: {unit: bar}, flow: {unit: m3/h}}}
  - {id: nrg-n-1, vendor: volt, silo: energy, district: north, asset: substation n1,
     location: {lat: 45, lon: 4}, interval: 1m, metrics: {power: {unit: kW}}}
  - {id: lgt-n-1, vendor: lumen, silo: lighting, district: north, asset: lights n1,
     location: {lat: 45, lon: 4}, interval: 1m, actuator: true,
     metrics: {dim_level: {unit: "%"}}}
  - {id: air-n-1, vendor: airly, silo: air, district: north, asset: air n1,
     location: {lat: 45, lon: 4}, interval: 5m, metrics: {pm25: {unit: ug/m3}}}
"""
MIN = 60_000
REG = parse_registry(REGISTRY_YAML, "registry.yaml")


def ruleset(rule_yaml: str, registry: Registry = REG) -> RuleSet:
    text = "groups:\n  - name: g\n    rules:\n" + "\n".join(
        "      " + line for line in rule_yaml.strip("\n").splitlines()
    )
    rules, errors, _ = parse_rules_text(text, "t.yaml", registry)
    assert not errors, [str(e) for e in errors]
    return RuleSet(tuple(rules))


def batch(sensor: str, ts_ms: int, **metrics: float) -> ReadingBatch:
    return ReadingBatch(
        sensor=sensor,
        vendor="v",
        received_ms=ts_ms,
        source="test",
        readings=[Reading(ts_ms=ts_ms, metric=m, value=v, unit="u") for m, v in metrics.items()],
    )


def feed(
    engine: RuleEngine, sensor: str, metric: str, values: list[float | None], start_min: int = 0
) -> list[tuple[int, AlertEvent | CommandEvent]]:
    """One value per minute; ``None`` = no reading (time still advances)."""
    out = []
    for i, v in enumerate(values):
        t = (start_min + i) * MIN
        if v is not None:
            out += [(start_min + i, e) for e in engine.process(batch(sensor, t, **{metric: v}))]
        out += [(start_min + i, e) for e in engine.advance(t)]
    return out


def states(events: list[tuple[int, AlertEvent | CommandEvent]]) -> list[tuple[int, str, str]]:
    return [(m, e.state.value, e.severity) for m, e in events if isinstance(e, AlertEvent)]


LOW = """
- name: Low
  select: {silo: water}
  expr: pressure < 2
  for: 2m
"""


def test_pending_firing_resolved() -> None:
    """inactive -> pending -> (after for) firing -> resolved, one event per change."""
    eng = RuleEngine(ruleset(LOW), REG)
    ev = feed(eng, "wtr-n-1", "pressure", [3, 1, 1, 1, 1, 3, 3])
    assert states(ev) == [
        (1, "pending", "warning"),
        (3, "firing", "warning"),
        (5, "resolved", "warning"),
    ]
    firing = [e for _, e in ev if isinstance(e, AlertEvent)][1]
    assert firing.labels == {
        "alertname": "Low", "sensor": "wtr-n-1", "vendor": "aqua", "silo": "water",
        "district": "north", "asset": "pump n1",
    }  # fmt: skip
    assert firing.values == {"pressure": 1.0}
    assert firing.active_since_ms == 1 * MIN
    assert firing.ts_ms == firing.evaluated_ms == 3 * MIN


def test_pending_that_recovers_goes_inactive_without_firing() -> None:
    """A condition shorter than ``for`` never fires."""
    eng = RuleEngine(ruleset(LOW), REG)
    assert states(feed(eng, "wtr-n-1", "pressure", [1, 3, 1, 3])) == [
        (0, "pending", "warning"), (1, "inactive", "warning"),
        (2, "pending", "warning"), (3, "inactive", "warning"),
    ]  # fmt: skip


def test_hysteresis_clear_condition() -> None:
    """Once firing, the alert resolves only when ``clear`` holds, not when expr turns false."""
    eng = RuleEngine(ruleset(LOW + "  clear: pressure > 2.5\n"), REG)
    ev = feed(eng, "wtr-n-1", "pressure", [1, 1, 1, 2.2, 2.4, 2.2, 2.6])
    assert states(ev) == [
        (0, "pending", "warning"),
        (2, "firing", "warning"),
        (6, "resolved", "warning"),
    ]


def test_keep_firing_for() -> None:
    """After the condition ends the alert keeps firing for keep_firing_for, then resolves."""
    eng = RuleEngine(ruleset(LOW + "  keep_firing_for: 3m\n"), REG)
    ev = feed(eng, "wtr-n-1", "pressure", [1, 1, 1, 3, 3, 1, 3, 3, 3, 3])
    # The dip at minute 5 resets the keep-firing timer.
    assert states(ev) == [
        (0, "pending", "warning"),
        (2, "firing", "warning"),
        (9, "resolved", "warning"),
    ]


ESCALATE = """
- name: Air
  select: {silo: air}
  severity:
    - {level: warning, expr: pm25 > 50, for: 2m}
    - {level: critical, expr: pm25 > 100, for: 2m}
  clear: pm25 < 40
"""


def test_escalation_keeps_one_fingerprint() -> None:
    """warning -> critical -> warning -> resolved, one alert identity throughout."""
    eng = RuleEngine(ruleset(ESCALATE), REG)
    ev = feed(eng, "air-n-1", "pm25", [60, 60, 60, 120, 120, 120, 70, 45, 30])
    assert states(ev) == [
        (0, "pending", "warning"), (2, "firing", "warning"), (5, "firing", "critical"),
        (6, "firing", "warning"), (8, "resolved", "warning"),
    ]  # fmt: skip
    assert len({e.fingerprint for _, e in ev if isinstance(e, AlertEvent)}) == 1


def test_staleness_uses_the_registry_interval() -> None:
    """stale(3) fires after 3 x interval of silence (5m interval -> 15m), on ticks only."""
    eng = RuleEngine(ruleset("- name: Stale\n  select: {silo: air}\n  expr: stale(3)\n"), REG)
    ev = feed(eng, "air-n-1", "pm25", [10] + [None] * 16 + [10])
    assert states(ev) == [(16, "firing", "warning"), (17, "resolved", "warning")]


def test_ticks_skip_stale_rules_until_their_result_can_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A tick evaluates a stale() rule for a sensor only once its last evaluation may no longer
    hold (3 x 1m after its latest reading), so ticks over a reporting fleet cost nothing;
    alerts come at the same ticks as when every tick evaluated everything."""
    rules = ruleset("- name: Stale\n  select: {silo: water}\n  expr: stale(3) or pressure > 9\n")
    calls: list[str] = []
    evaluate = RuleEngine._evaluate

    def counting(self: RuleEngine, rule: object, key: str, *args: object) -> bool:
        calls.append(key)
        return evaluate(self, rule, key, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(RuleEngine, "_evaluate", counting)
    eng = RuleEngine(rules, REG)
    fired = []
    for sec in range(0, 8 * 60, 5):  # a tick every 5 s for 8 minutes
        t = sec * 1000
        if sec < 120:  # both report every 5 s, then only wtr-n-1
            fired += eng.process(batch("wtr-n-1", t, pressure=3))
            if sec < 60:
                fired += eng.process(batch("wtr-n-2", t, pressure=3))
        before = len(calls)
        fired += eng.advance(t)
        if 0 < sec < 120:
            # Fresh sensors, and wtr-s-1 (never seen) not before 3 minutes: nothing to do.
            assert len(calls) == before, sec
    assert [(e.labels["sensor"], e.state.value, e.ts_ms) for e in fired] == [
        ("wtr-s-1", "firing", 185_000),  # never seen: counts from the engine's first time
        ("wtr-n-2", "firing", 240_000),  # last seen 55 s, stale after 3 minutes
        ("wtr-n-1", "firing", 300_000),  # last seen 115 s
    ]


LEAK = """
- name: Leak
  group_by: district
  expr: >-
    group.min(delta(pressure, 10m), silo=water) < -1
    and group.max(delta(flow, 10m), silo=water) > 20
"""


def test_group_rule_combines_sensors_and_keys_state_by_group() -> None:
    """A leak needs the pressure drop and the flow rise, from different sensors of one district."""
    eng = RuleEngine(ruleset(LEAK), REG)
    out = []
    for m in range(6):
        t = m * MIN
        out += eng.process(batch("wtr-n-1", t, pressure=5 if m < 3 else 3, flow=100))
        out += eng.process(batch("wtr-n-2", t, pressure=4, flow=100 if m < 3 else 150))
        out += eng.process(batch("wtr-s-1", t, pressure=4, flow=100))
    fired = [e for e in out if isinstance(e, AlertEvent)]
    assert [(e.state.value, e.labels) for e in fired] == [
        ("firing", {"alertname": "Leak", "district": "north"})
    ]
    assert fired[0].values == {
        "group.max(delta(flow, 10m), silo=water)": 50.0,
        "group.min(delta(pressure, 10m), silo=water)": -2.0,
    }
    assert eng.group_keys(batch("wtr-s-1", 0, flow=1)) == ("district=south",)
    # An air sensor is in district north but no group function reads it: no re-keying.
    assert eng.group_keys(batch("air-n-1", 0, pm25=1)) == ()


def test_scope_splits_sensor_and_group_rules() -> None:
    """scope='sensor' evaluates only per-sensor rules, scope='group' only group rules."""
    rs = ruleset(LOW.replace("for: 2m", "for: 0s") + LEAK.replace("< -1", "< 100"))
    eng = RuleEngine(rs, REG)
    rules_seen = {e.rule for e in eng.process(batch("wtr-n-1", 0, pressure=1, flow=1), "sensor")}
    assert rules_seen == {"Low"}
    eng2 = RuleEngine(rs, REG)
    for m in range(2):
        got = eng2.process(batch("wtr-n-1", m * MIN, pressure=1, flow=1 + 30 * m), "group")
    assert {e.rule for e in got} == {"Leak"}


SURGE = """
- name: Surge
  select: {silo: energy}
  expr: avg(power, 5m) > 100
"""


def _held(engine: RuleEngine) -> dict[str, int]:
    """metric -> points the engine holds, over all sensors."""
    out: dict[str, int] = {}
    for st in engine._states.values():
        for metric, series in st.series.items():
            out[metric] = out.get(metric, 0) + len(series.ts)
    return out


def test_stage_engines_hold_only_their_windows_and_raise_what_one_engine_does() -> None:
    """The runtime's stages each run an engine scoped to their rules: the sensor stage's keeps
    no flow (only the group rule reads it) and one pressure point (its rule reads the latest),
    the group stage's no power; together they raise exactly what one engine raises."""
    rs = ruleset(LOW.replace("for: 2m", "for: 1m") + LEAK + SURGE)
    one = RuleEngine(rs, REG)
    sensor, group = RuleEngine(rs, REG, scope="sensor"), RuleEngine(rs, REG, scope="group")
    want, got = [], []
    for m in range(16):
        t = m * MIN
        for b in (
            batch("wtr-n-1", t, pressure=5 if m < 6 else 1.5, flow=100),
            batch("wtr-n-2", t + 1, pressure=4, flow=100 if m < 6 else 150),
            batch("nrg-n-1", t + 2, power=50 if m < 4 or m > 10 else 200),
        ):
            want += one.process(b)
            got += [*sensor.process(b), *group.process(b)]
    assert {e.rule for e in want} == {"Low", "Leak", "Surge"}
    assert sorted(e.encode() for e in got) == sorted(e.encode() for e in want)
    # Latest pressure; 5 minutes of power and the value in force at their start.
    assert _held(sensor) == {"pressure": 2, "power": 6}
    # 10 minutes (and GROUP_LATENESS_MS) of 2 sensors, and the values in force before.
    assert _held(group) == {"pressure": 24, "flow": 24}
    with pytest.raises(ValueError, match="cannot evaluate"):
        sensor.process(batch("wtr-n-1", 16 * MIN, pressure=1), "all")
    restored = RuleEngine(rs, REG, scope="sensor")
    restored.restore(one.snapshot())  # an unscoped snapshot: what the stage needs is kept
    assert set(_held(restored)) == {"pressure", "power"}


DIM = """
- name: Dim
  group_by: district
  expr: group.max(power, silo=energy) > 0
  action:
    command:
      select: {silo: lighting}
      setting: dim_level
      value: group.max(power, silo=energy)
    guardrails: {min: 20, max: 80, out_of_range: OOR, max_change_per_min: 10, cooldown: 3m}
    dry_run: DRY
"""


def commands(
    eng: RuleEngine, powers: list[float], dims: list[float | None]
) -> list[tuple[int, float, str, str | None]]:
    out = []
    for m, (p, d) in enumerate(zip(powers, dims, strict=True)):
        t = m * MIN
        if d is not None:
            out += [(m, e) for e in eng.process(batch("lgt-n-1", t, dim_level=d))]
        out += [(m, e) for e in eng.process(batch("nrg-n-1", t, power=p))]
    return [(m, e.value, e.status, e.reason) for m, e in out if isinstance(e, CommandEvent)]


def test_guardrails_clamp_rate_and_cooldown() -> None:
    """Out-of-range values are clamped, steps rate-limited, and cooldown suppresses (once)."""
    eng = RuleEngine(ruleset(DIM.replace("OOR", "clamp").replace("DRY", "false")), REG)
    got = commands(eng, [95, 95, 95, 95, 95], [50, 50, 50, 50, 50])
    assert got == [
        (0, 60.0, "sent", "clamped from 95; rate limited to 10/min"),
        (1, 80.0, "suppressed", "cooldown: 120s left"),
        (3, 80.0, "sent", "clamped from 95"),
        (4, 80.0, "suppressed", "cooldown: 120s left"),
    ]


def test_guardrails_refuse_and_dry_run() -> None:
    """out_of_range: refuse suppresses; dry_run marks commands instead of sending."""
    eng = RuleEngine(ruleset(DIM.replace("OOR", "refuse").replace("DRY", "true")), REG)
    got = commands(eng, [95, 95, 55], [50, 50, 50])
    assert got == [
        (0, 95.0, "suppressed", "out of range: 95 not in [20, 80]"),
        (2, 55.0, "dry_run", None),
    ]


def test_division_by_zero_marks_only_that_rule_unhealthy() -> None:
    """A failing rule is reported by unhealthy(); the other rules keep alerting."""
    rs = ruleset(
        LOW.replace("for: 2m", "for: 0s") + "- name: Bad\n  expr: flow / (flow - flow) > 1\n"
    )
    eng = RuleEngine(rs, REG)
    ev = eng.process(batch("wtr-n-1", 0, pressure=1, flow=5))
    assert [e.rule for e in ev] == ["Low"]
    assert list(eng.unhealthy()) == ["Bad"]
    assert "ZeroDivisionError" in eng.unhealthy()["Bad"]


def _run(eng: RuleEngine, start: int, stop: int) -> list[AlertEvent | CommandEvent]:
    out: list[AlertEvent | CommandEvent] = []
    for m in range(start, stop):
        t = m * MIN
        out += eng.process(batch("wtr-n-1", t, pressure=1 if 3 <= m < 12 else 3, flow=100 + m))
        out += eng.process(batch("wtr-n-2", t, pressure=4, flow=100 + 5 * m))
        out += eng.process(batch("air-n-1", t, pm25=[60, 120, 30][m // 5 % 3]))
        out += eng.advance(t)
    return out


ALL = LOW + "  keep_firing_for: 2m\n" + ESCALATE + LEAK


def test_replay_is_deterministic() -> None:
    """The same inputs give byte-identical effects (no wall clock inside)."""
    a = [e.encode() for e in _run(RuleEngine(ruleset(ALL), REG), 0, 30)]
    b = [e.encode() for e in _run(RuleEngine(ruleset(ALL), REG), 0, 30)]
    assert a == b
    assert len(a) > 5


@pytest.mark.parametrize("cut", [4, 7, 13])
def test_snapshot_restore_round_trip(cut: int) -> None:
    """Restoring a snapshot mid-stream continues exactly as the uninterrupted engine."""
    whole = RuleEngine(ruleset(ALL), REG)
    expected = [e.encode() for e in _run(whole, 0, 30)]
    first = RuleEngine(ruleset(ALL), REG)
    got = [e.encode() for e in _run(first, 0, cut)]
    blob = first.snapshot()
    second = RuleEngine(ruleset(ALL), REG)
    second.restore(blob)
    assert second.snapshot() == blob
    got += [e.encode() for e in _run(second, cut, 30)]
    assert got == expected


def test_snapshot_of_the_previous_version_restores() -> None:
    """A snapshot written before windows were stored as arrays (JSON only, ``"v": 1``) is
    restored after an upgrade: the worker does not start over from an empty state."""
    first = RuleEngine(ruleset(ALL), REG)
    expected = [e.encode() for e in _run(first, 0, 30)]
    second = RuleEngine(ruleset(ALL), REG)
    got = [e.encode() for e in _run(second, 0, 9)]
    v1 = orjson.loads(_header(second.snapshot()))
    v1["v"] = 1
    v1["sensors"] = {
        sid: {
            "last_seen_ms": st.last_seen_ms,
            "series": {m: [list(s.ts), list(s.vals)] for m, s in st.series.items() if s.ts},
        }
        for sid, st in second._states.items()
        if st.last_seen_ms is not None
    }
    del v1["seen"], v1["series"]
    third = RuleEngine(ruleset(ALL), REG)
    third.restore(orjson.dumps(v1))
    got += [e.encode() for e in _run(third, 9, 30)]
    assert got == expected


@pytest.mark.parametrize(
    "mangle",
    [
        lambda b: b[: len(b) - 5],  # cut inside the last series
        lambda b: b[:4] + (10**6).to_bytes(4, "little") + b[8:],  # header length past the end
        lambda b: b'{"v": 7}',  # a version this engine does not know
        lambda b: b"[1, 2]",  # JSON, but not a snapshot
        lambda b: b"\x00garbage",
    ],
)
def test_unreadable_snapshot_raises_rule_state_error(mangle: Callable[[bytes], bytes]) -> None:
    """A damaged or foreign snapshot is refused with RuleStateError (never a half-restored
    engine, never another exception type)."""
    eng = RuleEngine(ruleset(ALL), REG)
    _run(eng, 0, 9)
    other = RuleEngine(ruleset(ALL), REG)
    with pytest.raises(RuleStateError):
        other.restore(mangle(eng.snapshot()))
    assert other.snapshot() == RuleEngine(ruleset(ALL), REG).snapshot()


def _header(blob: bytes) -> bytes:
    size = int.from_bytes(blob[4:8], "little")
    return blob[8 : 8 + size]


def test_replace_rules_keeps_state_of_unchanged_rules() -> None:
    """Hot reload: an unchanged firing alert does not re-fire; a changed rule starts over."""
    eng = RuleEngine(ruleset(LOW + ESCALATE), REG)
    feed(eng, "wtr-n-1", "pressure", [1, 1, 1])
    feed(eng, "air-n-1", "pm25", [60, 60, 60], start_min=3)
    assert {e.rule for e in eng.active_alerts()} == {"Low", "Air"}
    eng.replace_rules(ruleset(LOW + ESCALATE.replace("pm25 < 40", "pm25 < 45")))
    assert {e.rule for e in eng.active_alerts()} == {"Low"}
    ev = feed(eng, "wtr-n-1", "pressure", [1], start_min=6) + feed(eng, "air-n-1", "pm25", [60], 6)
    assert [(e.rule, e.state) for _, e in ev if isinstance(e, AlertEvent)] == [
        ("Air", AlertState.PENDING)
    ]


def test_unchanged_rule_reload_from_text_has_same_digest() -> None:
    """Rule identity for reload is the rule's own definition, not its position or file."""
    a = ruleset(LOW + ESCALATE).by_name["Low"]
    b = ruleset(ESCALATE + LOW).by_name["Low"]
    assert a.digest == b.digest
    assert a.digest != ruleset(LOW.replace("2m", "3m")).by_name["Low"].digest


def test_windows_are_bounded_by_the_longest_window() -> None:
    """Only points inside the longest window a rule reads are kept, and the value in force at
    its start; unread metrics not at all."""
    eng = RuleEngine(ruleset("- name: A\n  expr: avg(pressure, 5m) < 1\n"), REG)
    for m in range(100):
        eng.process(batch("wtr-n-1", m * MIN, pressure=3, flow=1))
    st = eng._states["wtr-n-1"]
    assert set(st.series) == {"pressure"}
    assert len(st.series["pressure"].ts) == 6


def test_unknown_sensor_and_empty_batch_are_ignored() -> None:
    """Readings of sensors outside the registry produce nothing and raise nothing."""
    eng = RuleEngine(ruleset(LOW), REG)
    assert eng.process(batch("nope", 0, pressure=1)) == []
    assert eng.process(batch("wtr-n-1", 0)) == []
