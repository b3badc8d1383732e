"""Micro-benchmark of :class:`rules.RuleEngine` on the end-to-end benchmark's workload.

Not a test: it prints figures. The registry (8 districts x 6 silos x 209 = 10,032 sensors) and
the 200 generated rules (+ marker) come from ``deploy/bench`` (the same generator as
``citypulse bench``), so the figures are comparable with the end-to-end run::

    python -m rules.bench_engine                 # full size
    python -m rules.bench_engine --batches 20000 --per 50 --rules 100
    python -m rules.bench_engine --mix           # values that cross thresholds: alerts fire

Each sensor sends one batch with all its metrics every ``--interval-s`` of event time,
round-robin over the registry, so windows hold what the rules' windows would hold. The
digest printed at the end hashes every effect, in order: the same arguments must give the same
digest before and after an optimisation (behaviour unchanged).
"""

from __future__ import annotations

import argparse
import hashlib
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from citypulse.events import Reading, ReadingBatch
from citypulse.registry import Registry, Sensor
from rules import RuleEngine, RuleSet, load_rules

EPOCH_MS = 1_780_000_000_000


def _workload(per: int, rules: int, group_interval_s: float) -> tuple[Registry, RuleSet]:
    from deploy.bench._rules import generate_rules, probe_sensors, write_rules
    from deploy.simulator import generate_registry

    registry = generate_registry(8, per, seed=1)
    files = generate_rules(registry, rules, probe_sensors(registry, 20), group_interval_s)
    with tempfile.TemporaryDirectory(prefix="citypulse-bench-engine-") as directory:
        write_rules(Path(directory), files)
        return registry, load_rules(Path(directory), registry)


def _batches(
    registry: Registry, count: int, start_ms: int, step_ms: int, mix: bool, seed: int
) -> list[ReadingBatch]:
    rnd = random.Random(seed)  # noqa: S311 - benchmark data, not security
    sensors: list[Sensor] = list(registry)
    out = []
    for i in range(count):
        s = sensors[i % len(sensors)]
        ts = start_ms + i * step_ms
        readings = []
        for name in sorted(s.metrics):
            m = s.metrics[name]
            lo = m.min if m.min is not None else 0.0
            hi = m.max if m.max is not None else lo + 100.0
            frac = rnd.uniform(0.55, 1.15) if mix else 0.35
            readings.append(
                Reading(ts_ms=ts, metric=name, value=lo + (hi - lo) * frac, unit=m.unit)
            )
        out.append(
            ReadingBatch(
                sensor=s.id, vendor=s.vendor, received_ms=ts, source="b", readings=readings
            )
        )
    return out


def _timed(label: str, fn: Callable[[], object], readings: int | None = None) -> float:
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    rate = f"{readings / dt:>10,.0f} readings/s" if readings else ""
    print(f"{label:<34} {dt * 1000:>9.1f} ms  {rate}")
    return dt


def _rss_mb() -> float:
    import psutil  # the embedded extra, which the workload's generators need anyway

    return psutil.Process().memory_info().rss / 1e6


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per", type=int, default=209, help="sensors per silo and district")
    p.add_argument("--rules", type=int, default=200, help="generated rules (+ marker)")
    p.add_argument("--batches", type=int, default=50_000, help="measured batches per phase")
    p.add_argument("--interval-s", type=float, default=60.0, help="each sensor's report interval")
    p.add_argument("--warmup-min", type=float, default=10.0, help="event time to fill windows")
    p.add_argument("--mix", action="store_true", help="random values: alerts fire and resolve")
    p.add_argument("--profile", choices=["sensor", "group", "all"], help="cProfile one phase")
    p.add_argument(
        "--group-interval-s", type=float, default=0.0, help="cross-sensor rules' interval"
    )
    a = p.parse_args(argv)

    registry, ruleset = _workload(a.per, a.rules, a.group_interval_s)
    n_group = sum(r.scope == "group" for r in ruleset.rules)
    print(f"{len(registry)} sensors, {len(ruleset.rules)} rules ({n_group} group rules)")
    step_ms = max(1, round(a.interval_s * 1000 / len(registry)))
    warm = round(a.warmup_min * 60_000 / step_ms)
    t0 = time.perf_counter()
    build = _batches(registry, warm + 3 * a.batches, EPOCH_MS, step_ms, a.mix, seed=1)
    print(f"generated {len(build)} batches in {time.perf_counter() - t0:.1f} s")
    warmup, rest = build[:warm], build[warm:]
    phases = {
        k: rest[i * a.batches : (i + 1) * a.batches]
        for i, k in enumerate(("sensor", "group", "all"))
    }
    digest = hashlib.sha256()
    engine = RuleEngine(ruleset, registry)

    def feed(batches: list[ReadingBatch], scope: str) -> None:
        for b in batches:
            for e in engine.process(b, scope=scope):  # type: ignore[arg-type]
                digest.update(e.model_dump_json().encode())

    def feed_group(batches: list[ReadingBatch]) -> None:
        # As the runtime's group stage: one call per group key the batch feeds.
        for b in batches:
            for key in engine.group_keys(b):
                for e in engine.process(b, scope="group", key=key):
                    digest.update(e.model_dump_json().encode())

    readings = {k: sum(len(b.readings) for b in v) for k, v in phases.items()}
    rss0 = _rss_mb()
    _timed(
        f"warm-up ({a.warmup_min:g} min, all)",
        lambda: feed(warmup, "all"),
        sum(len(b.readings) for b in warmup),
    )
    print(f"{'  state after warm-up (RSS growth)':<34} {_rss_mb() - rss0:>9.1f} MB")
    if a.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        if a.profile == "group":
            feed_group(phases["group"])
        else:
            feed(phases[a.profile], a.profile)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return
    _timed("process(scope=sensor)", lambda: feed(phases["sensor"], "sensor"), readings["sensor"])
    _timed("process(scope=group) per key", lambda: feed_group(phases["group"]), readings["group"])
    _timed("process(scope=all)", lambda: feed(phases["all"], "all"), readings["all"])
    now = phases["all"][-1].readings[0].ts_ms

    def ticks() -> None:
        for k in range(10):
            for e in engine.advance(now + 1000 * (k + 1)):
                digest.update(e.model_dump_json().encode())

    dt = _timed("advance x10 (1 s apart)", ticks)
    print(f"{'  per advance':<34} {dt * 100:>9.1f} ms")
    blob = b""

    def snap() -> None:
        nonlocal blob
        blob = engine.snapshot()

    _timed("snapshot", snap)
    print(f"{'  snapshot size':<34} {len(blob) / 1e6:>9.2f} MB")
    other = RuleEngine(ruleset, registry)
    _timed("restore", lambda: other.restore(blob))
    print(f"effects digest: {digest.hexdigest()[:16]}")
    print(f"snapshot digest: {hashlib.sha256(blob).hexdigest()[:16]}")


if __name__ == "__main__":
    main()
