"""Smoke test: `citypulse up --simulate` runs the whole pipeline and readings reach PostgreSQL."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from deploy.embedded import Postgres

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.integration
async def test_up_simulate_stores_readings(tmp_path: Path) -> None:
    """20 s of `up --simulate`: published readings are stored; the summary says so."""
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CITYPULSE_")}
    env.update({"CITYPULSE_STATE_DIR": str(state), "CITYPULSE_LOG_JSON": "false"})
    citypulse = Path(sys.executable).parent / "citypulse"
    out = subprocess.run(
        [str(citypulse), "up", "--simulate", "--duration", "20", "--speedup", "60"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    summary = dict(re.findall(r"│ (readings \w+|messages refused)\s*│ ([\d,]+|-)", out.stderr))
    published = int(summary["readings published"].replace(",", ""))
    # How many depends on the machine's speed; every sensor must have been heard from.
    assert published >= 72
    # `up` stopped its servers; start its PostgreSQL again on the same data to look inside.
    pg = Postgres(state)
    pg.start()
    try:
        conn = await asyncpg.connect(pg.url())
        try:
            stored = await conn.fetchval("SELECT count(*) FROM readings")
            sensors = await conn.fetchval("SELECT count(DISTINCT sensor_id) FROM readings")
        finally:
            await conn.close()
    finally:
        pg.stop()
    assert stored == published
    assert sensors == 72
    assert summary["readings stored"].replace(",", "") == str(stored)
