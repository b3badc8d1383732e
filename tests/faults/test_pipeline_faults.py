"""The delivery guarantees under faults, end to end through real servers and real processes.

Every test streams QoS 1 messages (one reading each) through MQTT → ``citypulse collect`` →
Kafka → ``citypulse store`` → PostgreSQL, injects a fault mid-stream, and reconciles exactly:
rows in ``readings`` == distinct (sensor, metric, ts) == messages the broker acknowledged, and
the stored keys are exactly the published ones.

``CITYPULSE_FAULT_DB_OUTAGE_S`` sets the database outage (default 10 s; the issue's 30 s is a
longer run of the same test).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import orjson
import psutil
import pytest

from citypulse.events import AlertEvent, Reading, ReadingBatch
from citypulse.registry import load_registry
from citypulse.settings import Settings
from deploy.embedded import Mosquitto, Postgres
from rules import RuleEngine
from rules.runtime import RuleSource
from storage import migrate

from ._harness import (
    REGISTRY_YAML,
    RULE_WORKER,
    RULES_YAML,
    Publisher,
    Service,
    metric_values,
    stored_keys,
    wait_stored,
)

pytestmark = pytest.mark.integration

DB_OUTAGE_S = float(os.environ.get("CITYPULSE_FAULT_DB_OUTAGE_S", "10"))


@pytest.fixture
def make_settings(
    settings_factory: Callable[..., Settings], tmp_path: Path
) -> Callable[..., Settings]:
    registry = tmp_path / "registry.yaml"
    registry.write_text(REGISTRY_YAML)

    def make(**overrides: object) -> Settings:
        values: dict[str, object] = {
            "registry": registry,
            "writer_batch_max": 200,
            "writer_batch_wait_ms": 20,
        }
        values.update(overrides)
        return settings_factory(**values)

    return make


@pytest.fixture
def services() -> Iterator[list[Service]]:
    """Every service a test starts; each is stopped (SIGTERM, then SIGKILL) afterwards."""
    started: list[Service] = []
    yield started
    for s in started:
        s.terminate()


@pytest.fixture
def publishers() -> Iterator[list[Publisher]]:
    made: list[Publisher] = []
    yield made
    for p in made:
        p.close()


def _service(
    services: list[Service], command: str, s: Settings, tmp: Path, name: str, **env: str
) -> Service:
    svc = Service(command, s, tmp, name, **env)
    services.append(svc)
    return svc.start()


def _ranges(xs: list[int]) -> str:
    out: list[str] = []
    for x in xs:
        if out and out[-1].split("-")[-1] == str(x - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{x}"
        else:
            out.append(str(x))
    return ", ".join(out)


async def _reconcile(s: Settings, pub: Publisher, services: list[Service]) -> tuple[int, int]:
    pub.join()
    rows, distinct = await wait_stored(s.dsn, pub.n, timeout_s=60)
    if (rows, distinct) != (pub.n, pub.n):
        missing = sorted(ts - pub.base_ms for _, _, ts in pub.expected() - await stored_keys(s.dsn))
        logs = "\n".join(f"--- {x.name}\n{x.tail(1500)}" for x in services)
        raise AssertionError(
            f"stored {rows} rows, {distinct} distinct of {pub.n}; missing message indices "
            f"{_ranges(missing)}\n{logs}"
        )
    assert await stored_keys(s.dsn) == pub.expected()
    return rows, distinct


def _expected_alerts(s: Settings, pub: Publisher) -> set[tuple[str, str, int]]:
    """(sensor, state, ts) of the firing/resolved events one engine raises over the stream,
    computed in-process from the same readings."""
    registry = load_registry(s.registry)
    engine = RuleEngine(RuleSource(s.rules, registry).load().ruleset, registry)
    out = set()
    for i in range(pub.n):
        topic, payload = pub.message(i)
        _, _, vendor, sensor, _ = topic.split("/")
        ((metric, value),) = orjson.loads(payload)["values"].items()
        ts = pub.base_ms + i
        b = ReadingBatch(
            sensor=sensor, vendor=vendor, received_ms=ts, source="x",
            readings=[Reading(ts_ms=ts, metric=metric, value=value, unit="bar")],
        )  # fmt: skip
        for e in engine.process(b, scope="all"):
            if isinstance(e, AlertEvent) and e.state in ("firing", "resolved"):
                out.add((e.labels["sensor"], str(e.state), e.ts_ms))
    return out


async def _alerts(dsn: str) -> list[tuple[str, str, int]]:
    c = await asyncpg.connect(dsn)
    try:
        rows = await c.fetch(
            "SELECT labels->>'sensor' AS sensor, state, ts FROM alert_events "
            "WHERE state IN ('firing', 'resolved')"
        )
    finally:
        await c.close()
    return [(r["sensor"], r["state"], round(r["ts"].timestamp() * 1000)) for r in rows]


async def _wait_alerts(
    s: Settings, pub: Publisher
) -> tuple[set[tuple[str, str, int]], list[tuple[str, str, int]]]:
    """(expected, recorded) alert state changes, once the recorded ones cover the expected
    (or 60 s passed) and 1.5 s more for a late duplicate."""
    expected = _expected_alerts(s, pub)
    deadline = time.monotonic() + 60
    alerts = await _alerts(s.dsn)
    while not set(alerts) >= expected and time.monotonic() < deadline:
        await asyncio.sleep(0.3)
        alerts = await _alerts(s.dsn)
    await asyncio.sleep(1.5)
    return expected, await _alerts(s.dsn)


async def test_sigkill_collector_writer_and_rule_worker_mid_stream_end_to_end(
    make_settings: Callable[..., Settings],
    services: list[Service],
    publishers: list[Publisher],
    tmp_path: Path,
) -> None:
    """Collector SIGKILLed at 1/4 of the stream, writer at 1/2, rule worker at 3/4, each
    restarted at once: every acknowledged message stored exactly once, and every alert state
    change the rule raises recorded exactly once."""
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    (rules_dir / "faults.yaml").write_text(RULES_YAML)
    s = make_settings(rules=rules_dir, state_dir=tmp_path / "state")
    await migrate(s.dsn)
    collector = _service(services, "collect", s, tmp_path, "collector")
    writer = _service(services, "store", s, tmp_path, "writer")
    worker = _service(services, RULE_WORKER, s, tmp_path, "rule-worker")
    collector.wait_ready()
    writer.wait_ready()
    worker.wait_ready()

    def crash(svc: Service) -> Callable[[], None]:
        def hook() -> None:
            svc.kill()
            svc.start()

        return hook

    n = 1200
    at = {n // 4: crash(collector), n // 2: crash(writer), 3 * n // 4: crash(worker)}
    pub = Publisher(s.mqtt_url, n, rate_per_s=400, at=at)
    publishers.append(pub)
    pub.start()
    rows, _ = await _reconcile(s, pub, services)
    expected, alerts = await _wait_alerts(s, pub)
    assert len(expected) > 100
    assert sorted(alerts) == sorted(expected), worker.tail()
    assert (collector.starts, writer.starts, worker.starts) == (2, 2, 2)
    for svc in (collector, writer, worker):
        assert svc.terminate() == 0, svc.tail()
    print(
        f"sigkill end-to-end: published {n}, stored {rows} (publisher retries {pub.retries}); "
        f"{len(alerts)} alert state changes recorded, {len(expected)} expected"
    )


async def test_database_outage_writer_pauses_and_drains(
    make_settings: Callable[..., Settings],
    services: list[Service],
    publishers: list[Publisher],
    tmp_path: Path,
) -> None:
    """A dedicated PostgreSQL is stopped mid-stream for ``DB_OUTAGE_S``: the writer stays up
    (same process, never restarted), reports not ready, keeps its memory bounded; Kafka holds
    the backlog, which drains once the database is back: every reading stored once."""
    pg = Postgres(tmp_path / "pg")
    pg.start()
    try:
        s = make_settings(database_url=pg.url())
        await migrate(s.dsn)
        collector = _service(services, "collect", s, tmp_path, "collector")
        writer = _service(services, "store", s, tmp_path, "writer")
        collector.wait_ready()
        writer.wait_ready()
        pid = writer.pid
        n = int(300 * (DB_OUTAGE_S + 4))
        pub = Publisher(s.mqtt_url, n, rate_per_s=300)
        publishers.append(pub)
        pub.start()
        while pub.acked < 600:
            time.sleep(0.05)
        pg.stop()
        rss: list[int] = []
        outage_end = time.monotonic() + DB_OUTAGE_S
        writer.wait_status(503, timeout_s=10)  # /readyz: writer_db not ready
        while time.monotonic() < outage_end:
            assert writer.alive, writer.tail()
            rss.append(psutil.Process(pid).memory_info().rss)
            time.sleep(0.25)
        assert writer.readyz() == 503
        published_during = pub.acked
        pg.start()
        writer.wait_ready(timeout_s=30)
        rows, _ = await _reconcile(s, pub, services)
        assert writer.pid == pid
        assert writer.starts == 1
        assert writer.alive
        peak_mb = max(rss) / 2**20
        assert peak_mb < 300, f"writer RSS {peak_mb:.0f} MiB during the outage"
        assert writer.terminate() == 0, writer.tail()
        print(
            f"db outage {DB_OUTAGE_S:.0f}s: published {n} ({published_during} by the end of "
            f"the outage), stored {rows}, writer peak RSS {peak_mb:.0f} MiB"
        )
    finally:
        for svc in services:
            svc.terminate()
        pg.stop()


async def test_mosquitto_restart_keeps_queued_messages(
    make_settings: Callable[..., Settings],
    services: list[Service],
    publishers: list[Publisher],
    tmp_path: Path,
) -> None:
    """Messages queued at the broker for a dead collector survive a Mosquitto restart (its
    persistent session); a broker outage under a running collector is ridden out (reconnect,
    /readyz 503 meanwhile); the publisher retries through the gaps. Stored exactly once."""
    # As root, deploy/embedded.py hands the broker's directory to the "mosquitto" user so it
    # can save sessions: pytest's private tmp_path is fine.
    broker = Mosquitto(tmp_path / "mqtt")
    broker.start()
    try:
        s = make_settings(mqtt_url=broker.url)
        await migrate(s.dsn)
        collector = _service(services, "collect", s, tmp_path, "collector")
        writer = _service(services, "store", s, tmp_path, "writer")
        collector.wait_ready()
        writer.wait_ready()
        n = 1500
        phase = {"queued": 0}

        def collector_down() -> None:
            collector.kill()

        def broker_restart_with_queue() -> None:
            # Everything since the kill is queued in the collector's session at the broker.
            phase["queued"] = pub.acked - n // 3
            broker.stop()
            broker.start()
            collector.start()
            # Mosquitto 2.0.11 restores the queued messages of an offline session but not its
            # *shared* subscription's routing: what is published after a broker restart and
            # before a collector re-subscribes is dropped (deploy/GUARANTEES.md). So the
            # vendor here publishes again once the collector is back.
            collector.wait_ready()

        def broker_outage() -> None:
            collector.wait_ready()
            broker.stop()
            collector.wait_status(503, timeout_s=10)
            time.sleep(1.0)
            broker.start()
            collector.wait_ready(timeout_s=40)

        pub = Publisher(
            s.mqtt_url,
            n,
            rate_per_s=400,
            at={
                n // 3: collector_down,
                n // 2: broker_restart_with_queue,
                3 * n // 4: broker_outage,
            },
        )
        publishers.append(pub)
        pub.start()
        rows, _ = await _reconcile(s, pub, services)
        assert phase["queued"] > 0
        assert collector.terminate() == 0, collector.tail()
        print(
            f"mosquitto restarts: published {n}, {phase['queued']} queued across a restart, "
            f"stored {rows}, publisher retries {pub.retries}"
        )
    finally:
        for svc in services:
            svc.terminate()
        for p in publishers:
            p.close()
        publishers.clear()
        broker.stop()


async def test_slow_database_bounded_memory_and_visible_lag(
    make_settings: Callable[..., Settings],
    services: list[Service],
    publishers: list[Publisher],
    tmp_path: Path,
) -> None:
    """Every INSERT into ``readings`` sleeps 50 ms (a statement trigger): the writer falls
    behind, ``citypulse_writer_consumer_lag`` shows it, RSS stays bounded, nothing is lost."""
    s = make_settings(writer_batch_max=20)
    await migrate(s.dsn)
    c = await asyncpg.connect(s.dsn)
    try:
        await c.execute(
            """
            CREATE FUNCTION slow_down() RETURNS trigger LANGUAGE plpgsql AS
            $$ BEGIN PERFORM pg_sleep(0.05); RETURN NULL; END $$;
            CREATE TRIGGER slow_down AFTER INSERT ON readings
            FOR EACH STATEMENT EXECUTE FUNCTION slow_down();
            """
        )
    finally:
        await c.close()
    collector = _service(services, "collect", s, tmp_path, "collector")
    writer = _service(services, "store", s, tmp_path, "writer")
    collector.wait_ready()
    writer.wait_ready()
    n = 2400
    pub = Publisher(s.mqtt_url, n, rate_per_s=800)
    publishers.append(pub)
    pub.start()
    process = psutil.Process(writer.pid)
    max_lag = 0.0
    peak_rss = 0
    while pub.acked < n or max_lag == 0:
        lags = metric_values(writer.metrics(), "citypulse_writer_consumer_lag")
        max_lag = max([max_lag, *lags])
        peak_rss = max(peak_rss, process.memory_info().rss)
        if pub.acked >= n and time.monotonic() > 0 and max_lag == 0:
            break
        time.sleep(0.1)
    rows, _ = await _reconcile(s, pub, services)
    assert max_lag > 0, "the writer never reported lag behind a slow database"
    peak_mb = peak_rss / 2**20
    assert peak_mb < 300, f"writer RSS {peak_mb:.0f} MiB"
    print(
        f"slow db: published {n}, stored {rows}, max lag {max_lag:.0f}, peak RSS {peak_mb:.0f} MiB"
    )


async def test_consumer_group_rebalance_mid_stream(
    make_settings: Callable[..., Settings],
    services: list[Service],
    publishers: list[Publisher],
    tmp_path: Path,
) -> None:
    """A second writer, rule worker and collector join mid-stream, then the first of each
    leaves (SIGTERM): the Kafka groups and the MQTT share group rebalance; every reading
    stored once, every alert state change recorded once."""
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    (rules_dir / "faults.yaml").write_text(RULES_YAML)
    s = make_settings(rules=rules_dir, state_dir=tmp_path / "state")
    await migrate(s.dsn)
    c1 = _service(services, "collect", s, tmp_path, "collector-1")
    w1 = _service(services, "store", s, tmp_path, "writer-1")
    r1 = _service(services, RULE_WORKER, s, tmp_path, "rule-worker-1")
    c1.wait_ready()
    w1.wait_ready()
    r1.wait_ready()
    spare: dict[str, Service] = {}

    def join() -> None:
        spare["c2"] = _service(services, "collect", s, tmp_path, "collector-2").wait_ready()
        spare["w2"] = _service(services, "store", s, tmp_path, "writer-2").wait_ready()
        spare["r2"] = _service(services, RULE_WORKER, s, tmp_path, "rule-worker-2").wait_ready()

    def leave() -> None:
        assert w1.terminate() == 0
        assert r1.terminate() == 0
        assert c1.terminate() == 0

    def come_back() -> None:
        # Mosquitto keeps dealing the share group's messages to collector-1's persistent
        # session while it is away; they reach the city once that client id reconnects
        # (a rolling restart). A collector scaled down for good strands them: documented.
        c1.start().wait_ready()

    n = 1600
    pub = Publisher(
        s.mqtt_url, n, rate_per_s=400, at={n // 4: join, n // 2: leave, 3 * n // 4: come_back}
    )
    publishers.append(pub)
    pub.start()
    rows, _ = await _reconcile(s, pub, services)
    expected, alerts = await _wait_alerts(s, pub)
    assert sorted(alerts) == sorted(expected), spare["r2"].tail()
    assert spare["w2"].alive
    assert spare["c2"].alive
    assert spare["r2"].alive
    print(f"rebalance: published {n}, stored {rows}, {len(alerts)} alert state changes once")


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="Mosquitto 2.0.11 does not restore shared-subscription routing for an offline "
    "persistent session after a restart (deploy/GUARANTEES.md, known gaps)",
)
def test_broker_restart_keeps_routing_to_an_offline_share_group(tmp_path: Path) -> None:
    """Documents the gap: published after a broker restart while the only share-group member
    is offline, a message should be queued for it. Turns XPASS (fails) once the broker does."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    state = Path(tempfile.mkdtemp(prefix="citypulse-faults-share-"))
    state.chmod(0o777)
    broker = Mosquitto(state)
    broker.dir.chmod(0o777)
    broker.start()
    got: list[bytes] = []

    def member() -> mqtt.Client:
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="member", protocol=MQTTProtocolVersion.MQTTv5
        )
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600
        c.on_message = lambda c, u, m: got.append(bytes(m.payload))
        c.connect("127.0.0.1", broker.port, clean_start=False, properties=props)
        return c

    def publish(payload: bytes) -> None:
        p = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="vendor")
        p.connect("127.0.0.1", broker.port)
        p.loop_start()
        p.publish("t/x", payload, qos=1).wait_for_publish(5)
        p.disconnect()
        p.loop_stop()

    try:
        c = member()
        c.loop_start()
        c.subscribe("$share/g/t/#", qos=1)
        time.sleep(0.5)
        c.disconnect()
        c.loop_stop()
        publish(b"before")
        time.sleep(1.5)  # autosave_interval 1
        broker.stop()
        broker.start()
        publish(b"after")
        c = member()
        c.loop_start()
        deadline = time.monotonic() + 3
        while len(got) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        c.disconnect()
        c.loop_stop()
        if b"before" not in got:  # the queue survives the restart: the part we rely on
            pytest.fail(f"the queued message was lost across the restart: {got}")
        assert b"after" in got  # the routing does not survive: this is the gap
    finally:
        broker.stop()
        shutil.rmtree(state, ignore_errors=True)
