"""Windowed sum/count/avg come from running sums: they match a scan of the window's points,
through trims, late points and replays, and a restored series continues bit for bit."""

from __future__ import annotations

import math
import random

from rules import compile_expr
from rules._expr import Ctx, Series

SEC = 1_000
T0 = 1_780_000_000_000
WINDOW = 60 * SEC


def _stream(seed: int, steps: int) -> list[tuple[int, float]]:
    """Points ~1/s with 10 % late (up to 30 s) and 5 % replays of an earlier timestamp."""
    rnd = random.Random(seed)
    now, out = T0, []
    for _ in range(steps):
        now += rnd.randrange(200, 1800)
        ts = now
        if rnd.random() < 0.10:
            ts = now - rnd.randrange(1, 30 * SEC)
        elif rnd.random() < 0.05 and out:
            ts = rnd.choice(out[-40:])[0]
        # Mixed magnitudes and signs: the case where running sums lose precision first.
        out.append((ts, rnd.choice([1e6, -1e6, 0.1, -0.3, 1e-3]) * rnd.random()))
    return out


def _eval(text: str, series: Series, now: int) -> float | None:
    c = Ctx()
    c.now_ms, c.epoch_ms, c.series = now, T0, {"v": series}
    v = compile_expr(text, scope="sensor", want=None).fn(c)
    assert v is None or isinstance(v, float)
    return v


def test_running_sums_equal_a_scan_of_the_window() -> None:
    """After every point: sum, count and avg over the window equal a plain scan (to 1e-9 of the
    window's magnitude), while trims drop old points and the sums restart many times."""
    s = Series()
    points: dict[int, float] = {}
    restarts = 0
    for step, (ts, v) in enumerate(_stream(seed=7, steps=4000)):
        s.add(ts, v)
        points[ts] = v
        now = max(points)
        dropped = s.dropped
        s.trim(now - 2 * WINDOW)
        restarts += s.dropped < dropped
        inside = [points[t] for t in sorted(points) if now - WINDOW < t <= now]
        scale = sum(abs(x) for x in inside) or 1.0
        got_sum = _eval("sum(v, 60s)", s, now)
        assert _eval("count(v, 60s)", s, now) == len(inside), step
        if not inside:
            assert got_sum is None
            continue
        avg = _eval("avg(v, 60s)", s, now)
        assert got_sum is not None, step
        assert avg is not None, step
        assert abs(got_sum - math.fsum(inside)) <= 1e-9 * scale, step
        assert abs(avg - math.fsum(inside) / len(inside)) <= 1e-9 * scale, step
    assert restarts > 20
    assert len(s.ts) < 200  # trimmed to the retention, not the whole stream


def test_restored_series_continues_bit_for_bit() -> None:
    """A series rebuilt from its snapshot state gives exactly the sums of the original, for
    every later point: a restarted rule worker decides exactly as an uninterrupted one."""
    stream = _stream(seed=11, steps=3000)
    original = Series()
    for cut, (ts, v) in enumerate(stream):
        original.add(ts, v)
        original.trim(ts - 2 * WINDOW)
        if cut == 1700:
            break
    assert original.dropped  # the state carries trimmed points' sums
    data: list[bytes] = []
    head = original.dump(data)
    copy, end = Series.load(head, memoryview(b"".join(data)), 0)
    assert end == 16 * len(original.ts)
    for ts, v in stream[cut + 1 :]:
        for s in (original, copy):
            s.add(ts, v)
            s.trim(max(ts, s.ts[-1]) - 2 * WINDOW)
        assert copy.cum == original.cum
        now = original.ts[-1]
        assert _eval("avg(v, 60s)", copy, now) == _eval("avg(v, 60s)", original, now)
