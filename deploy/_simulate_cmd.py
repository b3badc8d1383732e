"""The ``citypulse simulate`` command: build the city, publish with live progress, report."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from types import FrameType

from rich.console import Console
from rich.live import Live
from rich.table import Table

from citypulse.registry import Registry, RegistryError, dump_registry, load_registry
from citypulse.settings import Settings
from deploy.mqtt_auth import load_credentials
from deploy.simulator import (
    MqttTarget,
    PublishError,
    SimulationReport,
    Simulator,
    SimulatorConfig,
    SimulatorError,
    default_backfill_s,
    generate_registry,
    publish,
)

console = Console(stderr=True)


def _registry(
    settings: Settings,
    registry: Path | None,
    registry_out: Path | None,
    districts: int,
    sensors_per_silo_district: int,
    seed: int,
) -> Registry:
    if registry_out is not None:
        reg = generate_registry(districts, sensors_per_silo_district, seed)
        registry_out.parent.mkdir(parents=True, exist_ok=True)
        registry_out.write_text(dump_registry(reg))
        console.print(f"wrote {registry_out}: {len(reg)} sensors, {districts} districts")
        return reg
    return load_registry(registry or settings.registry)


def report_table(report: SimulationReport, title: str = "simulator") -> Table:
    """A small table of what the simulator has sent."""
    t = Table(title=title, show_header=False)
    t.add_row("messages", f"{report.messages:,}")
    t.add_row("readings", f"{report.readings:,}")
    t.add_row("readings/s", f"{report.readings_per_s:,.1f}")
    t.add_row("malformed", f"{sum(report.malformed.values()):,} {dict(report.malformed)}")
    t.add_row("event time", f"{report.last_event:%Y-%m-%d %H:%M}" if report.last_event else "-")
    t.add_row("elapsed", f"{report.elapsed_s:.1f} s")
    return t


def print_report(report: SimulationReport) -> None:
    console.print(report_table(report, "simulator: sent"))
    for inc in report.incidents:
        console.print(
            f"incident [bold]{inc.kind}[/] in {inc.district} "
            f"{inc.start:%H:%M:%S}-{inc.end:%H:%M:%S} UTC: {', '.join(inc.sensors)}"
        )


def run_simulate(
    settings: Settings,
    *,
    registry: Path | None,
    registry_out: Path | None,
    districts: int,
    sensors_per_silo_district: int,
    rate: float | None,
    duration: float | None,
    speedup: float,
    seed: int,
    readings_per_message: int,
    malformed: float,
    incident_every: float,
    incident_duration: float,
    credentials: Path | None,
    report_json: Path | None,
    quiet: bool,
) -> int:
    """Run the simulator until ``duration`` or SIGINT/SIGTERM; return the exit code."""
    try:
        reg = _registry(
            settings, registry, registry_out, districts, sensors_per_silo_district, seed
        )
        sim = Simulator(
            reg,
            SimulatorConfig(
                rate=rate,
                speedup=speedup,
                seed=seed,
                readings_per_message=readings_per_message,
                malformed_fraction=malformed,
                incident_every_s=incident_every,
                incident_duration_s=incident_duration,
            ),
        )
    except RegistryError as exc:
        for problem in exc.problems:
            console.print(str(problem), markup=False, highlight=False)
        return 1
    except (SimulatorError, ValueError) as exc:
        console.print(f"[red]{exc}[/]")
        return 2
    target = MqttTarget(
        url=settings.mqtt_url,
        username=settings.mqtt_username,
        password=settings.mqtt_password.get_secret_value() if settings.mqtt_password else None,
        ca_file=settings.mqtt_ca_file,
        credentials=load_credentials(credentials) if credentials else {},
    )
    stop = threading.Event()
    backfill = default_backfill_s(speedup, duration, settings.past_tolerance_s * 0.9)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    console.print(
        f"simulating {len(reg)} sensors of {reg.city} -> {settings.mqtt_url} "
        f"at {sim.rate:,.1f} readings/s, speedup x{speedup:g}"
    )
    try:
        if quiet:
            report = publish(sim, target, duration_s=duration, stop=stop, backfill_s=backfill)
        else:
            with Live(console=console, refresh_per_second=4, transient=True) as live:
                report = publish(
                    sim,
                    target,
                    duration_s=duration,
                    stop=stop,
                    backfill_s=backfill,
                    on_progress=lambda r: live.update(report_table(r, "simulator: sending")),
                )
    except PublishError as exc:
        console.print(f"[red]{exc}[/]")
        return 1
    print_report(report)
    if report_json is not None:
        report_json.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    return 0
