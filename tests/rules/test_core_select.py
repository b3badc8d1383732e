"""Selector lookups: the engine's index finds exactly the sensors a full scan would."""

from __future__ import annotations

import random
from typing import Any

from citypulse.registry import Registry
from deploy.simulator import generate_registry
from rules._model import Selector
from rules._select import HANDLED, SensorLookup


def _scan(registry: Registry, select: Selector, metrics: frozenset[str]) -> list[str]:
    return [s.id for s in registry if select.matches(s) and metrics <= s.metrics.keys()]


def _pick(rnd: random.Random, values: list[str]) -> Any:
    # One value, a list of several, or a value no sensor has.
    roll = rnd.random()
    if roll < 0.1:
        return "nowhere"
    if roll < 0.6:
        return rnd.choice(values)
    return rnd.sample(values, min(len(values), rnd.randint(2, 3)))


def test_lookup_matches_a_full_scan_for_random_selectors() -> None:
    registry = generate_registry(3, 4, seed=7)
    sensors = list(registry)
    fields = {
        "silo": sorted({str(s.silo) for s in sensors}),
        "district": sorted({s.district for s in sensors}),
        "asset": sorted({s.asset for s in sensors}),
        "vendor": sorted({s.vendor for s in sensors}),
        "sensor": [s.id for s in sensors],
        "metric": sorted({m for s in sensors for m in s.metrics}),
    }
    kinds = sorted({s.labels["kind"] for s in sensors if "kind" in s.labels})
    assert len(kinds) > 1
    assert any(s.actuator for s in sensors)
    lookup = SensorLookup(registry)
    rnd = random.Random(3)
    nonempty = 0
    for _ in range(600):
        spec: dict[str, Any] = {
            f: _pick(rnd, values) for f, values in fields.items() if rnd.random() < 0.3
        }
        if rnd.random() < 0.3:
            spec["labels"] = {"kind": _pick(rnd, kinds)}
        if rnd.random() < 0.2:
            spec["actuator"] = rnd.random() < 0.5
        select = Selector.model_validate(spec)
        metrics = frozenset(rnd.sample(fields["metric"], rnd.randint(0, 2)))
        want = _scan(registry, select, metrics)
        assert [s.id for s in lookup.matching(select, metrics)] == want, (spec, metrics)
        nonempty += bool(want)
    assert nonempty > 100  # the draws matched something often enough to mean anything


def test_every_selector_field_is_looked_up() -> None:
    # A field added to Selector but not to the lookup would be ignored by the engine's index.
    assert set(Selector.model_fields) == HANDLED


def test_lookup_is_rebuilt_for_a_new_registry() -> None:
    a = generate_registry(1, 2, seed=1)
    b = generate_registry(2, 2, seed=1)
    assert SensorLookup.of(a) is SensorLookup.of(a)
    every = Selector()
    assert len(SensorLookup.of(b).matching(every)) == len(b)
    assert len(SensorLookup.of(a).matching(every)) == len(a)
