"""Kafka plumbing shared by the collectors, the writer and the rule workers."""

from stream.kafka import (
    TOPICS,
    client_options,
    ensure_topics,
    make_consumer,
    make_producer,
    partition_of,
    send_keyed,
)

__all__ = [
    "TOPICS",
    "client_options",
    "ensure_topics",
    "make_consumer",
    "make_producer",
    "partition_of",
    "send_keyed",
]
