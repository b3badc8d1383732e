"""Least privilege in the database, beyond tests/storage: what each service role must not do."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from citypulse.settings import Settings
from storage import migrate

pytestmark = pytest.mark.integration


@pytest.fixture
async def conn(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    await migrate(settings.dsn)
    c = await asyncpg.connect(settings.dsn)
    await c.execute("INSERT INTO readings VALUES (now(), 's', 'm', 1, 0, now())")
    yield c
    await c.close()


@pytest.mark.parametrize(
    "sql",
    [
        "DROP TABLE readings",
        "TRUNCATE readings",
        "ALTER TABLE readings ADD COLUMN x int",
        "DROP TABLE schema_migrations",
        "DELETE FROM schema_migrations",
        "CREATE ROLE sneaky",
        "GRANT citypulse_writer TO citypulse_grafana",
    ],
)
async def test_writer_cannot_change_schema_or_roles(conn: asyncpg.Connection, sql: str) -> None:
    await conn.execute("SET ROLE citypulse_writer")
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(sql)
    finally:
        await conn.execute("RESET ROLE")


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO readings VALUES (now(), 's', 'n', 2, 0, now())",
        "UPDATE readings SET value = 0",
        "DELETE FROM readings",
        "TRUNCATE readings",
        "UPDATE sensors SET vendor = 'x'",
        "INSERT INTO readings_1m SELECT * FROM readings_1m",
        "DROP TABLE readings",
    ],
)
async def test_grafana_is_read_only(conn: asyncpg.Connection, sql: str) -> None:
    await conn.execute("SET ROLE citypulse_grafana")
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(sql)
        assert await conn.fetchval("SELECT count(*) FROM readings") == 1
    finally:
        await conn.execute("RESET ROLE")
