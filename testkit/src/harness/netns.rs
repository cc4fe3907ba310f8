//! Network namespaces and veth pairs for tests, always deleted on drop.
//!
//! Names start with [`NETNS_PREFIX`] and carry the process id, so that
//! `qosloop-testbed clean` can find what a killed run left behind.

use super::{run, HarnessError};
use std::fs::File;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Prefix of every namespace the testbed creates.
pub const NETNS_PREFIX: &str = "qlt-";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A network namespace, deleted (with every interface in it) on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `qlt-<pid>-<n>-<label>` with its loopback up.
    /// The first namespace of a process sweeps what killed runs left
    /// ([`super::sweep_leftovers_once`]).
    pub fn create(label: &str) -> Result<Netns, HarnessError> {
        super::sweep_leftovers_once();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{NETNS_PREFIX}{}-{n}-{label}", std::process::id());
        Self::create_named(&name)
    }

    /// Creates a namespace with exactly this name; fails if it is taken.
    pub fn create_named(name: &str) -> Result<Netns, HarnessError> {
        run(
            Command::new("ip").args(["netns", "add", name]),
            &format!("ip netns add {name}"),
        )?;
        let ns = Netns {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n NAME ARGS…`.
    pub fn ip(&self, args: &[&str]) -> Result<String, HarnessError> {
        let mut cmd = Command::new("ip");
        cmd.arg("-n").arg(&self.name).args(args);
        run(&mut cmd, &format!("ip -n {} {}", self.name, args.join(" ")))
    }

    /// Sets a sysctl inside this namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<(), HarnessError> {
        let mut cmd = self.command("sysctl");
        cmd.args(["-q", "-w", &format!("{key}={value}")]);
        run(&mut cmd, &format!("sysctl {key}={value} in {}", self.name)).map(|_| ())
    }

    /// A command that runs `program` inside this namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `f` on a thread that has entered this namespace; sockets it opens
    /// live there.
    pub fn run_in<R: Send>(&self, f: impl FnOnce() -> R + Send) -> Result<R, HarnessError> {
        let path = format!("/run/netns/{}", self.name);
        let file = File::open(&path).map_err(HarnessError::io(format!("opening {path}")))?;
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(
                        |e| HarnessError::Failed {
                            what: format!("entering namespace {path}"),
                            detail: e.to_string(),
                        },
                    )?;
                    Ok(f())
                })
                .join()
                .unwrap_or_else(|_| {
                    Err(HarnessError::Failed {
                        what: "a thread inside a namespace".into(),
                        detail: "panicked".into(),
                    })
                })
        })
    }
}

impl Netns {
    /// Spawns a thread that enters this namespace and runs `f` there.
    pub fn spawn_in<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<std::thread::JoinHandle<Result<R, HarnessError>>, HarnessError> {
        let path = format!("/run/netns/{}", self.name);
        let file = File::open(&path).map_err(HarnessError::io(format!("opening {path}")))?;
        std::thread::Builder::new()
            .name(format!("ns-{}", self.name))
            .spawn(move || {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                    HarnessError::Failed {
                        what: format!("entering namespace {path}"),
                        detail: e.to_string(),
                    }
                })?;
                Ok(f())
            })
            .map_err(HarnessError::io("spawning a thread"))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A veth pair joining two namespaces, each end with an address and up.
#[derive(Debug)]
pub struct VethPair {
    pub a_ns: String,
    pub a_if: String,
    pub b_ns: String,
    pub b_if: String,
}

impl VethPair {
    /// Joins `a` and `b`; `a_addr`/`b_addr` are `ADDR/LEN`. The interfaces go
    /// with their namespaces.
    pub fn connect(
        a: &Netns,
        a_addr: &str,
        b: &Netns,
        b_addr: &str,
    ) -> Result<VethPair, HarnessError> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let (a_if, b_if) = (format!("qv{n}a"), format!("qv{n}b"));
        run(
            Command::new("ip").args([
                "link",
                "add",
                &a_if,
                "netns",
                a.name(),
                "type",
                "veth",
                "peer",
                "name",
                &b_if,
                "netns",
                b.name(),
            ]),
            "ip link add … type veth",
        )?;
        a.ip(&["addr", "add", a_addr, "dev", &a_if])?;
        b.ip(&["addr", "add", b_addr, "dev", &b_if])?;
        a.ip(&["link", "set", &a_if, "up"])?;
        b.ip(&["link", "set", &b_if, "up"])?;
        Ok(VethPair {
            a_ns: a.name().to_owned(),
            a_if,
            b_ns: b.name().to_owned(),
            b_if,
        })
    }
}

/// Deletes every namespace whose name starts with [`NETNS_PREFIX`] and
/// whose creating process is gone; returns the names deleted.
pub fn clean_leftovers() -> Result<Vec<String>, HarnessError> {
    let list = run(Command::new("ip").args(["netns", "list"]), "ip netns list")?;
    let mut deleted = Vec::new();
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(rest) = name.strip_prefix(NETNS_PREFIX) else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        let alive = pid.is_some_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
        if !alive {
            run(
                Command::new("ip").args(["netns", "del", name]),
                "ip netns del",
            )?;
            deleted.push(name.to_owned());
        }
    }
    Ok(deleted)
}
