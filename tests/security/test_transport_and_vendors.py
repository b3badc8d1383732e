"""MQTT over TLS, spoofed vendors on a too-wide broker, and a flooding vendor."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client import REGISTRY

from citypulse.events import ReadingBatch, Rejection, RejectReason
from citypulse.settings import Settings
from collectors.mqtt_client import LeanClient
from collectors.service import Collector
from deploy.embedded import Mosquitto
from tests.collectors.helpers import MqttPeer, read_topic, receive_burst
from tests.faults._harness import REGISTRY_YAML

pytestmark = pytest.mark.integration


@pytest.fixture
def make_settings(
    settings_factory: Callable[..., Settings], tmp_path: Path
) -> Callable[..., Settings]:
    registry = tmp_path / "registry.yaml"
    registry.write_text(REGISTRY_YAML)

    def make(**overrides: object) -> Settings:
        values: dict[str, object] = {
            "registry": registry,
            "mqtt_client_id": f"sec-{tmp_path.name[-20:]}",
        }
        values.update(overrides)
        return settings_factory(**values)

    return make


@asynccontextmanager
async def running(settings: Settings, ready_within_s: float = 20) -> AsyncIterator[Collector]:
    collector = Collector(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(collector.run(stop), name="collector")
    try:
        deadline = time.monotonic() + ready_within_s
        while not collector.ready and time.monotonic() < deadline:
            assert not task.done(), task.exception()
            await asyncio.sleep(0.05)
        yield collector
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def tls_broker() -> Iterator[tuple[Mosquitto, Path]]:
    """A Mosquitto with an mqtts:// listener whose certificate (for IP 127.0.0.1) is signed by a
    CA made here; returns the broker and the CA file. The directory is world-readable because
    Mosquitto started as root reads its key as the user ``mosquitto``."""
    d = Path(tempfile.mkdtemp(prefix="citypulse-sec-tls-"))
    d.chmod(0o755)
    try:
        _openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
            "ca.crt", "-days", "1", "-subj", "/CN=citypulse test CA", cwd=d,
        )  # fmt: skip
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out",
            "server.csr", "-subj", "/CN=127.0.0.1", cwd=d,
        )  # fmt: skip
        (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
        _openssl(
            "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.crt", "-days", "1", "-extfile", "san.ext", cwd=d,
        )  # fmt: skip
        for f in d.iterdir():
            f.chmod(0o644)
        broker = Mosquitto(d, tls=(d / "server.crt", d / "server.key"))
        broker.dir.chmod(0o777)
        broker.start()
        try:
            yield broker, d / "ca.crt"
        finally:
            broker.stop()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _decode(records: list[tuple[bytes | None, bytes]]) -> list[ReadingBatch]:
    return [ReadingBatch.decode(v) for _, v in records]


async def test_collector_connects_over_tls_with_the_configured_ca(
    make_settings: Callable[..., Settings], tls_broker: tuple[Mosquitto, Path]
) -> None:
    """``mqtts://`` + ``CITYPULSE_MQTT_CA_FILE``: the collector verifies the broker's certificate
    and collects over TLS."""
    broker, ca = tls_broker
    url = f"mqtts://127.0.0.1:{broker.tls_port}"
    s = make_settings(mqtt_url=url, mqtt_ca_file=ca)
    async with running(s) as collector:
        assert collector.ready, "collector did not connect over TLS"
        peer = MqttPeer(broker.url)  # the vendor side may use the plain listener here
        try:
            topic = "citypulse/v1/aquasense/wtr-0001/up"
            ts = int(time.time() * 1000)
            await asyncio.to_thread(
                peer.publish, topic, orjson.dumps({"ts": ts, "values": {"pressure": 3.5}})
            )
            records = await read_topic(s, "readings", until=1, timeout_s=15)
        finally:
            peer.close()
    (batch,) = _decode(records)
    assert (batch.sensor, batch.readings[0].value) == ("wtr-0001", 3.5)


def test_collector_client_takes_a_burst_over_tls(tls_broker: tuple[Mosquitto, Path]) -> None:
    """The collector's buffered client over TLS: 3,000 QoS 1 messages in one burst arrive
    intact and in order, read through the TLS socket (whose records cut MQTT packets at other
    places than TCP reads do, and whose reads may raise ``SSLWantReadError``)."""
    broker, ca = tls_broker
    plain = urlsplit(broker.url)
    client = LeanClient(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.tls_set_context(ssl.create_default_context(cafile=str(ca)))
    receive_burst(
        client, ("127.0.0.1", broker.tls_port), (plain.hostname or "", plain.port or 0), 3000
    )


# paho leaks the socket of a failed TLS handshake (a ResourceWarning at garbage collection).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_collector_refuses_a_broker_it_cannot_verify(
    make_settings: Callable[..., Settings], tls_broker: tuple[Mosquitto, Path]
) -> None:
    """Without the test CA (system trust store only) the TLS handshake fails: not ready."""
    broker, _ = tls_broker
    url = f"mqtts://127.0.0.1:{broker.tls_port}"
    untrusted = make_settings(mqtt_url=url, mqtt_client_id="sec-untrusted")
    async with running(untrusted, ready_within_s=3) as collector:
        assert not collector.ready, "connected to a broker whose certificate it cannot verify"


async def test_spoofed_vendor_is_refused_even_on_an_open_broker(
    make_settings: Callable[..., Settings],
) -> None:
    """With no broker ACL (anonymous Mosquitto), vendor ``airly`` publishing for aquasense's
    sensor under its own vendor segment is refused ``wrong_vendor``; nothing reaches readings."""
    s = make_settings()
    async with running(s) as collector:
        assert collector.ready
        peer = MqttPeer(s.mqtt_url)
        try:
            ts = int(time.time() * 1000)
            spoof = orjson.dumps({"ts": ts, "values": {"pressure": 0.1}})
            await asyncio.to_thread(peer.publish, "citypulse/v1/airly/wtr-0001/up", spoof)
            good = orjson.dumps({"ts": ts, "values": {"pm25": 12.0}})
            await asyncio.to_thread(peer.publish, "citypulse/v1/airly/air-0001/up", good)
            dead = await read_topic(s, "deadletter", until=1, timeout_s=15)
            readings = await read_topic(s, "readings", until=1, timeout_s=15)
        finally:
            peer.close()
    (rejection,) = [Rejection.decode(v) for _, v in dead]
    assert rejection.reason is RejectReason.WRONG_VENDOR
    assert (rejection.vendor, rejection.sensor) == ("airly", "wtr-0001")
    assert [b.sensor for b in _decode(readings)] == ["air-0001"]


async def test_flooding_vendor_is_rate_limited_and_others_get_through(
    make_settings: Callable[..., Settings],
) -> None:
    """aquasense floods (1000 messages as fast as it can, >10x its 50 readings/s budget) while
    airly sends at its normal rate: every airly reading is accepted; aquasense's excess is
    refused ``rate_limited`` onto the dead-letter topic (accepted + refused = sent, none
    silently dropped) and counted in the collector's metrics."""
    s = make_settings(vendor_rate_limit_per_s=50, vendor_rate_burst=50)
    before = (
        REGISTRY.get_sample_value(
            "citypulse_collector_messages_refused_total", {"reason": "rate_limited"}
        )
        or 0.0
    )
    flood_n, normal_n = 1000, 40
    base = int(time.time() * 1000) - 60_000
    async with running(s) as collector:
        assert collector.ready
        flooder, normal = MqttPeer(s.mqtt_url), MqttPeer(s.mqtt_url)
        try:

            def flood() -> None:
                for i in range(flood_n):
                    payload = orjson.dumps({"ts": base + i, "values": {"pressure": 1.0}})
                    flooder.publish("citypulse/v1/aquasense/wtr-0001/up", payload)

            def steady() -> None:
                for i in range(normal_n):
                    payload = orjson.dumps({"ts": base + i, "values": {"pm25": 5.0}})
                    normal.publish("citypulse/v1/airly/air-0001/up", payload)
                    time.sleep(0.02)

            threads = [threading.Thread(target=flood), threading.Thread(target=steady)]
            started = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                await asyncio.to_thread(t.join, 60)
            flood_s = time.monotonic() - started
            readings = _decode(await read_topic(s, "readings", until=normal_n + 50))
            dead = [Rejection.decode(v) for _, v in await read_topic(s, "deadletter", until=1)]
            # The collector drains its queue after the flood ends; the bucket keeps refilling.
            processing_s = time.monotonic() - started
        finally:
            flooder.close()
            normal.close()
    per_sensor = Counter(b.sensor for b in readings)
    assert per_sensor["air-0001"] == normal_n, per_sensor
    refused = [r for r in dead if r.reason is RejectReason.RATE_LIMITED]
    assert {r.vendor for r in refused} == {"aquasense"}
    assert per_sensor["wtr-0001"] + len(refused) == flood_n
    # The bucket: at most the burst plus what the rate refilled while the flood lasted.
    assert 50 <= per_sensor["wtr-0001"] <= 50 + 50 * processing_s + 5
    assert per_sensor["wtr-0001"] < flood_n // 4
    after = REGISTRY.get_sample_value(
        "citypulse_collector_messages_refused_total", {"reason": "rate_limited"}
    )
    assert after is not None
    assert after - before == len(refused)
    print(
        f"flood: aquasense sent {flood_n} in {flood_s:.1f}s, {per_sensor['wtr-0001']} accepted, "
        f"{len(refused)} rate_limited; airly {per_sensor['air-0001']}/{normal_n} accepted"
    )
