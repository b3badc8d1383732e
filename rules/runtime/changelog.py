"""The state changelog: snapshots of per-partition engine state on ``{prefix}.rules-state``.

Each record is keyed ``"{stage}:{partition}"`` and holds the engine snapshot together with the
next input offset it corresponds to, so a worker taking over a partition restores the state and
seeks to exactly where that state stops. The topic is meant to be compacted (latest per key);
the reader does not rely on it: it reads the whole topic and keeps the latest record per key.
"""

from __future__ import annotations

import base64
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from citypulse.events import AlertEvent
from citypulse.settings import Settings
from stream import client_options

STATE_TOPIC = "rules-state"
STATE_MAX_BYTES = 64 * 1024 * 1024
"""Largest snapshot record: a partition of a 10,000-sensor city compresses to a few MB, above
Kafka's 1 MB default, so the state topic, its producer and its reader all allow this much."""
_ZLIB = b"Z1"
_ZLIB2 = b"Z2"
_LEVEL = 1
"""zlib level: 1 compresses engine windows ~3x faster than 6 for a few per cent more bytes."""
REKEY_TOPIC = "rules-rekey"


@dataclass(slots=True)
class Snapshot:
    """What a partition's worker needs to resume exactly where another stopped.

    Attributes:
        stage: ``"sensor"`` (readings) or ``"group"`` (re-key topic).
        partition: input partition number.
        offset: next input offset to read (everything before it is in ``engine``).
        engine: the engine's own snapshot bytes.
        clock_ms: the partition's event-time clock, epoch ms.
        firing: firing alerts being (re-)sent to Alertmanager, by fingerprint.
        quiet: firing alerts held back by a maintenance window, with the window's end (ms).
        seen: group stage only: highest origin offset applied per ``"{partition}|{key}"``.
    """

    stage: str
    partition: int
    offset: int
    engine: bytes
    clock_ms: int = 0
    firing: dict[str, AlertEvent] = field(default_factory=dict)
    quiet: dict[str, tuple[AlertEvent, int]] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.stage}:{self.partition}"

    def encode(self) -> bytes:
        """``Z2`` + zlib of (4-byte header length, header JSON, engine bytes as they are).

        Windows of many sensors compress ~10x (Kafka caps a record at about 1 MB by default);
        zlib releases the GIL, so the worker runs this in a thread while it goes on consuming.
        """
        header = self._header()
        body = b"".join((len(header).to_bytes(4, "big"), header, self.engine))
        return _ZLIB2 + zlib.compress(body, _LEVEL)

    def _header(self) -> bytes:
        return orjson.dumps(
            {
                "v": 2,
                "stage": self.stage,
                "partition": self.partition,
                "offset": self.offset,
                "clock_ms": self.clock_ms,
                "firing": [e.model_dump(mode="json") for e in self.firing.values()],
                "quiet": [
                    {"event": e.model_dump(mode="json"), "until_ms": u}
                    for e, u in self.quiet.values()
                ],
                "seen": self.seen,
            }
        )

    @classmethod
    def decode(cls, raw: bytes) -> Snapshot:
        """A record written by :meth:`encode`, or by an older version (``Z1``: base64 JSON)."""
        if raw.startswith(_ZLIB2):
            body = zlib.decompress(raw[len(_ZLIB2) :])
            size = int.from_bytes(body[:4], "big")
            d = orjson.loads(body[4 : 4 + size])
            d["engine"] = body[4 + size :]
        else:
            if raw.startswith(_ZLIB):
                raw = zlib.decompress(raw[len(_ZLIB) :])
            d = orjson.loads(raw)
            d["engine"] = base64.b64decode(d["engine"])
        firing = [AlertEvent.model_validate(e) for e in d.get("firing", [])]
        quiet = [(AlertEvent.model_validate(q["event"]), int(q["until_ms"])) for q in d["quiet"]]
        return cls(
            stage=d["stage"],
            partition=int(d["partition"]),
            offset=int(d["offset"]),
            engine=d["engine"],
            clock_ms=int(d.get("clock_ms", 0)),
            firing={e.fingerprint: e for e in firing},
            quiet={e.fingerprint: (e, u) for e, u in quiet},
            seen={str(k): int(v) for k, v in d.get("seen", {}).items()},
        )


async def ensure_runtime_topics(settings: Settings) -> None:
    """Create the re-key topic and the (compacted) state topic unless they exist."""
    import contextlib

    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    from stream import ensure_topics

    await ensure_topics(settings, names=(REKEY_TOPIC,))
    admin = AIOKafkaAdminClient(**client_options(settings))
    await admin.start()
    try:
        if settings.topic(STATE_TOPIC) not in set(await admin.list_topics()):
            # Compaction keeps the latest snapshot per key, so restoring stays quick.
            topic = NewTopic(
                settings.topic(STATE_TOPIC),
                settings.partitions,
                settings.replication_factor,
                topic_configs={
                    "cleanup.policy": "compact",
                    "max.message.bytes": str(STATE_MAX_BYTES),
                },
            )
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics([topic])
    finally:
        await admin.close()


async def read_snapshots(settings: Settings, keys: Iterable[str]) -> dict[str, Snapshot]:
    """The latest snapshot of each of ``keys`` (absent when none was ever written)."""
    wanted = set(keys)
    if not wanted:
        return {}
    topic = settings.topic(STATE_TOPIC)
    consumer = AIOKafkaConsumer(
        **client_options(settings),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
        max_partition_fetch_bytes=STATE_MAX_BYTES,
        fetch_max_bytes=STATE_MAX_BYTES,
    )
    await consumer.start()
    out: dict[str, Snapshot] = {}
    try:
        await consumer.topics()  # fetch metadata of every topic, ours included
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        if not tps:
            return {}
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        todo = {tp for tp in tps if ends[tp] > 0}
        while todo:
            batches = await consumer.getmany(*todo, timeout_ms=500)
            for records in batches.values():
                for rec in records:
                    key = rec.key.decode() if rec.key else ""
                    if key in wanted and rec.value is not None:
                        out[key] = Snapshot.decode(rec.value)
            for tp in list(todo):
                if await consumer.position(tp) >= ends[tp]:
                    todo.discard(tp)
    finally:
        await consumer.stop()
    return out
