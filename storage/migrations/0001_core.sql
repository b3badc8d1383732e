-- Core tables: the registry (sensors, sensor_metrics), raw readings, sensor status, rejections.
-- Owned by storage (numbers 0001-0099). See storage/SCHEMA.md for the contract.

CREATE TABLE IF NOT EXISTS sensors (
    id         text        PRIMARY KEY,
    vendor     text        NOT NULL,
    silo       text        NOT NULL,
    district   text        NOT NULL,
    asset      text        NOT NULL,
    lat        float8      NOT NULL,
    lon        float8      NOT NULL,
    interval_s float8      NOT NULL,
    labels     jsonb       NOT NULL DEFAULT '{}',
    actuator   boolean     NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL DEFAULT now(),
    -- Set when a sensor disappears from the registry: kept (not deleted) so history still joins.
    retired_at timestamptz
);

CREATE INDEX IF NOT EXISTS sensors_silo_district_idx ON sensors (silo, district);

CREATE TABLE IF NOT EXISTS sensor_metrics (
    sensor_id  text        NOT NULL REFERENCES sensors (id) ON DELETE CASCADE,
    metric     text        NOT NULL,
    unit       text        NOT NULL,
    min        float8,
    max        float8,
    retired_at timestamptz,
    PRIMARY KEY (sensor_id, metric)
);

-- No foreign key to sensors: ingest must not depend on the registry being loaded first, and the
-- collectors already refuse unknown sensors.
CREATE TABLE IF NOT EXISTS readings (
    ts          timestamptz NOT NULL,
    sensor_id   text        NOT NULL,
    metric      text        NOT NULL,
    value       float8      NOT NULL,
    quality     smallint    NOT NULL DEFAULT 0,
    received_at timestamptz NOT NULL,
    -- The idempotency key: a redelivered reading is ignored (ON CONFLICT DO NOTHING).
    CONSTRAINT readings_identity UNIQUE (sensor_id, metric, ts)
);

-- Time-range scans across sensors (city-wide panels) and the retention DELETE.
CREATE INDEX IF NOT EXISTS readings_ts_idx ON readings (ts);

CREATE TABLE IF NOT EXISTS sensor_status (
    sensor_id        text        PRIMARY KEY,
    last_ts          timestamptz NOT NULL,
    last_received_at timestamptz NOT NULL,
    readings         bigint      NOT NULL DEFAULT 0
);

CREATE TABLE IF NOT EXISTS rejections (
    received_at  timestamptz NOT NULL,
    vendor       text,
    sensor_id    text,
    reason       text        NOT NULL,
    detail       text        NOT NULL,
    topic        text        NOT NULL,
    message_hash text        NOT NULL,
    CONSTRAINT rejections_identity UNIQUE (message_hash, received_at)
);

CREATE INDEX IF NOT EXISTS rejections_received_at_idx ON rejections (received_at);
CREATE INDEX IF NOT EXISTS rejections_sensor_idx ON rejections (sensor_id, received_at);
