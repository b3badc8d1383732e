"""The collector against real Mosquitto and tansu: readings, dead letters, vendor notices."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import orjson
import pytest

from citypulse.events import ReadingBatch, Rejection
from citypulse.settings import Settings
from collectors.dlq import list_rejections, replay
from collectors.service import Collector
from collectors.validate import Limits, Validator

from .helpers import MqttPeer, read_topic
from .registry import REGISTRY_YAML, registry

pytestmark = pytest.mark.integration


@pytest.fixture
def collector_settings(settings_factory: Callable[..., Settings], tmp_path: Path) -> Settings:
    path = tmp_path / "registry.yaml"
    path.write_text(REGISTRY_YAML)
    return settings_factory(registry=path, mqtt_client_id=f"collector-{tmp_path.name}")


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Collector]:
    """A collector running in this event loop, ready (subscribed) on entry, stopped on exit."""
    collector = Collector(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(collector.run(stop), name="collector")
    deadline = time.monotonic() + 20
    while not collector.ready:
        assert not task.done(), task.exception()
        assert time.monotonic() < deadline, "collector not ready in 20 s"
        await asyncio.sleep(0.05)
    try:
        yield collector
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


def up(vendor: str, sensor: str) -> str:
    return f"citypulse/v1/{vendor}/{sensor}/up"


async def test_valid_readings_and_dead_letters_from_several_vendors(
    collector_settings: Settings,
) -> None:
    """Good JSON and SenML reach the readings topic keyed by sensor; each bad message is
    dead-lettered with its reason and announced on the vendor's rejects topic."""
    s = collector_settings
    now_ms = int(time.time() * 1000)
    good = [
        (up("aquasense", "wtr-0001"), {"ts": now_ms - 2000, "values": {"pressure": 3.1}}),
        (
            up("aquasense", "wtr-0002"),
            [{"ts": now_ms - 1000 * i, "values": {"pressure": 2.0 + i}} for i in range(3)],
        ),
        (
            up("lumen", "lgt-0001"),
            [{"bn": "lgt-0001:", "bt": now_ms / 1000}, {"n": "dim_level", "u": "%", "v": 80},
             {"n": "lamp_on", "vb": True}],
        ),
        (up("aquasense", "wtr-0001"), {"ts": now_ms, "values": {"pressure": 99}}),  # flagged
    ]  # fmt: skip
    bad = [
        (up("aquasense", "wtr-9999"), orjson.dumps({"ts": now_ms, "values": {"pressure": 1}})),
        (up("lumen", "wtr-0001"), orjson.dumps({"ts": now_ms, "values": {"pressure": 2}})),
        (up("aquasense", "wtr-0002"), b'{"ts": '),
        (up("lumen", "lgt-0001"), orjson.dumps([{"n": "dim_level", "u": "/", "v": 0.8}])),
        (up("aquasense", "wtr-0001"), orjson.dumps({"ts": now_ms + 3_600_000, "values": {}})),
    ]
    expected_reasons = {
        "unknown_sensor",
        "wrong_vendor",
        "malformed_json",
        "wrong_unit",
        "bad_schema",
    }
    rejects = MqttPeer(s.mqtt_url, subscribe="citypulse/v1/+/+/rejects")
    publisher = MqttPeer(s.mqtt_url)
    try:
        async with running(s):
            for topic, payload in good:
                publisher.publish(topic, orjson.dumps(payload))
            for topic, raw in bad:
                publisher.publish(topic, raw)
            readings = await read_topic(s, "readings", until=len(good))
            dead = await read_topic(s, "deadletter", until=len(bad))
            deadline = time.monotonic() + 5
            while len(rejects.messages()) < len(bad) - 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
    finally:
        publisher.close()
        rejects.close()

    batches = [(key, ReadingBatch.decode(value)) for key, value in readings]
    assert len(batches) == len(good)
    assert all(key == b.sensor.encode() for key, b in batches)
    got = sorted((b.sensor, r.metric, r.ts_ms, r.value, r.quality) for _, b in batches
                 for r in b.readings)  # fmt: skip
    assert got == sorted(
        [
            ("wtr-0001", "pressure", now_ms - 2000, 3.1, 0),
            ("wtr-0002", "pressure", now_ms, 2.0, 0),
            ("wtr-0002", "pressure", now_ms - 1000, 3.0, 0),
            ("wtr-0002", "pressure", now_ms - 2000, 4.0, 0),
            ("lgt-0001", "dim_level", now_ms, 80.0, 0),
            ("lgt-0001", "lamp_on", now_ms, 1.0, 0),
            ("wtr-0001", "pressure", now_ms, 99.0, 1),
        ]
    )

    rejections = [(key, Rejection.decode(value)) for key, value in dead]
    assert len(rejections) == len(bad)
    assert {r.reason.value for _, r in rejections} == expected_reasons
    assert all(key == (r.vendor or "").encode() for key, r in rejections)
    assert sorted(r.raw for _, r in rejections) == sorted(raw for _, raw in bad)

    notices = rejects.messages()
    assert len(notices) == len(bad)
    by_hash = {r.message_hash: r for _, r in rejections}
    for topic, payload in notices:
        notice = orjson.loads(payload)
        rejection = by_hash[notice["message_hash"]]
        assert topic == f"citypulse/v1/{rejection.vendor}/{rejection.sensor}/rejects"
        assert notice["reason"] == rejection.reason.value


async def test_stop_acks_everything_so_a_restart_redelivers_nothing(
    collector_settings: Settings,
) -> None:
    """After a graceful stop, the same client id's next session gets only new messages."""
    s = collector_settings
    publisher = MqttPeer(s.mqtt_url)
    try:
        async with running(s):
            for i in range(20):
                payload = {"ts": int(time.time() * 1000) - i, "values": {"pressure": float(i)}}
                publisher.publish(up("aquasense", "wtr-0001"), orjson.dumps(payload))
            assert len(await read_topic(s, "readings", until=20, settle_s=0)) >= 20
        async with running(s):
            publisher.publish(
                up("aquasense", "wtr-0002"),
                orjson.dumps({"ts": int(time.time() * 1000), "values": {"pressure": 1.0}}),
            )
            records = await read_topic(s, "readings", until=21, settle_s=1.0)
    finally:
        publisher.close()
    assert len(records) == 21


async def test_dlq_list_and_replay_after_registry_fix(collector_settings: Settings) -> None:
    """A message for a sensor registered later is replayed once into readings; a second
    replay re-submits nothing; list shows every dead letter with its reason."""
    s = collector_settings
    now_ms = int(time.time() * 1000)
    publisher = MqttPeer(s.mqtt_url)
    try:
        async with running(s):
            publisher.publish(
                up("aquasense", "wtr-0003"),
                orjson.dumps({"ts": now_ms, "values": {"pressure": 5.0}}),
            )
            publisher.publish(up("aquasense", "wtr-0001"), b"garbage")
            await read_topic(s, "deadletter", until=2, settle_s=0)
    finally:
        publisher.close()

    listed = await list_rejections(s)
    assert sorted(r.reason.value for r in listed) == ["malformed_json", "unknown_sensor"]
    assert [r.sensor for r in await list_rejections(s, reason="unknown_sensor")] == ["wtr-0003"]

    fixed = registry().model_copy(
        update={
            "sensors": [
                *registry().sensors,
                registry().by_id()["wtr-0002"].model_copy(update={"id": "wtr-0003"}),
            ]
        }
    )
    validator = Validator(fixed, Limits.from_settings(s))
    first = await replay(s, validator)
    assert (first.replayed, first.readings) == (1, 1)
    assert dict(first.still_refused) == {"malformed_json": 1}
    second = await replay(s, validator)
    assert (second.replayed, sum(second.still_refused.values())) == (0, 0)

    readings = await read_topic(s, "readings", until=1, settle_s=0.5)
    assert [ReadingBatch.decode(v).sensor for _, v in readings] == ["wtr-0003"]
    assert Counter(k for k, _ in readings) == {b"wtr-0003": 1}
