//! The reference experiment of `seeds/004` §IV, end to end with every
//! component real: transmitter → edge router → receiver over 10 Mbit/s
//! links; the meter on the router's ingress exports to the collector, the
//! bandwidth manager polls SQL every second, the policy server decides from
//! the sample policy and pushes decisions to the enforcer on the router,
//! which programs HTB and nftables.
//!
//! Choices the paper leaves open, made here so that each phase's measured
//! link load lies in its band:
//! - The link load counts the competing (background) traffic at the
//!   router's ingress, not the policed flow itself: the sample policy's link
//!   spec selects the background ports (5000–5999). Counting the policed
//!   flow would feed its own treatment back into the band that decides it.
//! - Background load: 256-byte UDP packets at a random rate within the
//!   phase's band (low 400–1400 pps = 0.8–2.9 Mbit/s, medium 1500–2900 pps =
//!   3.1–5.9 Mbit/s, high 3000–4000 pps = 6.1–8.2 Mbit/s), new every phase.
//! - The policed flow (UDP 10.71.1.2:6055 → 10.71.2.2:4055, 256-byte
//!   packets) is sent at 2000 kbit/s: 1000 in profile, 1000 out of profile,
//!   so that the 875 kbit/s shaping of the low band is visible.
//! - `policed_out_kbps` is what the receiver gets of the policed flow
//!   outside its profile, told apart by DSCP: in-profile packets arrive
//!   marked CS6.

use crate::harness::{is_root, Postgres, Slapd};
use crate::procs::{component_dir, wait_for_port, Proc, READY_WITHIN};
use crate::topology::{Side, Topology};
use crate::traffic::{generate, sink_from, stop_flag, Band, FlowGen, Schedule, PAPER_BANDS};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use qosloop_testkit::inprofile;
mod summary;

use summary::{read_events, summarise, write_outputs};
pub use summary::{Events, Percentiles, PhaseCheck, Second, Summary};

/// Options of `qosloop-testbed paper`.
#[derive(Debug, Clone, clap::Args)]
pub struct PaperArgs {
    /// Directory for summary.json, plots, report.md and component logs.
    #[arg(long)]
    pub out: PathBuf,
    /// Short phases (low, medium, high; 12 s each) for CI.
    #[arg(long)]
    pub quick: bool,
    /// Store in a PostgreSQL the testbed starts instead of SQLite.
    #[arg(long)]
    pub postgres: bool,
    /// Read the policy from a slapd the testbed starts (over ldapi, SASL
    /// EXTERNAL) instead of the LDIF file.
    #[arg(long)]
    pub ldap: bool,
    /// Topology file (default: the embedded reference topology). It needs
    /// hosts tx, router, rx, mgmt and links tx-r (tx→router), r-rx
    /// (router→rx), mgmt (router→mgmt) with the reference addresses.
    #[arg(long)]
    pub topology: Option<PathBuf>,
    /// Seconds per phase (default 20; 12 with --quick).
    #[arg(long)]
    pub phase_s: Option<u64>,
    /// Seed of the random rates within bands.
    #[arg(long, default_value_t = 4)]
    pub seed: u64,
    /// The tuned profile: interim records every 50 ms (handed on every
    /// 25 ms), rates over 100 ms windows closed 100 ms after their end, a
    /// decision every 100 ms, a band change taken when the next window
    /// confirms it.
    #[arg(long)]
    pub fast: bool,
    /// Run the collectors as a cluster of this many nodes on PostgreSQL
    /// (implies --postgres); the policy server decides from the owners'
    /// rates (`--rates-from cluster`, docs/cluster.md).
    #[arg(long, value_name = "NODES")]
    pub cluster: Option<u16>,
}

/// The loop's timing of one run: the paper's, or the tuned profile.
struct Timing {
    interim_ms: u64,
    interval_ms: u64,
    lag_ms: u64,
    ewma_weight: f64,
    /// How long the decision engine waits for a band change to be
    /// confirmed (docs/decisions.md).
    confirm_ms: u64,
    /// How long a link's windows without any record are no measurement
    /// rather than zero load (docs/decisions.md).
    gap_hold_ms: u64,
}

impl Timing {
    fn of(args: &PaperArgs) -> Timing {
        if args.fast {
            // One 100 ms window that comes out short or long under load
            // (a late poll, records spread over two windows) moves a rate
            // across an edge and back: a band change is taken when the
            // next window confirms it (polls are 100 ms ± jitter apart: 50
            // ms means "the next one"). That confirmation is the smoothing,
            // so the EWMA follows each window (weight 1): with 0.7 on top
            // a step's first window rarely crossed and the confirmation
            // came one window later still (median reaction 0.34 s against
            // 0.25 s, docs/testbed.md).
            Timing {
                interim_ms: 50,
                interval_ms: 100,
                lag_ms: 100,
                ewma_weight: 1.0,
                confirm_ms: 50,
                // Under load the records' way can stall for ~300 ms: three
                // windows without a record are not a silent link.
                gap_hold_ms: 500,
            }
        } else {
            // The meter sends interim records every 250 ms and hands them
            // on every 100 ms: 400 ms covers their export and commit.
            Timing {
                interim_ms: 250,
                interval_ms: 1000,
                lag_ms: 400,
                ewma_weight: 0.9,
                confirm_ms: 0,
                gap_hold_ms: 0,
            }
        }
    }
}

/// The topology to run on, checked for what the experiment needs.
pub fn load_topology(file: Option<&Path>) -> anyhow::Result<Topology> {
    let (topo, name) = match file {
        Some(f) => (Topology::load(f)?, f.display().to_string()),
        None => (Topology::paper(), "topologies/paper.toml".to_owned()),
    };
    topo.require(
        &name,
        &["tx", "router", "rx", "mgmt"],
        &[
            ("tx-r", "tx", "router"),
            ("r-rx", "router", "rx"),
            ("mgmt", "router", "mgmt"),
        ],
    )?;
    let at = |link: &str, b: bool| {
        topo.link(link)
            .map(|l| if b { l.b.addr } else { l.a.addr }.to_string())
    };
    for (link, b, want) in [
        ("tx-r", false, "10.71.1.2"),
        ("r-rx", true, "10.71.2.2"),
        ("mgmt", true, MGMT_ADDR),
    ] {
        if at(link, b).as_deref() != Some(want) {
            anyhow::bail!("{name}: link {link:?} must give {want} to its {} end (the sample policy's addresses)", if b { "b" } else { "a" });
        }
    }
    Ok(topo)
}

/// Address plan of the paper topology (`topologies/paper.toml`).
const POLICED_SRC: &str = "10.71.1.2:6055";
const POLICED_DST: &str = "10.71.2.2:4055";
const BACKGROUND_SRC: &str = "10.71.1.2:5001";
const BACKGROUND_DST: &str = "10.71.2.2:5001";
const MGMT_ADDR: &str = "10.71.9.2";
const POLICED_KBPS: f64 = 2000.0;
/// The policed flow's destination port (`POLICED_DST`).
const POLICED_PORT: u16 = 4055;
const PACKET_LEN: usize = 256;
const WARMUP_S: u64 = 6;
const SETTLE_S: u64 = 4;
const CS6: u8 = 48;
fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Runs the experiment; `stop` ends it early (Ctrl-C), cleaning up.
pub fn run(args: &PaperArgs, stop: Arc<AtomicBool>) -> anyhow::Result<Summary> {
    // Everything is checked before anything is created.
    anyhow::ensure!(
        is_root(),
        "the testbed creates network namespaces: run it as root"
    );
    let bin = component_dir()?;
    let topo = load_topology(args.topology.as_deref())?;
    topo.preflight()?;
    let postgres = args.postgres || args.cluster.is_some();
    let nodes = args.cluster.unwrap_or(1).max(1);
    anyhow::ensure!(nodes <= 8, "--cluster: at most 8 nodes");
    let timing = Timing::of(args);
    if postgres {
        Postgres::available().map_err(anyhow::Error::msg)?;
    }
    if args.ldap {
        Slapd::available().map_err(anyhow::Error::msg)?;
    }
    std::fs::create_dir_all(args.out.join("logs"))?;
    // A spool an earlier run left here belongs to that run's database.
    let _ = std::fs::remove_dir_all(args.out.join("spool"));
    let out = std::fs::canonicalize(&args.out)?;

    let phase_s = args.phase_s.unwrap_or(if args.quick { 12 } else { 20 });
    let visits: Vec<Band> = if args.quick {
        vec![PAPER_BANDS[0], PAPER_BANDS[1], PAPER_BANDS[2]]
    } else {
        vec![
            PAPER_BANDS[0],
            PAPER_BANDS[1],
            PAPER_BANDS[2],
            PAPER_BANDS[1],
            PAPER_BANDS[0],
            PAPER_BANDS[2],
        ]
    };
    let mut background =
        Schedule::random_in_bands(&visits, Duration::from_secs(phase_s), args.seed);
    background.steps[0].duration += Duration::from_secs(WARMUP_S);
    let total = background.total();
    // Phase boundaries in seconds from the start of traffic.
    let mut bounds = Vec::new();
    let mut t = 0;
    for (i, s) in background.steps.iter().enumerate() {
        bounds.push((t, t + s.duration.as_secs(), visits[i].name));
        t += s.duration.as_secs();
    }

    let tb = topo.build()?;
    eprintln!(
        "paper: namespaces {}",
        tb.namespaces()
            .map(|(h, n)| format!("{h}={n}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let ingress = tb.interface("tx-r", Side::B)?.to_owned();
    let egress = tb.interface("r-rx", Side::A)?.to_owned();
    let mgmt = tb.ns("mgmt")?;
    let router = tb.ns("router")?;

    let _pg;
    let db_url = if postgres {
        let pg = Postgres::start()?;
        // Components in the management namespace reach it over its Unix socket.
        let url = format!(
            "postgres://postgres@localhost/postgres?host={}&port={}",
            pg.dir().display(),
            pg.port()
        );
        _pg = Some(pg);
        url
    } else {
        _pg = None;
        format!("sqlite://{}", out.join("qosloop.db").display())
    };
    let _ = std::fs::remove_file(out.join("qosloop.db"));
    let policy = qosloop_schema::SAMPLE_POLICY_LDIF.replace("r-eth1", &egress);
    let policy_path = out.join("policy.ldif");
    std::fs::write(&policy_path, &policy)?;
    let _slapd;
    let policy_args: Vec<String> = if args.ldap {
        let base = "dc=qosloop,dc=example";
        let slapd = Slapd::start(base)?;
        slapd.add_ldif(&policy)?;
        // The management namespace reaches slapd over its Unix socket.
        let a = vec![
            "--ldap".into(),
            slapd.ldapi_url(),
            "--ldap-base".into(),
            base.into(),
        ];
        _slapd = Some(slapd);
        a
    } else {
        _slapd = None;
        vec!["--policies".into(), policy_path.display().to_string()]
    };

    let log = |name: &str| out.join("logs").join(format!("{name}.log"));
    let s = |v: &str| v.to_owned();
    let mut collectors = Vec::new();
    let collector_addrs: Vec<String> = (0..nodes)
        .map(|i| format!("{MGMT_ADDR}:{}", 4740 + i))
        .collect();
    for (i, addr) in collector_addrs.iter().enumerate() {
        let mut a = vec![
            s("--listen"),
            addr.clone(),
            // The management namespace's own address, reachable only by the
            // testbed's namespaces: plain TCP on purpose.
            s("--allow-insecure-remote"),
            s("--db"),
            db_url.clone(),
        ];
        if args.cluster.is_some() {
            a.extend([
                s("--cluster"),
                s("paper"),
                s("--node"),
                format!("c{}", i + 1),
                s("--cluster-interval-ms"),
                timing.interval_ms.to_string(),
                s("--cluster-lag-ms"),
                timing.lag_ms.to_string(),
                s("--cluster-ewma-permille"),
                ((timing.ewma_weight * 1000.0).round() as u32).to_string(),
            ]);
        }
        let name = if nodes == 1 {
            "collector".to_owned()
        } else {
            format!("collector{}", i + 1)
        };
        let mut p = Proc::spawn(mgmt, &bin.join("qosloop-collector"), &a, log(&name))?;
        wait_for_port(mgmt, addr.parse()?, READY_WITHIN).and_then(|_| p.check_alive())?;
        collectors.push(p);
    }
    let rates_from: Vec<String> = if args.cluster.is_some() {
        vec![s("--rates-from"), s("cluster")]
    } else {
        vec![]
    };
    let mut policy_server = Proc::spawn(
        mgmt,
        &bin.join("qosloop-policy-server"),
        &[s("--db"), db_url.clone()]
            .into_iter()
            .chain(policy_args)
            .chain([
                s("--pdp-listen"),
                format!("{MGMT_ADDR}:3288"),
                s("--http"),
                format!("{MGMT_ADDR}:8080"),
                // The management address lives in the testbed's own
                // namespace, beyond loopback and without TLS.
                s("--allow-insecure-remote"),
                s("--interval-ms"),
                timing.interval_ms.to_string(),
                s("--rate-lag-ms"),
                timing.lag_ms.to_string(),
                s("--ewma-weight"),
                timing.ewma_weight.to_string(),
                s("--hysteresis"),
                s("0.01"),
                s("--confirm-ms"),
                timing.confirm_ms.to_string(),
                s("--gap-hold-ms"),
                timing.gap_hold_ms.to_string(),
            ])
            .chain(rates_from)
            .collect::<Vec<_>>(),
        log("policy-server"),
    )?;
    wait_for_port(mgmt, format!("{MGMT_ADDR}:3288").parse()?, READY_WITHIN)
        .and_then(|_| policy_server.check_alive())?;
    let mut enforcer = Proc::spawn(
        router,
        &bin.join("qosloop-enforcer"),
        &[
            s("--pdp"),
            format!("{MGMT_ADDR}:3288"),
            s("--interface"),
            egress.clone(),
            s("--roles"),
            s("edge"),
            s("--capacity"),
            s("10mbit"),
        ],
        log("enforcer"),
    )?;
    let mut meter = Proc::spawn(
        router,
        &bin.join("qosloop-meter"),
        &[
            s("--interface"),
            ingress.clone(),
            s("--export"),
            format!("crane://{}", collector_addrs.join(",")),
            // This run's own spool: an earlier run's leftovers would be
            // re-sent into this run's database.
            s("--export-spool"),
            out.join("spool").display().to_string(),
            s("--interim-ms"),
            timing.interim_ms.to_string(),
        ],
        log("meter"),
    )?;
    std::thread::sleep(Duration::from_secs(1));
    for p in collectors
        .iter_mut()
        .chain([&mut policy_server, &mut enforcer, &mut meter])
    {
        p.check_alive()?;
    }

    // Traffic.
    let epoch = Instant::now() + Duration::from_millis(300);
    let sink_stop = stop_flag();
    let ss = sink_stop.clone();
    let limit = total + Duration::from_secs(10);
    let rx = tb
        .ns("rx")?
        .spawn_in(move || sink_from(&[POLICED_PORT, 5001], &ss, limit, epoch))?;
    // Every in-profile packet of the policed flow, timestamped by the
    // kernel, for the token-bucket contract (bounded: 4 million packets).
    let rs = sink_stop.clone();
    let recorder = tb
        .ns("rx")?
        .spawn_in(move || inprofile::record(POLICED_PORT, CS6, &rs, limit, 4_000_000))?;
    let policed = FlowGen {
        id: 1,
        bind: POLICED_SRC.parse()?,
        dst: POLICED_DST.parse()?,
        packet_len: PACKET_LEN,
        dscp: 0,
        schedule: Schedule::constant(POLICED_KBPS * 1000.0 / 8.0 / PACKET_LEN as f64, total),
    };
    let bg = FlowGen {
        id: 2,
        bind: BACKGROUND_SRC.parse()?,
        dst: BACKGROUND_DST.parse()?,
        packet_len: PACKET_LEN,
        dscp: 0,
        schedule: background.clone(),
    };
    while Instant::now() < epoch {
        std::thread::sleep(Duration::from_millis(5));
    }
    let epoch_ns = now_ns();
    let gens: Vec<_> = [policed, bg]
        .into_iter()
        .map(|f| {
            let st = stop.clone();
            tb.ns("tx")
                .and_then(|ns| Ok(ns.spawn_in(move || generate(&f, &st))?))
        })
        .collect::<Result<_, _>>()?;

    // Progress, and a watch on the components.
    let mut failure = None;
    while epoch.elapsed() < total && !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_secs(1));
        let el = epoch.elapsed().as_secs();
        if let Some((i, (s0, s1, name))) = bounds
            .iter()
            .enumerate()
            .find(|(_, (a, b, _))| el >= *a && el < *b)
        {
            let _ = s0;
            eprintln!(
                "paper: phase {name} ({}/{}), {} s left in phase, {} s left",
                i + 1,
                bounds.len(),
                s1.saturating_sub(el),
                total.as_secs().saturating_sub(el)
            );
        }
        for p in collectors
            .iter_mut()
            .chain([&mut policy_server, &mut enforcer, &mut meter])
        {
            if let Err(e) = p.check_alive() {
                failure = Some(e);
            }
        }
        if failure.is_some() {
            stop.store(true, Ordering::Relaxed);
        }
    }
    let mut sent = Vec::new();
    for g in gens {
        match g.join() {
            Ok(Ok(Ok(r))) => sent.push(r),
            Ok(Ok(Err(e))) => return Err(e.into()),
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => anyhow::bail!("a traffic generator panicked"),
        }
    }
    std::thread::sleep(Duration::from_millis(1500));
    sink_stop.store(true, Ordering::Relaxed);
    let received = match rx.join() {
        Ok(Ok(Ok(r))) => r,
        Ok(Ok(Err(e))) => return Err(e.into()),
        Ok(Err(e)) => return Err(e.into()),
        Err(_) => anyhow::bail!("the sink panicked"),
    };
    let in_profile = match recorder.join() {
        Ok(Ok(Ok(r))) => r,
        Ok(Ok(Err(e))) => return Err(e.into()),
        Ok(Err(e)) => return Err(e.into()),
        Err(_) => anyhow::bail!("the in-profile recorder panicked"),
    };
    anyhow::ensure!(
        in_profile.over_limit == 0,
        "the in-profile recorder kept only the first 4 million packets"
    );
    if let Some(e) = failure {
        return Err(e);
    }
    anyhow::ensure!(!stop.load(Ordering::Relaxed), "interrupted");
    // Let the last reports land, then stop the components before reading.
    std::thread::sleep(Duration::from_secs(1));
    for p in [&mut meter, &mut enforcer, &mut policy_server]
        .into_iter()
        .chain(collectors.iter_mut())
    {
        p.stop(Duration::from_secs(5));
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let events = rt.block_on(read_events(&db_url))?;
    let mut summary = summarise(
        &background,
        &bounds,
        epoch_ns,
        summary::Delivered {
            sink: &received,
            in_profile: &in_profile.arrivals,
        },
        &events,
        sent,
        &db_url,
    );
    summary.policy_source = if args.ldap {
        "ldap (slapd, syncrepl)".into()
    } else {
        "ldif file".into()
    };
    write_outputs(&out, &summary, &events)?;
    Ok(summary)
}
