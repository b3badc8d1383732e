"""Fixtures of the core tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from citypulse.service import serve_http
from deploy.embedded import free_port


@pytest.fixture
def http_port() -> Iterator[int]:
    """Port of a running ``/metrics``, ``/healthz``, ``/readyz`` server on loopback."""
    port = free_port()
    server = serve_http(port, host="127.0.0.1")
    try:
        yield port
    finally:
        server.shutdown()
        server.server_close()
