"""The rule worker end to end on the real servers: readings in; alerts, commands and
Alertmanager notifications out; maintenance windows; hot reload."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from citypulse.events import AlertState
from citypulse.settings import Settings
from rules.runtime import WorkerOptions

from .conftest import Alertmanager
from .helpers import (
    MqttInbox,
    alert_rows,
    batch,
    command_rows,
    eventually,
    kafka_alerts,
    produce,
    running_worker,
)

pytestmark = pytest.mark.integration


def firing(rows: list[dict[str, Any]], rule: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["rule"] == rule and r["state"] == "firing"]


async def test_readings_raise_alerts_commands_and_notifications(
    rt_settings: Settings, alertmanager: Alertmanager, run_id: str
) -> None:
    """Low pressure fires (DB, Kafka, Alertmanager); a dark street light gets a command on MQTT;
    a district-wide low average fires a group alert; recovery resolves the sensor alert."""
    inbox = MqttInbox(rt_settings, "citypulse/v1/+/+/down")
    await inbox.ready()
    t0 = time.time_ns() // 1_000_000 - 60_000
    evaluations = _metric("citypulse_rules_evaluations_total", stage="sensor")
    sent = _metric("citypulse_rules_commands_total", status="sent")
    try:
        async with running_worker(rt_settings):
            await produce(
                rt_settings,
                batch("wtr-0001", t0, pressure=1.2),
                batch("lgt-0001", t0, lux=5.0),
                batch("wtr-0003", t0, pressure=4.0),
            )
            rows = await eventually(
                lambda: alert_rows(rt_settings), lambda r: firing(r, "WaterLowPressure")
            )
            low = firing(rows, "WaterLowPressure")
            assert [r["labels"]["sensor"] for r in low] == ["wtr-0001"]
            assert low[0]["notify"] is True

            # The command went out on MQTT to the light and is audited.
            msgs = await eventually(lambda: _copy(inbox), bool)
            topic, body = msgs[0]
            assert topic == "citypulse/v1/lumina/lgt-0001/down"
            assert body["setting"] == "dim_level"
            assert body["value"] == 100
            cmds = await command_rows(rt_settings)
            assert [(c["command_id"], c["status"]) for c in cmds] == [(body["command_id"], "sent")]

            # Alertmanager shows the firing alert with its labels.
            am = await eventually(
                lambda: asyncio.to_thread(
                    alertmanager.alerts, alertname="WaterLowPressure", sensor="wtr-0001", run=run_id
                ),
                bool,
            )
            assert am[0]["labels"]["severity"] == "critical"

            # A second low sensor of district north pulls the district average below 1.5.
            await produce(rt_settings, batch("wtr-0002", t0 + 1000, pressure=1.0))
            rows = await eventually(
                lambda: alert_rows(rt_settings), lambda r: firing(r, "DistrictLowPressure")
            )
            [group_alert] = firing(rows, "DistrictLowPressure")
            assert group_alert["labels"].get("district") == "north"

            # Recovery above the clear threshold resolves the sensor alert everywhere.
            await produce(rt_settings, batch("wtr-0001", t0 + 2000, pressure=3.0))
            rows = await eventually(
                lambda: alert_rows(rt_settings),
                lambda r: any(
                    x["rule"] == "WaterLowPressure" and x["state"] == "resolved" for x in r
                ),
            )
            await eventually(
                lambda: asyncio.to_thread(
                    alertmanager.alerts, alertname="WaterLowPressure", sensor="wtr-0001", run=run_id
                ),
                lambda a: a == [],
            )
    finally:
        inbox.close()

    assert _metric("citypulse_rules_evaluations_total", stage="sensor") - evaluations == 5
    assert _metric("citypulse_rules_commands_total", status="sent") - sent == 1
    events = await kafka_alerts(rt_settings, expect=len(rows))
    kinds = {(e.rule, e.labels.get("sensor"), e.state) for e in events}
    assert ("WaterLowPressure", "wtr-0001", AlertState.FIRING) in kinds
    assert ("WaterLowPressure", "wtr-0001", AlertState.RESOLVED) in kinds
    assert all(e.fingerprint for e in events)


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def _copy(inbox: MqttInbox) -> list[tuple[str, dict[str, Any]]]:
    return list(inbox.messages)


def _ms(dt: datetime) -> int:
    return round(dt.timestamp() * 1000)


async def test_maintenance_window_records_quietly_then_renotifies(
    rt_settings: Settings, rules_dir: Path, alertmanager: Alertmanager, run_id: str
) -> None:
    """Inside a window an alert is recorded with notify=false and not sent to Alertmanager;
    when event time passes the window's end while it still fires, it is sent."""
    (rules_dir / "maintenance.yaml").write_text(
        "windows:\n"
        "  - name: north-pumps\n"
        "    start: '02:00'\n"
        "    duration: 1h\n"
        "    timezone: UTC\n"
        "    match: {district: north, asset: pump}\n"
    )
    day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=1)
    inside, after = (
        _ms(day + timedelta(hours=2, minutes=30)),
        _ms(day + timedelta(hours=3, minutes=5)),
    )
    async with running_worker(rt_settings):
        await produce(rt_settings, batch("wtr-0001", inside, pressure=1.0))
        rows = await eventually(
            lambda: alert_rows(rt_settings), lambda r: firing(r, "WaterLowPressure")
        )
        assert firing(rows, "WaterLowPressure")[0]["notify"] is False
        await asyncio.sleep(1.0)  # give a wrong notification time to arrive
        assert (
            alertmanager.alerts(alertname="WaterLowPressure", sensor="wtr-0001", run=run_id) == []
        )

        # Still low after the window: the next reading moves event time past its end.
        await produce(rt_settings, batch("wtr-0001", after, pressure=1.1))
        await eventually(
            lambda: asyncio.to_thread(
                alertmanager.alerts, alertname="WaterLowPressure", sensor="wtr-0001", run=run_id
            ),
            bool,
        )
    # Recorded once (firing inside the window), not raised again by the re-notification.
    assert len(firing(await alert_rows(rt_settings), "WaterLowPressure")) == 1


async def test_hot_reload_applies_valid_rules_and_refuses_broken_ones(
    rt_settings: Settings, rules_dir: Path
) -> None:
    """A changed threshold applies without restart; a broken file is refused and the running
    rules stay; an unchanged rule keeps its firing alert across reloads (no second firing)."""
    t0 = time.time_ns() // 1_000_000 - 60_000
    rules_file = rules_dir / "rules.yaml"
    async with running_worker(rt_settings) as worker:
        await produce(rt_settings, batch("wtr-0001", t0, pressure=1.5))
        await eventually(lambda: alert_rows(rt_settings), lambda r: firing(r, "WaterLowPressure"))

        # Street light threshold raised from 10 to 50 lux: 30 lux is now dark.
        rules_file.write_text(rules_file.read_text().replace("lux < 10", "lux < 50"))
        await eventually(lambda: _fingerprint(worker), lambda f: f == worker.source.fingerprint())
        await produce(rt_settings, batch("lgt-0001", t0 + 1000, lux=30.0))
        # An action rule commands instead of alerting: the light is dimmed up.
        cmds = await eventually(lambda: command_rows(rt_settings), bool)
        assert [(c["sensor_id"], c["value"]) for c in cmds] == [("lgt-0001", 100.0)]

        # A broken file is refused: the rules in force still raise alerts.
        good = rules_file.read_text()
        rules_file.write_text(good.replace("expr: pressure < 2.0", "expr: pressure <<< 2.0"))
        await asyncio.sleep(1.0)
        assert worker.loaded.ruleset is not None
        await produce(rt_settings, batch("wtr-0003", t0 + 2000, pressure=1.0))
        await eventually(
            lambda: alert_rows(rt_settings),
            lambda r: any(
                x["labels"].get("sensor") == "wtr-0003" for x in firing(r, "WaterLowPressure")
            ),
        )
        # Still low at wtr-0001 after the reloads: no second firing event for it.
        rules_file.write_text(good)
        await produce(rt_settings, batch("wtr-0001", t0 + 3000, pressure=1.4))
        await asyncio.sleep(1.0)
    rows = firing(await alert_rows(rt_settings), "WaterLowPressure")
    assert sorted(r["labels"]["sensor"] for r in rows) == ["wtr-0001", "wtr-0003"]


async def _fingerprint(worker: object) -> str:
    return worker.loaded.fingerprint  # type: ignore[attr-defined,no-any-return]


async def test_database_outage_delays_alerts_without_losing_them(rt_settings: Settings) -> None:
    """While alert_events cannot be written the worker retries (and reports not ready);
    once the table is back the alert is recorded, once."""
    import asyncpg

    from citypulse.service import HEALTH

    t0 = time.time_ns() // 1_000_000 - 60_000
    async with running_worker(rt_settings):
        conn = await asyncpg.connect(rt_settings.dsn)
        try:
            await conn.execute("ALTER TABLE alert_events RENAME TO alert_events_away")
            await produce(rt_settings, batch("wtr-0001", t0, pressure=1.0))
            await eventually(lambda: _health(HEALTH, "rules-sinks"), lambda ok: ok is False)
            await conn.execute("ALTER TABLE alert_events_away RENAME TO alert_events")
        finally:
            await conn.close()
        await eventually(lambda: alert_rows(rt_settings), lambda r: firing(r, "WaterLowPressure"))
        await eventually(lambda: _health(HEALTH, "rules-sinks"), bool)
    assert len(firing(await alert_rows(rt_settings), "WaterLowPressure")) == 1


async def _health(health: Any, name: str) -> bool:
    return bool(health.status()[name])


async def test_start_failure_reports_the_cause_and_closes_what_was_opened(
    rt_settings: Settings,
) -> None:
    """MQTT (for commands) refuses the connection: ``run`` fails with that error, and the
    database pool and both Kafka producers opened before it are closed, not left behind."""
    import gc
    import warnings

    from deploy.embedded import free_port
    from rules.runtime import RuleWorker

    settings = rt_settings.model_copy(update={"mqtt_url": f"mqtt://127.0.0.1:{free_port()}"})
    worker = RuleWorker(settings)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ConnectionRefusedError):
            await worker.run(asyncio.Event())
        producer = worker._producer
        del worker
        gc.collect()
    assert producer is not None
    assert producer._closed  # stopped; its sink twin and the pool warn below if not
    unclosed = [str(w.message) for w in caught if "nclosed" in str(w.message)]
    assert unclosed == []


async def test_alert_gauge_counts_restored_alerts_at_once(rt_settings: Settings) -> None:
    """``citypulse_rules_alerts{state="firing"}`` counts the firing alerts of the partitions
    a worker holds: a restarted worker reports the ones it restored from its snapshot as soon
    as it owns the partitions, before any new reading arrives (a poll without effects does
    not refresh the gauge). ``citypulse_rules_partitions`` counts the partitions it holds."""
    from rules.runtime import metrics

    async def gauge() -> float:
        return _metric("citypulse_rules_alerts", state="firing")

    t0 = time.time_ns() // 1_000_000 - 60_000
    async with running_worker(rt_settings):
        await produce(rt_settings, batch("wtr-0001", t0, pressure=1.2))
        # The sensor's alert and its district's (average 1.2 < 1.5): both stages fire one.
        await eventually(gauge, lambda v: v == 2)
    # A stopped worker holds nothing (aiokafka's stop leaves the group without a revoke).
    assert _metric("citypulse_rules_partitions", stage="sensor") == 0
    metrics.ALERTS.labels("firing").set(0)  # as in a new process
    async with running_worker(rt_settings) as worker:
        assert await gauge() == 2
        # The partitions gauge: what an operator (and the bench) waits on before load.
        for stage in worker.stages:
            held = _metric("citypulse_rules_partitions", stage=stage.name)
            assert held == len(stage.parts) == rt_settings.partitions
            # Only the sensor stage is on the alert path: the group stage's fetches may wait.
            assert stage.consumer is not None
            assert stage.consumer._fetch_max_wait_ms == (
                rt_settings.kafka_bulk_fetch_max_wait_ms
                if stage.name == "group"
                else rt_settings.kafka_fetch_max_wait_ms
            )


INTERVAL_RULES = """
groups:
  - name: city
    interval: 2s
    rules:
      - name: SiloLowPressure
        select: {silo: water}
        group_by: silo
        expr: group.avg(pressure) < 1.5
        labels: {run: "@RUN@"}
"""


async def test_group_interval_evaluates_each_interval_once_and_idle_time_closes_it(
    rt_settings: Settings, run_id: str
) -> None:
    """A group rule with ``interval: 2s`` sees each 2-s interval as of its latest reading: a
    silo average low for 100 ms inside an interval raises nothing; a low average at the end of
    the next one fires once, stamped with that reading, when idle time passes the interval's
    end (the worker's ticks; no later reading comes). The same reading also fires the sensor
    and district alerts: three group and sensor keys, each alert once."""
    (rt_settings.rules / "interval.yaml").write_text(INTERVAL_RULES.replace("@RUN@", run_id))
    t0 = (time.time_ns() // 1_000_000 - 60_000) // 2000 * 2000
    options = WorkerOptions(tick_s=0.2, checkpoint_s=0.5, reload_poll_s=0.2)
    async with running_worker(rt_settings, options):
        await produce(
            rt_settings,
            batch("wtr-0001", t0, pressure=1.0),
            batch("wtr-0002", t0 + 100, pressure=1.0),  # silo average 1.0
            batch("wtr-0003", t0 + 200, pressure=4.0),  # 2.0 at the interval's end
            batch("wtr-0003", t0 + 2000, pressure=1.0),  # 1.0: low from here on
        )
        rows = await eventually(
            lambda: alert_rows(rt_settings), lambda r: firing(r, "SiloLowPressure")
        )
        await asyncio.sleep(1.0)  # a second evaluation of the closed interval would show now
        rows = await alert_rows(rt_settings)
    silo = [(r["state"], _ms(r["ts"])) for r in rows if r["rule"] == "SiloLowPressure"]
    assert silo == [("firing", t0 + 2000)]
    districts = [r["labels"]["district"] for r in firing(rows, "DistrictLowPressure")]
    assert sorted(districts) == ["north", "south"]  # north from the start, south at the end
