//! The command line: flags and TOML merged into one validated [`Config`],
//! then one of run (the daemon), `apply`, `status`, `probe`, `--cleanup`.
//!
//! Exit codes: 0 success, 1 failure at run time, 64 bad configuration or
//! bad input file (the line names the file and the field).

use crate::backend::{DryRunBackend, KernelBackend, LinuxBackend};
use crate::config::{Config, ConfigError};
use crate::enforcer::{Enforcer, EnforcerConfig};
use crate::metrics::EnforcerMetrics;
use crate::render::Layout;
use anyhow::Context as _;
use clap::{Parser, Subcommand};
use qosloop_schema::Decision;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

/// Exit code for unusable configuration (sysexits EX_USAGE).
pub const EXIT_CONFIG: u8 = 64;

/// qosloop-enforcer: applies qosloop decisions in the Linux kernel (HTB over
/// rtnetlink, nftables), owning only its own qdisc handle and table.
#[derive(Debug, Parser)]
#[command(version, name = "qosloop-enforcer")]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Configuration file (TOML; every flag has a key of the same name).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// PDPs in order of preference, HOST:PORT[,HOST:PORT…].
    #[arg(long, value_delimiter = ',', global = true)]
    pub pdp: Vec<String>,
    /// Interface whose egress is enforced.
    #[arg(long, global = true)]
    pub interface: Option<String>,
    /// Roles announced to the PDP, ROLE[,ROLE…].
    #[arg(long, value_delimiter = ',', global = true)]
    pub roles: Vec<String>,
    /// Capacity of the interface (e.g. 10mbit): the HTB root rate. Default 1gbit.
    #[arg(long, global = true)]
    pub capacity: Option<String>,
    /// Major of the enforcer's qdisc handle, hex (default e5).
    #[arg(long, global = true)]
    pub qdisc_handle: Option<String>,
    /// egress (default) or ingress: traffic arriving on the interface,
    /// shaped on an IFB device the enforcer creates.
    #[arg(long, global = true)]
    pub direction: Option<String>,
    /// JSON list of decisions to apply at start (no PDP needed).
    #[arg(long, global = true)]
    pub decisions: Option<PathBuf>,
    /// Remove everything the enforcer created on the interface and exit.
    #[arg(long)]
    pub cleanup: bool,
    /// Print the netlink and nftables operations instead of making them.
    #[arg(long, global = true)]
    pub dry_run: bool,
    /// Send no HTB class statistics to the PDP (a policy server older than
    /// them refuses an accounting report that carries them).
    #[arg(long, global = true)]
    pub no_class_accounting: bool,
    /// Seconds between keepalives to the PDP.
    #[arg(long, global = true)]
    pub keepalive_s: Option<u64>,
    /// COPS over TLS: CA (PEM) the PDPs' certificates must chain to.
    #[arg(long, global = true)]
    pub pdp_tls_ca: Option<PathBuf>,
    /// Certificate (PEM) shown to PDPs that require one (with --pdp-tls-key).
    #[arg(long, global = true)]
    pub pdp_tls_cert: Option<PathBuf>,
    /// Key (PEM) of --pdp-tls-cert.
    #[arg(long, global = true)]
    pub pdp_tls_key: Option<PathBuf>,
    /// Log format: text or json.
    #[arg(long, global = true)]
    pub log_format: Option<String>,
    /// Prometheus /metrics on HOST:PORT (loopback), while the daemon runs.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Report which kernel backends work here (probed in a throwaway namespace).
    Probe {
        #[arg(long)]
        json: bool,
    },
    /// Show the decisions, kernel objects and counters on the interface.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Make the interface hold exactly the decisions of `--decisions FILE`
    /// (a JSON list of decisions), then exit.
    Apply,
}

/// Merges flags over the file.
fn merged(args: &Args) -> Result<Config, ConfigError> {
    let mut c = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    if !args.pdp.is_empty() {
        c.pdp = args.pdp.clone();
    }
    if args.interface.is_some() {
        c.interface = args.interface.clone();
    }
    if !args.roles.is_empty() {
        c.roles = args.roles.clone();
    }
    if args.capacity.is_some() {
        c.capacity = args.capacity.clone();
    }
    if args.qdisc_handle.is_some() {
        c.qdisc_handle = args.qdisc_handle.clone();
    }
    if args.direction.is_some() {
        c.direction = args.direction.clone();
    }
    if args.decisions.is_some() {
        c.decisions = args.decisions.clone();
    }
    if args.log_format.is_some() {
        c.log_format = args.log_format.clone();
    }
    if args.keepalive_s.is_some() {
        c.keepalive_s = args.keepalive_s;
    }
    if args.metrics.is_some() {
        c.metrics = args.metrics.clone();
    }
    for (flag, field) in [
        (&args.pdp_tls_ca, &mut c.pdp_tls_ca),
        (&args.pdp_tls_cert, &mut c.pdp_tls_cert),
        (&args.pdp_tls_key, &mut c.pdp_tls_key),
    ] {
        if flag.is_some() {
            *field = flag.clone();
        }
    }
    c.dry_run |= args.dry_run;
    c.no_class_accounting |= args.no_class_accounting;
    Ok(c)
}

/// What a running daemon wrote about itself (mode: standalone, connected,
/// fail-static), if one runs for this interface in this namespace.
fn daemon_state(interface: &str) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(crate::pep::state_file(interface)).ok()?;
    let mut v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let alive = v["pid"]
        .as_u64()
        .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
    if !alive {
        v["mode"] = serde_json::Value::from("not running (state file left by a stopped daemon)");
    }
    Some(v)
}

/// Reads a JSON list of decisions; errors name the file, line and column.
pub fn read_decisions(path: &Path) -> Result<Vec<Decision>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: format!("line {} column {}: {e}", e.line(), e.column()),
    })
}

/// Parses the process's arguments, runs, and maps the outcome to an exit code.
pub fn main() -> ExitCode {
    let args = Args::parse();
    let config = match merged(&args) {
        Ok(c) => c,
        Err(e) => return config_error(&e),
    };
    let format = match config.log_format.as_deref().unwrap_or("text").parse() {
        Ok(f) => f,
        Err(_) => {
            return config_error(&ConfigError::Invalid {
                field: "log_format",
                message: "use text or json".into(),
            })
        }
    };
    qosloop_runtime::telemetry::init(format);
    match run(args, config) {
        Ok(code) => code,
        Err(e) if e.downcast_ref::<ConfigError>().is_some() => {
            eprintln!("qosloop-enforcer: bad configuration: {e:#}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(e) => {
            eprintln!("qosloop-enforcer: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn config_error(e: &ConfigError) -> ExitCode {
    eprintln!("qosloop-enforcer: bad configuration: {e}");
    ExitCode::from(EXIT_CONFIG)
}

fn run(args: Args, config: Config) -> anyhow::Result<ExitCode> {
    if let Some(Command::Probe { json }) = &args.command {
        let report = crate::probe::probe();
        if *json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            for c in &report.capabilities {
                println!(
                    "{:12} {:4} {}",
                    c.name,
                    if c.works { "ok" } else { "MISSING" },
                    c.detail
                );
            }
            println!(
                "usable backends: {}",
                if report.usable_backends.is_empty() {
                    "none (dry-run only)".to_owned()
                } else {
                    report.usable_backends.join(", ")
                }
            );
        }
        return Ok(if report.usable_backends.is_empty() {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        });
    }
    let ecfg = config.enforcer()?;
    let pdps = config.pdps()?;
    // The daemon's PDP TLS files are checked before the kernel is touched
    // (`Enforcer::start` reconciles it), not when the first PDP is dialled.
    let daemon = args.command.is_none() && !args.cleanup;
    if daemon {
        config.check_pdp_tls()?;
    }
    let metrics_addr = config.metrics_addr()?;
    let file_decisions = match (&args.command, &config.decisions) {
        (Some(Command::Apply) | None, Some(file)) => Some(read_decisions(file)?),
        (Some(Command::Apply), None) => {
            return Err(ConfigError::Invalid {
                field: "decisions",
                message: "apply needs --decisions FILE".into(),
            }
            .into())
        }
        _ => None,
    };
    // Bound before the kernel is touched: a taken port is a start-up error.
    let metrics = Arc::new(EnforcerMetrics::default());
    let _metrics_server = match metrics_addr.filter(|_| daemon) {
        Some(addr) => {
            let source = metrics.clone();
            let h = qosloop_runtime::metrics::MetricsServer::bind(addr)
                .and_then(|l| l.start(Default::default(), move || source.render()))
                .with_context(|| format!("listening for metrics on {addr}"))?;
            tracing::info!(metrics = %h.local_addr, "Prometheus metrics");
            Some(h)
        }
        None => None,
    };
    if config.dry_run {
        let backend = DryRunBackend {
            print: true,
            ..DryRunBackend::default()
        };
        return run_with(backend, args, ecfg, pdps, file_decisions, &config, metrics);
    }
    let backend = LinuxBackend::open().context("opening the rtnetlink socket")?;
    run_with(backend, args, ecfg, pdps, file_decisions, &config, metrics)
}

fn run_with<B: KernelBackend + Send + 'static>(
    mut backend: B,
    args: Args,
    ecfg: EnforcerConfig,
    pdps: Vec<String>,
    file_decisions: Option<Vec<Decision>>,
    config: &Config,
    metrics: Arc<EnforcerMetrics>,
) -> anyhow::Result<ExitCode> {
    let layout = Layout {
        interface: ecfg.interface.clone(),
        direction: ecfg.direction,
        qdisc_major: ecfg.qdisc_major,
        capacity: ecfg.capacity,
    };
    if let Some(Command::Status { json }) = &args.command {
        let mut status = crate::status::read(&mut backend, &layout).map_err(anyhow::Error::msg)?;
        status.daemon = daemon_state(&layout.interface);
        if *json {
            println!("{}", serde_json::to_string_pretty(&status)?);
        } else {
            print!("{}", status.to_text());
        }
        return Ok(ExitCode::SUCCESS);
    }
    if args.cleanup {
        let ifindex = backend
            .ifindex(&layout.interface)
            .ok_or_else(|| anyhow::anyhow!("unknown interface {:?}", layout.interface))?;
        crate::enforcer::cleanup(&mut backend, &layout, ifindex)?;
        println!(
            "removed qosloop's table and qdisc from {}",
            layout.interface
        );
        return Ok(ExitCode::SUCCESS);
    }
    let (mut enforcer, report) = Enforcer::start(backend, ecfg)?;
    if let Some(decisions) = file_decisions {
        let n = decisions.len();
        let result = enforcer.sync(decisions);
        metrics.applied(&result, |s| s.elapsed);
        let summary = result?;
        tracing::info!(
            decisions = n,
            installed = summary.installed,
            changed = summary.changed,
            unchanged = summary.unchanged,
            removed = summary.removed,
            elapsed_us = summary.elapsed.as_micros() as u64,
            "applied decisions file"
        );
        if matches!(args.command, Some(Command::Apply)) {
            if config.dry_run {
                println!(
                    "nftables table after this change (as `nft list table` will show it):\n{}",
                    enforcer.listing()
                );
            }
            println!(
                "{}",
                serde_json::json!({"start": report, "apply": summary, "elapsed_us": summary.elapsed.as_micros() as u64})
            );
            return Ok(ExitCode::SUCCESS);
        }
    }
    metrics.refresh_kernel(&mut enforcer);
    crate::pep::run(enforcer, pdps, config, metrics)?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn flags_are_consistent_and_merge_over_the_file() {
        Args::command().debug_assert();
        let args = Args::parse_from([
            "qosloop-enforcer",
            "--pdp",
            "a:1,b:2",
            "--interface",
            "veth1",
            "--roles",
            "edge,core",
            "--capacity",
            "10mbit",
            "apply",
            "--decisions",
            "d.json",
        ]);
        let c = merged(&args).unwrap();
        assert_eq!(c.pdp, vec!["a:1".to_owned(), "b:2".to_owned()]);
        assert_eq!(c.roles.len(), 2);
        assert_eq!(c.enforcer().unwrap().capacity, qosloop_schema::Kbps(10_000));
        assert!(matches!(args.command, Some(Command::Apply)));
    }

    #[test]
    fn decisions_file_errors_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.json");
        std::fs::write(&p, "[\n{\"id\": 1}\n]").unwrap();
        let e = read_decisions(&p).unwrap_err().to_string();
        assert!(e.contains("d.json") && e.contains("line 2"), "{e}");
    }
}
