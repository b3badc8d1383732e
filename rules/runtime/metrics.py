"""Prometheus metrics of the rule runtime (module-level: one registry per process)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVALUATIONS = Counter(
    "citypulse_rules_evaluations_total",
    "Reading batches (and clock ticks) evaluated by the rule engine",
    ["stage"],
)
EVALUATION_SECONDS = Histogram(
    "citypulse_rules_evaluation_seconds",
    "Time to evaluate one reading batch or clock tick, seconds",
    ["stage"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
READINGS = Counter(
    "citypulse_rules_readings_total",
    "Readings evaluated, by stage (the group stage counts each re-keyed copy)",
    ["stage"],
)
ALERTS = Gauge(
    "citypulse_rules_alerts",
    "Alerts currently in each state, as last emitted by this worker's partitions",
    ["state"],
)
UNHEALTHY = Gauge("citypulse_rules_unhealthy", "Rules currently marked unhealthy by the engine")
COMMANDS = Counter("citypulse_rules_commands_total", "Actuator commands emitted", ["status"])
ALERT_EVENTS = Counter(
    "citypulse_rules_alert_events_total", "Alert state changes emitted", ["state"]
)
NOTIFICATIONS = Counter(
    "citypulse_rules_notifications_total",
    "Alerts posted to Alertmanager, by outcome",
    ["outcome"],
)
SUPPRESSED = Counter(
    "citypulse_rules_maintenance_suppressed_total",
    "Alert events recorded with notify=false because a maintenance window covered them",
)
CHECKPOINTS = Counter(
    "citypulse_rules_checkpoints_total", "State snapshots written to the changelog", ["stage"]
)
SNAPSHOT_BYTES = Gauge(
    "citypulse_rules_snapshot_bytes",
    "Size of the partition's latest state snapshot record (the state topic allows 64 MiB)",
    ["stage", "partition"],
)
PARTITIONS = Gauge(
    "citypulse_rules_partitions",
    "Partitions this worker holds, with their engines built and state restored, by stage",
    ["stage"],
)
RELOADS = Counter("citypulse_rules_reloads_total", "Rule reloads by outcome", ["outcome"])
