-- Plain PostgreSQL: rollups leave the write path. Until now the writer upserted readings_1m and
-- readings_1h for every batch, one row each per sensor and metric: half of PostgreSQL's work
-- per reading. From here on (storage/rollups.py, storage/README.md "Rollups on plain
-- PostgreSQL"):
--   * readings_1m_mat / readings_1h_mat hold the minutes before rollup_state.done_1m, computed
--     from the raw rows once that minute has closed (the hour tier: those minutes of each hour);
--   * the views readings_1m / readings_1h add the still-open buckets from the raw rows at query
--     time, as TimescaleDB's real-time aggregates do, so readers see every stored reading;
--   * a reading stored behind rollup_state.mark_from (late, or a backfill) leaves a marker in
--     rollup_dirty, and the refresher recomputes that sensor's minute and hour.
-- Writers of older versions upsert into the names that are now views: stop them before
-- migrating (their batches wait in Kafka and are stored by the new writer).
-- TimescaleDB keeps its continuous aggregates: nothing here applies to it.

-- @if plain
ALTER TABLE readings_1m RENAME TO readings_1m_mat;
ALTER TABLE readings_1h RENAME TO readings_1h_mat;
ALTER INDEX readings_1m_bucket_idx RENAME TO readings_1m_mat_bucket_idx;
ALTER INDEX readings_1h_bucket_idx RENAME TO readings_1h_mat_bucket_idx;
-- Minute rows are written once when their minute closes; hour rows each minute of their hour.
ALTER TABLE readings_1m_mat SET (fillfactor = 100);

CREATE TABLE rollup_state (
    one       boolean     PRIMARY KEY DEFAULT true CHECK (one),
    -- Writers leave a dirty marker for readings older than this (minute-aligned).
    mark_from timestamptz NOT NULL,
    -- readings_1m_mat holds every minute before this; readings_1h_mat those minutes of each
    -- hour. The views read the raw rows from here on. done_1m <= mark_from.
    done_1m   timestamptz NOT NULL
);
INSERT INTO rollup_state (mark_from, done_1m)
VALUES (date_trunc('minute', now(), 'UTC'), date_trunc('minute', now(), 'UTC'));

-- One row per (sensor, metric, minute) stored behind mark_from and not yet recomputed.
CREATE TABLE rollup_dirty (
    sensor_id text        NOT NULL,
    metric    text        NOT NULL,
    bucket    timestamptz NOT NULL,
    PRIMARY KEY (sensor_id, metric, bucket)
);

-- The incremental tables were complete up to now; from done_1m on the views read raw rows, so
-- the materialised rows must stop there: drop the open minute, cut the open hour back to the
-- closed minutes.
DELETE FROM readings_1m_mat WHERE bucket >= (SELECT done_1m FROM rollup_state);
DELETE FROM readings_1h_mat
WHERE bucket >= date_trunc('hour', (SELECT done_1m FROM rollup_state), 'UTC');
INSERT INTO readings_1h_mat (bucket, sensor_id, metric, avg, min, max, count, sum)
SELECT date_trunc('hour', bucket, 'UTC'), sensor_id, metric, sum(sum) / sum(count), min(min),
       max(max), sum(count)::bigint, sum(sum)
FROM readings_1m_mat
WHERE bucket >= date_trunc('hour', (SELECT done_1m FROM rollup_state), 'UTC')
GROUP BY 1, 2, 3;

CREATE VIEW readings_1m AS
SELECT bucket, sensor_id, metric, avg, min, max, count, sum
FROM readings_1m_mat
WHERE bucket < (SELECT done_1m FROM rollup_state)
UNION ALL
SELECT date_trunc('minute', ts, 'UTC'), sensor_id, metric, avg(value), min(value), max(value),
       count(*), sum(value)
FROM readings
WHERE quality = 0 AND ts >= (SELECT done_1m FROM rollup_state)
GROUP BY 1, 2, 3;

-- Closed hours straight from the table; the open hour merges its closed minutes (in the table)
-- with the raw rows since done_1m.
CREATE VIEW readings_1h AS
SELECT bucket, sensor_id, metric, avg, min, max, count, sum
FROM readings_1h_mat
WHERE bucket < date_trunc('hour', (SELECT done_1m FROM rollup_state), 'UTC')
UNION ALL
SELECT bucket, sensor_id, metric, sum(sum) / sum(count), min(min), max(max),
       sum(count)::bigint, sum(sum)
FROM (
    SELECT bucket, sensor_id, metric, min, max, count, sum
    FROM readings_1h_mat
    WHERE bucket >= date_trunc('hour', (SELECT done_1m FROM rollup_state), 'UTC')
    UNION ALL
    SELECT date_trunc('hour', ts, 'UTC'), sensor_id, metric, min(value), max(value), count(*),
           sum(value)
    FROM readings
    WHERE quality = 0 AND ts >= (SELECT done_1m FROM rollup_state)
    GROUP BY 1, 2, 3
) open_hour
GROUP BY 1, 2, 3;

-- The renamed tables keep their grants (writer: read/write/delete; rules and Grafana: read).
GRANT SELECT, INSERT, UPDATE, DELETE ON rollup_dirty TO citypulse_writer;
GRANT SELECT, UPDATE ON rollup_state TO citypulse_writer;
GRANT SELECT ON readings_1m, readings_1h, rollup_state
    TO citypulse_writer, citypulse_rules, citypulse_grafana;
-- @end
