"""``/metrics?name[]=...``: a poller asking for a few samples gets only those.

The bench polls three services every 0.5 s for one counter each, and ``citypulse up`` does the
same for its progress line; the full page (the rule worker's runs to hundreds of histogram
samples) cost the service to build and the poller to parse on every poll.
"""

from __future__ import annotations

import urllib.request

from prometheus_client import Counter

from deploy.up import scrape

_THINGS = Counter("citypulse_test_things", "things counted by this test", ["stage"])


def _get(port: int, query: str) -> str:
    url = f"http://127.0.0.1:{port}/metrics{query}"
    with urllib.request.urlopen(url, timeout=5) as r:
        return str(r.read().decode())


def test_name_parameters_restrict_the_page_and_scrape_uses_them(http_port: int) -> None:
    _THINGS.labels("sensor").inc(3)
    _THINGS.labels("group").inc(4)
    full = _get(http_port, "")
    assert "citypulse_test_things_total" in full
    assert "python_info" in full
    only = _get(http_port, "?name[]=citypulse_test_things_total")
    samples = [line for line in only.splitlines() if not line.startswith("#")]
    assert sorted(samples) == [
        'citypulse_test_things_total{stage="group"} 4.0',
        'citypulse_test_things_total{stage="sensor"} 3.0',
    ]
    assert scrape(http_port, "citypulse_test_things_total") == 7.0
    assert scrape(http_port, "citypulse_test_things_total", {"stage": "group"}) == 4.0
    assert scrape(http_port, "citypulse_no_such_metric_total") is None
