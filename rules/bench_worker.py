"""Worker-level benchmark: time ``citypulse rules run`` consuming a pre-produced backlog.

Not a test: it prints figures. Starts the embedded stack (Mosquitto, tansu, PostgreSQL) in a
temp directory, writes the end-to-end benchmark's registry and rule set (``deploy/bench``),
produces ``--batches`` ReadingBatch records (the same workload as :mod:`rules.bench_engine`)
to ``readings``, then starts ``citypulse rules run --tick-s 0`` as a child process and waits
until both stages have committed everything (readings and the re-key topic). Reports wall
time, readings/s and the worker's CPU seconds per million readings (as ``citypulse bench``)::

    python -m rules.bench_worker --batches 50000
    python -m rules.bench_worker --code-root /path/to/other/checkout   # compare code versions

``--code-root`` puts another checkout first on the worker's ``PYTHONPATH`` (only the worker
runs that code; the stack, producer and workload come from this one).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import psutil
from aiokafka import TopicPartition

from citypulse.registry import dump_registry
from citypulse.settings import Settings
from deploy.embedded import EmbeddedStack
from deploy.up import citypulse_argv
from rules import RuleEngine, load_rules
from rules.bench_engine import EPOCH_MS, _batches, _workload
from rules.runtime.changelog import REKEY_TOPIC
from stream import ensure_topics, make_consumer, make_producer


async def _produce(settings: Settings, batches: list[bytes], keys: list[bytes]) -> None:
    await ensure_topics(settings)
    producer = make_producer(settings, linger_ms=20, max_batch_size=1 << 20)
    await producer.start()
    try:
        futs = [
            await producer.send(settings.topic("readings"), v, key=k)
            for v, k in zip(batches, keys, strict=True)
        ]
        await asyncio.gather(*futs)
    finally:
        await producer.stop()


async def _committed(settings: Settings, topic: str, group: str) -> int:
    """Records of ``topic`` committed by ``group`` (sum of committed offsets)."""
    consumer = make_consumer(settings, group_id=group)
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        if not parts:
            await consumer.topics()
            parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        done = 0
        for tp in tps:
            done += (await consumer.committed(tp)) or 0
        return done
    finally:
        await consumer.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per", type=int, default=209, help="sensors per silo and district")
    p.add_argument("--rules", type=int, default=200)
    p.add_argument("--batches", type=int, default=50_000)
    p.add_argument("--interval-s", type=float, default=60.0)
    p.add_argument("--code-root", type=Path, help="run the worker from this checkout")
    p.add_argument("--timeout-s", type=float, default=900.0)
    p.add_argument("--group-interval-s", type=float, default=0.0)
    a = p.parse_args(argv)

    registry, rules_dir = _workload(a.per, a.rules, a.group_interval_s)
    step_ms = max(1, round(a.interval_s * 1000 / len(registry)))
    batches = _batches(registry, a.batches, EPOCH_MS, step_ms, mix=False, seed=1)
    readings = sum(len(b.readings) for b in batches)
    # Records each stage must commit: every batch, and one re-key record per group key.
    keys = RuleEngine(load_rules(rules_dir, registry), registry)
    want = [len(batches), sum(len(keys.group_keys(b)) for b in batches)]
    state = Path(tempfile.mkdtemp(prefix="citypulse-bench-worker-"))
    with EmbeddedStack(state) as stack:
        reg_path = state / "registry.yaml"
        reg_path.write_text(dump_registry(registry))
        prefix = f"bw{uuid.uuid4().hex[:6]}"
        settings = Settings(
            mqtt_url=stack.mosquitto.url,
            kafka_bootstrap=stack.tansu.bootstrap,
            database_url=stack.postgres.url(),
            topic_prefix=prefix,
            registry=reg_path,
            rules=rules_dir,
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("CITYPULSE_")}
        env.update(stack.env())
        env.update(
            CITYPULSE_REGISTRY=str(reg_path),
            CITYPULSE_RULES=str(rules_dir),
            CITYPULSE_STATE_DIR=str(state),
            CITYPULSE_TOPIC_PREFIX=prefix,
            CITYPULSE_LOG_LEVEL="WARNING",
            CITYPULSE_METRICS_PORT="0",
        )
        subprocess.run([*citypulse_argv(), "db", "migrate"], env=env, check=True, timeout=120)
        t0 = time.perf_counter()
        asyncio.run(
            _produce(settings, [b.encode() for b in batches], [b.sensor.encode() for b in batches])
        )
        print(
            f"produced {len(batches):,} batches ({readings:,} readings) in "
            f"{time.perf_counter() - t0:.1f} s"
        )
        if a.code_root is not None:
            env["PYTHONPATH"] = str(a.code_root.resolve())
        cmd = [*citypulse_argv(), "rules", "run", "--tick-s", "0", "--checkpoint-s", "1"]
        started = time.perf_counter()
        child = subprocess.Popen(cmd, env=env, cwd=a.code_root or Path.cwd())
        proc = psutil.Process(child.pid)
        cpu = 0.0
        first: tuple[float, float, int] | None = None
        try:
            stages = [
                (settings.topic("readings"), f"{prefix}-rules"),
                (settings.topic(REKEY_TOPIC), f"{prefix}-rules-groups"),
            ]
            while True:
                t = proc.cpu_times()
                cpu = t.user + t.system
                if child.poll() is not None:
                    raise SystemExit(f"worker exited with {child.returncode}")
                done = [asyncio.run(_committed(settings, topic, g)) for topic, g in stages]
                if first is None and done[0] > 0:
                    # Start-up (registry, rules, one engine per partition) is behind us.
                    first = (time.perf_counter(), cpu, done[0])
                if done == want:
                    break
                if time.perf_counter() - started > a.timeout_s:
                    raise SystemExit(f"timed out: committed {done} of {want}")
                time.sleep(0.5)
            wall = time.perf_counter() - started
        finally:
            child.terminate()
            child.wait(30)
        print(f"re-key records: {want[1]:,}")
        print(f"worker: {wall:.1f} s wall, {cpu:.1f} CPU-s to commit everything (incl. start-up)")
        assert first is not None
        t1, cpu1, done1 = first
        steady = readings * (1 - done1 / len(batches))
        print(
            f"after the first commit ({done1:,} batches): "
            f"{steady / (started + wall - t1):,.0f} readings/s, "
            f"{(cpu - cpu1) / steady * 1e6:.1f} CPU-s per million readings"
        )


if __name__ == "__main__":
    main()
