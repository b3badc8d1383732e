"""A rule group's ``interval``: its group rules are evaluated once per interval of event time,
as of the interval's latest reading, whatever the order of keys and the cuts of the input."""

from __future__ import annotations

from citypulse.events import AlertEvent, CommandEvent
from citypulse.registry import parse_registry
from rules import RuleEngine, RuleSet
from rules._load import parse_rules_text

from .test_core_engine import REG, REGISTRY_YAML, batch

S = 1000
RULES = """
groups:
  - name: districts
    interval: {interval}
    rules:
      - name: DistrictLow
        select: {{silo: water}}
        group_by: district
        expr: group.avg(pressure) < 2
      - name: SiloLow
        select: {{silo: water}}
        group_by: silo
        expr: group.avg(pressure) < 2
"""


def _rules(interval: str) -> RuleSet:
    rules, errors, _ = parse_rules_text(RULES.format(interval=interval), "g.yaml", REG)
    assert not errors, [str(e) for e in errors]
    return RuleSet(tuple(rules))


def _low(second: int) -> bool:
    return second in (3, 4) or 17 <= second <= 25


def _stream(seconds: int = 40) -> list[tuple[int, object]]:
    """Both north water sensors every second; the district is low for a 2-s blip at 3-4 s
    and from 17 s to 25 s."""
    out = []
    for sec in range(seconds):
        p = 1.0 if _low(sec) else 3.0
        out.append((sec, batch("wtr-n-1", sec * S, pressure=p)))
        out.append((sec, batch("wtr-n-2", sec * S + 1, pressure=p)))
    return out


def _timeline(effects: list[AlertEvent | CommandEvent], rule: str) -> list[tuple[str, int]]:
    return [
        (e.state.value, e.ts_ms) for e in effects if isinstance(e, AlertEvent) and e.rule == rule
    ]


def test_group_rule_with_interval_sees_each_interval_once_at_its_last_reading() -> None:
    """Every reading is evaluated without an interval; with 10 s, the 2-s blip inside the
    first interval is not seen, and each change is stamped with the latest reading of its
    interval and reported by the first reading past that interval."""
    every = RuleEngine(_rules("0s"), REG)
    assert _timeline([e for _, b in _stream() for e in every.process(b)], "DistrictLow") == [
        ("firing", 3 * S + 1),
        ("resolved", 5 * S),  # avg(3, 1) is no longer below 2
        ("firing", 17 * S + 1),
        ("resolved", 26 * S),
    ]
    engine = RuleEngine(_rules("10s"), REG)
    reported = {}
    for sec, b in _stream():
        for e in engine.process(b):
            if isinstance(e, AlertEvent) and e.rule == "DistrictLow":
                reported[(e.state.value, e.ts_ms)] = sec
    assert reported == {("firing", 19 * S + 1): 20, ("resolved", 29 * S + 1): 30}


def test_time_passing_the_interval_end_evaluates_it() -> None:
    """With no reading after the interval, ``advance`` past its end evaluates it (the
    runtime's ticks while a partition is idle); before the end nothing is evaluated."""
    engine = RuleEngine(_rules("10s"), REG)
    for _, b in _stream(20):
        engine.process(b)
    assert engine.advance(19_999) == []
    assert _timeline(engine.advance(20_000), "DistrictLow") == [("firing", 19 * S + 1)]
    assert engine.advance(40_000) == []  # evaluated once


def test_restored_or_reloaded_engine_evaluates_the_pending_interval() -> None:
    """An evaluation due at the end of an interval survives a snapshot and a hot reload of
    unchanged rules: the effects equal an uninterrupted engine's."""
    stream = [b for _, b in _stream()]
    whole = RuleEngine(_rules("10s"), REG)
    want = [e for b in stream for e in whole.process(b)]
    for cut in (5, 37, 40):  # mid-interval, and right after the last reading of one
        first = RuleEngine(_rules("10s"), REG)
        got = [e for b in stream[:cut] for e in first.process(b)]
        second = RuleEngine(_rules("10s"), REG)
        second.restore(first.snapshot())
        second.replace_rules(_rules("10s"))
        got += [e for b in stream[cut:] for e in second.process(b)]
        assert got == want, cut


def test_group_stage_partitions_raise_what_one_engine_does() -> None:
    """The runtime's group stage: each key's batches in the engine of the partition owning
    the key, evaluated for that key only, several batches of one key at a time (a re-key
    record per key and poll). For data in event-time order the alerts equal those of one
    engine over the whole stream, whether the keys have a partition each or share one."""
    registry = parse_registry(REGISTRY_YAML, "registry.yaml")
    rules = _rules("10s")
    one = RuleEngine(rules, registry)
    want = [e for _, b in _stream() for e in one.process(b)]
    assert {e.rule for e in want} == {"DistrictLow", "SiloLow"}
    stream = [b for _, b in _stream()]
    for shared in (False, True):
        engines: dict[str, RuleEngine] = {}
        got = []
        for start in range(0, len(stream), 7):  # records of 7 batches, keys one after another
            chunk = stream[start : start + 7]
            for key in ("silo=water", "district=north"):
                name = "all" if shared else key
                engine = engines.setdefault(name, RuleEngine(rules, registry, scope="group"))
                for b in chunk:
                    got += engine.process(b, key=key)
        assert sorted(got, key=_order) == sorted(want, key=_order), shared


def _order(e: AlertEvent | CommandEvent) -> tuple[int, str]:
    return (e.ts_ms, e.rule)
