//! Every test that runs or links more than one daemon (meter, collector,
//! exporter, policy server, enforcer), and the testbed's own experiments and
//! harness checks: one binary. Modules moved from a daemon crate carry its name
//! as a prefix.

// Tests: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

// The policy server's test fixtures (fake PEP, server start, HTTP get), shared
// with the tests of its own crate.
#[path = "../../../policy-server/tests/it/common.rs"]
mod policy_common;

mod architecture;
mod bench_cluster;
mod cluster_support;
mod collector_cluster;
mod collector_cluster_policy;
mod collector_cluster_skew;
mod collector_cluster_stitch;
mod collector_cluster_users;
mod collector_common;
mod collector_export_inprocess;
mod collector_export_reliability;
mod collector_hostile_binary;
mod collector_hostile_peers;
mod collector_ipfix_ingest;
mod collector_ipfix_sinks;
mod collector_metrics;
mod collector_pg_outage;
mod cops_tls;
mod dicap;
mod dicap_changes;
mod dpmi_lab;
mod enforcer_counters;
mod enforcer_router_by_mapping;
mod experiments;
mod harness;
mod hostile;
mod ipfix_roundtrip;
mod kb;
mod ldap;
mod paper;
mod per_user_chain;
mod policy_console_meter;
mod policy_dpmi;
mod policy_dpmi_secure;
mod policy_dpmi_v6;
mod topology;
