-- Storage tiers: raw readings, 1-minute and 1-hour rollups (avg/min/max/count, and sum so the
-- average stays exact when rows are added incrementally). Rollups summarise GOOD readings only
-- (quality = 0): out-of-range values are kept raw, flagged, but never skew an average.
--
-- Two flavours, chosen by the migration runner (storage/migrate.py) from
-- pg_available_extensions: with TimescaleDB, `readings` becomes a hypertable and the rollups are
-- continuous aggregates with refresh, compression and retention policies. Without it, the
-- rollups are plain tables that the writer keeps up to date in the same transaction as the raw
-- insert, and the writer's retention job deletes old rows. Names and columns are the same.

-- @if timescaledb
CREATE EXTENSION IF NOT EXISTS timescaledb;

SELECT create_hypertable('readings', by_range('ts', INTERVAL '1 day'), if_not_exists => true,
                         migrate_data => true);

CREATE MATERIALIZED VIEW IF NOT EXISTS readings_1m
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT time_bucket(INTERVAL '1 minute', ts) AS bucket, sensor_id, metric,
       avg(value) AS avg, min(value) AS min, max(value) AS max, count(*) AS count,
       sum(value) AS sum
FROM readings
WHERE quality = 0
GROUP BY 1, 2, 3
WITH NO DATA;

CREATE MATERIALIZED VIEW IF NOT EXISTS readings_1h
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT time_bucket(INTERVAL '1 hour', bucket) AS bucket, sensor_id, metric,
       sum(sum) / sum(count) AS avg, min(min) AS min, max(max) AS max, sum(count)::bigint AS count,
       sum(sum) AS sum
FROM readings_1m
GROUP BY 1, 2, 3
WITH NO DATA;

SELECT add_continuous_aggregate_policy('readings_1m', start_offset => INTERVAL '8 days',
       end_offset => INTERVAL '1 minute', schedule_interval => INTERVAL '1 minute',
       if_not_exists => true);
SELECT add_continuous_aggregate_policy('readings_1h', start_offset => INTERVAL '8 days',
       end_offset => INTERVAL '1 hour', schedule_interval => INTERVAL '15 minutes',
       if_not_exists => true);

ALTER TABLE readings SET (timescaledb.compress, timescaledb.compress_segmentby = 'sensor_id, metric',
                          timescaledb.compress_orderby = 'ts DESC');
SELECT add_compression_policy('readings', compress_after => INTERVAL '7 days', if_not_exists => true);

-- Defaults; production changes them with remove_/add_retention_policy (see storage/README.md).
SELECT add_retention_policy('readings', drop_after => INTERVAL '30 days', if_not_exists => true);
SELECT add_retention_policy('readings_1m', drop_after => INTERVAL '180 days', if_not_exists => true);
SELECT add_retention_policy('readings_1h', drop_after => INTERVAL '5 years', if_not_exists => true);
-- @else
CREATE TABLE IF NOT EXISTS readings_1m (
    bucket    timestamptz NOT NULL,
    sensor_id text        NOT NULL,
    metric    text        NOT NULL,
    avg       float8      NOT NULL,
    min       float8      NOT NULL,
    max       float8      NOT NULL,
    count     bigint      NOT NULL,
    sum       float8      NOT NULL,
    PRIMARY KEY (sensor_id, metric, bucket)
);
CREATE INDEX IF NOT EXISTS readings_1m_bucket_idx ON readings_1m (bucket);

CREATE TABLE IF NOT EXISTS readings_1h (
    bucket    timestamptz NOT NULL,
    sensor_id text        NOT NULL,
    metric    text        NOT NULL,
    avg       float8      NOT NULL,
    min       float8      NOT NULL,
    max       float8      NOT NULL,
    count     bigint      NOT NULL,
    sum       float8      NOT NULL,
    PRIMARY KEY (sensor_id, metric, bucket)
);
CREATE INDEX IF NOT EXISTS readings_1h_bucket_idx ON readings_1h (bucket);
-- @end
