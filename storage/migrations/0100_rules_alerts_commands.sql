-- Rules: every alert state change, the current state of each alert, and the command audit.
-- Owned by rules/runtime (numbers 0100-0199). Idempotent so a re-run is harmless.

CREATE TABLE IF NOT EXISTS alert_events (
    fingerprint  text        NOT NULL,
    rule         text        NOT NULL,
    rule_version text        NOT NULL,
    rule_group   text        NOT NULL,
    state        text        NOT NULL CHECK (state IN ('inactive', 'pending', 'firing', 'resolved')),
    severity     text        NOT NULL,
    labels       jsonb       NOT NULL DEFAULT '{}',
    annotations  jsonb       NOT NULL DEFAULT '{}',
    "values"     jsonb       NOT NULL DEFAULT '{}',
    window_s     float8,
    active_since timestamptz,
    ts           timestamptz NOT NULL,
    evaluated_at timestamptz NOT NULL,
    notify       boolean     NOT NULL DEFAULT true,
    -- A replay after a worker crash reproduces the same events: this makes them land once.
    CONSTRAINT alert_events_identity UNIQUE (fingerprint, ts, state)
);

CREATE INDEX IF NOT EXISTS alert_events_ts_idx ON alert_events (ts);
CREATE INDEX IF NOT EXISTS alert_events_rule_ts_idx ON alert_events (rule, ts);

CREATE OR REPLACE VIEW alerts_current AS
SELECT DISTINCT ON (fingerprint) *
FROM alert_events
-- Ties on ts (pending and firing at the same instant) resolve to the later state.
ORDER BY fingerprint, ts DESC,
         CASE state WHEN 'resolved' THEN 3 WHEN 'firing' THEN 2 WHEN 'pending' THEN 1 ELSE 0 END DESC;

CREATE TABLE IF NOT EXISTS commands (
    command_id   text        PRIMARY KEY,
    rule         text        NOT NULL,
    rule_version text        NOT NULL,
    sensor_id    text        NOT NULL,
    vendor       text        NOT NULL,
    setting      text        NOT NULL,
    value        float8      NOT NULL,
    previous     float8,
    status       text        NOT NULL CHECK (status IN ('sent', 'dry_run', 'suppressed')),
    reason       text,
    ts           timestamptz NOT NULL
);

CREATE INDEX IF NOT EXISTS commands_sensor_ts_idx ON commands (sensor_id, ts);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'citypulse_rules') THEN
        GRANT SELECT, INSERT ON alert_events, commands TO citypulse_rules;
        GRANT SELECT ON alerts_current TO citypulse_rules;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'citypulse_grafana') THEN
        GRANT SELECT ON alert_events, alerts_current, commands TO citypulse_grafana;
    END IF;
END
$$;
