"""Consumer options: stages off the sensor-alert path let an idle fetch wait longer."""

from __future__ import annotations

from citypulse.settings import Settings
from stream import make_consumer


async def test_bulk_consumers_take_the_longer_fetch_wait() -> None:
    settings = Settings(kafka_fetch_max_wait_ms=15, kafka_bulk_fetch_max_wait_ms=80)
    alert_path = make_consumer(settings, group_id="a")
    bulk = make_consumer(settings, group_id="b", bulk=True)
    try:
        # What the broker is sent in every fetch request (aiokafka keeps it here).
        assert alert_path._fetch_max_wait_ms == 15
        assert bulk._fetch_max_wait_ms == 80
    finally:
        await alert_path.stop()
        await bulk.stop()
