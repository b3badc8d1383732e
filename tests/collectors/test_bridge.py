"""The paho thread → asyncio bridge: every message is taken once, in order, and the loop is
woken only when it is idle, not once per message while it works."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace
from typing import Any

from citypulse.settings import Settings
from collectors.service import Collector, _Message
from tests.collectors.registry import registry

MESSAGES = 2000


async def test_messages_arriving_while_busy_do_not_wake_the_loop() -> None:
    collector = Collector(Settings(), registry())
    loop = asyncio.get_running_loop()
    collector._loop = loop
    wakes = 0
    real = loop.call_soon_threadsafe

    def counting(callback: Any, *args: Any) -> Any:
        nonlocal wakes
        wakes += 1
        return real(callback, *args)

    loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
    taken: list[int] = []
    stop = asyncio.Event()

    async def work(batch: list[_Message], *_: Any) -> None:
        taken.extend(m.mid for m in batch)
        await asyncio.sleep(0.005)  # validating and producing take time; the loop is free
        if len(taken) == MESSAGES:
            stop.set()

    collector._process = work  # type: ignore[method-assign]

    def paho_thread() -> None:
        for mid in range(MESSAGES):
            msg = SimpleNamespace(topic="t", payload=b"{}", mid=mid, qos=1)
            collector._on_message(None, None, msg)
            time.sleep(0.00005)

    feeder = threading.Thread(target=paho_thread)
    try:
        feeder.start()
        await asyncio.wait_for(collector._consume(stop, None, None), 30)
    finally:
        feeder.join()
        loop.call_soon_threadsafe = real  # type: ignore[method-assign]
    assert taken == list(range(MESSAGES))
    # One wake-up per idle spell: the loop sleeps in `work` (5 ms) while ~50+ messages arrive.
    assert wakes < MESSAGES / 10, wakes
