"""aiokafka producers, consumers and topic set-up, built from :class:`Settings`.

Delivery: producers use ``acks=all`` and, where the broker supports it (Apache Kafka), the
idempotent producer (``kafka_idempotence``). Consumers never auto-commit: each stage commits
offsets only after its own output is durable, so every stage is at-least-once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, TopicAlreadyExistsError
from aiokafka.partitioner import DefaultPartitioner

from citypulse.settings import Settings

log = logging.getLogger("citypulse.stream")

TOPICS = ("readings", "deadletter", "alerts", "commands")
"""Topics created at start-up (names without the prefix)."""


def client_options(settings: Settings) -> dict[str, Any]:
    """Connection options shared by every Kafka client (bootstrap, TLS, SASL)."""
    opts: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "security_protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        opts["ssl_context"] = ssl.create_default_context(
            cafile=str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None
        )
    if settings.kafka_sasl_mechanism:
        opts["sasl_mechanism"] = settings.kafka_sasl_mechanism
        opts["sasl_plain_username"] = settings.kafka_sasl_username
        if settings.kafka_sasl_password is not None:
            opts["sasl_plain_password"] = settings.kafka_sasl_password.get_secret_value()
    return opts


class CachedPartitioner:
    """aiokafka's default partitioner (murmur2 of the key, as the Java client), remembering the
    partition of each key: aiokafka's murmur2 is pure Python (~4 % of the collector's CPU), and
    the keys (sensor ids, group keys) are a fixed set of the city's size."""

    def __init__(self, limit: int = 1_000_000) -> None:
        self._limit = limit
        self._index: dict[tuple[bytes, int], int] = {}

    def index(self, key: bytes, n: int) -> int:
        """Which of ``n`` partitions (by position, sorted by id) the default picks for ``key``."""
        idx = self._index.get((key, n))
        if idx is None:
            if len(self._index) >= self._limit:
                self._index.clear()
            every = list(range(n))
            idx = self._index[(key, n)] = int(DefaultPartitioner()(key, every, every))
        return idx

    def __call__(self, key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
        if key is None:
            return int(DefaultPartitioner()(key, all_partitions, available))
        return all_partitions[self.index(key, len(all_partitions))]


_PARTITIONER = CachedPartitioner()
"""One per process: every producer's, and :func:`partition_of`'s."""


def partition_of(key: str, partitions: int) -> int:
    """The partition a record keyed ``key`` goes to: what every citypulse producer picks."""
    return _PARTITIONER.index(key.encode(), partitions)


async def send_keyed(
    producer: AIOKafkaProducer, topic: str, records: Iterable[tuple[bytes, bytes]]
) -> list[asyncio.Future[Any]]:
    """Queue ``(key, value)`` records as record batches, one per partition (the one the default
    partitioner picks for the key, as :meth:`~aiokafka.AIOKafkaProducer.send` would), in order.

    ``send`` costs a coroutine, a future and a trip through the accumulator per record (~10 us
    in Python): the collector's largest cost after MQTT. Queued batches linger the
    producer's ``linger_ms``. The collector sets it to 0 and lingers its own turns
    (``collectors/turns.py``): sending whatever each MQTT read brought at once tripled the
    broker's CPU (a small request per read instead of one per linger period).

    Returns:
        One future per record batch; all resolved = every record acknowledged.
    """
    partitions = sorted(await producer.partitions_for(topic))
    n = len(partitions)
    index = _PARTITIONER.index
    open_: dict[int, Any] = {}
    futures: list[asyncio.Future[Any]] = []

    async def submit(p: int) -> None:
        batch = open_.pop(p)
        futures.append(await producer.send_batch(batch, topic, partition=partitions[p]))

    for key, value in records:
        p = index(key, n)
        batch = open_.get(p)
        if batch is None:
            batch = open_[p] = producer.create_batch()
        if batch.append(key=key, value=value, timestamp=None) is None:
            # Full (``max_batch_size``): queue it and start the partition's next batch, which
            # takes any record (an empty batch always accepts its first).
            await submit(p)
            batch = open_[p] = producer.create_batch()
            batch.append(key=key, value=value, timestamp=None)
    for p in list(open_):
        await submit(p)
    return futures


def make_producer(settings: Settings, **overrides: Any) -> AIOKafkaProducer:
    opts: dict[str, Any] = {
        **client_options(settings),
        "acks": "all",
        "enable_idempotence": settings.kafka_idempotence,
        "linger_ms": settings.kafka_linger_ms,
        "max_batch_size": settings.kafka_max_batch_bytes,
        "compression_type": None,
        "partitioner": _PARTITIONER,
    }
    opts.update(overrides)
    return AIOKafkaProducer(**opts)


def make_consumer(
    settings: Settings, *topics: str, group_id: str, bulk: bool = False, **overrides: Any
) -> AIOKafkaConsumer:
    """A consumer that never auto-commits.

    Args:
        bulk: off the sensor-alert path (the writer, the rules' group stage): fetches may
            wait ``kafka_bulk_fetch_max_wait_ms`` instead of ``kafka_fetch_max_wait_ms``.
            Apache Kafka answers a fetch as soon as data arrives, so the wait only bounds
            an idle fetch there; tansu holds every fetch that finds nothing new for the whole
            wait, and each fetch costs it ~0.5 ms of CPU: three consumers at 15 ms kept it at
            ~17 % of a core with no traffic, 11.6 % with the writer and group stage at 50 ms.
    """
    wait_ms = settings.kafka_bulk_fetch_max_wait_ms if bulk else settings.kafka_fetch_max_wait_ms
    opts: dict[str, Any] = {
        **client_options(settings),
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "fetch_max_wait_ms": wait_ms,
        "isolation_level": "read_uncommitted",
    }
    opts.update(overrides)
    return AIOKafkaConsumer(*topics, **opts)


async def ensure_topics(
    settings: Settings, names: tuple[str, ...] = TOPICS, retries: int = 30
) -> None:
    """Create the topics (with configured partitions) unless they exist; wait for the broker."""
    admin = AIOKafkaAdminClient(**client_options(settings))
    for attempt in range(retries):
        try:
            await admin.start()
            break
        except KafkaConnectionError:
            if attempt == retries - 1:
                raise
            await asyncio.sleep(0.5)
    try:
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(settings.topic(n), settings.partitions, settings.replication_factor)
            for n in names
            if settings.topic(n) not in existing
        ]
        if wanted:
            # Another process may have created them first.
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(wanted)
            log.info("created topics", extra={"topics": [t.name for t in wanted]})
    finally:
        await admin.close()
