"""``citypulse bench``: the embedded stack, the services, a fixed workload, the figures."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import psutil
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from citypulse.events import ReadingBatch
from citypulse.registry import Registry, dump_registry
from citypulse.settings import Settings
from collectors import Limits, Validator
from deploy.bench._ceilings import copy_ceiling, kafka_ceiling, mqtt_ceiling
from deploy.bench._load import Mode, Probe, Publishers, Template, shard, templates_for
from deploy.bench._ramp import Ramp
from deploy.bench._rules import (
    GROUP_MARKER_RULE,
    MARKER_METRIC,
    MARKER_RULE,
    generate_rules,
    probe_sensors,
)
from deploy.bench._rules import write_rules as write_rule_files
from deploy.embedded import EmbeddedStack, Tansu, free_port
from deploy.simulator import DISTRICTS, generate_registry
from deploy.up import ACCEPTED, STORED, Child, citypulse_argv, scrape
from rules import load_rules
from stream import make_consumer

console = Console(stderr=True)
SILOS = 6
RULES_READINGS = "citypulse_rules_readings_total"
RULES_PARTITIONS = "citypulse_rules_partitions"
WRITER_CHECKED = "citypulse_writer_checked_batches_total"


class BenchError(RuntimeError):
    """The benchmark could not set up or run (a server or a service failed)."""


@dataclass(frozen=True, slots=True)
class BenchOptions:
    """What ``citypulse bench`` runs; units in the names."""

    sensors: int = 10_000
    rules: int = 200
    duration_s: float = 30.0
    """Seconds of the ramp (sustained-maximum) phase of each mode, and of each latency phase."""
    modes: tuple[Mode, ...] = (Mode.SINGLE, Mode.BATCH, Mode.SENML)
    collectors: int = 1
    writers: int = 1
    rule_workers: int = 1
    publishers: int = 3
    probes: int = 20
    probe_hz: float = 50.0
    """Probes a second, half of them firing the marker alert: ~450 alerts in the steady part
    (last 60 %) of a 30-s latency phase, so its p99 is not just its slowest few alerts (20/s
    until session 5; 15-s phases until session 13: ~200, and p99 moved by 150 ms between
    runs)."""
    ceiling_s: float = 8.0
    kafka_ceiling_records: int = 100_000
    copy_ceiling_rows: int = 200_000
    out: Path = Path("bench-results")
    quick: bool = False
    soak_s: float = 0.0
    """After the first mode's latency phases, hold 50 % of its sustained maximum this long,
    sampling every service's RSS every 10 s (memory flat or not); 0 = no soak phase."""
    soak_fill_s: float | None = None
    """Seconds at the soak's rate before the measured ``soak_s``, so the rule workers' windows
    are full (their memory grows until then, by design); None = the longest rule window."""
    group_interval_s: float = 1.0
    """The cross-sensor rules' evaluation interval (their rule group's ``interval``); 0 = on
    every reading of a member."""
    at_rates: tuple[float, ...] = ()
    """Extra latency phases at these offered rates (readings/s), after the 90 % one, labelled
    ``"<rate>/s"``. 50 % of a run's maximum is not the same load from one run to the next
    (this machine's speed moves by a third within an hour), so code versions compared at
    "50 %" were compared at different rates; a fixed rate compares them at equal load."""

    @classmethod
    def quick_options(cls, out: Path, modes: tuple[Mode, ...]) -> BenchOptions:
        """Small sizes, a few seconds per phase (the smoke test)."""
        return cls(
            sensors=300,
            rules=30,
            duration_s=6.0,
            modes=modes,
            publishers=2,
            probes=6,
            ceiling_s=2.0,
            kafka_ceiling_records=10_000,
            copy_ceiling_rows=20_000,
            out=out,
            quick=True,
        )


@dataclass(slots=True)
class Sample:
    """One point of the time series (every 0.5 s)."""

    t_s: float
    phase: str
    target_readings_per_s: float
    published: int
    accepted: float
    stored: float
    evaluated: float
    """Readings the rule workers' sensor stage evaluated (phase baseline aligned to stored)."""


@dataclass(slots=True)
class Observed:
    """What the background observers saw, with wall times (epoch ms)."""

    stored_latency: list[tuple[int, float]] = field(default_factory=list)
    """(visible at, latency ms) of probe readings seen in ``readings``."""
    alert_latency: list[tuple[int, float]] = field(default_factory=list)
    """(consumed at, latency ms) of the marker rule's FIRING events."""
    alert_sent_latency: list[tuple[int, float]] = field(default_factory=list)
    """(consumed at, ms) from publish until the rule worker handed the same events to Kafka
    (the record's create time): ``alert_latency`` less the last hop to a consumer."""
    group_alert_latency: list[tuple[int, float]] = field(default_factory=list)
    """(consumed at, latency ms) of the group marker's FIRING events (re-key hop, group
    stage, the evaluation interval)."""
    alerts: int = 0
    errors: list[str] = field(default_factory=list)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _pct(values: Sequence[float]) -> dict[str, float | int]:
    if not values:
        return {"n": 0}
    v = sorted(values)

    def q(p: float) -> float:
        return round(v[min(len(v) - 1, int(p * len(v)))], 1)

    return {
        "n": len(v),
        "p50": q(0.50),
        "p95": q(0.95),
        "p99": q(0.99),
        "max": round(v[-1], 1),
        "mean": round(statistics.fmean(v), 1),
    }


class _Observers:
    """Background asyncio thread: polls probe readings in PostgreSQL, consumes alerts."""

    def __init__(self, settings: Settings, probe: list[str], poll_s: float = 0.02) -> None:
        self.settings = settings
        self.probe_ids = probe
        self.poll_s = poll_s
        self.seen: dict[tuple[str, int], None] = {}
        self.data = Observed()
        self.pending_since: Callable[[], int] = lambda: _now_ms() - 2000
        self.probes_sent: Callable[[], dict[tuple[str, int], bool]] = dict
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="bench-observers", daemon=True)
        self._ready = threading.Event()

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(30)

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)

    def _run(self) -> None:
        self._loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._poll_db(), name="poll-db")
                tg.create_task(self._alerts(), name="alerts")
        except* Exception as eg:  # reported in the results; the run goes on
            self.data.errors.extend(repr(e) for e in eg.exceptions)
            self._ready.set()

    async def _poll_db(self) -> None:
        conn = await asyncpg.connect(self.settings.dsn)
        self._ready.set()
        assert self._stop is not None
        sql = (
            "SELECT sensor_id, (extract(epoch FROM ts) * 1000)::int8 FROM readings "
            "WHERE sensor_id = ANY($1::text[]) AND metric = $2 AND ts >= to_timestamp($3 / 1000.0)"
        )
        try:
            while not self._stop.is_set():
                since = self.pending_since()
                rows = await conn.fetch(sql, self.probe_ids, MARKER_METRIC, since)
                now = _now_ms()
                for sensor, ts in rows:
                    key = (sensor, int(ts))
                    if key not in self.seen:
                        self.seen[key] = None
                        if key in self.probes_sent():
                            self.data.stored_latency.append((now, float(now - ts)))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.poll_s)
        finally:
            await conn.close()

    async def _alerts(self) -> None:
        assert self._stop is not None
        consumer = make_consumer(
            self.settings,
            self.settings.topic("alerts"),
            group_id=f"bench-alerts-{uuid.uuid4().hex[:6]}",
            auto_offset_reset="latest",
        )
        await consumer.start()
        try:
            while not self._stop.is_set():
                batch = await consumer.getmany(timeout_ms=100, max_records=5000)
                now = _now_ms()
                for records in batch.values():
                    for r in records:
                        self.data.alerts += 1
                        ev = orjson.loads(r.value)
                        if ev.get("state") != "firing":
                            continue
                        if ev.get("rule") == MARKER_RULE:
                            self.data.alert_latency.append((now, float(now - ev["ts_ms"])))
                            sent = float(r.timestamp - ev["ts_ms"])
                            self.data.alert_sent_latency.append((now, sent))
                        elif ev.get("rule") == GROUP_MARKER_RULE:
                            self.data.group_alert_latency.append((now, float(now - ev["ts_ms"])))
        finally:
            await consumer.stop()


def _ready(port: int) -> bool:
    with (
        contextlib.suppress(OSError),
        urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1.0) as resp,
    ):
        return bool(resp.status == 200)
    return False


def _proc_tree_cpu_rss(pids: Sequence[int]) -> tuple[float, float]:
    """(CPU seconds user+system, RSS MB) of these processes and their children."""
    cpu = rss = 0.0
    for pid in pids:
        try:
            p = psutil.Process(pid)
            procs = [p, *p.children(recursive=True)]
        except psutil.Error:
            continue
        for q in procs:
            with contextlib.suppress(psutil.Error):
                t = q.cpu_times()
                cpu += t.user + t.system
                rss += q.memory_info().rss / 1e6
    return cpu, rss


def _machine() -> dict[str, Any]:
    model = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


class Bench:
    """One benchmark run; :meth:`run` returns the results dict (also written as JSON)."""

    def __init__(self, opts: BenchOptions) -> None:
        self.opts = opts
        self.state = Path(tempfile.mkdtemp(prefix="citypulse-bench-"))
        self.stack = EmbeddedStack(self.state)
        self.children: list[Child] = []
        self._last: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = {}
        self.samples: list[Sample] = []
        self.longest_window_s = 0.0  # of the generated rules (set up in _setup)
        self.phases: list[dict[str, Any]] = []
        self.began = time.monotonic()
        self.env: dict[str, str] = {}
        self.settings: Settings | None = None
        self.services_start_s = 0.0  # services started until the rule workers hold partitions

    # -- setup --------------------------------------------------------------------------------
    def _registry(self) -> Registry:
        districts = len(DISTRICTS) if self.opts.sensors >= 8 * SILOS else 1
        per = max(1, round(self.opts.sensors / (districts * SILOS)))
        return generate_registry(districts, per, seed=1)

    def _cli(self, *args: str, timeout_s: float = 300) -> str:
        out = subprocess.run(
            [*citypulse_argv(), *args],
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout_s,
        )
        if out.returncode != 0:
            raise BenchError(f"citypulse {' '.join(args)} failed:\n{out.stderr[-3000:]}")
        return (out.stdout + out.stderr).strip()

    def _setup(self, registry: Registry, probes: list[str]) -> dict[str, Any]:
        self.stack.start()
        prefix = f"bench{uuid.uuid4().hex[:6]}"
        reg_path = self.state / "registry.yaml"
        reg_path.write_text(dump_registry(registry))
        rules_dir = self.state / "rules"
        files = generate_rules(
            registry,
            self.opts.rules,
            probe_sensors(registry, len(probes)),
            group_interval_s=self.opts.group_interval_s,
        )
        write_rule_files(rules_dir, files)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CITYPULSE_")}
        self.env.update(self.stack.env())
        self.env.update(self.stack.tuning_env(max(self.opts.writers, self.opts.rule_workers)))
        self.env.update(
            {
                "CITYPULSE_REGISTRY": str(reg_path),
                "CITYPULSE_RULES": str(rules_dir),
                "CITYPULSE_STATE_DIR": str(self.state),
                "CITYPULSE_TOPIC_PREFIX": prefix,
                "CITYPULSE_LOG_LEVEL": "WARNING",
            }
        )
        self.settings = Settings(
            mqtt_url=self.stack.mosquitto.url,
            kafka_bootstrap=self.stack.tansu.bootstrap,
            database_url=self.stack.postgres.url(),
            topic_prefix=prefix,
            registry=reg_path,
            rules=rules_dir,
            kafka_linger_ms=int(self.env["CITYPULSE_KAFKA_LINGER_MS"]),
            partitions=int(self.env["CITYPULSE_PARTITIONS"]),
        )
        check = self._cli("rules", "check", str(rules_dir))
        ruleset = load_rules(rules_dir, registry)
        self.longest_window_s = max((r.window_s or 0.0 for r in ruleset.rules), default=0.0)
        self._cli("db", "migrate")
        self._cli("registry", "load")
        return {"rules_check": check, "rule_files": len(files), "topic_prefix": prefix}

    def _start_services(self) -> None:
        logs = self.state / "logs"
        logs.mkdir(exist_ok=True)
        plan = (
            ("collector", ("collect",), self.opts.collectors),
            ("writer", ("store",), self.opts.writers),
            ("rules", ("rules", "run"), self.opts.rule_workers),
        )
        for name, args, count in plan:
            for i in range(count):
                child = Child(
                    f"{name}-{i}", [*citypulse_argv(), *args], free_port(), logs / f"{name}-{i}.log"
                )
                env = dict(self.env)
                if name == "collector":
                    env["CITYPULSE_MQTT_CLIENT_ID"] = f"bench-collector-{i}"
                child.start(env)
                self.children.append(child)
        # Each service parses the registry YAML at start-up: ~1 min for 10,000 sensors here.
        started = time.monotonic()
        deadline = started + 300
        waiting = list(self.children)
        while waiting and time.monotonic() < deadline:
            self._check_children()
            waiting = [c for c in waiting if not _ready(c.metrics_port)]
            time.sleep(0.3)
        if waiting:
            names = ", ".join(c.name for c in waiting)
            raise BenchError(f"not ready after 300 s: {names} (logs in {logs})")
        # Ready is not yet evaluating: the rule workers join their groups and build their
        # engines after that. A ramp started earlier would count that one-off work (seconds
        # of CPU) in the per-reading figures and ramp against a pipeline still warming up.
        assert self.settings is not None
        while not self._rules_settled(self.settings.partitions):
            if time.monotonic() > deadline:
                raise BenchError(f"rule workers miss partitions after 300 s (logs in {logs})")
            self._check_children()
            time.sleep(0.3)
        self.services_start_s = round(time.monotonic() - started, 1)

    def _rules_settled(self, partitions: int) -> bool:
        """Whether the rule workers hold every partition of both stages and, when there are
        no more workers than partitions, each holds some (the first to join holds them all
        until the others' rebalance)."""
        workers = [c for c in self.children if c.name.startswith("rules-")]
        for stage in ("sensor", "group"):
            held = [
                scrape(c.metrics_port, RULES_PARTITIONS, {"stage": stage}) or 0.0 for c in workers
            ]
            if sum(held) < partitions:
                return False
            if len(workers) <= partitions and not all(held):
                return False
        return True

    def _check_children(self) -> None:
        for c in self.children:
            if c.proc is not None and c.proc.poll() is not None:
                tail = c.log_path.read_text(errors="replace")[-2000:]
                raise BenchError(f"{c.name} exited with {c.proc.returncode}:\n{tail}")

    # -- measuring ----------------------------------------------------------------------------
    def _counter(self, prefix: str, metric: str, **labels: str) -> float:
        """Sum of a counter over the children named ``prefix*``. A scrape that fails (a busy
        service answers /metrics late) counts as that child's last value, never as 0."""
        total = 0.0
        for c in self.children:
            if not c.name.startswith(prefix):
                continue
            key = (c.name, metric, tuple(sorted(labels.items())))
            value = scrape(c.metrics_port, metric, labels)
            if value is None:
                value = self._last.get(key, 0.0)
            self._last[key] = value
            total += value
        return total

    def _service_pids(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for c in self.children:
            if c.proc is not None:
                out.setdefault(c.name.rsplit("-", 1)[0], []).append(c.proc.pid)
        for name, server in (
            ("mosquitto", self.stack.mosquitto),
            ("tansu", self.stack.tansu),
            ("postgres", self.stack.postgres),
        ):
            if server.proc is not None:
                out[name] = [server.proc.pid]
        return out

    def _resources(self, extra: dict[str, list[int]]) -> dict[str, tuple[float, float]]:
        pids = {**self._service_pids(), **extra}
        return {name: _proc_tree_cpu_rss(p) for name, p in pids.items()}

    def _phase(
        self,
        name: str,
        pubs: Publishers,
        seconds: float,
        progress: Progress,
        rate: float | None,
        rss_every_s: float = 0.0,
    ) -> dict[str, Any]:
        """Drive one phase: fixed ``rate`` (readings/s), or ramp to the sustained maximum;
        with ``rss_every_s``, also sample every service's RSS (MB) that often."""
        task = progress.add_task(name, total=seconds)
        start = time.monotonic()
        res0 = self._resources({"publishers": pubs.pids})
        rss: list[dict[str, float]] = [{"t_s": 0.0, **_rss_mb(res0)}]
        stored0, checked0 = self._counter("writer", STORED), self._counter("writer", WRITER_CHECKED)
        evaluated0 = self._rules_evaluated()
        accepted0, acked0 = self._counter("collector", ACCEPTED), pubs.acked
        ramp = Ramp()
        target = rate if rate is not None else ramp.target
        pubs.set_rate(target)
        # (t, acked, done, stored, evaluated): "done" = stored and evaluated by the rules, so
        # the sustained rate is what every stage keeps up with, the rule workers included.
        history: list[tuple[float, float, float, float, float]] = []
        while (elapsed := time.monotonic() - start) < seconds:
            time.sleep(0.5)
            self._check_children()
            if rss_every_s and elapsed - rss[-1]["t_s"] >= rss_every_s:
                now_rss = self._resources({"publishers": pubs.pids})
                rss.append({"t_s": round(elapsed, 1), **_rss_mb(now_rss)})
            acked, stored = pubs.acked, self._counter("writer", STORED)
            evaluated = self._rules_evaluated() - evaluated0 + stored0
            accepted = self._counter("collector", ACCEPTED)
            now = time.monotonic()
            history.append((now, acked, min(stored, evaluated), stored, evaluated))
            if rate is None and len(history) >= 2:
                # Rates over the last ~1.5 s: the writer stores in bursts, 0.5 s is noisy.
                recent = [h for h in history if now - h[0] <= 1.6]
                span = recent[-1][0] - recent[0][0]
                target = ramp.step(
                    backlog=acked - min(stored, evaluated),
                    done_rate=(recent[-1][2] - recent[0][2]) / span,
                    acked_rate=(recent[-1][1] - recent[0][1]) / span,
                )
                pubs.set_rate(target)
            self.samples.append(
                Sample(now - self.began, name, target, acked, accepted, stored, evaluated)
            )
            window = [h for h in history if now - h[0] <= 3.0]
            shown = (
                (window[-1][2] - window[0][2]) / (window[-1][0] - window[0][0])
                if len(window) > 1
                else 0.0
            )
            progress.update(
                task,
                completed=elapsed,
                description=f"{name}: offered {target:,.0f}/s, stored {shown:,.0f} readings/s",
            )
        progress.update(task, completed=seconds)
        end = time.monotonic()
        res1 = self._resources({"publishers": pubs.pids})
        # Steady state: the last 60 % of the phase (the first part ramps or warms up).
        steady = [h for h in history if h[0] >= start + 0.4 * seconds]
        rates = [0.0] * 4  # offered, done, stored, evaluated
        if len(steady) >= 2:
            span = steady[-1][0] - steady[0][0]
            rates = [(steady[-1][i] - steady[0][i]) / span for i in (1, 2, 3, 4)]
        offered, sustained, stored_rate, evaluated_rate = rates
        stored_total = self._counter("writer", STORED) - stored0
        accepted_delta = self._counter("collector", ACCEPTED) - accepted0
        return {
            "phase": name,
            # PUBACKed but not (yet) accepted by a collector at the phase end: queued in the
            # broker, or dropped by it (max_queued_messages) when offered far above the max.
            "acked_minus_accepted": int(pubs.acked - acked0 - accepted_delta),
            "start_ms": _now_ms() - round((end - start) * 1000),
            "steady_from_ms": _now_ms() - round((end - start - 0.4 * seconds) * 1000),
            "end_ms": _now_ms(),
            "seconds": round(end - start, 2),
            "offered_readings_per_s": round(offered, 1),
            "sustained_readings_per_s": round(sustained, 1),
            "stored_readings_per_s": round(stored_rate, 1),
            "rules_readings_per_s": round(evaluated_rate, 1),
            "stored_readings": int(stored_total),
            # Batches the writer inserted with ON CONFLICT (a duplicate in or before them);
            # the bench's readings are unique, so 0 unless a service restarted.
            "writer_checked_batches": int(self._counter("writer", WRITER_CHECKED) - checked0),
            "cpu_s": {k: round(res1[k][0] - res0.get(k, (0.0, 0.0))[0], 2) for k in res1},
            "rss_mb": _rss_mb(res1),
            **({"rss_series_mb": rss} if rss_every_s else {}),
        }

    def _drain(self, pubs: Publishers, probe: Probe, timeout_s: float = 180.0) -> dict[str, Any]:
        """Stop offering; wait until every PUBACKed reading was accepted, stored and evaluated
        by the rule workers (so the next phase's alert latency is not the last one's lag).
        The probes pause meanwhile: with probes always in flight the counters never meet.

        Returns:
            ``seconds`` waited, ``backlog`` readings still PUBACKed but not stored at the end
            (0 when the next phase starts clean), ``rules_backlog`` readings accepted but not
            yet evaluated by the rules' sensor stage, and ``drained``.
        """
        pubs.set_rate(0)
        probe.pause()
        try:
            return self._wait_drained(pubs, timeout_s)
        finally:
            probe.resume()

    def _wait_drained(self, pubs: Publishers, timeout_s: float) -> dict[str, Any]:
        t0 = time.monotonic()
        last, still = -1.0, 0.0
        stored = accepted = evaluated = 0.0

        def done() -> bool:
            return stored >= accepted and evaluated >= accepted and accepted >= pubs.acked * 0.999

        while time.monotonic() - t0 < timeout_s:
            self._check_children()
            stored = self._counter("writer", STORED)
            accepted = self._counter("collector", ACCEPTED)
            evaluated = self._rules_evaluated()
            if done():
                break
            # "still": no progress for 10 s, i.e. the broker dropped messages
            # (max_queued_messages) and they never come.
            progress = stored + evaluated
            if progress - last < 100:
                still += 0.5
                if still >= 10:
                    break
            else:
                still = 0
            last = progress
            time.sleep(0.5)
        return {
            "seconds": round(time.monotonic() - t0, 2),
            "backlog": max(0, int(pubs.acked - stored)),
            "rules_backlog": max(0, int(accepted - evaluated)),
            "drained": done(),
        }

    def _gc_pauses(self) -> dict[str, dict[str, float]]:
        """Full (generation 2) garbage collections of each service: count, seconds in them,
        and how many took over 100 ms (each one stalls the whole process)."""
        out: dict[str, dict[str, float]] = {}
        for c in self.children:
            gen2 = {"generation": "2"}
            count = scrape(c.metrics_port, "citypulse_gc_pause_seconds_count", gen2) or 0.0
            fast = scrape(
                c.metrics_port, "citypulse_gc_pause_seconds_bucket", {**gen2, "le": "0.1"}
            )
            out[c.name] = {
                "count": count,
                "seconds": round(
                    scrape(c.metrics_port, "citypulse_gc_pause_seconds_sum", gen2) or 0.0, 3
                ),
                "over_100ms": count - (fast or 0.0),
            }
        return out

    def _rules_evaluated(self) -> float:
        """Readings the rule workers' sensor stage has evaluated (all workers)."""
        return self._counter("rules", RULES_READINGS, stage="sensor")

    # -- the run ------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        o = self.opts
        o.out.mkdir(parents=True, exist_ok=True)
        registry = self._registry()
        probes = probe_sensors(registry, o.probes)
        probe_ids = {s.id for s in probes}
        bulk = [s for s in registry.sensors if s.id not in probe_ids]
        results: dict[str, Any] = {
            "version": 1,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": _machine(),
            "options": {
                **{k: v for k, v in asdict(o).items() if k not in ("out", "modes")},
                "modes": [str(m) for m in o.modes],
            },
            "sensors": len(registry.sensors),
        }
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            step = progress.add_task("starting the embedded stack", total=None)
            results["setup"] = self._setup(registry, [s.id for s in probes])
            assert self.settings is not None
            results["rules"] = o.rules + 2
            results["group_interval_s"] = o.group_interval_s
            templates = {m: [templates_for(s, m) for s in bulk] for m in o.modes}
            progress.update(step, description="ceilings of the raw components", total=None)
            results["ceilings"] = self._ceilings(registry, templates, progress)
            modes: dict[str, Any] = {}
            seen: list[Observed] = []
            rss: dict[str, Any] = {}
            try:
                for i, mode in enumerate(o.modes):
                    if i:
                        self._stop_services()
                    # Right before the mode's ramp, with no service running: the machine's
                    # speed drifts by up to 2x within minutes, and a ceiling measured minutes
                    # earlier, before the other modes' ceilings, moved the ratio with it.
                    results["ceilings"][str(mode)]["mqtt"] = self._mqtt_ceiling(
                        mode, templates[mode], progress
                    )
                    progress.update(step, description=f"starting the services: {mode}")
                    if i:
                        self._fresh_broker()
                    self._start_services()
                    progress.update(step, visible=False)
                    observers = _Observers(self.settings, sorted(probe_ids))
                    observers.start()
                    seen.append(observers.data)
                    rss_start = {k: v[1] for k, v in self._resources({}).items()}
                    modes[str(mode)] = {}
                    try:
                        self._mode(
                            mode, templates[mode], probes, observers, progress, modes[str(mode)]
                        )
                    finally:
                        observers.stop()
                        rss[str(mode)] = {
                            k: {"start": round(rss_start.get(k, 0.0), 1), "end": round(v[1], 1)}
                            for k, v in self._resources({}).items()
                        }
            except BenchError as exc:
                # A service died mid-run: keep what was measured, say why the rest is missing.
                results["error"] = str(exc)[-3000:]
            progress.remove_task(step)
            gc_pauses = self._gc_pauses()
            snapshot_bytes = self._counter("rules", "citypulse_rules_snapshot_bytes")
        results["modes"] = modes
        results["rss_mb"] = rss  # per mode: each starts with fresh service processes
        # Latest snapshot record of every rule partition, summed: the state a restart restores.
        results["rules_snapshot_mb"] = round(snapshot_bytes / 1e6, 2)
        results["gc_full_pauses"] = gc_pauses
        results["alerts_seen"] = sum(d.alerts for d in seen)
        results["observer_errors"] = [e for d in seen for e in d.errors]
        results["ratios"] = _ratios(results)
        results["timeseries"] = [asdict(s) for s in self.samples]
        results["latency_samples"] = {
            "stored": [x for d in seen for x in d.stored_latency],
            "alert": [x for d in seen for x in d.alert_latency],
            "group_alert": [x for d in seen for x in d.group_alert_latency],
        }
        return results

    def _stop_services(self) -> None:
        for child in reversed(self.children):
            child.stop()
        self.children = []
        self._last.clear()  # the next processes' counters start from zero

    def _fresh_broker(self) -> None:
        """Restart tansu empty (between modes, with the services stopped).

        Each mode after the first then starts where the first did (empty topics, rule windows
        filling from cold) instead of behind the records of the modes before it: tansu's
        memory engine gets slower with every batch a partition holds, a cost Apache Kafka does
        not have, and it made a mode's figures depend on its place in the run. The database
        keeps what was stored, as it would in production.
        """
        self.stack.tansu.stop()
        self.stack.tansu.start()

    def _ceilings(
        self,
        registry: Registry,
        templates: dict[Mode, list[list[Template]]],
        progress: Progress,
    ) -> dict[str, Any]:
        assert self.settings is not None
        o = self.opts
        out: dict[str, Any] = {}
        validator = Validator(registry, Limits())
        for mode, per_sensor in templates.items():
            task = progress.add_task(f"ceilings: {mode}", total=None)
            per_msg = _per_message(per_sensor)
            now = _now_ms()
            records = []
            for ts in per_sensor[:500]:
                for t in ts:
                    batch = validator.validate(t.topic, t.render(now), now)
                    assert isinstance(batch, ReadingBatch)
                    records.append((batch.sensor.encode(), batch.encode()))
            # A scratch broker: tansu keeps every record in memory and its fetches get slower
            # with all it holds, so the ceiling's 100k records would tax the pipeline's run.
            broker = Tansu(self.state / f"ceiling-{mode}")
            broker.start()
            try:
                kafka = asyncio.run(
                    kafka_ceiling(
                        self.settings.model_copy(update={"kafka_bootstrap": broker.bootstrap}),
                        records,
                        o.kafka_ceiling_records,
                    )
                )
            finally:
                broker.stop()
            kafka["readings_per_s"] = round(kafka["produce_records_per_s"] * per_msg, 1)
            kafka["consume_readings_per_s"] = round(kafka["consume_records_per_s"] * per_msg, 1)
            out[str(mode)] = {"kafka": kafka}  # "mqtt": measured right before the mode's ramp
            progress.remove_task(task)
        task = progress.add_task("ceilings: COPY into readings", total=None)
        scratch = "bench_copy"
        dsn = self.stack.postgres.url(scratch)

        async def create() -> None:
            conn = await asyncpg.connect(self.stack.postgres.url("postgres"))
            try:
                await conn.execute(f"CREATE DATABASE {scratch}")
            finally:
                await conn.close()

        asyncio.run(create())
        env, self.env = self.env, {**self.env, "CITYPULSE_DATABASE_URL": dsn}
        try:
            self._cli("db", "migrate")
        finally:
            self.env = env
        out["copy"] = asyncio.run(copy_ceiling(dsn, o.copy_ceiling_rows))
        progress.remove_task(task)
        return out

    def _mqtt_ceiling(
        self, mode: Mode, per_sensor: list[list[Template]], progress: Progress
    ) -> dict[str, float]:
        task = progress.add_task(f"ceiling: MQTT -> bare paho subscriber, {mode}", total=None)
        per_msg = _per_message(per_sensor)
        try:
            return mqtt_ceiling(
                self.stack.mosquitto.url,
                shard(per_sensor, self.opts.publishers),
                self.opts.ceiling_s,
                per_msg,
            )
        finally:
            progress.remove_task(task)

    def _mode(
        self,
        mode: Mode,
        per_sensor: list[list[Template]],
        probes: list[Any],
        observers: _Observers,
        progress: Progress,
        out: dict[str, Any],
    ) -> None:
        """Ramp, then 50 % and 90 % latency phases of one mode; figures go into ``out``."""
        o = self.opts
        assert self.settings is not None
        out["services_start_s"] = self.services_start_s
        pubs = Publishers(self.stack.mosquitto.url, shard(per_sensor, o.publishers))
        pubs.start()
        probe = Probe(self.stack.mosquitto.url, probes, mode, o.probe_hz)

        def pending_since() -> int:
            # The oldest probe of the last 10 s not yet seen in the database bounds the poll.
            now = _now_ms()
            since = now - 2000
            for key in reversed(list(probe.sent)[-400:]):
                if now - key[1] > 10_000:
                    break
                if key not in observers.seen:
                    since = min(since, key[1])
            return since

        observers.pending_since = pending_since
        observers.probes_sent = lambda: probe.sent
        probe.start()
        try:
            ramp = self._phase(f"{mode} ramp", pubs, o.duration_s, progress, None)
            ramp["drain"] = self._drain(pubs, probe)
            out["ramp"] = ramp
            top = ramp["sustained_readings_per_s"]
            out["sustained_readings_per_s"] = top
            per_msg = _per_message(per_sensor)
            out["sustained_messages_per_s"] = round(top / per_msg, 1)
            out["cpu_s_per_million"] = {
                k: round(v / ramp["stored_readings"] * 1e6, 2) if ramp["stored_readings"] else None
                for k, v in ramp["cpu_s"].items()
            }
            out["latency"] = {}
            latency_s = max(4.0, o.duration_s)
            # (label, offered readings/s, seconds, kind)
            fixed = [
                ("50%", 0.5 * top, latency_s, "latency"),
                ("90%", 0.9 * top, latency_s, "latency"),
                *((f"{rate:g}/s", rate, latency_s, "latency") for rate in o.at_rates),
            ]
            fill_s = self.longest_window_s if o.soak_fill_s is None else o.soak_fill_s
            if o.soak_s > 0 and mode == o.modes[0]:
                fixed.append(("50%", 0.5 * top, fill_s + o.soak_s, "soak"))
            for label, offered, seconds, kind in fixed:
                name = f"{mode} at {label}" if kind == "latency" else f"{mode} soak at {label}"
                ph = self._phase(
                    name,
                    pubs,
                    seconds,
                    progress,
                    offered,
                    rss_every_s=10.0 if kind == "soak" else 0.0,
                )
                ph["drain"] = self._drain(pubs, probe)
                lo, hi = ph["steady_from_ms"] - 1, ph["end_ms"]
                data = observers.data
                for key, samples in (
                    ("stored_latency_ms", data.stored_latency),
                    ("alert_latency_ms", data.alert_latency),
                    ("alert_sent_latency_ms", data.alert_sent_latency),
                    ("group_alert_latency_ms", data.group_alert_latency),
                ):
                    ph[key] = _pct([lat for at, lat in samples if lo <= at <= hi])
                if kind == "soak":
                    ph["fill_s"] = fill_s
                    ph["rss_after_fill_mb"] = _rss_growth(ph["rss_series_mb"], fill_s)
                    out["soak"] = ph
                else:
                    out["latency"][label] = ph
        finally:
            probe.stop()
            pubs.stop()

    def close(self) -> None:
        self._stop_services()
        self.stack.stop()
        shutil.rmtree(self.state, ignore_errors=True)


def _per_message(per_sensor: list[list[Template]]) -> float:
    """Readings per message of a mode's payloads."""
    return sum(t.readings for ts in per_sensor for t in ts) / sum(map(len, per_sensor))


def _rss_mb(resources: dict[str, tuple[float, float]]) -> dict[str, float]:
    """RSS (MB) of each service from :meth:`Bench._resources` (cpu_s, rss_mb) pairs."""
    return {k: round(v[1], 1) for k, v in resources.items()}


def _rss_growth(series: list[dict[str, float]], after_s: float) -> dict[str, dict[str, float]]:
    """Per service: RSS (MB) at the first sample from ``after_s`` on, at the end, and the
    growth between them in % (the measured part of a soak, once the windows are full)."""
    start = next((r for r in series if r["t_s"] >= after_s), series[-1])
    end = series[-1]
    return {
        k: {
            "from_mb": start[k],
            "to_mb": end[k],
            "growth_pct": round((end[k] - start[k]) / start[k] * 100, 1) if start[k] else 0.0,
        }
        for k in end
        if k != "t_s"
    }


def _ratios(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    copy_rate = results["ceilings"]["copy"]["rows_per_s"]
    for mode, m in results["modes"].items():
        c = results["ceilings"][mode]
        rate = m.get("sustained_readings_per_s")
        if rate is None:
            continue
        out[mode] = {
            "mqtt_subscriber": round(rate / c["mqtt"]["readings_per_s"], 3)
            if c["mqtt"]["readings_per_s"]
            else None,
            "kafka_produce": round(rate / c["kafka"]["readings_per_s"], 3),
            "kafka_consume": round(rate / c["kafka"]["consume_readings_per_s"], 3),
            "postgres_copy": round(rate / copy_rate, 3),
        }
    return out


def run_bench(opts: BenchOptions) -> dict[str, Any]:
    """Run the benchmark; write ``bench.json`` and ``bench.png`` under ``opts.out``.

    Returns:
        The results (the same as the JSON file).
    """
    from deploy.bench._plot import plot

    bench = Bench(opts)
    try:
        results = bench.run()
    finally:
        bench.close()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    opts.out.mkdir(parents=True, exist_ok=True)
    json_path = opts.out / f"bench-{stamp}.json"
    png_path = opts.out / f"bench-{stamp}.png"
    try:
        plot(results, png_path)
        results["plot"] = str(png_path)
    except ImportError:
        results["plot"] = None
    json_path.write_text(json.dumps(results, indent=1))
    shutil.copyfile(json_path, opts.out / "latest.json")
    if results["plot"]:
        shutil.copyfile(png_path, opts.out / "latest.png")
    results["json"] = str(json_path)
    return results
