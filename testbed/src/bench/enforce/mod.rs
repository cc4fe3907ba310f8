//! `qosloop-testbed bench enforce`: how fast the enforcer changes the
//! kernel, measured side by side with the `tc` and `nft` command-line tools
//! in the same run, in a namespace the benchmark creates.
//!
//! 1. A shape-rate change of one decision: the enforcer's whole path
//!    (validate, diff, one `RTM_NEWTCLASS`), the bare netlink message, and a
//!    forked `tc class change` doing the same change.
//! 2. An action change (accept → remark): one class message plus one
//!    nf_tables netlink batch, against a forked `nft -f` of the same statements.
//! 3. Installing N per-flow decisions from empty (10,000 and 50,000), and
//!    removing them again, against the LibreQoS way (`tc -batch` of the
//!    same classes and steering filter + one `nft -f` of the same
//!    statements; removal: `tc -batch` of the deletes + `nft -f` of the
//!    deletes, [`peer`]).
//! 4. Per-packet cost: the forwarding rate of 64-byte packets through the
//!    enforced router with 1, 10,000 and 50,000 decisions installed, and
//!    for the record with the old layout (one linear base chain of
//!    10,000 jump rules) beside it, in interleaved rounds ([`forward`]).

mod forward;
mod peer;

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
    /// Per-flow decisions installed from empty and removed, each count
    /// against the peer.
    #[arg(long, value_delimiter = ',', default_values_t = [10_000, 50_000])]
    pub flows: Vec<usize>,
    /// Decisions installed while the forwarding rate is measured.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 10_000, 50_000])]
    pub forward_decisions: Vec<usize>,
    /// Jump rules of the old linear layout measured beside (0: not measured).
    #[arg(long, default_value_t = 10_000)]
    pub linear_rules: usize,
    /// Seconds of each forwarding trial.
    #[arg(long, default_value_t = 2.0)]
    pub forward_secs: f64,
    /// Forwarding trials per layout and round.
    #[arg(long, default_value_t = 2)]
    pub forward_trials: usize,
    /// Rounds through every layout (median and best over all trials).
    #[arg(long, default_value_t = 3)]
    pub forward_rounds: usize,
    /// Small counts for a quick check: 100 rate changes, 20 peer changes,
    /// 1,000 flows, forwarding with 1 and 1,000 decisions (1,000 linear
    /// rules), one 1-second trial each.
    #[arg(long)]
    pub quick: bool,
    /// Also write the report as JSON here.
    #[arg(long)]
    pub json_out: Option<std::path::PathBuf>,
}

impl Args {
    fn quickened(mut self) -> Args {
        if self.quick {
            self.changes = self.changes.min(100);
            self.peer_changes = self.peer_changes.min(20);
            self.flows = vec![1000];
            self.forward_decisions = vec![1, 1000];
            self.linear_rules = self.linear_rules.min(1000);
            self.forward_secs = self.forward_secs.min(1.0);
            self.forward_trials = 1;
            self.forward_rounds = 1;
        }
        self
    }
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

/// Installing and removing N decisions, the enforcer against the peer.
#[derive(Debug, Clone, Serialize)]
pub struct Install {
    pub flows: usize,
    pub enforcer_install_s: f64,
    pub enforcer_tc_messages: usize,
    pub peer_install_s: f64,
    pub enforcer_remove_s: f64,
    pub peer_remove_s: f64,
}

/// The forwarding rate with one table layout.
#[derive(Debug, Clone, Serialize)]
pub struct Forwarding {
    pub layout: String,
    pub decisions: usize,
    /// Packets per second delivered, each trial.
    pub trials_pps: Vec<f64>,
    pub median_pps: f64,
    /// The fastest trial: the least disturbed by anything else on the host.
    pub best_pps: f64,
}

/// Traffic-control classes in every named network namespace of the host,
/// and in the initial one. Creating an HTB class on a veth walks a list of
/// every traffic-control block of the host (docs/enforcer.md), so install
/// times depend on what else the host holds — other test runs included.
fn classes_on_the_host() -> usize {
    let text = |c: &mut Command| {
        c.output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let mut namespaces: Vec<Option<String>> = vec![None];
    namespaces.extend(
        text(Command::new("ip").args(["netns", "list"]))
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(|n| Some(n.to_owned()))),
    );
    let mut classes = 0;
    for ns in namespaces {
        let ns_args: Vec<&str> = ns.as_deref().map_or(Vec::new(), |n| vec!["-n", n]);
        let links = text(
            Command::new("ip")
                .args(&ns_args)
                .args(["-o", "link", "show"]),
        );
        for name in links.lines().filter_map(|l| {
            l.split(": ")
                .nth(1)
                .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        }) {
            classes += text(
                Command::new("tc")
                    .args(&ns_args)
                    .args(["class", "show", "dev", &name]),
            )
            .lines()
            .count();
        }
    }
    classes
}

/// The benchmark's findings.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Traffic-control classes elsewhere on the host when the run started.
    pub host_classes_at_start: usize,
    pub rate_change_enforcer: Latency,
    pub rate_change_netlink_message: Latency,
    pub rate_change_tc_process: Latency,
    pub action_change_enforcer: Latency,
    pub action_change_nft_process: Latency,
    pub install: Vec<Install>,
    pub forwarding: Vec<Forwarding>,
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
            user: None,
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
             add rule inet {table} d1 limit name \"l1\" counter {mark}meta priority set e500:100 accept\n\
             add rule inet {table} d1 counter ip dscp set cs6 meta priority set e500:2 accept\n"
        );
        let t = Instant::now();
        run_tool("nft", &["-f", "-"], Some(&script))?;
        samples.push(t.elapsed());
    }
    let action_change_nft_process = latency(samples);
    e.cleanup()?;

    // 3. N per-flow decisions from empty, and removed again; the peer the same.
    let mut install = Vec::new();
    for &n in &args.flows {
        install.push(install_and_remove(
            &mut e,
            n,
            interface,
            &config(10_000_000),
        )?);
    }
    qosloop_enforcer::cleanup(&mut LinuxBackend::open()?, &layout, ifindex)?;
    Ok(Report {
        rate_change_enforcer,
        rate_change_netlink_message,
        rate_change_tc_process,
        action_change_enforcer,
        action_change_nft_process,
        install,
        forwarding: Vec::new(),
        host_classes_at_start: 0,
    })
}

/// `n` per-flow decisions: one host each (10.128.0.1 …), UDP port 5001,
/// a 100 kbit/s profile, out of profile accepted and shaped to 50.
fn many(n: usize) -> Vec<Decision> {
    (0..n)
        .map(|i| {
            let host = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i as u32 + 1);
            decision(i as u64 + 1, host, 100, accept(50))
        })
        .collect()
}

/// Installs `n` decisions from empty and removes them (the enforcer keeps
/// its root qdisc and table), then the peer builds the same objects with
/// `tc -batch` + `nft -f` and removes them the same way; each timed.
fn install_and_remove(
    e: &mut Enforcer<LinuxBackend>,
    n: usize,
    interface: &str,
    config: &EnforcerConfig,
) -> anyhow::Result<Install> {
    let layout = e.layout().clone();
    let ifindex = e.ifindex();
    e.cleanup()?;
    let decisions = many(n);
    let t = Instant::now();
    let summary = e.sync(decisions.clone())?;
    let enforcer_install_s = t.elapsed().as_secs_f64();
    anyhow::ensure!(summary.installed == n, "installed {summary:?}");
    let t = Instant::now();
    let removed = e.sync(Vec::new())?;
    let enforcer_remove_s = t.elapsed().as_secs_f64();
    anyhow::ensure!(removed.removed == n, "removed {removed:?}");
    e.cleanup()?;

    // The peer: the dry-run backend renders the same plan as text, which
    // becomes a `tc -batch` and an `nft -f` script.
    let (mut plan, _) =
        Enforcer::start(qosloop_enforcer::DryRunBackend::default(), config.clone())?;
    plan.sync(decisions)?;
    let dry = std::mem::take(plan.backend());
    let mut tc_batch = String::new();
    let mut nft_script = String::new();
    for line in &dry.log {
        if let Some(script) = line.strip_prefix("nftables transaction:\n") {
            nft_script.push_str(script);
            nft_script.push('\n');
        } else if let Some(op) = line.strip_prefix("netlink: ") {
            tc_batch.push_str(&peer::tc_line(op, interface));
        }
    }
    anyhow::ensure!(
        tc_batch.contains(" bpf bytecode ") && !tc_batch.contains("# unparsed"),
        "the tc -batch peer lacks the steering filter the enforcer installs"
    );
    let t = Instant::now();
    run_tool("tc", &["-batch", "-"], Some(&tc_batch))?;
    run_tool("nft", &["-f", "-"], Some(&nft_script))?;
    let peer_install_s = t.elapsed().as_secs_f64();
    let (tc_remove, nft_remove) = peer::removal(&tc_batch, &nft_script, interface);
    let t = Instant::now();
    run_tool("tc", &["-batch", "-"], Some(&tc_remove))?;
    for script in &nft_remove {
        run_tool("nft", &["-f", "-"], Some(script))?;
    }
    let peer_remove_s = t.elapsed().as_secs_f64();
    // The peer removed every decision object: the classes left are the root's.
    let left = Command::new("tc")
        .args(["class", "show", "dev", interface])
        .output()?;
    let left = String::from_utf8_lossy(&left.stdout).lines().count();
    anyhow::ensure!(left == 2, "the peer's removal left {left} classes, not 2");
    qosloop_enforcer::cleanup(&mut LinuxBackend::open()?, &layout, ifindex)?;
    Ok(Install {
        flows: n,
        enforcer_install_s,
        enforcer_tc_messages: summary.tc_messages,
        peer_install_s,
        enforcer_remove_s,
        peer_remove_s,
    })
}

/// The forwarding rate through the enforced router with each count of
/// decisions, then the old linear layout beside it; in rounds, each round
/// going through every layout once, so that a machine busy with something
/// else for a while does not favour one layout.
fn forwarding(args: &Args) -> anyhow::Result<Vec<Forwarding>> {
    let path = forward::Path::create()?;
    let duration = Duration::from_secs_f64(args.forward_secs.clamp(0.1, 60.0));
    // Bounded: no trial sends more than 100 million packets.
    let max_packets = 100_000_000;
    let trials = args.forward_trials.max(1);
    let cfg = EnforcerConfig {
        direction: qosloop_schema::Direction::Egress,
        interface: path.router_out.clone(),
        roles: Vec::new(),
        capacity: Kbps(10_000_000),
        qdisc_major: 0xe5,
    };
    let mut e = path.router.run_in(move || -> anyhow::Result<_> {
        Ok(Enforcer::start(LinuxBackend::open()?, cfg)?.0)
    })??;
    let mut out: Vec<Forwarding> = args
        .forward_decisions
        .iter()
        .map(|&n| Forwarding {
            layout: "enforcer (verdict maps)".into(),
            decisions: n,
            trials_pps: Vec::new(),
            median_pps: 0.0,
            best_pps: 0.0,
        })
        .collect();
    if args.linear_rules > 0 {
        out.push(Forwarding {
            layout: "old linear chain (+ enforcer with 1)".into(),
            decisions: args.linear_rules,
            trials_pps: Vec::new(),
            median_pps: 0.0,
            best_pps: 0.0,
        });
    }
    let table = forward::linear_table(&path.router_out, args.linear_rules);
    for _ in 0..args.forward_rounds.max(1) {
        for f in out.iter_mut() {
            let linear = f.layout.starts_with("old");
            let ds = many(if linear { 1 } else { f.decisions });
            path.router.run_in(|| e.sync(ds))??;
            if linear {
                path.router
                    .run_in(|| run_tool("nft", &["-f", "-"], Some(&table)))??;
            }
            f.trials_pps
                .extend(path.rates(duration, trials, max_packets)?);
            if linear {
                path.router.run_in(|| {
                    run_tool("nft", &["delete", "table", "inet", "qosloop_linear"], None)
                })??;
            }
        }
    }
    for f in out.iter_mut() {
        f.median_pps = forward::median(&f.trials_pps);
        f.best_pps = f.trials_pps.iter().copied().fold(0.0, f64::max);
    }
    path.router.run_in(|| e.cleanup())??;
    Ok(out)
}

/// Runs the benchmark and prints its report.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let args = args.quickened();
    let host_classes_at_start = classes_on_the_host();
    let a = Netns::create("bench-a")?;
    let b = Netns::create("bench-b")?;
    let link = VethPair::connect(&a, "10.9.0.1/24", &b, "10.9.0.2/24")?;
    let mut report = a.run_in(|| measure(&args, &link.a_if))??;
    report.host_classes_at_start = host_classes_at_start;
    let namespace = a.name().to_owned();
    drop((a, b));
    if !args.forward_decisions.is_empty() {
        report.forwarding = forwarding(&args)?;
    }
    let r = &report;
    let ratio = |peer: f64, ours: f64| if ours > 0.0 { peer / ours } else { 0.0 };
    println!(
        "qosloop-testbed bench enforce (same run, namespace {namespace}; {} traffic-control classes elsewhere on the host at the start)",
        r.host_classes_at_start
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
    for i in &r.install {
        println!(
            "install {} per-flow decisions from empty: enforcer {:.3} s ({} netlink msgs + 1 nf_tables batch); tc -batch + nft -f {:.3} s (ratio {:.2})",
            i.flows,
            i.enforcer_install_s,
            i.enforcer_tc_messages,
            i.peer_install_s,
            ratio(i.peer_install_s, i.enforcer_install_s)
        );
        println!(
            "remove {} per-flow decisions: enforcer {:.3} s; tc -batch + nft -f {:.3} s (ratio {:.2})",
            i.flows,
            i.enforcer_remove_s,
            i.peer_remove_s,
            ratio(i.peer_remove_s, i.enforcer_remove_s)
        );
    }
    if let Some(base) = r.forwarding.first() {
        println!(
            "forwarding 64-byte packets through the enforced router ({} trials of {:.1} s in {} rounds; % of {} decision(s)):",
            base.trials_pps.len(),
            args.forward_secs,
            args.forward_rounds,
            base.decisions
        );
        for f in &r.forwarding {
            println!(
                "  {:<38} {:>6} decisions/rules: median {:>9.0} pkt/s ({:5.1}%), best {:>9.0} pkt/s ({:5.1}%)",
                f.layout,
                f.decisions,
                f.median_pps,
                100.0 * ratio(f.median_pps, base.median_pps),
                f.best_pps,
                100.0 * ratio(f.best_pps, base.best_pps),
            );
        }
    }
    if let Some(p) = &args.json_out {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
