"""Collectors: MQTT → validate against the sensor registry → Kafka (the vendor contract).

Public names::

    from collectors import Validator, Limits, Collector, parse_payload, resolve_senml
"""

from collectors.errors import CollectorError
from collectors.payload import (
    PayloadError,
    RawReading,
    SenMLRecord,
    parse_payload,
    resolve_senml,
    senml_metric,
)
from collectors.validate import (
    EncodedBatch,
    Limits,
    Validator,
    message_hash,
    reject_notice,
)

__all__ = [
    "CollectorError",
    "EncodedBatch",
    "Limits",
    "PayloadError",
    "RawReading",
    "SenMLRecord",
    "Validator",
    "message_hash",
    "parse_payload",
    "reject_notice",
    "resolve_senml",
    "senml_metric",
]
