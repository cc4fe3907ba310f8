//! `qosloop-meter`: parse flags, load and validate the configuration, run,
//! print the summary, map failures to exit codes (64: bad configuration,
//! 1: bad input or a failed run).

use clap::Parser;
use qosloop_meter::dicap::cli::DicapFlags;
use qosloop_meter::{run_file, Config, LiveCapture, Progress, SinkError};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Exit code for a configuration that cannot be used (sysexits EX_USAGE).
const EXIT_CONFIG: u8 = 64;

/// qosloop-meter: measures traffic (pcap/pcapng files or a live interface)
/// into flow records. Every flag is also a key of the --config file.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Configuration file (TOML; see meter/example.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Read packets from this pcap or pcapng file.
    #[arg(long)]
    pcap: Option<PathBuf>,
    /// Capture live on this interface (AF_PACKET; needs CAP_NET_RAW).
    #[arg(long)]
    interface: Option<String>,
    /// Write flow records as JSON Lines (DESIGN.md §3).
    #[arg(long)]
    records_out: Option<PathBuf>,
    /// Export records; may repeat: crane://HOST:PORT[,HOST:PORT…]
    /// (collectors best first; exit 0 only when every record is
    /// acknowledged or spooled), ipfix://HOST:PORT (UDP) or
    /// ipfix+tcp://HOST:PORT (IPFIX to any collector; options as
    /// ?domain=N&max_message=BYTES&refresh_s=S&refresh_messages=N).
    #[arg(long)]
    export: Vec<String>,
    /// Spool directory of the export while no collector answers.
    #[arg(long)]
    export_spool: Option<PathBuf>,
    /// Export over TLS (mutual): CA (PEM) of the collectors' certificates.
    #[arg(long)]
    export_tls_ca: Option<PathBuf>,
    /// This meter's certificate (PEM) for export over TLS.
    #[arg(long)]
    export_tls_cert: Option<PathBuf>,
    /// Key (PEM) of --export-tls-cert.
    #[arg(long)]
    export_tls_key: Option<PathBuf>,
    /// Fail a collector over when it leaves DATA unacknowledged this long,
    /// keepalives or not (default 10000).
    #[arg(long)]
    export_ack_timeout_ms: Option<u64>,
    /// Flow-key XML (seeds/004 Fig. 4).
    #[arg(long)]
    flow_keys: Vec<PathBuf>,
    /// Field/mask rule file (TOML); may repeat.
    #[arg(long)]
    field_rules: Vec<PathBuf>,
    /// Byte-pattern rule file (TOML, regexes compiled into one DFA).
    #[arg(long)]
    patterns: Option<PathBuf>,
    /// Bytes of each frame kept (header-only capture); 0 = whole frame.
    #[arg(long)]
    caplen: Option<usize>,
    /// End a flow after this long without packets.
    #[arg(long)]
    idle_timeout_ms: Option<u64>,
    /// End a flow this long after its first packet.
    #[arg(long)]
    active_timeout_ms: Option<u64>,
    /// Interim delta records of long flows every N ms (0 = off; default 1000).
    #[arg(long)]
    interim_ms: Option<u64>,
    /// Flow cache bound (default 1000000).
    #[arg(long)]
    max_flows: Option<usize>,
    /// off (default), count:N, time:SPACING_MS/INTERVAL_MS or hash:N.
    #[arg(long)]
    sampling: Option<String>,
    /// Live capture threads sharing the interface (PACKET_FANOUT).
    #[arg(long)]
    threads: Option<usize>,
    /// Classic BPF socket filter in `tcpdump -ddd` form, inline (commas for
    /// line breaks) or a file.
    #[arg(long)]
    bpf: Option<String>,
    /// Live capture: stop after this many seconds (0 = at Ctrl-C).
    #[arg(long)]
    duration_s: Option<u64>,
    /// Log format: text or json.
    #[arg(long)]
    log_format: Option<String>,
    /// Progress bar: auto (only on a terminal), always, never.
    #[arg(long)]
    progress: Option<String>,
    #[command(flatten)]
    dicap: DicapFlags,
    #[command(flatten)]
    dpmi: qosloop_meter::dpmi::cli::DpmiFlags,
    /// Host agent: account this host's traffic to users and processes
    /// (eBPF at the cgroup v2 root; records every --interim-ms).
    #[arg(long)]
    agent: bool,
    /// Agent: cgroup v2 directory to attach to (default: the root).
    #[arg(long)]
    agent_cgroup: Option<PathBuf>,
    /// Agent: bpffs directory to pin the maps in (a restart loses nothing).
    #[arg(long)]
    agent_pin_dir: Option<PathBuf>,
    /// Agent: entries of each counter map (default 65536).
    #[arg(long)]
    agent_map_entries: Option<u32>,
    /// Agent: bpf, nft (nftables + conntrack fallback) or auto (default).
    #[arg(long, value_name = "bpf|nft|auto")]
    agent_mode: Option<String>,
    /// Prometheus /metrics on HOST:PORT (loopback), live capture.
    #[arg(long, value_name = "HOST:PORT")]
    metrics: Option<String>,
}

impl Args {
    fn into_config(self) -> (Option<PathBuf>, Config, DicapFlags) {
        let flags = Config {
            pcap: self.pcap,
            interface: self.interface,
            records_out: self.records_out,
            export: self.export,
            export_spool: self.export_spool,
            export_tls_ca: self.export_tls_ca,
            export_tls_cert: self.export_tls_cert,
            export_tls_key: self.export_tls_key,
            export_ack_timeout_ms: self.export_ack_timeout_ms,
            flow_keys: self.flow_keys,
            field_rules: self.field_rules,
            patterns: self.patterns,
            caplen: self.caplen,
            idle_timeout_ms: self.idle_timeout_ms,
            active_timeout_ms: self.active_timeout_ms,
            interim_ms: self.interim_ms,
            max_flows: self.max_flows,
            sampling: self.sampling,
            threads: self.threads,
            bpf: self.bpf,
            duration_s: self.duration_s,
            log_format: self.log_format,
            progress: self.progress,
            agent: self.agent.then_some(true),
            agent_cgroup: self.agent_cgroup,
            agent_pin_dir: self.agent_pin_dir,
            agent_map_entries: self.agent_map_entries,
            agent_mode: self.agent_mode,
            metrics: self.metrics,
        };
        (self.config, flags, self.dicap)
    }
}

/// 64 when an output refuses to work as configured (every collector
/// refuses the templates), else 1.
fn run_exit_code(e: &anyhow::Error) -> u8 {
    let refused = e.chain().any(|c| {
        matches!(c.downcast_ref::<SinkError>(), Some(SinkError::Refused(_)))
            || matches!(
                c.downcast_ref::<qosloop_meter::RunError>(),
                Some(qosloop_meter::RunError::Sink(SinkError::Refused(_)))
            )
    });
    if refused {
        EXIT_CONFIG
    } else {
        1
    }
}

fn fail(code: u8, err: impl std::fmt::Display) -> ExitCode {
    eprintln!("qosloop-meter: {err:#}");
    ExitCode::from(code)
}

/// Sets `stop` on SIGINT/SIGTERM, or after `duration_s` seconds (0 or
/// none: no time limit).
fn stop_on_signal(stop: Arc<AtomicBool>, duration_s: Option<u64>) {
    let duration = duration_s.filter(|&s| s > 0).map(Duration::from_secs);
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            let term = async {
                match term.as_mut() {
                    Some(t) => {
                        t.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let timer = async {
                match duration {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term => {}
                _ = timer => {}
            }
        });
        stop.store(true, Ordering::Relaxed);
    });
}

fn main() -> ExitCode {
    let args = Args::parse();
    let dpmi = args.dpmi.clone();
    let (config_path, flags, dicap) = args.into_config();
    let config = match config_path {
        Some(p) => match Config::load(&p) {
            Ok(c) => c.merge(flags),
            Err(e) => return fail(EXIT_CONFIG, e),
        },
        None => flags,
    };
    let log_format = match config.log_format.as_deref().unwrap_or("text").parse() {
        Ok(f) => f,
        Err(e) => return fail(EXIT_CONFIG, e),
    };
    qosloop_runtime::telemetry::init(log_format);
    match dpmi.point(config.interface.as_deref()) {
        Ok(Some(point)) => return run_dpmi_point(point, config.duration_s),
        Ok(None) => {}
        Err(e) => return fail(EXIT_CONFIG, e),
    }
    if let Some(listen) = &dicap.dicap_coordinator {
        let stop = Arc::new(AtomicBool::new(false));
        stop_on_signal(stop.clone(), config.duration_s);
        return match dicap.run_coordinator(listen, stop) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(EXIT_CONFIG, e),
        };
    }
    let validated = match config.validate() {
        Ok(v) => v,
        Err(e) => return fail(EXIT_CONFIG, e),
    };
    let sink = match config.open_sinks() {
        Ok(s) => s,
        Err(e) => return fail(EXIT_CONFIG, e),
    };
    let mut sink = match dpmi.wrap_sink(sink) {
        Ok(s) => s,
        Err(e) => return fail(EXIT_CONFIG, e),
    };
    tracing::info!(output = %sink.describe(), "meter starting");
    if config.agent == Some(true) {
        return run_agent(&config, sink.as_mut());
    }
    let classifier = Arc::new(validated.classifier);
    if let Some(path) = &config.pcap {
        let progress = match config.progress.as_deref() {
            Some("always") => Progress::Always,
            Some("never") => Progress::Never,
            _ if std::io::stderr().is_terminal() => Progress::Always,
            _ => Progress::Never,
        };
        match run_file(
            path,
            validated.pipeline,
            classifier,
            sink.as_mut(),
            progress,
        ) {
            Ok(summary) => {
                eprintln!("qosloop-meter: {summary}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                let e = anyhow::Error::from(e);
                fail(run_exit_code(&e), e)
            }
        }
    } else if let Some(interface) = &config.interface {
        let node = match dicap.node(validated.pipeline.caplen, validated.bpf.is_some()) {
            Ok(n) => n,
            Err(e) => return fail(EXIT_CONFIG, e),
        };
        let node_filter = node.as_ref().map(DicapFlags::node_filter);
        let mut capture = match LiveCapture::open(
            interface,
            validated.threads,
            node_filter.as_deref().or(validated.bpf.as_deref()),
            validated.pipeline.caplen,
        ) {
            Ok(c) => c,
            Err(e) => return fail(1, e),
        };
        // Bound before capture starts: a taken port is a start-up error.
        let metrics = match config.metrics_addr() {
            Ok(Some(addr)) => {
                let live = Arc::new(qosloop_meter::LiveStats::default());
                capture.set_live_stats(live.clone());
                let source = qosloop_meter::metrics::MeterMetrics {
                    capture: live,
                    exports: sink.export_stats(),
                };
                let started = qosloop_runtime::metrics::MetricsServer::bind(addr)
                    .and_then(|l| l.start(Default::default(), move || source.render()));
                match started {
                    Ok(h) => {
                        tracing::info!(metrics = %h.local_addr, "Prometheus metrics");
                        Some(h)
                    }
                    Err(e) => return fail(1, format!("listening for metrics on {addr}: {e}")),
                }
            }
            Ok(None) => None,
            Err(e) => return fail(EXIT_CONFIG, e),
        };
        let counters = dicap.counters(node.is_some());
        if let Some(c) = &counters {
            capture.set_hook(c.clone());
        }
        let stop = Arc::new(AtomicBool::new(false));
        if let (Some(node), Some(c)) = (node, &counters) {
            if let Err(e) = DicapFlags::start_node(node, &capture, c.clone(), stop.clone()) {
                return fail(1, e);
            }
        }
        stop_on_signal(stop.clone(), config.duration_s);
        let started = std::time::Instant::now();
        let result = capture.run(validated.pipeline, classifier, sink.as_mut(), stop);
        drop(metrics);
        match result.map_err(anyhow::Error::from).and_then(|stats| {
            dicap.write_stats(counters.as_deref())?;
            let line = sink.finish()?;
            Ok((stats, line))
        }) {
            Ok((stats, line)) => {
                let summary = qosloop_meter::Summary {
                    stats,
                    elapsed: started.elapsed(),
                    sink: line,
                };
                eprintln!("qosloop-meter: {summary}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(run_exit_code(&e), e),
        }
    } else {
        fail(
            EXIT_CONFIG,
            "nothing to read: give --pcap FILE or --interface IF",
        )
    }
}

/// `--dpmi-point`: runs the measurement point until SIGINT/SIGTERM (or
/// --duration-s), then prints its counters as JSON.
fn run_dpmi_point(point: qosloop_meter::dpmi::PointConfig, duration_s: Option<u64>) -> ExitCode {
    let stop = Arc::new(AtomicBool::new(false));
    stop_on_signal(stop.clone(), duration_s);
    match qosloop_meter::dpmi::run_point(point, stop) {
        Ok(stats) => {
            eprintln!(
                "qosloop-meter: {}",
                serde_json::to_string(&stats).unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(1, e),
    }
}

/// `--agent`: runs until SIGINT/SIGTERM (or --duration-s), then flushes.
fn run_agent(config: &qosloop_meter::Config, sink: &mut dyn qosloop_meter::RecordSink) -> ExitCode {
    use qosloop_meter::agent;
    let cfg = agent::AgentConfig {
        cgroup: config
            .agent_cgroup
            .clone()
            .unwrap_or_else(agent::default_cgroup),
        pin_dir: config.agent_pin_dir.clone(),
        map_entries: config
            .agent_map_entries
            .unwrap_or(agent::DEFAULT_MAP_ENTRIES),
        interim: Duration::from_millis(config.interim_ms.filter(|&m| m > 0).unwrap_or(1000)),
        count_path: agent::CountPath::Cached,
        mode: config
            .agent_mode
            .as_deref()
            .and_then(|m| m.parse().ok())
            .unwrap_or(agent::AgentMode::Auto),
    };
    let stop = Arc::new(AtomicBool::new(false));
    stop_on_signal(stop.clone(), config.duration_s);
    match agent::run(&cfg, sink, &stop)
        .map_err(anyhow::Error::from)
        .and_then(|stats| Ok((stats, sink.finish()?)))
    {
        Ok((stats, line)) => {
            match line {
                Some(l) => eprintln!("qosloop-meter: {stats}; {l}"),
                None => eprintln!("qosloop-meter: {stats}"),
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(run_exit_code(&e), e),
    }
}
