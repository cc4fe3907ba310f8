//! Who a socket belongs to, in words: uid → user through the system's user
//! database (NSS, `getpwuid_r`), pid and command → process.

use std::collections::HashMap;

/// Names are kept for the agent's lifetime (a user deleted while their
/// sockets live keeps the name seen first), up to this many uids.
const MAX_USERS: usize = 65_536;

/// uid → user name, resolved once.
#[derive(Debug, Default)]
pub struct UserNames {
    names: HashMap<u32, String>,
}

impl UserNames {
    /// The user's name, or `uid N` when the user database has none.
    pub fn name(&mut self, uid: u32) -> String {
        if let Some(n) = self.names.get(&uid) {
            return n.clone();
        }
        let name = match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
            Ok(Some(u)) => u.name,
            _ => format!("uid {uid}"),
        };
        if self.names.len() < MAX_USERS {
            self.names.insert(uid, name.clone());
        }
        name
    }
}

/// The `process` of a record: `COMMAND[PID]`, so two processes with the
/// same command stay apart; `unknown process` when nothing is known.
pub fn process_label(comm: Option<&str>, pid: Option<u32>) -> String {
    match (comm.filter(|c| !c.is_empty()), pid) {
        (Some(c), Some(p)) => format!("{c}[{p}]"),
        (Some(c), None) => c.to_owned(),
        (None, Some(p)) => format!("unknown process[{p}]"),
        (None, None) => "unknown process".to_owned(),
    }
}

/// A live process's command (`/proc/PID/comm`).
pub fn comm_of(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim_end().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_has_a_name_and_an_unknown_uid_a_number() {
        let mut n = UserNames::default();
        assert_eq!(n.name(0), "root");
        assert_eq!(n.name(3_999_999_999), "uid 3999999999");
    }

    #[test]
    fn process_labels() {
        assert_eq!(process_label(Some("curl"), Some(42)), "curl[42]");
        assert_eq!(process_label(None, None), "unknown process");
        assert_eq!(process_label(Some(""), Some(7)), "unknown process[7]");
    }
}
