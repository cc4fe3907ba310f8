-- Per-minute rollups of `flows`, kept by the flow writer in the same
-- transaction as the rows (qosloop_store, flows/rollup.rs). One row per
-- minute (of end_ns) and combination of the dimensions the console groups
-- on: every column of `flows` but src_port, tcp_flags, start_ns and the
-- message keys. Counters are scaled by the sampling interval; `flows` is
-- the number of raw rows. `dims_key` is an exact encoding of the dimension
-- columns that the writer's upserts merge on; rows written by this
-- migration's backfill carry keys of their own ('b' …), so they never merge
-- with the writer's, and every sum over them stays exact.
CREATE TABLE IF NOT EXISTS flows_1m (
    minute_ns    BIGINT  NOT NULL,
    dims_key     TEXT    NOT NULL,
    exporter_id  BIGINT  NOT NULL,
    src_addr     TEXT    NOT NULL,
    dst_addr     TEXT    NOT NULL,
    dst_port     INTEGER NOT NULL,
    proto        INTEGER NOT NULL,
    dscp         INTEGER,
    vlan         INTEGER,
    class        TEXT,
    "user"       TEXT,
    process      TEXT,
    bytes        BIGINT  NOT NULL,
    packets      BIGINT  NOT NULL,
    flows        BIGINT  NOT NULL,
    PRIMARY KEY (minute_ns, dims_key)
);

INSERT INTO flows_1m (minute_ns, dims_key, exporter_id, src_addr, dst_addr, dst_port, proto,
                      dscp, vlan, class, "user", process, bytes, packets, flows)
SELECT (end_ns / 60000000000) * 60000000000,
       'b' || exporter_id || '|' || src_addr || '|' || dst_addr || '|' || dst_port || '|' || proto
           || '|' || COALESCE(CAST(dscp AS TEXT), '-') || '|' || COALESCE(CAST(vlan AS TEXT), '-')
           || '|' || COALESCE(length(class) || ':' || class, '-')
           || '|' || COALESCE(length("user") || ':' || "user", '-')
           || '|' || COALESCE(length(process) || ':' || process, '-'),
       exporter_id, src_addr, dst_addr, dst_port, proto, dscp, vlan, class, "user", process,
       SUM(CASE WHEN sampling_interval > 1 THEN bytes * sampling_interval ELSE bytes END),
       SUM(CASE WHEN sampling_interval > 1 THEN packets * sampling_interval ELSE packets END),
       COUNT(*)
FROM flows
GROUP BY 1, exporter_id, src_addr, dst_addr, dst_port, proto, dscp, vlan, class, "user", process;
