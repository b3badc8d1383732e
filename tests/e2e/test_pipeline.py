"""The whole ingest path on real servers: vendors' MQTT → collector → Kafka → writer → PostgreSQL.

Several vendors publish JSON objects, JSON batches and SenML packs, with bad messages mixed in
and one message published twice. Every valid reading must be stored exactly once, every bad
message must be in the database's `rejections` (from the dead-letter topic) with its reason and
announced on the vendor's `rejects` topic, and the good readings around them are unaffected.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import orjson
import pytest

from citypulse.settings import Settings
from collectors.service import Collector
from storage import Writer, migrate
from tests.collectors.helpers import MqttPeer

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

# (vendor, sensor, metric, unit) from deploy/registry.example.yaml, one per payload format.
JSON_SENSOR = ("aquasense", "wtr-north-001", "pressure", "bar")
BATCH_SENSOR = ("voltiq", "nrg-north-001", "power", "kW")
SENML_SENSOR = ("airly", "air-north-001", "pm25", "ug/m3")


def up(vendor: str, sensor: str) -> str:
    return f"citypulse/v1/{vendor}/{sensor}/up"


@asynccontextmanager
async def pipeline(settings: Settings) -> AsyncIterator[None]:
    """A collector and a writer running in this event loop; stopped cleanly on exit."""
    await migrate(settings.dsn)
    stop = asyncio.Event()
    collector = Collector(settings)
    tasks = [
        asyncio.create_task(Writer(settings).run(stop), name="writer"),
        asyncio.create_task(collector.run(stop), name="collector"),
    ]
    deadline = time.monotonic() + 30
    while not collector.ready:
        for t in tasks:
            assert not t.done(), t.exception()
        assert time.monotonic() < deadline, "collector not ready in 30 s"
        await asyncio.sleep(0.05)
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)


def messages(
    now_ms: int, n: int
) -> tuple[list[tuple[str, bytes]], set[tuple[str, str, int, float]]]:
    """``n`` rounds of good messages in three formats, and the readings they carry."""
    out: list[tuple[str, bytes]] = []
    expected: set[tuple[str, str, int, float]] = set()
    for i in range(n):
        ts = now_ms - (n - i) * 1000
        vendor, sensor, metric, _ = JSON_SENSOR
        value = 3.0 + i / 100
        out.append((up(vendor, sensor), orjson.dumps({"ts": ts, "values": {metric: value}})))
        expected.add((sensor, metric, ts, value))
        vendor, sensor, metric, _ = BATCH_SENSOR
        batch = [{"ts": ts - k * 100, "values": {metric: 100.0 + k}} for k in range(5)]
        out.append((up(vendor, sensor), orjson.dumps(batch)))
        expected |= {(sensor, metric, ts - k * 100, 100.0 + k) for k in range(5)}
        vendor, sensor, metric, unit = SENML_SENSOR
        pack = [
            {"bn": f"urn:dev:citypulse:{sensor}:", "bt": ts / 1000, "bu": unit},
            {"n": metric, "v": 10.0 + i},
            {"n": metric, "t": 0.5, "v": 11.0 + i},
        ]
        out.append((up(vendor, sensor), orjson.dumps(pack)))
        expected |= {(sensor, metric, ts, 10.0 + i), (sensor, metric, ts + 500, 11.0 + i)}
    return out, expected


def bad_messages(now_ms: int) -> list[tuple[str, bytes, str]]:
    """(topic, payload, the reason code the contract promises)."""
    vendor, sensor, metric, _ = JSON_SENSOR
    sv, ss, sm, _ = SENML_SENSOR
    return [
        (up(vendor, "wtr-nowhere-999"), b'{"ts": 1, "values": {"pressure": 1}}', "unknown_sensor"),
        (up("voltiq", sensor), orjson.dumps({"ts": now_ms, "values": {metric: 2}}), "wrong_vendor"),
        (up(vendor, sensor), b'{"ts": 17000000', "malformed_json"),
        (up(vendor, sensor), orjson.dumps({"ts": now_ms, "values": {"hue": 1}}), "unknown_metric"),
        (
            up(vendor, sensor),
            orjson.dumps({"ts": now_ms + 3_600_000, "values": {metric: 2}}),
            "ts_in_future",
        ),
        (up(sv, ss), orjson.dumps([{"bn": f"{ss}:", "n": sm, "u": "%", "v": 1}]), "wrong_unit"),
    ]  # fmt: skip


async def test_json_and_senml_from_several_vendors_stored_once_bad_ones_refused(
    settings_factory: Callable[..., Settings],
) -> None:
    """Every valid reading stored exactly once (a re-sent message too); every bad message in
    `rejections` with its reason and answered on the vendor's rejects topic."""
    settings = settings_factory(registry=ROOT / "deploy" / "registry.example.yaml")
    now_ms = int(time.time() * 1000)
    good, expected = messages(now_ms, 30)
    bad = bad_messages(now_ms)
    out_of_range = ("wtr-north-001", "pressure", now_ms, 99.0)  # valid range 0..16 bar
    async with pipeline(settings):
        vendor_side = MqttPeer(settings.mqtt_url, subscribe="citypulse/v1/+/+/rejects")
        try:
            for k, (topic, payload) in enumerate(good):
                vendor_side.publish(topic, payload)
                if k == len(good) // 2:
                    for bad_topic, bad_payload, _ in bad:
                        vendor_side.publish(bad_topic, bad_payload)
            vendor_side.publish(good[0][0], good[0][1])  # the vendor re-sends a message
            vendor_side.publish(
                up("aquasense", "wtr-north-001"),
                orjson.dumps({"ts": now_ms, "values": {"pressure": 99.0}}),
            )
            conn = await asyncpg.connect(settings.dsn)
            try:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    stored = await conn.fetchval("SELECT count(*) FROM readings")
                    refused = await conn.fetchval("SELECT count(*) FROM rejections")
                    if stored >= len(expected) + 1 and refused >= len(bad):
                        break
                    await asyncio.sleep(0.2)
                await asyncio.sleep(1.0)  # anything extra (a duplicate) would show up now
                rows = await conn.fetch(
                    "SELECT sensor_id, metric, ts, value, quality FROM readings"
                )
                reasons = Counter(
                    r["reason"] for r in await conn.fetch("SELECT reason FROM rejections")
                )
            finally:
                await conn.close()
            notices = [orjson.loads(p) for _, p in vendor_side.messages()]
        finally:
            vendor_side.close()

    got = Counter(
        (r["sensor_id"], r["metric"], int(r["ts"].timestamp() * 1000), r["value"]) for r in rows
    )
    assert sum(got.values()) == len(expected) + 1, "each reading stored exactly once"
    assert max(got.values()) == 1
    assert set(got) == expected | {out_of_range}
    flagged = {(r["sensor_id"], r["value"]) for r in rows if r["quality"] != 0}
    assert flagged == {("wtr-north-001", 99.0)}
    assert reasons == Counter(reason for _, _, reason in bad)
    assert sorted(n["reason"] for n in notices) == sorted(reason for _, _, reason in bad)
