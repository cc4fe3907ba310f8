//! Topologies from a small declarative TOML file: hosts are network
//! namespaces, links are veth pairs with addresses and an emulated rate
//! (TBF on each shaped end), routes are static. Everything is validated
//! before anything is created, and everything created is removed when the
//! [`Testbed`] drops.
//!
//! ```toml
//! [[host]]
//! name = "router"
//! forward = true
//!
//! [[link]]
//! name = "tx-r"
//! a = { host = "tx", addr = "10.71.1.2/24" }
//! b = { host = "router", addr = "10.71.1.1/24" }
//! rate = "10mbit"
//! shaped_by_enforcer = "b"   # optional: that end's root qdisc is the enforcer's
//!
//! [[route]]
//! host = "tx"
//! to = "10.71.2.0/24"
//! via = "10.71.1.1"
//! ```

use crate::harness::{find_binary, is_root, HarnessError, Netns, NETNS_PREFIX};
use qosloop_schema::{IpPrefix, Kbps};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;
use std::process::Command;

/// Why a topology cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    #[error("{file}: {message}")]
    Invalid { file: String, message: String },
    #[error("{0}")]
    Precondition(String),
    #[error(transparent)]
    Harness(#[from] HarnessError),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TopologyFile {
    #[serde(default)]
    host: Vec<HostSpec>,
    #[serde(default)]
    link: Vec<LinkSpec>,
    #[serde(default)]
    route: Vec<RouteSpec>,
}

/// A host: one network namespace.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostSpec {
    pub name: String,
    /// IP forwarding on (a router).
    #[serde(default)]
    pub forward: bool,
}

/// One end of a link.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndSpec {
    pub host: String,
    /// `ADDR/LEN`.
    pub addr: String,
}

/// Which end of a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    A,
    B,
}

/// A link: a veth pair.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkSpec {
    pub name: String,
    pub a: EndSpec,
    pub b: EndSpec,
    /// Emulated rate (`10mbit`); absent: the veth's own speed.
    #[serde(default)]
    pub rate: Option<String>,
    /// The end whose root qdisc belongs to an enforcer (not shaped here).
    #[serde(default)]
    pub shaped_by_enforcer: Option<Side>,
}

/// A static route.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    pub host: String,
    pub to: String,
    pub via: String,
}

/// A validated topology.
#[derive(Debug, Clone)]
pub struct Topology {
    pub hosts: Vec<HostSpec>,
    pub links: Vec<Link>,
    pub routes: Vec<Route>,
}

/// A validated link.
#[derive(Debug, Clone)]
pub struct Link {
    pub name: String,
    pub a: End,
    pub b: End,
    pub rate: Option<Kbps>,
    pub shaped_by_enforcer: Option<Side>,
}

/// A validated link end.
#[derive(Debug, Clone)]
pub struct End {
    pub host: String,
    pub addr: IpAddr,
    pub prefix: IpPrefix,
}

impl End {
    /// `ADDR/LEN` as `ip addr add` wants it.
    pub fn cidr(&self) -> String {
        format!("{}/{}", self.addr, self.prefix.prefix_len())
    }
}

/// A validated route.
#[derive(Debug, Clone)]
pub struct Route {
    pub host: String,
    pub to: IpPrefix,
    pub via: IpAddr,
}

impl Topology {
    /// The reference topology of `seeds/004` Fig. 7.
    pub fn paper() -> Topology {
        // The embedded file is validated by a test.
        Topology::parse(PAPER_TOPOLOGY, "topologies/paper.toml").unwrap_or_else(|e| {
            panic!("embedded paper topology is invalid: {e}");
        })
    }

    pub fn load(path: &Path) -> Result<Topology, TopologyError> {
        let text = std::fs::read_to_string(path).map_err(|e| TopologyError::Parse {
            file: path.display().to_string(),
            message: e.to_string(),
        })?;
        Topology::parse(&text, &path.display().to_string())
    }

    /// Parses and validates; errors name the file and what is wrong.
    pub fn parse(text: &str, file: &str) -> Result<Topology, TopologyError> {
        let raw: TopologyFile = toml::from_str(text).map_err(|e| TopologyError::Parse {
            file: file.to_owned(),
            message: e.to_string().trim().to_owned(),
        })?;
        let invalid = |message: String| TopologyError::Invalid {
            file: file.to_owned(),
            message,
        };
        let mut names = BTreeSet::new();
        for h in &raw.host {
            if h.name.is_empty()
                || h.name.len() > 20
                || !h
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-')
            {
                return Err(invalid(format!(
                    "host name {:?}: use 1-20 letters, digits or '-'",
                    h.name
                )));
            }
            if !names.insert(h.name.clone()) {
                return Err(invalid(format!("host {:?} is declared twice", h.name)));
            }
        }
        let known = |host: &str, what: &str| -> Result<(), TopologyError> {
            if names.contains(host) {
                Ok(())
            } else {
                Err(invalid(format!("{what}: unknown host {host:?}")))
            }
        };
        let mut addrs: BTreeMap<IpAddr, String> = BTreeMap::new();
        let mut subnets: Vec<(IpPrefix, String)> = Vec::new();
        let mut links = Vec::new();
        let mut link_names = BTreeSet::new();
        for l in &raw.link {
            if !link_names.insert(l.name.clone()) {
                return Err(invalid(format!("link {:?} is declared twice", l.name)));
            }
            let end = |e: &EndSpec| -> Result<End, TopologyError> {
                known(&e.host, &format!("link {:?}", l.name))?;
                let (a, len) = e.addr.split_once('/').ok_or_else(|| {
                    invalid(format!(
                        "link {:?}: address {:?} needs a prefix length (ADDR/LEN)",
                        l.name, e.addr
                    ))
                })?;
                let addr: IpAddr = a.parse().map_err(|_| {
                    invalid(format!("link {:?}: {:?} is not an address", l.name, a))
                })?;
                let len: u8 = len.parse().map_err(|_| {
                    invalid(format!(
                        "link {:?}: bad prefix length in {:?}",
                        l.name, e.addr
                    ))
                })?;
                let prefix = IpPrefix::new(addr, len)
                    .map_err(|err| invalid(format!("link {:?}: {err}", l.name)))?;
                Ok(End {
                    host: e.host.clone(),
                    addr,
                    prefix,
                })
            };
            let (a, b) = (end(&l.a)?, end(&l.b)?);
            if a.host == b.host {
                return Err(invalid(format!(
                    "link {:?} joins host {:?} to itself",
                    l.name, a.host
                )));
            }
            if a.prefix != b.prefix {
                return Err(invalid(format!(
                    "link {:?}: ends are in different subnets ({} and {})",
                    l.name, a.prefix, b.prefix
                )));
            }
            for e in [&a, &b] {
                if let Some(other) = addrs.insert(e.addr, l.name.clone()) {
                    return Err(invalid(format!(
                        "address {} is used twice (links {:?} and {:?})",
                        e.addr, other, l.name
                    )));
                }
            }
            for (p, other) in &subnets {
                let (short, long) = if p.prefix_len() <= a.prefix.prefix_len() {
                    (p, &a.prefix)
                } else {
                    (&a.prefix, p)
                };
                if short.contains(long.addr()) {
                    return Err(invalid(format!(
                        "subnet {} of link {:?} overlaps {} of link {:?}",
                        a.prefix, l.name, p, other
                    )));
                }
            }
            subnets.push((a.prefix, l.name.clone()));
            let rate = l
                .rate
                .as_deref()
                .map(|r| r.parse::<Kbps>())
                .transpose()
                .map_err(|e| invalid(format!("link {:?}: {e}", l.name)))?;
            if rate == Some(Kbps(0)) {
                return Err(invalid(format!("link {:?}: rate must be above 0", l.name)));
            }
            links.push(Link {
                name: l.name.clone(),
                a,
                b,
                rate,
                shaped_by_enforcer: l.shaped_by_enforcer,
            });
        }
        let mut routes = Vec::new();
        for r in &raw.route {
            known(&r.host, "route")?;
            let to: IpPrefix =
                r.to.parse()
                    .map_err(|e| invalid(format!("route on {:?}: {e}", r.host)))?;
            let via: IpAddr = r.via.parse().map_err(|_| {
                invalid(format!(
                    "route on {:?}: via {:?} is not an address",
                    r.host, r.via
                ))
            })?;
            let reachable = links.iter().any(|l| {
                [(&l.a, &l.b), (&l.b, &l.a)]
                    .iter()
                    .any(|(mine, _)| mine.host == r.host && mine.prefix.contains(via))
            });
            if !reachable {
                return Err(invalid(format!(
                    "route on {:?}: gateway {via} is on none of the host's links",
                    r.host
                )));
            }
            routes.push(Route {
                host: r.host.clone(),
                to,
                via,
            });
        }
        Ok(Topology {
            hosts: raw.host,
            links,
            routes,
        })
    }

    /// Checks that the hosts and links an experiment relies on exist, with
    /// a link's ends on the hosts it expects.
    pub fn require(
        &self,
        file: &str,
        hosts: &[&str],
        links: &[(&str, &str, &str)],
    ) -> Result<(), TopologyError> {
        let invalid = |message: String| TopologyError::Invalid {
            file: file.to_owned(),
            message,
        };
        for h in hosts {
            if !self.hosts.iter().any(|x| x.name == *h) {
                return Err(invalid(format!("the experiment needs a host {h:?}")));
            }
        }
        for (name, a, b) in links {
            match self.link(name) {
                Some(l) if l.a.host == *a && l.b.host == *b => {}
                Some(l) => {
                    return Err(invalid(format!(
                        "link {name:?} must join {a:?} (a) to {b:?} (b), not {:?} to {:?}",
                        l.a.host, l.b.host
                    )))
                }
                None => {
                    return Err(invalid(format!(
                        "the experiment needs a link {name:?} from {a:?} to {b:?}"
                    )))
                }
            }
        }
        Ok(())
    }

    pub fn link(&self, name: &str) -> Option<&Link> {
        self.links.iter().find(|l| l.name == name)
    }

    /// Checks what building needs, before anything is created.
    pub fn preflight(&self) -> Result<(), TopologyError> {
        if !is_root() {
            return Err(TopologyError::Precondition(
                "the testbed creates network namespaces: run it as root".into(),
            ));
        }
        for (bin, pkg) in [("ip", "iproute2"), ("tc", "iproute2")] {
            if find_binary(bin, &[]).is_none() {
                return Err(TopologyError::Precondition(format!(
                    "{bin} not found: install the Debian package {pkg}"
                )));
            }
        }
        Ok(())
    }

    /// Creates the namespaces, links, addresses, shaping and routes.
    /// On error, whatever was created is removed again.
    pub fn build(&self) -> Result<Testbed, TopologyError> {
        self.preflight()?;
        let mut hosts = BTreeMap::new();
        for h in &self.hosts {
            let ns = Netns::create(&h.name)?;
            if h.forward {
                ns.sysctl("net.ipv4.ip_forward", "1")?;
                ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
            }
            hosts.insert(h.name.clone(), ns);
        }
        let mut tb = Testbed {
            hosts,
            links: Vec::new(),
        };
        for l in &self.links {
            let pair = crate::harness::VethPair::connect(
                tb.ns(&l.a.host)?,
                &l.a.cidr(),
                tb.ns(&l.b.host)?,
                &l.b.cidr(),
            )?;
            if let Some(rate) = l.rate {
                for (side, host, ifname) in [
                    (Side::A, &l.a.host, &pair.a_if),
                    (Side::B, &l.b.host, &pair.b_if),
                ] {
                    if l.shaped_by_enforcer == Some(side) {
                        continue;
                    }
                    shape(tb.ns(host)?, ifname, rate)?;
                }
            }
            tb.links.push(BuiltLink {
                name: l.name.clone(),
                a_if: pair.a_if,
                b_if: pair.b_if,
            });
        }
        for r in &self.routes {
            tb.ns(&r.host)?
                .ip(&["route", "add", &r.to.to_string(), "via", &r.via.to_string()])?;
        }
        Ok(tb)
    }
}

/// Emulates a link of `rate` on `ifname`'s egress with a token bucket.
fn shape(ns: &Netns, ifname: &str, rate: Kbps) -> Result<(), HarnessError> {
    // Bucket: 10 ms of traffic, at least a few MTUs; queue: 100 ms.
    let burst = (rate.bytes_per_sec() / 100).max(4 * 1514);
    let mut cmd = Command::new("tc");
    cmd.args([
        "-n",
        ns.name(),
        "qdisc",
        "replace",
        "dev",
        ifname,
        "root",
        "tbf",
    ])
    .arg("rate")
    .arg(format!("{}kbit", rate.0))
    .arg("burst")
    .arg(burst.to_string())
    .args(["latency", "100ms"]);
    crate::harness::run_checked(&mut cmd, &format!("shaping {ifname} to {rate}"))
}

/// A built topology; removed on drop.
#[derive(Debug)]
pub struct Testbed {
    hosts: BTreeMap<String, Netns>,
    links: Vec<BuiltLink>,
}

#[derive(Debug)]
struct BuiltLink {
    name: String,
    a_if: String,
    b_if: String,
}

impl Testbed {
    pub fn ns(&self, host: &str) -> Result<&Netns, TopologyError> {
        self.hosts
            .get(host)
            .ok_or_else(|| TopologyError::Precondition(format!("no host {host:?} in this testbed")))
    }

    /// The interface name of `link`'s end `side`.
    pub fn interface(&self, link: &str, side: Side) -> Result<&str, TopologyError> {
        let l = self.links.iter().find(|l| l.name == link).ok_or_else(|| {
            TopologyError::Precondition(format!("no link {link:?} in this testbed"))
        })?;
        Ok(match side {
            Side::A => &l.a_if,
            Side::B => &l.b_if,
        })
    }

    /// Namespace names by host, for operators.
    pub fn namespaces(&self) -> impl Iterator<Item = (&str, &str)> {
        self.hosts.iter().map(|(h, ns)| (h.as_str(), ns.name()))
    }
}

/// The embedded reference topology.
pub const PAPER_TOPOLOGY: &str = include_str!("../topologies/paper.toml");

/// Namespace names are `qlt-<pid>-<n>-<host>`: see [`NETNS_PREFIX`].
pub const NAMESPACE_PREFIX: &str = NETNS_PREFIX;

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Topology::parse(text, "t.toml").unwrap_err().to_string()
    }

    #[test]
    fn the_paper_topology_is_valid() {
        let t = Topology::paper();
        assert_eq!(t.hosts.len(), 4);
        assert_eq!(t.link("tx-r").unwrap().rate, Some(Kbps(10_000)));
        assert_eq!(t.link("r-rx").unwrap().shaped_by_enforcer, Some(Side::A));
    }

    #[test]
    fn experiments_name_what_their_topology_lacks() {
        let t = Topology::paper();
        t.require("p", &["tx", "router"], &[("tx-r", "tx", "router")])
            .unwrap();
        let e = t.require("p", &["gw"], &[]).unwrap_err().to_string();
        assert!(e.contains("needs a host \"gw\""), "{e}");
        let e = t
            .require("p", &[], &[("tx-r", "router", "tx")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("must join"), "{e}");
    }

    #[test]
    fn unknown_hosts_overlaps_and_typos_are_named() {
        let base = "[[host]]\nname = \"a\"\n[[host]]\nname = \"b\"\n";
        assert!(err(&format!("{base}[[link]]\nname=\"l\"\na={{host=\"a\",addr=\"10.0.0.1/24\"}}\nb={{host=\"c\",addr=\"10.0.0.2/24\"}}\n")).contains("unknown host \"c\""));
        let two = format!("{base}[[link]]\nname=\"l1\"\na={{host=\"a\",addr=\"10.0.0.1/24\"}}\nb={{host=\"b\",addr=\"10.0.0.2/24\"}}\n[[link]]\nname=\"l2\"\na={{host=\"a\",addr=\"10.0.0.5/16\"}}\nb={{host=\"b\",addr=\"10.0.0.6/16\"}}\n");
        assert!(err(&two).contains("overlaps"), "{}", err(&two));
        let dup = format!("{base}[[link]]\nname=\"l1\"\na={{host=\"a\",addr=\"10.0.0.1/24\"}}\nb={{host=\"b\",addr=\"10.0.0.1/24\"}}\n");
        assert!(err(&dup).contains("used twice"));
        assert!(err("[[host]]\nname = \"a\"\nfoward = true\n").contains("foward"));
        assert!(err(&format!(
            "{base}[[route]]\nhost=\"a\"\nto=\"10.9.0.0/16\"\nvia=\"10.0.0.2\"\n"
        ))
        .contains("gateway"));
        assert!(err(&format!("{base}[[host]]\nname = \"a\"\n")).contains("declared twice"));
        let rate = format!("{base}[[link]]\nname=\"l\"\na={{host=\"a\",addr=\"10.0.0.1/24\"}}\nb={{host=\"b\",addr=\"10.0.0.2/24\"}}\nrate=\"10 furlongs\"\n");
        assert!(err(&rate).contains("unknown unit"));
    }
}
