"""The published JSON Schemas of the vendor payloads agree with the parser and are current."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest
from pydantic import ValidationError

from citypulse.schemas import schema_documents
from collectors.contract import SenMLPack, VendorPayload
from collectors.payload import PayloadError, parse_payload

ROOT = Path(__file__).resolve().parents[2]
NOW_MS = 1_700_000_000_000


@pytest.mark.parametrize("name", sorted(schema_documents()))
def test_committed_schema_files_are_current(name: str) -> None:
    """schemas/*.json is what `citypulse schema` generates today (regenerate if this fails)."""
    committed = json.loads((ROOT / "schemas" / name).read_text())
    assert committed == schema_documents()[name]


GOOD_JSON = [
    {"ts": "2023-11-14T22:13:20Z", "values": {"pressure": 3.2}},
    {"ts": NOW_MS, "values": {"pressure": 3, "flow": 1.5}},
    [{"ts": NOW_MS, "values": {"pressure": 3}}, {"ts": NOW_MS - 1, "values": {"flow": 1}}],
]
BAD_JSON = [
    {"ts": NOW_MS},
    {"ts": NOW_MS, "values": {}},
    {"ts": "2023-11-14T22:13:20", "values": {"pressure": 1}},
    {"ts": NOW_MS, "values": {"pressure": 1}, "extra": 1},
    [],
]


@pytest.mark.parametrize("payload", GOOD_JSON)
def test_good_json_passes_schema_and_parser(payload: object) -> None:
    """What the schema allows, the parser accepts."""
    raw = orjson.dumps(payload)
    VendorPayload.model_validate_json(raw)
    assert parse_payload(raw, NOW_MS)


@pytest.mark.parametrize("payload", BAD_JSON)
def test_bad_json_fails_schema_and_parser(payload: object) -> None:
    """What the schema forbids, the parser refuses."""
    raw = orjson.dumps(payload)
    with pytest.raises(ValidationError):
        VendorPayload.model_validate_json(raw)
    with pytest.raises(PayloadError):
        parse_payload(raw, NOW_MS)


def test_senml_examples_pass_the_senml_schema() -> None:
    """A typical SenML pack validates against the published SenML schema."""
    pack = [{"bn": "wtr-0001/", "bt": 1.7e9, "bu": "bar"}, {"n": "pressure", "t": -60, "v": 3.1}]
    SenMLPack.model_validate(pack)
    assert len(parse_payload(orjson.dumps(pack), NOW_MS)) == 1
