//! Meters on the mirrored link as real processes: the coordinator in the
//! link namespace, one node (or a plain meter) per node namespace, each
//! under its CPU cap; their records and counters read back when they stop.

use super::cgroup::CpuCap;
use super::net::{MirroredLink, COORDINATOR_PORT};
use crate::harness::NETNS_PREFIX;
use crate::procs::{wait_for_port, Proc, READY_WITHIN};
use qosloop_meter::dicap::NodeStats;
use qosloop_schema::FlowRecord;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How one node namespace runs its meter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Role {
    /// A DiCAP node of the coordinator.
    Node,
    /// A meter outside DiCAP capturing everything, `threads` rings in one
    /// PACKET_FANOUT_HASH group.
    Plain { threads: usize },
}

/// A running meter in a node namespace.
#[derive(Debug)]
pub struct Member {
    pub name: String,
    pub proc: Proc,
    pub records: PathBuf,
    pub stats: PathBuf,
    pub cap: CpuCap,
}

/// What a member left behind.
#[derive(Debug, Clone, Default)]
pub struct Collected {
    pub stats: NodeStats,
    pub records: Vec<FlowRecord>,
    pub cpu_s: f64,
}

/// The coordinator.
pub fn start_coordinator(
    link: &MirroredLink,
    meter: &Path,
    mode: &str,
    dir: &Path,
) -> anyhow::Result<(Proc, PathBuf)> {
    let report = dir.join("coordinator.jsonl");
    let args = vec![
        "--dicap-coordinator".to_string(),
        format!("0.0.0.0:{COORDINATOR_PORT}"),
        // The nodes' control networks, and the harness's port probe.
        "--dicap-allow".into(),
        "10.78.0.0/16".into(),
        "--dicap-allow".into(),
        "127.0.0.0/8".into(),
        "--dicap-mode".into(),
        mode.into(),
        "--dicap-report".into(),
        report.display().to_string(),
    ];
    let p = Proc::spawn(&link.link, meter, &args, dir.join("coordinator.log"))?;
    wait_for_port(
        &link.link,
        SocketAddr::from(([127, 0, 0, 1], COORDINATOR_PORT)),
        READY_WITHIN,
    )?;
    Ok((p, report))
}

/// Starts the meter of node namespace `i` with `role`, capped to
/// `cpu_share` of a core, busy `cost_ns` per packet.
pub fn start_member(
    link: &MirroredLink,
    meter: &Path,
    i: usize,
    role: Role,
    cpu_share: f64,
    cost_ns: u64,
    dir: &Path,
) -> anyhow::Result<Member> {
    let node = &link.nodes[i];
    let name = format!("n{i}");
    let records = dir.join(format!("{name}.jsonl"));
    let stats = dir.join(format!("{name}.json"));
    let mut args = vec![
        "--interface".to_string(),
        node.capture_if.clone(),
        "--records-out".into(),
        records.display().to_string(),
        "--capture-stats-out".into(),
        stats.display().to_string(),
        "--analysis-cost-ns".into(),
        cost_ns.to_string(),
        // One record per flow and run: no interim records, no timeouts.
        "--interim-ms".into(),
        "0".into(),
        "--idle-timeout-ms".into(),
        "600000".into(),
        "--active-timeout-ms".into(),
        "600000".into(),
    ];
    match role {
        Role::Node => args.extend([
            "--dicap-join".into(),
            node.coordinator.to_string(),
            "--dicap-node".into(),
            name.clone(),
        ]),
        Role::Plain { threads } => args.extend(["--threads".into(), threads.to_string()]),
    }
    static GROUPS: AtomicU32 = AtomicU32::new(0);
    let group = GROUPS.fetch_add(1, Ordering::Relaxed);
    let cap = CpuCap::create(
        &format!("{NETNS_PREFIX}{}-{group}-{name}", std::process::id()),
        cpu_share,
    )?;
    let proc = Proc::spawn(&node.ns, meter, &args, dir.join(format!("{name}.log")))?;
    if let Some(pid) = proc.pid() {
        cap.add(pid)?;
    }
    Ok(Member {
        name,
        proc,
        records,
        stats,
        cap,
    })
}

/// Waits until every node's log says its share is installed and the
/// coordinator has spread all buckets over `count` nodes.
pub fn wait_installed(members: &mut [Member], count: usize, report: &Path) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        for m in members.iter_mut() {
            m.proc.check_alive()?;
        }
        let installed = members.iter().all(|m| {
            std::fs::read_to_string(&m.proc.log).is_ok_and(|l| l.contains("dicap share installed"))
        });
        let spread = std::fs::read_to_string(report).is_ok_and(|r| {
            r.lines()
                .rev()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|v| v["event"] == "assigned")
                .and_then(|v| v["masks"].as_object().map(|m| m.len() == count))
                .unwrap_or(false)
        });
        if installed && spread {
            // The last node's install may be a rebalance of the others.
            std::thread::sleep(Duration::from_millis(150));
            return Ok(());
        }
        anyhow::ensure!(
            start.elapsed() < READY_WITHIN,
            "DiCAP nodes did not all install their shares within {READY_WITHIN:?} (see {})",
            report.display()
        );
        std::thread::sleep(Duration::from_millis(30));
    }
}

/// Stops a member (SIGTERM: it drains, writes its counters and records)
/// and reads what it left.
pub fn collect(mut m: Member) -> anyhow::Result<Collected> {
    m.proc.stop(Duration::from_secs(10));
    let cpu_s = m.cap.cpu_seconds()?;
    let stats: NodeStats =
        serde_json::from_str(&std::fs::read_to_string(&m.stats).map_err(|e| {
            anyhow::anyhow!(
                "{}: {e} (log: {})",
                m.stats.display(),
                crate::harness::tail_of(&m.proc.log, 5)
            )
        })?)?;
    let records = read_records(&m.records)?;
    Ok(Collected {
        stats,
        records,
        cpu_s,
    })
}

/// Flow records of a JSON Lines file.
pub fn read_records(path: &Path) -> anyhow::Result<Vec<FlowRecord>> {
    let text = std::fs::read_to_string(path)?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| anyhow::anyhow!("{}: {e}", path.display())))
        .collect()
}
