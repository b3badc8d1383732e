"""The storage commands as an operator runs them: db migrate (twice), registry load."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from citypulse.settings import Settings

pytestmark = pytest.mark.integration
EXE = str(Path(sys.executable).parent / "citypulse")


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CITYPULSE_")}
    env.update(CITYPULSE_DATABASE_URL=settings.dsn, CITYPULSE_REGISTRY=str(settings.registry))
    return subprocess.run([EXE, *args], env=env, capture_output=True, text=True, timeout=60)


async def test_db_migrate_then_registry_load(storage_settings: Settings) -> None:
    """migrate applies, a second migrate is a no-op, registry load fills sensors; exit codes 0."""
    first = _cli(storage_settings, "db", "migrate")
    assert first.returncode == 0, first.stderr
    assert "applied: 0001, 0002, 0003, 0004" in first.stdout
    second = _cli(storage_settings, "db", "migrate")
    assert second.returncode == 0, second.stderr
    assert "none (up to date)" in second.stdout
    load = _cli(storage_settings, "registry", "load")
    assert load.returncode == 0, load.stderr
    assert "3 sensors, 4 metrics loaded; 0 retired" in load.stdout
    c = await asyncpg.connect(storage_settings.dsn)
    try:
        assert await c.fetchval("SELECT count(*) FROM sensors") == 3
    finally:
        await c.close()


def test_registry_load_reports_file_problems(storage_settings: Settings, tmp_path: Path) -> None:
    """A broken registry is refused with file:line:col and exit code 1; nothing is loaded."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("sensors:\n  - id: BAD ID\n")
    out = _cli(storage_settings, "registry", "load", "--registry", str(bad))
    assert out.returncode == 1
    assert f"{bad}:2:" in out.stderr
