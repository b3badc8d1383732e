"""JSON Schema files generated from the pydantic models (contract documents).

``citypulse schema`` writes them to ``schemas/``; a test keeps the committed files current.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from citypulse.events import AlertEvent, CommandEvent, ReadingBatch, Rejection
from citypulse.registry import Registry


def _generators() -> dict[str, Callable[[], dict[str, Any]]]:
    # Imported here: the packages that own these formats import citypulse themselves.
    from collectors.contract import SenMLPack, VendorPayload
    from rules._model import rules_json_schema

    return {
        "registry.schema.json": Registry.model_json_schema,
        "kafka-readings.schema.json": ReadingBatch.model_json_schema,
        "kafka-deadletter.schema.json": Rejection.model_json_schema,
        "kafka-alerts.schema.json": AlertEvent.model_json_schema,
        "kafka-commands.schema.json": CommandEvent.model_json_schema,
        "vendor-payload.schema.json": VendorPayload.model_json_schema,
        "vendor-senml.schema.json": SenMLPack.model_json_schema,
        "rules.schema.json": rules_json_schema,
    }


def schema_documents() -> dict[str, dict[str, Any]]:
    """Every published schema, by file name."""
    return {name: make() for name, make in _generators().items()}


def write_schemas(out: Path) -> list[Path]:
    """Write every schema under ``out``; return the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, doc in schema_documents().items():
        path = out / name
        path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        written.append(path)
    return written
