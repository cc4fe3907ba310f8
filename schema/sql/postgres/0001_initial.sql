-- qosloop storage, PostgreSQL dialect. Column names of `flows` are the JSON
-- keys of DESIGN.md §3. `flows` is partitioned by `end_ns` (one partition a
-- day, created by qosloop_ensure_flow_partitions; retention drops whole
-- partitions) and carries `flow_hash` as its distribution column, so a
-- distributed PostgreSQL (Citus) can shard it by flow (docs/architecture.md).

CREATE TABLE IF NOT EXISTS exporters (
    id            BIGSERIAL PRIMARY KEY,
    name          TEXT    NOT NULL UNIQUE,
    address       TEXT,
    boot_ns       BIGINT,
    first_seen_ns BIGINT  NOT NULL,
    last_seen_ns  BIGINT  NOT NULL
);

CREATE TABLE IF NOT EXISTS sessions (
    exporter_id   BIGINT  NOT NULL REFERENCES exporters(id),
    session_id    BIGINT  NOT NULL,
    started_ns    BIGINT  NOT NULL,
    stopped_ns    BIGINT,
    byte_order    TEXT    NOT NULL DEFAULT 'big',
    last_seq      BIGINT,
    records       BIGINT  NOT NULL DEFAULT 0,
    PRIMARY KEY (exporter_id, session_id)
);

CREATE TABLE IF NOT EXISTS templates (
    exporter_id   BIGINT  NOT NULL,
    session_id    BIGINT  NOT NULL,
    template_id   INTEGER NOT NULL,
    config_id     INTEGER NOT NULL DEFAULT 0,
    definition    JSONB   NOT NULL,
    created_ns    BIGINT  NOT NULL,
    PRIMARY KEY (exporter_id, session_id, template_id)
);

-- One row per committed DATA message: the de-duplication key of re-sends.
CREATE TABLE IF NOT EXISTS data_messages (
    exporter_id   BIGINT  NOT NULL,
    session_id    BIGINT  NOT NULL,
    seq           BIGINT  NOT NULL,
    records       INTEGER NOT NULL,
    committed_ns  BIGINT  NOT NULL,
    PRIMARY KEY (exporter_id, session_id, seq)
);

CREATE TABLE IF NOT EXISTS flows (
    id                BIGSERIAL,
    exporter_id       BIGINT   NOT NULL,
    session_id        BIGINT   NOT NULL,
    seq               BIGINT   NOT NULL,
    src_addr          INET     NOT NULL,
    dst_addr          INET     NOT NULL,
    src_port          INTEGER  NOT NULL,
    dst_port          INTEGER  NOT NULL,
    proto             SMALLINT NOT NULL,
    packets           BIGINT   NOT NULL,
    bytes             BIGINT   NOT NULL,
    start_ns          BIGINT   NOT NULL,
    end_ns            BIGINT   NOT NULL,
    vlan              INTEGER,
    dscp              SMALLINT,
    tcp_flags         INTEGER,
    class             TEXT,
    "user"            TEXT,
    process           TEXT,
    sampling_interval INTEGER,
    flow_hash         BIGINT   NOT NULL DEFAULT 0
) PARTITION BY RANGE (end_ns);

CREATE TABLE IF NOT EXISTS flows_default PARTITION OF flows DEFAULT;

-- The bandwidth manager reads windows of end_ns and new rows by id.
CREATE INDEX IF NOT EXISTS flows_end_ns ON flows (end_ns);
CREATE INDEX IF NOT EXISTS flows_id ON flows (id);

-- Creates the daily partitions covering [from_ns, to_ns). Rows already in
-- the default partition for a new day are moved into it.
CREATE OR REPLACE FUNCTION qosloop_ensure_flow_partitions(from_ns BIGINT, to_ns BIGINT)
RETURNS INTEGER LANGUAGE plpgsql AS $$
DECLARE
    day_ns CONSTANT BIGINT := 86400000000000;
    d BIGINT := (from_ns / day_ns) * day_ns;
    made INTEGER := 0;
    part TEXT;
BEGIN
    WHILE d < to_ns LOOP
        part := 'flows_d' || (d / day_ns)::TEXT;
        IF to_regclass(part) IS NULL THEN
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
    FOR r IN SELECT c.relname FROM pg_inherits i
             JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'flows'::regclass AND c.relname ~ '^flows_d[0-9]+$' LOOP
        IF (substring(r.relname FROM 8)::BIGINT + 1) * day_ns <= before_ns THEN
            EXECUTE format('DROP TABLE %I', r.relname);
            dropped := dropped + 1;
        END IF;
    END LOOP;
    RETURN dropped;
END;
$$;

CREATE TABLE IF NOT EXISTS rates (
    id             BIGSERIAL PRIMARY KEY,
    at_ns          BIGINT  NOT NULL,
    interval_ns    BIGINT  NOT NULL,
    subject        TEXT    NOT NULL CHECK (subject IN ('flow', 'link')),
    name           TEXT    NOT NULL,
    rate_kbps      DOUBLE PRECISION NOT NULL,
    avg_rate_kbps  DOUBLE PRECISION NOT NULL,
    records        BIGINT  NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS rates_name_at ON rates (name, at_ns);

CREATE TABLE IF NOT EXISTS decisions (
    id             BIGSERIAL PRIMARY KEY,
    decision_id    BIGINT  NOT NULL,
    version        BIGINT  NOT NULL,
    issued_ns      BIGINT  NOT NULL,
    role           TEXT    NOT NULL,
    policy_dn      TEXT    NOT NULL,
    flow           TEXT    NOT NULL,
    kind           TEXT    NOT NULL CHECK (kind IN ('accept', 'remark', 'drop', 'remove')),
    band           TEXT    NOT NULL,
    rate_kbps      DOUBLE PRECISION NOT NULL,
    avg_rate_kbps  DOUBLE PRECISION NOT NULL,
    link           TEXT    NOT NULL,
    link_load_kbps DOUBLE PRECISION NOT NULL,
    body           JSONB   NOT NULL
);
CREATE INDEX IF NOT EXISTS decisions_issued ON decisions (issued_ns);

CREATE TABLE IF NOT EXISTS enforcers (
    id            BIGSERIAL PRIMARY KEY,
    name          TEXT    NOT NULL UNIQUE,
    roles         TEXT    NOT NULL,
    address       TEXT,
    state         TEXT    NOT NULL DEFAULT 'connected',
    connected_ns  BIGINT  NOT NULL,
    last_seen_ns  BIGINT  NOT NULL
);

CREATE TABLE IF NOT EXISTS enforcement_reports (
    id            BIGSERIAL PRIMARY KEY,
    enforcer      TEXT    NOT NULL,
    decision_id   BIGINT  NOT NULL,
    version       BIGINT  NOT NULL,
    outcome       TEXT    NOT NULL CHECK (outcome IN ('installed', 'removed', 'failed')),
    reason        TEXT,
    reconfig_ns   BIGINT  NOT NULL,
    at_ns         BIGINT  NOT NULL
);

CREATE TABLE IF NOT EXISTS policy_audit (
    id            BIGSERIAL PRIMARY KEY,
    at_ns         BIGINT  NOT NULL,
    source        TEXT    NOT NULL,
    dn            TEXT    NOT NULL,
    change        TEXT    NOT NULL CHECK (change IN ('add', 'modify', 'delete', 'reject')),
    detail        TEXT
);

-- Collector cluster membership (DESIGN.md §7): a node owns what it leases.
CREATE TABLE IF NOT EXISTS cluster_members (
    node           TEXT   PRIMARY KEY,
    address        TEXT   NOT NULL,
    lease_until_ns BIGINT NOT NULL,
    joined_ns      BIGINT NOT NULL
);
