"""The per-vendor token bucket (pure: time is a parameter)."""

from __future__ import annotations

from citypulse.events import Reading, ReadingBatch, Rejection, RejectReason
from collectors.ratelimit import VendorRateLimiter


def _batch(vendor: str, n: int) -> ReadingBatch:
    return ReadingBatch(
        sensor="s",
        vendor=vendor,
        received_ms=1,
        source="abcd",
        readings=[Reading(ts_ms=i, metric="m", value=1.0, unit="u") for i in range(n)],
    )


def test_burst_then_steady_rate_per_vendor() -> None:
    """A vendor gets its burst at once, then ``rate`` readings per second; refusals take no
    tokens; another vendor's bucket is untouched by the first one's flood."""
    lim = VendorRateLimiter(rate_per_s=10, burst=20)
    assert [lim.take("a", 5, 0.0) for _ in range(5)] == [True] * 4 + [False]
    assert lim.take("b", 20, 0.0)  # b has its own full bucket
    assert not lim.take("a", 1, 0.05)  # 0.5 token refilled: not enough
    assert lim.take("a", 1, 0.1)  # 1 token after 0.1 s
    assert lim.take("a", 10, 1.1)  # 10 more after one more second
    assert not lim.take("a", 1, 1.1)
    assert lim.take("a", 20, 100.0)  # refill is capped at the burst
    assert not lim.take("a", 1, 100.0)


def test_disabled_limiter_allows_everything() -> None:
    lim = VendorRateLimiter(rate_per_s=0, burst=1)
    assert not lim.enabled
    assert all(lim.take("a", 10_000, 0.0) for _ in range(100))


def test_refusal_is_a_dead_letter_with_the_raw_message() -> None:
    lim = VendorRateLimiter(rate_per_s=1, burst=2)
    ok = _batch("a", 2)
    assert lim.check(ok, "citypulse/v1/a/s/up", b"raw", 0.0) is ok
    refused = lim.check(_batch("a", 1), "citypulse/v1/a/s/up", b"raw", 0.0)
    assert isinstance(refused, Rejection)
    assert refused.reason is RejectReason.RATE_LIMITED
    assert (refused.vendor, refused.sensor, refused.raw) == ("a", "s", b"raw")
    assert Rejection.decode(refused.encode()) == refused
