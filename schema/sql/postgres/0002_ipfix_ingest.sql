-- IPFIX / NetFlow ingest (issue 13), PostgreSQL dialect. An exporter of standard flow records is
-- a row of `exporters` named `ipfix/udp/ADDR:PORT` or `ipfix/tcp/ADDR`;
-- its flows carry its id and their observation domain in `session_id`.
-- Persisted UDP templates live in `templates` (session_id = domain,
-- config_id = NetFlow version, definition = the JSON string of the
-- template's text form, created_ns = when it was last defined or refreshed).

-- Counters per exporter and observation domain (version 0 / domain -1:
-- what failed before a domain was known), as of updated_ns.
CREATE TABLE IF NOT EXISTS ipfix_exporter_stats (
    exporter_id        BIGINT  NOT NULL,
    version            INTEGER NOT NULL,
    domain             BIGINT  NOT NULL,
    messages           BIGINT  NOT NULL DEFAULT 0,
    records            BIGINT  NOT NULL DEFAULT 0,
    sequence_gaps      BIGINT  NOT NULL DEFAULT 0,
    reordered          BIGINT  NOT NULL DEFAULT 0,
    templates          BIGINT  NOT NULL DEFAULT 0,
    templates_received BIGINT  NOT NULL DEFAULT 0,
    totals_untracked   BIGINT  NOT NULL DEFAULT 0,
    pending_sets       BIGINT  NOT NULL DEFAULT 0,
    dropped            BIGINT  NOT NULL DEFAULT 0,
    updated_ns         BIGINT  NOT NULL,
    PRIMARY KEY (exporter_id, version, domain)
);

-- Drops by reason (short_header, pending_overflow, …) per exporter and domain.
CREATE TABLE IF NOT EXISTS ipfix_drops (
    exporter_id   BIGINT  NOT NULL,
    version       INTEGER NOT NULL,
    domain        BIGINT  NOT NULL,
    reason        TEXT    NOT NULL,
    count         BIGINT  NOT NULL,
    updated_ns    BIGINT  NOT NULL,
    PRIMARY KEY (exporter_id, version, domain, reason)
);

-- Per listening socket: what the kernel delivered and what it dropped
-- (SO_RXQ_OVFL), and what the collector refused before any exporter was
-- tracked (not on the allow-list, too many exporters).
CREATE TABLE IF NOT EXISTS ipfix_listeners (
    listen        TEXT    PRIMARY KEY,
    datagrams     BIGINT  NOT NULL DEFAULT 0,
    bytes         BIGINT  NOT NULL DEFAULT 0,
    kernel_drops  BIGINT  NOT NULL DEFAULT 0,
    rcvbuf        BIGINT  NOT NULL DEFAULT 0,
    not_allowed   BIGINT  NOT NULL DEFAULT 0,
    too_many_exporters BIGINT NOT NULL DEFAULT 0,
    updated_ns    BIGINT  NOT NULL
);
