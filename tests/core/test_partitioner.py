"""The producers' cached partitioner puts every key where aiokafka's default (Kafka's murmur2)
does, so a sensor's readings keep one partition whichever producer wrote them."""

from __future__ import annotations

from aiokafka.partitioner import DefaultPartitioner

from stream.kafka import CachedPartitioner


def test_same_partition_as_the_default_for_every_key_and_partition_count() -> None:
    cached, default = CachedPartitioner(limit=500), DefaultPartitioner()
    keys = [f"sensor-{i:05d}".encode() for i in range(2000)] + [b"district=north", b""]
    for n in (1, 3, 6, 7, 3):  # the count changes (topic grown) and comes back
        parts = list(range(n))
        for _ in range(2):  # the second round answers from the cache (cleared at 500 entries)
            for k in keys:
                assert cached(k, parts, parts) == default(k, parts, parts), (k, n)


def test_a_key_of_none_goes_to_an_available_partition() -> None:
    cached = CachedPartitioner()
    assert {cached(None, [0, 1, 2, 3], [2]) for _ in range(20)} == {2}
