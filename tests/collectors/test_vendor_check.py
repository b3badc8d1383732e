"""`citypulse vendor check` gives vendors the collector's verdict offline."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
from typer.testing import CliRunner

from citypulse.cli import app

from .registry import REGISTRY_YAML


def _check(tmp_path: Path, payload: bytes, vendor: str, sensor: str) -> tuple[int, str]:
    registry = tmp_path / "registry.yaml"
    registry.write_text(REGISTRY_YAML)
    sample = tmp_path / "sample.json"
    sample.write_bytes(payload)
    result = CliRunner().invoke(
        app,
        ["vendor", "check", str(sample), "--vendor", vendor, "--sensor", sensor,
         "--registry", str(registry)],
        env={"COLUMNS": "200", "CITYPULSE_LOG_JSON": "false"},
    )  # fmt: skip
    return result.exit_code, result.output


def test_accepted_sample_lists_readings_with_quality(tmp_path: Path) -> None:
    """Exit 0 and each reading with its quality flag."""
    now = int(time.time() * 1000)
    payload = orjson.dumps({"ts": now, "values": {"pressure": 3.2, "flow": -1}})
    code, output = _check(tmp_path, payload, "aquasense", "wtr-0001")
    assert code == 0, output
    assert "accepted: 2 reading(s)" in output
    assert "out_of_range" in output
    assert "good" in output


def test_refused_sample_prints_reason_code_and_detail(tmp_path: Path) -> None:
    """Exit 1 with the stable reason code and the detail."""
    payload = orjson.dumps([{"n": "pressure", "u": "psi", "v": 40}])
    code, output = _check(tmp_path, payload, "aquasense", "wtr-0001")
    assert code == 1
    assert "refused: wrong_unit" in output
    assert "'psi'" in output
    assert "'bar'" in output
