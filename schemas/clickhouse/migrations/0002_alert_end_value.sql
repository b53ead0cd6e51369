-- Resolved alerts carry when they ended; windowed rules the value that changed them.
-- (No IF NOT EXISTS: ClickHouse 18.16 lacks it for columns; the migration runs once.)
ALTER TABLE alerts ADD COLUMN ends_at DateTime DEFAULT toDateTime(0) AFTER starts_at_ms;
ALTER TABLE alerts ADD COLUMN value Nullable(Float64) AFTER ends_at;
