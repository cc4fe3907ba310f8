//! The loss experiment of `seeds/004` Fig. 11: one UDP flow of 1024-byte
//! datagrams at stepped rates through the enforced edge router (the
//! enforcer's HTB tree at the 10 Mbit/s link rate on the router's egress,
//! the sample decision installed), loss against offered throughput. The
//! paper's router lost packets above 7.8 of 10 Mbit/s; qosloop's kernel path
//! must stay loss-free to at least 95% of the link.

use crate::harness::is_root;
use crate::plot::{Chart, Series};
use crate::procs::component_dir;
use crate::topology::{Side, Topology};
use crate::traffic::{generate, sink, stop_flag, FlowGen, Schedule};
use qosloop_schema::{
    Decision, DecisionReason, Dscp, FlowSpec, Kbps, OutOfProfileAction, TrafficProfile,
};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Options of `qosloop-testbed loss`.
#[derive(Debug, Clone, clap::Args)]
pub struct LossArgs {
    /// Directory for loss.json, fig11-loss.svg/.png and report-loss.md.
    #[arg(long)]
    pub out: PathBuf,
    /// Fewer, shorter steps.
    #[arg(long)]
    pub quick: bool,
    /// Send with iperf3 (UDP, 1024-byte payloads, loss from its server's
    /// report) instead of qosloop's own generator.
    #[arg(long)]
    pub iperf3: bool,
}

/// One step of offered load.
#[derive(Debug, Clone, Serialize)]
pub struct LossStep {
    pub offered_mbps: f64,
    /// Rates over the sender's wall-clock time: the figure, not the
    /// contract (a busy host sends below the offered rate).
    pub sent_mbps: f64,
    pub received_mbps: f64,
    pub sent_packets: u64,
    pub lost_packets: u64,
    pub loss_pct: f64,
    /// IP payload bytes sent and received (the contract: equal).
    pub sent_bytes: u64,
    pub received_bytes: u64,
    /// Packets the sender did not send because it fell behind its
    /// schedule (qosloop's generator; 0 for iperf3, which does not say).
    pub skipped_packets: u64,
}

/// `loss.json`.
#[derive(Debug, Clone, Serialize)]
pub struct LossSummary {
    pub link_mbps: f64,
    pub datagram_bytes: usize,
    pub steps: Vec<LossStep>,
    /// Highest offered rate with no loss, as a share of the link.
    pub loss_free_up_to_pct: f64,
}

const LINK_MBPS: f64 = 10.0;
const DATAGRAM: usize = 1024;

/// The sample policy's decision for the policed flow, as the enforcer
/// would get it under low load.
pub fn sample_decision() -> Decision {
    Decision {
        id: 1,
        version: 1,
        role: "edge".into(),
        policy_dn: "cn=policed-flow,ou=rules,dc=qosloop,dc=example".into(),
        flow: FlowSpec {
            src: "10.71.1.2".parse().ok(),
            dst: "10.71.2.2".parse().ok(),
            proto: Some(17),
            src_ports: None,
            dst_ports: "4055".parse().ok(),
            user: None,
        },
        profile: TrafficProfile {
            rate: Kbps(1000),
            burst_bytes: 15_000,
        },
        in_profile_dscp: Some(Dscp::CS6),
        out_of_profile: OutOfProfileAction::Accept {
            shape: Some(Kbps(875)),
        },
        reason: DecisionReason {
            rate_kbps: 0.0,
            avg_rate_kbps: 0.0,
            link: "edge-ingress".into(),
            link_load_kbps: 0.0,
            band: "low".into(),
        },
        issued_ns: 0,
    }
}

pub fn run(args: &LossArgs, stop: Arc<AtomicBool>) -> anyhow::Result<LossSummary> {
    anyhow::ensure!(
        is_root(),
        "the testbed creates network namespaces: run it as root"
    );
    let bin = component_dir()?;
    let topo = Topology::paper();
    topo.preflight()?;
    std::fs::create_dir_all(&args.out)?;
    let tb = topo.build()?;
    let egress = tb.interface("r-rx", Side::A)?.to_owned();
    let decisions = args.out.join("decisions.json");
    std::fs::write(
        &decisions,
        serde_json::to_string_pretty(&vec![sample_decision()])?,
    )?;
    let out = tb
        .ns("router")?
        .command(&bin.join("qosloop-enforcer").display().to_string())
        .args([
            "apply",
            "--interface",
            &egress,
            "--capacity",
            "10mbit",
            "--decisions",
        ])
        .arg(&decisions)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "qosloop-enforcer apply failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );

    if args.iperf3 {
        return finish(args, iperf3_steps(&tb, &rates_for(args), args, &stop)?);
    }
    let rates = rates_for(args);
    let step = Duration::from_secs(if args.quick { 2 } else { 4 });
    let sink_stop = stop_flag();
    let ss = sink_stop.clone();
    let limit = step * rates.len() as u32 * 3 + Duration::from_secs(10);
    let rx = tb.ns("rx")?.spawn_in(move || sink(&[5001], &ss, limit))?;
    std::thread::sleep(Duration::from_millis(300));
    let mut sent = Vec::new();
    for (i, mbps) in rates.iter().enumerate() {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        eprintln!("loss: step {}/{}: {mbps} Mbit/s", i + 1, rates.len());
        let flow = FlowGen {
            id: i as u16 + 1,
            bind: "10.71.1.2:5001".parse()?,
            dst: "10.71.2.2:5001".parse()?,
            packet_len: DATAGRAM,
            dscp: 0,
            schedule: Schedule::constant(mbps * 1e6 / 8.0 / DATAGRAM as f64, step),
        };
        let st = stop.clone();
        let r = tb.ns("tx")?.run_in(move || generate(&flow, &st))??;
        sent.push(r);
        // Let the queues drain between steps.
        std::thread::sleep(Duration::from_millis(300));
    }
    std::thread::sleep(Duration::from_millis(500));
    sink_stop.store(true, Ordering::Relaxed);
    let got = match rx.join() {
        Ok(Ok(r)) => r?,
        Ok(Err(e)) => return Err(e.into()),
        Err(_) => anyhow::bail!("the sink panicked"),
    };
    anyhow::ensure!(!stop.load(Ordering::Relaxed), "interrupted");
    let steps: Vec<LossStep> = rates
        .iter()
        .zip(&sent)
        .map(|(mbps, s)| {
            let f = got.flows.get(&s.flow).cloned().unwrap_or_default();
            let lost = s.packets.saturating_sub(f.packets);
            LossStep {
                offered_mbps: *mbps,
                sent_mbps: s.bytes as f64 * 8.0 / 1e6 / s.elapsed_s.max(1e-9),
                received_mbps: f.bytes as f64 * 8.0 / 1e6 / s.elapsed_s.max(1e-9),
                sent_packets: s.packets,
                lost_packets: lost,
                loss_pct: 100.0 * lost as f64 / s.packets.max(1) as f64,
                sent_bytes: s.bytes,
                received_bytes: f.bytes,
                skipped_packets: s.skipped,
            }
        })
        .collect();
    finish(args, steps)
}

fn rates_for(args: &LossArgs) -> Vec<f64> {
    if args.quick {
        vec![2.0, 5.0, 7.8, 9.0, 9.5]
    } else {
        vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 7.8, 8.5, 9.0, 9.5, 9.8]
    }
}

/// One iperf3 run per step: a one-off server in rx, the client in tx.
fn iperf3_steps(
    tb: &crate::topology::Testbed,
    rates: &[f64],
    args: &LossArgs,
    stop: &AtomicBool,
) -> anyhow::Result<Vec<LossStep>> {
    crate::harness::require_binary("iperf3", "iperf3").map_err(anyhow::Error::msg)?;
    let secs = if args.quick { 2 } else { 4 };
    let mut steps = Vec::new();
    for (i, mbps) in rates.iter().enumerate() {
        anyhow::ensure!(!stop.load(Ordering::Relaxed), "interrupted");
        eprintln!(
            "loss (iperf3): step {}/{}: {mbps} Mbit/s",
            i + 1,
            rates.len()
        );
        let mut server = crate::procs::Proc::spawn(
            tb.ns("rx")?,
            std::path::Path::new("iperf3"),
            &["-s".into(), "-p".into(), "5201".into()],
            args.out.join(format!("iperf3-server-{i}.log")),
        )?;
        // A probe connection would count as a test to iperf3: retry the
        // client instead while the server starts.
        let mut out = None;
        for _ in 0..20 {
            std::thread::sleep(Duration::from_millis(150));
            let o = tb
                .ns("tx")?
                .command("iperf3")
                .args([
                    "-c",
                    "10.71.2.2",
                    "-p",
                    "5201",
                    "-u",
                    "-l",
                    "1024",
                    "--json",
                ])
                .arg("-b")
                .arg(format!("{}K", (mbps * 1000.0) as u64))
                .arg("-t")
                .arg(secs.to_string())
                .output()?;
            let refused = String::from_utf8_lossy(&o.stdout).contains("Connection refused");
            out = Some(o);
            if !refused {
                break;
            }
        }
        server.stop(Duration::from_secs(2));
        let out = out.ok_or_else(|| anyhow::anyhow!("iperf3 client did not run"))?;
        anyhow::ensure!(
            out.status.success(),
            "iperf3 client failed: {}",
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .join(" ")
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let sum = &v["end"]["sum"];
        let num = |k: &str| sum[k].as_f64().unwrap_or(0.0);
        let sent_packets = num("packets") as u64;
        let lost = num("lost_packets") as u64;
        let seconds = num("seconds").max(1e-9);
        steps.push(LossStep {
            offered_mbps: *mbps,
            sent_mbps: num("bits_per_second") / 1e6,
            received_mbps: (sent_packets.saturating_sub(lost)) as f64 * 1024.0 * 8.0
                / 1e6
                / seconds,
            sent_packets,
            lost_packets: lost,
            loss_pct: num("lost_percent"),
            sent_bytes: sent_packets * 1024,
            received_bytes: sent_packets.saturating_sub(lost) * 1024,
            skipped_packets: 0,
        });
    }
    Ok(steps)
}

fn finish(args: &LossArgs, steps: Vec<LossStep>) -> anyhow::Result<LossSummary> {
    let loss_free_up_to_pct = steps
        .iter()
        .take_while(|s| s.lost_packets == 0)
        .map(|s| s.offered_mbps / LINK_MBPS * 100.0)
        .fold(0.0, f64::max);
    let summary = LossSummary {
        link_mbps: LINK_MBPS,
        datagram_bytes: DATAGRAM,
        steps,
        loss_free_up_to_pct,
    };
    std::fs::write(
        args.out.join("loss.json"),
        serde_json::to_string_pretty(&summary)?,
    )?;
    let chart = Chart {
        title: "Fig. 11 — packet loss through the enforced router".into(),
        x_label: "offered throughput (Mbit/s)".into(),
        y_label: "loss (%)".into(),
        series: vec![Series {
            name: if args.iperf3 {
                "qosloop (HTB + nftables), iperf3 source".into()
            } else {
                "qosloop (HTB + nftables)".into()
            },
            color: "#1f77b4",
            points: summary
                .steps
                .iter()
                .map(|s| (s.offered_mbps, s.loss_pct))
                .collect(),
        }],
        hlines: vec![],
        spans: vec![crate::plot::Span {
            x0: 7.8,
            x1: 7.85,
            label: "paper: loss from 7.8".into(),
            color: "#d62728",
        }],
    };
    chart.write(&args.out, "fig11-loss")?;
    let mut md = String::from("# Loss against offered throughput (seeds/004 Fig. 11)\n\n| offered (Mbit/s) | sent | received | lost packets | loss |\n|---|---|---|---|---|\n");
    for s in &summary.steps {
        md.push_str(&format!(
            "| {:.1} | {:.2} | {:.2} | {} | {:.2}% |\n",
            s.offered_mbps, s.sent_mbps, s.received_mbps, s.lost_packets, s.loss_pct
        ));
    }
    md.push_str(&format!(
        "\nLoss-free up to {:.0}% of the {LINK_MBPS} Mbit/s link; the paper's XORP+Click router lost packets above 7.8 Mbit/s (78%).\n",
        summary.loss_free_up_to_pct
    ));
    std::fs::write(args.out.join("report-loss.md"), md)?;
    Ok(summary)
}
