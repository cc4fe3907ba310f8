-- qosloop storage, SQLite dialect. Column names of `flows` are the JSON keys
-- of DESIGN.md §3; addresses are text.

CREATE TABLE IF NOT EXISTS exporters (
    id            INTEGER PRIMARY KEY,
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
    definition    TEXT    NOT NULL,
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
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS flows (
    id                INTEGER PRIMARY KEY,
    exporter_id       BIGINT  NOT NULL,
    session_id        BIGINT  NOT NULL,
    seq               BIGINT  NOT NULL,
    src_addr          TEXT    NOT NULL,
    dst_addr          TEXT    NOT NULL,
    src_port          INTEGER NOT NULL,
    dst_port          INTEGER NOT NULL,
    proto             INTEGER NOT NULL,
    packets           BIGINT  NOT NULL,
    bytes             BIGINT  NOT NULL,
    start_ns          BIGINT  NOT NULL,
    end_ns            BIGINT  NOT NULL,
    vlan              INTEGER,
    dscp              INTEGER,
    tcp_flags         INTEGER,
    class             TEXT,
    "user"            TEXT,
    process           TEXT,
    sampling_interval INTEGER,
    flow_hash         BIGINT  NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS flows_end_ns ON flows (end_ns);

CREATE TABLE IF NOT EXISTS rates (
    id             INTEGER PRIMARY KEY,
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
    id             INTEGER PRIMARY KEY,
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
    body           TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS decisions_issued ON decisions (issued_ns);

CREATE TABLE IF NOT EXISTS enforcers (
    id            INTEGER PRIMARY KEY,
    name          TEXT    NOT NULL UNIQUE,
    roles         TEXT    NOT NULL,
    address       TEXT,
    state         TEXT    NOT NULL DEFAULT 'connected',
    connected_ns  BIGINT  NOT NULL,
    last_seen_ns  BIGINT  NOT NULL
);

CREATE TABLE IF NOT EXISTS enforcement_reports (
    id            INTEGER PRIMARY KEY,
    enforcer      TEXT    NOT NULL,
    decision_id   BIGINT  NOT NULL,
    version       BIGINT  NOT NULL,
    outcome       TEXT    NOT NULL CHECK (outcome IN ('installed', 'removed', 'failed')),
    reason        TEXT,
    reconfig_ns   BIGINT  NOT NULL,
    at_ns         BIGINT  NOT NULL
);

CREATE TABLE IF NOT EXISTS policy_audit (
    id            INTEGER PRIMARY KEY,
    at_ns         BIGINT  NOT NULL,
    source        TEXT    NOT NULL,
    dn            TEXT    NOT NULL,
    change        TEXT    NOT NULL CHECK (change IN ('add', 'modify', 'delete', 'reject')),
    detail        TEXT
);

-- Collector cluster membership (DESIGN.md §7): a node owns what it leases.
CREATE TABLE IF NOT EXISTS cluster_members (
    node          TEXT    PRIMARY KEY,
    address       TEXT    NOT NULL,
    lease_until_ns BIGINT NOT NULL,
    joined_ns     BIGINT  NOT NULL
);
