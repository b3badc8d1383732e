"""A simulated city publishing realistic sensor readings over MQTT (``citypulse simulate``)."""

from deploy.simulator._city import CITY, DISTRICTS, KINDS, generate_registry

__all__ = ["CITY", "DISTRICTS", "KINDS", "generate_registry"]
