//! Prerequisites of tests: root, binaries from Debian packages.

use std::path::{Path, PathBuf};

/// True under `CI=true` (or `CI=1`): missing prerequisites fail tests there.
pub fn is_ci() -> bool {
    matches!(std::env::var("CI").as_deref(), Ok("true") | Ok("1"))
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `Err` naming what is missing unless running as root.
pub fn require_root(why: &str) -> Result<(), String> {
    if is_root() {
        Ok(())
    } else {
        Err(format!("needs root ({why})"))
    }
}

/// Finds `name` on `PATH` or in the extra directories given.
pub fn find_binary(name: &str, extra_dirs: &[&Path]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(extra_dirs.iter().map(|d| d.to_path_buf()))
        .chain(["/usr/sbin", "/sbin"].iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// `Ok(path)` of `name`, or an error naming the Debian package to install.
pub fn require_binary(name: &str, package: &str) -> Result<PathBuf, String> {
    find_binary(name, &[]).ok_or_else(|| {
        format!(
            "{name} not found: install the Debian package {package} (apt-get install {package})"
        )
    })
}

/// Turns a missing prerequisite into a failure under CI and a skip
/// elsewhere: `None` means the caller should return.
#[track_caller]
pub fn prerequisite<T>(check: Result<T, String>) -> Option<T> {
    match check {
        Ok(v) => Some(v),
        Err(why) => {
            skip(&why);
            None
        }
    }
}

/// The environment variable naming the file where skipped tests are
/// counted: `scripts/test.sh` sets it and prints the count at the end.
pub const SKIP_LOG_ENV: &str = "QOSLOOP_SKIP_LOG";

/// Records that the running test skips because `why` is missing: panics
/// under CI (a missing prerequisite must not pass silently), else prints
/// the reason and appends a line to the file named by [`SKIP_LOG_ENV`].
#[track_caller]
pub fn skip(why: &str) {
    if is_ci() {
        panic!("prerequisite missing under CI=true: {why}");
    }
    eprintln!("skipped: {why}");
    if let Some(path) = std::env::var_os(SKIP_LOG_ENV) {
        use std::io::Write as _;
        let test = std::thread::current().name().unwrap_or("?").to_owned();
        let line = format!("{test}\t{}\t{why}\n", std::panic::Location::caller());
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path);
        if let Err(e) = file.and_then(|mut f| f.write_all(line.as_bytes())) {
            eprintln!("skip log {}: {e}", std::path::Path::new(&path).display());
        }
    }
}

/// Unwraps a prerequisite or returns from the test (see [`prerequisite`]).
#[macro_export]
macro_rules! need {
    ($check:expr) => {
        match $crate::harness::prerequisite($check) {
            Some(v) => v,
            None => return,
        }
    };
}
