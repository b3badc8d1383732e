"""Turns: MQTT messages validated together and produced to Kafka as one request.

A turn opens with its first message and closes ``collector_turn_ms`` later (default
``kafka_linger_ms``) or at :data:`MAX_MESSAGES`; what arrived meanwhile is validated and sent
at once, one record batch per partition, and the next turn opens while Kafka answers. A message
waits at most one turn before it is sent, not also for the previous turn's answer. The
collector acks a turn's MQTT messages once Kafka acknowledged all of its records, turn after
turn in the order they were sent (MQTT 5 §4.6: PUBACKs in the order the PUBLISHes came). When a
turn fails, it and every turn sent after it are sent again, in order (``Collector._resend``).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from aiokafka.errors import KafkaError

from citypulse.events import Rejection
from collectors.ratelimit import VendorRateLimiter
from collectors.validate import EncodedBatch, Validator
from stream import send_keyed

MAX_MESSAGES = 1000
"""Messages in one turn, at most (bounded anyway by the receive maximum we announce)."""


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    mid: int
    qos: int
    generation: int
    """MQTT connection it arrived on: an ack only makes sense on that connection."""


@dataclass(slots=True)
class Turn:
    messages: list[Message] = field(default_factory=list)
    verdicts: list[EncodedBatch | Rejection] = field(default_factory=list)
    readings: list[tuple[bytes, bytes]] = field(default_factory=list)
    refused: list[tuple[bytes | None, bytes]] = field(default_factory=list)
    accepted: int = 0
    sent: float = 0.0
    answered: float = 0.0
    acked: asyncio.Future[list[Any]] | None = None
    """Resolved once Kafka answered for every record of the turn; :meth:`error` says how."""

    def add(
        self,
        messages: list[Message],
        validator: Validator,
        limiter: VendorRateLimiter,
        now_ms: int,
    ) -> None:
        """Validate ``messages`` into this turn: readings to produce, rejections to dead-letter."""
        validate = validator.validate_encoded
        for m in messages:
            verdict = validate(m.topic, m.payload, now_ms)
            if isinstance(verdict, EncodedBatch):
                if limiter.enabled and not limiter.take(
                    verdict.vendor, verdict.readings, time.monotonic()
                ):
                    verdict = limiter.refusal(
                        verdict.vendor,
                        verdict.sensor,
                        verdict.readings,
                        m.topic,
                        m.payload,
                        verdict.received_ms,
                        verdict.source,
                    )
                else:
                    self.accepted += verdict.readings
                    self.readings.append((verdict.sensor.encode(), verdict.value))
                    self.verdicts.append(verdict)
                    continue
            self.verdicts.append(verdict)
            key = verdict.vendor.encode() if verdict.vendor else None
            self.refused.append((key, verdict.encode()))
        self.messages.extend(messages)

    async def send(
        self, producer: Any, readings_topic: str, deadletter_topic: str
    ) -> asyncio.Future[list[Any]]:
        """Hand every record to the producer; return :attr:`acked`, which resolves once Kafka
        answered for all of them (:meth:`error` tells whether one failed).

        Failing to hand them over (the producer's own timeout) resolves :attr:`acked` at once
        with that error: the caller handles both the same way. Batches handed over before it
        are not waited for then (it takes a broker unreachable for the producer's whole
        request timeout).
        """
        self.sent = time.perf_counter()
        try:
            futures = await send_keyed(producer, readings_topic, self.readings)
            for key, value in self.refused:  # few: one by one (a vendorless one has no key)
                futures.append(await producer.send(deadletter_topic, value=value, key=key))
        except KafkaError as exc:
            failed: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
            failed.set_result([exc])
            self.acked = failed
            self.answered = time.perf_counter()
            return failed
        # Every answer, not the first failure: a turn is only re-sent once none of its
        # batches is still on its way (it would land after the copy).
        acked = self.acked = asyncio.gather(*futures, return_exceptions=True)
        acked.add_done_callback(self._answered)
        return acked

    def _answered(self, _: asyncio.Future[list[Any]]) -> None:
        self.answered = time.perf_counter()

    def done(self) -> bool:
        """Kafka answered for every record (False until the turn is sent)."""
        return self.acked is not None and self.acked.done()

    def error(self) -> BaseException | None:
        """The first failure among the answers (once :attr:`acked` is done), else None."""
        assert self.acked is not None
        return next((r for r in self.acked.result() if isinstance(r, BaseException)), None)
