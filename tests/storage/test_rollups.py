"""Rollups on plain PostgreSQL (storage/rollups.py): new readings folded once per stretch,
late readings recomputed, and a refresh that waits for writes in flight or dies midway loses
nothing. Everything runs as ``citypulse_writer``, with the writer's grants."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import asyncpg
import pytest

from citypulse.settings import Settings
from storage import Flavour, refresh_rollups, rollups, write_rows
from storage.writer import _init_connection

from .conftest import rollup_mismatches

pytestmark = pytest.mark.integration

SETTLE = rollups.SETTLE
AGREE = {"readings_1m": 0, "readings_1h": 0}


async def _writer_conn(dsn: str) -> asyncpg.Connection:
    c = await asyncpg.connect(dsn)
    await c.execute("SET ROLE citypulse_writer")
    await _init_connection(c)  # temp tables owned by the writer role
    return c


@pytest.fixture
async def wconn(migrated: Settings) -> AsyncIterator[asyncpg.Connection]:
    c = await _writer_conn(migrated.dsn)
    yield c
    await c.close()


def _ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


def _rows(start: datetime, minutes: int, sensors: int = 3, every_s: int = 15) -> list[tuple]:
    """Readings every ``every_s`` for ``minutes`` from ``start``; every 7th of bad quality."""
    out = []
    for k in range(minutes * 60 // every_s):
        t = _ms(start) + k * every_s * 1000
        for s in range(sensors):
            out.append((t, f"s{s}", "p", float(k * 10 + s), 1 if k % 7 == 3 else 0, t))
    return out


async def _done(c: asyncpg.Connection) -> datetime:
    return await c.fetchval("SELECT done_at FROM rollup_state")  # type: ignore[no-any-return]


async def _count(c: asyncpg.Connection, sql: str, *args: object) -> int:
    return int(await c.fetchval(sql, *args))


async def test_new_readings_are_folded_once_stretch_by_stretch(
    wconn: asyncpg.Connection,
) -> None:
    """Each refresh adds the readings of ``[done_at, now - settle)`` to both tiers, also
    minutes and hours split between two stretches; a repeated refresh adds nothing."""
    d0 = await _done(wconn)
    await write_rows(wconn, Flavour.PLAIN, _rows(d0, 5), [])
    assert await _count(wconn, "SELECT count(*) FROM readings_1m") == 0  # not folded yet
    assert await _count(wconn, "SELECT count(*) FROM rollup_dirty") == 0  # and not late

    for after in (timedelta(seconds=40), timedelta(seconds=100), timedelta(minutes=3)):
        done = await refresh_rollups(wconn, d0 + after + SETTLE)
        assert done.done_at == (d0 + after).replace(microsecond=0)
        assert done.folded > 0
        assert await rollup_mismatches(wconn, before=done.done_at) == AGREE
    again = await refresh_rollups(wconn, d0 + timedelta(minutes=3) + SETTLE)
    assert (again.done_at, again.folded) == (done.done_at, 0)

    # Two hours on, catching up a stretch of at most max_span per refresh.
    hour = timedelta(hours=1)
    later = await refresh_rollups(wconn, d0 + 2 * hour, max_span=hour)
    assert later.done_at == done.done_at + hour
    later = await refresh_rollups(wconn, d0 + 2 * hour, max_span=hour)
    assert later.done_at == (d0 + 2 * hour - SETTLE).replace(microsecond=0)
    assert await rollup_mismatches(wconn) == AGREE
    assert await _count(wconn, "SELECT sum(count) FROM readings_1h") == await _count(
        wconn, "SELECT count(*) FROM readings WHERE quality = 0"
    )


async def test_late_readings_are_flagged_and_their_minutes_recomputed(
    wconn: asyncpg.Connection,
) -> None:
    """Readings behind the fold leave one marker per (sensor, metric, minute); a redelivered
    reading leaves none; the next refresh makes minute and hour rows exact."""
    d0 = await _done(wconn)
    first = _rows(d0, 4, every_s=30)
    await write_rows(wconn, Flavour.PLAIN, first, [])
    done = await refresh_rollups(wconn, d0 + timedelta(minutes=4) + SETTLE)

    late = _rows(d0 + timedelta(seconds=10), 2, sensors=2, every_s=30)
    result = await write_rows(wconn, Flavour.PLAIN, [*late, *first], [])
    assert (result.readings, result.inserted) == (len(late) + len(first), len(late))
    minutes = {(s, t // 60_000) for t, s, _, _, q, _ in late if q == 0}
    assert await _count(wconn, "SELECT count(*) FROM rollup_dirty") == len(minutes)
    # Until the refresher runs, the rollups don't count the late readings yet.
    assert (await rollup_mismatches(wconn, before=done.done_at))["readings_1m"] > 0

    again = await refresh_rollups(wconn, d0 + timedelta(minutes=4) + SETTLE)
    assert again.late == len(minutes)
    assert await rollup_mismatches(wconn, before=again.done_at) == AGREE
    assert await _count(wconn, "SELECT count(*) FROM rollup_dirty") == 0


async def test_moving_the_mark_waits_for_writes_in_flight(migrated: Settings) -> None:
    """A write that began before its stretch was folded commits before the fold reads the
    stretch: its readings are counted, not skipped as neither new nor late."""
    writer = await _writer_conn(migrated.dsn)
    refresher = await _writer_conn(migrated.dsn)
    try:
        d0 = await _done(writer)
        tx = writer.transaction()
        await tx.start()
        await write_rows(writer, Flavour.PLAIN, _rows(d0, 1), [])  # not committed yet
        now = d0 + timedelta(minutes=1) + SETTLE
        refresh = asyncio.create_task(refresh_rollups(refresher, now))
        await asyncio.sleep(0.5)
        assert not refresh.done()  # waiting for the write's shared lock
        await tx.commit()
        done = await asyncio.wait_for(refresh, 10)
        assert done.done_at == (d0 + timedelta(minutes=1)).replace(microsecond=0)
        assert await _count(refresher, "SELECT sum(count) FROM readings_1m") == await _count(
            refresher, "SELECT count(*) FROM readings WHERE quality = 0 AND ts < $1", done.done_at
        )
        assert await _count(refresher, "SELECT count(*) FROM rollup_dirty") == 0
        assert await rollup_mismatches(refresher, before=done.done_at) == AGREE
    finally:
        await writer.close()
        await refresher.close()


async def test_a_refresh_cut_midway_leaves_nothing_half_done(migrated: Settings) -> None:
    """The refresher's connection dies mid-refresh (after claiming the late markers): nothing
    of it stays; the next refresh does the whole work."""
    setup = await _writer_conn(migrated.dsn)
    owner = await asyncpg.connect(migrated.dsn)
    try:
        d0 = await _done(setup)
        await write_rows(setup, Flavour.PLAIN, _rows(d0, 3), [])
        await refresh_rollups(setup, d0 + timedelta(minutes=1) + SETTLE)
        late = _rows(d0 + timedelta(seconds=5), 1, every_s=60)  # one per sensor, late
        await write_rows(setup, Flavour.PLAIN, late, [])
        dirty = "SELECT count(*) FROM rollup_dirty"
        before = (await _done(setup), await _count(setup, dirty))
        assert before[1] == 3

        doomed = await _writer_conn(migrated.dsn)
        pid = doomed.get_server_pid()
        async with owner.transaction():
            await owner.execute("LOCK TABLE readings_1m IN EXCLUSIVE MODE")
            refresh = asyncio.create_task(
                refresh_rollups(doomed, d0 + timedelta(minutes=3) + SETTLE)
            )
            for _ in range(100):  # until it waits on the table, markers claimed
                waiting = await owner.fetchval(
                    "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid
                )
                if waiting:
                    break
                await asyncio.sleep(0.05)
            assert waiting
            await owner.fetchval("SELECT pg_terminate_backend($1)", pid)
            with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
                await asyncio.wait_for(refresh, 10)
        # The mark moved (its own transaction, already committed); the rest rolled back.
        assert (await _done(setup), await _count(setup, dirty)) == before
        done = await refresh_rollups(setup, d0 + timedelta(minutes=3) + SETTLE)
        assert (done.done_at, done.late) == ((d0 + timedelta(minutes=3)).replace(microsecond=0), 3)
        assert await rollup_mismatches(setup, before=done.done_at) == AGREE
    finally:
        await setup.close()
        await owner.close()


async def test_a_minute_whose_raw_rows_were_pruned_is_never_shrunk(
    wconn: asyncpg.Connection,
) -> None:
    """Recomputing a minute from raw rows that retention already deleted would undercount it:
    the row that counts more readings stays."""
    d0 = await _done(wconn)
    old = (d0 - timedelta(days=40)).replace(second=0, microsecond=0)
    await wconn.execute("INSERT INTO readings_1m VALUES ($1, 's0', 'p', 5, 1, 9, 5, 25)", old)
    await write_rows(wconn, Flavour.PLAIN, [(_ms(old) + 1000, "s0", "p", 3.0, 0, _ms(d0))], [])
    assert (await refresh_rollups(wconn, d0)).late == 1
    row = await wconn.fetchrow("SELECT count, sum FROM readings_1m WHERE bucket = $1", old)
    assert (row["count"], row["sum"]) == (5, 25)
