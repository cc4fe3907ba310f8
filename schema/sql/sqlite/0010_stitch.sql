-- The collector cluster's `stitch` analysis (docs/cluster.md): the owner of
-- a flow-hash bucket reads its bucket's records by (bucket, id) from a
-- persisted per-bucket cursor, merges a flow's per-packet parts from
-- several DiCAP capture nodes and stitches both directions of a flow into
-- one row; cursor and output move in one fenced transaction.

-- The cluster bucket of the record's flow_hash, written by the receiving
-- node of a cluster (NULL outside a cluster: nothing to stitch).
ALTER TABLE flows ADD COLUMN bucket INTEGER;
CREATE INDEX IF NOT EXISTS flows_bucket_id ON flows (bucket, id) WHERE bucket IS NOT NULL;

-- Per bucket: every record of the bucket with id <= after_id is in
-- stitched_flows. Written with the output, by the bucket's owner in the
-- epoch it names (cluster '' is a standalone collector).
CREATE TABLE IF NOT EXISTS stitch_cursors (
    cluster    TEXT    NOT NULL,
    bucket     INTEGER NOT NULL,
    after_id   BIGINT  NOT NULL,
    epoch      BIGINT,
    node       TEXT,
    updated_ns BIGINT  NOT NULL,
    PRIMARY KEY (cluster, bucket)
);

-- One row per bidirectional flow and interval: endpoint a is the lower
-- (address, port) of the two; "ab" counts a -> b, "ba" b -> a; each way is
-- the exact sum of the parts the capture nodes exported. vlan -1: none.
CREATE TABLE IF NOT EXISTS stitched_flows (
    cluster    TEXT     NOT NULL,
    slot       BIGINT   NOT NULL,
    a_addr     TEXT     NOT NULL,
    a_port     INTEGER  NOT NULL,
    b_addr     TEXT     NOT NULL,
    b_port     INTEGER  NOT NULL,
    proto      SMALLINT NOT NULL,
    vlan       INTEGER  NOT NULL,
    interval_ns BIGINT  NOT NULL,
    bucket     INTEGER  NOT NULL,
    packets_ab BIGINT   NOT NULL,
    bytes_ab   BIGINT   NOT NULL,
    parts_ab   BIGINT   NOT NULL,
    packets_ba BIGINT   NOT NULL,
    bytes_ba   BIGINT   NOT NULL,
    parts_ba   BIGINT   NOT NULL,
    first_ns   BIGINT   NOT NULL,
    last_ns    BIGINT   NOT NULL,
    tcp_flags  INTEGER,
    node       TEXT,
    epoch      BIGINT,
    updated_ns BIGINT   NOT NULL,
    PRIMARY KEY (cluster, slot, a_addr, a_port, b_addr, b_port, proto, vlan)
);
CREATE INDEX IF NOT EXISTS stitched_flows_last_ns ON stitched_flows (last_ns);
