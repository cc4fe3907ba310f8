//! qosloop's components as real processes inside the testbed's namespaces:
//! found next to the `qosloop-testbed` binary, started with `ip netns exec`,
//! logged to files, and stopped (SIGTERM, then SIGKILL) when their handle
//! drops — also when the experiment fails half-way.

use crate::harness::Netns;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The component binaries the experiments run.
pub const COMPONENTS: [&str; 4] = [
    "qosloop-meter",
    "qosloop-collector",
    "qosloop-policy-server",
    "qosloop-enforcer",
];

/// Finds every component next to the running binary (cargo puts the
/// workspace's binaries side by side), or names the first one missing.
pub fn component_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dirs: Vec<PathBuf> = exe.parent().map(Path::to_path_buf).into_iter().collect();
    // Test binaries live one level down, in deps/.
    if let Some(up) = exe.parent().and_then(Path::parent) {
        dirs.push(up.to_path_buf());
    }
    for dir in &dirs {
        if COMPONENTS.iter().all(|c| dir.join(c).is_file()) {
            return Ok(dir.clone());
        }
    }
    let missing = COMPONENTS
        .iter()
        .find(|c| !dirs.iter().any(|d| d.join(c).is_file()))
        .copied()
        .unwrap_or("a component");
    anyhow::bail!(
        "{missing} not found next to {}: build every binary first (cargo build --release --workspace)",
        exe.display()
    )
}

/// What the experiments need, as one line naming the missing piece: root,
/// the kernel tools, rsvg-convert for the plots, the component binaries.
pub fn experiment_prerequisites() -> Result<(), String> {
    use crate::harness::{require_binary, require_root};
    require_root("creates network namespaces")?;
    require_binary("tc", "iproute2")?;
    require_binary("nft", "nftables")?;
    require_binary("rsvg-convert", "librsvg2-bin")?;
    component_dir().map(|_| ()).map_err(|e| e.to_string())
}

/// A running component.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    /// Starts `bin args…` inside `ns`, its output appended to `log`.
    pub fn spawn(ns: &Netns, bin: &Path, args: &[String], log: PathBuf) -> anyhow::Result<Proc> {
        let out = File::create(&log)?;
        let err = out.try_clone()?;
        let name = bin
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let child = Command::new("ip")
            .args(["netns", "exec", ns.name()])
            .arg(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting {name}: {e}"))?;
        Ok(Proc {
            name,
            log,
            child: Some(child),
        })
    }

    /// `Err` with the log's tail when the process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                anyhow::bail!(
                    "{} exited ({status}); last lines of {}:\n{}",
                    self.name,
                    self.log.display(),
                    crate::harness::tail_of(&self.log, 15)
                );
            }
        }
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let start = Instant::now();
            while start.elapsed() < grace {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(3));
    }
}

/// How long a component may take to start listening, or nodes to settle:
/// far more than they take, however busy the host (a deadline against a
/// hang, not a measure of speed).
pub const READY_WITHIN: Duration = Duration::from_secs(120);

/// Waits until a TCP connection to `addr` from inside `ns` succeeds.
pub fn wait_for_port(ns: &Netns, addr: SocketAddr, limit: Duration) -> anyhow::Result<()> {
    let ok = ns.run_in(move || {
        let start = Instant::now();
        while start.elapsed() < limit {
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    })?;
    anyhow::ensure!(
        ok,
        "nothing listens on {addr} in {} after {limit:?}",
        ns.name()
    );
    Ok(())
}
