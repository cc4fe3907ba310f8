//! SQL migrations for the two storage dialects.
//!
//! The SQL lives in `schema/sql/{sqlite,postgres}/NNNN_name.sql` and is
//! embedded here; whoever owns a database connection applies the migrations
//! in order, each once, recording them in `schema_migrations`.

/// A database dialect qosloop stores into.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// One migration: applied once, in `version` order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub sql: &'static str,
}

const SQLITE: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial",
        sql: include_str!("../sql/sqlite/0001_initial.sql"),
    },
    Migration {
        version: 2,
        name: "ipfix_ingest",
        sql: include_str!("../sql/sqlite/0002_ipfix_ingest.sql"),
    },
    Migration {
        version: 3,
        name: "cluster",
        sql: include_str!("../sql/sqlite/0003_cluster.sql"),
    },
    Migration {
        version: 4,
        name: "flow_retention",
        sql: include_str!("../sql/sqlite/0004_flow_retention.sql"),
    },
    Migration {
        version: 5,
        name: "dpmi",
        sql: include_str!("../sql/sqlite/0005_dpmi.sql"),
    },
    Migration {
        version: 6,
        name: "flow_rollups",
        sql: include_str!("../sql/sqlite/0006_flow_rollups.sql"),
    },
    Migration {
        version: 7,
        name: "flow_rollups_by_dim",
        sql: include_str!("../sql/sqlite/0007_flow_rollups_by_dim.sql"),
    },
    Migration {
        version: 8,
        name: "knowledge_base",
        sql: include_str!("../sql/sqlite/0008_knowledge_base.sql"),
    },
    Migration {
        version: 9,
        name: "enforcer_counters",
        sql: include_str!("../sql/sqlite/0009_enforcer_counters.sql"),
    },
    Migration {
        version: 10,
        name: "stitch",
        sql: include_str!("../sql/sqlite/0010_stitch.sql"),
    },
    Migration {
        version: 11,
        name: "flow_rollups_by_hour",
        sql: include_str!("../sql/sqlite/0011_flow_rollups_by_hour.sql"),
    },
    Migration {
        version: 12,
        name: "user_subjects",
        sql: include_str!("../sql/sqlite/0012_user_subjects.sql"),
    },
    Migration {
        version: 13,
        name: "enforcer_classes",
        sql: include_str!("../sql/sqlite/0013_enforcer_classes.sql"),
    },
];

const POSTGRES: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial",
        sql: include_str!("../sql/postgres/0001_initial.sql"),
    },
    Migration {
        version: 2,
        name: "ipfix_ingest",
        sql: include_str!("../sql/postgres/0002_ipfix_ingest.sql"),
    },
    Migration {
        version: 3,
        name: "cluster",
        sql: include_str!("../sql/postgres/0003_cluster.sql"),
    },
    Migration {
        version: 4,
        name: "flow_retention",
        sql: include_str!("../sql/postgres/0004_flow_retention.sql"),
    },
    Migration {
        version: 5,
        name: "dpmi",
        sql: include_str!("../sql/postgres/0005_dpmi.sql"),
    },
    Migration {
        version: 6,
        name: "flow_rollups",
        sql: include_str!("../sql/postgres/0006_flow_rollups.sql"),
    },
    Migration {
        version: 7,
        name: "flow_rollups_by_dim",
        sql: include_str!("../sql/postgres/0007_flow_rollups_by_dim.sql"),
    },
    Migration {
        version: 8,
        name: "knowledge_base",
        sql: include_str!("../sql/postgres/0008_knowledge_base.sql"),
    },
    Migration {
        version: 9,
        name: "enforcer_counters",
        sql: include_str!("../sql/postgres/0009_enforcer_counters.sql"),
    },
    Migration {
        version: 10,
        name: "stitch",
        sql: include_str!("../sql/postgres/0010_stitch.sql"),
    },
    Migration {
        version: 11,
        name: "flow_rollups_by_hour",
        sql: include_str!("../sql/postgres/0011_flow_rollups_by_hour.sql"),
    },
    Migration {
        version: 12,
        name: "user_subjects",
        sql: include_str!("../sql/postgres/0012_user_subjects.sql"),
    },
    Migration {
        version: 13,
        name: "enforcer_classes",
        sql: include_str!("../sql/postgres/0013_enforcer_classes.sql"),
    },
];

/// The migrations of `dialect`, oldest first.
pub fn migrations(dialect: Dialect) -> &'static [Migration] {
    match dialect {
        Dialect::Sqlite => SQLITE,
        Dialect::Postgres => POSTGRES,
    }
}

/// The DDL that creates the bookkeeping table of applied migrations.
pub const MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (\
    version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at_ns BIGINT NOT NULL)";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_increase_and_both_dialects_agree() {
        for d in [Dialect::Sqlite, Dialect::Postgres] {
            let m = migrations(d);
            assert!(!m.is_empty());
            assert!(m.windows(2).all(|w| w[0].version < w[1].version));
        }
        let names = |d| {
            migrations(d)
                .iter()
                .map(|m| (m.version, m.name))
                .collect::<Vec<_>>()
        };
        assert_eq!(names(Dialect::Sqlite), names(Dialect::Postgres));
    }

    #[test]
    fn both_dialects_have_the_contract_columns() {
        for d in [Dialect::Sqlite, Dialect::Postgres] {
            let sql = migrations(d)[0].sql;
            for col in [
                "src_addr",
                "dst_addr",
                "src_port",
                "dst_port",
                "proto",
                "packets",
                "bytes",
                "start_ns",
                "end_ns",
                "vlan",
                "dscp",
                "tcp_flags",
                "class",
                "\"user\"",
                "process",
                "exporter_id",
                "session_id",
                "seq",
            ] {
                assert!(sql.contains(col), "{d:?} flows lacks {col}");
            }
        }
    }
}
