"""Retention of the storage tiers on plain PostgreSQL (TimescaleDB uses its own policies).

Deletes in chunks so no transaction holds many row locks or runs long next to the ingest.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from citypulse.settings import Settings
from storage.errors import Conn

CHUNK_ROWS = 20_000
"""Rows deleted per transaction."""


@dataclass(frozen=True, slots=True)
class Tier:
    """A table and how long its rows live.

    Attributes:
        table: table name (a constant of this module, never user input).
        column: the time column compared with the cut-off.
        keep: how long rows are kept, measured back from ``now``.
    """

    table: str
    column: str
    keep: timedelta


def tiers(settings: Settings) -> tuple[Tier, ...]:
    """The tiers and their retention from ``settings`` (``retention_*_days``)."""
    raw = timedelta(days=settings.retention_raw_days)
    return (
        Tier("readings", "ts", raw),
        Tier("rejections", "received_at", raw),
        Tier("readings_1m", "bucket", timedelta(days=settings.retention_1m_days)),
        Tier("readings_1h", "bucket", timedelta(days=settings.retention_1h_days)),
    )


async def apply_retention(conn: Conn, tiers: tuple[Tier, ...], now: datetime) -> dict[str, int]:
    """Delete rows older than each tier's retention; return rows deleted per table.

    Args:
        conn: connection of a role with DELETE on the tables (``citypulse_writer``).
        tiers: what to prune.
        now: the reference time (aware UTC); rows with time < ``now - keep`` go.
    """
    deleted: dict[str, int] = {}
    for tier in tiers:
        # Identifiers come from the constants above, never from input: safe to format.
        sql = (
            f"DELETE FROM {tier.table} WHERE ctid = ANY(ARRAY("  # noqa: S608
            f"SELECT ctid FROM {tier.table} WHERE {tier.column} < $1 LIMIT {CHUNK_ROWS}))"
        )
        cutoff = now - tier.keep
        total = 0
        while True:
            status = await conn.execute(sql, cutoff)
            n = int(status.split()[-1])
            total += n
            if n < CHUNK_ROWS:
                break
        deleted[tier.table] = total
    return deleted
