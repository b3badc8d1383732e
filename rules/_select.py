"""The sensors a selector matches, found through per-field lookups of the registry.

Matching every rule against every sensor costs rules x sensors checks: 2 M for the bench
city (200 rules, 10,000 sensors), seconds of a rule worker's start-up, paid again at every
rule reload. A rule selects by fields (silo, district, sensor ids, labels, metrics), so its
sensors are the intersection of those fields' lookups; only ``actuator`` is checked per sensor.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from citypulse.registry import Registry, Sensor
from rules._model import Selector, values_of

K = TypeVar("K")
_FIELDS = ("sensor", "asset", "district", "silo", "vendor")
HANDLED = frozenset((*_FIELDS, "metric", "labels", "actuator"))
"""The :class:`Selector` fields :meth:`SensorLookup.matching` knows (a test holds it to all)."""


def _union(table: dict[K, set[int]], keys: Iterable[K]) -> set[int]:
    return set().union(*(table.get(k, ()) for k in keys))


class SensorLookup:
    """Positions of a registry's sensors by field value, label and metric."""

    def __init__(self, registry: Registry) -> None:
        self.sensors: list[Sensor] = list(registry)
        self._by: dict[str, dict[str, set[int]]] = {f: {} for f in (*_FIELDS, "metric")}
        self._labels: dict[tuple[str, str], set[int]] = {}
        for i, s in enumerate(self.sensors):
            for f in _FIELDS:
                have = s.id if f == "sensor" else str(getattr(s, f))
                self._by[f].setdefault(have, set()).add(i)
            for m in s.metrics:
                self._by["metric"].setdefault(m, set()).add(i)
            for item in s.labels.items():
                self._labels.setdefault(item, set()).add(i)

    @classmethod
    def of(cls, registry: Registry) -> SensorLookup:
        """The lookup of ``registry``, built once for the last registry asked about (rule files
        are checked one by one against the same registry, then indexed by the engine)."""
        global _LAST
        if _LAST is None or _LAST[0] is not registry.sensors:
            _LAST = (registry.sensors, cls(registry))
        return _LAST[1]

    def matching(self, select: Selector, metrics: Iterable[str] = ()) -> list[Sensor]:
        """Sensors ``select`` matches that also have every one of ``metrics``, in registry
        order: ``[s for s in registry if select.matches(s) and metrics <= s.metrics.keys()]``.
        """
        found: list[set[int]] = []
        for f in _FIELDS:
            want = getattr(select, f)
            if want is not None:
                found.append(_union(self._by[f], values_of(want)))
        needed = set(metrics) | set([] if select.metric is None else values_of(select.metric))
        found += [self._by["metric"].get(m, set()) for m in needed]
        for key, want in select.labels.items():
            found.append(_union(self._labels, [(key, v) for v in values_of(want)]))
        if found:
            found.sort(key=len)
            hits = found[0].intersection(*found[1:])
            pool = [self.sensors[i] for i in sorted(hits)]
        else:
            pool = list(self.sensors)
        # The lookups are exact for every field but ``actuator``.
        if select.actuator is None:
            return pool
        return [s for s in pool if s.actuator == select.actuator]


_LAST: tuple[list[Sensor], SensorLookup] | None = None
