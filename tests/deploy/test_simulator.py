"""Unit tests of the simulator: deterministic, realistic, honest about time, mixed formats."""

from __future__ import annotations

import itertools
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest

from citypulse.registry import Silo, dump_registry, load_registry, parse_registry
from citypulse.topics import SensorTopic
from deploy.simulator import (
    IncidentKind,
    Message,
    Simulator,
    SimulatorConfig,
    default_backfill_s,
    generate_registry,
)

ROOT = Path(__file__).resolve().parents[2]
START = datetime(2026, 3, 2, 6, 0, tzinfo=UTC)


def _take(sim: Simulator, n: int, backfill_s: float = 0.0) -> list[Message]:
    return list(itertools.islice(sim.messages(START, backfill_s), n))


def test_example_registry_is_the_generated_one() -> None:
    """The committed example registry covers every silo and is what the generator writes."""
    reg = load_registry(ROOT / "deploy" / "registry.example.yaml")
    assert {s.silo for s in reg} == set(Silo)
    assert len(reg.districts()) == 4
    assert 60 <= len(reg) <= 100
    assert reg == generate_registry()


def test_generated_registry_of_any_size_round_trips() -> None:
    """A generated city of another size is a valid registry, read back unchanged."""
    reg = generate_registry(districts=6, sensors_per_silo_district=5, seed=3)
    assert len(reg) == 6 * 6 * 5
    assert parse_registry(dump_registry(reg)) == reg
    assert all(s.actuator == (s.silo == Silo.LIGHTING) for s in reg)


def test_same_seed_same_messages_other_seed_differs() -> None:
    """Two simulators with the same seed produce byte-identical messages."""
    reg = generate_registry()
    a = _take(Simulator(reg, SimulatorConfig(seed=5)), 500)
    b = _take(Simulator(reg, SimulatorConfig(seed=5)), 500)
    c = _take(Simulator(reg, SimulatorConfig(seed=6)), 500)
    assert [(m.topic, m.payload) for m in a] == [(m.topic, m.payload) for m in b]
    assert [m.payload for m in a] != [m.payload for m in c]


def _decode_readings(msg: Message) -> list[tuple[datetime, str, float]]:
    """Decode a well-formed message into (time, metric, value) per the vendor contract."""
    data = orjson.loads(msg.payload)
    out = []
    if isinstance(data, dict) or (isinstance(data, list) and "values" in data[0]):
        for obj in data if isinstance(data, list) else [data]:
            ts = obj["ts"]
            t = (
                datetime.fromtimestamp(ts / 1000, UTC)
                if isinstance(ts, int)
                else datetime.fromisoformat(ts)
            )
            out += [(t, k, v) for k, v in obj["values"].items()]
        return out
    bn, bt, bu = "", 0.0, None
    for rec in data:  # SenML, RFC 8428 section 4.6 resolution
        bn = rec.get("bn", bn)
        bt = rec.get("bt", bt)
        bu = rec.get("bu", bu)
        assert rec.get("u", bu) is not None
        name = bn + rec["n"]
        assert name.startswith(f"urn:dev:citypulse:{msg.sensor}:")
        t = datetime.fromtimestamp(bt + rec.get("t", 0.0), UTC)
        out.append((t, name.rsplit(":", 1)[1], rec["v"]))
    return out


@pytest.mark.parametrize("per_message", [1, 4])
def test_formats_are_valid_and_carry_registered_metrics(per_message: int) -> None:
    """Every good message decodes (JSON object/array or SenML) to registered, in-range metrics."""
    reg = generate_registry()
    sensors = reg.by_id()
    sim = Simulator(reg, SimulatorConfig(seed=2, readings_per_message=per_message, speedup=60))
    msgs = _take(sim, 2000, backfill_s=3600)
    good = [m for m in msgs if m.malformed is None]
    assert {m.fmt for m in good} == (
        {"json", "senml"} if per_message == 1 else {"json-batch", "senml"}
    )
    for m in good:
        topic = SensorTopic.parse(m.topic)
        sensor = sensors[topic.sensor_id]
        assert topic.vendor == sensor.vendor
        readings = _decode_readings(m)
        assert len(readings) == m.readings == per_message * len(sensor.metrics)
        for t, metric, value in readings:
            assert sensor.metrics[metric].in_range(value)
            assert t <= m.event_time <= START + timedelta(seconds=m.wall_offset_s)  # never future


def test_speedup_replays_history_then_runs_at_real_time() -> None:
    """At speedup 60 the event time advances 60x the schedule, but never passes real time."""
    reg = generate_registry()
    sim = Simulator(reg, SimulatorConfig(seed=1, speedup=60, incident_every_s=0))
    backfill = default_backfill_s(60, 10.0)
    assert backfill == 590.0
    msgs = [m for m in itertools.islice(sim.messages(START, backfill), 20000)]
    at_10s = next(m for m in msgs if m.wall_offset_s >= 5.0)
    assert at_10s.event_time == pytest.approx(
        START - timedelta(seconds=590) + timedelta(seconds=at_10s.wall_offset_s * 60),
        abs=timedelta(seconds=1),
    )
    assert all(m.event_time <= START + timedelta(seconds=m.wall_offset_s) for m in msgs)
    rate = sum(m.readings for m in msgs) / msgs[-1].wall_offset_s
    assert rate == pytest.approx(sim.rate, rel=0.05)
    assert sim.rate == pytest.approx(132 * 60 / 60, rel=0.01)  # 132 metrics every 60 s, x60


def test_incidents_change_the_readings_of_their_sensors() -> None:
    """A leak lowers pressure and raises flow, an outage zeroes power, pollution raises pm25."""
    reg = generate_registry()
    cfg = SimulatorConfig(
        seed=4, speedup=600, incident_every_s=1200, incident_duration_s=600, malformed_fraction=0
    )
    sim = Simulator(reg, cfg)
    msgs = _take(sim, 40_000, backfill_s=86400)
    kinds = {i.kind for i in sim.incidents}
    assert kinds == set(IncidentKind)
    values: dict[tuple[str, str], list[tuple[datetime, float]]] = {}
    for m in msgs:
        for t, metric, v in _decode_readings(m):
            values.setdefault((m.sensor, metric), []).append((t, v))

    def mean(sensor: str, metric: str, inside: bool, inc_start: datetime, end: datetime) -> float:
        xs = [
            v
            for t, v in values[(sensor, metric)]
            if (inc_start <= t < end) == inside and abs((t - inc_start).total_seconds()) < 3600
        ]
        return sum(xs) / len(xs)

    for inc in sim.incidents[:-1]:
        s = inc.sensors[0]
        if inc.kind is IncidentKind.LEAK:
            assert (
                mean(s, "pressure", True, inc.start, inc.end)
                < mean(s, "pressure", False, inc.start, inc.end) - 1.0
            )
            assert mean(s, "flow", True, inc.start, inc.end) > mean(
                s, "flow", False, inc.start, inc.end
            )
        elif inc.kind is IncidentKind.OUTAGE:
            nrg = next(x for x in inc.sensors if x.startswith("nrg-"))
            assert mean(nrg, "power", True, inc.start, inc.end) == 0.0
            pump = next(x for x in inc.sensors if x.startswith("wtr-"))
            assert mean(pump, "flow", True, inc.start, inc.end) == 0.0
        else:
            assert mean(s, "pm25", True, inc.start, inc.end) > 3 * mean(
                s, "pm25", False, inc.start, inc.end
            )


def test_malformed_fraction_and_kinds() -> None:
    """About the configured fraction of messages are defective, of every kind, counting 0."""
    reg = generate_registry()
    sim = Simulator(reg, SimulatorConfig(seed=9, malformed_fraction=0.1))
    msgs = _take(sim, 10_000)
    bad = [m for m in msgs if m.malformed]
    good = len(msgs) - len(bad)
    assert len(bad) / good == pytest.approx(0.1, abs=0.02)
    assert all(m.readings == 0 for m in bad)
    kinds = Counter(m.malformed for m in bad)
    assert set(kinds) == {
        "malformed_json",
        "unknown_metric",
        "wrong_vendor",
        "unknown_sensor",
        "bad_timestamp",
        "bad_schema",
    }
    sensors = reg.by_id()
    for m in bad:
        topic = SensorTopic.parse(m.topic)
        if m.malformed == "malformed_json":
            with pytest.raises(orjson.JSONDecodeError):
                orjson.loads(m.payload)
        elif m.malformed == "wrong_vendor":
            assert sensors[topic.sensor_id].vendor != topic.vendor
        elif m.malformed == "unknown_sensor":
            assert topic.sensor_id not in sensors


def test_daily_cycle_shows_in_traffic_and_lights() -> None:
    """Rush hour has more traffic than 03:00; lights are on at night and off at noon."""
    reg = generate_registry()
    sim = Simulator(reg, SimulatorConfig(seed=1, rate=1000, speedup=3000, malformed_fraction=0))
    msgs = _take(sim, 20_000, backfill_s=2 * 86400)  # a sample per sensor every 396 s, 30 h
    by_hour: dict[tuple[str, int], list[float]] = {}
    for m in msgs:
        for t, metric, v in _decode_readings(m):
            by_hour.setdefault((metric, (t + timedelta(hours=1)).hour), []).append(v)

    def avg(metric: str, hour: int) -> float:
        xs = by_hour[(metric, hour)]
        return sum(xs) / len(xs)

    assert avg("traffic", 8) > 5 * avg("traffic", 3)
    assert avg("dim_level", 22) > 90
    assert avg("dim_level", 12) == 0
