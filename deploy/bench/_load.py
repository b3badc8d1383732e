"""The load generator: payloads prepared in advance, publisher processes, latency probes.

A payload is a template: fixed byte fragments around timestamp slots. At publish time the
publisher writes the wall clock (epoch ms, or seconds with 3 decimals for SenML ``bt``) into the
slots, so every reading's event time is its publish time and stays unique per
(sensor, metric): each sensor belongs to one publisher, which cycles through its sensors.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from citypulse.registry import Sensor
from citypulse.topics import SensorTopic
from deploy.bench._rules import MARKER_METRIC, MARKER_VALUE, NORMAL_FRACTION
from deploy.bench._wire import WirePublisher

READINGS_PER_BATCH = 10
"""Readings carried by one ``batch`` or ``senml`` message."""
_SLOT = b"\x00TS\x00"


class Mode(StrEnum):
    """Payload shape of a workload."""

    SINGLE = "single"
    """One reading per message: ``{"ts": <ms>, "values": {"<metric>": v}}``."""
    BATCH = "batch"
    """Ten readings per message: a citypulse JSON array of records."""
    SENML = "senml"
    """Ten readings per message: a SenML pack (``bt`` in seconds, ``t`` relative)."""


@dataclass(frozen=True, slots=True)
class Template:
    """A message with timestamp slots. ``offsets_ms[i]`` is added to the clock for slot ``i``."""

    topic: str
    parts: tuple[bytes, ...]
    offsets_ms: tuple[int, ...]
    seconds: bool
    """Slots hold epoch seconds with 3 decimals (SenML) instead of epoch ms."""
    readings: int

    def render(self, now_ms: int) -> bytes:
        """The payload with every slot set to ``now_ms`` plus its offset."""
        out = [self.parts[0]]
        for off, part in zip(self.offsets_ms, self.parts[1:], strict=True):
            t = now_ms + off
            out.append(b"%d.%03d" % divmod(t, 1000) if self.seconds else b"%d" % t)
            out.append(part)
        return b"".join(out)


def _value(sensor: Sensor, metric: str, fraction: float = NORMAL_FRACTION) -> float:
    m = sensor.metrics[metric]
    lo = m.min if m.min is not None else 0.0
    hi = m.max if m.max is not None else lo + 100.0
    return round(lo + (hi - lo) * fraction, 3)


def _split(raw: bytes, seconds: bool) -> tuple[bytes, ...]:
    # orjson writes the placeholder string as "\u0000TS\u0000"; the quotes go too.
    marker = b'"\\u0000TS\\u0000"'
    return tuple(raw.split(marker))


def templates_for(sensor: Sensor, mode: Mode, value: float | None = None) -> list[Template]:
    """The message templates one sensor cycles through in ``mode``.

    Args:
        sensor: a registry sensor (its vendor, metrics and units are respected).
        mode: payload shape.
        value: overrides the value of every reading (probes), else mid-range per metric.

    Returns:
        ``single``: one template per metric; ``batch``/``senml``: one template of 10 readings.
    """
    topic = str(SensorTopic(sensor.vendor, sensor.id, "up"))
    metrics = sorted(sensor.metrics)
    ph = _SLOT.decode()

    def val(m: str) -> float:
        return _value(sensor, m) if value is None else value

    if mode is Mode.SINGLE:
        out = []
        for m in metrics:
            raw = orjson.dumps({"ts": ph, "values": {m: val(m)}})
            out.append(Template(topic, _split(raw, False), (0,), False, 1))
        return out
    records = READINGS_PER_BATCH // len(metrics)
    if mode is Mode.BATCH:
        raw = orjson.dumps([{"ts": ph, "values": {m: val(m) for m in metrics}}] * records)
        return [
            Template(
                topic, _split(raw, False), tuple(range(records)), False, records * len(metrics)
            )
        ]
    pack: list[dict[str, Any]] = []
    for j in range(records):
        for m in metrics:
            rec: dict[str, Any] = {"n": m, "u": sensor.metrics[m].unit, "v": val(m)}
            if j:
                rec["t"] = j / 1000
            pack.append(rec)
    pack[0] = {"bn": f"urn:dev:citypulse:{sensor.id}:", "bt": ph, **pack[0]}
    raw = orjson.dumps(pack)
    return [Template(topic, _split(raw, True), (0,), True, records * len(metrics))]


def connect(url: str, client_id: str, inflight: int = 1000) -> mqtt.Client:
    """A started paho client (MQTT v5, network thread running)."""
    parts = urlsplit(url)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(inflight)
    client.max_queued_messages_set(inflight * 4)
    connected = threading.Event()
    client.on_connect = lambda *a, **k: connected.set()
    client.connect(parts.hostname or "127.0.0.1", parts.port or 1883, keepalive=30)
    client.loop_start()
    if not connected.wait(10):
        client.loop_stop()
        raise ConnectionError(f"MQTT connect to {url} timed out")
    return client


@dataclass(slots=True)
class PublisherShared:
    """Shared state between the bench process and its publisher processes."""

    rate: Any
    """Target readings per second of ALL publishers together (multiprocessing.Value 'd')."""
    stop: Any
    """multiprocessing.Event: finish in-flight messages and exit."""
    acked: list[Any] = field(default_factory=list)
    """Readings PUBACKed, per publisher (multiprocessing.Value 'q')."""


def _publisher_main(
    index: int,
    url: str,
    templates: Sequence[Template],
    publishers: int,
    rate: Any,
    stop: Any,
    acked: Any,
    prefix: str,
) -> None:
    """Body of a publisher process: paced by the shared target rate, QoS 1, count PUBACKs.

    It publishes through :class:`~deploy.bench._wire.WirePublisher`, not paho: see that module
    for why the load generator must be lean.
    """
    parts = urlsplit(url)
    pub = WirePublisher(
        parts.hostname or "127.0.0.1",
        parts.port or 1883,
        f"bench-pub-{index}-{uuid.uuid4().hex[:6]}",
    )
    # Every message of a workload carries the same number of readings (1 or 10).
    per_msg = templates[0].readings
    topics = [((prefix + t.topic).encode(), t) for t in templates]
    n = len(topics)
    i = 0
    sent = 0.0  # readings sent in the current pacing window
    window_start = time.monotonic()
    window_rate = -1.0
    try:
        while not stop.is_set():
            target = rate.value / publishers
            now = time.monotonic()
            if target != window_rate:
                window_start, sent, window_rate = now, 0.0, target
            if target <= 0:
                pub.flush()
                pub.idle()
                acked.value = pub.acked * per_msg
                time.sleep(0.01)
                continue
            ahead = sent / target - (now - window_start)
            if ahead > 0.01:
                pub.flush()
                acked.value = pub.acked * per_msg
                time.sleep(min(ahead, 0.05))
                continue
            topic, tpl = topics[i % n]
            i += 1
            pub.publish(topic, tpl.render(time.time_ns() // 1_000_000))
            sent += tpl.readings
            if not pub.sent & 255:  # flat out (the ceilings) never reaches the sleeps above
                acked.value = pub.acked * per_msg
    finally:
        pub.close()
        acked.value = pub.acked * per_msg


class Publishers:
    """Several publisher processes sharing one target rate (readings/s)."""

    def __init__(
        self,
        url: str,
        shards: Sequence[Sequence[Template]],
        topic_prefix: str = "",
    ) -> None:
        ctx = mp.get_context("spawn")
        self.shared = PublisherShared(rate=ctx.Value("d", 0.0, lock=False), stop=ctx.Event())
        self.procs: list[Any] = []
        for i, shard in enumerate(shards):
            acked = ctx.Value("q", 0, lock=False)
            self.shared.acked.append(acked)
            self.procs.append(
                ctx.Process(
                    target=_publisher_main,
                    args=(
                        i,
                        url,
                        list(shard),
                        len(shards),
                        self.shared.rate,
                        self.shared.stop,
                        acked,
                        topic_prefix,
                    ),
                    name=f"bench-publisher-{i}",
                    daemon=True,
                )
            )

    def start(self) -> None:
        for p in self.procs:
            p.start()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def set_rate(self, readings_per_s: float) -> None:
        self.shared.rate.value = readings_per_s

    @property
    def acked(self) -> int:
        """Readings PUBACKed by the broker, all publishers."""
        return sum(int(v.value) for v in self.shared.acked)

    def stop(self, timeout_s: float = 15.0) -> None:
        self.shared.stop.set()
        for p in self.procs:
            p.join(timeout_s)
            if p.is_alive():
                p.kill()
                p.join()


def shard(templates: Sequence[Sequence[Template]], count: int) -> list[list[Template]]:
    """Split per-sensor template lists over ``count`` publishers (a sensor stays on one)."""
    shards: list[list[Template]] = [[] for _ in range(count)]
    for i, per_sensor in enumerate(templates):
        shards[i % count].extend(per_sensor)
    return shards


class Probe:
    """Publishes latency probes on its own connection: ``rate_hz`` messages a second.

    Probes rotate over the probe sensors; each sensor alternates a marker reading (fires
    :data:`~deploy.bench._rules.MARKER_RULE`) and a normal one (resolves it). ``sent`` records
    (sensor, ts_ms) -> marker for every probe published.
    """

    def __init__(self, url: str, sensors: Sequence[Sensor], mode: Mode, rate_hz: float) -> None:
        self.url = url
        self.rate_hz = rate_hz
        self.marker = [templates_for(s, mode, MARKER_VALUE) for s in sensors]
        self.normal = [templates_for(s, mode, _value(s, MARKER_METRIC)) for s in sensors]
        self.ids = [s.id for s in sensors]
        self.sent: dict[tuple[str, int], bool] = {}
        """(sensor, ts_ms) -> marker, of every probe, recorded just before it is published."""
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="bench-probe", daemon=True)
        self._thread.start()

    def pause(self) -> None:
        """Publish nothing until :meth:`resume` (the bench's drains wait for quiet counters)."""
        self._paused.set()

    def resume(self) -> None:
        self._paused.clear()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        client = connect(self.url, f"bench-probe-{uuid.uuid4().hex[:6]}", inflight=100)
        k = len(self.ids)
        tick = 0
        try:
            while not self._stop.wait(1.0 / self.rate_hz):
                if self._paused.is_set():
                    continue
                i = tick % k
                marker = (tick // k) % 2 == 0
                tick += 1
                tpls = (self.marker if marker else self.normal)[i]
                # The marker metric's template (single mode: one per metric).
                tpl = next(
                    (t for t in tpls if MARKER_METRIC.encode() in b"".join(t.parts)), tpls[0]
                )
                ts = time.time_ns() // 1_000_000
                self.sent[(self.ids[i], ts)] = marker
                info = client.publish(tpl.topic, tpl.render(ts), qos=1)
                with contextlib.suppress(RuntimeError, ValueError):
                    info.wait_for_publish(timeout=5)
        finally:
            client.disconnect()
            client.loop_stop()
