//! The DiCAP experiment (`seeds/000` §IV, Fig. 6): the same traffic
//! mirrored to 1, 2 and 4 capture nodes that split it with their socket
//! filters, at rising offered rates and packet sizes 64, 256, 512 and 1500
//! bytes, against today's single-host baseline (one meter, two rings in a
//! PACKET_FANOUT_HASH group); then a node killed mid-run.
//!
//! All nodes share this machine's two cores and one softirq path, so an
//! absolute speed-up cannot show. Independent machines are emulated: each
//! node's meter runs under a CPU cap (a cgroup) and spends a fixed
//! analysis cost per packet, so one node can analyse a fixed number of
//! packets per second, like the paper's libpcap nodes. Every packet sent
//! is accounted for: analysed by a node, dropped by its kernel ring
//! (PACKET_STATISTICS), left unanalysed by its consumer, or dropped on the
//! mirror path before any filter saw it.

pub mod cgroup;
pub mod cluster;
pub mod gen;
pub mod net;

use crate::plot::{Chart, Series};
use crate::procs::component_dir;
use cluster::{collect, start_coordinator, start_member, wait_installed, Collected, Role};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Options of `qosloop-testbed dicap`.
#[derive(Debug, Clone, clap::Args)]
pub struct DicapArgs {
    /// Directory for summary.json, report-dicap.md, the plot and the logs.
    #[arg(long)]
    pub out: PathBuf,
    /// Few, short runs (CI).
    #[arg(long)]
    pub quick: bool,
}

/// The "line rate" every packet size is offered at (its 100%).
pub const LINE_MBPS: f64 = 20.0;
/// Share of one core each node's meter may use.
pub const CPU_SHARE: f64 = 0.25;
/// Busy time per packet: with [`CPU_SHARE`], one node analyses about
/// 2,500 packets/s, half of 512-byte packets at the line rate (as the
/// paper's single libpcap node).
pub const ANALYSIS_COST_NS: u64 = 100_000;

/// One run, as `summary.json` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub nodes: usize,
    /// `flow`, `packet`, or `fanout-baseline`.
    pub mode: String,
    pub packet_bytes: usize,
    pub offered_pps: f64,
    pub achieved_pps: f64,
    pub sent: u64,
    /// Packets each node analysed.
    pub captured_per_node: Vec<u64>,
    /// Packets a node analysed outside its share (another node had them).
    pub duplicates: u64,
    pub kernel_drops: u64,
    pub kernel_drops_per_node: Vec<u64>,
    pub consumer_drops: u64,
    pub consumer_drops_per_node: Vec<u64>,
    /// Sent but accepted by no node's filter: dropped on the mirror path.
    pub path_drops: i64,
    /// Filter-accepted packets neither analysed nor dropped (0 when the
    /// counters close).
    pub unaccounted: i64,
    pub cpu_s_per_node: Vec<f64>,
    /// Analysed once, over sent.
    pub captured_fraction: f64,
}

/// The node-loss run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NodeLoss {
    pub nodes: usize,
    pub offered_pps: f64,
    pub sent: u64,
    pub killed: String,
    pub killed_at_ns: u64,
    /// From the kill to the coordinator noticing.
    pub detected_after_ms: f64,
    /// From the kill to the last new filter installed.
    pub reassigned_after_ms: f64,
    /// The coordinator's measure: last heartbeat of the lost node to the
    /// last new filter installed.
    pub uncovered_ms: f64,
    pub captured_by_survivors: u64,
    pub duplicates: u64,
    pub coordinator_events: Vec<serde_json::Value>,
}

/// `summary.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub line_mbps: f64,
    pub cpu_share_per_node: f64,
    pub analysis_cost_ns: u64,
    pub run_seconds: f64,
    pub runs: Vec<Run>,
    pub node_loss: NodeLoss,
}

struct Case {
    nodes: usize,
    mode: &'static str,
    bytes: usize,
    pps: f64,
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn line_pps(bytes: usize) -> f64 {
    LINE_MBPS * 1e6 / 8.0 / bytes as f64
}

/// Runs the experiment; writes summary.json, report-dicap.md and
/// fig6-dicap.svg/.png into `args.out`.
pub fn run(args: &DicapArgs, stop: Arc<AtomicBool>) -> anyhow::Result<Summary> {
    let meter = component_dir()?.join("qosloop-meter");
    std::fs::create_dir_all(&args.out)?;
    let (sizes, fractions, seconds): (&[usize], &[f64], f64) = if args.quick {
        (&[64, 512], &[1.0], 0.4)
    } else {
        (&[64, 256, 512, 1500], &[0.25, 0.5, 1.0], 1.5)
    };
    let node_counts: &[usize] = if args.quick { &[1, 2] } else { &[1, 2, 4] };
    let mut cases = Vec::new();
    for &bytes in sizes {
        for &f in fractions {
            let pps = line_pps(bytes) * f;
            cases.push(Case {
                nodes: 1,
                mode: "fanout-baseline",
                bytes,
                pps,
            });
            for &n in node_counts {
                cases.push(Case {
                    nodes: n,
                    mode: "flow",
                    bytes,
                    pps,
                });
            }
        }
        let top = line_pps(bytes);
        for &n in node_counts.iter().filter(|&&n| n > 1) {
            cases.push(Case {
                nodes: n,
                mode: "packet",
                bytes,
                pps: top,
            });
        }
    }
    let link = net::MirroredLink::build(4)?;
    let mut runs = Vec::new();
    for (k, case) in cases.iter().enumerate() {
        anyhow::ensure!(
            !stop.load(std::sync::atomic::Ordering::Relaxed),
            "interrupted"
        );
        let dir = args.out.join(format!(
            "run-{k:02}-{}-{}n-{}b-{:.0}pps",
            case.mode, case.nodes, case.bytes, case.pps
        ));
        std::fs::create_dir_all(&dir)?;
        let r = run_case(&link, &meter, case, seconds, &dir, &stop)?;
        println!(
            "{:<16} {} node(s) {:>5} B  offered {:>7.0} pps  achieved {:>7.0}  captured {:>5.1}%  kernel drops {:>6}  consumer drops {:>6}  path drops {:>5}  dup {}",
            r.mode, r.nodes, r.packet_bytes, r.offered_pps, r.achieved_pps,
            r.captured_fraction * 100.0, r.kernel_drops, r.consumer_drops, r.path_drops, r.duplicates
        );
        runs.push(r);
    }
    let loss_nodes = if args.quick { 2 } else { 4 };
    let loss_dir = args.out.join("node-loss");
    std::fs::create_dir_all(&loss_dir)?;
    let node_loss = run_node_loss(
        &link,
        &meter,
        loss_nodes,
        if args.quick { 1.5 } else { 3.0 },
        &loss_dir,
        &stop,
    )?;
    println!(
        "node loss: {} killed; detected after {:.0} ms, reassigned after {:.0} ms; uncovered {:.0} ms",
        node_loss.killed, node_loss.detected_after_ms, node_loss.reassigned_after_ms, node_loss.uncovered_ms
    );
    drop(link);
    let summary = Summary {
        line_mbps: LINE_MBPS,
        cpu_share_per_node: CPU_SHARE,
        analysis_cost_ns: ANALYSIS_COST_NS,
        run_seconds: seconds,
        runs,
        node_loss,
    };
    std::fs::write(
        args.out.join("summary.json"),
        serde_json::to_string_pretty(&summary)? + "\n",
    )?;
    std::fs::write(args.out.join("report-dicap.md"), report(&summary))?;
    figure(&summary).write(&args.out, "fig6-dicap")?;
    Ok(summary)
}

fn run_case(
    link: &net::MirroredLink,
    meter: &Path,
    case: &Case,
    seconds: f64,
    dir: &Path,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<Run> {
    let baseline = case.mode == "fanout-baseline";
    let coordinator = if baseline {
        None
    } else {
        Some(start_coordinator(link, meter, case.mode, dir)?)
    };
    let role = if baseline {
        Role::Plain { threads: 2 }
    } else {
        Role::Node
    };
    let mut members = Vec::new();
    for i in 0..case.nodes {
        members.push(start_member(
            link,
            meter,
            i,
            role,
            CPU_SHARE,
            ANALYSIS_COST_NS,
            dir,
        )?);
    }
    match &coordinator {
        Some((_, report)) => wait_installed(&mut members, case.nodes, report)?,
        None => std::thread::sleep(Duration::from_millis(400)),
    }
    let cpu0: Vec<f64> = members
        .iter()
        .map(|m| m.cap.cpu_seconds())
        .collect::<anyhow::Result<_>>()?;
    let load = gen::Load {
        flows: 256,
        frame_bytes: case.bytes,
        pps: case.pps,
        packets: (case.pps * seconds).ceil() as u64,
        both_directions: false,
        limit: Duration::from_secs_f64(seconds * 3.0 + 1.0),
    };
    let stop2 = stop.clone();
    let sent = link.source.run_in(move || gen::send(&load, &stop2))??;
    // Let the rings hand over their last blocks.
    std::thread::sleep(Duration::from_millis(300));
    let mut got: Vec<Collected> = Vec::new();
    for m in members {
        got.push(collect(m)?);
    }
    drop(coordinator);
    let per = |f: fn(&Collected) -> u64| got.iter().map(f).collect::<Vec<u64>>();
    let captured = per(|c| c.stats.analysed);
    let kdrops = per(|c| c.stats.kernel_drops);
    let cdrops = per(|c| c.stats.consumer_drops);
    let accepted: u64 = got.iter().map(|c| c.stats.kernel_packets).sum();
    let duplicates: u64 = got.iter().map(|c| c.stats.outside_share).sum();
    let handled: u64 =
        captured.iter().sum::<u64>() + kdrops.iter().sum::<u64>() + cdrops.iter().sum::<u64>();
    let once = captured.iter().sum::<u64>().saturating_sub(duplicates);
    Ok(Run {
        nodes: case.nodes,
        mode: case.mode.into(),
        packet_bytes: case.bytes,
        offered_pps: case.pps,
        achieved_pps: sent.packets as f64 / sent.elapsed.as_secs_f64().max(1e-9),
        sent: sent.packets,
        captured_per_node: captured,
        duplicates,
        kernel_drops: kdrops.iter().sum(),
        kernel_drops_per_node: kdrops,
        consumer_drops: cdrops.iter().sum(),
        consumer_drops_per_node: cdrops,
        path_drops: sent.packets as i64 - (accepted as i64 - duplicates as i64),
        unaccounted: accepted as i64 - handled as i64,
        cpu_s_per_node: got.iter().zip(cpu0).map(|(c, c0)| c.cpu_s - c0).collect(),
        captured_fraction: once as f64 / sent.packets.max(1) as f64,
    })
}

fn run_node_loss(
    link: &net::MirroredLink,
    meter: &Path,
    nodes: usize,
    seconds: f64,
    dir: &Path,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<NodeLoss> {
    let (coordinator, report) = start_coordinator(link, meter, "flow", dir)?;
    let mut members = Vec::new();
    for i in 0..nodes {
        members.push(start_member(link, meter, i, Role::Node, 1.0, 0, dir)?);
    }
    wait_installed(&mut members, nodes, &report)?;
    let pps = 3000.0;
    let load = gen::Load {
        flows: 256,
        frame_bytes: 256,
        pps,
        packets: (pps * seconds) as u64,
        both_directions: false,
        limit: Duration::from_secs_f64(seconds * 3.0 + 1.0),
    };
    let stop2 = stop.clone();
    let sender = link.source.spawn_in(move || gen::send(&load, &stop2))?;
    std::thread::sleep(Duration::from_secs_f64(seconds * 0.4));
    let victim = members.remove(1);
    let killed_at_ns = now_ns();
    if let Some(pid) = victim.proc.pid() {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )?;
    }
    let sent = sender
        .join()
        .map_err(|_| anyhow::anyhow!("the sender thread panicked"))???;
    std::thread::sleep(Duration::from_millis(300));
    let mut survivors = Vec::new();
    for m in members {
        survivors.push(collect(m)?);
    }
    drop(victim);
    drop(coordinator);
    let events: Vec<serde_json::Value> = std::fs::read_to_string(&report)?
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let lost = events
        .iter()
        .find(|e| e["event"] == "lost" && e["node"] == "n1")
        .ok_or_else(|| {
            anyhow::anyhow!(
                "the coordinator never reported n1 lost ({})",
                report.display()
            )
        })?;
    let covered = events
        .iter()
        .find(|e| {
            e["event"] == "covered"
                && e["because"]
                    .as_str()
                    .is_some_and(|b| b.starts_with("n1 lost"))
        })
        .ok_or_else(|| {
            anyhow::anyhow!(
                "n1's buckets were never covered again ({})",
                report.display()
            )
        })?;
    let ms = |ns: u64| ns.saturating_sub(killed_at_ns) as f64 / 1e6;
    // A field missing from the report is an error, not a 0 ms figure.
    let missing = |e: &serde_json::Value, name: &str| {
        anyhow::anyhow!(
            "the coordinator's {} event has no numeric {name} ({})",
            e["event"],
            report.display()
        )
    };
    Ok(NodeLoss {
        nodes,
        offered_pps: pps,
        sent: sent.packets,
        killed: "n1".into(),
        killed_at_ns,
        detected_after_ms: ms(lost["detected_ns"]
            .as_u64()
            .ok_or_else(|| missing(lost, "detected_ns"))?),
        reassigned_after_ms: ms(covered["covered_ns"]
            .as_u64()
            .ok_or_else(|| missing(covered, "covered_ns"))?),
        uncovered_ms: covered["uncovered_ms"]
            .as_f64()
            .ok_or_else(|| missing(covered, "uncovered_ms"))?,
        captured_by_survivors: survivors.iter().map(|c| c.stats.analysed).sum(),
        duplicates: survivors.iter().map(|c| c.stats.outside_share).sum(),
        coordinator_events: events,
    })
}

fn report(s: &Summary) -> String {
    let mut r = String::new();
    let _ = writeln!(
        r,
        "# DiCAP: fraction of packets captured (seeds/000 Fig. 6)\n"
    );
    let _ = writeln!(
        r,
        "Line rate {} Mbit/s per packet size; each node's meter capped to {:.0}% of a core \
         (cgroup) with {} µs of emulated analysis per packet; {} s per run. \
         Nodes share this machine: the caps emulate separate machines.\n",
        s.line_mbps,
        s.cpu_share_per_node * 100.0,
        s.analysis_cost_ns / 1000,
        s.run_seconds
    );
    let _ = writeln!(r, "| mode | nodes | bytes | offered pps | achieved pps | sent | captured % | kernel drops | consumer drops | path drops | duplicates | CPU s per node |");
    let _ = writeln!(r, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for x in &s.runs {
        let cpu: Vec<String> = x.cpu_s_per_node.iter().map(|c| format!("{c:.2}")).collect();
        let _ = writeln!(
            r,
            "| {} | {} | {} | {:.0} | {:.0} | {} | {:.1} | {} | {} | {} | {} | {} |",
            x.mode,
            x.nodes,
            x.packet_bytes,
            x.offered_pps,
            x.achieved_pps,
            x.sent,
            x.captured_fraction * 100.0,
            x.kernel_drops,
            x.consumer_drops,
            x.path_drops,
            x.duplicates,
            cpu.join(" / ")
        );
    }
    let l = &s.node_loss;
    let _ = writeln!(
        r,
        "\nNode loss: {} of {} nodes killed (SIGKILL) at {} pps; detected after {:.0} ms, \
         its buckets reinstalled on the others after {:.0} ms; uncovered window (last heartbeat \
         to last install) {:.0} ms; survivors captured {} of {} packets, {} twice.",
        l.killed,
        l.nodes,
        l.offered_pps,
        l.detected_after_ms,
        l.reassigned_after_ms,
        l.uncovered_ms,
        l.captured_by_survivors,
        l.sent,
        l.duplicates
    );
    r
}

fn figure(s: &Summary) -> Chart {
    let colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"];
    let mut series = Vec::new();
    let mut kinds: Vec<(String, usize)> = vec![("fanout-baseline".into(), 1)];
    for n in [1, 2, 4] {
        kinds.push(("flow".into(), n));
    }
    for (c, (mode, nodes)) in kinds.iter().enumerate() {
        let mut points: Vec<(f64, f64)> = s
            .runs
            .iter()
            .filter(|r| &r.mode == mode && r.nodes == *nodes)
            .filter(|r| (r.offered_pps - line_pps(r.packet_bytes)).abs() < 1.0)
            .map(|r| (r.packet_bytes as f64, r.captured_fraction * 100.0))
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        if points.is_empty() {
            continue;
        }
        let name = if mode == "flow" {
            format!("DiCAP, {nodes} node(s)")
        } else {
            "1 node, PACKET_FANOUT_HASH (2 rings)".into()
        };
        series.push(Series {
            name,
            color: colors[c % colors.len()],
            points,
        });
    }
    Chart {
        title: format!(
            "Packets captured at {} Mbit/s (seeds/000 Fig. 6)",
            s.line_mbps
        ),
        x_label: "packet size (bytes)".into(),
        y_label: "captured (%)".into(),
        series,
        hlines: Vec::new(),
        spans: Vec::new(),
    }
}
