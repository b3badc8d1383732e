"""The collector's loop between paho's thread and Kafka, with a scripted producer and client:
messages are taken once and in order, the loop is woken only when idle, turns go to Kafka
without waiting for the previous turn's answer, and MQTT acks keep arrival order, through a
failed produce too."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from aiokafka.errors import RequestTimedOutError
from prometheus_client import REGISTRY

from citypulse.settings import Settings
from collectors.service import Collector
from tests.collectors.registry import registry

MESSAGES = 2000
TOPIC = "citypulse/v1/aquasense/wtr-0001/up"
T0_MS = time.time_ns() // 1_000_000 - 3_600_000  # an hour ago: message ``mid`` is at T0 + mid


class _Batch:
    def __init__(self) -> None:
        self.values: list[bytes] = []

    def append(self, key: bytes, value: bytes, timestamp: None) -> object:
        self.values.append(value)
        return object()  # record metadata: the batch took it


class _Producer:
    """Kafka as the collector sees it: each batch's answer is a future the test resolves
    (or, with ``answer_after``, resolved that many seconds after it was handed over)."""

    def __init__(self, answer_after: float | None = None) -> None:
        self.answer_after = answer_after
        self.batches: list[list[bytes]] = []
        self.answers: list[asyncio.Future[None]] = []

    async def partitions_for(self, topic: str) -> set[int]:
        return {0}

    def create_batch(self) -> _Batch:
        return _Batch()

    async def send_batch(self, batch: _Batch, topic: str, partition: int) -> asyncio.Future[None]:
        answer: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.answer_after is not None:
            asyncio.get_running_loop().call_later(self.answer_after, answer.set_result, None)
        self.batches.append(batch.values)
        self.answers.append(answer)
        return answer


class _Client:
    def __init__(self) -> None:
        self.acked: list[int] = []

    def ack_all(self, mids: list[int]) -> None:
        self.acked.extend(mids)

    def publish(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("no message here is refused")


def _collector(linger_ms: int, turn_ms: int | None = None) -> Collector:
    settings = Settings(kafka_linger_ms=linger_ms, collector_turn_ms=turn_ms)
    collector = Collector(settings, registry())
    collector._loop = asyncio.get_running_loop()
    return collector


def _arrive(collector: Collector, mid: int) -> None:
    """What paho's thread does when a QoS 1 message comes in."""
    payload = orjson.dumps({"ts": T0_MS + mid, "values": {"pressure": mid % 16}})
    collector._on_message(None, None, SimpleNamespace(topic=TOPIC, payload=payload, mid=mid, qos=1))


def _mids(batch: list[bytes]) -> list[int]:
    return [orjson.loads(v)["readings"][0]["ts_ms"] - T0_MS for v in batch]


def _retries() -> float:
    return REGISTRY.get_sample_value("citypulse_collector_kafka_retries_total") or 0.0


async def _until(condition: Any, what: str) -> None:
    deadline = time.monotonic() + 5
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.001)


async def test_messages_arriving_while_busy_do_not_wake_the_loop() -> None:
    collector = _collector(linger_ms=5)
    loop = asyncio.get_running_loop()
    wakes = 0
    real = loop.call_soon_threadsafe

    def counting(callback: Any, *args: Any) -> Any:
        nonlocal wakes
        wakes += 1
        return real(callback, *args)

    loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
    producer, client, stop = _Producer(answer_after=0.005), _Client(), asyncio.Event()

    def paho_thread() -> None:
        for mid in range(MESSAGES):
            _arrive(collector, mid)
            time.sleep(0.00005)

    feeder = threading.Thread(target=paho_thread)
    consume = asyncio.create_task(collector._consume(stop, producer, client))
    try:
        feeder.start()
        await _until(lambda: len(client.acked) == MESSAGES, "every ack")
        stop.set()
        await asyncio.wait_for(consume, 5)
    finally:
        feeder.join()
        loop.call_soon_threadsafe = real  # type: ignore[method-assign]
    assert client.acked == list(range(MESSAGES))
    assert [m for b in producer.batches for m in _mids(b)] == list(range(MESSAGES))
    # One wake-up per idle spell: messages that come while a turn lingers (5 ms) wait for it.
    assert wakes < MESSAGES / 10, wakes


@pytest.mark.parametrize(
    ("linger_ms", "turn_ms", "turns"),
    [(400, None, [[1, 2]]), (1, 400, [[1, 2]]), (400, 1, [[1], [2]])],
)
async def test_a_turn_lasts_collector_turn_ms_when_set_else_the_producers_linger(
    linger_ms: int, turn_ms: int | None, turns: list[list[int]]
) -> None:
    """Two messages 100 ms apart share a turn when it lasts 400 ms, not when it lasts 1 ms (the
    embedded stack sets a turn longer than the producers' linger: deploy/embedded.py)."""
    collector = _collector(linger_ms, turn_ms)
    producer, client, stop = _Producer(answer_after=0), _Client(), asyncio.Event()
    consume = asyncio.create_task(collector._consume(stop, producer, client))
    _arrive(collector, 1)
    await asyncio.sleep(0.1)
    _arrive(collector, 2)
    await _until(lambda: client.acked == [1, 2], "both acks")
    stop.set()
    await asyncio.wait_for(consume, 5)
    assert [_mids(b) for b in producer.batches] == turns


async def test_a_turn_goes_to_kafka_before_the_previous_is_answered_and_acks_keep_order() -> None:
    collector = _collector(linger_ms=2)
    producer, client, stop = _Producer(), _Client(), asyncio.Event()
    consume = asyncio.create_task(collector._consume(stop, producer, client))
    _arrive(collector, 1)
    await _until(lambda: len(producer.batches) == 1, "the first turn")
    _arrive(collector, 2)
    await _until(lambda: len(producer.batches) == 2, "the second turn, the first unanswered")
    assert [_mids(b) for b in producer.batches] == [[1], [2]]

    producer.answers[1].set_result(None)  # Kafka answers the later turn first
    await asyncio.sleep(0.02)
    assert client.acked == []  # MQTT acks keep arrival order: message 2 waits for 1
    producer.answers[0].set_result(None)
    await _until(lambda: client.acked == [1, 2], "both acks, in order")
    stop.set()
    await asyncio.wait_for(consume, 5)


async def test_after_a_failed_produce_it_and_every_later_turn_are_sent_again_in_order() -> None:
    collector = _collector(linger_ms=2)
    producer, client, stop = _Producer(), _Client(), asyncio.Event()
    retries = _retries()
    consume = asyncio.create_task(collector._consume(stop, producer, client))
    _arrive(collector, 1)
    await _until(lambda: len(producer.batches) == 1, "the first turn")
    _arrive(collector, 2)
    await _until(lambda: len(producer.batches) == 2, "the second turn")
    producer.answers[1].set_result(None)  # Kafka took turn 2 ...
    producer.answers[0].set_exception(RequestTimedOutError())  # ... but not turn 1

    # After the backoff turn 1 goes again, then turn 2, so the sensor's last copies on Kafka
    # are in arrival order; nothing is acked until Kafka took both.
    await _until(lambda: len(producer.batches) == 3, "turn 1 again")
    assert client.acked == []
    producer.answers[2].set_result(None)
    await _until(lambda: len(producer.batches) == 4, "turn 2 again")
    assert client.acked == []
    producer.answers[3].set_result(None)
    await _until(lambda: client.acked == [1, 2], "both acks, in order")
    assert [_mids(b) for b in producer.batches] == [[1], [2], [1], [2]]
    assert _retries() == retries + 1
    stop.set()
    await asyncio.wait_for(consume, 5)
