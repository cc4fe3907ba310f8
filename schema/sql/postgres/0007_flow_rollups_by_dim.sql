-- Per-minute rollups of `flows` by one dimension at a time (and by none:
-- the minute's totals), kept by the flow writer in the same transaction as
-- the rows and `flows_1m` (qosloop_store, flows/rollup_dim.rs). `flows_1m`
-- keys a row by every dimension at once, so with many hosts it is nearly as
-- long as the raw table; most console queries group and filter on one
-- dimension, and this table answers those from one row per minute and value.
-- `dim` names the dimension ('total', 'exporter', 'src_addr', 'dst_addr',
-- 'dst_port', 'proto', 'dscp', 'vlan', 'class', 'user', 'process'); only
-- that dimension's column is set (the others are NULL, and a query reads a
-- `dim` only for that column). `dim_key` is an exact text of the value
-- ('-' for NULL, '=' and the value otherwise) that the writer's upserts merge
-- on; the backfill below (from `flows_1m`, which holds every row written)
-- prefixes its keys with 'b', so they never merge with the writer's and
-- every sum stays exact. Like `flows_1m`, not dropped with the raw rows.
CREATE TABLE IF NOT EXISTS flows_1m_dim (
    dim          TEXT     NOT NULL,
    minute_ns    BIGINT   NOT NULL,
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
    PRIMARY KEY (dim, minute_ns, dim_key)
);

INSERT INTO flows_1m_dim (dim, minute_ns, dim_key, exporter_id, src_addr, dst_addr, dst_port,
                          proto, dscp, vlan, class, "user", process, bytes, packets, flows)
SELECT 'total', minute_ns, 'b-',
       NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       SUM(bytes), SUM(packets), SUM(flows)
FROM flows_1m GROUP BY minute_ns;

INSERT INTO flows_1m_dim (dim, minute_ns, dim_key, exporter_id, src_addr, dst_addr, dst_port,
                          proto, dscp, vlan, class, "user", process, bytes, packets, flows)
SELECT 'exporter', minute_ns, 'b' || COALESCE('=' || CAST(exporter_id AS TEXT), '-'),
       exporter_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       SUM(bytes), SUM(packets), SUM(flows)
FROM flows_1m GROUP BY minute_ns, exporter_id;

INSERT INTO flows_1m_dim (dim, minute_ns, dim_key, exporter_id, src_addr, dst_addr, dst_port,
                          proto, dscp, vlan, class, "user", process, bytes, packets, flows)
SELECT 'src_addr', minute_ns, 'b' || COALESCE('=' || host(src_addr), '-'),
       NULL, src_addr, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       SUM(bytes), SUM(packets), SUM(flows)
FROM flows_1m GROUP BY minute_ns, src_addr;

INSERT INTO flows_1m_dim (dim, minute_ns, dim_key, exporter_id, src_addr, dst_addr, dst_port,
                          proto, dscp, vlan, class, "user", process, bytes, packets, flows)
SELECT 'dst_addr', minute_ns, 'b' || COALESCE('=' || host(dst_addr), '-'),
       NULL, NULL, dst_addr, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       SUM(bytes), SUM(packets), SUM(flows)
FROM flows_1m GROUP BY minute_ns, dst_addr;

INSERT INTO flows_1m_dim (dim, minute_ns, dim_key, exporter_id, src_addr, dst_addr, dst_port,
                          proto, dscp, vlan, class, "user", process, bytes, packets, flows)
SELECT 'dst_port', minute_ns, 'b' || COALESCE('=' || CAST(dst_port AS TEXT), '-'),
       NULL, NULL, NULL, dst_port, NULL, NULL, NULL, NULL, NULL, NULL,
       SUM(bytes), SUM(packets), SUM(flows)
FROM flows_1m GROUP BY minute_ns, dst_port;

INSERT INTO flows_1m_dim (dim, minute_ns, dim_key, exporter_id, src_addr, dst_addr, dst_port,
                          proto, dscp, vlan, class, "user", process, bytes, packets, flows)
SELECT 'proto', minute_ns, 'b' || COALESCE('=' || CAST(proto AS TEXT), '-'),
       NULL, NULL, NULL, NULL, proto, NULL, NULL, NULL, NULL, NULL,
       SUM(bytes), SUM(packets), SUM(flows)
FROM flows_1m GROUP BY minute_ns, proto;

INSERT INTO flows_1m_dim (dim, minute_ns, dim_key, exporter_id, src_addr, dst_addr, dst_port,
                          proto, dscp, vlan, class, "user", process, bytes, packets, flows)
SELECT 'dscp', minute_ns, 'b' || COALESCE('=' || CAST(dscp AS TEXT), '-'),
       NULL, NULL, NULL, NULL, NULL, dscp, NULL, NULL, NULL, NULL,
       SUM(bytes), SUM(packets), SUM(flows)
FROM flows_1m GROUP BY minute_ns, dscp;

INSERT INTO flows_1m_dim (dim, minute_ns, dim_key, exporter_id, src_addr, dst_addr, dst_port,
                          proto, dscp, vlan, class, "user", process, bytes, packets, flows)
SELECT 'vlan', minute_ns, 'b' || COALESCE('=' || CAST(vlan AS TEXT), '-'),
       NULL, NULL, NULL, NULL, NULL, NULL, vlan, NULL, NULL, NULL,
       SUM(bytes), SUM(packets), SUM(flows)
FROM flows_1m GROUP BY minute_ns, vlan;

INSERT INTO flows_1m_dim (dim, minute_ns, dim_key, exporter_id, src_addr, dst_addr, dst_port,
                          proto, dscp, vlan, class, "user", process, bytes, packets, flows)
SELECT 'class', minute_ns, 'b' || COALESCE('=' || class, '-'),
       NULL, NULL, NULL, NULL, NULL, NULL, NULL, class, NULL, NULL,
       SUM(bytes), SUM(packets), SUM(flows)
FROM flows_1m GROUP BY minute_ns, class;

INSERT INTO flows_1m_dim (dim, minute_ns, dim_key, exporter_id, src_addr, dst_addr, dst_port,
                          proto, dscp, vlan, class, "user", process, bytes, packets, flows)
SELECT 'user', minute_ns, 'b' || COALESCE('=' || "user", '-'),
       NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, "user", NULL,
       SUM(bytes), SUM(packets), SUM(flows)
FROM flows_1m GROUP BY minute_ns, "user";

INSERT INTO flows_1m_dim (dim, minute_ns, dim_key, exporter_id, src_addr, dst_addr, dst_port,
                          proto, dscp, vlan, class, "user", process, bytes, packets, flows)
SELECT 'process', minute_ns, 'b' || COALESCE('=' || process, '-'),
       NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, process,
       SUM(bytes), SUM(packets), SUM(flows)
FROM flows_1m GROUP BY minute_ns, process;
