"""``send_keyed`` (the collector's produce path): record batches per partition, on a real broker.

Every record arrives once, on the partition its key hashes to (where ``producer.send`` and the
rule workers' :func:`partition_of` put it), in the order given, also when records overflow a
batch and a partition gets several.
"""

from __future__ import annotations

import asyncio
import time

from aiokafka import AIOKafkaConsumer, TopicPartition

from citypulse.settings import Settings
from stream import client_options, ensure_topics, make_producer, partition_of, send_keyed


async def _read_all(settings: Settings, topic: str, n: int) -> dict[int, list[tuple[str, int]]]:
    """partition -> [(key, sequence number), ...] in log order, once ``n`` records were read."""
    consumer = AIOKafkaConsumer(
        **client_options(settings), group_id=None, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in range(settings.partitions)]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        out: dict[int, list[tuple[str, int]]] = {}

        async def fetch() -> int:
            got = 0
            for tp, records in (await consumer.getmany(timeout_ms=200)).items():
                for r in records:
                    assert r.key is not None
                    assert r.value is not None
                    out.setdefault(tp.partition, []).append((r.key.decode(), int(r.value)))
                    got += 1
            return got

        deadline, got = time.monotonic() + 20, 0
        while got < n and time.monotonic() < deadline:
            got += await fetch()
        await asyncio.sleep(0.3)  # anything beyond n (a duplicate) would show up now
        await fetch()
        return out
    finally:
        await consumer.stop()


async def test_records_land_once_on_their_keys_partition_in_order(settings: Settings) -> None:
    await ensure_topics(settings)
    topic = settings.topic("readings")
    keys = [f"sensor-{i:03d}" for i in range(40)]
    # 600-byte values in 4 KiB batches: each partition's records span many batches.
    records = [(keys[i % len(keys)].encode(), str(i).encode().ljust(600)) for i in range(3000)]
    producer = make_producer(settings, max_batch_size=4096)
    await producer.start()
    try:
        futures = await send_keyed(producer, topic, records)
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    assert len(futures) > settings.partitions  # batches overflowed: several per partition

    seen = await _read_all(settings, topic, len(records))
    assert sorted(seq for log in seen.values() for _, seq in log) == list(range(len(records)))
    for partition, log in seen.items():
        assert {partition_of(k, settings.partitions) for k, _ in log} == {partition}
        for key in {k for k, _ in log}:
            sequence = [seq for k, seq in log if k == key]
            assert sequence == sorted(sequence), key  # per-key order kept
