//! Real services for tests, started on free loopback ports in temporary
//! directories and torn down when their handle drops — also when a test
//! panics: PostgreSQL, slapd, network namespaces joined by veth pairs and
//! local test users (what a killed run left is swept at start); and the checks of the deployment files ([`deploy`]).
//!
//! A test that needs root or a Debian package asks through [`need!`]: when
//! the prerequisite is missing it fails under `CI=true` and elsewhere skips
//! with a line that says why.

pub mod deploy;
mod netns;
mod pki;
mod postgres;
mod prereq;
mod slapd;
mod users;

pub use netns::{clean_leftovers, Netns, VethPair, NETNS_PREFIX};
pub use pki::test_pki;
pub use postgres::Postgres;
pub use prereq::{
    find_binary, is_ci, is_root, prerequisite, require_binary, require_root, skip, SKIP_LOG_ENV,
};
pub use slapd::Slapd;
pub use users::{clean_leftover_users, sweep_leftovers_once, TestUser, USER_COMMENT, USER_PREFIX};

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::time::{Duration, Instant};

/// What can go wrong starting a service.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("{0}")]
    Missing(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} failed: {detail}")]
    Failed { what: String, detail: String },
}

impl HarnessError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HarnessError {
        let what = what.into();
        move |source| HarnessError::Io { what, source }
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16, HarnessError> {
    let l = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .map_err(HarnessError::io("binding a free port"))?;
    let port = l
        .local_addr()
        .map_err(HarnessError::io("reading a bound port"))?
        .port();
    Ok(port)
}

/// Polls `ready` every 20 ms until it is true or `limit` has passed.
pub(crate) fn wait_until(limit: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if ready() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    ready()
}

/// Runs a command to completion; a non-zero exit is an error carrying its
/// standard error.
pub(crate) fn run(cmd: &mut std::process::Command, what: &str) -> Result<String, HarnessError> {
    let out = cmd.output().map_err(HarnessError::io(what.to_owned()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(HarnessError::Failed {
            what: what.to_owned(),
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        })
    }
}

/// Runs a command that must succeed; its output is not needed.
pub fn run_checked(cmd: &mut std::process::Command, what: &str) -> Result<(), HarnessError> {
    run(cmd, what).map(|_| ())
}

/// A child process killed and reaped when dropped (also when a test fails
/// half-way).
#[derive(Debug)]
pub struct Kid(pub std::process::Child);

impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `cmd` with stdin closed and stdout and stderr to the file `log`
/// (`RUST_LOG=info`).
pub fn spawn_logged(cmd: &mut std::process::Command, log: &Path) -> std::io::Result<Kid> {
    let file = std::fs::File::create(log)?;
    Ok(Kid(cmd
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()?))
}

/// The last lines of a log file, for error messages.
pub fn tail_of(path: &Path, lines: usize) -> String {
    tail(path, lines)
}

pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
