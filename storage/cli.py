"""`citypulse` sub-commands of the `storage` package: ``db migrate``, ``db grant-login``,
``registry load`` and ``store``."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True)
db_app = typer.Typer(help="The citypulse database: migrations and roles.", no_args_is_help=True)
app.add_typer(db_app, name="db")

SERVICE_ROLES = ("citypulse_writer", "citypulse_grafana", "citypulse_rules")


@db_app.command("migrate")
def db_migrate(ctx: typer.Context) -> None:
    """Apply every pending migration of storage/migrations, in order (a no-op when current)."""
    from citypulse.cli import err, settings_of
    from storage.errors import MigrationError
    from storage.migrate import migrate

    settings = settings_of(ctx)
    try:
        result = asyncio.run(migrate(settings.dsn))
    except (MigrationError, OSError) as exc:
        err.print(f"migration failed: {exc}", style="red", markup=False, highlight=False)
        raise typer.Exit(1) from None
    applied = ", ".join(f"{v:04d}" for v in result.applied) or "none (up to date)"
    typer.echo(f"flavour {result.flavour.value}; applied: {applied}")


@db_app.command("grant-login")
def db_grant_login(
    ctx: typer.Context,
    role: Annotated[str, typer.Argument(help="one of " + ", ".join(SERVICE_ROLES))],
    password: Annotated[str, typer.Option(prompt=True, hide_input=True, confirmation_prompt=True)],
) -> None:
    """Let a service role log in with a password (ALTER ROLE ... LOGIN PASSWORD ...)."""
    from citypulse.cli import err, settings_of

    if role not in SERVICE_ROLES:
        err.print(f"unknown role {role!r}; expected one of {', '.join(SERVICE_ROLES)}")
        raise typer.Exit(2)

    async def grant() -> None:
        import asyncpg

        conn = await asyncpg.connect(settings_of(ctx).dsn)
        try:
            # ALTER ROLE takes no parameters: quote on the server with format(%I, %L).
            sql = await conn.fetchval(
                "SELECT format('ALTER ROLE %I LOGIN PASSWORD %L', $1::text, $2::text)",
                role,
                password,
            )
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(grant())
    typer.echo(f"{role} may now log in")


def registry_load(
    ctx: typer.Context,
    registry: Annotated[
        Path | None, typer.Option(help="registry YAML (default: settings.registry)")
    ] = None,
) -> None:
    """Upsert the sensor registry into the database; sensors no longer listed are retired."""
    from citypulse.cli import registry_or_exit, settings_of
    from storage.registry_db import load_registry_into

    settings = settings_of(ctx)
    path = registry or settings.registry
    reg = registry_or_exit(path)

    async def load() -> None:
        import asyncpg

        conn = await asyncpg.connect(settings.dsn)
        try:
            result = await load_registry_into(conn, reg)
        finally:
            await conn.close()
        typer.echo(
            f"{path}: {result.sensors} sensors, {result.metrics} metrics loaded; "
            f"{result.retired} retired"
        )

    asyncio.run(load())


@app.command("store")
def store(ctx: typer.Context) -> None:
    """Run the storage writer: Kafka readings + dead letters → PostgreSQL (until SIGTERM)."""
    import logging

    from citypulse.cli import settings_of
    from citypulse.service import run_service
    from storage.writer import Writer

    settings = settings_of(ctx)
    logging.getLogger("citypulse.storage").info(
        "starting writer", extra={"settings": settings.redacted()}
    )
    raise typer.Exit(asyncio.run(run_service(Writer(settings), settings.metrics_port)))


def _register_registry_load() -> None:
    # `registry` is a group of the root CLI (citypulse/cli.py). Registering here, after `app`
    # exists, works whichever of the two modules is imported first.
    from citypulse.cli import registry_app

    registry_app.command("load")(registry_load)


_register_registry_load()
