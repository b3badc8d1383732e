"""Versioned SQL migrations: ``storage/migrations/NNNN_name.sql``, applied in order.

Every file is applied once, in its own transaction, and recorded in ``schema_migrations`` with
the SHA-256 of its text. A session-level advisory lock serialises concurrent migrators (two
writers starting at once, or ``citypulse up`` racing a deploy job). Editing a file that was
already applied is an error (:class:`ChecksumMismatchError`): write a new migration instead.

A file may hold flavour sections, chosen once per run from ``pg_available_extensions``::

    -- @if timescaledb
    ...statements run when TimescaleDB is available...
    -- @else
    ...statements run on plain PostgreSQL...
    -- @end

The checksum covers the whole file, so it does not depend on the flavour chosen.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import asyncpg

from storage.errors import ChecksumMismatchError, MigrationError

log = logging.getLogger("citypulse.storage")

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
"""Where the migrations of every package live (storage 0001-0099, rules 0100-0199, ...)."""

ADVISORY_LOCK_KEY = 0x43_50_4D_49_47_52  # "CPMIGR": an arbitrary constant shared by migrators

_FILE = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql$")
_DIRECTIVE = re.compile(r"^\s*--\s*@(?P<word>if|else|end)\b\s*(?P<arg>\S*)\s*$")


class Flavour(StrEnum):
    """What the database offers; decides which flavour sections of a migration run."""

    PLAIN = "plain"
    TIMESCALEDB = "timescaledb"


@dataclass(frozen=True, slots=True)
class Migration:
    """One migration file.

    Attributes:
        version: the number in the file name (``0001`` → 1); unique.
        name: the rest of the file name, without ``.sql``.
        text: the whole file text.
        checksum: SHA-256 hex of ``text`` (UTF-8).
    """

    version: int
    name: str
    text: str
    checksum: str

    def sql(self, flavour: Flavour) -> str:
        """The statements to run on a database of ``flavour`` (flavour sections resolved)."""
        return select_flavour(self.text, flavour, f"{self.version:04d}_{self.name}.sql")


def select_flavour(text: str, flavour: Flavour, file: str = "<sql>") -> str:
    """Keep the lines of ``text`` that apply to ``flavour``; directive lines become blank.

    Line numbers are preserved, so PostgreSQL's error positions still point into the file.
    """
    out: list[str] = []
    section: bool | None = None  # None: outside any @if; else whether the branch is kept
    for lineno, line in enumerate(text.splitlines(), 1):
        m = _DIRECTIVE.match(line)
        if m is None:
            out.append(line if section is None or section else "")
            continue
        word, arg = m["word"], m["arg"]
        if word == "if":
            if section is not None:
                raise MigrationError(f"{file}:{lineno}: nested '-- @if' is not supported")
            try:
                wanted = Flavour(arg)
            except ValueError:
                raise MigrationError(f"{file}:{lineno}: unknown flavour {arg!r}") from None
            section = wanted is flavour
        elif word == "else":
            if section is None:
                raise MigrationError(f"{file}:{lineno}: '-- @else' outside '-- @if'")
            section = not section
        else:
            if section is None:
                raise MigrationError(f"{file}:{lineno}: '-- @end' outside '-- @if'")
            section = None
        out.append("")
    if section is not None:
        raise MigrationError(f"{file}: '-- @if' without '-- @end'")
    return "\n".join(out) + "\n"


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Every ``NNNN_name.sql`` of ``directory``, sorted by version; other files are ignored."""
    found: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        m = _FILE.match(path.name)
        if m is None:
            raise MigrationError(f"{path}: migration files are named NNNN_name.sql")
        text = path.read_text(encoding="utf-8")
        version = int(m["version"])
        if version in found:
            raise MigrationError(f"{path}: version {version:04d} is used twice")
        found[version] = Migration(
            version, m["name"], text, hashlib.sha256(text.encode()).hexdigest()
        )
        # Resolve the sections now so a malformed file fails before anything is applied.
        found[version].sql(Flavour.PLAIN)
    return [found[v] for v in sorted(found)]


@dataclass(frozen=True, slots=True)
class MigrateResult:
    """What :func:`migrate` did: the flavour it chose and the versions it applied now."""

    flavour: Flavour
    applied: tuple[int, ...]
    already: tuple[int, ...]


_BOOKKEEPING = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    flavour    text        NOT NULL
)
"""


async def detect_flavour(conn: asyncpg.Connection) -> Flavour:
    """TIMESCALEDB when the extension is installed in, or installable into, this database."""
    row = await conn.fetchval(
        "SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'"
        " UNION ALL SELECT 1 FROM pg_extension WHERE extname = 'timescaledb' LIMIT 1"
    )
    return Flavour.TIMESCALEDB if row else Flavour.PLAIN


async def migrate(
    dsn: str,
    directory: Path = MIGRATIONS_DIR,
    *,
    flavour: Flavour | None = None,
) -> MigrateResult:
    """Apply every migration of ``directory`` not yet applied to the database at ``dsn``.

    Args:
        dsn: PostgreSQL URL of a role that may create tables and roles (the owner, not a
            service role).
        directory: folder of ``NNNN_name.sql`` files.
        flavour: force a flavour instead of detecting it (tests, dry runs).

    Returns:
        The flavour used and which versions were applied now or before.

    Raises:
        ChecksumMismatchError: an applied file was edited since.
        MigrationError: a file is malformed or its SQL failed (that file is rolled back; the
            ones before it stay applied).
    """
    migrations = load_migrations(directory)
    conn: asyncpg.Connection = await asyncpg.connect(dsn)
    try:
        # Session lock (not xact): it must span every per-migration transaction below.
        await conn.execute("SELECT pg_advisory_lock($1)", ADVISORY_LOCK_KEY)
        try:
            return await _migrate_locked(conn, migrations, flavour)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", ADVISORY_LOCK_KEY)
    finally:
        await conn.close()


async def _migrate_locked(
    conn: asyncpg.Connection, migrations: list[Migration], flavour: Flavour | None
) -> MigrateResult:
    await conn.execute(_BOOKKEEPING)
    rows = await conn.fetch("SELECT version, name, checksum, flavour FROM schema_migrations")
    applied = {r["version"]: r for r in rows}
    # Check every applied file first: a mismatch must stop the run before anything changes.
    for mig in migrations:
        row = applied.get(mig.version)
        if row is not None and row["checksum"] != mig.checksum:
            raise ChecksumMismatchError(mig.version, mig.name, row["checksum"], mig.checksum)
    if flavour is None:
        # Once chosen, a database keeps its flavour: later files must match the earlier ones.
        earlier = {r["flavour"] for r in rows}
        flavour = Flavour(earlier.pop()) if len(earlier) == 1 else await detect_flavour(conn)
    done: list[int] = []
    for mig in migrations:
        if mig.version in applied:
            continue
        sql = mig.sql(flavour)
        try:
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum, flavour)"
                    " VALUES ($1, $2, $3, $4)",
                    mig.version,
                    mig.name,
                    mig.checksum,
                    flavour.value,
                )
        except asyncpg.PostgresError as exc:
            raise MigrationError(
                f"{mig.version:04d}_{mig.name}.sql failed ({flavour} flavour): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        log.info(
            "applied migration",
            extra={"version": mig.version, "migration": mig.name, "flavour": flavour.value},
        )
        done.append(mig.version)
    return MigrateResult(flavour, tuple(done), tuple(sorted(applied)))


async def applied_versions(conn: asyncpg.Connection) -> dict[int, str]:
    """Applied versions → checksum; empty when the database was never migrated."""
    exists = await conn.fetchval("SELECT to_regclass('public.schema_migrations') IS NOT NULL")
    if not exists:
        return {}
    rows = await conn.fetch("SELECT version, checksum FROM schema_migrations")
    return {r["version"]: r["checksum"] for r in rows}
