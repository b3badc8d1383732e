"""Crash safety: SIGKILL the collector process mid-stream; after a restart nothing is lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from citypulse.events import ReadingBatch
from citypulse.settings import Settings
from deploy.embedded import free_port

from .helpers import MqttPeer, read_topic
from .registry import REGISTRY_YAML

pytestmark = pytest.mark.integration

CITYPULSE = Path(sys.executable).parent / "citypulse"
N = 400


def _start(settings: Settings, client_id: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "CITYPULSE_MQTT_URL": settings.mqtt_url,
        "CITYPULSE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "CITYPULSE_TOPIC_PREFIX": settings.topic_prefix,
        "CITYPULSE_PARTITIONS": str(settings.partitions),
        "CITYPULSE_MQTT_SHARED_GROUP": settings.mqtt_shared_group,
        "CITYPULSE_MQTT_CLIENT_ID": client_id,
        "CITYPULSE_REGISTRY": str(settings.registry),
        "CITYPULSE_METRICS_PORT": str(port),
        "CITYPULSE_LOG_JSON": "false",
    }
    with log.open("ab") as out:
        return subprocess.Popen([str(CITYPULSE), "collect"], env=env, stdout=out, stderr=out)


def _wait_ready(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"collector not ready:\n{log.read_text()}")


def _distinct(records: list[tuple[bytes | None, bytes]]) -> set[tuple[str, str, int]]:
    """(sensor, metric, ts) of every reading in ``records``."""
    return {
        (b.sensor, r.metric, r.ts_ms)
        for b in (ReadingBatch.decode(v) for _, v in records)
        for r in b.readings
    }


async def test_sigkill_mid_stream_loses_nothing(
    settings_factory: Callable[..., Settings], tmp_path: Path
) -> None:
    """N QoS 1 messages, collector killed -9 part-way and restarted: every message's reading
    is on Kafka at least once (distinct (sensor, metric, ts) == N)."""
    registry = tmp_path / "registry.yaml"
    registry.write_text(REGISTRY_YAML)
    s = settings_factory(registry=registry)
    client_id = f"crash-{tmp_path.name}"
    log = tmp_path / "collector.log"
    port = free_port()
    proc = _start(s, client_id, port, log)
    publisher: MqttPeer | None = None
    try:
        _wait_ready(proc, port, log)
        publisher = MqttPeer(s.mqtt_url)
        base = int(time.time() * 1000) - 60_000
        sent = 0
        killed = threading.Event()

        def publish_all() -> None:
            nonlocal sent
            for i in range(N):
                sensor = ("wtr-0001", "wtr-0002")[i % 2]
                payload = {"ts": base + i, "values": {"pressure": float(i % 16)}}
                assert publisher is not None
                publisher.publish(f"citypulse/v1/aquasense/{sensor}/up", orjson.dumps(payload))
                sent += 1
                if i == N // 3:
                    proc.send_signal(signal.SIGKILL)
                    killed.set()
                time.sleep(0.002)

        thread = threading.Thread(target=publish_all)
        thread.start()
        assert killed.wait(30)
        proc.wait(10)
        assert proc.returncode == -signal.SIGKILL
        thread.join(60)
        assert sent == N
        proc = _start(s, client_id, port, log)
        _wait_ready(proc, port, log)
        # Redelivery after the kill makes duplicates, so N records can arrive before the last
        # distinct ones: read again until N distinct readings are there (or the time is up).
        deadline = time.monotonic() + 30
        while True:
            records = await read_topic(s, "readings", until=N, timeout_s=30, settle_s=0.5)
            if len(_distinct(records)) >= N or time.monotonic() > deadline:
                break
    finally:
        if publisher is not None:
            publisher.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
    assert proc.returncode == 0, log.read_text()[-2000:]
    distinct = _distinct(records)
    missing = sorted(set(range(N)) - {ts - base for _, _, ts in distinct})
    assert len(distinct) == N, (
        f"{len(distinct)} of {N} distinct readings, {len(records)} records; missing messages "
        f"{missing} (killed after message {N // 3})\n{log.read_text()[-3000:]}"
    )
    assert all(k == ReadingBatch.decode(v).sensor.encode() for k, v in records)
