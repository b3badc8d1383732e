"""The vendor payload formats as pydantic models: the source of the published JSON Schemas.

The collector does not validate with these models (the hot path parses with orjson, see
:mod:`collectors.payload`); they document the contract and generate
``schemas/vendor-payload.schema.json`` and ``schemas/vendor-senml.schema.json``. Keep them in
step with the parser; ``tests/collectors/test_contract.py`` checks the examples both ways.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, RootModel


class VendorMessage(BaseModel):
    """One instant of one sensor: event time and a value per metric."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"ts": "2025-05-01T12:00:00Z", "values": {"pressure": 3.2, "flow": 10}}]
        },
    )

    ts: AwareDatetime | Annotated[int, Field(ge=0)] = Field(
        description="event time: RFC 3339 date-time with an offset (e.g. 'Z'), or epoch "
        "milliseconds (UTC)"
    )
    values: dict[str, float] = Field(
        min_length=1,
        description="metric name (as registered for the sensor) -> finite number, in the "
        "registry's unit for that metric",
    )


class VendorPayload(RootModel[VendorMessage | Annotated[list[VendorMessage], Field(min_length=1)]]):
    """The citypulse JSON payload on ``citypulse/v1/{vendor}/{sensor_id}/up``: one
    :class:`VendorMessage` or a non-empty array of them (a batch)."""


class SenMLRecordJson(BaseModel):
    """One SenML record (RFC 8428 section 5, JSON labels). Unknown labels are ignored unless
    they end in ``_``; exactly one of v/vb/vs/vd (or a sum s) per measurement record; vs and vd
    are refused by citypulse (``unsupported_value``)."""

    model_config = ConfigDict(extra="allow")

    bn: str | None = Field(None, description="base name, prepended to n")
    bt: float | None = Field(None, description="base time, seconds, added to t")
    bu: str | None = Field(None, description="base unit, used when u is absent")
    bv: float | None = Field(None, description="base value, added to v")
    bs: float | None = Field(None, description="base sum, added to s")
    bver: int | None = Field(None, ge=1, le=10, description="SenML version (10 or lower)")
    n: str | None = Field(None, description="name; bn + n = '<prefix><metric>'")
    u: str | None = Field(None, description="unit; must equal the registry's unit")
    v: float | None = Field(None, description="numeric value")
    vb: bool | None = Field(None, description="boolean value, stored as 1 / 0")
    vs: str | None = Field(None, description="string value: refused (unsupported_value)")
    vd: str | None = Field(None, description="data value: refused (unsupported_value)")
    s: float | None = Field(None, description="sum; stored as the value when v/vb are absent")
    t: float | None = Field(
        None, description="time, seconds; bt + t < 2**28 is relative to now (negative = past)"
    )
    ut: float | None = Field(None, description="update time, seconds (ignored)")


class SenMLPack(RootModel[Annotated[list[SenMLRecordJson], Field(min_length=1)]]):
    """A SenML JSON pack (RFC 8428) about the one sensor named in the topic."""
