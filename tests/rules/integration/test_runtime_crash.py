"""A worker killed mid-stream (SIGKILL) and restarted: every alert is recorded exactly once."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from citypulse.events import AlertEvent, ReadingBatch
from citypulse.registry import load_registry
from citypulse.settings import Settings
from rules import RuleEngine
from rules.runtime import RuleSource

from .conftest import DATA
from .helpers import alert_rows, batch, eventually, produce

pytestmark = pytest.mark.integration

CLI = Path(sys.executable).parent / "citypulse"


def _env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    for name in (
        "mqtt_url",
        "kafka_bootstrap",
        "topic_prefix",
        "partitions",
        "registry",
        "rules",
        "alertmanager_url",
        "state_dir",
    ):
        env[f"CITYPULSE_{name.upper()}"] = str(getattr(settings, name))
    env["CITYPULSE_DATABASE_URL"] = settings.dsn
    env["CITYPULSE_LOG_JSON"] = "false"
    return env


def _start(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            [
                str(CLI),
                "rules",
                "run",
                "--tick-s",
                "0",
                "--checkpoint-s",
                "1",
                "--checkpoint-records",
                "40",
                "--reload-poll-s",
                "0",
                "--session-timeout-ms",
                "3000",
            ],
            env=_env(settings),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def _log_has(log: Path, text: str) -> bool:
    return text in log.read_text()


def _stream(t0: int) -> list[ReadingBatch]:
    # Each sensor toggles between low (fires) and high (resolves) every 4 readings; the
    # district average never drops below 1.5, so only per-sensor alerts are raised.
    out = []
    for i in range(40):
        value = 1.8 if (i // 4) % 2 == 0 else 3.0
        for n, sensor in enumerate(("wtr-0001", "wtr-0002", "wtr-0003")):
            out.append(batch(sensor, t0 + i * 1000 + n, pressure=value))
    return out


def _expected(
    settings: Settings,
    batches: list[ReadingBatch],
    rule: str = "WaterLowPressure",
    label: str = "sensor",
) -> set[tuple[str, str, int]]:
    """The alerts of ``rule`` one engine raises over the whole stream, run in-process."""
    registry = load_registry(DATA / "registry.yaml")
    engine = RuleEngine(RuleSource(settings.rules, registry).load().ruleset, registry)
    out = set()
    for b in batches:
        for e in engine.process(b, scope="all"):
            if isinstance(e, AlertEvent) and e.rule == rule and e.state in ("firing", "resolved"):
                out.add((e.labels[label], str(e.state), e.ts_ms))
    return out


def _recorded(rows: list[dict[str, Any]], rule: str, label: str) -> list[tuple[str, str, int]]:
    return [
        (r["labels"][label], r["state"], round(r["ts"].timestamp() * 1000))
        for r in rows
        if r["rule"] == rule and r["state"] in ("firing", "resolved")
    ]


async def _kill_midway_and_restart(
    settings: Settings,
    log: Path,
    batches: list[ReadingBatch],
    recorded: Callable[[list[dict[str, Any]]], list[tuple[str, str, int]]],
    expected: set[tuple[str, str, int]],
    procs: list[subprocess.Popen[bytes]],
) -> None:
    """Start a worker, produce the first 60 batches, SIGKILL it as soon as it has recorded one
    of the alerts (work since its last checkpoint is lost and will be replayed), produce the
    rest, start it again (``procs[-1]``); then every expected alert is recorded exactly once."""
    procs.append(_start(settings, log))
    await produce(settings, *batches[:60])
    await eventually(lambda: alert_rows(settings), lambda rows: bool(recorded(rows)), 30)
    procs[-1].send_signal(signal.SIGKILL)
    procs[-1].wait(10)
    await produce(settings, *batches[60:])
    procs.append(_start(settings, log))
    await eventually(
        lambda: alert_rows(settings),
        lambda rows: set(recorded(rows)) >= expected,
        timeout_s=60,
    )
    await asyncio.sleep(1.5)  # a duplicate would arrive now
    rows = recorded(await alert_rows(settings))
    assert sorted(rows) == sorted(expected), log.read_text()[-3000:]


def _stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


async def test_sigkill_and_restart_records_each_alert_once(
    rt_settings: Settings, tmp_path: Path
) -> None:
    """Kill -9 a worker mid-stream, restart it: recorded alerts equal the expected ones,
    none missing, none twice."""
    import time

    batches = _stream(time.time_ns() // 1_000_000 - 600_000)
    expected = _expected(rt_settings, batches)
    assert len(expected) == 3 * 10  # 5 low phases per sensor: 5 firing + 5 resolved

    def recorded(rows: list[dict[str, Any]]) -> list[tuple[str, str, int]]:
        return _recorded(rows, "WaterLowPressure", "sensor")

    log = tmp_path / "worker.log"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        await _kill_midway_and_restart(rt_settings, log, batches, recorded, expected, procs)
        proc = procs[-1]

        # SIGHUP (the only reload trigger here) applies an edited rule: 3.0 bar is now low.
        rules_file = rt_settings.rules / "rules.yaml"
        rules_file.write_text(rules_file.read_text().replace("pressure < 2.0", "pressure < 3.5"))
        proc.send_signal(signal.SIGHUP)
        await eventually(lambda: _log_has(log, "rules reloaded"), bool, timeout_s=10)
        await produce(
            rt_settings, batch("wtr-0001", batches[-1].readings[0].ts_ms + 5000, pressure=3.0)
        )
        await eventually(
            lambda: alert_rows(rt_settings), lambda rows: len(recorded(rows)) == len(expected) + 1
        )

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-3000:]
    finally:
        _stop_all(procs)


async def test_sigkill_replays_group_input_once(rt_settings: Settings, tmp_path: Path) -> None:
    """Kill -9 a worker while the group stage works through re-keyed batches, restart it: the
    sensor stage re-sends what its snapshot does not cover (chunked into re-key records
    differently than the first time), the group stage resumes from its own snapshot, and the
    district alerts recorded equal the ones an uninterrupted engine raises, none missing, none
    twice."""
    import time

    settings = rt_settings.model_copy(update={"partitions": 1})  # one order, as in-process
    t0 = time.time_ns() // 1_000_000 - 600_000
    batches = []
    for i in range(40):
        # North (wtr-0001, wtr-0002) averages 1.0 bar, then 3.0, every 4 readings; south never
        # drops: DistrictLowPressure fires and resolves for north only.
        low = (i // 4) % 2 == 0
        for n, sensor in enumerate(("wtr-0001", "wtr-0002", "wtr-0003")):
            value = 1.0 if low and sensor != "wtr-0003" else 3.0
            batches.append(batch(sensor, t0 + i * 1000 + n, pressure=value))
    expected = _expected(settings, batches, "DistrictLowPressure", "district")
    assert len(expected) == 10  # 5 firing + 5 resolved, district north

    def recorded(rows: list[dict[str, Any]]) -> list[tuple[str, str, int]]:
        return _recorded(rows, "DistrictLowPressure", "district")

    log = tmp_path / "worker.log"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        await _kill_midway_and_restart(settings, log, batches, recorded, expected, procs)
        procs[-1].send_signal(signal.SIGTERM)
        assert procs[-1].wait(30) == 0, log.read_text()[-3000:]
    finally:
        _stop_all(procs)
