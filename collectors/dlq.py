"""The dead-letter topic: list refused messages, replay them against the current registry.

``list`` reads the topic from the beginning with a throwaway consumer (no group, nothing
committed). ``replay`` uses the committed consumer group ``dlq-replay`` (``dlq-replay.<reason>``
when filtered by reason, so a filtered replay does not mark the other reasons as done): a second
replay only sees what was dead-lettered since. Each message is re-validated with ``now`` = its
original reception time, so time checks give the answer they would have given then, and the
readings keep their original ``received_ms`` and ``source`` hash (the writer deduplicates).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from citypulse.events import ReadingBatch, Rejection, RejectReason
from citypulse.settings import Settings
from collectors.validate import Validator
from stream import client_options, ensure_topics, make_consumer, make_producer

log = logging.getLogger("citypulse.collectors")

REPLAY_GROUP = "dlq-replay"


def replay_group(reason: RejectReason | None) -> str:
    """Consumer group of a replay: ``dlq-replay``, or ``dlq-replay.<reason>`` when filtered."""
    return REPLAY_GROUP if reason is None else f"{REPLAY_GROUP}.{reason.value}"


async def _drain(consumer: AIOKafkaConsumer, quiet_ms: int = 1000) -> list[Any]:
    """Every record from the consumer's positions until the topic stays quiet ``quiet_ms``.

    End offsets are not used: tansu (the embedded broker) answers ListOffsets "latest" with
    an offset inside the last batch, which would stop early; quiet time works on any broker.
    """
    out: list[Any] = []
    while True:
        batches = await consumer.getmany(timeout_ms=quiet_ms)
        if not batches:
            return out
        for records in batches.values():
            out.extend(records)


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    await consumer.topics()  # refreshes metadata
    parts = consumer.partitions_for_topic(topic) or set()
    return [TopicPartition(topic, p) for p in sorted(parts)]


async def list_rejections(
    settings: Settings, limit: int | None = None, reason: RejectReason | None = None
) -> list[Rejection]:
    """The dead-lettered messages (oldest reception first), optionally of one reason only."""
    topic = settings.topic("deadletter")
    consumer = AIOKafkaConsumer(
        **client_options(settings),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
    )
    await consumer.start()
    try:
        tps = await _partitions(consumer, topic)
        if not tps:
            return []
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records = await _drain(consumer)
    finally:
        await consumer.stop()
    rejections = [Rejection.decode(r.value) for r in records]
    if reason is not None:
        rejections = [r for r in rejections if r.reason == reason]
    rejections.sort(key=lambda r: r.received_ms)
    return rejections[:limit] if limit is not None else rejections


@dataclass
class ReplayResult:
    """What a replay did.

    Attributes:
        replayed: messages now accepted and produced to the readings topic.
        readings: readings in them.
        still_refused: messages refused again, by reason code.
        skipped: messages of another reason than the filter.
    """

    replayed: int = 0
    readings: int = 0
    still_refused: Counter[str] = field(default_factory=Counter)
    skipped: int = 0


async def replay(
    settings: Settings, validator: Validator, reason: RejectReason | None = None
) -> ReplayResult:
    """Re-validate dead-lettered messages not replayed before; produce the accepted ones.

    Offsets are committed only after Kafka acknowledged the produced readings, so a crashed
    replay repeats (duplicates, which the writer drops) rather than loses.
    """
    await ensure_topics(settings, ("readings", "deadletter"))
    topic = settings.topic("deadletter")
    consumer = make_consumer(settings, group_id=replay_group(reason))
    producer = make_producer(settings)
    await producer.start()
    await consumer.start()
    result = ReplayResult()
    try:
        tps = await _partitions(consumer, topic)
        if not tps:
            return result
        consumer.assign(tps)
        committed = {tp: await consumer.committed(tp) for tp in tps}
        for tp, offset in committed.items():
            if offset is None:
                await consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, offset)
        records = await _drain(consumer)
        futures = []
        for record in records:
            rejection = Rejection.decode(record.value)
            if reason is not None and rejection.reason != reason:
                result.skipped += 1
                continue
            verdict = validator.validate(rejection.topic, rejection.raw, rejection.received_ms)
            if isinstance(verdict, ReadingBatch):
                futures.append(
                    await producer.send(
                        settings.topic("readings"),
                        value=verdict.encode(),
                        key=verdict.sensor.encode(),
                    )
                )
                result.replayed += 1
                result.readings += len(verdict.readings)
            else:
                result.still_refused[verdict.reason.value] += 1
        for future in futures:
            await future
        positions = {tp: await consumer.position(tp) for tp in tps}
        await consumer.commit(positions)
    finally:
        await consumer.stop()
        await producer.stop()
    log.info(
        "dead-letter replay done",
        extra={
            "replayed": result.replayed,
            "readings": result.readings,
            "still_refused": dict(result.still_refused),
        },
    )
    return result
