-- Plain PostgreSQL: rollups leave the write path. Until now the writer upserted readings_1m and
-- readings_1h in every batch transaction, one row each per sensor and metric of the batch: half
-- of PostgreSQL's work per reading when a batch holds one reading per sensor. From here on
-- (storage/rollups.py, storage/README.md "Rollups on plain PostgreSQL") a refresher in the
-- writer adds the raw rows of each new stretch of time [done_at, now - settle) to the tables
-- every few seconds, and recomputes the minutes of readings that arrive behind done_at (late),
-- which the write transaction flags in rollup_dirty.
-- Writers of older versions still upsert the rollups themselves, which would count readings
-- twice: stop them before migrating (their batches wait in Kafka for the new writer).
-- TimescaleDB keeps its continuous aggregates: nothing here applies to it.

-- @if plain
CREATE TABLE rollup_state (
    one       boolean     PRIMARY KEY DEFAULT true CHECK (one),
    -- Writers flag readings older than this as late.
    mark_from timestamptz NOT NULL,
    -- The rollup tables hold every good reading older than this (done_at <= mark_from).
    done_at   timestamptz NOT NULL
);
-- The old writers rolled up every reading stored so far, including any stamped ahead of now.
INSERT INTO rollup_state (mark_from, done_at)
SELECT t, t FROM (
    SELECT date_trunc('second', GREATEST(now(), max(ts))) + interval '1 second' AS t FROM readings
) s;

-- One row per (sensor, metric, minute) stored behind mark_from and not yet recomputed.
CREATE TABLE rollup_dirty (
    sensor_id text        NOT NULL,
    metric    text        NOT NULL,
    bucket    timestamptz NOT NULL,
    PRIMARY KEY (sensor_id, metric, bucket)
);

GRANT SELECT, INSERT, UPDATE, DELETE ON rollup_dirty TO citypulse_writer;
GRANT SELECT, UPDATE ON rollup_state TO citypulse_writer;
GRANT SELECT ON rollup_state TO citypulse_rules, citypulse_grafana;
-- @end
