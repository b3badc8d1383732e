"""The rule engine: a pure, deterministic step function from readings and time to effects.

Nothing here reads the wall clock: ``process(batch)`` evaluates at the batch's event time and
``advance(now_ms)`` at the time the caller gives, so replaying the same inputs gives the same
alerts and commands, byte for byte.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import orjson

from citypulse.events import AlertEvent, AlertState, CommandEvent
from citypulse.registry import Registry, Sensor
from rules._expr import _NEVER_HI, _NEVER_LO, Ctx, SensorState, Series, render_value
from rules._load import Rule, RuleSet, group_member
from rules._model import group_value
from rules._select import SensorLookup

log = logging.getLogger("citypulse.rules")

SNAPSHOT_VERSION = 2
_MAGIC = b"CPE2"
EvalScope = Literal["sensor", "group", "all"]
GROUP_LATENESS_MS = 30_000
"""Group rules' metrics are kept this much longer than their windows: the runtime's group
stage gets a batch once per group key, and one key's batches can be evaluated after another
key's later ones were added (re-key records of several keys and origins interleave); within
this lag a member's value at the evaluation time is still there."""
Effect = AlertEvent | CommandEvent


class ReadingLike(Protocol):
    """What the engine reads of a reading (:class:`~citypulse.events.Reading` has it)."""

    @property
    def ts_ms(self) -> int: ...
    @property
    def metric(self) -> str: ...
    @property
    def value(self) -> float: ...


class BatchLike(Protocol):
    """What the engine reads of a batch: a :class:`~citypulse.events.ReadingBatch`, or a
    lighter record with the same fields (the runtime decodes Kafka records into one)."""

    @property
    def sensor(self) -> str: ...
    @property
    def readings(self) -> Sequence[ReadingLike]: ...


class _Alert:
    """Mutable state of one alert instance (one rule x one sensor or group value)."""

    __slots__ = (
        "active_since",
        "changed_ms",
        "keep_since",
        "labels",
        "last_event",
        "level_since",
        "severity",
        "state",
    )

    def __init__(self, levels: int, labels: dict[str, str]) -> None:
        self.state = AlertState.INACTIVE
        self.active_since: int | None = None
        # Event time of the latest state change: evaluations before it are ignored, so the
        # alert's timeline never goes backwards (see ``_evaluate``).
        self.changed_ms: int | None = None
        self.level_since: list[int | None] = [None] * levels
        self.severity = 0
        self.keep_since: int | None = None
        self.labels = labels
        self.last_event: AlertEvent | None = None

    def dump(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "active_since": self.active_since,
            "changed_ms": self.changed_ms,
            "level_since": self.level_since,
            "severity": self.severity,
            "keep_since": self.keep_since,
            "labels": self.labels,
            "last_event": None if self.last_event is None else self.last_event.model_dump(),
        }

    @classmethod
    def load(cls, d: dict[str, Any]) -> _Alert:
        a = cls(len(d["level_since"]), dict(d["labels"]))
        a.state = AlertState(d["state"])
        a.active_since = d["active_since"]
        # Absent in snapshots written before the field existed: the last event's time is it.
        a.changed_ms = d.get("changed_ms")
        a.level_since = list(d["level_since"])
        a.severity = d["severity"]
        a.keep_since = d["keep_since"]
        ev = d.get("last_event")
        a.last_event = None if ev is None else AlertEvent.model_validate(ev)
        if a.changed_ms is None and a.last_event is not None:
            a.changed_ms = a.last_event.ts_ms
        return a


@dataclass
class _CommandState:
    """Last command of one rule to one actuator setting."""

    last_value: float | None = None
    last_ts: int | None = None
    last_suppressed: str | None = None


class _Index:
    """Which rules a sensor's readings can affect, built once per rule set and registry."""

    def __init__(self, ruleset: RuleSet, registry: Registry) -> None:
        self.sensors: dict[str, Sensor] = registry.by_id()
        self.sensor_rules: dict[str, list[Rule]] = {}
        self.group_rules: dict[str, list[tuple[Rule, str]]] = {}
        # (sensor id, group key) -> the sensor's group rules of that one key (the runtime's
        # group stage gets a batch once per key, and evaluates only that key's rules).
        self.keyed_group_rules: dict[tuple[str, str], list[tuple[Rule, str]]] = {}
        self.members: dict[tuple[str, str], list[str]] = {}
        self.group_keys: dict[str, tuple[str, ...]] = {}
        # Per scope: metric -> how long its points are kept (the longest window reading it).
        self.retention_ms: dict[EvalScope, dict[str, int]] = {"sensor": {}, "group": {}, "all": {}}
        self.tick_sensor_rules: list[tuple[Rule, list[str]]] = []
        self.tick_group_rules: list[tuple[Rule, list[str]]] = []
        keys: dict[str, set[str]] = {}
        lookup = SensorLookup.of(registry)
        for rule in ruleset.rules:
            late = GROUP_LATENESS_MS if rule.scope == "group" else 0
            for keep in (self.retention_ms["all"], self.retention_ms[rule.scope]):
                for metric, window_s in rule.windows_s.items():
                    keep[metric] = max(keep.get(metric, 0), round(window_s * 1000) + late)
                if rule.action is not None:
                    keep.setdefault(rule.action.command.setting, 0)
            covered = lookup.matching(rule.select, rule.metrics)
            if rule.scope == "sensor":
                for s in covered:
                    self.sensor_rules.setdefault(s.id, []).append(rule)
                if rule.uses_stale:
                    self.tick_sensor_rules.append((rule, [s.id for s in covered]))
                continue
            assert rule.group_by is not None
            groups: list[str] = []
            comps = [lv.cond for lv in rule.levels]
            comps += [c for c in (rule.clear, rule.action_value) if c is not None]
            selectors = [sel for c in comps for sel in c.selectors]
            for s in lookup.matching(rule.select):
                g = group_value(s, rule.group_by)
                if g is None:
                    continue
                key = (rule.name, g)
                if key not in self.members:
                    self.members[key] = []
                    groups.append(g)
                self.members[key].append(s.id)
                # Only a sensor some group function reads can change the result: others
                # belong to the group (for targets) but do not trigger an evaluation.
                if not any(group_member(s, sel, metrics) for sel, metrics, _ in selectors):
                    continue
                self.group_rules.setdefault(s.id, []).append((rule, g))
                gkey = _group_key(rule, g)
                self.keyed_group_rules.setdefault((s.id, gkey), []).append((rule, g))
                keys.setdefault(s.id, set()).add(gkey)
            if rule.uses_stale:
                self.tick_group_rules.append((rule, groups))
        self.group_keys = {sid: tuple(sorted(k)) for sid, k in keys.items()}


_INDEXES: dict[tuple[int, int], tuple[RuleSet, Registry, _Index]] = {}


def _index_of(ruleset: RuleSet, registry: Registry) -> _Index:
    """The index of a rule set over a registry, shared by every engine built from the same two
    objects (the runtime has one engine per partition; building the index means matching
    every rule against every sensor, seconds for a city). The index is never mutated."""
    key = (id(ruleset), id(registry))
    hit = _INDEXES.get(key)
    # The entry holds both objects, so their ids cannot be reused while it is cached.
    if hit is not None and hit[0] is ruleset and hit[1] is registry:
        return hit[2]
    index = _Index(ruleset, registry)
    if len(_INDEXES) >= 4:  # a few rule versions at most (hot reloads replace the old one)
        _INDEXES.pop(next(iter(_INDEXES)))
    _INDEXES[key] = (ruleset, registry, index)
    return index


class RuleEngine:
    """Evaluates a :class:`RuleSet` over readings; keeps windows, timers and alert state.

    Args:
        ruleset: compiled rules (:func:`rules.load_rules`).
        registry: the sensor registry the rules select from.
        owns: which keys (sensor id, or ``"field=value"`` group key) this engine speaks for
            when time passes (:meth:`advance`); default all. The runtime runs one engine per
            partition, and only the partition a key hashes to sees its readings, so only
            that one ticks its staleness: the others would tick it for nothing.
        scope: the rules this engine evaluates (``"sensor"``, ``"group"`` or ``"all"``): it
            keeps windows only for the metrics those rules read, so the runtime's two stages
            do not both hold every window. :meth:`process` and :meth:`advance` default to it.
    """

    def __init__(
        self,
        ruleset: RuleSet,
        registry: Registry,
        owns: Callable[[str], bool] | None = None,
        scope: EvalScope = "all",
    ) -> None:
        self._scope: EvalScope = scope
        self._ruleset = ruleset
        self._registry = registry
        self._owns = owns
        self._index = _index_of(ruleset, registry)
        self._own_ticks()
        self._states: dict[str, SensorState] = {s.id: SensorState(s) for s in registry}
        self._member_states: dict[tuple[str, str], list[SensorState]] = {}
        self._alerts: dict[tuple[str, str], _Alert] = {}
        # (rule, key) -> event time an alert instance last ended (resolved or dropped while
        # pending): a late reading must not start that alert again in its past.
        self._ended: dict[tuple[str, str], int] = {}
        self._commands: dict[tuple[str, str, str], _CommandState] = {}
        # Group rules with an evaluation interval: (rule, group value) -> (end of the
        # interval, event time of the evaluation due: the group's latest reading in it).
        self._pending: dict[tuple[str, str], tuple[int, int]] = {}
        # (sensor rule using stale(), sensor) -> event time until which its last evaluation
        # stays "nothing to do" (the expression's validity interval): ticks skip it until
        # then. A reading of the sensor re-evaluates it; not part of the snapshot.
        self._quiet: dict[tuple[str, str], float] = {}
        self._unhealthy: dict[str, str] = {}
        self._epoch_ms: int | None = None
        self._ctx = Ctx()
        self._link_members()

    # -- public API ----------------------------------------------------------------------------

    @property
    def ruleset(self) -> RuleSet:
        return self._ruleset

    def process(
        self, batch: BatchLike, scope: EvalScope | None = None, key: str | None = None
    ) -> list[Effect]:
        """Add a batch's readings to the windows and evaluate the rules they can affect.

        A group rule with an evaluation interval is not evaluated here but marked due: it is
        evaluated once per interval of event time, as of its group's latest reading in that
        interval, when the group's first reading past the interval's end arrives (before that
        reading counts) or time passes the end (:meth:`advance`). It depends on the order of
        the group's own readings only, not on other groups' or on how the input was cut.

        Args:
            batch: readings of one sensor; evaluation time is its latest reading's event time.
            scope: ``"sensor"`` evaluates only per-sensor rules, ``"group"`` only group rules
                (the runtime's two stages), ``"all"`` both; default the engine's scope, and
                never wider (its windows hold only its rules' metrics).
            key: only the group rules of this group key (``"district=north"``); default all
                the sensor's groups.

        Returns:
            Alert state changes and commands, in a deterministic order.
        """
        scope = self._within(scope)
        st = self._states.get(batch.sensor)
        if st is None or not batch.readings:
            return []
        now = max(r.ts_ms for r in batch.readings)
        out: list[Effect] = []
        groups: Sequence[tuple[Rule, str]] = ()
        if scope != "sensor":
            index = self._index
            sid = st.sensor.id
            groups = (
                index.group_rules.get(sid, ())
                if key is None
                else index.keyed_group_rules.get((sid, key), ())
            )
            if groups and self._pending:
                self._flush(groups, now, out)  # before this reading counts
        retention = self._index.retention_ms[self._scope]
        touched: set[str] = set()
        for r in batch.readings:
            keep = retention.get(r.metric)
            if keep is None:
                continue  # no rule reads it: keep nothing
            series = st.series.get(r.metric)
            if series is None:
                series = st.series[r.metric] = Series()
            series.add(r.ts_ms, r.value)
            touched.add(r.metric)
        for metric in touched:
            st.series[metric].trim(now - retention[metric])
        st.touch()  # group functions recompute this member's values
        self._clock(now)
        if st.last_seen_ms is None or now > st.last_seen_ms:
            st.last_seen_ms = now
        if scope != "group":
            for rule in self._index.sensor_rules.get(st.sensor.id, ()):
                if rule.uses_stale or not rule.metrics or not rule.metrics.isdisjoint(touched):
                    self._eval_sensor(rule, st, now, out)
        for rule, g in groups:
            if rule.uses_stale or not touched.isdisjoint(rule.windows_s):
                if rule.interval_ms:
                    self._defer(rule, g, now)
                else:
                    self._eval_group(rule, g, now, out)
        return out

    def advance(self, now_ms: int, scope: EvalScope | None = None) -> list[Effect]:
        """Let time pass to ``now_ms`` (epoch ms): staleness, ``for`` and ``keep_firing_for``.

        Re-evaluates every pending or firing alert and every rule that uses ``stale()`` (of
        the keys this engine owns, and of ``scope`` as in :meth:`process`).
        """
        out: list[Effect] = []
        for _ in self.advancing(now_ms, out, scope):
            pass
        return out

    def advancing(
        self, now_ms: int, out: list[Effect], scope: EvalScope | None = None
    ) -> Iterator[None]:
        """:meth:`advance` one evaluation at a time: appends effects to ``out`` and yields
        after each evaluation, so a caller can pause between them (the runtime lets other work
        run while a tick goes through thousands of groups). The engine must not be used
        otherwise until the iterator is exhausted.
        """
        scope = self._within(scope)
        self._clock(now_ms)
        if scope != "sensor" and self._pending:
            due = sorted((end, k) for k, (end, _) in self._pending.items() if end <= now_ms)
            by_name = self._ruleset.by_name
            for _, (name, g) in due:
                ts = self._pending.pop((name, g))[1]
                self._eval_group(by_name[name], g, ts, out)
                yield
        done: set[tuple[str, str]] = set()
        if scope != "group":
            quiet, states = self._quiet, self._states
            for rule, sensor_ids in self._tick_sensor:
                name = rule.name
                for sid in sensor_ids:
                    if quiet.get((name, sid), _NEVER_LO) <= now_ms:
                        self._eval_sensor(rule, states[sid], now_ms, out)
                        yield
        if scope != "sensor":
            for rule, groups in self._tick_group:
                for g in groups:
                    done.add((rule.name, _group_key(rule, g)))
                    self._eval_group(rule, g, now_ms, out)
                    yield
        by_name = self._ruleset.by_name
        owns = self._owns
        for key in sorted(self._alerts):
            if key in done:
                continue
            rule = by_name[key[0]]
            if rule.scope == "sensor" and rule.uses_stale and (owns is None or owns(key[1])):
                continue  # a tick rule of a sensor this engine ticks: evaluated above
            if rule.scope == "sensor":
                self._eval_sensor(rule, self._states[key[1]], now_ms, out)
            else:
                self._eval_group(rule, key[1].partition("=")[2], now_ms, out)
            yield

    def _within(self, scope: EvalScope | None) -> EvalScope:
        if scope is None:
            return self._scope
        if self._scope != "all" and scope != self._scope:
            raise ValueError(f"a {self._scope!r} engine cannot evaluate scope {scope!r}")
        return scope

    def group_keys(self, batch: BatchLike) -> tuple[str, ...]:
        """The group keys (``"district=north"``: group_by field and value) whose group rules
        need this batch, sorted."""
        return self._index.group_keys.get(batch.sensor, ())

    def unhealthy(self) -> dict[str, str]:
        """Rules whose evaluation failed: rule name -> last error. They keep being evaluated."""
        return dict(self._unhealthy)

    def active_alerts(self) -> list[AlertEvent]:
        """The latest event of every pending or firing alert (e.g. to re-send to Alertmanager)."""
        return [
            a.last_event
            for _, a in sorted(self._alerts.items())
            if a.last_event is not None and a.state in (AlertState.PENDING, AlertState.FIRING)
        ]

    def replace_rules(self, ruleset: RuleSet, registry: Registry | None = None) -> None:
        """Hot reload: swap the rules (and optionally the registry).

        Alerts and command state of rules whose name and definition (digest) are unchanged
        are kept; those of changed or removed rules are dropped. Windows are kept.
        """
        old = self._ruleset.by_name
        keep = {r.name for r in ruleset.rules if r.name in old and old[r.name].digest == r.digest}
        if registry is not None and registry is not self._registry:
            self._registry = registry
            states = {}
            for s in registry:
                st = self._states.get(s.id) or SensorState(s)
                st.sensor = s
                st.touch()
                states[s.id] = st
            self._states = states
        self._ruleset = ruleset
        self._index = _index_of(ruleset, self._registry)
        self._own_ticks()
        self._link_members()
        self._quiet = {}  # rules, registry or state changed: evaluate anew
        self._alerts = {k: v for k, v in self._alerts.items() if k[0] in keep}
        self._ended = {k: v for k, v in self._ended.items() if k[0] in keep}
        self._alerts = {
            k: v
            for k, v in self._alerts.items()
            if ruleset.by_name[k[0]].scope == "group" or k[1] in self._states
        }
        self._ended = {
            k: v
            for k, v in self._ended.items()
            if ruleset.by_name[k[0]].scope == "group" or k[1] in self._states
        }
        self._commands = {k: v for k, v in self._commands.items() if k[0] in keep}
        self._schedule({k: p[1] for k, p in self._pending.items() if k[0] in keep})
        self._unhealthy = {k: v for k, v in self._unhealthy.items() if k in keep}

    def snapshot(self) -> bytes:
        """The full state as versioned bytes (same state -> same bytes).

        ``CPE2``, the length of a JSON header (4 bytes, little-endian), the header, then every
        series' points as raw little-endian arrays in the header's order: copying arrays costs
        a few ms per 10 MB where encoding the numbers as JSON text cost 10x that, and the
        worker takes snapshots on its event loop (the alert path).
        """
        data: list[bytes] = []
        series = [
            [sid, m, *s.dump(data)]
            for sid, st in self._states.items()
            for m, s in st.series.items()
            if s.ts
        ]
        by_name = self._ruleset.by_name
        doc = {
            "v": SNAPSHOT_VERSION,
            "epoch_ms": self._epoch_ms,
            "seen": {
                sid: st.last_seen_ms
                for sid, st in self._states.items()
                if st.last_seen_ms is not None
            },
            "series": series,
            "alerts": [
                {"rule": k[0], "key": k[1], "digest": by_name[k[0]].digest, **a.dump()}
                for k, a in sorted(self._alerts.items())
            ],
            "ended": [
                {"rule": k[0], "key": k[1], "digest": by_name[k[0]].digest, "ts_ms": ts}
                for k, ts in sorted(self._ended.items())
            ],
            "commands": [
                {"rule": k[0], "sensor": k[1], "setting": k[2], "digest": by_name[k[0]].digest}
                | {"last_value": c.last_value, "last_ts": c.last_ts}
                | {"last_suppressed": c.last_suppressed}
                for k, c in sorted(self._commands.items())
            ],
            "pending": [
                {"rule": k[0], "group": k[1], "digest": by_name[k[0]].digest, "ts_ms": p[1]}
                for k, p in sorted(self._pending.items())
            ],
            "unhealthy": self._unhealthy,
        }
        head = orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)
        return b"".join((_MAGIC, len(head).to_bytes(4, "little"), head, *data))

    def restore(self, blob: bytes) -> None:
        """Replace the state with a :meth:`snapshot` (or a version 1 snapshot: JSON only).

        State of sensors no longer in the registry and of rules that changed is dropped.

        Raises:
            RuleStateError: the blob is not a snapshot this version understands.
        """
        keep = self._index.retention_ms[self._scope]  # the metrics this engine's rules read
        try:
            states = {s.id: SensorState(s) for s in self._registry}
            if blob[:4] == _MAGIC:
                size = int.from_bytes(blob[4:8], "little")
                doc = _versioned(orjson.loads(blob[8 : 8 + size]), SNAPSHOT_VERSION)
                data, pos = memoryview(blob), 8 + size
                for sid, seen in doc["seen"].items():
                    if sid in states:
                        states[sid].last_seen_ms = int(seen)
                for sid, metric, *head in doc["series"]:
                    series, pos = Series.load(head, data, pos)
                    if sid in states and metric in keep:
                        states[sid].series[metric] = series
            else:
                doc = _versioned(orjson.loads(blob), 1)
                for sid, d in doc["sensors"].items():
                    st = states.get(sid)
                    if st is None:
                        continue
                    st.last_seen_ms = d["last_seen_ms"]
                    for metric, (ts, vals) in d["series"].items():
                        if metric not in keep:
                            continue
                        series = Series()
                        series.restore([int(t) for t in ts], [float(v) for v in vals], 0.0, 0)
                        st.series[metric] = series
            by_name = self._ruleset.by_name
            alerts: dict[tuple[str, str], _Alert] = {}
            for d in doc["alerts"]:
                rule = by_name.get(d["rule"])
                if rule is None or rule.digest != d["digest"]:
                    continue
                if rule.scope == "sensor" and d["key"] not in states:
                    continue
                alerts[(d["rule"], d["key"])] = _Alert.load(d)
            ended: dict[tuple[str, str], int] = {}
            for d in doc.get("ended", ()):  # absent in older snapshots
                rule = by_name.get(d["rule"])
                if rule is None or rule.digest != d["digest"]:
                    continue
                if rule.scope == "sensor" and d["key"] not in states:
                    continue
                ended[(d["rule"], d["key"])] = int(d["ts_ms"])
            pending: dict[tuple[str, str], int] = {}
            for d in doc.get("pending", ()):  # absent in older snapshots
                rule = by_name.get(d["rule"])
                if rule is not None and rule.digest == d["digest"]:
                    pending[(d["rule"], str(d["group"]))] = int(d["ts_ms"])
            commands: dict[tuple[str, str, str], _CommandState] = {}
            for d in doc["commands"]:
                rule = by_name.get(d["rule"])
                if rule is None or rule.digest != d["digest"]:
                    continue
                commands[(d["rule"], d["sensor"], d["setting"])] = _CommandState(
                    d["last_value"], d["last_ts"], d["last_suppressed"]
                )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise RuleStateError(f"bad snapshot: {exc!r}") from exc
        self._states = states
        self._link_members()
        self._quiet = {}  # rules, registry or state changed: evaluate anew
        self._alerts = alerts
        self._ended = ended
        self._commands = commands
        self._schedule(pending)
        self._epoch_ms = doc["epoch_ms"]
        self._unhealthy = {k: v for k, v in doc["unhealthy"].items() if k in by_name}

    # -- evaluation ----------------------------------------------------------------------------

    def _clock(self, now_ms: int) -> None:
        if self._epoch_ms is None:
            self._epoch_ms = now_ms
        self._ctx.epoch_ms = self._epoch_ms

    def _own_ticks(self) -> None:
        """The index's tick lists cut to the keys this engine owns."""
        owns, index = self._owns, self._index
        if owns is None:
            self._tick_sensor = index.tick_sensor_rules
            self._tick_group = index.tick_group_rules
            return
        self._tick_sensor = [
            (rule, [sid for sid in sids if owns(sid)]) for rule, sids in index.tick_sensor_rules
        ]
        self._tick_group = [
            (rule, [g for g in groups if owns(_group_key(rule, g))])
            for rule, groups in index.tick_group_rules
        ]

    def _link_members(self) -> None:
        # New member lists get new group memos, which register themselves as watchers.
        for st in self._states.values():
            st.watchers.clear()
        self._member_states = {
            key: [self._states[sid] for sid in sids] for key, sids in self._index.members.items()
        }

    def _defer(self, rule: Rule, g: str, now: int) -> None:
        """Mark a group rule with an interval due at the end of ``now``'s interval."""
        k = (rule.name, g)
        p = self._pending.get(k)
        if p is None:
            self._pending[k] = ((now // rule.interval_ms + 1) * rule.interval_ms, now)
        elif now > p[1]:
            self._pending[k] = (p[0], now)

    def _flush(self, groups: Sequence[tuple[Rule, str]], now: int, out: list[Effect]) -> None:
        """Evaluate the deferred rules of these groups whose interval ended at or before
        ``now``."""
        pending = self._pending
        for rule, g in groups:
            p = pending.get((rule.name, g))
            if p is not None and p[0] <= now:
                del pending[(rule.name, g)]
                self._eval_group(rule, g, p[1], out)

    def _schedule(self, pending: dict[tuple[str, str], int]) -> None:
        """Take deferred evaluations (restored, or kept over a reload) under the current rules."""
        by_name = self._ruleset.by_name
        self._pending = {}
        for (name, g), ts in sorted(pending.items()):
            rule = by_name.get(name)
            if rule is not None and rule.scope == "group":
                step = rule.interval_ms or 1  # interval removed: due at the next reading
                self._pending[(name, g)] = ((ts // step + 1) * step, ts)

    def _eval_sensor(self, rule: Rule, st: SensorState, now: int, out: list[Effect]) -> None:
        c = self._ctx
        c.now_ms, c.sensor, c.series, c.last_seen_ms = now, st.sensor, st.series, st.last_seen_ms
        c.members = ()
        if not rule.uses_stale:
            self._evaluate(rule, st.sensor.id, now, out)
            return
        c.lo_ms, c.hi_ms = _NEVER_LO, _NEVER_HI
        if self._evaluate(rule, st.sensor.id, now, out):
            self._quiet[(rule.name, st.sensor.id)] = c.hi_ms
        else:
            self._quiet.pop((rule.name, st.sensor.id), None)

    def _eval_group(self, rule: Rule, g: str, now: int, out: list[Effect]) -> None:
        c = self._ctx
        c.now_ms, c.sensor, c.series, c.last_seen_ms = now, None, {}, None
        c.members = self._member_states.get((rule.name, g), ())
        self._evaluate(rule, _group_key(rule, g), now, out)

    def _evaluate(self, rule: Rule, key: str, now: int, out: list[Effect]) -> bool:
        """Evaluate one rule for one key at ``now``; True when it was evaluated and there is
        no alert (the common case: nothing changed, nothing to remember)."""
        c = self._ctx
        c.record = None
        alert = self._alerts.get((rule.name, key))
        floor = self._ended.get((rule.name, key)) if alert is None else alert.changed_ms
        if floor is not None and now < floor:
            # Late data (re-keyed group input interleaved from several partitions, a tick
            # ahead of a sensor's backfill, vendor clock skew): the readings are already in the
            # windows and count at the alert's next evaluation, but the alert is not evaluated
            # at a time before its latest state change, so its timeline never goes backwards
            # and a transition is never recorded twice at two different times.
            return False
        try:
            conds = [lv.cond.fn(c) is True for lv in rule.levels]
            if alert is None:
                if not any(conds):
                    return True  # the common case: nothing to do, nothing allocated
                alert = _Alert(len(rule.levels), self._labels(rule, key))
                self._alerts[(rule.name, key)] = alert
            clear = None
            if rule.clear is not None and alert.state is AlertState.FIRING:
                clear = rule.clear.fn(c) is True
            before = alert.state
            changed = _step(rule, alert, conds, clear, now)
            if changed or alert.state is not before:
                alert.changed_ms = now
            if changed and rule.action is None:
                out.append(self._event(rule, alert, now))
            if alert.state is AlertState.FIRING and rule.action is not None:
                self._act(rule, key, now, out)
            if alert.state in (AlertState.INACTIVE, AlertState.RESOLVED):
                del self._alerts[(rule.name, key)]
                self._ended[(rule.name, key)] = now
        except Exception as exc:  # one broken rule must not stop the others
            msg = f"{type(exc).__name__}: {exc} (at {key})"
            if self._unhealthy.get(rule.name) != msg:
                log.warning(
                    "rule evaluation failed", extra={"rule": rule.name, "key": key, "error": msg}
                )
            self._unhealthy[rule.name] = msg
        finally:
            c.record = None
        return False

    def _labels(self, rule: Rule, key: str) -> dict[str, str]:
        labels = {"alertname": rule.name, **rule.labels}
        if rule.scope == "sensor":
            s = self._states[key].sensor
            labels.update(
                sensor=s.id, vendor=s.vendor, silo=str(s.silo), district=s.district, asset=s.asset
            )
        else:
            field, _, value = key.partition("=")
            labels[field.removeprefix("labels.")] = value
        # Sorted, so events are byte-identical after a snapshot round trip.
        return dict(sorted(labels.items()))

    def _event(self, rule: Rule, alert: _Alert, now: int) -> AlertEvent:
        c = self._ctx
        values: dict[str, float] = {}
        c.record = values
        for lv in rule.levels:
            lv.cond.fn(c)
        if rule.clear is not None:
            rule.clear.fn(c)
        c.record = None
        severity = rule.levels[alert.severity].name
        annotations = {
            k: self._render(parts, rule, alert, severity) for k, parts in rule.annotations.items()
        }
        ev = AlertEvent(
            fingerprint=fingerprint(rule.name, alert.labels),
            rule=rule.name,
            rule_version=rule.version,
            group=rule.group,
            state=alert.state,
            severity=severity,
            labels=alert.labels,
            annotations=dict(sorted(annotations.items())),
            values={k: values[k] for k in sorted(values)},
            window_s=rule.window_s,
            active_since_ms=alert.active_since,
            ts_ms=now,
            evaluated_ms=now,
        )
        alert.last_event = ev
        return ev

    def _render(self, parts: Iterable[Any], rule: Rule, alert: _Alert, severity: str) -> str:
        out: list[str] = []
        for kind, text, comp in parts:
            if kind == "text":
                out.append(text)
            elif kind == "field":
                out.append(_field(text, rule, alert, severity))
            else:
                v = comp.fn(self._ctx)
                out.append(
                    "n/a"
                    if v is None
                    else str(v).lower()
                    if isinstance(v, bool)
                    else render_value(v)
                )
        return "".join(out)

    def _act(self, rule: Rule, key: str, now: int, out: list[Effect]) -> None:
        action = rule.action
        assert action is not None
        assert rule.action_value is not None
        raw = rule.action_value.fn(self._ctx)
        if raw is None or isinstance(raw, bool):
            return
        cmd = action.command
        if rule.scope == "sensor":
            targets = (
                [self._states[cmd.sensor or key].sensor]
                if (cmd.sensor or key) in self._states
                else []
            )
        else:
            field, _, g = key.partition("=")
            targets = [
                st.sensor
                for st in self._states.values()
                if st.sensor.actuator
                and group_value(st.sensor, field) == g
                and (cmd.sensor is None or st.sensor.id == cmd.sensor)
                and (cmd.select is None or cmd.select.matches(st.sensor))
            ]
        for target in targets:
            if not target.actuator:
                raise RuleEvalError(f"sensor {target.id} is not an actuator")
            ev = self._command(rule, target, float(raw), now)
            if ev is not None:
                out.append(ev)

    def _command(self, rule: Rule, target: Sensor, raw: float, now: int) -> CommandEvent | None:
        action = rule.action
        assert action is not None
        g = action.guardrails
        setting = action.command.setting
        cs = self._commands.setdefault((rule.name, target.id, setting), _CommandState())
        reported = self._states[target.id].series.get(setting)
        previous = reported.last(now) if reported is not None else None
        if previous is None:
            previous = cs.last_value
        value, reasons = raw, []
        lo, hi = g.min, g.max
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            if g.out_of_range == "refuse":
                return self._suppress(
                    rule,
                    target,
                    cs,
                    raw,
                    previous,
                    now,
                    f"out of range: {render_value(raw)} not in "
                    f"[{_bound(lo, '-inf')}, {_bound(hi, '+inf')}]",
                )
            value = min(
                max(value, lo if lo is not None else value), hi if hi is not None else value
            )
            reasons.append(f"clamped from {render_value(raw)}")
        if cs.last_ts is not None and now <= cs.last_ts:
            return None  # already commanded at this instant (several evaluations share a time)
        if previous is not None and value == previous:
            cs.last_suppressed = None
            return None  # already there: nothing to command
        cooldown_ms = round(g.cooldown.total_seconds() * 1000)
        if cooldown_ms and cs.last_ts is not None and now - cs.last_ts < cooldown_ms:
            wait_s = (cs.last_ts + cooldown_ms - now) / 1000
            return self._suppress(
                rule, target, cs, value, previous, now, f"cooldown: {render_value(wait_s)}s left"
            )
        if g.max_change_per_min is not None and previous is not None:
            # Without an earlier command there is no time base: allow one minute's change.
            minutes = 1.0 if cs.last_ts is None else max(0.0, (now - cs.last_ts) / 60000)
            step = g.max_change_per_min * minutes
            if abs(value - previous) > step:
                value = previous + step if value > previous else previous - step
                reasons.append(f"rate limited to {render_value(g.max_change_per_min)}/min")
                if value == previous:
                    return None
        cs.last_value, cs.last_ts, cs.last_suppressed = value, now, None
        return CommandEvent(
            command_id=_command_id(rule.name, target.id, setting, now),
            rule=rule.name,
            rule_version=rule.version,
            sensor=target.id,
            vendor=target.vendor,
            setting=setting,
            value=value,
            previous=previous,
            status="dry_run" if action.dry_run else "sent",
            reason="; ".join(reasons) or None,
            ts_ms=now,
        )

    def _suppress(
        self,
        rule: Rule,
        target: Sensor,
        cs: _CommandState,
        value: float,
        previous: float | None,
        now: int,
        reason: str,
    ) -> CommandEvent | None:
        # A suppression is reported once, not at every evaluation while it lasts.
        kind = reason.split(":")[0] + f"@{value!r}"
        if cs.last_suppressed == kind:
            return None
        cs.last_suppressed = kind
        assert rule.action is not None
        return CommandEvent(
            command_id=_command_id(rule.name, target.id, rule.action.command.setting, now),
            rule=rule.name,
            rule_version=rule.version,
            sensor=target.id,
            vendor=target.vendor,
            setting=rule.action.command.setting,
            value=value,
            previous=previous,
            status="suppressed",
            reason=reason,
            ts_ms=now,
        )


class RuleStateError(Exception):
    """A snapshot could not be restored."""


class RuleEvalError(Exception):
    """A rule failed at evaluation time (reported through :meth:`RuleEngine.unhealthy`)."""


def _versioned(doc: Any, version: int) -> dict[str, Any]:
    """``doc`` if it is a snapshot object of ``version``."""
    found = doc.get("v") if isinstance(doc, dict) else type(doc).__name__
    if found != version:
        raise RuleStateError(f"unsupported snapshot version {found!r}")
    return doc  # type: ignore[no-any-return]


def _step(rule: Rule, a: _Alert, conds: list[bool], clear: bool | None, now: int) -> bool:
    """Advance one alert's state machine; return whether an event is due."""
    for i, ok in enumerate(conds):
        if not ok:
            a.level_since[i] = None
        elif a.level_since[i] is None:
            a.level_since[i] = now
    qualified = [
        i
        for i, since in enumerate(a.level_since)
        if since is not None and now - since >= rule.levels[i].for_ms
    ]
    active = any(conds)
    state = a.state
    if state is AlertState.INACTIVE:
        if not active:
            return False
        a.active_since = now
        if qualified:
            a.state, a.severity = AlertState.FIRING, qualified[-1]
        else:
            a.state, a.severity = AlertState.PENDING, max(i for i, ok in enumerate(conds) if ok)
        return True
    if state is AlertState.PENDING:
        if not active:
            a.state = AlertState.INACTIVE
            return True
        if qualified:
            a.state, a.severity = AlertState.FIRING, qualified[-1]
            return True
        return False
    # FIRING
    resolve = clear if rule.clear is not None else not active
    if resolve:
        if rule.keep_firing_for_ms:
            if a.keep_since is None:
                a.keep_since = now
            resolve = now - a.keep_since >= rule.keep_firing_for_ms
    else:
        a.keep_since = None
    if resolve:
        a.state = AlertState.RESOLVED
        return True
    # Still firing: the highest level that held long enough; between the condition and the
    # clear condition (hysteresis band) the lowest level.
    severity = qualified[-1] if qualified else 0
    if a.keep_since is not None:
        severity = a.severity  # kept firing: keep the severity it had
    if severity != a.severity:
        a.severity = severity
        return True
    return False


def _group_key(rule: Rule, g: str) -> str:
    return f"{rule.group_by}={g}"


def _field(name: str, rule: Rule, alert: _Alert, severity: str) -> str:
    if name.startswith("labels."):
        return alert.labels.get(name.removeprefix("labels."), "")
    if name == "rule":
        return rule.name
    if name == "severity":
        return severity
    if name == "group_by":
        return rule.group_by or ""
    if name == "group":
        if rule.group_by is None:
            return ""
        return alert.labels.get(rule.group_by.removeprefix("labels."), "")
    return alert.labels.get(name, "") if rule.scope == "sensor" else ""


def _bound(v: float | None, missing: str) -> str:
    return missing if v is None else render_value(v)


def fingerprint(rule: str, labels: dict[str, str]) -> str:
    """Stable alert identity: hash of the rule name and the sorted alert labels (hex, 16)."""
    raw = orjson.dumps([rule, sorted(labels.items())])
    return hashlib.sha256(raw).hexdigest()[:16]


def _command_id(rule: str, sensor: str, setting: str, ts_ms: int) -> str:
    return hashlib.sha256(f"{rule}|{sensor}|{setting}|{ts_ms}".encode()).hexdigest()[:20]
