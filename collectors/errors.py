"""The collectors' exceptions: one base class, behaviour on the class."""

from __future__ import annotations


class CollectorError(Exception):
    """Base of every error raised by the collectors package."""
