use clap::Parser;
use qosloop_collector::Config;
use std::path::PathBuf;
use std::process::ExitCode;

/// qosloop collector: stores flow records from exporters in SQL.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// TOML configuration file (collector/example.toml); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Export listen address HOST:PORT [default 127.0.0.1:4740; none when
    /// only --ipfix-listen is given].
    #[arg(long)]
    listen: Option<String>,
    /// IPFIX / NetFlow listener (repeatable): udp://HOST:PORT (IPFIX,
    /// NetFlow v9 and v5), tcp://HOST:PORT (IPFIX), tls://HOST:PORT (IPFIX
    /// over TLS with --tls-cert/--tls-key/--tls-client-ca).
    #[arg(long = "ipfix-listen")]
    ipfix_listen: Vec<String>,
    /// Exporter address allowed to send IPFIX/NetFlow (repeatable; default
    /// every address).
    #[arg(long = "ipfix-allow")]
    ipfix_allow: Vec<String>,
    /// UDP receive buffer asked of the kernel, bytes [default 33554432].
    #[arg(long)]
    ipfix_rcvbuf: Option<usize>,
    /// Datagrams per recvmmsg call [default 64].
    #[arg(long)]
    ipfix_batch: Option<usize>,
    /// Sockets and threads per UDP listener (SO_REUSEPORT) [default 1].
    #[arg(long)]
    ipfix_udp_threads: Option<usize>,
    /// UDP templates not refreshed for this long expire, s [default 1800].
    #[arg(long)]
    ipfix_template_expiry_s: Option<u64>,
    /// Data sets held per exporter and domain for a missing template [default 1024].
    #[arg(long)]
    ipfix_pending_sets: Option<usize>,
    /// Bytes of those sets per exporter and domain [default 4194304].
    #[arg(long)]
    ipfix_pending_bytes: Option<usize>,
    /// How long a held set waits for its template, s [default 120].
    #[arg(long)]
    ipfix_pending_age_s: Option<u64>,
    /// Exporters tracked at once per UDP socket [default 4096].
    #[arg(long)]
    ipfix_max_exporters: Option<usize>,
    /// Templates per exporter and domain [default 1024].
    #[arg(long)]
    ipfix_max_templates: Option<usize>,
    /// Fields per template [default 512].
    #[arg(long)]
    ipfix_max_fields: Option<usize>,
    /// Records per batch handed to storage [default 8192].
    #[arg(long)]
    ipfix_flush_records: Option<usize>,
    /// Longest a decoded record waits for its batch, ms [default 100].
    #[arg(long)]
    ipfix_flush_ms: Option<u64>,
    /// How often exporter counters are written to SQL, s [default 5].
    #[arg(long)]
    ipfix_stats_interval_s: Option<u64>,
    /// A silent IPFIX TCP session is closed after this long, s [default 900].
    #[arg(long)]
    ipfix_tcp_idle_s: Option<u64>,
    /// Join this collector cluster (kept in PostgreSQL; docs/cluster.md).
    #[arg(long)]
    cluster: Option<String>,
    /// This node's name in the cluster [default: the host name].
    #[arg(long)]
    node: Option<String>,
    /// HOST:PORT other nodes and operators reach this node at [default: listen].
    #[arg(long)]
    advertise: Option<String>,
    /// Lease on the database's clock, ms [default 1000].
    #[arg(long)]
    cluster_lease_ms: Option<u64>,
    /// Buckets of the analysis key space [default 64].
    #[arg(long)]
    cluster_buckets: Option<u32>,
    /// Rate window of the cluster's bandwidth manager, ms [default 1000].
    #[arg(long)]
    cluster_interval_ms: Option<u64>,
    /// A window is closed this long after its end, ms [default 1200].
    #[arg(long)]
    cluster_lag_ms: Option<u64>,
    /// EWMA weight of the newest window, thousandths [default 500].
    #[arg(long)]
    cluster_ewma_permille: Option<u32>,
    /// Analysis the node runs (repeatable): bandwidth, stitch [default bandwidth].
    #[arg(long = "cluster-analysis")]
    cluster_analyses: Vec<String>,
    /// Journal decoded UDP records in this directory before SQL (bounded,
    /// checksummed, drained by a loader) [default: none, straight to SQL].
    #[arg(long)]
    ipfix_journal_dir: Option<PathBuf>,
    /// Bytes the journal may hold [default 1073741824 = 1 GiB].
    #[arg(long)]
    ipfix_journal_max_bytes: Option<u64>,
    /// fsync the journal at most this long after an append, ms; 0 = every
    /// append [default 100].
    #[arg(long)]
    ipfix_journal_fsync_ms: Option<u64>,
    /// Remove flows older than this many days (whole partitions on
    /// PostgreSQL); 0 keeps all [default 0].
    #[arg(long)]
    retention_days: Option<u32>,
    /// PostgreSQL flows partitions made this many days ahead [default 2].
    #[arg(long)]
    partitions_ahead_days: Option<u32>,
    /// How often partitions and retention are checked, s [default 3600].
    #[arg(long)]
    maintenance_interval_s: Option<u64>,
    /// Keep the real-time knowledge base (docs/kb.md).
    #[arg(long)]
    kb: bool,
    /// Life of a mapping learned from an agent record, s [default 300].
    #[arg(long)]
    kb_mapping_ttl_s: Option<u64>,
    /// Life of a host's counters after its last record, s [default 3600].
    #[arg(long)]
    kb_host_ttl_s: Option<u64>,
    /// A user idle this long logs off, s [default 60].
    #[arg(long)]
    kb_idle_s: Option<u64>,
    /// How often expiry and logoffs are checked, ms [default 1000].
    #[arg(long)]
    kb_sweep_ms: Option<u64>,
    /// A byte threshold per user and session, USER=BYTES (`*` for every
    /// user); repeatable.
    #[arg(long = "kb-threshold")]
    kb_thresholds: Vec<String>,
    /// Database URL: sqlite://FILE, postgres://USER@HOST:PORT/DB, or discard:.
    #[arg(long, env = "QOSLOOP_DB")]
    db: Option<String>,
    /// Apply the schema migrations, print the tables and exit.
    #[arg(long)]
    migrate_only: bool,
    /// Log format: text or json.
    #[arg(long)]
    log_format: Option<String>,
    /// DATA messages one session may have waiting for storage.
    #[arg(long)]
    window: Option<usize>,
    /// DATA messages waiting for the storage writer, all sessions.
    #[arg(long)]
    queue_messages: Option<usize>,
    /// Records committed in one transaction at most.
    #[arg(long)]
    group_records: Option<usize>,
    /// Transactions in flight at once (PostgreSQL).
    #[arg(long)]
    writers: Option<usize>,
    /// Largest message accepted, bytes.
    #[arg(long)]
    max_message: Option<usize>,
    /// Keepalive interval announced to exporters, seconds.
    #[arg(long)]
    keepalive_s: Option<u16>,
    /// TLS certificate chain of this collector (PEM).
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// CA (PEM) that exporters' client certificates must chain to.
    #[arg(long)]
    tls_client_ca: Option<PathBuf>,
    /// Information element to disable in template negotiation (repeatable).
    #[arg(long = "disable-key")]
    disable_keys: Vec<String>,
    /// Listen beyond loopback without mutual TLS: anyone who reaches the
    /// port can feed records into the loop. Logged at WARN.
    #[arg(long)]
    allow_insecure_remote: bool,
    /// Connections open at once from one address [default 32].
    #[arg(long)]
    max_connections_per_peer: Option<usize>,
    /// Connections open at once in total [default 256].
    #[arg(long)]
    max_connections: Option<usize>,
    /// START must arrive within this many ms of connecting [default 5000].
    #[arg(long)]
    handshake_timeout_ms: Option<u64>,
    /// FINAL_TMPL_DATA must arrive within this many ms of START [default 10000].
    #[arg(long)]
    templates_timeout_ms: Option<u64>,
    /// Templates one session may negotiate [default 64].
    #[arg(long)]
    max_templates: Option<usize>,
    /// Keys one template may have [default 64].
    #[arg(long)]
    max_template_keys: Option<usize>,
    /// TMPL_DATA messages one session may send [default 16].
    #[arg(long)]
    max_template_messages: Option<usize>,
    /// Decoded records one session may have waiting for storage, bytes
    /// [default 67108864 = 64 MiB].
    #[arg(long)]
    decoded_bytes_per_session: Option<usize>,
    /// Decoded records waiting for storage over all sessions, bytes
    /// [default 536870912 = 512 MiB].
    #[arg(long)]
    decoded_bytes_total: Option<usize>,
    /// Messages over 64 KiB being received at once over all connections,
    /// bytes [default 268435456 = 256 MiB; at least --max-message].
    #[arg(long)]
    large_message_bytes_total: Option<usize>,
    /// Prometheus /metrics on HOST:PORT (loopback unless
    /// --allow-insecure-remote).
    #[arg(long, value_name = "HOST:PORT")]
    metrics: Option<String>,
}

/// Exit code for a configuration that cannot be used (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

fn load(args: &Args) -> Result<Config, qosloop_collector::ConfigError> {
    let mut c = match &args.config {
        Some(p) => Config::from_file(p)?,
        None => Config::default(),
    };
    if !args.ipfix_listen.is_empty() {
        c.ipfix_listen = args.ipfix_listen.clone();
    }
    if !args.ipfix_allow.is_empty() {
        c.ipfix_allow = args.ipfix_allow.clone();
    }
    // With an IPFIX listener and no export address given anywhere, the
    // collector takes IPFIX only.
    let listen_in_file = args
        .config
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| t.parse::<toml::Table>().ok())
        .is_some_and(|t| t.contains_key("listen"));
    if args.listen.is_none() && !listen_in_file && !c.ipfix_listen.is_empty() {
        c.listen = String::new();
    }
    if let Some(v) = &args.listen {
        c.listen = v.clone();
    }
    for (flag, key) in [
        (args.ipfix_rcvbuf, &mut c.ipfix_rcvbuf),
        (args.ipfix_batch, &mut c.ipfix_batch),
        (args.ipfix_udp_threads, &mut c.ipfix_udp_threads),
        (args.ipfix_pending_sets, &mut c.ipfix_pending_sets),
        (args.ipfix_pending_bytes, &mut c.ipfix_pending_bytes),
        (args.ipfix_max_exporters, &mut c.ipfix_max_exporters),
        (args.ipfix_max_templates, &mut c.ipfix_max_templates),
        (args.ipfix_max_fields, &mut c.ipfix_max_fields),
        (args.ipfix_flush_records, &mut c.ipfix_flush_records),
    ] {
        if let Some(v) = flag {
            *key = v;
        }
    }
    for (flag, key) in [
        (args.ipfix_template_expiry_s, &mut c.ipfix_template_expiry_s),
        (args.ipfix_pending_age_s, &mut c.ipfix_pending_age_s),
        (args.ipfix_flush_ms, &mut c.ipfix_flush_ms),
        (args.ipfix_stats_interval_s, &mut c.ipfix_stats_interval_s),
        (args.ipfix_tcp_idle_s, &mut c.ipfix_tcp_idle_s),
    ] {
        if let Some(v) = flag {
            *key = v;
        }
    }
    if let Some(v) = &args.db {
        c.db = v.clone();
    }
    if args.ipfix_journal_dir.is_some() {
        c.ipfix_journal_dir = args.ipfix_journal_dir.clone();
    }
    if let Some(v) = args.ipfix_journal_max_bytes {
        c.ipfix_journal_max_bytes = v;
    }
    if let Some(v) = args.ipfix_journal_fsync_ms {
        c.ipfix_journal_fsync_ms = v;
    }
    if let Some(v) = args.retention_days {
        c.retention_days = v;
    }
    if let Some(v) = args.partitions_ahead_days {
        c.partitions_ahead_days = v;
    }
    if let Some(v) = args.maintenance_interval_s {
        c.maintenance_interval_s = v;
    }
    c.kb |= args.kb;
    for (flag, key) in [
        (args.kb_mapping_ttl_s, &mut c.kb_mapping_ttl_s),
        (args.kb_host_ttl_s, &mut c.kb_host_ttl_s),
        (args.kb_idle_s, &mut c.kb_idle_s),
        (args.kb_sweep_ms, &mut c.kb_sweep_ms),
    ] {
        if let Some(v) = flag {
            *key = v;
        }
    }
    if !args.kb_thresholds.is_empty() {
        c.kb_thresholds = args.kb_thresholds.clone();
    }
    if let Some(v) = &args.log_format {
        c.log_format = v.clone();
    }
    for (flag, key) in [
        (&args.cluster, &mut c.cluster),
        (&args.node, &mut c.node),
        (&args.advertise, &mut c.advertise),
    ] {
        if let Some(v) = flag {
            *key = v.clone();
        }
    }
    for (flag, key) in [
        (args.cluster_lease_ms, &mut c.cluster_lease_ms),
        (args.cluster_interval_ms, &mut c.cluster_interval_ms),
        (args.cluster_lag_ms, &mut c.cluster_lag_ms),
    ] {
        if let Some(v) = flag {
            *key = v;
        }
    }
    if let Some(v) = args.cluster_buckets {
        c.cluster_buckets = v;
    }
    if let Some(v) = args.cluster_ewma_permille {
        c.cluster_ewma_permille = v;
    }
    if !args.cluster_analyses.is_empty() {
        c.cluster_analyses = args.cluster_analyses.clone();
    }
    if !c.cluster.is_empty() && c.node.is_empty() {
        c.node = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default();
    }
    if c.advertise.is_empty() {
        c.advertise = c.listen.clone();
    }
    if let Some(v) = args.window {
        c.window = v;
    }
    if let Some(v) = args.queue_messages {
        c.queue_messages = v;
    }
    if let Some(v) = args.group_records {
        c.group_records = v;
    }
    if let Some(v) = args.writers {
        c.writers = v;
    }
    if let Some(v) = args.max_message {
        c.max_message = v;
    }
    if let Some(v) = args.keepalive_s {
        c.keepalive_s = v;
    }
    if args.tls_cert.is_some() {
        c.tls_cert = args.tls_cert.clone();
    }
    if args.tls_key.is_some() {
        c.tls_key = args.tls_key.clone();
    }
    if args.tls_client_ca.is_some() {
        c.tls_client_ca = args.tls_client_ca.clone();
    }
    if !args.disable_keys.is_empty() {
        c.disable_keys = args.disable_keys.clone();
    }
    if args.allow_insecure_remote {
        c.allow_insecure_remote = true;
    }
    for (flag, key) in [
        (
            args.max_connections_per_peer,
            &mut c.max_connections_per_peer,
        ),
        (args.max_connections, &mut c.max_connections),
        (args.max_templates, &mut c.max_templates),
        (args.max_template_keys, &mut c.max_template_keys),
        (args.max_template_messages, &mut c.max_template_messages),
        (
            args.decoded_bytes_per_session,
            &mut c.decoded_bytes_per_session,
        ),
        (args.decoded_bytes_total, &mut c.decoded_bytes_total),
        (
            args.large_message_bytes_total,
            &mut c.large_message_bytes_total,
        ),
    ] {
        if let Some(v) = flag {
            *key = v;
        }
    }
    if let Some(v) = &args.metrics {
        c.metrics = v.clone();
    }
    if let Some(v) = args.handshake_timeout_ms {
        c.handshake_timeout_ms = v;
    }
    if let Some(v) = args.templates_timeout_ms {
        c.templates_timeout_ms = v;
    }
    c.validate()?;
    Ok(c)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let config = match load(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("qosloop-collector: bad configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Err(e) = qosloop_collector::tls_acceptor(&config) {
        eprintln!("qosloop-collector: bad configuration: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let format = config.log_format.parse().unwrap_or_default();
    qosloop_runtime::telemetry::init(format);
    match run(args.migrate_only, config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qosloop-collector: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(migrate_only: bool, config: Config) -> anyhow::Result<()> {
    if migrate_only {
        let db = qosloop_store::Db::connect(&config.db).await?;
        let applied = db.migrate().await?;
        tracing::info!(applied, db = %qosloop_store::redact(&config.db), "schema up to date");
        for t in db.tables().await? {
            println!("{t}");
        }
        return Ok(());
    }
    let metrics_listener = config
        .metrics_addr()?
        .map(|addr| {
            qosloop_runtime::metrics::MetricsServer::bind(addr)
                .map_err(|e| anyhow::anyhow!("listening for metrics on {addr}: {e}"))
        })
        .transpose()?;
    let listener = if config.listen.is_empty() {
        None
    } else {
        Some(qosloop_collector::bind(&config).await?)
    };
    // PostgreSQL: the handle connects on first use, so the node starts
    // while the server is unreachable; the writers hold what arrives (UDP
    // records wait in the journal, CRANE sessions are served only once the
    // storage is ready) until it is reached and migrated.
    let is_pg = config.db.starts_with("postgres://") || config.db.starts_with("postgresql://");
    let (sink, ready) = if is_pg {
        let db = qosloop_store::Db::connect_lazy(&config.db)?;
        // Reachable now: migrate before serving, so that a node that
        // listens has its schema (what exporters and operators expect of a
        // started collector). Unreachable: serve at once and hold.
        let ready = match db.probe().await {
            Ok(()) => {
                qosloop_collector::prepare_storage(&db).await?;
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "database unreachable at start; holding what arrives until it is reached");
                Some(tokio::sync::watch::channel(false))
            }
        };
        (qosloop_collector::Sink::Db(db), ready)
    } else {
        (qosloop_collector::open_sink(&config.db).await?, None)
    };
    let tally = qosloop_collector::TallyCell::default();
    let collector = qosloop_collector::Collector::gated(
        sink.clone(),
        &config,
        tally.clone(),
        ready.as_ref().map(|(_, rx)| rx.clone()),
    )?;
    let ingest = if config.ipfix_listen.is_empty() {
        None
    } else {
        Some(
            qosloop_collector::ipfix::Ingest::start(&config, sink.clone(), collector.writer())
                .await?,
        )
    };
    if let (qosloop_collector::Sink::Db(db), Some((tx, _))) = (&sink, &ready) {
        qosloop_collector::prepare_storage(db).await?;
        tx.send_replace(true);
    }
    tracing::info!(db = %qosloop_store::redact(&config.db), "storage ready");
    let node = match (&sink, config.cluster.is_empty()) {
        (qosloop_collector::Sink::Db(db), false) => {
            let spec = qosloop_collector::cluster::ClusterSpec {
                cluster: config.cluster.clone(),
                node: config.node.clone(),
                advertise: config.advertise.clone(),
                routing: config.routing(),
                lease: std::time::Duration::from_millis(config.cluster_lease_ms),
            };
            match qosloop_collector::cluster::ClusterNode::start(db.clone(), spec, tally.clone())
                .await
            {
                Ok(n) => Some(n),
                Err(e @ qosloop_store::ClusterError::Refused { .. }) => {
                    eprintln!("qosloop-collector: {e}");
                    std::process::exit(i32::from(EXIT_CONFIG));
                }
                Err(e) => return Err(e.into()),
            }
        }
        _ => None,
    };
    let _maintenance = match &sink {
        qosloop_collector::Sink::Db(db) => Some(tokio::spawn({
            let (db, config) = (db.clone(), config.clone());
            async move { qosloop_collector::maintenance::run(db, &config).await }
        })),
        qosloop_collector::Sink::Discard => None,
    };
    let _kb = match (&sink, config.kb_config()) {
        (qosloop_collector::Sink::Db(db), Some(kb)) => {
            for (user, bytes) in config.kb_threshold_pairs().map_err(anyhow::Error::msg)? {
                db.kb_set_threshold(&user, bytes).await?;
            }
            let every = std::time::Duration::from_millis(config.kb_sweep_ms);
            Some(tokio::spawn(qosloop_collector::maintenance::kb_sweeps(
                db.clone(),
                kb,
                every,
            )))
        }
        _ => None,
    };
    let _metrics = match metrics_listener {
        Some(l) => {
            let mut source = collector.metrics();
            if let Some(i) = &ingest {
                source = source.with_ingest(i);
            }
            let handle = l.start(Default::default(), move || source.render())?;
            tracing::info!(metrics = %handle.local_addr, "Prometheus metrics");
            Some(handle)
        }
        None => None,
    };
    let export = async {
        match listener {
            Some(l) => collector.serve(l).await,
            None => std::future::pending().await,
        }
    };
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = export => r?,
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; stopping"),
        _ = terminate.recv() => tracing::info!("terminated; stopping"),
    }
    if let Some(ingest) = ingest {
        // Returns once what the UDP threads held is committed.
        ingest.stop().await;
    }
    if let Some(node) = node {
        node.leave().await;
    }
    Ok(())
}
