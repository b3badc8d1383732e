"""`citypulse dashboards ...`: build the dashboards as code, push them to Grafana."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True)


@app.command("build")
def build(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="output directory")] = Path("deploy/grafana"),
    registry: Annotated[
        Path | None, typer.Option(help="registry file (default: settings.registry)")
    ] = None,
    timescaledb: Annotated[
        bool | None,
        typer.Option(
            "--timescaledb/--no-timescaledb",
            help="data source TimescaleDB option (default: detect if the database is reachable)",
        ),
    ] = None,
    prometheus_url: Annotated[
        str, typer.Option(help="Prometheus URL as Grafana reaches it")
    ] = "http://prometheus:9090",
    database_url: Annotated[
        str | None,
        typer.Option(help="PostgreSQL URL as Grafana reaches it (default: settings)"),
    ] = None,
) -> None:
    """Generate dashboards JSON and Grafana provisioning files from the registry."""
    from citypulse.cli import registry_or_exit, settings_of
    from dashboards._provision import detect_timescaledb, write_all

    settings = settings_of(ctx)
    reg_path = registry or settings.registry
    reg = registry_or_exit(reg_path)
    if timescaledb is None:
        timescaledb = asyncio.run(detect_timescaledb(settings.dsn))
    for path in write_all(
        reg,
        out,
        database_url=database_url or settings.dsn,
        prometheus_url=prometheus_url,
        timescaledb=timescaledb,
    ):
        typer.echo(str(path))


@app.command("push")
def push_cmd(
    url: Annotated[str, typer.Option(help="Grafana base URL", envvar="GRAFANA_URL")],
    token: Annotated[
        str | None,
        typer.Option(help="service account token", envvar="GRAFANA_TOKEN"),
    ] = None,
    directory: Annotated[Path, typer.Option("--dir", help="dashboards JSON directory")] = Path(
        "deploy/grafana/dashboards"
    ),
) -> None:
    """Upload the built dashboards to a running Grafana (idempotent: overwrite by uid)."""
    from citypulse.cli import err
    from dashboards._provision import PushError, push

    try:
        uids = push(directory, url, token)
    except PushError as exc:
        err.print(f"push failed: {exc}", style="red", markup=False)
        raise typer.Exit(1) from None
    typer.echo(f"pushed {len(uids)} dashboards to {url}: {', '.join(uids)}")
