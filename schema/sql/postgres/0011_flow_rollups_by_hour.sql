-- The hourly level of the rollups by one dimension (`flows_1h_dim`): the
-- rows of `flows_1m_dim` (migration 0007) summed by hour, kept by the flow
-- writer in the same transaction as the rows and both minute rollups
-- (qosloop_store, flows/rollup_dim.rs). The console ranks the top values of
-- a long range here (24 rows a day per value instead of 1,440): whole hours
-- from this table, the minutes at the range's edges from `flows_1m_dim`.
-- Columns and keys are those of `flows_1m_dim`; `hour_ns` is the start of
-- the hour (a multiple of 3,600 s in ns). The backfill below sums
-- `flows_1m_dim` by hour keeping its `dim_key` (the writer's '=v'/'-' and
-- the 0007 backfill's 'b=v'/'b-'): the writer's upserts then add to the
-- rows of their own keys, and every sum stays exact.
CREATE TABLE IF NOT EXISTS flows_1h_dim (
    dim          TEXT     NOT NULL,
    hour_ns      BIGINT   NOT NULL,
    dim_key      TEXT     NOT NULL,
    exporter_id  BIGINT,
    src_addr     INET,
    dst_addr     INET,
    dst_port     INTEGER,
    proto        SMALLINT,
    dscp         SMALLINT,
    vlan         INTEGER,
    class        TEXT,
    "user"       TEXT,
    process      TEXT,
    bytes        BIGINT   NOT NULL,
    packets      BIGINT   NOT NULL,
    flows        BIGINT   NOT NULL,
    PRIMARY KEY (dim, hour_ns, dim_key)
);

INSERT INTO flows_1h_dim (dim, hour_ns, dim_key, exporter_id, src_addr, dst_addr, dst_port,
                          proto, dscp, vlan, class, "user", process, bytes, packets, flows)
SELECT dim, minute_ns - (minute_ns % 3600000000000), dim_key,
       MIN(exporter_id), MIN(src_addr), MIN(dst_addr), MIN(dst_port), MIN(proto), MIN(dscp),
       MIN(vlan), MIN(class), MIN("user"), MIN(process),
       SUM(bytes), SUM(packets), SUM(flows)
FROM flows_1m_dim
GROUP BY dim, minute_ns - (minute_ns % 3600000000000), dim_key;

-- The minutes of one value of a dimension, in time order: the console's
-- stacked series reads the top values' minutes through it (a few thousand
-- rows a day) instead of every value's.
CREATE INDEX IF NOT EXISTS flows_1m_dim_by_key ON flows_1m_dim (dim, dim_key, minute_ns);
