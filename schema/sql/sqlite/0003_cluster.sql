-- Collector cluster (docs/cluster.md): membership with leases on the
-- database's clock, bucket ownership per epoch, per-node partial sums of
-- the bandwidth manager's subjects, the owners' persisted EWMA state and
-- the policy the policy server publishes for the owners.

-- One database holds one cluster: its routing configuration, fixed when
-- the first node creates it; a node with another one is refused.
CREATE TABLE IF NOT EXISTS cluster_config (
    cluster    TEXT    PRIMARY KEY,
    buckets    INTEGER NOT NULL,
    routing    TEXT    NOT NULL,
    created_ns BIGINT  NOT NULL
);

ALTER TABLE cluster_members ADD COLUMN cluster TEXT NOT NULL DEFAULT '';

-- Every membership change is a new epoch; its ownership rows say which
-- node owns each bucket in it (the primary key: one owner per bucket and
-- epoch). Rows are never updated: this is the ownership log.
CREATE TABLE IF NOT EXISTS cluster_epochs (
    cluster    TEXT   NOT NULL,
    epoch      BIGINT NOT NULL,
    started_ns BIGINT NOT NULL,
    members    TEXT   NOT NULL,
    PRIMARY KEY (cluster, epoch)
);
CREATE TABLE IF NOT EXISTS cluster_ownership (
    cluster TEXT    NOT NULL,
    epoch   BIGINT  NOT NULL,
    bucket  INTEGER NOT NULL,
    node    TEXT    NOT NULL,
    PRIMARY KEY (cluster, epoch, bucket)
);

-- Bytes of each subject per window (slot = window start / interval), per
-- receiving node, added in the transaction that stores the records.
CREATE TABLE IF NOT EXISTS rate_partials (
    cluster TEXT   NOT NULL,
    kind    TEXT   NOT NULL CHECK (kind IN ('flow', 'link')),
    subject TEXT   NOT NULL,
    slot    BIGINT NOT NULL,
    node    TEXT   NOT NULL,
    bytes   DOUBLE PRECISION NOT NULL,
    records BIGINT NOT NULL,
    PRIMARY KEY (cluster, kind, subject, slot, node)
);

-- The owner's state of each subject: the end of the last window it
-- computed and the average after it, written with the rate row under
-- fencing; a new owner resumes from it.
CREATE TABLE IF NOT EXISTS rate_state (
    cluster       TEXT   NOT NULL,
    kind          TEXT   NOT NULL CHECK (kind IN ('flow', 'link')),
    subject       TEXT   NOT NULL,
    window_end_ns BIGINT NOT NULL,
    avg_rate_kbps DOUBLE PRECISION NOT NULL,
    epoch         BIGINT NOT NULL,
    node          TEXT   NOT NULL,
    PRIMARY KEY (cluster, kind, subject)
);

ALTER TABLE rates ADD COLUMN node TEXT;
ALTER TABLE rates ADD COLUMN epoch BIGINT;
-- When an owner wrote the row (the database's clock): how fresh it was.
ALTER TABLE rates ADD COLUMN computed_ns BIGINT;

-- The policy as the policy server runs it (JSON of PolicySet); owners
-- learn their subjects from it.
CREATE TABLE IF NOT EXISTS published_policy (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    version      BIGINT  NOT NULL,
    body         TEXT    NOT NULL,
    published_ns BIGINT  NOT NULL
);
