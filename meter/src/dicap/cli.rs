//! The meter's DiCAP flags and what they start: the coordinator (a mode of
//! `qosloop-meter` without capture) or a node's control thread beside live
//! capture; plus the capture counters any live meter can write.

use super::coordinator::{run_coordinator_with, CoordinatorLimits};
use super::node::{reject_all, run_node, NodeConfig, NodeCounters};
use super::share::ShareMode;
use crate::live::{BpfInsn, LiveCapture};
use std::net::{IpAddr, SocketAddr, TcpListener, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

/// DiCAP and capture-accounting flags of `qosloop-meter`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DicapFlags {
    /// Run as the DiCAP coordinator listening on HOST:PORT (no capture).
    #[arg(long, value_name = "HOST:PORT")]
    pub dicap_coordinator: Option<String>,
    /// Share mode the coordinator hands out: flow (default) or packet.
    #[arg(long, value_name = "MODE")]
    pub dicap_mode: Option<String>,
    /// Coordinator: write its events (joins, losses, uncovered windows) as
    /// JSON Lines to this file.
    #[arg(long, value_name = "FILE")]
    pub dicap_report: Option<PathBuf>,
    /// Coordinator: nodes at most (default 64); a further node is refused.
    #[arg(long, value_name = "N")]
    pub dicap_max_nodes: Option<usize>,
    /// Coordinator: serve only peers in ADDR/LEN (repeatable). Needed when
    /// it listens on an unspecified address (0.0.0.0, ::).
    #[arg(long, value_name = "ADDR/LEN")]
    pub dicap_allow: Vec<String>,
    /// Capture as a DiCAP node of the coordinator at HOST:PORT.
    #[arg(long, value_name = "HOST:PORT", requires = "dicap_node")]
    pub dicap_join: Option<String>,
    /// This node's name (unique among the coordinator's nodes).
    #[arg(long, value_name = "NAME", requires = "dicap_join")]
    pub dicap_node: Option<String>,
    /// A file holding the secret shared by the coordinator and its nodes
    /// (16-4096 bytes): the coordinator refuses a node that cannot prove
    /// it, a node proves it when asked.
    #[arg(long, value_name = "FILE")]
    pub dicap_secret: Option<std::path::PathBuf>,
    /// Busy-wait this long per captured packet: emulates a heavier
    /// analysis in experiments (0: off).
    #[arg(long, value_name = "NS")]
    pub analysis_cost_ns: Option<u64>,
    /// Write the capture counters (JSON: analysed, kernel and consumer
    /// drops, packets outside the share) to this file at the end.
    #[arg(long, value_name = "FILE")]
    pub capture_stats_out: Option<PathBuf>,
}

/// A flag that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{flag}: {reason}")]
pub struct FlagError {
    pub flag: &'static str,
    pub reason: String,
}

/// `ADDR/LEN` (IPv4 or IPv6; without `/LEN` the one address).
fn parse_prefix(text: &str) -> Result<(IpAddr, u8), String> {
    let (addr, len) = text.split_once('/').unwrap_or((text, ""));
    let ip: IpAddr = addr
        .parse()
        .map_err(|_| format!("{text:?}: {addr:?} is not an IP address"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = if len.is_empty() {
        max
    } else {
        len.parse::<u8>()
            .ok()
            .filter(|&l| l <= max)
            .ok_or_else(|| format!("{text:?}: prefix length must be 0..={max}"))?
    };
    Ok((ip, len))
}

fn resolve(flag: &'static str, value: &str) -> Result<SocketAddr, FlagError> {
    value
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| FlagError {
            flag,
            reason: format!("{value:?} is not HOST:PORT"),
        })
}

impl DicapFlags {
    pub fn mode(&self) -> Result<ShareMode, FlagError> {
        self.dicap_mode
            .as_deref()
            .unwrap_or("flow")
            .parse()
            .map_err(|reason| FlagError {
                flag: "--dicap-mode",
                reason,
            })
    }

    /// The coordinator's limits, checked against the address it binds.
    pub fn limits(&self, bind: SocketAddr) -> Result<CoordinatorLimits, FlagError> {
        let mut limits = CoordinatorLimits::default();
        if let Some(n) = self.dicap_max_nodes {
            if !(1..=4096).contains(&n) {
                return Err(FlagError {
                    flag: "--dicap-max-nodes",
                    reason: format!("{n}: must be 1..=4096"),
                });
            }
            limits.max_nodes = n;
            // Room for peers before their hello, bounded too.
            limits.max_connections = n + 16;
        }
        for a in &self.dicap_allow {
            limits
                .allow
                .push(parse_prefix(a).map_err(|reason| FlagError {
                    flag: "--dicap-allow",
                    reason,
                })?);
        }
        limits.secret = self.secret()?;
        if bind.ip().is_unspecified() && limits.allow.is_empty() {
            return Err(FlagError {
                flag: "--dicap-coordinator",
                reason: format!(
                    "{bind} listens on every address: name the nodes' networks with --dicap-allow ADDR/LEN"
                ),
            });
        }
        Ok(limits)
    }

    /// The node this meter is, if any (checked before capture opens).
    pub fn node(&self, caplen: usize, user_bpf: bool) -> Result<Option<NodeConfig>, FlagError> {
        let (Some(join), Some(name)) = (&self.dicap_join, &self.dicap_node) else {
            return Ok(None);
        };
        if user_bpf {
            return Err(FlagError {
                flag: "--dicap-join",
                reason: "a DiCAP node's socket filter is its share: drop --bpf".into(),
            });
        }
        Ok(Some(NodeConfig {
            coordinator: resolve("--dicap-join", join)?,
            name: name.clone(),
            caplen,
            secret: self.secret()?,
        }))
    }

    fn secret(&self) -> Result<Option<super::proto::Secret>, FlagError> {
        self.dicap_secret
            .as_deref()
            .map(super::proto::Secret::from_file)
            .transpose()
            .map_err(|reason| FlagError {
                flag: "--dicap-secret",
                reason,
            })
    }

    /// The initial socket filter of a node: nothing until its share.
    pub fn node_filter(node: &NodeConfig) -> Vec<BpfInsn> {
        reject_all(node.caplen)
    }

    /// Counters when anything asks for them.
    pub fn counters(&self, node: bool) -> Option<Arc<NodeCounters>> {
        let cost = Duration::from_nanos(self.analysis_cost_ns.unwrap_or(0));
        let wanted = node || self.capture_stats_out.is_some() || !cost.is_zero();
        wanted.then(|| {
            let c = NodeCounters::new(cost);
            if !node {
                c.set_share(ShareMode::Flow, u64::MAX);
            }
            Arc::new(c)
        })
    }

    /// Runs the coordinator until `stop`; prints its events' summary.
    pub fn run_coordinator(&self, listen: &str, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
        let mode = self.mode()?;
        let addr = resolve("--dicap-coordinator", listen)?;
        let limits = self.limits(addr)?;
        let listener = TcpListener::bind(addr)
            .map_err(|e| anyhow::anyhow!("--dicap-coordinator: binding {addr}: {e}"))?;
        tracing::info!(%addr, %mode, max_nodes = limits.max_nodes, allow = ?limits.allow, "dicap coordinator listening");
        let summary =
            run_coordinator_with(listener, mode, self.dicap_report.as_deref(), &limits, stop)?;
        eprintln!(
            "qosloop-meter: dicap coordinator: {} event(s), refused {:?}",
            summary.events.len(),
            summary.refusals
        );
        Ok(())
    }

    /// Starts the node's control thread on `capture`'s sockets.
    pub fn start_node(
        node: NodeConfig,
        capture: &LiveCapture,
        counters: Arc<NodeCounters>,
        stop: Arc<AtomicBool>,
    ) -> anyhow::Result<std::thread::JoinHandle<()>> {
        let filters = capture.filter_handles()?;
        Ok(std::thread::spawn(move || {
            if let Err(e) = run_node(&node, &filters, &counters, &stop) {
                tracing::error!(node = %node.name, error = %e, "dicap node: control loop ended; the last share stays installed");
            }
        }))
    }

    /// Writes the counters file, if asked for.
    pub fn write_stats(&self, counters: Option<&NodeCounters>) -> anyhow::Result<()> {
        if let (Some(path), Some(c)) = (&self.capture_stats_out, counters) {
            let json = serde_json::to_string_pretty(&c.stats())?;
            std::fs::write(path, json + "\n")
                .map_err(|e| anyhow::anyhow!("--capture-stats-out {}: {e}", path.display()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_coordinator_on_every_address_needs_allowed_networks() {
        let any: SocketAddr = "0.0.0.0:7788".parse().unwrap();
        let lo: SocketAddr = "127.0.0.1:7788".parse().unwrap();
        let mut f = DicapFlags::default();
        assert_eq!(f.limits(any).unwrap_err().flag, "--dicap-coordinator");
        assert_eq!(f.limits(lo).unwrap(), CoordinatorLimits::default());
        f.dicap_allow = vec!["10.78.0.0/16".into(), "fd00::1".into()];
        f.dicap_max_nodes = Some(4);
        let l = f.limits(any).unwrap();
        assert_eq!(
            l.allow,
            vec![
                ("10.78.0.0".parse().unwrap(), 16),
                ("fd00::1".parse().unwrap(), 128)
            ]
        );
        assert_eq!((l.max_nodes, l.max_connections), (4, 20));
        f.dicap_allow = vec!["10.0.0.0/33".into()];
        assert_eq!(f.limits(any).unwrap_err().flag, "--dicap-allow");
        f.dicap_allow.clear();
        f.dicap_max_nodes = Some(0);
        assert_eq!(f.limits(lo).unwrap_err().flag, "--dicap-max-nodes");
    }
}
