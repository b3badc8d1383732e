"""The ``citypulse`` command: one entry point, each package brings its own sub-commands."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from citypulse.logs import setup_logging
from citypulse.settings import Settings

if TYPE_CHECKING:
    from citypulse.registry import Registry

app = typer.Typer(
    name="citypulse",
    help="Event-driven monitoring for city infrastructure.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
registry_app = typer.Typer(help="The sensor registry.", no_args_is_help=True)
app.add_typer(registry_app, name="registry")
err = Console(stderr=True)


@app.callback()
def _main(ctx: typer.Context) -> None:
    """Build the one settings object of this process (env ``CITYPULSE_*``, ``citypulse.toml``)."""
    settings = Settings()
    setup_logging(settings.log_level, settings.log_json)
    ctx.obj = settings


def settings_of(ctx: typer.Context) -> Settings:
    """The process settings built by the top-level callback."""
    obj = ctx.find_root().obj
    assert isinstance(obj, Settings)
    return obj


def registry_or_exit(path: Path, code: int = 1) -> Registry:
    """Load the registry at ``path``, or print every located problem and exit with ``code``."""
    from citypulse.registry import RegistryError, load_registry

    try:
        return load_registry(path)
    except RegistryError as exc:
        for problem in exc.problems:
            err.print(str(problem), markup=False, highlight=False)
        err.print(f"{len(exc.problems)} problem(s) in {path}", style="red")
        raise typer.Exit(code) from None


@registry_app.command("validate")
def registry_validate(
    file: Annotated[Path, typer.Argument(help="registry YAML file")],
) -> None:
    """Check a registry file; print every problem as file:line:col and exit 1 on any."""
    reg = registry_or_exit(file)
    typer.echo(f"{file}: {len(reg)} sensors, {len(reg.districts())} districts, ok")


@app.command("schema")
def schema(
    out: Annotated[Path, typer.Option(help="directory for the JSON Schema files")] = Path(
        "schemas"
    ),
) -> None:
    """Write the JSON Schemas of the vendor contract, the registry and the Kafka records."""
    from citypulse.schemas import write_schemas

    for path in write_schemas(out):
        typer.echo(str(path))


def _mount() -> None:
    # Each package owns its commands; imports inside commands keep start-up fast.
    from collectors.cli import app as collectors_app
    from dashboards.cli import app as dashboards_app
    from deploy.cli import app as deploy_app
    from rules.cli import app as rules_app
    from storage.cli import app as storage_app

    app.add_typer(collectors_app)
    app.add_typer(storage_app)
    app.add_typer(deploy_app)
    app.add_typer(rules_app, name="rules", help="Alert and optimisation rules.")
    app.add_typer(dashboards_app, name="dashboards", help="Grafana dashboards as code.")


_mount()


def main() -> None:
    app()
