-- Least-privilege roles, NOLOGIN: production gives them a password and LOGIN with
-- `citypulse db grant-login ROLE` (or ALTER ROLE ... LOGIN PASSWORD ... by the DBA).
-- Roles are cluster-wide: created only if missing, and a concurrent creator is not an error.

DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['citypulse_writer', 'citypulse_grafana', 'citypulse_rules'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', r);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;  -- another migrator (another database of this cluster) made it first
            END;
        END IF;
    END LOOP;
END
$$;

-- Migrations run as the owner; the services never own tables, so they can't ALTER or DROP them.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO citypulse_writer, citypulse_grafana, citypulse_rules;

-- The writer: ingest, registry load (which retires sensors by UPDATE, never deletes them), and
-- DELETE only where the retention job needs it.
GRANT SELECT, INSERT, UPDATE ON sensors, sensor_metrics, readings, sensor_status, rejections
    TO citypulse_writer;
GRANT DELETE ON readings, rejections TO citypulse_writer;

-- Grafana reads everything, including tables added by later migrations.
GRANT SELECT ON ALL TABLES IN SCHEMA public TO citypulse_grafana;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO citypulse_grafana;

-- The rule workers read readings and the registry; 0100+ grants them their own tables.
GRANT SELECT ON sensors, sensor_metrics, readings, sensor_status TO citypulse_rules;

-- The rollups are tables (plain PostgreSQL) or continuous aggregates (TimescaleDB).
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        GRANT SELECT ON readings_1m, readings_1h TO citypulse_writer, citypulse_rules;
    ELSE
        GRANT SELECT, INSERT, UPDATE, DELETE ON readings_1m, readings_1h TO citypulse_writer;
        GRANT SELECT ON readings_1m, readings_1h TO citypulse_rules;
    END IF;
END
$$;
