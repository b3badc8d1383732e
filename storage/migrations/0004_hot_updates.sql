-- Room in every page for the rows the writer updates in place on each batch: sensor_status
-- (one row per sensor) and, on plain PostgreSQL, the rollup tables (one row per sensor, metric
-- and bucket). With full pages an UPDATE moves the row to another page and inserts into every
-- index again; with room on the page it is a HOT update, the indexes untouched and the old
-- version pruned in place. Applies to pages written from now on.

ALTER TABLE sensor_status SET (fillfactor = 70);

-- @if plain
ALTER TABLE readings_1m SET (fillfactor = 70);
ALTER TABLE readings_1h SET (fillfactor = 70);
-- @end
