"""Where effects go: Kafka topics, PostgreSQL audit tables, MQTT downlink.

Every write is idempotent on the effect's identity, so the replay that follows a crash (see
README.md) cannot duplicate anything durable:

* alert events: ``alert_events`` unique on ``(fingerprint, ts, state)``, ``ON CONFLICT DO NOTHING``;
* commands: ``commands.command_id`` primary key; a command already audited is not re-published
  on MQTT. A crash between the MQTT publish and the audit insert re-publishes the command with
  the same ``command_id`` (devices must ignore a repeated id).

Kafka has no such dedup here (tansu has no idempotent producer), so the alerts and commands
topics may carry a repeated record, with the same identity, after a crash.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import orjson
import paho.mqtt.client as mqtt
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from paho.mqtt.enums import CallbackAPIVersion

from citypulse.events import AlertEvent, CommandEvent, ms_to_dt
from citypulse.settings import Settings
from rules.runtime import metrics
from rules.runtime.errors import SinkError

log = logging.getLogger("citypulse.rules.sinks")

_INSERT_ALERT = """
INSERT INTO alert_events (fingerprint, rule, rule_version, rule_group, state, severity, labels,
    annotations, "values", window_s, active_since, ts, evaluated_at, notify)
VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8::jsonb, $9::jsonb, $10, $11, $12, $13, $14)
ON CONFLICT (fingerprint, ts, state) DO NOTHING
"""

_INSERT_COMMAND = """
INSERT INTO commands (command_id, rule, rule_version, sensor_id, vendor, setting, value,
    previous, status, reason, ts)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
ON CONFLICT (command_id) DO NOTHING
"""


def downlink_topic(vendor: str, sensor: str) -> str:
    """The MQTT topic a command for ``sensor`` is published on."""
    return f"citypulse/v1/{vendor}/{sensor}/down"


def downlink_payload(cmd: CommandEvent) -> bytes:
    """JSON body of a downlink command: ``{command_id, setting, value, ts}`` (ts in epoch ms)."""
    return orjson.dumps(
        {"command_id": cmd.command_id, "setting": cmd.setting, "value": cmd.value, "ts": cmd.ts_ms}
    )


class MqttPublisher:
    """A paho client publishing QoS 1 messages and waiting for the broker's PUBACK."""

    def __init__(self, settings: Settings, client_id: str | None = None) -> None:
        url = urlsplit(settings.mqtt_url)
        self._host = url.hostname or "127.0.0.1"
        self._port = url.port or (8883 if url.scheme == "mqtts" else 1883)
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"rules-{uuid.uuid4().hex[:10]}",
            protocol=mqtt.MQTTv5,
        )
        if settings.mqtt_username:
            password = settings.mqtt_password.get_secret_value() if settings.mqtt_password else None
            self._client.username_pw_set(settings.mqtt_username, password)
        if url.scheme == "mqtts":
            ca = str(settings.mqtt_ca_file) if settings.mqtt_ca_file else None
            self._client.tls_set_context(ssl.create_default_context(cafile=ca))
        # Bounded: while the broker is away, publishes beyond this fail (and are retried by
        # the worker) instead of piling up in memory.
        self._client.max_queued_messages_set(1000)
        self._connected = asyncio.Event()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()

        def on_connect(*_: Any) -> None:
            loop.call_soon_threadsafe(self._connected.set)

        self._client.on_connect = on_connect
        await asyncio.to_thread(self._client.connect, self._host, self._port, 30)
        self._client.loop_start()
        await asyncio.wait_for(self._connected.wait(), 10)

    async def publish(self, topic: str, payload: bytes, timeout_s: float = 10.0) -> None:
        info = self._client.publish(topic, payload, qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise SinkError(f"MQTT publish to {topic} failed: rc={info.rc}")
        await asyncio.to_thread(info.wait_for_publish, timeout_s)
        if not info.is_published():
            raise SinkError(f"MQTT publish to {topic} not acknowledged in {timeout_s}s")

    async def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def connected(self) -> bool:
        return self._client.is_connected()


class Sinks:
    """Delivers alert events and commands to Kafka, PostgreSQL and MQTT.

    Args:
        settings: process settings (topic names).
        producer: a started Kafka producer.
        pool: asyncpg pool on the citypulse database (migrations applied).
        mqtt_publisher: a started MQTT publisher (commands with status ``sent``).
    """

    def __init__(
        self,
        settings: Settings,
        producer: AIOKafkaProducer,
        pool: asyncpg.Pool,
        mqtt_publisher: MqttPublisher,
    ) -> None:
        self._alerts_topic = settings.topic("alerts")
        self._commands_topic = settings.topic("commands")
        self._producer = producer
        self._pool = pool
        self._mqtt = mqtt_publisher

    async def alerts(self, events: Sequence[AlertEvent]) -> None:
        """Publish and record ``events``; returns once Kafka acked and the rows are committed."""
        if not events:
            return
        futures = [
            await self._producer.send(self._alerts_topic, e.encode(), key=e.fingerprint.encode())
            for e in events
        ]
        rows = [
            (
                e.fingerprint,
                e.rule,
                e.rule_version,
                e.group,
                str(e.state),
                e.severity,
                json.dumps(e.labels),
                json.dumps(e.annotations),
                json.dumps(e.values),
                e.window_s,
                ms_to_dt(e.active_since_ms) if e.active_since_ms is not None else None,
                ms_to_dt(e.ts_ms),
                ms_to_dt(e.evaluated_ms),
                e.notify,
            )
            for e in events
        ]
        try:
            async with self._pool.acquire() as conn:
                await conn.executemany(_INSERT_ALERT, rows)
            await asyncio.gather(*futures)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, KafkaError, OSError) as exc:
            raise SinkError(f"recording {len(events)} alert events: {exc}") from exc
        for e in events:
            metrics.ALERT_EVENTS.labels(str(e.state)).inc()

    async def commands(self, commands: Sequence[CommandEvent]) -> None:
        """Publish, send (status ``sent`` only, once per ``command_id``) and audit commands."""
        if not commands:
            return
        futures = [
            await self._producer.send(self._commands_topic, c.encode(), key=c.sensor.encode())
            for c in commands
        ]
        try:
            async with self._pool.acquire() as conn:
                known = {
                    r["command_id"]
                    for r in await conn.fetch(
                        "SELECT command_id FROM commands WHERE command_id = ANY($1::text[])",
                        [c.command_id for c in commands],
                    )
                }
                for c in commands:
                    if c.command_id in known:
                        continue  # replay after a crash: already sent and audited
                    if c.status == "sent":
                        await self._mqtt.publish(
                            downlink_topic(c.vendor, c.sensor), downlink_payload(c)
                        )
                    await conn.execute(
                        _INSERT_COMMAND,
                        c.command_id,
                        c.rule,
                        c.rule_version,
                        c.sensor,
                        c.vendor,
                        c.setting,
                        c.value,
                        c.previous,
                        c.status,
                        c.reason,
                        ms_to_dt(c.ts_ms),
                    )
                    metrics.COMMANDS.labels(c.status).inc()
            await asyncio.gather(*futures)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, KafkaError, OSError) as exc:
            raise SinkError(f"recording {len(commands)} commands: {exc}") from exc
