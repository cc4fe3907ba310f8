-- Retention on SQLite: rows older than the configured age are deleted in
-- bounded chunks (by flows_end_ns); there are no partitions. What each
-- maintenance run did is recorded, as on PostgreSQL.
CREATE TABLE IF NOT EXISTS flow_maintenance (
    id                 INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ns              INTEGER NOT NULL,
    node               TEXT    NOT NULL,
    before_ns          INTEGER,
    partitions_created INTEGER NOT NULL,
    partitions_dropped INTEGER NOT NULL,
    rows_deleted       INTEGER NOT NULL
);
