"""Group functions reuse each member's value while it holds: same results as a full re-scan."""

from __future__ import annotations

import gc
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from deploy.simulator import generate_registry
from rules import compile_expr
from rules._expr import Ctx, SensorState, Series, Value, _GroupMemo

MIN = 60_000
T0 = 1_780_000_000_000

EXPRESSIONS = [
    ("avg", "avg(pressure, 10m)"),
    ("min", "delta(pressure, 5m)"),
    ("max", "rate(pressure, 3m)"),
    ("sum", "percentile(pressure, 90, 4m) + min(pressure, 2m)"),
    ("count", "pressure > 5"),
    ("count", "stale(2)"),
    ("any", "age(pressure) > 90"),
    ("all", "abs(last(pressure) - max(pressure, 1m)) < 3"),
    ("avg", "clamp(count(pressure, 6m), 1, 4)"),
]
COMBINE: dict[str, Callable[[list[Value]], Value]] = {
    "avg": lambda v: sum(v) / len(v) if v else None,  # type: ignore[arg-type]
    "min": lambda v: min(v) if v else None,  # type: ignore[type-var]
    "max": lambda v: max(v) if v else None,  # type: ignore[type-var]
    "sum": lambda v: sum(v) if v else None,  # type: ignore[arg-type]
    "count": lambda v: float(sum(1 for x in v if x is not False)),
    "any": lambda v: any(v) if v else None,
    "all": lambda v: all(v) if v else None,
}


def _rescan(kind: str, inner: str, water: list[SensorState], now: int) -> Value:
    """The group value computed from scratch: the inner expression on every member."""
    fn = compile_expr(inner, scope="sensor", want=None).fn
    vals: list[Value] = []
    for m in water:
        c = Ctx()
        c.now_ms, c.epoch_ms, c.sensor, c.series = now, T0, m.sensor, m.series
        c.last_seen_ms = m.last_seen_ms
        v = fn(c)
        if v is not None:
            vals.append(v)
    return COMBINE[kind](vals)


@pytest.mark.parametrize(("kind", "inner"), EXPRESSIONS)
def test_memoised_group_value_equals_a_fresh_rescan(kind: str, inner: str) -> None:
    """Random readings (some late) and random evaluation times, forwards and backwards: the
    long-lived group function always returns what a never-used copy computes from scratch."""
    registry = generate_registry(1, 6, seed=3)
    members = [SensorState(s) for s in registry]
    water = [m for m in members if "pressure" in m.sensor.metrics]
    assert len(water) >= 4
    seen: set[Value] = set()
    text = f"group.{kind}({inner}, silo=water)"
    live = compile_expr(text, scope="group", want=None).fn
    rnd = random.Random(text)
    now = T0
    for step in range(600):
        if rnd.random() < 0.6:
            m = rnd.choice(water)
            ts = now - (rnd.randrange(0, 8 * MIN) if rnd.random() < 0.2 else 0)
            m.series.setdefault("pressure", Series()).add(ts, round(rnd.uniform(0, 10), 2))
            if m.last_seen_ms is None or ts > m.last_seen_ms:
                m.last_seen_ms = ts
            m.touch()
        now += rnd.choice([0, 1, 500, 7_000, 30_000, 61_000])
        at = now - rnd.randrange(0, 5 * MIN) if rnd.random() < 0.2 else now
        c = Ctx()
        c.now_ms, c.epoch_ms, c.members = at, T0, members
        got = live(c)
        assert got == _rescan(kind, inner, water, at), (step, at - T0)
        seen.add(got)
    assert len(seen) >= 2  # the data made the value change


def test_group_bookkeeping_follows_members_not_readings() -> None:
    """A new reading rarely moves the end of a member's window (its oldest point does): the
    group function keeps about one timer per member however many readings pass within a
    window. It once kept one per reading for the window's length: ~450,000 entries after 4
    minutes of a 10,000-sensor city, hundreds of MB in the benchmark's rule worker."""
    registry = generate_registry(1, 6, seed=3)
    members = [SensorState(s) for s in registry]
    water = [m for m in members if "pressure" in m.sensor.metrics]
    inner = "avg(pressure, 10m)"
    live = compile_expr(f"group.avg({inner}, silo=water)", scope="group", want=None).fn
    now = T0
    for step in range(3000):  # 5 minutes: every point stays in the 10-minute windows
        m = water[step % len(water)]
        now += 100
        m.series.setdefault("pressure", Series()).add(now, float(step % 7))
        m.last_seen_ms = now
        m.touch()
        c = Ctx()
        c.now_ms, c.epoch_ms, c.members = now, T0, members
        assert live(c) == _rescan("avg", inner, water, now)
    (memo,) = [o for o in gc.get_objects() if isinstance(o, _GroupMemo) and o.members is members]
    assert len(memo.sel) == len(water)
    assert len(memo.heap) <= 2 * len(water)


def test_engines_of_one_rule_set_share_the_index_but_not_the_state() -> None:
    """The runtime's per-partition engines build the rule index once; their states (and group
    memos) stay separate: a reading in one engine does not show in another's group value."""
    from citypulse.events import Reading, ReadingBatch
    from rules import RuleEngine, load_rules

    registry = generate_registry(1, 3, seed=3)
    ruleset = load_rules(Path(__file__).parents[2] / "rules" / "examples", registry)
    a, b = RuleEngine(ruleset, registry), RuleEngine(ruleset, registry)
    assert a._index is b._index
    sensor = next(s for s in registry if "pressure" in s.metrics)
    batch = ReadingBatch(
        sensor=sensor.id,
        vendor=sensor.vendor,
        received_ms=T0,
        source="t",
        readings=[Reading(ts_ms=T0, metric="pressure", value=1.0, unit="bar")],
    )
    a.process(batch)
    assert list(a._states[sensor.id].series["pressure"].ts) == [T0]
    assert "pressure" not in b._states[sensor.id].series
