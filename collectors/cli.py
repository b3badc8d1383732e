"""`citypulse` sub-commands of the `collectors` package: collect, vendor check, dlq."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from citypulse.events import ReadingBatch, RejectReason

if TYPE_CHECKING:
    from citypulse.registry import Registry

app = typer.Typer(no_args_is_help=True)
vendor_app = typer.Typer(help="Tools for vendors integrating with the MQTT contract.")
dlq_app = typer.Typer(help="The dead-letter topic of refused messages.", no_args_is_help=True)
app.add_typer(vendor_app, name="vendor")
app.add_typer(dlq_app, name="dlq")
out = Console()
err = Console(stderr=True)


def _load_registry(path: Path) -> Registry:
    from citypulse.cli import registry_or_exit

    return registry_or_exit(path, code=2)  # 1 is a refused payload's verdict


@app.command("collect")
def collect(ctx: typer.Context) -> None:
    """Run a collector: MQTT (shared subscription, QoS 1) → validate → Kafka, until SIGTERM."""
    from citypulse.cli import settings_of
    from citypulse.service import run_service
    from collectors.service import Collector

    settings = settings_of(ctx)
    registry = _load_registry(settings.registry)
    code = asyncio.run(run_service(Collector(settings, registry), settings.metrics_port))
    raise typer.Exit(code)


@vendor_app.command("check")
def vendor_check(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="sample payload, exactly as it would be published")],
    vendor: Annotated[str, typer.Option(help="vendor id (topic level 3)")],
    sensor: Annotated[str, typer.Option(help="sensor id (topic level 4)")],
    registry: Annotated[
        Path | None, typer.Option(help="registry file (default: the configured one)")
    ] = None,
) -> None:
    """Validate a sample payload offline with the collector's own code; exit 1 if refused."""
    from citypulse.cli import settings_of
    from citypulse.topics import SensorTopic
    from collectors.validate import Limits, Validator

    settings = settings_of(ctx)
    reg = _load_registry(registry or settings.registry)
    raw = file.read_bytes()
    topic = str(SensorTopic(vendor, sensor, "up"))
    verdict = Validator(reg, Limits.from_settings(settings)).validate(
        topic, raw, time.time_ns() // 1_000_000
    )
    if isinstance(verdict, ReadingBatch):
        table = Table("ts (UTC)", "metric", "value", "unit", "quality")
        for r in verdict.readings:
            quality = "good" if r.quality == 0 else "out_of_range"
            table.add_row(r.ts.isoformat(timespec="milliseconds"), r.metric, f"{r.value:g}",
                          r.unit, quality)  # fmt: skip
        out.print(table)
        out.print(
            f"accepted: {len(verdict.readings)} reading(s) for {sensor} on {topic} "
            f"(message {verdict.source})"
        )
        return
    out.print(f"refused: {verdict.reason.value}", style="red", highlight=False)
    out.print(verdict.detail, markup=False, highlight=False)
    out.print(f"message {verdict.message_hash} on {topic}", highlight=False)
    raise typer.Exit(1)


@dlq_app.command("list")
def dlq_list(
    ctx: typer.Context,
    limit: Annotated[int | None, typer.Option(help="show at most this many")] = None,
    reason: Annotated[RejectReason | None, typer.Option(help="only this reason code")] = None,
) -> None:
    """List the refused messages on the dead-letter topic, oldest first."""
    from citypulse.cli import settings_of
    from collectors.dlq import list_rejections

    settings = settings_of(ctx)
    rejections = asyncio.run(list_rejections(settings, limit, reason))
    table = Table("received (UTC)", "reason", "vendor", "sensor", "message", "detail")
    for r in rejections:
        received = datetime.fromtimestamp(r.received_ms / 1000, tz=UTC)
        table.add_row(
            received.isoformat(timespec="seconds"),
            r.reason.value,
            r.vendor or "-",
            r.sensor or "-",
            r.message_hash,
            r.detail[:120],
        )
    out.print(table)
    out.print(f"{len(rejections)} message(s) on {settings.topic('deadletter')}")


@dlq_app.command("replay")
def dlq_replay(
    ctx: typer.Context,
    reason: Annotated[RejectReason | None, typer.Option(help="only this reason code")] = None,
) -> None:
    """Re-validate dead-lettered messages against the current registry; produce accepted ones."""
    from citypulse.cli import settings_of
    from collectors.dlq import replay
    from collectors.validate import Limits, Validator

    settings = settings_of(ctx)
    reg = _load_registry(settings.registry)
    result = asyncio.run(replay(settings, Validator(reg, Limits.from_settings(settings)), reason))
    out.print(
        f"replayed {result.replayed} message(s), {result.readings} reading(s) to "
        f"{settings.topic('readings')}",
        highlight=False,
    )
    for code, n in sorted(result.still_refused.items()):
        out.print(f"still refused: {n} x {code}", highlight=False)
