-- The real-time knowledge base (seeds/002 §III, docs/kb.md), kept by the
-- collectors in the flow writer's transaction (qosloop_store, kb/).
-- Addresses are stored as their text form (Rust's Display) in both
-- dialects: the knowledge base only looks them up exactly.
--
-- Per-host counters: volatile, removed once not seen for the host TTL.
-- in = bytes/packets the address received (it was the destination), out =
-- what it sent. Counters are scaled by the sampling interval.
CREATE TABLE IF NOT EXISTS kb_hosts (
    addr          TEXT    NOT NULL PRIMARY KEY,
    bytes_in      BIGINT  NOT NULL,
    bytes_out     BIGINT  NOT NULL,
    packets_in    BIGINT  NOT NULL,
    packets_out   BIGINT  NOT NULL,
    first_seen_ns BIGINT  NOT NULL,
    last_seen_ns  BIGINT  NOT NULL
);
CREATE INDEX IF NOT EXISTS kb_hosts_last_seen ON kb_hosts (last_seen_ns);

-- Per-user counters: persistent. online = 1 from the user's first traffic
-- (or volatile mapping) until the idle sweep says logoff; session_bytes
-- counts since the last logon and is what a threshold applies to.
CREATE TABLE IF NOT EXISTS kb_users (
    "user"          TEXT    NOT NULL PRIMARY KEY,
    bytes_in        BIGINT  NOT NULL,
    bytes_out       BIGINT  NOT NULL,
    packets_in      BIGINT  NOT NULL,
    packets_out     BIGINT  NOT NULL,
    first_seen_ns   BIGINT  NOT NULL,
    last_seen_ns    BIGINT  NOT NULL,
    online          INTEGER NOT NULL,
    online_since_ns BIGINT,
    session_bytes   BIGINT  NOT NULL
);

-- User <-> address mappings. source 'agent' (learned from host-agent
-- records: volatile, expires_ns set, refreshed by every record) or 'ldap'
-- (static entries of the policy: persistent, expires_ns NULL, kept until
-- the entry is removed).
CREATE TABLE IF NOT EXISTS kb_mappings (
    addr          TEXT    NOT NULL,
    "user"        TEXT    NOT NULL,
    source        TEXT    NOT NULL,
    persistent    INTEGER NOT NULL,
    first_seen_ns BIGINT  NOT NULL,
    last_seen_ns  BIGINT  NOT NULL,
    expires_ns    BIGINT,
    PRIMARY KEY (addr, "user", source)
);
CREATE INDEX IF NOT EXISTS kb_mappings_user ON kb_mappings ("user");
CREATE INDEX IF NOT EXISTS kb_mappings_expires ON kb_mappings (expires_ns);

-- Per-user byte thresholds on session_bytes; "user" '*' is the default.
CREATE TABLE IF NOT EXISTS kb_thresholds (
    "user" TEXT   NOT NULL PRIMARY KEY,
    bytes  BIGINT NOT NULL
);

-- The events, in commit order of their ids (logon, logoff, threshold,
-- decision); subscribers read them after a wake-up (NOTIFY qosloop_kb on
-- PostgreSQL). Kept for a bounded time by the sweep.
CREATE TABLE IF NOT EXISTS kb_events (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ns   BIGINT NOT NULL,
    kind    TEXT   NOT NULL,
    "user"  TEXT,
    addr    TEXT,
    value   BIGINT,
    detail  TEXT
);
CREATE INDEX IF NOT EXISTS kb_events_at ON kb_events (at_ns);
