//! Local users for tests (per-user accounting and enforcement), created
//! with `useradd` and removed on drop — their processes killed first —
//! also when a test panics; and the sweep of what a killed run left.
//!
//! Names are `qlt<pid>-<n>-<tag>` (`n` counts this process's users) with the comment [`USER_COMMENT`], so that a
//! later run finds the users of a run whose process is gone.

use super::{run, HarnessError};
use std::process::Command;

/// The GECOS comment of every test user: the sweep deletes only these.
pub const USER_COMMENT: &str = "qosloop test user";
/// Prefix of every test user's name (then the creating process's id).
pub const USER_PREFIX: &str = "qlt";

/// A local user without a home directory or login shell.
#[derive(Debug)]
pub struct TestUser {
    pub name: String,
    pub uid: u32,
}

impl TestUser {
    /// Creates `qlt<pid>-<n>-<tag>` (at most 32 bytes: `tag` is cut to fit),
    /// after sweeping what killed runs left ([`sweep_leftovers_once`]).
    pub fn create(tag: &str) -> Result<TestUser, HarnessError> {
        sweep_leftovers_once();
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut name = format!("{USER_PREFIX}{}-{n}-{tag}", std::process::id());
        name.truncate(32);
        // A user of this very process (a test run twice) goes first.
        let _ = Command::new("userdel").args(["-f", &name]).output();
        run(
            Command::new("useradd").args([
                "-M",
                "-N",
                "-s",
                "/usr/sbin/nologin",
                "-c",
                USER_COMMENT,
                &name,
            ]),
            &format!("useradd {name}"),
        )?;
        let uid = nix::unistd::User::from_name(&name)
            .ok()
            .flatten()
            .map(|u| u.uid.as_raw())
            .ok_or_else(|| HarnessError::Failed {
                what: format!("user {name}"),
                detail: "not found right after useradd".into(),
            })?;
        Ok(TestUser { name, uid })
    }

    /// Deletes the user now (its processes keep running: a user deleted
    /// while its sockets live).
    pub fn delete(&self) {
        let _ = Command::new("userdel").args(["-f", &self.name]).output();
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        kill_processes_of(self.uid);
        self.delete();
    }
}

/// Kills every process running as `uid` (a test user's generators).
fn kill_processes_of(uid: u32) {
    let _ = Command::new("pkill")
        .args(["-KILL", "-U", &uid.to_string()])
        .status();
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Deletes every test user (name `qlt<pid>-…`, comment [`USER_COMMENT`])
/// whose creating process is gone, killing its processes first; returns
/// the names deleted. Needs root to delete; reading needs nothing.
pub fn clean_leftover_users() -> Result<Vec<String>, HarnessError> {
    let passwd =
        std::fs::read_to_string("/etc/passwd").map_err(HarnessError::io("read /etc/passwd"))?;
    let mut deleted = Vec::new();
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        let [name, _, uid, _, comment, ..] = f[..] else {
            continue;
        };
        if comment != USER_COMMENT {
            continue;
        }
        let pid = name
            .strip_prefix(USER_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok());
        let Some(pid) = pid else { continue };
        if pid_alive(pid) {
            continue;
        }
        if let Ok(uid) = uid.parse::<u32>() {
            kill_processes_of(uid);
        }
        run(
            Command::new("userdel").args(["-f", name]),
            &format!("userdel {name}"),
        )?;
        deleted.push(name.to_owned());
    }
    Ok(deleted)
}

/// Once per process, as root: deletes the namespaces and test users of
/// runs whose process is gone (a SIGKILLed test leaves them: no drop ran).
/// Called by [`super::Netns::create`] and [`TestUser::create`]; what it
/// deletes is logged to stderr. Failures are logged, not fatal.
pub fn sweep_leftovers_once() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if !super::is_root() {
            return;
        }
        match super::clean_leftovers() {
            Ok(gone) if !gone.is_empty() => {
                eprintln!("harness: deleted namespaces of dead runs: {gone:?}")
            }
            Ok(_) => {}
            Err(e) => eprintln!("harness: sweeping namespaces of dead runs: {e}"),
        }
        match clean_leftover_users() {
            Ok(gone) if !gone.is_empty() => {
                eprintln!("harness: deleted test users of dead runs: {gone:?}")
            }
            Ok(_) => {}
            Err(e) => eprintln!("harness: sweeping test users of dead runs: {e}"),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_of_a_dead_run_is_swept_a_live_one_kept() {
        if !super::super::is_root() {
            eprintln!("skipped: creates users (needs root)");
            return;
        }
        let live = TestUser::create("sweep").unwrap();
        // A user as a SIGKILLed run leaves it: its pid is gone (pid_max
        // is at most 2^22, so this one never runs).
        let dead = format!("{USER_PREFIX}4999999-sweep");
        let _ = Command::new("userdel").args(["-f", &dead]).output();
        let out = Command::new("useradd")
            .args([
                "-M",
                "-N",
                "-s",
                "/usr/sbin/nologin",
                "-c",
                USER_COMMENT,
                &dead,
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        // A user that merely looks like one (no comment) is never touched.
        let other = format!("{USER_PREFIX}4999998-other");
        let _ = Command::new("userdel").args(["-f", &other]).output();
        assert!(Command::new("useradd")
            .args(["-M", "-N", "-s", "/usr/sbin/nologin", &other])
            .status()
            .unwrap()
            .success());
        let gone = clean_leftover_users().unwrap();
        let _ = Command::new("userdel").args(["-f", &other]).output();
        assert!(gone.contains(&dead), "{gone:?}");
        assert!(!gone.contains(&live.name), "{gone:?}");
        assert!(!gone.contains(&other), "{gone:?}");
        assert!(nix::unistd::User::from_name(&dead).unwrap().is_none());
        assert!(nix::unistd::User::from_name(&live.name).unwrap().is_some());
        let name = live.name.clone();
        drop(live);
        assert!(nix::unistd::User::from_name(&name).unwrap().is_none());
    }
}
