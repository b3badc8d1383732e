"""The rule directory as a versioned source: which files, their content hash, loading them.

Hot reload polls :meth:`RuleSource.fingerprint` (a hash of every file's name and bytes, so an
editor's save with an unchanged mtime is still seen, and a touch without change is not).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from citypulse.registry import Registry
from rules._load import MAINTENANCE_FILE, rule_files
from rules.runtime.maintenance import Maintenance, load_maintenance


@dataclass(frozen=True, slots=True)
class Loaded:
    """One consistent version of the rules directory."""

    ruleset: Any
    maintenance: Maintenance
    fingerprint: str


class RuleSource:
    """Rule files: every ``*.yaml``/``*.yml`` directly in ``path`` except ``maintenance.yaml``.

    Args:
        path: a rules directory, or a single rule file.
        registry: the sensor registry the rules select from.
    """

    def __init__(self, path: Path, registry: Registry) -> None:
        self.path = path
        self.registry = registry

    @property
    def maintenance_path(self) -> Path:
        base = self.path if self.path.is_dir() else self.path.parent
        return base / MAINTENANCE_FILE

    def rule_files(self) -> list[Path]:
        return rule_files(self.path)

    def fingerprint(self) -> str:
        """Content hash of every rule file and the maintenance file."""
        h = hashlib.sha256()
        for p in [*self.rule_files(), self.maintenance_path]:
            h.update(str(p).encode() + b"\0")
            try:
                h.update(p.read_bytes())
            except OSError:
                h.update(b"<missing>")
            h.update(b"\0")
        return h.hexdigest()

    def load(self) -> Loaded:
        """Load and validate everything.

        Raises:
            rules.RuleFileError: a rule file is invalid (``problems`` lists each, located).
            MaintenanceFileError: the maintenance file is invalid.
        """
        from rules import load_rules

        fingerprint = self.fingerprint()
        ruleset = load_rules(self.rule_files(), self.registry)
        maintenance = load_maintenance(self.maintenance_path, self.registry)
        return Loaded(ruleset, maintenance, fingerprint)
