"""A simulated city publishing realistic sensor readings over MQTT (``citypulse simulate``).

Use from Python::

    sim = Simulator(load_registry(path), SimulatorConfig(seed=1, speedup=60))
    for msg in itertools.islice(sim.messages(start), 1000):  # deterministic
        ...
    report = publish(sim, MqttTarget(url), duration_s=10)  # or await publish_async(...)
"""

from deploy.simulator._city import CITY, DISTRICTS, KINDS, generate_registry
from deploy.simulator._model import Incident, IncidentKind, values_at
from deploy.simulator._publish import (
    MqttTarget,
    PublishError,
    SimulationReport,
    publish,
    publish_async,
)
from deploy.simulator._sim import (
    MALFORMED_KINDS,
    VENDOR_FORMATS,
    Message,
    Simulator,
    SimulatorConfig,
    SimulatorError,
    default_backfill_s,
    encode_json,
    encode_senml,
)

__all__ = [
    "CITY",
    "DISTRICTS",
    "KINDS",
    "MALFORMED_KINDS",
    "VENDOR_FORMATS",
    "Incident",
    "IncidentKind",
    "Message",
    "MqttTarget",
    "PublishError",
    "SimulationReport",
    "Simulator",
    "SimulatorConfig",
    "SimulatorError",
    "default_backfill_s",
    "encode_json",
    "encode_senml",
    "generate_registry",
    "publish",
    "publish_async",
    "values_at",
]
