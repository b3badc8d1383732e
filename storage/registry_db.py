"""Load the sensor registry into ``sensors`` / ``sensor_metrics`` (an idempotent upsert).

Sensors that disappear from the registry are not deleted: they get ``retired_at`` set, so their
readings still join to vendor, district and asset. A sensor (or metric) that comes back is
un-retired. The whole load is one transaction: readers never see half a registry.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from citypulse.registry import Registry
from storage.errors import Conn


@dataclass(frozen=True, slots=True)
class RegistryLoadResult:
    """Counts of one load: sensors in the file, and sensors newly retired by this load."""

    sensors: int
    metrics: int
    retired: int


_UPSERT_SENSORS = """
INSERT INTO sensors AS s (id, vendor, silo, district, asset, lat, lon, interval_s, labels,
                          actuator, updated_at, retired_at)
SELECT id, vendor, silo, district, asset, lat, lon, interval_s, labels::jsonb, actuator, now(), NULL
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::float8[],
            $7::float8[], $8::float8[], $9::text[], $10::bool[])
     AS t(id, vendor, silo, district, asset, lat, lon, interval_s, labels, actuator)
ON CONFLICT (id) DO UPDATE SET
    vendor = EXCLUDED.vendor, silo = EXCLUDED.silo, district = EXCLUDED.district,
    asset = EXCLUDED.asset, lat = EXCLUDED.lat, lon = EXCLUDED.lon,
    interval_s = EXCLUDED.interval_s, labels = EXCLUDED.labels, actuator = EXCLUDED.actuator,
    updated_at = now(), retired_at = NULL
-- Skip rows that did not change, so updated_at tells when a sensor was last edited.
WHERE (s.vendor, s.silo, s.district, s.asset, s.lat, s.lon, s.interval_s, s.labels, s.actuator)
      IS DISTINCT FROM
      (EXCLUDED.vendor, EXCLUDED.silo, EXCLUDED.district, EXCLUDED.asset, EXCLUDED.lat,
       EXCLUDED.lon, EXCLUDED.interval_s, EXCLUDED.labels, EXCLUDED.actuator)
   OR s.retired_at IS NOT NULL
"""

_UPSERT_METRICS = """
INSERT INTO sensor_metrics AS m (sensor_id, metric, unit, min, max, retired_at)
SELECT sensor_id, metric, unit, min, max, NULL
FROM unnest($1::text[], $2::text[], $3::text[], $4::float8[], $5::float8[])
     AS t(sensor_id, metric, unit, min, max)
ON CONFLICT (sensor_id, metric) DO UPDATE SET
    unit = EXCLUDED.unit, min = EXCLUDED.min, max = EXCLUDED.max, retired_at = NULL
"""

_RETIRE_SENSORS = """
UPDATE sensors SET retired_at = now(), updated_at = now()
WHERE retired_at IS NULL AND NOT (id = ANY($1::text[]))
"""

_RETIRE_METRICS = """
UPDATE sensor_metrics SET retired_at = now()
WHERE retired_at IS NULL
  AND (sensor_id, metric) NOT IN (SELECT * FROM unnest($1::text[], $2::text[]))
"""


async def load_registry_into(conn: Conn, registry: Registry) -> RegistryLoadResult:
    """Upsert ``registry`` into the database in one transaction; retire what is gone.

    Args:
        conn: a connection of a role with INSERT/UPDATE on ``sensors`` and ``sensor_metrics``.
        registry: the validated registry.
    """
    sensors = list(registry)
    metric_rows = [
        (s.id, name, m.unit, m.min, m.max) for s in sensors for name, m in s.metrics.items()
    ]
    async with conn.transaction():
        await conn.execute(
            _UPSERT_SENSORS,
            [s.id for s in sensors],
            [s.vendor for s in sensors],
            [s.silo.value for s in sensors],
            [s.district for s in sensors],
            [s.asset for s in sensors],
            [s.location.lat for s in sensors],
            [s.location.lon for s in sensors],
            [s.interval_s for s in sensors],
            [orjson.dumps(s.labels).decode() for s in sensors],
            [s.actuator for s in sensors],
        )
        columns = [list(col) for col in zip(*metric_rows, strict=True)] or [[], [], [], [], []]
        await conn.execute(_UPSERT_METRICS, *columns)
        status = await conn.execute(_RETIRE_SENSORS, [s.id for s in sensors])
        await conn.execute(
            _RETIRE_METRICS, [r[0] for r in metric_rows], [r[1] for r in metric_rows]
        )
    return RegistryLoadResult(len(sensors), len(metric_rows), int(status.split()[-1]))
