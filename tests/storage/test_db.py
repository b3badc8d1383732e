"""Migrations, registry load, roles, retention and the idempotent write, on real PostgreSQL."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from citypulse.registry import parse_registry
from citypulse.settings import Settings
from storage import (
    ChecksumMismatchError,
    Flavour,
    MigrationError,
    apply_retention,
    load_registry_into,
    migrate,
    refresh_rollups,
    tiers,
    write_rows,
)
from storage.migrate import MIGRATIONS_DIR, load_migrations
from storage.writer import _init_connection

from .conftest import REGISTRY_YAML, rollup_mismatches

pytestmark = pytest.mark.integration


async def test_migrate_applies_everything_once(storage_settings: Settings) -> None:
    """First run applies every file (plain flavour here); the second run is a no-op."""
    first = await migrate(storage_settings.dsn)
    assert first.flavour is Flavour.PLAIN
    assert first.applied == tuple(m.version for m in load_migrations())
    second = await migrate(storage_settings.dsn)
    assert second.applied == ()
    assert second.already == first.applied
    c = await asyncpg.connect(storage_settings.dsn)
    try:
        tables = {
            r["tablename"]
            for r in await c.fetch("SELECT tablename FROM pg_tables WHERE schemaname='public'")
        }
        assert {
            "sensors",
            "sensor_metrics",
            "readings",
            "readings_1m",
            "readings_1h",
            "rollup_state",
            "rollup_dirty",
            "sensor_status",
            "rejections",
            "schema_migrations",
        } <= tables
        rows = await c.fetch("SELECT version, checksum, flavour FROM schema_migrations")
        assert {r["flavour"] for r in rows} == {"plain"}
    finally:
        await c.close()


async def test_concurrent_migrators_do_not_race(storage_settings: Settings) -> None:
    """Three migrators at once: the advisory lock lets one apply, the others find it done."""
    import asyncio

    results = await asyncio.gather(*(migrate(storage_settings.dsn) for _ in range(3)))
    applied = [r.applied for r in results]
    assert sum(1 for a in applied if a) == 1


async def test_edited_applied_migration_is_refused(
    storage_settings: Settings, tmp_path: Path
) -> None:
    """Changing a file after it was applied stops the run; a new file is applied normally."""
    folder = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, folder)
    await migrate(storage_settings.dsn, folder)
    core = folder / "0001_core.sql"
    core.write_text(core.read_text() + "\n-- an innocent-looking edit\n")
    (folder / "0099_extra.sql").write_text("CREATE TABLE extra (x int);\n")
    with pytest.raises(ChecksumMismatchError, match="0001_core"):
        await migrate(storage_settings.dsn, folder)
    c = await asyncpg.connect(storage_settings.dsn)
    try:
        # Nothing after the mismatch ran.
        assert await c.fetchval("SELECT to_regclass('public.extra')") is None
    finally:
        await c.close()


async def test_failing_migration_rolls_back_only_itself(
    storage_settings: Settings, tmp_path: Path
) -> None:
    """A broken file is reported by name and leaves no half-applied state behind."""
    folder = tmp_path / "migrations"
    folder.mkdir()
    (folder / "0001_ok.sql").write_text("CREATE TABLE ok (x int);\n")
    (folder / "0002_bad.sql").write_text("CREATE TABLE half (x int);\nSELECT nonsense FROM;\n")
    with pytest.raises(MigrationError, match="0002_bad"):
        await migrate(storage_settings.dsn, folder)
    c = await asyncpg.connect(storage_settings.dsn)
    try:
        assert await c.fetchval("SELECT to_regclass('public.ok')") is not None
        assert await c.fetchval("SELECT to_regclass('public.half')") is None
        assert await c.fetchval("SELECT array_agg(version) FROM schema_migrations") == [1]
    finally:
        await c.close()


async def test_registry_load_upserts_and_retires(conn: asyncpg.Connection) -> None:
    """Load twice is stable; a sensor dropped from the file is retired, not deleted."""
    reg = parse_registry(REGISTRY_YAML)
    first = await load_registry_into(conn, reg)
    assert (first.sensors, first.metrics, first.retired) == (3, 4, 0)
    row = await conn.fetchrow("SELECT * FROM sensors WHERE id = 'air-harbour-001'")
    assert row["silo"] == "air"
    assert row["district"] == "harbour"
    assert row["interval_s"] == 30
    assert row["labels"] == '{"height": "street"}'
    assert row["retired_at"] is None
    metric = await conn.fetchrow(
        "SELECT * FROM sensor_metrics WHERE sensor_id='wtr-north-001' AND metric='flow'"
    )
    assert (metric["unit"], metric["min"], metric["max"]) == ("m3/h", 0, 500)

    smaller = reg.model_copy(update={"sensors": [s for s in reg if s.id != "wtr-north-002"]})
    second = await load_registry_into(conn, smaller)
    assert second.retired == 1
    retired = await conn.fetchrow("SELECT retired_at FROM sensors WHERE id = 'wtr-north-002'")
    assert retired is not None
    assert retired["retired_at"] is not None
    # It comes back when listed again.
    third = await load_registry_into(conn, reg)
    assert third.retired == 0
    assert await conn.fetchval("SELECT count(*) FROM sensors WHERE retired_at IS NULL") == 3


async def test_write_is_idempotent_and_rollups_match_raw(conn: asyncpg.Connection) -> None:
    """Rows written twice (and duplicated inside a batch) are stored and rolled up once."""
    await _init_connection(conn)
    t0 = 1_767_225_600_000
    rows = [(t0 + i * 20_000, "s1", "p", float(i), 1 if i == 5 else 0, t0) for i in range(400)]
    first = await write_rows(conn, Flavour.PLAIN, rows + rows[:3], [])
    assert (first.readings, first.inserted, first.checked) == (403, 400, True)
    again = await write_rows(
        conn, Flavour.PLAIN, [*rows[100:200], (t0 - 1, "s1", "p", 7.0, 0, t0)], []
    )
    assert (again.inserted, again.checked) == (1, True)
    assert await conn.fetchval("SELECT count(*) FROM readings") == 401
    # 2026-01-01 is long closed: the readings are late, flagged once per minute, and the
    # rollups catch up at the next refresh.
    assert await conn.fetchval("SELECT count(*) FROM rollup_dirty") == 135
    assert (await refresh_rollups(conn)).late == 135
    assert await rollup_mismatches(conn) == {"readings_1m": 0, "readings_1h": 0}
    # The bad-quality reading is stored raw but not averaged.
    assert await conn.fetchval("SELECT sum(count) FROM readings_1h") == 400
    status = await conn.fetchrow("SELECT * FROM sensor_status WHERE sensor_id = 's1'")
    assert status["readings"] == 401
    assert status["last_ts"] == datetime.fromtimestamp((t0 + 399 * 20_000) / 1000, UTC)


async def test_a_failed_plain_insert_leaves_nothing_behind(conn: asyncpg.Connection) -> None:
    """A batch of new readings takes the plain insert; one that also holds a stored reading
    fails it, goes the checked way, and counts its new readings once: the failed attempt's
    rows, status counts and late-minute markers are all undone."""
    await _init_connection(conn)
    t0 = 1_767_225_600_000
    rows = [(t0 + i * 20_000, f"s{i % 4}", "p", float(i), 0, t0) for i in range(200)]
    clean = await write_rows(conn, Flavour.PLAIN, rows[:100], [])
    assert (clean.inserted, clean.checked) == (100, False)
    mixed = await write_rows(conn, Flavour.PLAIN, rows[99:], [])
    assert (mixed.readings, mixed.inserted, mixed.checked) == (101, 100, True)
    forced = await write_rows(
        conn, Flavour.PLAIN, [(t0 - 1, "s9", "p", 1.0, 0, t0)], [], checked=True
    )
    assert (forced.inserted, forced.checked) == (1, True)
    assert await conn.fetchval("SELECT count(*) FROM readings") == 201
    assert await conn.fetchval("SELECT sum(readings) FROM sensor_status") == 201
    assert (await refresh_rollups(conn)).late == 201  # each its own (sensor, minute), all late
    assert await conn.fetchval("SELECT sum(count) FROM readings_1m") == 201


async def test_rows_updated_on_every_batch_are_updated_in_place(conn: asyncpg.Connection) -> None:
    """Writing the same 3,000 sensors batch after batch updates ``sensor_status``, and folding
    each batch's stretch updates the rollups, as HOT updates (no index touched, no row moved
    to a new page) for most rows: the upserts stay cheap as the tables fill their pages."""
    await _init_connection(conn)
    done = await conn.fetchval("SELECT done_at FROM rollup_state")
    # The next minute boundary: every batch lands in the same buckets.
    t0 = (int(done.timestamp()) // 60 + 1) * 60_000
    sensors = [f"s{i:04d}" for i in range(3000)]
    for k in range(6):
        # Like the writer's batches: each holds a slice of the city, spread over the pages.
        for part in range(6):
            rows = [(t0 + k * 1000, s, "p", 1.0, 0, t0) for s in sensors[part::6]]
            await write_rows(conn, Flavour.PLAIN, rows, [])
        now = datetime.fromtimestamp((t0 + k * 1000 + 1000) / 1000, UTC)
        assert (await refresh_rollups(conn, now, settle=timedelta(0))).folded == 3000
    await conn.execute("SELECT pg_stat_force_next_flush()")
    stats = {
        r["relname"]: (r["n_tup_upd"], r["n_tup_hot_upd"])
        for r in await conn.fetch(
            "SELECT relname, n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables "
            "WHERE relname IN ('sensor_status', 'readings_1m', 'readings_1h')"
        )
    }
    assert set(stats) == {"sensor_status", "readings_1m", "readings_1h"}
    # Without room in the pages (fillfactor 100) about 1 in 7 updates of readings_1m is HOT.
    hot_share = {t: hot / updated for t, (updated, hot) in stats.items()}
    assert all(updated == 5 * 3000 for updated, _ in stats.values()), stats
    assert min(hot_share.values()) >= 0.75, hot_share


async def test_roles_are_least_privilege(conn: asyncpg.Connection) -> None:
    """The writer can't drop or alter tables; Grafana can only read; the rules worker can't
    write readings."""
    await conn.execute("SET ROLE citypulse_writer")
    await conn.execute("INSERT INTO readings VALUES (now(), 's', 'm', 1, 0, now())")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await conn.execute("DROP TABLE readings")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await conn.execute("CREATE TABLE sneaky (x int)")
    await conn.execute("RESET ROLE")

    await conn.execute("SET ROLE citypulse_grafana")
    assert await conn.fetchval("SELECT count(*) FROM readings") == 1
    assert await conn.fetchval("SELECT count(*) FROM readings_1h") == 0
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await conn.execute("INSERT INTO readings VALUES (now(), 's', 'm', 2, 0, now())")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await conn.execute("DELETE FROM readings")
    await conn.execute("RESET ROLE")

    await conn.execute("SET ROLE citypulse_rules")
    assert await conn.fetchval("SELECT count(*) FROM sensors") == 0
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await conn.execute("INSERT INTO readings VALUES (now(), 's', 'm', 3, 0, now())")
    await conn.execute("RESET ROLE")
    login = await conn.fetchval(
        "SELECT bool_or(rolcanlogin) FROM pg_roles WHERE rolname LIKE 'citypulse\\_%'"
    )
    assert login is False


async def test_retention_deletes_only_expired_rows(
    conn: asyncpg.Connection, migrated: Settings
) -> None:
    """Each tier keeps its own horizon: 40-day-old raw rows go, 40-day-old 1m buckets stay."""
    now = datetime(2026, 6, 1, tzinfo=UTC)
    await conn.execute("SET ROLE citypulse_writer")  # the writer's own privileges suffice
    old, new = now - timedelta(days=40), now - timedelta(days=1)
    for ts in (old, new):
        await conn.execute("INSERT INTO readings VALUES ($1, 's', 'm', 1, 0, $1)", ts)
        await conn.execute("INSERT INTO readings_1m VALUES ($1, 's', 'm', 1, 1, 1, 1, 1)", ts)
    await conn.execute(
        "INSERT INTO readings_1m VALUES ($1, 's', 'm', 1, 1, 1, 1, 1)", now - timedelta(days=200)
    )
    deleted = await apply_retention(conn, tiers(migrated), now)
    assert deleted == {"readings": 1, "rejections": 0, "readings_1m": 1, "readings_1h": 0}
    assert await conn.fetchval("SELECT min(ts) FROM readings") == new
    assert await conn.fetchval("SELECT min(bucket) FROM readings_1m") == old
