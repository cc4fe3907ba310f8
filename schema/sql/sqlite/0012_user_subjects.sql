-- Per-user subjects (issue 16, docs/cluster.md): the `user` kind in
-- `rates`, `rate_partials` and `rate_state` (see the PostgreSQL
-- migration). SQLite cannot alter a CHECK: each table is rebuilt with
-- the same columns and its rows copied.

CREATE TABLE rates_0012 (
    id             INTEGER PRIMARY KEY,
    at_ns          BIGINT  NOT NULL,
    interval_ns    BIGINT  NOT NULL,
    subject        TEXT    NOT NULL CHECK (subject IN ('flow', 'link', 'user')),
    name           TEXT    NOT NULL,
    rate_kbps      DOUBLE PRECISION NOT NULL,
    avg_rate_kbps  DOUBLE PRECISION NOT NULL,
    records        BIGINT  NOT NULL DEFAULT 0,
    node           TEXT,
    epoch          BIGINT,
    computed_ns    BIGINT
);
INSERT INTO rates_0012 (id, at_ns, interval_ns, subject, name, rate_kbps, avg_rate_kbps, records, node, epoch, computed_ns)
    SELECT id, at_ns, interval_ns, subject, name, rate_kbps, avg_rate_kbps, records, node, epoch, computed_ns FROM rates;
DROP TABLE rates;
ALTER TABLE rates_0012 RENAME TO rates;
CREATE INDEX IF NOT EXISTS rates_name_at ON rates (name, at_ns);

CREATE TABLE rate_partials_0012 (
    cluster TEXT   NOT NULL,
    kind    TEXT   NOT NULL CHECK (kind IN ('flow', 'link', 'user')),
    subject TEXT   NOT NULL,
    slot    BIGINT NOT NULL,
    node    TEXT   NOT NULL,
    bytes   DOUBLE PRECISION NOT NULL,
    records BIGINT NOT NULL,
    PRIMARY KEY (cluster, kind, subject, slot, node)
);
INSERT INTO rate_partials_0012 SELECT cluster, kind, subject, slot, node, bytes, records FROM rate_partials;
DROP TABLE rate_partials;
ALTER TABLE rate_partials_0012 RENAME TO rate_partials;

CREATE TABLE rate_state_0012 (
    cluster       TEXT   NOT NULL,
    kind          TEXT   NOT NULL CHECK (kind IN ('flow', 'link', 'user')),
    subject       TEXT   NOT NULL,
    window_end_ns BIGINT NOT NULL,
    avg_rate_kbps DOUBLE PRECISION NOT NULL,
    epoch         BIGINT NOT NULL,
    node          TEXT   NOT NULL,
    PRIMARY KEY (cluster, kind, subject)
);
INSERT INTO rate_state_0012 SELECT cluster, kind, subject, window_end_ns, avg_rate_kbps, epoch, node FROM rate_state;
DROP TABLE rate_state;
ALTER TABLE rate_state_0012 RENAME TO rate_state;
