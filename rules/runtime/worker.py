"""The rule worker: two consumer-group stages, per-partition engines, checkpoints, sinks.

Stage ``sensor`` consumes ``{prefix}.readings`` (keyed by sensor) in group ``{prefix}-rules``,
evaluates per-sensor rules and re-publishes each batch on ``{prefix}.rules-rekey`` once per
group key (``"district=north"``) the batch feeds, one record per poll and key. Stage ``group``
consumes the re-key topic in group ``{prefix}-rules-groups`` and evaluates the group rules,
whose state therefore lives with the group key's partition. Each input partition has its own
engine instance; its state is checkpointed to ``{prefix}.rules-state`` (see
:mod:`rules.runtime.changelog` and README.md).

The only wall-clock reader is the ticker (:meth:`_Stage.tick`): it calls ``engine.advance(now)``
so staleness and ``for`` timers progress when no reading arrives, and drives Alertmanager
re-sends. ``now`` is a per-partition event-time watermark (:func:`watermark_ms`), never the raw
wall clock: the wall clock only measures how long a partition has been idle. Everything else
runs on event time.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from citypulse.events import AlertEvent, AlertState, CommandEvent, ReadingBatch
from citypulse.registry import Registry, load_registry
from citypulse.service import HEALTH, settle_heap
from citypulse.settings import Settings
from citypulse.yamlsrc import YamlSourceError
from rules._model import group_value
from rules.runtime import metrics
from rules.runtime.alertmanager import AlertmanagerClient
from rules.runtime.changelog import (
    REKEY_TOPIC,
    STATE_MAX_BYTES,
    STATE_TOPIC,
    Snapshot,
    ensure_runtime_topics,
    read_snapshots,
)
from rules.runtime.errors import AlertmanagerError, RuntimeFault, SinkError
from rules.runtime.maintenance import Maintenance
from rules.runtime.sinks import MqttPublisher, Sinks
from rules.runtime.source import Loaded, RuleSource
from stream import ensure_topics, make_consumer, make_producer, partition_of

log = logging.getLogger("citypulse.rules.runtime")

Effect = AlertEvent | CommandEvent
StageName = Literal["sensor", "group"]


def wall_ms() -> int:
    """The wall clock, epoch ms. Only the ticker calls this (staleness, re-sends)."""
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """Tuning of a :class:`RuleWorker`; units in the names.

    Attributes:
        checkpoint_records: snapshot a partition after this many input records.
        checkpoint_s: ... or after this many seconds with unsnapshotted records.
        tick_s: how often the ticker advances engines to the wall clock; 0 = never (replay
            then depends on event time only, as in tests and backtests).
        resend_s: how often firing alerts are re-sent to Alertmanager.
        reload_poll_s: how often rule files are checked for changes; 0 = only on SIGHUP.
        max_poll_records: records fetched per poll, at most (bounds memory per step).
        sink_retry_s: how long a failing sink (database, Kafka, MQTT) is retried before the
            worker gives up and exits.
        session_timeout_ms: consumer-group session timeout: how soon the partitions of a
            crashed worker move to the others (heartbeats every third of it).
    """

    checkpoint_records: int = 20_000
    checkpoint_s: float = 30.0
    tick_s: float = 1.0
    resend_s: float = 60.0
    reload_poll_s: float = 1.0
    max_poll_records: int = 500
    sink_retry_s: float = 60.0
    session_timeout_ms: int = 10_000


@dataclass(slots=True)
class _Part:
    """One input partition's engine and bookkeeping (what a snapshot holds)."""

    partition: int
    engine: Any
    offset: int = -1
    clock_ms: int = 0
    """Event-time clock: the latest event time seen or ticked to (maintenance re-waking)."""
    event_ms: int | None = None
    """Latest event time of the records seen (restored: the snapshot's clock)."""
    event_wall_ms: int = 0
    """Wall clock when ``event_ms`` last advanced (how long the partition has been idle)."""
    tick_ms: int | None = None
    """The watermark of the last tick (ticks never go back)."""
    firing: dict[str, AlertEvent] = field(default_factory=dict)
    quiet: dict[str, tuple[AlertEvent, int]] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)
    dirty: int = 0
    last_checkpoint: float = field(default_factory=time.monotonic)


def watermark_ms(
    event_ms: int | None, event_wall_ms: int, wall_now_ms: int, previous_ms: int | None = None
) -> int | None:
    """The event time a tick advances a partition's engine to (epoch ms).

    The partition's event-time clock (latest event time seen) plus the wall time elapsed since
    that clock last advanced: while records flow, time is what they say (a backfill or a
    lagging vendor is not "silent"); only while the partition is idle does time pass, at wall
    speed. Never earlier than the previous tick.

    Args:
        event_ms: latest event time seen in the partition, epoch ms (``None``: none yet).
        event_wall_ms: wall clock when ``event_ms`` last advanced, epoch ms.
        wall_now_ms: the wall clock now, epoch ms.
        previous_ms: the watermark of the previous tick, if any.

    Returns:
        The watermark, or ``previous_ms`` when the partition has no event time yet.
    """
    if event_ms is None:
        return previous_ms
    now = event_ms + max(0, wall_now_ms - event_wall_ms)
    return now if previous_ms is None else max(previous_ms, now)


REKEY_MAX_BYTES = 256 * 1024
"""Batches of one poll for one group key share a re-key record up to this size (the default
Kafka message limit is 1 MiB)."""


SLICE_S = 0.002
"""Longest the group stage's evaluation (a poll of re-key records, a tick) holds the event loop
before it lets the sensor stage (the alert path) run. Counting batches instead (200) let a
group tick hold it ~40 ms once a second and a poll 30+ ms, in the tail of publish -> alert."""


class _Slices:
    """Gives the event loop back once ``SLICE_S`` of work has passed: ``if s.due(): await
    s.pause()`` between steps (a sync check, so a step costs no coroutine)."""

    __slots__ = ("_end", "paused_s")

    def __init__(self) -> None:
        self._end = time.perf_counter() + SLICE_S
        self.paused_s = 0.0
        """Seconds spent away (other tasks ran), to leave out of the work's own duration."""

    def due(self) -> bool:
        return time.perf_counter() >= self._end

    async def pause(self) -> None:
        before = time.perf_counter()
        await asyncio.sleep(0)
        after = time.perf_counter()
        self.paused_s += after - before
        self._end = after + SLICE_S


def rekey_value(key: str, partition: int, items: Sequence[tuple[int, bytes]]) -> bytes:
    """Value of a re-key record: the batches for group ``key`` from input ``partition``, each
    with its input offset and its JSON bytes as consumed, embedded as they are (valid JSON:
    they were decoded): no re-serialisation, and one record per poll and key, not per batch.
    """
    head = orjson.dumps({"v": 2, "key": key, "origin": partition})
    body = b",".join(b"[%d,%b]" % (offset, raw) for offset, raw in items)
    return b"".join((head[:-1], b',"batches":[', body, b"]}"))


def read_rekey(value: bytes) -> tuple[str, int, list[tuple[int, Any]]]:
    """``(key, origin partition, [(origin offset, decoded batch object), ...])`` of a re-key
    record: this version's, or one batch per record as written before it (``"v": 1``).

    Raises:
        orjson.JSONDecodeError, KeyError, TypeError, ValueError: not a re-key record.
    """
    env = orjson.loads(value)
    if type(env) is not dict:
        raise TypeError(f"a re-key record is a JSON object, not {type(env).__name__}")
    if env.get("v") == 1:
        partition, offset = env["origin"]
        return str(env["key"]), int(partition), [(int(offset), env["batch"])]
    return str(env["key"]), int(env["origin"]), [(int(o), b) for o, b in env["batches"]]


def _chunks(items: list[tuple[int, bytes]], limit: int) -> list[list[tuple[int, bytes]]]:
    """``items`` split in order into runs of at most ``limit`` bytes (one item at least)."""
    out: list[list[tuple[int, bytes]]] = [[]]
    size = 0
    for item in items:
        if out[-1] and size + len(item[1]) > limit:
            out.append([])
            size = 0
        out[-1].append(item)
        size += len(item[1])
    return out


class FastReading(NamedTuple):
    """The fields of a :class:`~citypulse.events.Reading` the engine reads."""

    ts_ms: int
    metric: str
    value: float


class FastBatch(NamedTuple):
    """The fields of a :class:`~citypulse.events.ReadingBatch` the engine reads."""

    sensor: str
    readings: tuple[FastReading, ...]


_BATCH_KEYS = frozenset({"v", "sensor", "vendor", "received_ms", "source", "readings"})
_READING_KEYS = frozenset({"ts_ms", "metric", "value", "unit"})
_READING_KEYS_Q = _READING_KEYS | {"quality"}


def decode_batch(obj: Any) -> FastBatch:
    """A decoded ``ReadingBatch`` JSON object (``orjson.loads``) as a :class:`FastBatch`.

    Accepts exactly what ``ReadingBatch.model_validate`` accepts: a well-formed object (the
    collectors' output) is checked field by field here, ~3x cheaper than pydantic; anything
    else goes through pydantic, which converts it or raises as before.

    Raises:
        pydantic.ValidationError: not a valid batch.
    """
    try:
        if type(obj) is dict and obj.keys() == _BATCH_KEYS and obj["v"] == 1:
            v, sensor, vendor = obj["v"], obj["sensor"], obj["vendor"]
            rs, rcv, src = obj["readings"], obj["received_ms"], obj["source"]
            ok = type(v) is int and type(sensor) is str and type(vendor) is str
            ok = ok and type(rcv) is int and type(src) is str and type(rs) is list
            if ok:
                out = []
                for r in rs:
                    if type(r) is not dict:
                        break
                    keys = r.keys()
                    if keys != _READING_KEYS and keys != _READING_KEYS_Q:
                        break
                    ts, metric, value = r["ts_ms"], r["metric"], r["value"]
                    if type(ts) is not int or type(metric) is not str or type(r["unit"]) is not str:
                        break
                    if type(r.get("quality", 0)) is not int:
                        break
                    if type(value) is float:
                        out.append(FastReading(ts, metric, value))
                    elif type(value) is int:
                        out.append(FastReading(ts, metric, float(value)))
                    else:
                        break
                else:
                    return FastBatch(sensor, tuple(out))
    except (TypeError, AttributeError):
        pass  # unhashable or odd values: pydantic says what is wrong
    b = ReadingBatch.model_validate(obj)
    return FastBatch(b.sensor, tuple(FastReading(r.ts_ms, r.metric, r.value) for r in b.readings))


def effect_key(effect: Effect, stage: str, ruleset: Any, registry: Registry) -> str | None:
    """The input key (sensor id, or ``"field=value"`` group key) an effect belongs to."""
    if stage == "sensor":
        if isinstance(effect, AlertEvent):
            return effect.labels.get("sensor")
        return effect.sensor
    rule = ruleset.by_name.get(effect.rule)
    if rule is None or rule.group_by is None:
        return None
    if isinstance(effect, AlertEvent):
        value = effect.labels.get(rule.group_by.removeprefix("labels."))
    else:
        target = registry.by_id().get(effect.sensor)
        value = group_value(target, rule.group_by) if target is not None else None
    return None if value is None else f"{rule.group_by}={value}"


def owned_effects(
    effects: Sequence[Effect],
    stage: str,
    partition: int,
    partitions: int,
    ruleset: Any,
    registry: Registry,
) -> list[Effect]:
    """Effects of time passing (``engine.advance``) that belong to ``partition``.

    Every partition's engine knows every sensor of the registry, so on a tick each would
    report, say, a silent sensor whose readings go to another partition (it never sees them).
    Only the partition the sensor (or group key) hashes to speaks for it.
    """
    out = []
    for e in effects:
        key = effect_key(e, stage, ruleset, registry)
        if key is not None and partition_of(key, partitions) == partition:
            out.append(e)
    return out


class _Stage(ConsumerRebalanceListener):  # type: ignore[misc]
    """One consumer-group stage with one engine per assigned partition."""

    def __init__(self, worker: RuleWorker, name: StageName, topic: str, group_id: str) -> None:
        self.w = worker
        self.name = name
        self.topic = topic
        self.group_id = group_id
        self.parts: dict[int, _Part] = {}
        self.lock = asyncio.Lock()
        self._inflight: asyncio.Task[None] | None = None
        self._rekeys: list[asyncio.Future[Any]] = []
        self.consumer: AIOKafkaConsumer | None = None
        self.running = False
        self.partitions = worker.settings.partitions
        self._evaluations = metrics.EVALUATIONS.labels(name)
        self._evaluation_s = metrics.EVALUATION_SECONDS.labels(name)
        self._readings = metrics.READINGS.labels(name)
        self._held = metrics.PARTITIONS.labels(name)

    # -- rebalance ----------------------------------------------------------------------------
    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        async with self.lock:
            mine = [self.parts[tp.partition] for tp in revoked if tp.partition in self.parts]
            await self._checkpoint(mine, force=True)
            for tp in revoked:
                self.parts.pop(tp.partition, None)
            self._held.set(len(self.parts))
            self.w.count_alerts()  # polls without effects no longer refresh the gauges
            gc.unfreeze()  # the dropped engines are cyclic: let the collector have them
        log.info("partitions revoked", extra={"stage": self.name, "partitions": len(revoked)})

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        assert self.consumer is not None
        async with self.lock:
            self.partitions = len(self.consumer.partitions_for_topic(self.topic) or ()) or (
                self.w.settings.partitions
            )
            new = [tp for tp in assigned if tp.partition not in self.parts]
            snaps = await read_snapshots(
                self.w.settings, (f"{self.name}:{tp.partition}" for tp in new)
            )
            for tp in new:
                engine = self.w.new_engine(self._owner(tp.partition), self.name)
                snap = snaps.get(f"{self.name}:{tp.partition}")
                part = _Part(tp.partition, engine)
                if snap is not None:
                    engine.restore(snap.engine)
                    part.offset = snap.offset
                    part.clock_ms = snap.clock_ms
                    if snap.clock_ms > 0:
                        # Idle time is counted from now: the worker was not watching before.
                        part.event_ms, part.event_wall_ms = snap.clock_ms, wall_ms()
                    part.firing = snap.firing
                    part.quiet = snap.quiet
                    part.seen = snap.seen
                    self.consumer.seek(tp, snap.offset)
                self.parts[tp.partition] = part
            self._held.set(len(self.parts))
            self.w.count_alerts()
            settle_heap()  # engines live until revocation: keep full collections off them
            log.info(
                "partitions assigned",
                extra={
                    "stage": self.name,
                    "partitions": [tp.partition for tp in new],
                    "restored": sorted(snaps),
                },
            )

    def _owner(self, partition: int) -> Callable[[str], bool]:
        """Whether a key (sensor id, group key) hashes to ``partition`` (see RuleEngine)."""
        partitions = self.partitions

        def owns(key: str) -> bool:
            return partition_of(key, partitions) == partition

        return owns

    # -- main loop ----------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        self.consumer = make_consumer(
            self.w.settings,
            group_id=self.group_id,
            bulk=self.name == "group",  # off the sensor-alert path (make_consumer)
            max_poll_records=self.w.options.max_poll_records,
            session_timeout_ms=self.w.options.session_timeout_ms,
            heartbeat_interval_ms=max(100, self.w.options.session_timeout_ms // 3),
        )
        self.consumer.subscribe([self.topic], listener=self)
        await self.consumer.start()
        self.running = True
        try:
            while not stop.is_set():
                batches = await self.consumer.getmany(timeout_ms=200)
                async with self.lock:
                    for tp, records in batches.items():
                        part = self.parts.get(tp.partition)
                        if part is not None:
                            await self._handle(part, records)
                    await self._checkpoint(list(self.parts.values()), force=False)
        finally:
            self.running = False
            async with self.lock:
                with contextlib.suppress(Exception):
                    await self._checkpoint(list(self.parts.values()), force=True)
            await self.consumer.stop()
            self._held.set(0)  # stopping leaves the group without a revoke

    async def _handle(self, part: _Part, records: Sequence[Any]) -> None:
        effects: list[Effect] = []
        rekeys: dict[str, list[tuple[int, bytes]]] = {}
        applied = evaluated = readings = 0  # counters go to Prometheus once per poll
        slices = _Slices()
        for rec in records:
            if rec.offset < part.offset:
                continue  # fetched before a seek back to a snapshot: already applied
            part.offset = rec.offset + 1
            part.dirty += 1
            started = time.perf_counter()
            try:
                if self.name == "sensor":
                    batch = decode_batch(orjson.loads(rec.value))
                    out = part.engine.process(batch, "sensor")
                    readings += self._applied(part, batch, out, effects)
                    for key in part.engine.group_keys(batch):
                        rekeys.setdefault(key, []).append((rec.offset, rec.value))
                else:
                    key, origin, items = read_rekey(rec.value)
                    seen_key = f"{origin}|{key}"
                    for offset, obj in items:
                        if part.seen.get(seen_key, -1) >= offset:
                            continue  # replayed by the sensor stage: already applied
                        part.seen[seen_key] = offset
                        batch = decode_batch(obj)
                        # Only this key's rules: the batch arrives once per group key,
                        # and another key's partition evaluates that key's rules.
                        out = part.engine.process(batch, "group", key)
                        readings += self._applied(part, batch, out, effects)
                        applied += 1
                        if slices.due():
                            # A poll of re-key records can hold many thousand batches: let
                            # the sensor stage (the alert path) run in between.
                            await slices.pause()
            except (ValidationError, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                log.warning(
                    "undecodable record skipped",
                    extra={"stage": self.name, "partition": part.partition, "offset": rec.offset},
                )
                continue
            evaluated += 1
            self._evaluation_s.observe(time.perf_counter() - started)
        self._evaluations.inc(evaluated)
        self._readings.inc(readings)
        await self.w.emit(part, effects)
        # One re-key record per group key and poll (in offset order, so per key the group
        # stage sees them in input order), acknowledged in the background; a failed one stops
        # the stage here or at the latest before the snapshot that would skip it.
        for key, items in rekeys.items():
            for chunk in _chunks(items, REKEY_MAX_BYTES):
                payload = rekey_value(key, part.partition, chunk)
                self._rekeys.append(
                    await self.w.producer.send(self.w.rekey_topic, payload, key=key.encode())
                )
        pending = []
        for f in self._rekeys:
            if f.done():
                f.result()
            else:
                pending.append(f)
        self._rekeys = pending

    def _applied(self, part: _Part, batch: FastBatch, out: list[Effect], to: list[Effect]) -> int:
        """Account for one evaluated batch (event-time clock, effects); returns its readings."""
        latest = max(r.ts_ms for r in batch.readings) if batch.readings else None
        if latest is not None and (part.event_ms is None or latest > part.event_ms):
            part.event_ms, part.event_wall_ms = latest, wall_ms()
        part.clock_ms = max(part.clock_ms, part.event_ms or 0)
        to.extend(out)
        return len(batch.readings)

    async def tick(self, wall_now_ms: int, resend: bool) -> None:
        """Advance every engine to its partition's watermark, emit, re-send firing alerts.

        Args:
            wall_now_ms: the wall clock, epoch ms; it only measures idle time
                (:func:`watermark_ms`).
            resend: re-send firing alerts to Alertmanager too.
        """
        async with self.lock:
            marks = {
                p.partition: watermark_ms(p.event_ms, p.event_wall_ms, wall_now_ms, p.tick_ms)
                for p in self.parts.values()
                if p.event_ms is not None
            }
            # A partition that has seen no record yet (its sensors may all be silent) follows
            # the most advanced partition of this stage: same producers, same time.
            fallback = max((m for m in marks.values() if m is not None), default=None)
            for part in list(self.parts.values()):
                now_ms = marks.get(part.partition)
                if now_ms is None and fallback is not None:
                    now_ms = max(fallback, part.tick_ms or fallback)
                if now_ms is not None:
                    await self._advance(part, now_ms)
                if resend and part.firing:
                    await self.w.notify(list(part.firing.values()))

    async def _advance(self, part: _Part, now_ms: int) -> None:
        """Let event time pass to ``now_ms`` in one partition's engine and emit what changed."""
        part.tick_ms = now_ms
        started = time.perf_counter()
        slices = _Slices()
        if self.name == "group":
            # Thousands of group evaluations: in slices, so the sensor stage's polls get in.
            # (The sensor stage's own tick holds its lock, so slicing it would only delay it.)
            out: list[Effect] = []
            for _ in part.engine.advancing(now_ms, out, scope=self.name):
                if slices.due():
                    await slices.pause()
        else:
            out = part.engine.advance(now_ms, scope=self.name)
        evaluation_s = time.perf_counter() - started - slices.paused_s
        effects = owned_effects(
            out,
            self.name,
            part.partition,
            self.partitions,
            part.engine.ruleset,
            self.w.registry,
        )
        self._evaluations.inc()
        self._evaluation_s.observe(evaluation_s)
        part.clock_ms = max(part.clock_ms, now_ms)
        if effects:
            # State changed with time alone: snapshot it soon, or a crash would let
            # a later tick raise the same change again at another time.
            part.dirty += 1
        await self.w.emit(part, effects)

    async def _checkpoint(self, parts: Sequence[_Part], force: bool) -> None:
        """Snapshot then commit: effects of these records are already delivered.

        The state is captured here, on the loop (it must match the offsets), one partition per
        call; compressing, writing and committing it run in the background while consumption
        goes on, one write at a time per stage (other due partitions wait for the next calls).
        ``force`` (revocation, shutdown) waits for the write in flight, then writes every
        partition given and waits.
        """
        if self._inflight is not None and self._inflight.done():
            task, self._inflight = self._inflight, None
            task.result()  # a failed write stops the stage, as a failed send always did
        if self._inflight is not None:
            if not force:
                return
            task, self._inflight = self._inflight, None
            await task
        now = time.monotonic()
        due = [
            p
            for p in parts
            if p.offset >= 0
            and (
                (force and p.dirty)
                or p.dirty >= self.w.options.checkpoint_records
                or (p.dirty and now - p.last_checkpoint >= self.w.options.checkpoint_s)
            )
        ]
        if not due:
            return
        if not force:
            # One partition per call: capturing a snapshot holds the loop (~10 ms per MB of
            # state), and partitions that all fell due at once would add up to a stall.
            due = [min(due, key=lambda p: p.last_checkpoint)]
        # A snapshot must not skip a re-keyed batch that never reached the re-key topic.
        rekeys, self._rekeys = self._rekeys, []
        await asyncio.gather(*rekeys)
        snaps = []
        for p in due:
            snaps.append(
                Snapshot(
                    self.name,
                    p.partition,
                    p.offset,
                    p.engine.snapshot(),
                    p.clock_ms,
                    dict(p.firing),
                    dict(p.quiet),
                    dict(p.seen),
                )
            )
            p.dirty = 0
            p.last_checkpoint = now
        write = self._write_snapshots(snaps)
        if force:
            await write
        else:
            self._inflight = asyncio.create_task(write, name=f"rules-{self.name}-checkpoint")

    async def _write_snapshots(self, snaps: Sequence[Snapshot]) -> None:
        records = await asyncio.to_thread(lambda: [s.encode() for s in snaps])
        sends = []
        for snap, record in zip(snaps, records, strict=True):
            sends.append(
                await self.w.producer.send(self.w.state_topic, record, key=snap.key.encode())
            )
            metrics.SNAPSHOT_BYTES.labels(self.name, str(snap.partition)).set(len(record))
        await asyncio.gather(*sends)
        metrics.CHECKPOINTS.labels(self.name).inc(len(snaps))
        assert self.consumer is not None
        try:
            await self.consumer.commit(
                {TopicPartition(self.topic, s.partition): s.offset for s in snaps}
            )
        except KafkaError as exc:
            # The snapshot already holds the offset; the commit only serves lag monitoring
            # and the no-snapshot fallback, so a commit lost to a rebalance is harmless.
            log.warning("offset commit failed", extra={"stage": self.name, "error": str(exc)})


class RuleWorker:
    """``citypulse rules run``: the service (``async run(stop)``) evaluating rules on Kafka.

    Args:
        settings: process settings.
        options: tuning (checkpoint cadence, ticker, re-sends, reload polling).
        source: where rules come from (default: ``settings.rules`` and ``settings.registry``).
    """

    def __init__(
        self,
        settings: Settings,
        options: WorkerOptions | None = None,
        source: RuleSource | None = None,
    ) -> None:
        self.settings = settings
        self.options = options or WorkerOptions()
        self.registry: Registry = source.registry if source else load_registry(settings.registry)
        self.source = source or RuleSource(settings.rules, self.registry)
        self.loaded: Loaded = self.source.load()
        self.rekey_topic = settings.topic(REKEY_TOPIC)
        self.state_topic = settings.topic(STATE_TOPIC)
        self.alertmanager = (
            AlertmanagerClient(settings.alertmanager_url, resend_interval_s=self.options.resend_s)
            if settings.alertmanager_url
            else None
        )
        self.stages = [
            _Stage(self, "sensor", settings.topic("readings"), f"{settings.topic_prefix}-rules"),
            _Stage(self, "group", self.rekey_topic, f"{settings.topic_prefix}-rules-groups"),
        ]
        self._reload = asyncio.Event()
        self._producer: AIOKafkaProducer | None = None
        self._sinks: Sinks | None = None
        self.sink_ok = True

    @property
    def producer(self) -> AIOKafkaProducer:
        assert self._producer is not None, "worker not started"
        return self._producer

    @property
    def maintenance(self) -> Maintenance:
        return self.loaded.maintenance

    def new_engine(
        self, owns: Callable[[str], bool] | None = None, scope: StageName | None = None
    ) -> Any:
        from rules import RuleEngine

        return RuleEngine(self.loaded.ruleset, self.registry, owns, scope or "all")

    # -- effects ------------------------------------------------------------------------------
    async def emit(self, part: _Part, effects: Sequence[Effect]) -> None:
        """Deliver effects (maintenance applied), notify Alertmanager, re-wake quiet alerts."""
        assert self._sinks is not None
        if not effects and not part.quiet and not (part.firing and self.maintenance.windows):
            return  # nothing to deliver, nothing to re-wake: the common case, once per poll
        alerts = [self._maintain(part, e) for e in effects if isinstance(e, AlertEvent)]
        commands = [e for e in effects if isinstance(e, CommandEvent)]
        sinks = self._sinks
        await self._deliver(lambda: sinks.alerts(alerts))
        await self._deliver(lambda: sinks.commands(commands))
        wake = self._rewake(part)
        to_send = [
            a for a in alerts if a.notify and a.state in (AlertState.FIRING, AlertState.RESOLVED)
        ]
        await self.notify([*to_send, *wake])
        self.count_alerts()

    def count_alerts(self) -> None:
        """Set the alert gauges from the partitions this worker holds now."""
        metrics.ALERTS.labels("firing").set(
            sum(len(p.firing) for s in self.stages for p in s.parts.values())
        )
        metrics.ALERTS.labels("quiet").set(
            sum(len(p.quiet) for s in self.stages for p in s.parts.values())
        )

    async def _deliver(self, write: Callable[[], Awaitable[None]]) -> None:
        """Run an (idempotent) sink write, retrying a retriable failure with backoff.

        The partition does not advance meanwhile; after ``sink_retry_s`` the error propagates,
        the worker stops (exit code 1) and its partitions resume elsewhere from the last
        snapshot, which replays these effects.
        """
        delay, deadline = 0.2, time.monotonic() + self.options.sink_retry_s
        while True:
            try:
                await write()
            except SinkError as exc:
                self.sink_ok = False
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("sink write failed, retrying: %s", exc, extra={"delay_s": delay})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            else:
                self.sink_ok = True
                return

    def _maintain(self, part: _Part, a: AlertEvent) -> AlertEvent:
        fp = a.fingerprint
        window = self.maintenance.active(a.labels, a.ts_ms)
        if a.state == AlertState.FIRING:
            if window is not None:
                a = a.model_copy(update={"notify": False})
                part.quiet[fp] = (a, window[1])
                part.firing.pop(fp, None)
                metrics.SUPPRESSED.inc()
            elif a.notify:
                part.firing[fp] = a
                part.quiet.pop(fp, None)
            return a
        if a.state in (AlertState.RESOLVED, AlertState.INACTIVE):
            part.firing.pop(fp, None)
            part.quiet.pop(fp, None)
        if window is not None and a.notify:
            metrics.SUPPRESSED.inc()
            return a.model_copy(update={"notify": False})
        return a

    def _rewake(self, part: _Part) -> list[AlertEvent]:
        """Move alerts between quiet and firing as windows open and close (event time)."""
        now = part.clock_ms
        woken: list[AlertEvent] = []
        for fp, (event, until) in list(part.quiet.items()):
            if until > now:
                continue
            window = self.maintenance.active(event.labels, now)
            if window is not None:
                part.quiet[fp] = (event, window[1])
                continue
            del part.quiet[fp]
            live = event.model_copy(update={"notify": True})
            part.firing[fp] = live
            woken.append(live)
        for fp, event in list(part.firing.items()):
            window = self.maintenance.active(event.labels, now)
            if window is not None:
                del part.firing[fp]
                part.quiet[fp] = (event, window[1])
        if woken:
            log.info("maintenance over: re-notifying", extra={"alerts": len(woken)})
        return woken

    async def notify(self, events: Sequence[AlertEvent]) -> None:
        """POST to Alertmanager; a failure is logged and counted (re-sends retry firing ones)."""
        if self.alertmanager is None or not events:
            return
        try:
            sent = await self.alertmanager.post(events)
            metrics.NOTIFICATIONS.labels("sent").inc(sent)
        except AlertmanagerError as exc:
            metrics.NOTIFICATIONS.labels("failed").inc(len(events))
            log.warning("alertmanager post failed: %s", exc)

    # -- reload -------------------------------------------------------------------------------
    def request_reload(self) -> None:
        """Ask for a reload at the next chance (what SIGHUP does)."""
        self._reload.set()

    async def reload(self) -> bool:
        """Reload rules if their files changed; refuse invalid ones (old rules stay in force)."""
        if self.source.fingerprint() == self.loaded.fingerprint:
            return False
        try:
            loaded = self.source.load()
        except (YamlSourceError, RuntimeFault, Exception) as exc:
            problems = getattr(exc, "problems", None) or [exc]
            for problem in problems:
                log.error("rule reload refused", extra={"problem": str(problem)})  # noqa: TRY400
            metrics.RELOADS.labels("refused").inc()
            # Remember the refused version so the same broken files are not re-reported.
            self.loaded = Loaded(
                self.loaded.ruleset, self.loaded.maintenance, self.source.fingerprint()
            )
            return False
        for stage in self.stages:
            async with stage.lock:
                for part in stage.parts.values():
                    part.engine.replace_rules(loaded.ruleset)
        self.loaded = loaded
        metrics.RELOADS.labels("ok").inc()
        log.info("rules reloaded", extra={"fingerprint": loaded.fingerprint[:12]})
        return True

    async def _reloader(self, stop: asyncio.Event) -> None:
        poll = self.options.reload_poll_s
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reload.wait(), poll if poll > 0 else None)
            self._reload.clear()
            if stop.is_set():
                return
            await self.reload()

    async def _ticker(self, stop: asyncio.Event) -> None:
        last_resend = time.monotonic()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.options.tick_s)
            if stop.is_set():
                return
            resend = time.monotonic() - last_resend >= self.options.resend_s
            if resend:
                last_resend = time.monotonic()
            now = wall_ms()
            for stage in self.stages:
                await stage.tick(now, resend)
            unhealthy = {
                k for s in self.stages for p in s.parts.values() for k in p.engine.unhealthy()
            }
            metrics.UNHEALTHY.set(len(unhealthy))

    async def _resender(self, stop: asyncio.Event) -> None:
        # Without the ticker, firing alerts are still re-sent so Alertmanager keeps them open.
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.options.resend_s)
            if stop.is_set():
                return
            for stage in self.stages:
                async with stage.lock:
                    for part in stage.parts.values():
                        await self.notify(list(part.firing.values()))

    # -- lifecycle ----------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set; then checkpoint, commit and close everything."""
        await ensure_topics(self.settings)
        await ensure_runtime_topics(self.settings)
        async with contextlib.AsyncExitStack() as resources:
            # Each resource is closed on the way out, also when a later one fails to start.
            pool = await asyncpg.create_pool(self.settings.dsn, min_size=1, max_size=4)
            resources.push_async_callback(pool.close)
            # Snapshots share this producer: one record may be as large as the state topic allows.
            self._producer = make_producer(self.settings, max_request_size=STATE_MAX_BYTES)
            await self._producer.start()
            resources.push_async_callback(self._producer.stop)
            # Alert events and commands are few, and a poll waits for their acks before the
            # next one: no linger for them. With the re-key producer's linger (25 ms on the
            # embedded stack) every poll carrying an alert stalled the stage, and at 50 state
            # changes a second the bench's median publish -> alert went from ~100 to ~250 ms.
            sink_producer = make_producer(self.settings, linger_ms=0)
            await sink_producer.start()
            resources.push_async_callback(sink_producer.stop)
            mqtt = MqttPublisher(self.settings)
            await mqtt.start()
            resources.push_async_callback(mqtt.stop)
            self._sinks = Sinks(self.settings, sink_producer, pool, mqtt)
            HEALTH.add("rules-stages", lambda: all(s.running for s in self.stages))
            HEALTH.add("rules-mqtt", mqtt.connected)
            HEALTH.add("rules-sinks", lambda: self.sink_ok)
            loop = asyncio.get_running_loop()
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signal.SIGHUP, self.request_reload)
            resources.callback(_remove_sighup, loop)
            log.info(
                "rules worker started",
                extra={
                    "rules": str(self.source.path),
                    "fingerprint": self.loaded.fingerprint[:12],
                    "settings": self.settings.redacted(),
                },
            )
            await self._serve(stop)

    async def _serve(self, stop: asyncio.Event) -> None:
        """The stages, the reloader and the ticker (or re-sender), until ``stop`` or a failure."""
        async with asyncio.TaskGroup() as tg:
            inner = asyncio.Event()

            async def watch() -> None:
                await stop.wait()
                inner.set()
                self._reload.set()  # wakes a reloader waiting for SIGHUP only

            tg.create_task(watch(), name="rules-stop")
            for stage in self.stages:
                tg.create_task(_until(stage.run(inner), inner), name=f"rules-{stage.name}")
            tg.create_task(self._reloader(inner), name="rules-reload")
            if self.options.tick_s > 0:
                tg.create_task(self._ticker(inner), name="rules-ticker")
            else:
                tg.create_task(self._resender(inner), name="rules-resend")


def _remove_sighup(loop: asyncio.AbstractEventLoop) -> None:
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.remove_signal_handler(signal.SIGHUP)


async def _until(coro: Any, inner: asyncio.Event) -> None:
    # A stage failing stops the whole worker (its partitions go to another worker).
    try:
        await coro
    except BaseException:
        inner.set()
        raise


def run_worker(settings: Settings, options: WorkerOptions | None = None) -> int:
    """Run the worker as a service (signals, /metrics, /readyz); return the exit code."""
    from citypulse.service import run_service

    return asyncio.run(run_service(RuleWorker(settings, options), settings.metrics_port))


__all__ = ["RuleWorker", "WorkerOptions", "run_worker"]
