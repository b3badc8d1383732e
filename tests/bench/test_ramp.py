"""The bench's ramp controller against a simulated pipeline: it must find and hold the limit."""

from __future__ import annotations

import pytest

from deploy.bench._ramp import RAMP_FLOOR, Ramp

STEP_S = 0.5


def _run_ramp(capacity: float, warmup_s: float, seconds: float = 30.0) -> tuple[float, float]:
    """Drive :class:`Ramp` like the bench does (every 0.5 s) against a pipeline that finishes
    nothing for ``warmup_s`` (rule workers joining their groups), then up to ``capacity``
    readings/s, alternately 15 % above and below it (the writer's and rule worker's bursts).

    Returns:
        The finished rate over the last 60 % of the phase (the bench's "sustained"), and the
        lowest rate offered after the warm-up.
    """
    ramp = Ramp()
    backlog, done_hist, lowest = 0.0, [0.0], float("inf")
    steps = int(seconds / STEP_S)
    for i in range(steps):
        t = i * STEP_S
        acked = ramp.target  # the publishers keep up (they reach ~300k/s)
        cap = 0.0 if t < warmup_s else capacity * (1.15 if i % 2 else 0.85)
        done = min(cap, backlog / STEP_S + acked)
        backlog += (acked - done) * STEP_S
        done_hist.append(done)
        done_rate = sum(done_hist[-3:]) / len(done_hist[-3:])
        ramp.step(backlog=backlog, done_rate=done_rate, acked_rate=acked)
        if t >= warmup_s:
            lowest = min(lowest, ramp.target)
    steady = done_hist[-int(0.6 * steps) :]
    return sum(steady) / len(steady), lowest


@pytest.mark.parametrize(
    ("capacity", "warmup_s"), [(50_000, 0.0), (50_000, 5.0), (12_000, 5.0), (120_000, 2.0)]
)
def test_sustained_is_close_to_the_pipeline_limit(capacity: float, warmup_s: float) -> None:
    """Within 10 % of what the pipeline can finish, and never more than it can."""
    sustained, _ = _run_ramp(capacity, warmup_s)
    assert 0.9 * capacity <= sustained <= 1.001 * capacity


def test_a_slow_start_does_not_sink_the_offered_rate() -> None:
    """Five seconds without a finished reading (the backlog grows all along) are a warm-up,
    not an overload: the offer stays at the start rate instead of collapsing."""
    _, lowest = _run_ramp(50_000, warmup_s=5.0)
    assert lowest >= RAMP_FLOOR
