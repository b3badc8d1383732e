"""The ``citypulse bench`` command body: options -> run -> summary table."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from deploy.bench._load import Mode
from deploy.bench._run import BenchError, BenchOptions, run_bench

console = Console()


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float | int):
        return f"{v:,.0f}" if abs(v) >= 10 else f"{v:.2f}"
    return str(v)


def _p99s(phase: dict[str, Any] | None) -> str:
    """``p99 stored/p99 alert`` of a latency phase."""
    if phase is None:
        return "-"
    stored, alert = phase["stored_latency_ms"].get("p99"), phase["alert_latency_ms"].get("p99")
    return f"{_fmt(stored)}/{_fmt(alert)}"


def summary(results: dict[str, Any]) -> Table:
    """The headline figures of a run as a rich table."""
    t = Table(title=f"citypulse bench ({results['sensors']:,} sensors, {results['rules']} rules)")
    # --at-rate phases, labelled "<rate>/s", in the order they ran
    fixed = list(
        dict.fromkeys(
            label
            for m in results["modes"].values()
            for label in m.get("latency", {})
            if label.endswith("/s")
        )
    )
    for col in ("mode", "sustained readings/s", "msgs/s", "x mqtt", "x kafka", "x COPY"):
        t.add_column(col, justify="right")
    for col in (
        "50%: p50/p95/p99 stored ms",
        "50%: p99 alert/group alert ms",
        "90%: p99 stored/alert ms",
        *(f"{label}: p99 stored/alert ms" for label in fixed),
    ):
        t.add_column(col, justify="right")
    for mode, m in results["modes"].items():
        if mode not in results["ratios"] or "latency" not in m:
            continue
        r = results["ratios"][mode]
        lat50 = m["latency"]["50%"]
        lat90 = m["latency"]["90%"]
        s50 = lat50["stored_latency_ms"]
        t.add_row(
            mode,
            _fmt(m["sustained_readings_per_s"]),
            _fmt(m["sustained_messages_per_s"]),
            _fmt(r["mqtt_subscriber"]),
            _fmt(r["kafka_consume"]),
            _fmt(r["postgres_copy"]),
            "/".join(_fmt(s50.get(k)) for k in ("p50", "p95", "p99")),
            f"{_fmt(lat50['alert_latency_ms'].get('p99'))}/"
            f"{_fmt(lat50.get('group_alert_latency_ms', {}).get('p99'))}",
            _p99s(lat90),
            *(_p99s(m["latency"].get(label)) for label in fixed),
        )
    return t


def run_bench_cmd(
    *,
    sensors: int,
    rules: int,
    duration: float,
    mode: str,
    collectors: int,
    writers: int,
    rule_workers: int,
    publishers: int,
    out: Path,
    quick: bool,
    soak_s: float = 0.0,
    soak_fill_s: float | None = None,
    group_interval_s: float = 1.0,
    at_rates: tuple[float, ...] = (),
) -> int:
    """Run ``citypulse bench``; return the exit code."""
    try:
        modes = tuple(Mode) if mode == "all" else (Mode(mode),)
    except ValueError:
        console.print(f"[red]--mode must be single, batch, senml or all, not {mode!r}[/]")
        return 2
    if any(rate <= 0 for rate in at_rates):
        console.print(f"[red]--at-rate must be above 0 readings/s, not {min(at_rates):g}[/]")
        return 2
    opts = (
        BenchOptions.quick_options(out, modes)
        if quick
        else BenchOptions(sensors=sensors, rules=rules, duration_s=duration, modes=modes, out=out)
    )
    opts = dataclasses.replace(
        opts,
        collectors=collectors,
        writers=writers,
        rule_workers=rule_workers,
        publishers=publishers if not quick else min(publishers, opts.publishers),
        soak_s=soak_s,
        soak_fill_s=soak_fill_s,
        group_interval_s=group_interval_s,
        at_rates=at_rates,
    )
    try:
        results = run_bench(opts)
    except BenchError as exc:
        console.print(f"[red]{exc}[/]")
        return 1
    console.print(summary(results))
    if results.get("error"):
        console.print(f"[red]run incomplete: {results['error']}[/]")
    console.print(f"results: {results['json']}  plot: {results['plot']}")
    return 1 if results.get("error") else 0
