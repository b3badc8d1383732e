"""Prometheus metrics of the writer (process-global, like every prometheus_client metric)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

STORED = Counter(
    "citypulse_writer_readings_stored_total", "Readings inserted into the readings table"
)
DUPLICATES = Counter(
    "citypulse_writer_readings_duplicate_total",
    "Readings already stored (redelivered by Kafka) and ignored",
)
CHECKED_BATCHES = Counter(
    "citypulse_writer_checked_batches_total",
    "Batches inserted the checked way (ON CONFLICT): a duplicate in them or in a recent batch",
)
REJECTIONS = Counter(
    "citypulse_writer_rejections_stored_total", "Dead-letter records inserted into rejections"
)
UNDECODABLE = Counter(
    "citypulse_writer_undecodable_total",
    "Kafka records that could not be stored and were skipped",
    ["topic"],
)
BATCH_SIZE = Histogram(
    "citypulse_writer_batch_size",
    "Readings per database transaction",
    buckets=(1, 10, 50, 100, 500, 1000, 2500, 5000, 10000, 25000),
)
WRITE_SECONDS = Histogram(
    "citypulse_writer_write_seconds",
    "Duration of one batch transaction, seconds",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
CONSUMER_LAG = Gauge(
    "citypulse_writer_consumer_lag",
    "Records behind the partition's high watermark (highwater - position)",
    ["topic", "partition"],
)
DB_ERRORS = Counter("citypulse_writer_db_errors_total", "Failed database transactions")
RETENTION_DELETED = Counter(
    "citypulse_writer_retention_deleted_total", "Rows deleted by the retention job", ["tier"]
)
ROLLUP_SECONDS = Histogram(
    "citypulse_writer_rollup_refresh_seconds",
    "Duration of one rollup refresh (plain PostgreSQL), seconds",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
ROLLUP_LATE = Counter(
    "citypulse_writer_rollup_late_minutes_total",
    "(sensor, metric, minute)s recomputed because a reading was stored behind the fold",
)
ROLLUP_DONE = Gauge(
    "citypulse_writer_rollup_done_timestamp_seconds",
    "The rollup tables hold every good reading older than this (plain PostgreSQL)",
)
