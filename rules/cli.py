"""`citypulse` sub-commands of the `rules` package (kept thin: the logic lives in the modules)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from citypulse.registry import Registry
    from citypulse.yamlsrc import Located

app = typer.Typer(no_args_is_help=True)

_RegistryOpt = Annotated[
    Path | None, typer.Option("--registry", help="sensor registry (default: settings.registry)")
]


@app.command("check")
def check(
    ctx: typer.Context,
    paths: Annotated[
        list[Path] | None, typer.Argument(help="rule files or directories (default: settings)")
    ] = None,
    registry: _RegistryOpt = None,
) -> None:
    """Check rule files; print every problem as file:line:col and exit 1 on any error."""
    from citypulse.cli import registry_or_exit, settings_of
    from rules._load import check_rules

    settings = settings_of(ctx)
    reg = registry_or_exit(registry or settings.registry)
    targets = paths or [settings.rules]
    ruleset, errors = check_rules(targets, reg)
    errors = [*errors, *_maintenance_errors(targets, reg)]
    for problem in errors:
        typer.echo(str(problem), err=True)
    warnings = ruleset.warnings if ruleset is not None else ()
    for w in warnings:
        typer.echo(str(w), err=True)
    if errors or ruleset is None:
        typer.echo(f"{len(errors)} error(s), {len(warnings)} warning(s)", err=True)
        raise typer.Exit(1)
    typer.echo(
        f"{len(ruleset.files)} file(s), {len(ruleset)} rule(s) ok, {len(warnings)} warning(s)"
    )


def _maintenance_errors(targets: list[Path], reg: Registry) -> list[Located]:
    """Problems of the maintenance-window files in the directories checked."""
    from rules._load import MAINTENANCE_FILE
    from rules.runtime.errors import MaintenanceFileError
    from rules.runtime.maintenance import load_maintenance

    problems: list[Located] = []
    for target in targets:
        if target.is_dir() and (target / MAINTENANCE_FILE).exists():
            try:
                load_maintenance(target / MAINTENANCE_FILE, reg)
            except MaintenanceFileError as exc:
                problems.extend(exc.problems)
    return problems


@app.command("test")
def run_tests(
    ctx: typer.Context,
    files: Annotated[list[Path], typer.Argument(help="rule test YAML files")],
    registry: _RegistryOpt = None,
) -> None:
    """Run rule unit tests written in YAML (like promtool test rules); exit 1 on any failure."""
    from citypulse.cli import settings_of
    from rules._testing import run_test_file

    settings = settings_of(ctx)
    failed = 0
    for f in files:
        result = run_test_file(f, registry or settings.registry)
        for name in result.passed:
            typer.echo(f"{f}: {name}: ok")
        for failure in result.failures:
            typer.echo(failure, err=True)
        failed += len(result.failures)
    if failed:
        typer.echo(f"FAILED: {failed} failure(s)", err=True)
        raise typer.Exit(1)
    typer.echo("SUCCESS")


@app.command("schema")
def schema(
    out: Annotated[Path, typer.Option(help="where to write the JSON Schema")] = Path(
        "schemas/rules.schema.json"
    ),
) -> None:
    """Write the JSON Schema of rule files (for editor autocompletion)."""
    from rules._model import write_rules_schema

    typer.echo(str(write_rules_schema(out)))


# -- runtime commands (owned by rules/runtime): `citypulse rules run`, `citypulse rules backtest`
def _add_runtime_commands() -> None:
    from rules.runtime.cli import add_commands

    add_commands(app)


_add_runtime_commands()
