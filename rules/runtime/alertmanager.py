"""Alertmanager client: POST alerts to the v2 API, the way Prometheus does.

Prometheus re-sends every firing alert periodically with ``endsAt`` a few evaluation intervals
ahead, so Alertmanager keeps it open as long as the sender is alive and closes it by itself if
the sender dies (no "stuck firing" alert). We do the same: each post of a firing alert carries
``endsAt = now + 4 * resend interval``; a resolved alert carries ``endsAt`` = when it resolved.
Alertmanager deduplicates by the label set, so re-posting the same alert is harmless.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from datetime import UTC, datetime

from citypulse.events import AlertEvent, AlertState, ms_to_dt
from rules.runtime.errors import AlertmanagerError

log = logging.getLogger("citypulse.rules.alertmanager")

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NOT_IN_NAME = re.compile(r"[^A-Za-z0-9_]+")


def am_name(key: str) -> str:
    """``key`` as a valid Alertmanager label or annotation name (``[A-Za-z_][A-Za-z0-9_]*``):
    other characters become ``_``. Alertmanager refuses a whole post if one alert in it has an
    invalid name, and a group rule's values are named by expressions (``group.avg(pressure)``).
    """
    if _NAME.fullmatch(key):
        return key
    name = _NOT_IN_NAME.sub("_", key).strip("_") or "_"
    return f"_{name}" if name[0].isdigit() else name


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def alert_payload(
    event: AlertEvent, now_ms: int, hold_ms: int, generator_url: str
) -> dict[str, object]:
    """One element of the v2 ``postableAlerts`` list for ``event``.

    Args:
        event: a firing or resolved alert event.
        now_ms: the sender's clock, epoch ms (only used for the ``endsAt`` of firing alerts).
        hold_ms: how long Alertmanager keeps a firing alert open without a re-send, ms.
        generator_url: link back to the rule (shown in notifications).
    """
    labels = {
        **{am_name(k): v for k, v in event.labels.items()},
        "alertname": event.rule,
        "severity": event.severity,
        "rule_group": event.group,
    }
    annotations = {am_name(k): v for k, v in event.annotations.items()}
    annotations["rule_version"] = event.rule_version
    for key, value in sorted(event.values.items()):
        annotations.setdefault(am_name(f"value_{key}"), f"{value:g}")
    starts_ms = event.active_since_ms if event.active_since_ms is not None else event.ts_ms
    if event.state == AlertState.RESOLVED:
        ends_ms = event.ts_ms
    else:
        ends_ms = max(now_ms, event.ts_ms) + hold_ms
    return {
        "labels": labels,
        "annotations": annotations,
        "startsAt": _iso(ms_to_dt(starts_ms)),
        "endsAt": _iso(ms_to_dt(ends_ms)),
        "generatorURL": generator_url,
    }


class AlertmanagerClient:
    """Posts alerts to one Alertmanager (``base_url`` like ``http://127.0.0.1:9093``).

    Args:
        base_url: Alertmanager root URL (http or https).
        resend_interval_s: how often the runtime re-sends firing alerts, seconds; firing alerts
            are held open for four of these.
        timeout_s: HTTP timeout per request, seconds.
        generator_url: base of the link back to the rule; the rule name is appended.
    """

    def __init__(
        self,
        base_url: str,
        resend_interval_s: float = 60.0,
        timeout_s: float = 10.0,
        generator_url: str = "citypulse://rules/",
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise AlertmanagerError(f"alertmanager_url must be http(s)://, got {base_url!r}")
        self.url = base_url.rstrip("/") + "/api/v2/alerts"
        self.resend_interval_s = resend_interval_s
        self.timeout_s = timeout_s
        self.generator_url = generator_url

    def payload(self, events: Sequence[AlertEvent], now_ms: int) -> list[dict[str, object]]:
        hold_ms = round(self.resend_interval_s * 4000)
        return [
            alert_payload(e, now_ms, hold_ms, self.generator_url + e.rule)
            for e in events
            if e.state in (AlertState.FIRING, AlertState.RESOLVED)
        ]

    async def post(self, events: Sequence[AlertEvent], now_ms: int | None = None) -> int:
        """POST the firing/resolved ``events``; return how many were sent.

        ``now_ms`` (default: the wall clock) only sets how long Alertmanager keeps firing
        alerts open: that is Alertmanager's time, not event time, so it is the one place
        besides the ticker that reads the wall clock.

        Raises:
            AlertmanagerError: on an HTTP error or no answer (retriable).
        """
        if now_ms is None:
            now_ms = time.time_ns() // 1_000_000
        body = self.payload(events, now_ms)
        if not body:
            return 0
        data = json.dumps(body).encode()
        await asyncio.to_thread(self._post, data)
        return len(body)

    def _post(self, data: bytes) -> None:
        req = urllib.request.Request(  # noqa: S310 - scheme checked in __init__
            self.url, data=data, method="POST", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:  # noqa: S310
                resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode(errors="replace")
            raise AlertmanagerError(f"POST {self.url}: {exc}: {detail}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise AlertmanagerError(f"POST {self.url}: {exc}") from exc
