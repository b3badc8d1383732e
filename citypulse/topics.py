"""MQTT topics of the vendor contract, parsed once into a type.

Vendors publish on ``citypulse/v1/{vendor}/{sensor_id}/up``; the collector answers refusals on
``.../rejects``; commands to actuators go to ``.../down``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

CONTRACT_VERSION = "v1"
ROOT = "citypulse"
Direction = Literal["up", "rejects", "down"]
UP_WILDCARD = f"{ROOT}/{CONTRACT_VERSION}/+/+/up"


class TopicError(ValueError):
    """An MQTT topic that is not part of the contract."""


@dataclass(frozen=True, slots=True)
class SensorTopic:
    vendor: str
    sensor_id: str
    direction: Direction = "up"

    @classmethod
    def parse(cls, topic: str) -> SensorTopic:
        parts = topic.split("/")
        if len(parts) != 5 or parts[0] != ROOT or parts[1] != CONTRACT_VERSION:
            raise TopicError(f"expected {ROOT}/{CONTRACT_VERSION}/<vendor>/<sensor>/up: {topic!r}")
        vendor, sensor, direction = parts[2], parts[3], parts[4]
        if not vendor or not sensor:
            raise TopicError(f"empty vendor or sensor in {topic!r}")
        if direction not in ("up", "rejects", "down"):
            raise TopicError(f"unknown direction {direction!r} in {topic!r}")
        return cls(vendor, sensor, direction)  # type: ignore[arg-type]

    def with_direction(self, direction: Direction) -> SensorTopic:
        return SensorTopic(self.vendor, self.sensor_id, direction)

    def __str__(self) -> str:
        return f"{ROOT}/{CONTRACT_VERSION}/{self.vendor}/{self.sensor_id}/{self.direction}"
