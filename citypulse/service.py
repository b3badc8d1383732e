"""What every long-running citypulse service shares: signals, metrics endpoint, health.

A service is an object with ``async run(stop: asyncio.Event)``; :func:`run_service` builds the
stop event from SIGTERM/SIGINT, serves Prometheus metrics, and returns the exit code (0 on a
clean stop). ``/healthz`` answers while the process lives; ``/readyz`` answers 200 only once
the service has registered its readiness checks with :class:`Health` and every one passes.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Histogram, generate_latest

log = logging.getLogger("citypulse.service")


class Service(Protocol):
    async def run(self, stop: asyncio.Event) -> None: ...


class Health:
    """Named readiness checks, each a cheap callable returning True when ready."""

    def __init__(self) -> None:
        self._checks: dict[str, Callable[[], bool]] = {}

    def add(self, name: str, check: Callable[[], bool]) -> None:
        self._checks[name] = check

    def status(self) -> dict[str, bool]:
        out = {}
        for name, check in self._checks.items():
            try:
                out[name] = bool(check())
            except Exception:  # a failing check means not ready, never a crash
                out[name] = False
        return out

    def ready(self) -> bool:
        """Every check passes, and there is one: a service registers its checks as it starts
        (the collector only after creating topics and starting its producer), and until then it
        is starting, not ready. An empty set once answered ready: a publisher waiting for the
        collector's /readyz could publish before its MQTT subscription existed, and the broker
        dropped those messages (no subscriber yet)."""
        return _all_ready(self.status())


def _all_ready(status: dict[str, bool]) -> bool:
    return bool(status) and all(status.values())


HEALTH = Health()


def metrics_page(query: str) -> bytes:
    """The /metrics exposition; ``name[]=<sample name>`` parameters restrict it to those
    samples, as prometheus-client's own handler does. A poller that follows a few counters (the
    bench every 0.5 s, ``citypulse up``) then costs the service one collector each, not the
    whole registry: the rule worker's page is hundreds of histogram samples."""
    names = parse_qs(query).get("name[]")
    return generate_latest(REGISTRY.restricted_registry(names) if names else REGISTRY)


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.startswith("/metrics"):
            body = metrics_page(urlsplit(self.path).query)
            ctype, code = CONTENT_TYPE_LATEST, 200
        elif self.path.startswith("/healthz"):
            body, ctype, code = b"ok\n", "text/plain", 200
        elif self.path.startswith("/readyz"):
            status = HEALTH.status()
            ok = _all_ready(status)
            lines = "".join(f"{k} {'ok' if v else 'not ready'}\n" for k, v in status.items())
            body, ctype, code = lines.encode() or b"starting\n", "text/plain", 200 if ok else 503
        else:
            body, ctype, code = b"not found\n", "text/plain", 404
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


GC_PAUSE = Histogram(
    "citypulse_gc_pause_seconds",
    "Time the process stood still in Python's cyclic garbage collector, by generation",
    ["generation"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)


def time_gc() -> None:
    """Observe every garbage-collector pause in :data:`GC_PAUSE` (a full collection over a
    large heap stops every task of the process: a latency spike worth seeing)."""
    started = [0.0]
    by_gen = [GC_PAUSE.labels(str(g)) for g in range(3)]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            by_gen[info["generation"]].observe(time.perf_counter() - started[0])

    if not any(getattr(cb, "__name__", "") == "on_gc" for cb in gc.callbacks):
        gc.callbacks.append(on_gc)


GC_YOUNG = 50_000
"""Allocations between young collections (CPython's default: 700). A writer batch or a poll
of records is tens of thousands of objects; collected every 700 allocations, most of it
survives into the oldest generation while in flight and sets off full collections there."""


def settle_heap() -> None:
    """Collect once, then exempt every surviving object from future collections.

    What a service holds when it starts serving (modules, the registry, compiled rules) lives
    as long as the process; left in the collector's oldest generation, every full collection
    walks it again: 200-250 ms stalls in the bench's writer and rule worker. Frozen objects
    are still freed by reference counting; only a cycle among them would outlive its use, so
    callers that drop large cyclic state (the rule worker on revocation) unfreeze first.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG, 20, 10)


def serve_http(port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer:  # noqa: S104
    """Serve /metrics, /healthz and /readyz on ``port`` in a daemon thread."""
    server = ThreadingHTTPServer((host, port), _Handler)
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server


async def run_service(service: Service, metrics_port: int = 0) -> int:
    """Run ``service`` until SIGTERM/SIGINT; return 0 after a clean stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    http = serve_http(metrics_port) if metrics_port else None
    time_gc()
    settle_heap()
    try:
        await service.run(stop)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if http is not None:
            http.shutdown()
    log.info("stopped cleanly")
    return 0
