"""Fixtures of the rule runtime's integration tests: a real Alertmanager, a migrated database,
a rules directory, and helpers to produce readings and read what the worker did."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from citypulse.settings import Settings
from deploy.embedded import die_with_parent, free_port

DATA = Path(__file__).parent / "data"
ALERTMANAGER = "/usr/bin/prometheus-alertmanager"


class Alertmanager:
    """A running Alertmanager; ``alerts()`` is its ``GET /api/v2/alerts``."""

    def __init__(self, url: str) -> None:
        self.url = url

    def alerts(self, **filters: str) -> list[dict[str, Any]]:
        query = "&".join(f"filter={k}%3D%22{v}%22" for k, v in filters.items())
        with urllib.request.urlopen(f"{self.url}/api/v2/alerts?{query}", timeout=5) as resp:
            out: list[dict[str, Any]] = json.loads(resp.read())
        return out


@pytest.fixture(scope="session")
def alertmanager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Alertmanager]:
    """A real Alertmanager on a free loopback port, for the whole session."""
    d = tmp_path_factory.mktemp("alertmanager")
    (d / "am.yml").write_text(
        "route:\n  receiver: blackhole\n  group_wait: 0s\nreceivers:\n  - name: blackhole\n"
    )
    port = free_port()
    log = (d / "am.log").open("wb")
    proc = subprocess.Popen(
        die_with_parent(
            [
                ALERTMANAGER,
                f"--config.file={d / 'am.yml'}",
                f"--storage.path={d / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--cluster.listen-address=",
            ]
        ),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"alertmanager did not start: {(d / 'am.log').read_text()}")
        time.sleep(0.1)
    yield Alertmanager(url)
    proc.terminate()
    proc.wait(10)
    log.close()


@pytest.fixture
def run_id() -> str:
    """A label unique to this test on every alert its rules raise (Alertmanager is shared)."""
    return f"r{uuid.uuid4().hex[:10]}"


@pytest.fixture
def rules_dir(tmp_path: Path, run_id: str) -> Path:
    """A rules directory holding the test rule file (no maintenance windows)."""
    d = tmp_path / "rules"
    d.mkdir()
    text = (DATA / "rules.yaml").read_text().replace("@RUN@", run_id)
    (d / "rules.yaml").write_text(text)
    return d


@pytest.fixture
async def rt_settings(
    settings_factory: Callable[..., Settings], rules_dir: Path, alertmanager: Alertmanager
) -> Settings:
    """Settings for one worker test: own topics and migrated database, test registry, rules,
    the session Alertmanager."""
    from storage.migrate import migrate

    s = settings_factory(
        registry=DATA / "registry.yaml",
        rules=rules_dir,
        alertmanager_url=alertmanager.url,
        partitions=2,
    )
    await migrate(s.dsn)
    return s
