"""Storage: Kafka → PostgreSQL/TimescaleDB writer, migrations, registry load, tiers, roles.

Public API::

    from storage import Writer, migrate, load_registry_into, StorageError
"""

from storage._decode import DecodeError, decode_readings, decode_rejection
from storage.errors import ChecksumMismatchError, MigrationError, SchemaMissingError, StorageError
from storage.migrate import Flavour, MigrateResult, load_migrations, migrate
from storage.registry_db import RegistryLoadResult, load_registry_into
from storage.retention import Tier, apply_retention, tiers
from storage.rollups import RefreshResult, refresh_rollups
from storage.writer import GROUP_ID, Writer, WriteResult, write_rows

__all__ = [
    "GROUP_ID",
    "ChecksumMismatchError",
    "DecodeError",
    "Flavour",
    "MigrateResult",
    "MigrationError",
    "RefreshResult",
    "RegistryLoadResult",
    "SchemaMissingError",
    "StorageError",
    "Tier",
    "WriteResult",
    "Writer",
    "apply_retention",
    "decode_readings",
    "decode_rejection",
    "load_migrations",
    "load_registry_into",
    "migrate",
    "refresh_rollups",
    "tiers",
    "write_rows",
]
