"""The Alertmanager client against a real Alertmanager (v2 API)."""

from __future__ import annotations

import time
import uuid

import pytest

from citypulse.events import AlertEvent, AlertState
from rules.runtime import AlertmanagerClient

from .conftest import Alertmanager

pytestmark = pytest.mark.integration


def _event(state: AlertState, rule: str, ts_ms: int, since_ms: int) -> AlertEvent:
    return AlertEvent(
        fingerprint=uuid.uuid4().hex[:16],
        rule=rule,
        rule_version="abc123",
        group="water",
        state=state,
        severity="critical",
        labels={"sensor": "wtr-0001", "district": "north"},
        annotations={"summary": "pressure low at wtr-0001"},
        values={"pressure": 1.2},
        active_since_ms=since_ms,
        ts_ms=ts_ms,
        evaluated_ms=ts_ms,
    )


async def test_firing_then_resolved_alert_shows_then_clears(alertmanager: Alertmanager) -> None:
    """A firing alert is listed by Alertmanager with its labels; resolving it removes it."""
    rule = f"TestLowPressure{uuid.uuid4().hex[:6]}"
    now = time.time_ns() // 1_000_000
    client = AlertmanagerClient(alertmanager.url, resend_interval_s=30)
    firing = _event(AlertState.FIRING, rule, now - 1000, now - 60_000)
    assert await client.post([firing], now) == 1

    listed = alertmanager.alerts(alertname=rule)
    assert len(listed) == 1
    alert = listed[0]
    assert alert["labels"]["severity"] == "critical"
    assert alert["labels"]["sensor"] == "wtr-0001"
    assert alert["annotations"]["summary"] == "pressure low at wtr-0001"
    assert alert["annotations"]["value_pressure"] == "1.2"
    assert alert["status"]["state"] == "active"
    assert alert["generatorURL"].endswith(rule)

    resolved = _event(AlertState.RESOLVED, rule, now, now - 60_000)
    await client.post([resolved], now)
    assert alertmanager.alerts(alertname=rule) == []


async def test_pending_alerts_are_not_posted(alertmanager: Alertmanager) -> None:
    """Only firing and resolved events reach Alertmanager; pending ones are not posted."""
    rule = f"TestPending{uuid.uuid4().hex[:6]}"
    now = time.time_ns() // 1_000_000
    client = AlertmanagerClient(alertmanager.url)
    assert await client.post([_event(AlertState.PENDING, rule, now, now)], now) == 0
    assert alertmanager.alerts(alertname=rule) == []
