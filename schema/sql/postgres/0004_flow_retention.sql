-- Partitions ahead and retention, safe with several collectors at once.
--
-- Every collector calls qosloop_ensure_flow_partitions for the days ahead
-- and qosloop_drop_flow_partitions for what is past the configured age.
-- Both now take one transaction-scoped advisory lock, so that two nodes
-- never create (or drop) the same partition at once: the second waits,
-- then finds the work done (both are idempotent). While a day's partition
-- is created, flows_default is locked against writes (SHARE ROW EXCLUSIVE)
-- so that no row of that day lands in the default between moving its rows
-- out and attaching the new partition; created ahead of time, the default
-- holds no row of that day and the lock lasts a moment.

CREATE OR REPLACE FUNCTION qosloop_ensure_flow_partitions(from_ns BIGINT, to_ns BIGINT)
RETURNS INTEGER LANGUAGE plpgsql AS $$
DECLARE
    day_ns CONSTANT BIGINT := 86400000000000;
    d BIGINT := (from_ns / day_ns) * day_ns;
    made INTEGER := 0;
    part TEXT;
BEGIN
    PERFORM pg_advisory_xact_lock(7347302);
    WHILE d < to_ns LOOP
        part := 'flows_d' || (d / day_ns)::TEXT;
        IF to_regclass(part) IS NULL THEN
            LOCK TABLE flows_default IN SHARE ROW EXCLUSIVE MODE;
            EXECUTE format('CREATE TEMP TABLE qosloop_moved ON COMMIT DROP AS '
                           'SELECT * FROM flows_default WHERE end_ns >= %s AND end_ns < %s',
                           d, d + day_ns);
            EXECUTE format('DELETE FROM flows_default WHERE end_ns >= %s AND end_ns < %s',
                           d, d + day_ns);
            EXECUTE format('CREATE TABLE %I PARTITION OF flows FOR VALUES FROM (%s) TO (%s)',
                           part, d, d + day_ns);
            EXECUTE 'INSERT INTO flows SELECT * FROM qosloop_moved';
            DROP TABLE qosloop_moved;
            made := made + 1;
        END IF;
        d := d + day_ns;
    END LOOP;
    RETURN made;
END;
$$;

-- Retention: drops the daily partitions that end at or before before_ns.
CREATE OR REPLACE FUNCTION qosloop_drop_flow_partitions(before_ns BIGINT)
RETURNS INTEGER LANGUAGE plpgsql AS $$
DECLARE
    day_ns CONSTANT BIGINT := 86400000000000;
    r RECORD;
    dropped INTEGER := 0;
BEGIN
    PERFORM pg_advisory_xact_lock(7347302);
    FOR r IN SELECT c.relname FROM pg_inherits i
             JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'flows'::regclass AND c.relname ~ '^flows_d[0-9]+$' LOOP
        IF (substring(r.relname FROM 8)::BIGINT + 1) * day_ns <= before_ns THEN
            EXECUTE format('DROP TABLE IF EXISTS %I', r.relname);
            dropped := dropped + 1;
        END IF;
    END LOOP;
    RETURN dropped;
END;
$$;

-- What each maintenance run did, by node: partitions made ahead, dropped,
-- and rows deleted (rows older than the cut-off left in flows_default;
-- on SQLite every row retention removes).
CREATE TABLE IF NOT EXISTS flow_maintenance (
    id                 BIGSERIAL PRIMARY KEY,
    at_ns              BIGINT  NOT NULL,
    node               TEXT    NOT NULL,
    before_ns          BIGINT,
    partitions_created INTEGER NOT NULL,
    partitions_dropped INTEGER NOT NULL,
    rows_deleted       BIGINT  NOT NULL
);
