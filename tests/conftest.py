"""Session-scoped real servers on free loopback ports, and per-test isolation.

The embedded stack (Mosquitto, tansu, PostgreSQL) starts once per test session. Each test that
asks for ``settings`` gets its own Kafka topic prefix and its own fresh database, so tests
never see each other's data. A missing server is a failure, never a skip.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from citypulse.settings import Settings
from deploy.embedded import EmbeddedStack

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStack]:
    """Mosquitto + tansu + PostgreSQL, started once, stopped after the session."""
    s = EmbeddedStack(tmp_path_factory.mktemp("stack"))
    s.start()
    yield s
    s.stop()


def _psql(stack: EmbeddedStack, sql: str) -> None:
    out = stack.postgres.psql(sql)
    if out.returncode != 0:
        server_log = stack.postgres.log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"psql {sql!r} failed: {out.stderr}\n--- server log ---\n{server_log}")


@pytest.fixture
def database_factory(stack: EmbeddedStack) -> Iterator[Callable[[], str]]:
    """Make fresh, empty databases; each is dropped after the test. Returns their URLs."""
    made: list[str] = []

    def make() -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        _psql(stack, f"CREATE DATABASE {name}")
        made.append(name)
        return stack.postgres.url(name)

    yield make
    for name in made:
        _psql(stack, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def settings_factory(
    stack: EmbeddedStack, database_factory: Callable[[], str], tmp_path: Path
) -> Callable[..., Settings]:
    """Settings pointing at the stack, with a unique topic prefix and a fresh database."""

    def make(**overrides: object) -> Settings:
        values: dict[str, object] = {
            "mqtt_url": stack.mosquitto.url,
            "kafka_bootstrap": stack.tansu.bootstrap,
            "database_url": database_factory(),
            "topic_prefix": f"t{uuid.uuid4().hex[:10]}",
            "partitions": 3,
            "state_dir": tmp_path / "state",
            "mqtt_shared_group": f"g{uuid.uuid4().hex[:8]}",
            "registry": ROOT / "deploy" / "registry.example.yaml",
            "log_json": False,
        }
        values.update(overrides)
        return Settings(**values)  # type: ignore[arg-type]

    return make


@pytest.fixture
def settings(settings_factory: Callable[..., Settings]) -> Settings:
    return settings_factory()
