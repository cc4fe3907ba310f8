//! qosloop-policy-server: parse, configure, run; map errors to exit codes
//! (64 = bad configuration, 1 = invalid policy or runtime failure).

use anyhow::Context;
use clap::Parser;
use qosloop_policy_server::config::{Config, PolicySource, Settings};
use qosloop_policy_server::repo::{self, LdapBind, LdapSource, PolicyWatch};
use qosloop_policy_server::server::{LoopConfig, Server};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// qosloop-policy-server: computes rates from stored flows, decides by
/// policy and pushes decisions to enforcers (COPS).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Configuration file (TOML); every flag below is also a key.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Validate the policy, print the rules understood and exit.
    #[arg(long)]
    check: bool,
    #[command(flatten)]
    settings: Settings,
}

const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let file = match args.config.as_deref().map(Settings::from_file).transpose() {
        Ok(f) => f.unwrap_or_default(),
        Err(e) => {
            eprintln!("qosloop-policy-server: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let config = match Config::validate(args.settings.over(file), !args.check) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("qosloop-policy-server: bad configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    qosloop_runtime::telemetry::init(config.log_format);
    config.warn_insecure_listeners();
    if config.http.is_some() && !args.check {
        config.web.auth.announce();
    }
    let nofile = qosloop_schema::guard::raise_nofile_limit();
    tracing::debug!(nofile, "open descriptor limit");
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("qosloop-policy-server: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = if args.check {
        runtime.block_on(check(&config))
    } else {
        runtime.block_on(run(config))
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qosloop-policy-server: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn ldap_source(source: &PolicySource) -> anyhow::Result<LdapSource> {
    let PolicySource::Ldap {
        url,
        base,
        bind_dn,
        password_file,
        tls_ca,
        starttls,
    } = source
    else {
        anyhow::bail!("not an LDAP policy source");
    };
    let bind = match (bind_dn, password_file) {
        (Some(dn), Some(file)) => {
            let password = std::fs::read_to_string(file)
                .with_context(|| format!("reading the LDAP password file {}", file.display()))?;
            LdapBind::Simple {
                dn: dn.clone(),
                password: password.trim_end_matches(['\n', '\r']).to_owned(),
            }
        }
        (Some(dn), None) => LdapBind::Simple {
            dn: dn.clone(),
            password: String::new(),
        },
        (None, _) if url.starts_with("ldapi://") => LdapBind::SaslExternal,
        (None, _) => LdapBind::Anonymous,
    };
    let mut s = LdapSource::new(url.as_str(), base.as_str(), bind);
    s.tls_ca = tls_ca.clone();
    s.starttls = *starttls;
    Ok(s)
}

async fn check(config: &Config) -> anyhow::Result<()> {
    let policy = match &config.policies {
        PolicySource::File(path) => repo::load_ldif_file(path)?,
        ldap @ PolicySource::Ldap { .. } => repo::load_ldap(&ldap_source(ldap)?).await?,
    };
    print!("{}", repo::describe(&policy));
    Ok(())
}

async fn run(config: Config) -> anyhow::Result<()> {
    // Bound first: a taken port is a start-up error, before the PDP listens.
    let metrics_listener = config
        .metrics
        .map(|addr| {
            qosloop_runtime::metrics::MetricsServer::bind(addr)
                .with_context(|| format!("listening for metrics on {addr}"))
        })
        .transpose()?;
    let watch: PolicyWatch = match &config.policies {
        PolicySource::File(path) => repo::watch_ldif_file(path, repo::DEFAULT_POLL)?,
        ldap @ PolicySource::Ldap { .. } => {
            repo::watch_ldap(ldap_source(ldap)?, Duration::from_secs(10)).await?
        }
    };
    let mut watch = watch;
    let mut config = config;
    // Only with api_tokens_directory: otherwise the repository's token
    // entries are not accepted.
    if config.web.auth.wants_directory_tokens() {
        config.web.auth = config
            .web
            .auth
            .clone()
            .with_directory_tokens(watch.tokens.clone());
    }
    let policy = watch.policy.clone();
    // Take the audit channel; `watch` itself must live on (dropping it stops watching).
    let mut audit = std::mem::replace(&mut watch.audit, tokio::sync::mpsc::channel(1).1);
    let server = Server::start(
        &config.db,
        config.pdp_listen,
        config.pdp.clone(),
        LoopConfig::from(&config),
        policy.clone(),
    )
    .await
    .with_context(|| {
        format!(
            "starting with database {}",
            qosloop_store::redact(&config.db)
        )
    })?;
    // The repository's static user mappings into the knowledge base, at
    // load and after every accepted change (docs/kb.md).
    let kb_static = tokio::spawn(qosloop_policy_server::kb_static::follow(
        server.store.db().clone(),
        watch.mappings.clone(),
    ));
    // The knowledge base's rate threshold events (none configured: ends).
    let rate_events = tokio::spawn(qosloop_policy_server::rate_thresholds::follow(
        server.store.db().clone(),
        server.rates.clone(),
        config.kb_rate_thresholds.clone(),
    ));
    let store = server.store.clone();
    let audit_task = async move {
        while let Some(e) = audit.recv().await {
            if let Err(err) = store
                .insert_audit(
                    e.at_ns,
                    &e.source,
                    &e.dn,
                    e.change.as_str(),
                    e.detail.as_deref(),
                )
                .await
            {
                tracing::warn!(error = %err, "storing a policy audit event failed");
            }
        }
    };
    let web = match config.http {
        Some(addr) => {
            let web = qosloop_policy_server::web::serve_with_policy_status(
                addr,
                &server,
                policy.clone(),
                Some(watch.status.clone()),
                config.web,
            )
            .await;
            match web {
                Ok(w) => Some(w),
                Err(e) => {
                    server.stop().await;
                    return Err(e).with_context(|| format!("listening for HTTP on {addr}"));
                }
            }
        }
        None => None,
    };
    if let Some(w) = &web {
        tracing::info!(http = %w.local_addr, "web API and live page");
    }
    let _metrics = match metrics_listener {
        Some(listener) => {
            let source = match &web {
                Some(w) => w.metrics.clone(),
                None => std::sync::Arc::new(server.metrics_source()),
            };
            let handle = listener
                .start(Default::default(), move || source.render())
                .context("starting the metrics responder")?;
            tracing::info!(metrics = %handle.local_addr, "Prometheus metrics");
            Some(handle)
        }
        None => None,
    };
    let also = async {
        audit_task.await;
        "the policy repository's watcher ended".to_owned()
    };
    // Every task runs until shutdown: one that ends before is a failure,
    // and the daemon exits non-zero after stopping the rest.
    let result = server.run_until(web, also, shutdown_signal()).await;
    drop(watch);
    kb_static.abort();
    rate_events.abort();
    result.map_err(anyhow::Error::msg)
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
}
