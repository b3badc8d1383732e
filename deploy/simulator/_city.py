"""The simulated city's layout: districts, silos, vendors, and the registry that describes them.

The layout is a pure function of (districts, sensors per silo and district, seed), so the
simulator can write its own registry of any size and the example registry is reproducible.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import timedelta

from citypulse.registry import Location, Metric, Registry, Sensor, Silo

CITY = "riverton"
"""A fictional mid-size river/harbour city; coordinates are placed around Lyon's latitude."""

CITY_CENTRE = (45.7640, 4.8357)
"""(lat, lon) of the city centre, degrees."""

DISTRICTS: tuple[tuple[str, float, float], ...] = (
    # name, lat offset, lon offset (degrees from the centre)
    ("north", 0.030, 0.000),
    ("harbour", -0.010, 0.035),
    ("oldtown", 0.000, -0.012),
    ("riverside", -0.028, -0.020),
    ("east", 0.008, 0.055),
    ("south", -0.050, 0.010),
    ("west", 0.005, -0.050),
    ("hills", 0.050, -0.040),
)
"""Districts in the order they are used; ``districts=4`` takes the first four."""


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """A metric as the registry declares it (unit and valid range)."""

    name: str
    unit: str
    min: float
    max: float
    description: str


@dataclass(frozen=True, slots=True)
class KindSpec:
    """A kind of sensor: what it measures, who makes it, which asset it sits on."""

    kind: str
    silo: Silo
    vendor: str
    prefix: str
    asset: str
    metrics: tuple[MetricSpec, ...]
    actuator: bool = False


_PRESSURE = MetricSpec("pressure", "bar", 0.0, 16.0, "water pressure in the main")
_FLOW = MetricSpec("flow", "m3/h", 0.0, 2000.0, "volumetric flow")

KINDS: dict[Silo, tuple[KindSpec, ...]] = {
    # Water: the first sensor of each district sits on the pumping station, the rest on mains;
    # a second vendor (hydrix) makes the mains meters so water mixes payload formats.
    Silo.WATER: (
        KindSpec("pump", Silo.WATER, "aquasense", "wtr", "pumping station", (_PRESSURE, _FLOW)),
        KindSpec("main", Silo.WATER, "hydrix", "wtr", "water main", (_PRESSURE, _FLOW)),
    ),
    Silo.ENERGY: (
        KindSpec(
            "substation",
            Silo.ENERGY,
            "voltiq",
            "nrg",
            "substation",
            (
                MetricSpec("power", "kW", 0.0, 50000.0, "active power delivered"),
                MetricSpec("voltage", "V", 0.0, 15000.0, "busbar voltage (11 kV nominal)"),
            ),
        ),
    ),
    Silo.TRANSPORT: (
        KindSpec(
            "traffic",
            Silo.TRANSPORT,
            "trafficore",
            "trf",
            "road counter",
            (
                MetricSpec("traffic", "vehicles/h", 0.0, 6000.0, "vehicles per hour, all lanes"),
                MetricSpec("speed", "km/h", 0.0, 200.0, "mean vehicle speed"),
            ),
        ),
    ),
    Silo.AIR: (
        KindSpec(
            "air",
            Silo.AIR,
            "airly",
            "air",
            "air quality station",
            (
                MetricSpec("pm25", "ug/m3", 0.0, 1000.0, "fine particulate matter PM2.5"),
                MetricSpec("no2", "ug/m3", 0.0, 2000.0, "nitrogen dioxide"),
            ),
        ),
    ),
    Silo.LIGHTING: (
        KindSpec(
            "streetlight",
            Silo.LIGHTING,
            "lumen",
            "lgt",
            "streetlight cluster",
            (
                MetricSpec("dim_level", "%", 0.0, 100.0, "dimming level, 100 = full"),
                MetricSpec("power", "W", 0.0, 5000.0, "electrical power of the cluster"),
            ),
            actuator=True,
        ),
    ),
    Silo.WASTE: (
        KindSpec(
            "bin",
            Silo.WASTE,
            "binsense",
            "wst",
            "underground bin",
            (MetricSpec("fill_level", "%", 0.0, 100.0, "how full the bin is"),),
        ),
    ),
}


def kind_for(silo: Silo, index: int) -> KindSpec:
    """The kind of the ``index``-th (0-based) sensor of ``silo`` in a district."""
    kinds = KINDS[silo]
    return kinds[min(index, len(kinds) - 1)]


def generate_registry(
    districts: int = 4,
    sensors_per_silo_district: int = 3,
    seed: int = 7,
    interval: timedelta = timedelta(seconds=60),
    city: str = CITY,
) -> Registry:
    """Build the registry of a simulated city.

    Args:
        districts: number of districts, 1 to ``len(DISTRICTS)``.
        sensors_per_silo_district: sensors of each silo in each district (at least 1).
        seed: seeds the sensor positions (same seed, same registry).
        interval: expected reporting interval of every sensor.
        city: the registry's city name.

    Returns:
        A valid :class:`Registry` with ids like ``wtr-north-001``.
    """
    if not 1 <= districts <= len(DISTRICTS):
        raise ValueError(f"districts must be 1..{len(DISTRICTS)}, got {districts}")
    if sensors_per_silo_district < 1:
        raise ValueError("sensors_per_silo_district must be at least 1")
    rng = random.Random(seed)  # noqa: S311 - simulation, reproducible on purpose
    sensors: list[Sensor] = []
    for name, dlat, dlon in DISTRICTS[:districts]:
        for silo in Silo:
            for i in range(sensors_per_silo_district):
                kind = kind_for(silo, i)
                lat = CITY_CENTRE[0] + dlat + rng.uniform(-0.008, 0.008)
                lon = CITY_CENTRE[1] + dlon + rng.uniform(-0.011, 0.011)
                sensors.append(
                    Sensor(
                        id=f"{kind.prefix}-{name}-{i + 1:03d}",
                        vendor=kind.vendor,
                        silo=silo,
                        district=name,
                        asset=f"{kind.asset} {name} {i + 1}",
                        location=Location(lat=round(lat, 5), lon=round(lon, 5)),
                        interval=interval,
                        metrics={
                            m.name: Metric(
                                unit=m.unit, min=m.min, max=m.max, description=m.description
                            )
                            for m in kind.metrics
                        },
                        labels={"kind": kind.kind},
                        actuator=kind.actuator,
                    )
                )
    return Registry(version=1, city=city, sensors=sensors)
