//! Reconfiguration time per decision change, as a distribution (the
//! paper's router took ~45 µs): the enforcer library applies alternating
//! decisions on a router namespace's egress, and each apply is timed from
//! the call to the kernel's last answer. Two kinds of change are measured
//! apart: a shape-rate change (one HTB class message) and a change of the
//! out-of-profile action (accept → re-mark → drop), which is an nftables
//! transaction as well.

use crate::harness::{is_root, Netns, VethPair};
use crate::loss::sample_decision;
use crate::paper::Percentiles;
use crate::plot::{Chart, Series};
use qosloop_enforcer::{Enforcer, EnforcerConfig, LinuxBackend, DEFAULT_QDISC_MAJOR};
use qosloop_schema::{Dscp, Kbps, OutOfProfileAction};
use serde::Serialize;
use std::path::PathBuf;

/// Options of `qosloop-testbed reconfig`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReconfigArgs {
    /// Directory for reconfig.json and reconfig.svg/.png.
    #[arg(long)]
    pub out: PathBuf,
    /// Rate changes to time.
    #[arg(long, default_value_t = 1000)]
    pub rate_changes: usize,
    /// Action changes to time.
    #[arg(long, default_value_t = 60)]
    pub action_changes: usize,
}

/// `reconfig.json`: microseconds per change.
#[derive(Debug, Clone, Serialize)]
pub struct ReconfigSummary {
    pub rate_change_us: Percentiles,
    pub action_change_us: Percentiles,
    pub rate_change_samples_us: Vec<f64>,
    pub action_change_samples_us: Vec<f64>,
}

pub fn run(args: &ReconfigArgs) -> anyhow::Result<ReconfigSummary> {
    anyhow::ensure!(
        is_root(),
        "reconfig creates network namespaces: run it as root"
    );
    std::fs::create_dir_all(&args.out)?;
    let router = Netns::create("router")?;
    let rx = Netns::create("rx")?;
    let link = VethPair::connect(&router, "10.71.2.1/24", &rx, "10.71.2.2/24")?;
    let (rates, actions) = (args.rate_changes, args.action_changes);
    let iface = link.a_if.clone();
    let (rate_us, action_us) =
        router.run_in(move || -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
            let backend = LinuxBackend::open()?;
            let (mut e, _) = Enforcer::start(
                backend,
                EnforcerConfig {
                    direction: qosloop_schema::Direction::Egress,
                    interface: iface,
                    roles: vec!["edge".into()],
                    capacity: Kbps(10_000),
                    qdisc_major: DEFAULT_QDISC_MAJOR,
                },
            )?;
            let mut d = sample_decision();
            e.install(d.clone())?;
            let mut rate_us = Vec::with_capacity(rates);
            for i in 0..rates {
                d.version += 1;
                d.out_of_profile = OutOfProfileAction::Accept {
                    shape: Some(Kbps(if i % 2 == 0 { 700 } else { 875 })),
                };
                let s = e.install(d.clone())?;
                rate_us.push(s.elapsed.as_nanos() as f64 / 1000.0);
            }
            let mut action_us = Vec::with_capacity(actions);
            for i in 0..actions {
                d.version += 1;
                d.out_of_profile = match i % 3 {
                    0 => OutOfProfileAction::Remark {
                        dscp: Dscp::BEST_EFFORT,
                        shape: Some(Kbps(125)),
                    },
                    1 => OutOfProfileAction::Drop,
                    _ => OutOfProfileAction::Accept {
                        shape: Some(Kbps(875)),
                    },
                };
                let s = e.install(d.clone())?;
                action_us.push(s.elapsed.as_nanos() as f64 / 1000.0);
            }
            e.cleanup()?;
            Ok((rate_us, action_us))
        })??;
    let summary = ReconfigSummary {
        rate_change_us: Percentiles::of(rate_us.clone()),
        action_change_us: Percentiles::of(action_us.clone()),
        rate_change_samples_us: rate_us,
        action_change_samples_us: action_us,
    };
    std::fs::write(
        args.out.join("reconfig.json"),
        serde_json::to_string_pretty(&summary)?,
    )?;
    let cdf = |v: &[f64]| -> Vec<(f64, f64)> {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        let n = s.len().max(1) as f64;
        s.iter()
            .enumerate()
            .map(|(i, x)| (*x, 100.0 * (i + 1) as f64 / n))
            .collect()
    };
    Chart {
        title: "Reconfiguration time per decision change (CDF)".into(),
        x_label: "µs".into(),
        y_label: "% of changes".into(),
        series: vec![Series {
            name: "shape-rate change (HTB over netlink)".into(),
            color: "#1f77b4",
            points: cdf(&summary.rate_change_samples_us),
        }],
        hlines: vec![],
        spans: vec![crate::plot::Span {
            x0: 44.0,
            x1: 46.0,
            label: "paper ~45 µs".into(),
            color: "#d62728",
        }],
    }
    .write(&args.out, "reconfig-rate")?;
    Chart {
        title: "Reconfiguration time per action change (CDF)".into(),
        x_label: "µs".into(),
        y_label: "% of changes".into(),
        series: vec![Series {
            name: "accept / re-mark / drop (HTB + nftables)".into(),
            color: "#ff7f0e",
            points: cdf(&summary.action_change_samples_us),
        }],
        hlines: vec![],
        spans: vec![],
    }
    .write(&args.out, "reconfig-action")?;
    Ok(summary)
}
