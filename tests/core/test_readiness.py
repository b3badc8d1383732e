"""``/readyz``: a service is ready once it has registered its checks and all of them pass.

It answered 200 before the collector had registered any (while it was still creating topics),
so a vendor-side publisher waiting for readiness published before the collector's MQTT
subscription existed, and the broker dropped those messages: the collector crash test lost
its first messages about one run in four on a slow machine.
"""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from citypulse import service
from citypulse.service import Health


def _readyz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_not_ready_until_checks_are_registered_and_pass(
    monkeypatch: pytest.MonkeyPatch, http_port: int
) -> None:
    health = Health()
    monkeypatch.setattr(service, "HEALTH", health)
    assert _readyz(http_port) == (503, "starting\n")
    assert not health.ready()
    subscribed = False
    health.add("mqtt", lambda: subscribed)
    assert _readyz(http_port) == (503, "mqtt not ready\n")
    subscribed = True
    assert _readyz(http_port) == (200, "mqtt ok\n")
    assert health.ready()
