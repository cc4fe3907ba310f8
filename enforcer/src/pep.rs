//! The PEP side of the decision protocol, and the daemon's main loop.
//!
//! Without a PDP the daemon holds what it applied (reconciled at start,
//! optionally from a decisions file) until SIGTERM/SIGINT, and leaves it in
//! the kernel when it stops (fail-static): `--cleanup` removes it.

use crate::backend::KernelBackend;
use crate::config::Config;
use crate::enforcer::Enforcer;

/// Runs the daemon until a termination signal.
pub fn run<B: KernelBackend>(
    enforcer: Enforcer<B>,
    pdps: Vec<String>,
    _config: &Config,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        if !pdps.is_empty() {
            anyhow::bail!("the PDP connection is not built yet; run with --decisions FILE");
        }
        tracing::info!(
            interface = %enforcer.layout().interface,
            decisions = enforcer.applied_ids().len(),
            "holding decisions (no PDP configured); stop with SIGTERM, remove with --cleanup"
        );
        wait_for_stop().await
    })
}

async fn wait_for_stop() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        r = tokio::signal::ctrl_c() => r?,
    }
    tracing::info!("stopping; decisions stay in the kernel (fail-static)");
    Ok(())
}
