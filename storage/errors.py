"""The storage package's exceptions: one base, behaviour on the class."""

from __future__ import annotations

from typing import TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

Conn: TypeAlias = asyncpg.Connection | PoolConnectionProxy
"""A connection, pooled or not (asyncpg gives proxies out of pools)."""


class StorageError(Exception):
    """Base of every error raised by the storage package."""

    retriable = False


class MigrationError(StorageError):
    """A migration file is malformed, failed, or differs from the version already applied."""


class ChecksumMismatchError(MigrationError):
    """An applied migration's file was edited afterwards: refuse to continue."""

    def __init__(self, version: int, name: str, applied: str, current: str) -> None:
        super().__init__(
            f"migration {version:04d}_{name} was changed after it was applied "
            f"(applied checksum {applied[:12]}, file now {current[:12]}); "
            "add a new migration instead of editing an applied one"
        )
        self.version = version
        self.applied = applied
        self.current = current


class SchemaMissingError(StorageError):
    """The database has not been migrated (run ``citypulse db migrate``)."""
