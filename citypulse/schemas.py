"""JSON Schema files generated from the pydantic models (contract documents)."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from citypulse.events import AlertEvent, CommandEvent, ReadingBatch, Rejection
from citypulse.registry import Registry
from collectors.contract import SenMLPack, VendorPayload

SCHEMAS: dict[str, type[BaseModel]] = {
    "registry.schema.json": Registry,
    "kafka-readings.schema.json": ReadingBatch,
    "kafka-deadletter.schema.json": Rejection,
    "kafka-alerts.schema.json": AlertEvent,
    "kafka-commands.schema.json": CommandEvent,
    "vendor-payload.schema.json": VendorPayload,
    "vendor-senml.schema.json": SenMLPack,
}


def write_schemas(out: Path) -> list[Path]:
    """Write every schema in :data:`SCHEMAS` under ``out``; return the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, model in SCHEMAS.items():
        path = out / name
        path.write_text(json.dumps(model.model_json_schema(), indent=2) + "\n")
        written.append(path)
    return written
