//! The mirrored link of the DiCAP experiment: a source namespace sends
//! over a veth into a link namespace whose ingress copies every frame
//! (`tc` ingress, u32 match-all, one `mirred egress mirror` per node) to
//! each capture node's namespace. Each node also has a control veth to the
//! link namespace, where the coordinator listens. The link namespace
//! forwards nothing, so the frames end there; the source reaches the
//! (absent) addresses through permanent neighbour entries, so no ARP or
//! IPv6 chatter joins the measured traffic. Everything goes with the
//! namespaces when this value drops.

use crate::harness::{run_checked, Netns, VethPair};
use std::net::{Ipv4Addr, SocketAddr};

/// Source-side addresses of the measured flows (not local anywhere: the
/// generator sends from them with IP_TRANSPARENT).
pub const FLOW_A: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 50);
pub const FLOW_B: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 99);
/// The coordinator's port in the link namespace.
pub const COORDINATOR_PORT: u16 = 7788;

/// One capture node's namespace.
#[derive(Debug)]
pub struct NodeNs {
    pub ns: Netns,
    /// Where the mirrored frames arrive.
    pub capture_if: String,
    /// The coordinator as this node reaches it.
    pub coordinator: SocketAddr,
}

/// The whole arrangement.
#[derive(Debug)]
pub struct MirroredLink {
    // Nodes first: their veths go before the link namespace.
    pub nodes: Vec<NodeNs>,
    pub source: Netns,
    pub source_if: String,
    pub link: Netns,
}

fn quiet(ns: &Netns) -> anyhow::Result<()> {
    for key in [
        "net.ipv6.conf.all.disable_ipv6",
        "net.ipv6.conf.default.disable_ipv6",
    ] {
        ns.sysctl(key, "1")?;
    }
    Ok(())
}

impl MirroredLink {
    /// Builds the link with `nodes` capture namespaces (a test's reference
    /// meter takes the last one).
    pub fn build(nodes: usize) -> anyhow::Result<MirroredLink> {
        let source = Netns::create("dsrc")?;
        let link = Netns::create("dlink")?;
        quiet(&source)?;
        quiet(&link)?;
        let up = VethPair::connect(&source, "10.77.0.1/24", &link, "10.77.0.2/24")?;
        let mac = link_mac(&link, &up.b_if)?;
        for addr in [FLOW_A, FLOW_B] {
            source.ip(&[
                "neigh",
                "add",
                &addr.to_string(),
                "lladdr",
                &mac,
                "dev",
                &up.a_if,
                "nud",
                "permanent",
            ])?;
        }
        let mut node_ns = Vec::new();
        let mut mirror = vec![
            "-n".to_string(),
            link.name().to_string(),
            "filter".into(),
            "add".into(),
            "dev".into(),
            up.b_if.clone(),
            "parent".into(),
            "ffff:".into(),
            "protocol".into(),
            "all".into(),
            "u32".into(),
            "match".into(),
            "u32".into(),
            "0".into(),
            "0".into(),
        ];
        for i in 0..nodes {
            let ns = Netns::create(&format!("dn{i}"))?;
            quiet(&ns)?;
            let cap = VethPair::connect(
                &ns,
                &format!("10.79.{i}.2/30"),
                &link,
                &format!("10.79.{i}.1/30"),
            )?;
            // The control path to the coordinator.
            VethPair::connect(
                &ns,
                &format!("10.78.{i}.2/24"),
                &link,
                &format!("10.78.{i}.1/24"),
            )?;
            mirror.extend(
                ["action", "mirred", "egress", "mirror", "dev", &cap.b_if]
                    .iter()
                    .map(|s| s.to_string()),
            );
            node_ns.push(NodeNs {
                ns,
                capture_if: cap.a_if,
                coordinator: SocketAddr::from((
                    Ipv4Addr::new(10, 78, i as u8, 1),
                    COORDINATOR_PORT,
                )),
            });
        }
        link_tc(&[
            "-n",
            link.name(),
            "qdisc",
            "add",
            "dev",
            &up.b_if,
            "ingress",
        ])?;
        let args: Vec<&str> = mirror.iter().map(String::as_str).collect();
        link_tc(&args)?;
        Ok(MirroredLink {
            nodes: node_ns,
            source,
            source_if: up.a_if,
            link,
        })
    }
}

fn link_tc(args: &[&str]) -> anyhow::Result<()> {
    let what = format!("tc {}", args.join(" "));
    Ok(run_checked(
        std::process::Command::new("tc").args(args),
        &what,
    )?)
}

fn link_mac(ns: &Netns, dev: &str) -> anyhow::Result<String> {
    let out = ns.ip(&["-j", "link", "show", "dev", dev])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    v.get(0)
        .and_then(|l| l.get("address"))
        .and_then(|a| a.as_str())
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("no MAC address for {dev} in {}", ns.name()))
}
