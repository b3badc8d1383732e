"""The rule engine runtime: Kafka worker group, checkpointed state, sinks, Alertmanager,
maintenance windows, backtests and hot reload (see README.md)."""

from rules._load import MAINTENANCE_FILE
from rules.runtime.alertmanager import AlertmanagerClient, alert_payload
from rules.runtime.backtest import BacktestAlert, BacktestReport, backtest
from rules.runtime.changelog import REKEY_TOPIC, STATE_TOPIC, Snapshot, read_snapshots
from rules.runtime.errors import AlertmanagerError, MaintenanceFileError, RuntimeFault, SinkError
from rules.runtime.maintenance import (
    Maintenance,
    MaintenanceWindow,
    load_maintenance,
    parse_maintenance,
)
from rules.runtime.sinks import MqttPublisher, Sinks, downlink_payload, downlink_topic
from rules.runtime.source import Loaded, RuleSource
from rules.runtime.worker import RuleWorker, WorkerOptions, run_worker

__all__ = [
    "MAINTENANCE_FILE",
    "REKEY_TOPIC",
    "STATE_TOPIC",
    "AlertmanagerClient",
    "AlertmanagerError",
    "BacktestAlert",
    "BacktestReport",
    "Loaded",
    "Maintenance",
    "MaintenanceFileError",
    "MaintenanceWindow",
    "MqttPublisher",
    "RuleSource",
    "RuleWorker",
    "RuntimeFault",
    "SinkError",
    "Sinks",
    "Snapshot",
    "WorkerOptions",
    "alert_payload",
    "backtest",
    "downlink_payload",
    "downlink_topic",
    "load_maintenance",
    "parse_maintenance",
    "read_snapshots",
    "run_worker",
]
