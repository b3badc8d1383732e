"""Fault-suite harness: the real pipeline as subprocesses, a retrying QoS 1 publisher, counts.

MQTT publish (QoS 1) → ``citypulse collect`` → Kafka (tansu) → ``citypulse store`` →
PostgreSQL. Services run as child processes configured only through ``CITYPULSE_*`` variables,
as in production, so SIGKILL is a real crash.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from citypulse.settings import Settings
from deploy.embedded import free_port

CITYPULSE = Path(sys.executable).parent / "citypulse"
ROOT = Path(__file__).resolve().parents[2]

REGISTRY_YAML = """
version: 1
city: faultville
sensors:
  - id: wtr-0001
    vendor: aquasense
    silo: water
    district: north
    asset: main-7
    location: {lat: 52.1, lon: 4.3}
    interval: 60s
    metrics:
      pressure: {unit: bar, min: 0, max: 16}
  - id: wtr-0002
    vendor: aquasense
    silo: water
    district: south
    asset: main-9
    location: {lat: 52.0, lon: 4.2}
    interval: 60s
    metrics:
      pressure: {unit: bar, min: 0, max: 16}
  - id: air-0001
    vendor: airly
    silo: air
    district: harbour
    asset: station-1
    location: {lat: 52.0, lon: 4.2}
    interval: 30s
    metrics:
      pm25: {unit: ug/m3, min: 0, max: 1000}
"""

RULES_YAML = """
groups:
  - name: faults
    rules:
      - name: FaultHighPressure
        select: {silo: water}
        expr: pressure > 14.5
        severity: warning
        annotations:
          summary: "{{ $sensor }} reads {{ pressure }} bar"
"""
"""Fires on every reading of 15 bar, resolves on the next lower one (see ``Publisher``)."""

RULE_WORKER = (
    "rules run --tick-s 0 --checkpoint-s 1 --checkpoint-records 40 --reload-poll-s 0 "
    "--session-timeout-ms 3000"
)

STREAM = (("aquasense", "wtr-0001", "pressure"), ("aquasense", "wtr-0002", "pressure"))


def service_env(settings: Settings, metrics_port: int, **extra: str) -> dict[str, str]:
    """The ``CITYPULSE_*`` environment of a service process pointed at ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CITYPULSE_")}
    env.update(
        CITYPULSE_MQTT_URL=settings.mqtt_url,
        CITYPULSE_KAFKA_BOOTSTRAP=settings.kafka_bootstrap,
        CITYPULSE_DATABASE_URL=settings.dsn,
        CITYPULSE_TOPIC_PREFIX=settings.topic_prefix,
        CITYPULSE_PARTITIONS=str(settings.partitions),
        CITYPULSE_MQTT_SHARED_GROUP=settings.mqtt_shared_group,
        CITYPULSE_REGISTRY=str(settings.registry),
        CITYPULSE_METRICS_PORT=str(metrics_port),
        CITYPULSE_WRITER_BATCH_MAX=str(settings.writer_batch_max),
        CITYPULSE_WRITER_BATCH_WAIT_MS=str(settings.writer_batch_wait_ms),
        CITYPULSE_RULES=str(settings.rules),
        CITYPULSE_STATE_DIR=str(settings.state_dir),
        CITYPULSE_LOG_JSON="false",
    )
    if settings.mqtt_ca_file is not None:
        env["CITYPULSE_MQTT_CA_FILE"] = str(settings.mqtt_ca_file)
    env.update(extra)
    return env


class Service:
    """One ``citypulse <command>`` child process; ``start()`` again after a kill restarts it
    with the same environment (same MQTT client id: the broker keeps its session)."""

    def __init__(self, command: str, settings: Settings, log_dir: Path, name: str, **env: str):
        self.command = command
        self.name = name
        self.port = free_port()
        self.log = log_dir / f"{name}.log"
        if command == "collect":
            env.setdefault("CITYPULSE_MQTT_CLIENT_ID", f"{name}-{uuid.uuid4().hex[:6]}")
        self.env = service_env(settings, self.port, **env)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> Service:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(CITYPULSE), *self.command.split()],
                env=self.env,
                cwd=ROOT,
                stdout=out,
                stderr=out,
            )
        self.starts += 1
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def readyz(self) -> int:
        """HTTP status of ``/readyz`` (0 when nothing answers)."""
        try:
            url = f"http://127.0.0.1:{self.port}/readyz"
            with urllib.request.urlopen(url, timeout=1) as r:
                return int(r.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except OSError:
            return 0

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=2) as r:
            return bytes(r.read()).decode()

    def wait_status(self, status: int, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        last = -1
        while time.monotonic() < deadline:
            assert self.alive, f"{self.name} exited:\n{self.tail()}"
            last = self.readyz()
            if last == status:
                return
            time.sleep(0.1)
        raise AssertionError(f"{self.name} /readyz {last}, wanted {status}:\n{self.tail()}")

    def wait_ready(self, timeout_s: float = 30.0) -> Service:
        self.wait_status(200, timeout_s)
        return self

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout_s: float = 20.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


def metric_values(text: str, name: str) -> list[float]:
    """Every sample value of metric ``name`` in a Prometheus text exposition."""
    out = []
    for line in text.splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            out.append(float(line.rsplit(" ", 1)[1]))
    return out


class Publisher:
    """A vendor publishing a steady stream of QoS 1 messages, one reading each, in a thread.

    Every message is retried until the broker acknowledges it (as a vendor's paho client with
    an outbox would do across a broker restart); a retry may publish a message twice, which is
    fine: the pipeline must store it once. ``at`` maps a message index to a hook run in the
    publishing thread right after that message was acknowledged (to inject a fault).
    """

    def __init__(
        self,
        url: str,
        n: int,
        rate_per_s: float,
        at: dict[int, Callable[[], None]] | None = None,
        stream: tuple[tuple[str, str, str], ...] = STREAM,
    ) -> None:
        self.url = urlsplit(url)
        self.n = n
        self.interval_s = 1.0 / rate_per_s
        self.at = at or {}
        self.stream = stream
        self.base_ms = int(time.time() * 1000) - 120_000
        self.acked = 0
        self.retries = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex}")
        self.client.max_inflight_messages_set(100)
        self.client.reconnect_delay_set(1, 2)
        self.client.connect(self.url.hostname or "127.0.0.1", self.url.port or 1883)
        self.client.loop_start()

    def message(self, i: int) -> tuple[str, bytes]:
        vendor, sensor, metric = self.stream[i % len(self.stream)]
        payload = {"ts": self.base_ms + i, "values": {metric: float(i % 16)}}
        return f"citypulse/v1/{vendor}/{sensor}/up", orjson.dumps(payload)

    def expected(self) -> set[tuple[str, str, int]]:
        """(sensor, metric, ts) of every message: what must be stored, each once."""
        out = set()
        for i in range(self.n):
            _, sensor, metric = self.stream[i % len(self.stream)]
            out.add((sensor, metric, self.base_ms + i))
        return out

    def _publish_until_acked(self, topic: str, payload: bytes) -> None:
        while True:
            info = self.client.publish(topic, payload, qos=1)
            try:
                info.wait_for_publish(2)
                if info.is_published():
                    return
            except (RuntimeError, ValueError):
                pass  # not connected (broker restarting): try again
            self.retries += 1
            time.sleep(0.1)

    def _run(self) -> None:
        try:
            next_at = time.monotonic()
            for i in range(self.n):
                self._publish_until_acked(*self.message(i))
                self.acked += 1
                hook = self.at.get(i)
                if hook is not None:
                    hook()
                next_at += self.interval_s
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                else:
                    next_at = time.monotonic()
        except BaseException as exc:
            self.error = exc

    def start(self) -> Publisher:
        self._thread.start()
        return self

    def join(self, timeout_s: float = 120.0) -> None:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), f"publisher stuck at {self.acked}/{self.n}"
        if self.error is not None:
            raise self.error
        assert self.acked == self.n

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def stored(dsn: str) -> tuple[int, int]:
    """(rows, distinct (sensor, metric, ts)) in ``readings``."""
    c = await asyncpg.connect(dsn)
    try:
        row: Any = await c.fetchrow(
            "SELECT count(*) AS n, count(DISTINCT (sensor_id, metric, ts)) AS d FROM readings"
        )
        return int(row["n"]), int(row["d"])
    finally:
        await c.close()


async def stored_keys(dsn: str) -> set[tuple[str, str, int]]:
    c = await asyncpg.connect(dsn)
    try:
        rows = await c.fetch(
            "SELECT sensor_id, metric, (extract(epoch FROM ts) * 1000)::bigint AS ms FROM readings"
        )
        return {(r["sensor_id"], r["metric"], int(r["ms"])) for r in rows}
    finally:
        await c.close()


async def wait_stored(dsn: str, expected: int, timeout_s: float = 60.0) -> tuple[int, int]:
    """Poll until ``readings`` holds ``expected`` rows, then 0.5 s more for late duplicates."""
    import asyncio

    deadline = time.monotonic() + timeout_s
    counts = (0, 0)
    while time.monotonic() < deadline:
        counts = await stored(dsn)
        if counts[0] >= expected:
            await asyncio.sleep(0.5)
            return await stored(dsn)
        await asyncio.sleep(0.2)
    return counts
