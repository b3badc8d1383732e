"""The engine with data arriving out of event-time order: an alert's timeline never goes
backwards and each state change is emitted once (issue 3, bugs A and B)."""

from __future__ import annotations

from citypulse.events import AlertEvent, AlertState, CommandEvent
from rules import RuleEngine

from .test_core_engine import MIN, REG, batch, ruleset

OUTAGE = """
- name: Outage
  group_by: district
  expr: group.max(power, silo=energy) < 1 and group.max(flow, silo=water, kind=pump) < 1
  for: 2m
# Other rules read these metrics over windows (as in rules/examples), so the engine keeps 15
# minutes of them: a late reading then sees the other sensor's value at its own event time.
- name: Windows
  expr: avg(power, 15m) < -1 or avg(flow, 15m) < -1
"""

STALE = "- name: Stale\n  select: {sensor: wtr-n-1}\n  expr: stale(3)\n"


def _alerts(effects: list[AlertEvent | CommandEvent]) -> list[tuple[str, int]]:
    return [(e.state.value, e.ts_ms // MIN) for e in effects if isinstance(e, AlertEvent)]


def _power(m: int) -> float:
    return 0.0 if 2 <= m <= 7 else 900.0


def _flow(m: int) -> float:
    return 0.0 if 2 <= m <= 7 else 300.0


def _chunks(eng: RuleEngine, order: list[tuple[str, range]]) -> list[AlertEvent | CommandEvent]:
    out: list[AlertEvent | CommandEvent] = []
    for sensor, minutes in order:
        for m in minutes:
            if sensor == "nrg-n-1":
                out += eng.process(batch(sensor, m * MIN, power=_power(m)), scope="group")
            else:
                out += eng.process(batch(sensor, m * MIN, flow=_flow(m)), scope="group")
    return out


def test_group_alert_from_interleaved_partitions_is_recorded_once() -> None:
    """Re-keyed input arrives as chunks of two origin partitions (substation, pump) out of
    event-time order; the outage goes pending, firing and resolved once each, in time order
    (before the fix the late pump chunk started the alert again 'in the past')."""
    eng = RuleEngine(ruleset(OUTAGE), REG)
    out = _chunks(
        eng,
        [
            ("nrg-n-1", range(6)),
            ("wtr-n-1", range(6)),
            ("nrg-n-1", range(6, 12)),
            ("wtr-n-1", range(6, 12)),
        ],
    )
    got = _alerts(out)
    assert [s for s, _ in got] == ["pending", "firing", "resolved"]
    assert [t for _, t in got] == sorted(t for _, t in got)


def test_in_order_group_input_is_unchanged() -> None:
    """The same readings in event-time order give the textbook sequence at the right times."""
    eng = RuleEngine(ruleset(OUTAGE), REG)
    order = [(s, range(m, m + 1)) for m in range(12) for s in ("nrg-n-1", "wtr-n-1")]
    assert _alerts(_chunks(eng, order)) == [("pending", 2), ("firing", 4), ("resolved", 8)]


def test_reading_older_than_a_staleness_alert_does_not_resolve_it_in_the_past() -> None:
    """A tick ahead of the sensor's event time fires stale(3); a reading stamped before that
    tick is stored but does not resolve the alert at an earlier time; the next evaluation at or
    after the firing time resolves it."""
    eng = RuleEngine(ruleset(STALE), REG)
    assert eng.process(batch("wtr-n-1", 0, pressure=3)) == []
    fired = _alerts(eng.advance(10 * MIN))
    assert fired == [("firing", 10)]
    assert _alerts(eng.process(batch("wtr-n-1", 9 * MIN, pressure=3))) == []
    resolved = [e for e in eng.advance(10 * MIN + 1) if isinstance(e, AlertEvent)]
    assert [(e.state, e.ts_ms) for e in resolved] == [(AlertState.RESOLVED, 10 * MIN + 1)]


def test_ended_alert_floor_survives_a_snapshot() -> None:
    """After a restore a late reading still cannot restart an alert before it ended."""
    eng = RuleEngine(ruleset(OUTAGE), REG)
    _chunks(eng, [("nrg-n-1", range(6)), ("wtr-n-1", range(6)), ("nrg-n-1", range(6, 12))])
    blob = eng.snapshot()
    again = RuleEngine(ruleset(OUTAGE), REG)
    again.restore(blob)
    assert again.snapshot() == blob
    assert _alerts(_chunks(again, [("wtr-n-1", range(6, 12))])) == []
