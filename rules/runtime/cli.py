"""``citypulse rules run`` and ``citypulse rules backtest`` (registered on ``rules.cli.app``)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

err = Console(stderr=True)


def _when(text: str) -> datetime:
    try:
        dt = datetime.fromisoformat(text)
    except ValueError as exc:
        raise typer.BadParameter(f"{text!r}: use ISO 8601, e.g. 2026-03-01T00:00Z") from exc
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def add_commands(app: typer.Typer) -> None:
    """Add ``run`` and ``backtest`` to the ``rules`` command group."""

    @app.command("run")
    def run(
        ctx: typer.Context,
        rules: Annotated[
            Path | None, typer.Argument(help="rules directory (default: settings.rules)")
        ] = None,
        tick_s: Annotated[
            float, typer.Option(help="advance engines to the wall clock this often; 0 = never")
        ] = 1.0,
        checkpoint_s: Annotated[float, typer.Option(help="snapshot state this often")] = 30.0,
        checkpoint_records: Annotated[
            int, typer.Option(help="... or after this many input records")
        ] = 20_000,
        resend_s: Annotated[
            float, typer.Option(help="re-send firing alerts to Alertmanager this often")
        ] = 60.0,
        reload_poll_s: Annotated[
            float, typer.Option(help="check rule files for changes this often; 0 = on SIGHUP only")
        ] = 1.0,
        session_timeout_ms: Annotated[
            int, typer.Option(help="consumer-group session timeout (crash detection), ms")
        ] = 10_000,
    ) -> None:
        """Evaluate rules on the readings stream (a member of the rules consumer group)."""
        from citypulse.cli import settings_of
        from citypulse.registry import load_registry
        from citypulse.yamlsrc import YamlSourceError
        from rules.runtime.source import RuleSource
        from rules.runtime.worker import WorkerOptions, run_worker

        settings = settings_of(ctx)
        if rules is not None:
            settings = settings.model_copy(update={"rules": rules})
        try:
            # Refuse to start on broken rules, with the same messages as `rules check`.
            RuleSource(settings.rules, load_registry(settings.registry)).load()
        except YamlSourceError as exc:
            for problem in exc.problems:
                err.print(str(problem), markup=False, highlight=False)
            err.print(f"{len(exc.problems)} problem(s): not starting", style="red")
            raise typer.Exit(1) from None
        options = WorkerOptions(
            checkpoint_records=checkpoint_records,
            checkpoint_s=checkpoint_s,
            tick_s=tick_s,
            resend_s=resend_s,
            reload_poll_s=reload_poll_s,
            session_timeout_ms=session_timeout_ms,
        )
        raise typer.Exit(run_worker(settings, options))

    @app.command("backtest")
    def backtest_cmd(
        ctx: typer.Context,
        start: Annotated[str, typer.Option("--from", help="range start, ISO 8601 (UTC default)")],
        end: Annotated[str, typer.Option("--to", help="range end, ISO 8601, exclusive")],
        rules: Annotated[
            Path | None, typer.Argument(help="rules directory or file (default: settings.rules)")
        ] = None,
        as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = (
            False
        ),
        step_s: Annotated[float, typer.Option(help="advance time through gaps this often")] = 60,
    ) -> None:
        """Replay stored readings through the rules; compare with the alerts recorded then."""
        from citypulse.cli import settings_of
        from citypulse.registry import load_registry
        from citypulse.yamlsrc import YamlSourceError
        from rules import RuleEngine
        from rules.runtime.backtest import backtest
        from rules.runtime.source import RuleSource

        settings = settings_of(ctx)
        registry = load_registry(settings.registry)
        source = RuleSource(rules or settings.rules, registry)
        try:
            loaded = source.load()
        except YamlSourceError as exc:
            for problem in exc.problems:
                err.print(str(problem), markup=False, highlight=False)
            raise typer.Exit(1) from None
        engine = RuleEngine(loaded.ruleset, registry)
        report = asyncio.run(
            backtest(settings.dsn, engine, _when(start), _when(end), step_s=step_s)
        )
        if as_json:
            typer.echo(json.dumps(report.as_json(), indent=2))
            return
        table = Table(title=f"backtest {start} .. {end}: {report.readings} readings")
        for col in ("status", "ts", "rule", "state", "labels"):
            table.add_column(col)
        style = {"new": "green", "missing": "red", "same": "dim"}
        for row in report.as_json()["alerts"]:
            labels = ", ".join(f"{k}={v}" for k, v in sorted(row["labels"].items()))
            table.add_row(
                row["status"],
                row["ts"],
                row["rule"],
                row["state"],
                labels,
                style=style[row["status"]],
            )
        Console().print(table)
        c = report.as_json()["counts"]
        typer.echo(f"new {c['new']}, missing {c['missing']}, same {c['same']}")
