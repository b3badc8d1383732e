"""The collector service: MQTT (QoS 1, shared subscription) → validate → Kafka, then ack.

Bridge: paho-mqtt runs its network loop in its own thread (``loop_start``); ``on_message``
appends each message to a deque (thread-safe append/popleft) and wakes the asyncio loop with
``call_soon_threadsafe`` only when the loop is idle: the flag that suppresses wake-ups is
cleared by the consumer when it finds the deque empty, not when a wake-up arrives, so messages
that come while it works are taken on its next turn without waking it (waking the loop per
message cost ~11 % of the collector's CPU with single-reading messages). The deque is bounded by
the MQTT v5 *receive maximum* we announce: the broker can never have more unacknowledged QoS 1
messages in flight than that; QoS 0 beyond it is dropped and counted. Paho also reconnects
(backoff 1 s doubling to 30 s), with ``clean_start=False`` and the same client id, so the broker
keeps our session and redelivers what was not acknowledged.

Delivery: at least once. A message is acknowledged to the broker (manual ack) only after Kafka
acknowledged the record made from it (``acks=all``): the readings, or the rejection on the
dead-letter topic. A crash between the two makes the broker redeliver: duplicates are possible
here, loss is not (the writer deduplicates on (sensor, metric, ts)).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import ssl
import time
from typing import Any
from urllib.parse import urlsplit

from aiokafka.errors import KafkaError
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from citypulse.events import Rejection
from citypulse.registry import Registry, load_registry
from citypulse.service import HEALTH
from citypulse.settings import Settings
from citypulse.topics import UP_WILDCARD, SensorTopic
from collectors import metrics
from collectors.errors import CollectorError
from collectors.mqtt_client import LeanClient
from collectors.ratelimit import VendorRateLimiter
from collectors.turns import MAX_MESSAGES, Message, Turn
from collectors.validate import Limits, Validator, reject_notice
from stream import ensure_topics, make_producer

log = logging.getLogger("citypulse.collectors")


class MqttConnectError(CollectorError):
    """The MQTT URL or TLS settings cannot be used."""


def default_client_id(settings: Settings) -> str:
    """The MQTT client id: ``settings.mqtt_client_id``, else ``collector-<hostname>``.

    It must be stable across restarts, or the broker's queued session is orphaned.
    """
    return settings.mqtt_client_id or f"collector-{socket.gethostname()}"


def subscription(settings: Settings) -> str:
    """``$share/<group>/citypulse/v1/+/+/up``: the group's collectors split the messages."""
    return f"$share/{settings.mqtt_shared_group}/{UP_WILDCARD}"


def make_mqtt_client(settings: Settings, client_id: str, manual_ack: bool) -> tuple[Any, str, int]:
    """A configured paho v2 client (MQTT v5, credentials, TLS for mqtts://); not connected.

    Returns:
        ``(client, host, port)``.
    """
    url = urlsplit(settings.mqtt_url)
    if url.scheme not in ("mqtt", "mqtts") or not url.hostname:
        raise MqttConnectError(f"expected mqtt://host:port or mqtts://host:port: {url.scheme}://")
    tls = url.scheme == "mqtts"
    client = LeanClient(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv5,
        manual_ack=manual_ack,
    )
    if settings.mqtt_username is not None:
        password = settings.mqtt_password.get_secret_value() if settings.mqtt_password else None
        client.username_pw_set(settings.mqtt_username, password)
    if tls:
        ca = str(settings.mqtt_ca_file) if settings.mqtt_ca_file else None
        client.tls_set_context(ssl.create_default_context(cafile=ca))
    client.reconnect_delay_set(min_delay=1, max_delay=30)
    return client, url.hostname, url.port or (8883 if tls else 1883)


class Collector:
    """The ``citypulse collect`` service (``async run(stop)`` for ``run_service``).

    Args:
        settings: process settings (MQTT, Kafka, limits, registry path).
        registry: the registry to validate against; default: loaded from ``settings.registry``.
    """

    def __init__(self, settings: Settings, registry: Registry | None = None) -> None:
        self.settings = settings
        self.validator = Validator(
            registry if registry is not None else load_registry(settings.registry),
            Limits.from_settings(settings),
        )
        self.client_id = default_client_id(settings)
        self._topics = (settings.topic("readings"), settings.topic("deadletter"))
        self.limiter = VendorRateLimiter(
            settings.vendor_rate_limit_per_s, settings.vendor_rate_burst
        )
        self._connected = False
        self._subscribed = False
        self._kafka_ok = False
        self._closing = False
        self._generation = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        # Filled by paho's thread, emptied by the asyncio loop; see the module docstring.
        self._inbox: collections.deque[Message] = collections.deque()
        self._capacity = settings.mqtt_receive_maximum
        self._wake_pending = False
        self._ready = asyncio.Event()

    # -- paho thread -----------------------------------------------------------------------

    def _on_connect(
        self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        if reason_code.is_failure:
            log.warning("mqtt connect refused", extra={"reason": str(reason_code)})
            return
        self._generation += 1
        self._connected = True
        # Subscribing again is harmless when the session kept the subscription.
        client.subscribe(subscription(self.settings), qos=1)
        log.info(
            "mqtt connected",
            extra={"session_present": bool(flags.session_present), "client_id": self.client_id},
        )

    def _on_subscribe(
        self, client: Any, userdata: Any, mid: int, reason_codes: Any, properties: Any
    ) -> None:
        failed = [str(rc) for rc in reason_codes if rc.is_failure]
        if failed:
            log.error("mqtt subscription refused", extra={"reasons": failed})
            return
        self._subscribed = True

    @property
    def ready(self) -> bool:
        """True while connected and subscribed to MQTT with a working Kafka producer."""
        return self._connected and self._subscribed and self._kafka_ok

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        self._connected = False
        self._subscribed = False
        if not self._closing:
            log.warning("mqtt disconnected, reconnecting", extra={"reason": str(reason_code)})

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        if self._closing or self._loop is None:
            return  # not acked: the broker redelivers it on our next session
        inbox = self._inbox
        if msg.qos == 0 and len(inbox) >= self._capacity:
            # Only QoS 0 is dropped. QoS 1 should be bounded by our receive maximum, but the
            # bench saw Mosquitto deliver more than that under load: dropping one of those
            # would leave it unacked in flight (never redelivered before a reconnect).
            metrics.MESSAGES_DROPPED.inc()
            log.warning("queue full, message dropped", extra={"topic": msg.topic})
            return
        inbox.append(Message(msg.topic, msg.payload, msg.mid, msg.qos, self._generation))
        if not self._wake_pending:
            # Set here, cleared by the consumer when it goes idle and *before* it looks at the
            # deque a last time, so a message appended meanwhile is never stranded.
            self._wake_pending = True
            with contextlib.suppress(RuntimeError):  # loop closed while shutting down
                self._loop.call_soon_threadsafe(self._wake)

    # -- asyncio thread --------------------------------------------------------------------

    def _wake(self) -> None:
        self._ready.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Collect until ``stop`` is set, then finish in-flight work, ack, disconnect."""
        settings = self.settings
        self._loop = asyncio.get_running_loop()
        log.info("collector starting", extra={"settings": settings.redacted()})
        await ensure_topics(settings)
        # The collector lingers itself (turns); the producer sends each turn at once.
        producer = make_producer(settings, linger_ms=0)
        await producer.start()
        self._kafka_ok = True
        HEALTH.add("mqtt", lambda: self._connected and self._subscribed)
        HEALTH.add("kafka", lambda: self._kafka_ok)

        client, host, port = make_mqtt_client(settings, self.client_id, manual_ack=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = settings.mqtt_session_expiry_s
        props.ReceiveMaximum = settings.mqtt_receive_maximum
        client.connect_async(host, port, keepalive=30, clean_start=False, properties=props)
        client.loop_start()
        try:
            await self._consume(stop, producer, client)
        finally:
            self._closing = True
            client.disconnect()
            await asyncio.to_thread(client.loop_stop)
            await producer.stop()
            self._connected = False
            self._kafka_ok = False
            log.info("collector stopped")

    async def _consume(self, stop: asyncio.Event, producer: Any, client: Any) -> None:
        """Turns (``collectors/turns.py``): linger, validate, send; ack them in order.

        While a turn lingers, arriving messages wait in the inbox without waking the loop
        (the wake flag stays set); Kafka's answers wake it, so acks go out promptly.
        """
        inbox = self._inbox
        ready = self._ready
        turn_ms = self.settings.collector_turn_ms
        linger = (self.settings.kafka_linger_ms if turn_ms is None else turn_ms) / 1000
        opened: float | None = None  # when the open turn's first message was seen
        sent: collections.deque[Turn] = collections.deque()
        while True:
            while sent and sent[0].done():
                if sent[0].error() is not None and not await self._resend(sent, producer, stop):
                    return  # stopping with Kafka down: unacked, the broker redelivers them
                self._finish(sent.popleft(), client)
            if stop.is_set():
                self._closing = True  # take nothing new; finish and ack what is queued
            now = time.monotonic()
            if inbox and opened is None:
                opened = now
            if opened is not None and (
                self._closing or len(inbox) >= MAX_MESSAGES or now - opened >= linger
            ):
                popleft = inbox.popleft
                turn = Turn()
                turn.add(
                    [popleft() for _ in range(min(len(inbox), MAX_MESSAGES))],
                    self.validator,
                    self.limiter,
                    time.time_ns() // 1_000_000,
                )
                metrics.MESSAGES_RECEIVED.inc(len(turn.messages))
                metrics.QUEUE_DEPTH.set(len(inbox))
                (await turn.send(producer, *self._topics)).add_done_callback(self._answer)
                sent.append(turn)
                opened = time.monotonic() if inbox else None
                continue
            if self._closing and opened is None and not sent:
                return
            ready.clear()
            if opened is None:
                self._wake_pending = False  # idle: the next message wakes us
                if inbox:  # appended before the flag was cleared: it sent no wake-up
                    continue
                timeout = 0.1
            else:
                timeout = opened + linger - now
            if sent and sent[0].done():
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await ready.wait()

    def _answer(self, _: asyncio.Future[Any]) -> None:
        self._ready.set()

    async def _resend(
        self, sent: collections.deque[Turn], producer: Any, stop: asyncio.Event
    ) -> bool:
        """A turn failed: wait for every later turn, then send them all again, in order.

        Later turns are sent again even if Kafka took them, so each sensor's readings reach
        Kafka in arrival order after the copies of the failed turn (the duplicates are dropped
        by the writer). Retries with backoff (0.5 s doubling to 10 s) until each is acked.

        Returns:
            False if ``stop`` was set while Kafka still failed (nothing acked).
        """
        await asyncio.gather(*(t.acked for t in sent if t.acked is not None))
        for i, turn in enumerate(sent):
            if i:  # after the failed one: again, right away, whatever Kafka answered before
                await self._send_again(turn, producer)
            delay = 0.5
            while (error := turn.error()) is not None:
                if not isinstance(error, KafkaError):
                    raise error
                self._kafka_ok = False
                metrics.KAFKA_RETRIES.inc()
                log.warning(
                    "kafka produce failed, sending the turn again",
                    extra={
                        "error": repr(error),
                        "messages": len(turn.messages),
                        "retry_in_s": delay,
                    },
                )
                if stop.is_set():
                    return False
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                await self._send_again(turn, producer)
        return True

    async def _send_again(self, turn: Turn, producer: Any) -> None:
        await (await turn.send(producer, *self._topics))

    def _finish(self, turn: Turn, client: Any) -> None:
        """Kafka took every record of ``turn``: count it, notify refused vendors, ack."""
        metrics.PRODUCE_SECONDS.observe(turn.answered - turn.sent)
        metrics.READINGS_ACCEPTED.inc(turn.accepted)
        self._kafka_ok = True
        generation = self._generation
        acks: list[int] = []
        for m, verdict in zip(turn.messages, turn.verdicts, strict=True):
            if isinstance(verdict, Rejection):
                metrics.MESSAGES_REFUSED.labels(verdict.reason.value).inc()
                log.info(
                    "message refused",
                    extra={
                        "reason": verdict.reason.value,
                        "detail": verdict.detail,
                        "topic": m.topic,
                        "message_hash": verdict.message_hash,
                    },
                )
                if verdict.vendor and verdict.sensor:
                    notice = SensorTopic(verdict.vendor, verdict.sensor, "rejects")
                    client.publish(str(notice), reject_notice(verdict), qos=1)
            # An ack on a later connection would hit a different in-flight message.
            if m.qos == 1 and m.generation == generation:
                acks.append(m.mid)
        client.ack_all(acks)  # one write for the turn (the subscription is QoS 1)
