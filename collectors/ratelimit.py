"""Per-vendor token buckets: one vendor's flood must not starve the others.

Each vendor has a bucket of ``burst`` readings refilled at ``rate_per_s`` readings per second.
An accepted message takes as many tokens as it has readings; when the bucket holds fewer, the
whole message is refused with ``rate_limited`` (dead-lettered, so nothing is silently dropped:
``citypulse dlq replay --reason rate_limited`` re-ingests it later). Time is a parameter
(monotonic seconds), so the limiter is pure and testable without sleeping.

The buckets are per collector process: with N collectors in the share group a vendor may send
up to N times the rate city-wide. The number of buckets is bounded by the registry's vendors
(only messages that passed the registry check reach the limiter).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from citypulse.events import ReadingBatch, Rejection, RejectReason


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at_s: float


class VendorRateLimiter:
    """Token bucket per vendor, counted in readings.

    Args:
        rate_per_s: readings per second each vendor may sustain; ``<= 0`` turns limiting off.
        burst: bucket size in readings (what a vendor may send at once after a quiet spell);
            at least the largest message you accept, or such messages are always refused.
    """

    def __init__(self, rate_per_s: float, burst: float) -> None:
        self.rate_per_s = rate_per_s
        self.burst = max(burst, 1.0)
        self._buckets: dict[str, _Bucket] = {}

    @property
    def enabled(self) -> bool:
        return self.rate_per_s > 0

    def take(self, vendor: str, readings: int, now_s: float) -> bool:
        """Take ``readings`` tokens from ``vendor``'s bucket at time ``now_s``.

        Returns:
            True if allowed (tokens taken); False if over the limit (nothing taken, so a
            refused flood does not push the vendor's recovery further out).
        """
        if not self.enabled:
            return True
        bucket = self._buckets.get(vendor)
        if bucket is None:
            bucket = self._buckets[vendor] = _Bucket(self.burst, now_s)
        elapsed = max(0.0, now_s - bucket.at_s)
        bucket.tokens = min(self.burst, bucket.tokens + elapsed * self.rate_per_s)
        bucket.at_s = now_s
        if bucket.tokens < readings:
            return False
        bucket.tokens -= readings
        return True

    def check(
        self, batch: ReadingBatch, topic: str, raw: bytes, now_s: float
    ) -> ReadingBatch | Rejection:
        """``batch`` if its vendor is within the limit, else a ``rate_limited`` rejection."""
        if self.take(batch.vendor, len(batch.readings), now_s):
            return batch
        return self.refusal(
            batch.vendor, batch.sensor, len(batch.readings), topic, raw, batch.received_ms,
            batch.source,
        )  # fmt: skip

    def refusal(
        self,
        vendor: str,
        sensor: str,
        readings: int,
        topic: str,
        raw: bytes,
        received_ms: int,
        message_hash: str,
    ) -> Rejection:
        """The ``rate_limited`` rejection of a message whose readings :meth:`take` refused."""
        return Rejection.model_construct(
            v=1,
            reason=RejectReason.RATE_LIMITED,
            detail=(
                f"vendor {vendor!r} is over {self.rate_per_s:g} readings/s "
                f"(burst {self.burst:g}); {readings} readings refused"
            ),
            topic=topic,
            vendor=vendor,
            sensor=sensor,
            received_ms=received_ms,
            message_hash=message_hash,
            raw_b64=base64.b64encode(raw).decode("ascii"),
        )
