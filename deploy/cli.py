"""`citypulse` sub-commands of the `deploy` package: simulate, up, deploy mqtt-auth."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True)
deploy_app = typer.Typer(help="Production deployment helpers.", no_args_is_help=True)
app.add_typer(deploy_app, name="deploy")


@app.command("simulate")
def simulate(
    ctx: typer.Context,
    registry: Annotated[
        Path | None, typer.Option(help="use this registry (default: the configured one)")
    ] = None,
    registry_out: Annotated[
        Path | None,
        typer.Option(help="generate a city of the given size, write its registry here, use it"),
    ] = None,
    districts: Annotated[int, typer.Option(help="districts of a generated city")] = 4,
    sensors_per_silo_district: Annotated[
        int, typer.Option(help="sensors of each silo per district, generated city")
    ] = 3,
    rate: Annotated[
        float | None,
        typer.Option(help="readings/s (default: each sensor once per interval x speedup)"),
    ] = None,
    duration: Annotated[
        float | None, typer.Option(help="seconds to run (default: forever)")
    ] = None,
    speedup: Annotated[float, typer.Option(help="simulated seconds per real second")] = 1.0,
    seed: Annotated[int, typer.Option(help="same seed, same city and readings")] = 1,
    readings_per_message: Annotated[
        int, typer.Option(help="records (timestamps) per message; >1 = batches")
    ] = 1,
    malformed: Annotated[
        float, typer.Option(help="fraction of messages followed by a defective one")
    ] = 0.01,
    incident_every: Annotated[
        float, typer.Option(help="simulated seconds between incidents (0 = none)")
    ] = 900.0,
    incident_duration: Annotated[float, typer.Option(help="simulated seconds each lasts")] = 300.0,
    credentials: Annotated[
        Path | None,
        typer.Option(help="credentials.json from `deploy mqtt-auth`: publish as each vendor"),
    ] = None,
    report_json: Annotated[
        Path | None, typer.Option(help="also write the final report as JSON here")
    ] = None,
    quiet: Annotated[bool, typer.Option(help="no live progress")] = False,
) -> None:
    """Publish a simulated city's readings over MQTT, with incidents and malformed messages."""
    from citypulse.cli import settings_of
    from deploy._simulate_cmd import run_simulate

    settings = settings_of(ctx)
    code = run_simulate(
        settings,
        registry=registry,
        registry_out=registry_out,
        districts=districts,
        sensors_per_silo_district=sensors_per_silo_district,
        rate=rate,
        duration=duration,
        speedup=speedup,
        seed=seed,
        readings_per_message=readings_per_message,
        malformed=malformed,
        incident_every=incident_every,
        incident_duration=incident_duration,
        credentials=credentials,
        report_json=report_json,
        quiet=quiet,
    )
    raise typer.Exit(code)


@app.command("up")
def up(
    ctx: typer.Context,
    simulate: Annotated[bool, typer.Option(help="also run the simulator")] = False,
    embedded: Annotated[
        bool, typer.Option(help="start the embedded stack even if URLs are configured")
    ] = False,
    duration: Annotated[float | None, typer.Option(help="stop after this many seconds")] = None,
    rate: Annotated[float | None, typer.Option(help="simulator readings/s")] = None,
    speedup: Annotated[float, typer.Option(help="simulator speed-up")] = 60.0,
    sensors_per_silo_district: Annotated[
        int | None,
        typer.Option(help="generate a city of this size instead of using the registry"),
    ] = None,
    seed: Annotated[int, typer.Option(help="simulator seed")] = 1,
    readings_per_message: Annotated[
        int, typer.Option(help="simulator records (timestamps) per message; >1 = batches")
    ] = 1,
) -> None:
    """Run the whole pipeline locally: servers, migrations, services, optional simulator."""
    from citypulse.cli import settings_of
    from deploy.up import UpOptions, run_up

    code = run_up(
        settings_of(ctx),
        UpOptions(
            simulate=simulate,
            embedded=embedded,
            duration_s=duration,
            rate=rate,
            speedup=speedup,
            sensors_per_silo_district=sensors_per_silo_district,
            seed=seed,
            readings_per_message=readings_per_message,
        ),
    )
    raise typer.Exit(code)


@deploy_app.command("mqtt-auth")
def mqtt_auth(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="directory for passwd, acl and credentials")],
    registry: Annotated[
        Path | None, typer.Option(help="registry file (default: the configured one)")
    ] = None,
) -> None:
    """Write Mosquitto password + ACL files: one account per vendor, plus collector and rules."""
    from citypulse.cli import err, settings_of
    from citypulse.registry import RegistryError, load_registry
    from deploy.mqtt_auth import MqttAuthError, write_mqtt_auth

    path = registry or settings_of(ctx).registry
    try:
        files = write_mqtt_auth(load_registry(path), out)
    except RegistryError as exc:
        for problem in exc.problems:
            err.print(str(problem), markup=False, highlight=False)
        raise typer.Exit(1) from None
    except MqttAuthError as exc:
        err.print(str(exc), markup=False)
        raise typer.Exit(1) from None
    accounts = json.loads(files.credentials_json.read_text())
    typer.echo(f"{files.password_file}: {len(accounts)} accounts ({', '.join(accounts)})")
    typer.echo(f"{files.acl_file}")
    typer.echo(f"{files.credentials_json} (0600, secret)")
    for path_ in files.env_files.values():
        typer.echo(f"{path_} (0600, secret)")


@app.command("bench")
def bench(
    sensors: Annotated[int, typer.Option(help="sensors in the generated registry")] = 10_000,
    rules: Annotated[int, typer.Option(help="generated rules (plus the marker rule)")] = 200,
    duration: Annotated[
        float, typer.Option(help="seconds of each mode's ramp phase and of each latency phase")
    ] = 30.0,
    mode: Annotated[str, typer.Option(help="single | batch | senml | all")] = "all",
    collectors: Annotated[int, typer.Option(help="collector processes")] = 1,
    writers: Annotated[int, typer.Option(help="writer processes")] = 1,
    rule_workers: Annotated[int, typer.Option(help="rule worker processes")] = 1,
    publishers: Annotated[int, typer.Option(help="load generator processes")] = 3,
    out: Annotated[Path, typer.Option(help="where the JSON and PNG go")] = Path("bench-results"),
    quick: Annotated[bool, typer.Option(help="small sizes, a few seconds each (smoke test)")] = (
        False
    ),
    soak: Annotated[
        float,
        typer.Option(help="seconds at 50 % after the first mode, sampling RSS (memory); 0 = off"),
    ] = 0.0,
    soak_fill: Annotated[
        float | None,
        typer.Option(help="seconds at 50 % before the soak (windows fill); default: longest"),
    ] = None,
    group_interval: Annotated[
        float,
        typer.Option(
            help="evaluation interval of the cross-sensor rules, seconds; 0 = per reading"
        ),
    ] = 1.0,
    at_rate: Annotated[
        list[float] | None,
        typer.Option(
            help="an extra latency phase at this offered rate, readings/s (repeatable): "
            "latency at equal load across runs and code versions"
        ),
    ] = None,
) -> None:
    """End-to-end benchmark on the embedded stack: throughput, latency, CPU, raw ceilings."""
    from deploy.bench._cmd import run_bench_cmd

    raise typer.Exit(
        run_bench_cmd(
            sensors=sensors,
            rules=rules,
            duration=duration,
            mode=mode,
            collectors=collectors,
            writers=writers,
            rule_workers=rule_workers,
            publishers=publishers,
            out=out,
            quick=quick,
            soak_s=soak,
            soak_fill_s=soak_fill,
            group_interval_s=group_interval,
            at_rates=tuple(at_rate or ()),
        )
    )
