"""``citypulse up``: the whole pipeline on one machine, for a demo or a smoke test.

Order: embedded servers (unless external URLs are configured) -> ``db migrate`` ->
``registry load`` -> services as child processes (collector, writer, rule worker) each with its
own metrics port -> simulator (in a thread) -> live throughput line. On Ctrl-C / SIGTERM /
``--duration``: the simulator stops, the pipeline gets a few seconds to drain, children get
SIGTERM (then SIGKILL after 15 s), then the servers stop.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO
from urllib.parse import urlencode

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from citypulse.registry import RegistryError, dump_registry, load_registry
from citypulse.settings import Settings
from deploy.embedded import (
    MOSQUITTO_HINT,
    EmbeddedError,
    EmbeddedStack,
    die_with_parent,
    free_port,
)
from deploy.simulator import (
    MqttTarget,
    PublishError,
    SimulationReport,
    Simulator,
    SimulatorConfig,
    default_backfill_s,
    generate_registry,
    publish,
)

console = Console(stderr=True)

ACCEPTED = "citypulse_collector_readings_accepted_total"
REFUSED = "citypulse_collector_messages_refused_total"
STORED = "citypulse_writer_readings_stored_total"
DUPLICATES = "citypulse_writer_readings_duplicate_total"

SERVICES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("collector", ("collect",)),
    ("writer", ("store",)),
    ("rules", ("rules", "run")),
)
"""(name, citypulse arguments) of each long-running service ``up`` starts."""


@dataclass(frozen=True, slots=True)
class UpOptions:
    simulate: bool = False
    embedded: bool = False
    duration_s: float | None = None
    rate: float | None = None
    speedup: float = 60.0
    sensors_per_silo_district: int | None = None
    seed: int = 1
    readings_per_message: int = 1
    drain_s: float = 120.0
    """After the simulator stops, wait up to this long for the writer to catch up."""
    stall_s: float = 10.0
    """... but stop waiting once the stored count has not moved for this long."""


@dataclass(slots=True)
class Child:
    """A service child process and where to find it."""

    name: str
    argv: list[str]
    metrics_port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None

    def start(self, env: dict[str, str]) -> None:
        self.log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            die_with_parent(self.argv),  # no orphaned services if `up` is killed
            env={**env, "CITYPULSE_METRICS_PORT": str(self.metrics_port)},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the terminal's Ctrl-C reaches `up`, which stops us in order
        )

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                console.print(f"[yellow]{self.name} ignored SIGTERM for {timeout_s}s: killed[/]")
                self.proc.kill()
                self.proc.wait()
        if self.log is not None:
            self.log.close()
            self.log = None


@dataclass(slots=True)
class Counters:
    """The last values scraped from the services; ``None`` = metric not (yet) exported."""

    accepted: float | None = None
    refused: float | None = None
    stored: float | None = None
    duplicates: float | None = None
    """Readings the writer skipped as already stored (a vendor re-sent the same instant)."""
    history: list[tuple[float, float]] = field(default_factory=list)

    def stored_rate(self, window_s: float = 5.0) -> float | None:
        if len(self.history) < 2:
            return None
        t1, v1 = self.history[-1]
        t0, v0 = next(((t, v) for t, v in self.history if t1 - t <= window_s), self.history[0])
        return (v1 - v0) / (t1 - t0) if t1 > t0 else None


def citypulse_argv() -> list[str]:
    """How to run the ``citypulse`` command of this very installation."""
    script = Path(sys.executable).parent / "citypulse"
    if script.exists():
        return [str(script)]
    found = shutil.which("citypulse")
    return [found] if found else [sys.executable, "-c", "from citypulse.cli import main; main()"]


def scrape(
    port: int, name: str, labels: Mapping[str, str] | None = None, timeout_s: float = 1.0
) -> float | None:
    """Sum of the samples of counter ``name`` at ``http://127.0.0.1:port/metrics`` (those with
    all of ``labels``, if given); ``None`` when the endpoint does not answer. Asks for that
    sample name only (``name[]``), so neither side builds or parses the whole page."""
    url = f"http://127.0.0.1:{port}/metrics?{urlencode({'name[]': name})}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    total: float | None = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(
                sample.labels.get(k) == v for k, v in (labels or {}).items()
            ):
                total = (total or 0.0) + float(sample.value)
    return total


def _is_default(settings: Settings) -> bool:
    defaults = Settings.model_fields
    return all(
        getattr(settings, key) == defaults[key].default
        for key in ("mqtt_url", "kafka_bootstrap", "database_url")
    )


def _command_exists(cp: list[str], args: tuple[str, ...], env: dict[str, str]) -> bool:
    out = subprocess.run(
        [*cp, *args, "--help"], env=env, capture_output=True, check=False, timeout=60
    )
    return out.returncode == 0


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def _live_view(report: SimulationReport | None, c: Counters, elapsed: float) -> Table:
    t = Table(show_header=True, box=None)
    for col in ("elapsed", "published", "accepted", "refused msgs", "stored", "stored/s"):
        t.add_column(col, justify="right")
    rate = c.stored_rate()
    t.add_row(
        f"{elapsed:.0f} s",
        _fmt(report.readings) if report is not None else "-",
        _fmt(c.accepted),
        _fmt(c.refused),
        _fmt(c.stored),
        "-" if rate is None else f"{rate:,.0f}",
    )
    return t


def run_up(settings: Settings, opts: UpOptions) -> int:
    """Run everything until ``opts.duration_s`` or a signal; return the exit code."""
    state = settings.state_dir.resolve()
    logs = state / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    env = {k: v for k, v in os.environ.items() if not k.startswith("CITYPULSE_")}
    env.update({k: v for k, v in os.environ.items() if k.startswith("CITYPULSE_")})
    stack: EmbeddedStack | None = None
    children: list[Child] = []
    try:
        if opts.embedded or _is_default(settings):
            console.print(f"starting the embedded stack under {state} ...")
            stack = EmbeddedStack(state)
            try:
                stack.start()
            except EmbeddedError as exc:
                console.print(f"[red]{exc}[/]")
                if "mosquitto" in str(exc):
                    console.print(f"install it with: [bold]{MOSQUITTO_HINT}[/]")
                return 1
            env.update(stack.env())
            for key, value in stack.tuning_env().items():
                env.setdefault(key, value)  # the user's own setting wins
            mqtt_url = stack.mosquitto.url
        else:
            mqtt_url = settings.mqtt_url

        registry_path = settings.registry.resolve()
        if not registry_path.exists() and settings.registry == Path("deploy/registry.example.yaml"):
            # Run outside a checkout: use the example registry shipped inside the package.
            registry_path = Path(__file__).resolve().parent / "registry.example.yaml"
        if opts.sensors_per_silo_district is not None:
            registry_path = state / "registry.yaml"
            registry_path.write_text(
                dump_registry(generate_registry(4, opts.sensors_per_silo_district, opts.seed))
            )
        try:
            registry = load_registry(registry_path)
        except RegistryError as exc:
            for problem in exc.problems:
                console.print(str(problem), markup=False, highlight=False)
            return 1
        env["CITYPULSE_REGISTRY"] = str(registry_path)
        env["CITYPULSE_STATE_DIR"] = str(state)
        if not settings.rules.is_absolute():
            env.setdefault("CITYPULSE_RULES", str(settings.rules.resolve()))

        cp = citypulse_argv()
        setup: tuple[tuple[str, ...], ...] = (("db", "migrate"), ("registry", "load"))
        for args in setup:
            if not _command_exists(cp, args, env):
                console.print(f"[yellow]`citypulse {' '.join(args)}` not available: skipped[/]")
                continue
            out = subprocess.run(
                [*cp, *args], env=env, capture_output=True, text=True, check=False, timeout=120
            )
            if out.returncode != 0:
                console.print(f"[red]citypulse {' '.join(args)} failed:[/]\n{out.stderr[-3000:]}")
                return 1
            console.print(f"citypulse {' '.join(args)}: ok")

        for name, args in SERVICES:
            if not _command_exists(cp, args, env):
                console.print(
                    f"[yellow]`citypulse {' '.join(args)}` not available: {name} not started[/]"
                )
                continue
            child = Child(name, [*cp, *args], free_port(), logs / f"{name}.log")
            child.start(env)
            children.append(child)

        table = Table(title="citypulse up")
        table.add_column("what")
        table.add_column("where")
        if stack is not None:
            table.add_row("mosquitto", f"{stack.mosquitto.url}  log {stack.mosquitto.log_path}")
            table.add_row("kafka (tansu)", f"{stack.tansu.bootstrap}  log {stack.tansu.log_path}")
            table.add_row("postgresql", f"{stack.postgres.url()}  log {stack.postgres.log_path}")
        else:
            table.add_row("mqtt", settings.mqtt_url)
            table.add_row("kafka", settings.kafka_bootstrap)
        for child in children:
            table.add_row(
                child.name,
                f"pid {child.proc.pid if child.proc else '-'}  "
                f"http://127.0.0.1:{child.metrics_port}/metrics  log {child.log_path}",
            )
        table.add_row("registry", f"{registry_path} ({len(registry)} sensors)")
        console.print(table)

        report_box: list[SimulationReport] = []
        sim_thread: threading.Thread | None = None
        sim_stop = threading.Event()
        sim_error: list[BaseException] = []
        if opts.simulate:
            sim = Simulator(
                registry,
                SimulatorConfig(
                    rate=opts.rate,
                    speedup=opts.speedup,
                    seed=opts.seed,
                    readings_per_message=opts.readings_per_message,
                ),
            )
            target = MqttTarget(
                url=mqtt_url,
                username=settings.mqtt_username,
                password=(
                    settings.mqtt_password.get_secret_value() if settings.mqtt_password else None
                ),
                ca_file=settings.mqtt_ca_file,
            )

            def progress(r: SimulationReport) -> None:
                report_box[:] = [r]

            def run_sim() -> None:
                try:
                    backfill = default_backfill_s(
                        opts.speedup, opts.duration_s, settings.past_tolerance_s * 0.9
                    )
                    progress(
                        publish(
                            sim, target, stop=sim_stop, on_progress=progress, backfill_s=backfill
                        )
                    )
                except PublishError as exc:
                    sim_error.append(exc)

            # Give the collector a moment to subscribe, so the first readings are not lost.
            _wait_ready(children, "collector", 20.0, stop)
            sim_thread = threading.Thread(target=run_sim, name="simulator", daemon=True)
            sim_thread.start()
            console.print(f"simulator: {sim.rate:,.1f} readings/s, speedup x{opts.speedup:g}")

        counters = Counters()
        ports = {c.name: c.metrics_port for c in children}
        began = time.monotonic()

        def poll() -> None:
            if "collector" in ports:
                counters.accepted = scrape(ports["collector"], ACCEPTED)
                counters.refused = scrape(ports["collector"], REFUSED)
            if "writer" in ports:
                counters.stored = scrape(ports["writer"], STORED)
                counters.duplicates = scrape(ports["writer"], DUPLICATES)
                if counters.stored is not None:
                    counters.history.append((time.monotonic(), counters.stored))
                    del counters.history[:-30]

        with Live(console=console, refresh_per_second=2, transient=False) as live:
            while not stop.is_set():
                elapsed = time.monotonic() - began
                if opts.duration_s is not None and elapsed >= opts.duration_s:
                    break
                dead = [c for c in children if c.proc is not None and c.proc.poll() is not None]
                if dead:
                    for c in dead:
                        console.print(
                            f"[red]{c.name} exited with {c.proc.returncode if c.proc else '?'}; "
                            f"see {c.log_path}[/]"
                        )
                    break
                poll()
                live.update(
                    Group(_live_view(report_box[0] if report_box else None, counters, elapsed))
                )
                stop.wait(1.0)
            sim_stop.set()
            if sim_thread is not None:
                sim_thread.join(30)
            # Let what was published reach the database before stopping the services.
            deadline = time.monotonic() + opts.drain_s
            last, moved = -1.0, time.monotonic()
            while opts.simulate and time.monotonic() < deadline:
                poll()
                live.update(
                    Group(
                        _live_view(
                            report_box[0] if report_box else None,
                            counters,
                            time.monotonic() - began,
                        )
                    )
                )
                published = report_box[0].readings if report_box else 0
                goal = max(published, counters.accepted or 0.0)
                now_stored = (counters.stored or 0.0) + (counters.duplicates or 0.0)
                if now_stored >= goal:
                    break
                if now_stored != last:
                    last, moved = now_stored, time.monotonic()
                elif time.monotonic() - moved > opts.stall_s:
                    break
                time.sleep(0.5)

        elapsed = time.monotonic() - began
        report = report_box[0] if report_box else None
        summary = Table(title="summary", show_header=False)
        summary.add_row("readings published", _fmt(report.readings) if report else "-")
        summary.add_row("readings accepted", _fmt(counters.accepted))
        summary.add_row("messages refused", _fmt(counters.refused))
        summary.add_row("readings stored", _fmt(counters.stored))
        if counters.duplicates:
            summary.add_row("re-sent readings skipped", _fmt(counters.duplicates))
        stored_rate = (counters.stored or 0.0) / elapsed if elapsed > 0 else 0.0
        summary.add_row("stored readings/s", f"{stored_rate:,.1f}")
        if report is not None:
            summary.add_row("incidents", str(len(report.incidents)))
        behind = (
            (counters.accepted or 0.0) - (counters.stored or 0.0) - (counters.duplicates or 0.0)
        )
        if opts.simulate and behind > 0:
            console.print(
                f"[yellow]{behind:,.0f} accepted readings were not stored before the stop: the "
                "embedded Kafka broker (tansu) keeps them in memory only (deploy/GUARANTEES.md)"
            )
        console.print(summary)
        if sim_error:
            console.print(f"[red]simulator: {sim_error[0]}[/]")
            return 1
        return 0
    finally:
        for child in reversed(children):
            child.stop()
        if stack is not None:
            stack.stop()
        console.print("stopped")


def _wait_ready(children: list[Child], name: str, timeout_s: float, stop: threading.Event) -> None:
    """Wait until the service's ``/readyz`` answers 200 (or the timeout passes)."""
    child = next((c for c in children if c.name == name), None)
    if child is None:
        return
    deadline = time.monotonic() + timeout_s
    url = f"http://127.0.0.1:{child.metrics_port}/readyz"
    while time.monotonic() < deadline and not stop.is_set():
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1.0) as resp:
            if resp.status == 200:
                return
        time.sleep(0.2)
