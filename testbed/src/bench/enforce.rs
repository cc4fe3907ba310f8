//! `qosloop-testbed bench enforce`: how fast the enforcer changes the
//! kernel, measured side by side with the `tc` and `nft` command-line tools
//! in the same run, in a namespace the benchmark creates.
//!
//! 1. A shape-rate change of one decision: the enforcer's whole path
//!    (validate, diff, one `RTM_NEWTCLASS`), the bare netlink message, and a
//!    forked `tc class change` doing the same change.
//! 2. An action change (accept → remark): one class message plus one
//!    nf_tables netlink batch, against a forked `nft -f` of the same statements.
//! 3. Installing N per-flow decisions from empty, against the LibreQoS way
//!    (`tc -batch` of the same classes and steering filter + one `nft -f` of
//!    the same rules).

use crate::harness::{Netns, VethPair};
use anyhow::Context as _;
use qosloop_enforcer::tc::{HtbClass, TcOp};
use qosloop_enforcer::{Enforcer, EnforcerConfig, LinuxBackend};
use qosloop_schema::{
    Decision, DecisionReason, Dscp, FlowSpec, Kbps, OutOfProfileAction, PortRange, TrafficProfile,
};
use serde::Serialize;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Options of `qosloop-testbed bench enforce`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Rate changes measured through netlink.
    #[arg(long, default_value_t = 1000)]
    pub changes: usize,
    /// Changes measured through forked tc / nft processes.
    #[arg(long, default_value_t = 200)]
    pub peer_changes: usize,
    /// Per-flow decisions installed from empty.
    #[arg(long, default_value_t = 10_000)]
    pub flows: usize,
    /// Also write the report as JSON here.
    #[arg(long)]
    pub json_out: Option<std::path::PathBuf>,
}

/// Median and 99th percentile of a sample, in microseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Latency {
    pub n: usize,
    pub min_us: f64,
    pub median_us: f64,
    pub p99_us: f64,
}

fn latency(mut d: Vec<Duration>) -> Latency {
    d.sort();
    let at = |q: f64| {
        d.get(((d.len() as f64 - 1.0) * q).round() as usize)
            .map_or(0.0, |x| x.as_secs_f64() * 1e6)
    };
    Latency {
        n: d.len(),
        min_us: at(0.0),
        median_us: at(0.5),
        p99_us: at(0.99),
    }
}

/// The benchmark's findings.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub rate_change_enforcer: Latency,
    pub rate_change_netlink_message: Latency,
    pub rate_change_tc_process: Latency,
    pub action_change_enforcer: Latency,
    pub action_change_nft_process: Latency,
    pub install_flows: usize,
    pub install_enforcer_s: f64,
    pub install_tc_batch_plus_nft_s: f64,
    pub install_tc_messages: usize,
}

fn decision(id: u64, dst: Ipv4Addr, rate: u64, action: OutOfProfileAction) -> Decision {
    Decision {
        id,
        version: 1,
        role: "bench".into(),
        policy_dn: "cn=bench".into(),
        flow: FlowSpec {
            src: None,
            dst: Some(qosloop_schema::IpPrefix::host(dst.into())),
            proto: Some(17),
            src_ports: None,
            dst_ports: Some(PortRange::single(5001)),
        },
        profile: TrafficProfile {
            rate: Kbps(rate),
            burst_bytes: 15_000,
        },
        in_profile_dscp: Some(Dscp::CS6),
        out_of_profile: action,
        reason: DecisionReason {
            rate_kbps: 0.0,
            avg_rate_kbps: 0.0,
            link: "bench".into(),
            link_load_kbps: 0.0,
            band: "bench".into(),
        },
        issued_ns: 0,
    }
}

fn accept(kbps: u64) -> OutOfProfileAction {
    OutOfProfileAction::Accept {
        shape: Some(Kbps(kbps)),
    }
}

fn run_tool(program: &str, args: &[&str], stdin: Option<&str>) -> anyhow::Result<()> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program}"))?;
    // Feed stdin from another thread: the tool may fill its stderr pipe
    // before it has read everything.
    let writer = match (stdin, child.stdin.take()) {
        (Some(text), Some(mut pipe)) => {
            let text = text.to_owned();
            Some(std::thread::spawn(move || pipe.write_all(text.as_bytes())))
        }
        _ => None,
    };
    let out = child.wait_with_output()?;
    if let Some(w) = writer {
        w.join()
            .map_err(|_| anyhow::anyhow!("stdin writer panicked"))?
            .with_context(|| format!("feeding {program}"))?;
    }
    anyhow::ensure!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Everything, on a thread inside the benchmark's namespace.
fn measure(args: &Args, interface: &str) -> anyhow::Result<Report> {
    let config = |capacity: u64| EnforcerConfig {
        direction: qosloop_schema::Direction::Egress,
        interface: interface.to_owned(),
        roles: Vec::new(),
        capacity: Kbps(capacity),
        qdisc_major: 0xe5,
    };
    let (mut e, _) = Enforcer::start(LinuxBackend::open()?, config(10_000_000))?;
    let ifindex = e.ifindex();
    let dst = Ipv4Addr::new(10, 9, 0, 2);
    e.install(decision(1, dst, 1000, accept(875)))?;

    // 1. Rate change: enforcer path, bare message, forked tc.
    let mut samples = Vec::with_capacity(args.changes);
    for i in 0..args.changes {
        let mut d = decision(1, dst, 1000, accept(if i % 2 == 0 { 500 } else { 875 }));
        d.version = i as u64 + 2;
        let t = Instant::now();
        let s = e.install(d)?;
        samples.push(t.elapsed());
        anyhow::ensure!(
            s.tc_messages == 1 && s.nft_transactions == 0,
            "a rate change took {s:?}"
        );
    }
    let rate_change_enforcer = latency(samples);
    let layout = e.layout().clone();
    // Decision 1 sits in slot 0: out class e500:100 under its group root e500:1.
    let out_id = layout.slot_classid(0);
    let out_class = |kbps| HtbClass {
        classid: out_id,
        parent: layout.group_root(0).classid,
        rate: qosloop_enforcer::render::TRICKLE,
        ceil: Kbps(kbps),
        prio: 2,
    };
    let mut rtnl = LinuxBackend::open()?;
    let mut samples = Vec::with_capacity(args.changes);
    for i in 0..args.changes {
        let op = TcOp::ChangeClass {
            ifindex,
            class: out_class(if i % 2 == 0 { 500 } else { 875 }),
        };
        let t = Instant::now();
        rtnl.rtnl().execute_one(&op)?;
        samples.push(t.elapsed());
    }
    let rate_change_netlink_message = latency(samples);
    let mut samples = Vec::with_capacity(args.peer_changes);
    for i in 0..args.peer_changes {
        let rate = if i % 2 == 0 { "500kbit" } else { "875kbit" };
        let t = Instant::now();
        run_tool(
            "tc",
            &[
                "class", "change", "dev", interface, "parent", "e500:1", "classid", "e500:100",
                "htb", "rate", "8kbit", "ceil", rate, "prio", "2",
            ],
            None,
        )?;
        samples.push(t.elapsed());
    }
    let rate_change_tc_process = latency(samples);

    // 2. Action change: one class message + one nftables transaction.
    let remark = OutOfProfileAction::Remark {
        dscp: Dscp::BEST_EFFORT,
        shape: Some(Kbps(125)),
    };
    let mut samples = Vec::with_capacity(args.peer_changes);
    for i in 0..args.peer_changes {
        let mut d = decision(1, dst, 1000, if i % 2 == 0 { remark } else { accept(875) });
        d.version = 1_000_000 + i as u64;
        let t = Instant::now();
        e.install(d)?;
        samples.push(t.elapsed());
    }
    let action_change_enforcer = latency(samples);
    let table = layout.table();
    let mut samples = Vec::with_capacity(args.peer_changes);
    for i in 0..args.peer_changes {
        let mark = if i % 2 == 0 { "ip dscp set cs0 " } else { "" };
        let script = format!(
            "flush chain inet {table} d1\n\
             add rule inet {table} d1 limit rate over 125000 bytes/second burst 15000 bytes counter {mark}meta priority set e500:100 accept\n\
             add rule inet {table} d1 counter ip dscp set cs6 meta priority set e500:2 accept\n"
        );
        let t = Instant::now();
        run_tool("nft", &["-f", "-"], Some(&script))?;
        samples.push(t.elapsed());
    }
    let action_change_nft_process = latency(samples);
    e.cleanup()?;

    // 3. N per-flow decisions from empty.
    let decisions: Vec<Decision> = (0..args.flows)
        .map(|i| {
            let host = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i as u32 + 1);
            decision(i as u64 + 1, host, 100, accept(50))
        })
        .collect();
    let t = Instant::now();
    let summary = e.sync(decisions.clone())?;
    let install_enforcer_s = t.elapsed().as_secs_f64();
    anyhow::ensure!(summary.installed == args.flows, "installed {summary:?}");
    // The peer: the same classes through `tc -batch`, the same rules through `nft -f`.
    e.cleanup()?;
    // The dry-run backend renders the same plan as text.
    let (mut plan, _) = Enforcer::start(
        qosloop_enforcer::DryRunBackend::default(),
        config(10_000_000),
    )?;
    plan.sync(decisions)?;
    let dry = std::mem::take(plan.backend());
    let mut tc_batch = String::new();
    let mut nft_script = String::new();
    for line in &dry.log {
        if let Some(script) = line.strip_prefix("nftables transaction:\n") {
            nft_script.push_str(script);
            nft_script.push('\n');
        } else if let Some(op) = line.strip_prefix("netlink: ") {
            tc_batch.push_str(&tc_line(op, interface));
        }
    }
    anyhow::ensure!(
        tc_batch.contains(" bpf bytecode ") && !tc_batch.contains("# unparsed"),
        "the tc -batch peer lacks the steering filter the enforcer installs"
    );
    let t = Instant::now();
    run_tool("tc", &["-batch", "-"], Some(&tc_batch))?;
    run_tool("nft", &["-f", "-"], Some(&nft_script))?;
    let install_tc_batch_plus_nft_s = t.elapsed().as_secs_f64();
    qosloop_enforcer::cleanup(&mut LinuxBackend::open()?, &layout, ifindex)?;
    Ok(Report {
        rate_change_enforcer,
        rate_change_netlink_message,
        rate_change_tc_process,
        action_change_enforcer,
        action_change_nft_process,
        install_flows: args.flows,
        install_enforcer_s,
        install_tc_batch_plus_nft_s,
        install_tc_messages: summary.tc_messages,
    })
}

/// The `tc -batch` line doing what a dry-run netlink line describes.
fn tc_line(op: &str, interface: &str) -> String {
    let w: Vec<&str> = op.split_whitespace().collect();
    let field = |k: &str| {
        w.iter()
            .position(|x| *x == k)
            .and_then(|i| w.get(i + 1))
            .copied()
            .unwrap_or("")
    };
    if op.starts_with("RTM_NEWQDISC") {
        let at = match field("parent") {
            "" => "root".to_owned(),
            p => format!("parent {p}"),
        };
        format!(
            "qdisc add dev {interface} {at} handle {} htb default {}\n",
            field("handle"),
            field("default")
        )
    } else if op.starts_with("RTM_NEWTCLASS") {
        let parent = match field("parent") {
            "0:0" => "root".to_owned(),
            p => format!("parent {p}"),
        };
        // The quantum the enforcer sets (rate / r2q, clamped), so that both
        // sides build identical classes and tc prints no warnings.
        let rate_bytes = field("rate")
            .trim_end_matches("kbit")
            .parse::<u64>()
            .unwrap_or(0)
            * 125;
        let quantum = (rate_bytes / 10).clamp(1600, 200_000);
        format!(
            "class add dev {interface} {parent} classid {} htb rate {} ceil {} prio {} quantum {quantum}\n",
            field("classid"),
            field("rate"),
            field("ceil"),
            field("prio")
        )
    } else if op.starts_with("RTM_NEWTFILTER") {
        steer_line(op, interface)
    } else {
        String::new()
    }
}

/// The `tc` filter doing the enforcer's steering, so that both sides do the
/// same work. The enforcer's eBPF program (cls_bpf on the root) sends a
/// packet whose priority's major is `first_major + g` (g < groups) to class
/// `root:first_minor + g`. The peer installs a cls_bpf filter on the root
/// too, with the same seven instructions in classic BPF (what `tc … bpf
/// bytecode` loads) — keyed on the skb mark, since classic BPF has no
/// ancillary load of the priority; the benchmark sends no traffic, and
/// tc's `flow` classifier, which could read the priority, is not in every
/// kernel (not in this one).
fn steer_line(op: &str, interface: &str) -> String {
    let after = |k: &str| {
        op.split_once(k)
            .map(|(_, rest)| rest.trim_start())
            .unwrap_or("")
    };
    let hex = |s: &str| u32::from_str_radix(s, 16).ok();
    let root = after(" parent ").split(':').next().and_then(hex);
    let first_major = after("priority major ").split('+').next().and_then(hex);
    let groups = after("g < ")
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|g| g.parse::<u32>().ok());
    let first_minor = after("-> classid ")
        .split(':')
        .nth(1)
        .and_then(|m| m.split('+').next())
        .and_then(hex);
    match (root, first_major, groups, first_minor) {
        (Some(root), Some(first_major), Some(groups), Some(first_minor)) => {
            // ld mark; rsh 16; sub first_major; jge groups → none;
            // add root<<16|first_minor; ret a; none: ret 0.
            const SKF_AD_MARK: u32 = 0xffff_f000 + 20;
            let class = (root << 16) | first_minor;
            format!(
                "filter add dev {interface} parent {root:x}: prio 1 protocol all bpf bytecode \
                 \"7,32 0 0 {SKF_AD_MARK},116 0 0 16,20 0 0 {first_major},53 2 0 {groups},\
                 4 0 0 {class},22 0 0 0,6 0 0 0\"\n"
            )
        }
        // The line's format changed: the caller refuses to measure less work.
        _ => format!("# unparsed steering filter: {op}\n"),
    }
}

/// Runs the benchmark and prints its report.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let a = Netns::create("bench-a")?;
    let b = Netns::create("bench-b")?;
    let link = VethPair::connect(&a, "10.9.0.1/24", &b, "10.9.0.2/24")?;
    let report = a.run_in(|| measure(&args, &link.a_if))??;
    let r = &report;
    let ratio = |peer: f64, ours: f64| if ours > 0.0 { peer / ours } else { 0.0 };
    println!(
        "qosloop-testbed bench enforce (same run, namespace {})",
        a.name()
    );
    println!(
        "{:<44} {:>10} {:>12} {:>12}",
        "", "min µs", "median µs", "p99 µs"
    );
    for (name, l) in [
        (
            "rate change: enforcer (diff + 1 netlink msg)",
            r.rate_change_enforcer,
        ),
        (
            "rate change: bare RTM_NEWTCLASS",
            r.rate_change_netlink_message,
        ),
        (
            "rate change: forked `tc class change`",
            r.rate_change_tc_process,
        ),
        (
            "action change: enforcer (1 msg + nf_tables batch)",
            r.action_change_enforcer,
        ),
        (
            "action change: forked `nft -f`",
            r.action_change_nft_process,
        ),
    ] {
        println!(
            "{name:<44} {:>10.1} {:>12.1} {:>12.1}   (n={})",
            l.min_us, l.median_us, l.p99_us, l.n
        );
    }
    println!(
        "rate change: enforcer is {:.0}x faster than tc (median)",
        ratio(
            r.rate_change_tc_process.median_us,
            r.rate_change_enforcer.median_us
        )
    );
    println!(
        "install {} per-flow decisions from empty: enforcer {:.3} s ({} netlink msgs + 1 nft transaction); tc -batch + nft -f {:.3} s (ratio {:.2})",
        r.install_flows,
        r.install_enforcer_s,
        r.install_tc_messages,
        r.install_tc_batch_plus_nft_s,
        ratio(r.install_tc_batch_plus_nft_s, r.install_enforcer_s)
    );
    if let Some(p) = &args.json_out {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
