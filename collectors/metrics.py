"""Prometheus metrics of the collector (process-wide, registered once at import)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

MESSAGES_RECEIVED = Counter(
    "citypulse_collector_messages_received_total", "MQTT messages taken from the broker"
)
READINGS_ACCEPTED = Counter(
    "citypulse_collector_readings_accepted_total", "Readings produced to the readings topic"
)
MESSAGES_REFUSED = Counter(
    "citypulse_collector_messages_refused_total",
    "Messages refused and dead-lettered, by reason code",
    ["reason"],
)
MESSAGES_DROPPED = Counter(
    "citypulse_collector_messages_dropped_total",
    "Messages dropped because the bounded queue was full (QoS 0 only; QoS 1 is redelivered)",
)
PRODUCE_SECONDS = Histogram(
    "citypulse_collector_produce_seconds",
    "Time from handing a batch of records to Kafka until every one was acknowledged (s)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
QUEUE_DEPTH = Gauge(
    "citypulse_collector_queue_depth", "MQTT messages received and not yet processed"
)
KAFKA_RETRIES = Counter(
    "citypulse_collector_kafka_retries_total", "Retries of a turn Kafka failed to take"
)
