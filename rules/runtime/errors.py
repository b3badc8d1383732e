"""Exceptions of the rule runtime: one base class, behaviour on the class."""

from __future__ import annotations

from collections.abc import Sequence

from citypulse.yamlsrc import Located, YamlSourceError


class RuntimeFault(Exception):
    """Base of every error raised by :mod:`rules.runtime`."""

    retriable = False


class MaintenanceFileError(YamlSourceError, RuntimeFault):
    """The maintenance-window file has problems; each is ``file:line:col: message``."""

    def __init__(self, problems: Sequence[Located]) -> None:
        YamlSourceError.__init__(self, problems)


class SinkError(RuntimeFault):
    """An effect could not be delivered to a sink (Kafka, PostgreSQL, MQTT)."""

    retriable = True


class AlertmanagerError(RuntimeFault):
    """Alertmanager refused or did not answer a POST of alerts."""

    retriable = True
