//! The agent's fallback when eBPF is unavailable: an nftables table of its
//! own (`inet qosloop_agent`) marks each connection with the uid of the
//! local socket that first sends on it (`ct mark set meta skuid map
//! @uids`: nft 1.0.6 refuses `ct mark set meta skuid` as a type mismatch,
//! so a map uid → `0x80000000 | uid` is kept filled with the uids of the
//! user database's local file and of every socket `sock_diag` sees), and
//! conntrack's own counters (`nf_conntrack_acct`, turned on if off and
//! restored at exit) are read through ctnetlink: a dump every interval and
//! the DESTROY events between dumps, each entry's growth since it was last
//! seen becoming one record per direction. A connection marked late keeps
//! its earlier bytes: conntrack counts per connection, not per mark.
//! The process is named where sock_diag can tell: the entry's uid owns a
//! live socket on its source (or, accepted, destination) port; otherwise
//! `unknown process`, the user kept.

use super::conntrack::{self, Conn, Tuple};
use super::names::{comm_of, process_label, UserNames};
use super::{sockdiag, wall_ns, AgentError, AgentStats};
use crate::sink::RecordSink;
use qosloop_schema::FlowRecord;
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::process::{Command, Stdio};

/// The table the fallback creates and removes.
pub const TABLE: &str = "qosloop_agent";
const ACCT: &str = "/proc/sys/net/netfilter/nf_conntrack_acct";
const MARK_FLAG: u32 = 0x8000_0000;
/// Conntrack entries followed at most (beyond it, the oldest are forgotten
/// and only their later growth is seen again as new).
const MAX_SEEN: usize = 1 << 20;

fn fallback(why: impl Into<String>) -> AgentError {
    AgentError::Fallback(why.into())
}

fn nft(script: &str) -> Result<(), AgentError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fallback(format!("running nft: {e}")))?;
    if let Some(mut i) = child.stdin.take() {
        i.write_all(script.as_bytes())
            .map_err(|e| fallback(format!("writing to nft: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| fallback(format!("nft: {e}")))?;
    if !out.status.success() {
        return Err(fallback(format!(
            "nft -f: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// uids of the local user database file (`/etc/passwd`).
fn passwd_uids() -> HashSet<u32> {
    std::fs::read_to_string("/etc/passwd")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(':').nth(2)?.parse().ok())
        .collect()
}

/// Packets conntrack dropped (`/proc/net/stat/nf_conntrack`, column
/// `drop`, summed over CPUs): a full table drops new connections' packets.
fn conntrack_drops() -> u64 {
    let text = std::fs::read_to_string("/proc/net/stat/nf_conntrack").unwrap_or_default();
    let mut lines = text.lines();
    let Some(col) = lines
        .next()
        .and_then(|h| h.split_whitespace().position(|c| c == "drop"))
    else {
        return 0;
    };
    lines
        .filter_map(|l| u64::from_str_radix(l.split_whitespace().nth(col)?, 16).ok())
        .sum()
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    orig: (u64, u64),
    reply: (u64, u64),
    /// The drain whose dump last listed the entry.
    drain: u64,
}

/// The running fallback.
#[derive(Debug)]
pub struct NftAgent {
    acct_restore: Option<String>,
    uids: HashSet<u32>,
    seen: HashMap<(u32, Tuple), Seen>,
    /// Entries whose DESTROY was taken, kept a drain long so a dump racing
    /// the event cannot count them again.
    ended: HashSet<(u32, Tuple)>,
    events: conntrack::Events,
    users: UserNames,
    drops_at_start: u64,
    last_drain_wall_ns: u64,
    stats: AgentStats,
    removed: bool,
    /// The process of each followed entry, once sock_diag could tell.
    processes: HashMap<(u32, Tuple), String>,
}

impl NftAgent {
    /// Creates the table, turns conntrack accounting on, takes a first
    /// dump as the baseline (what was counted before the agent is not its).
    pub fn start() -> Result<NftAgent, AgentError> {
        let _ = nft(&format!("delete table inet {TABLE}\n"));
        nft(&format!(
            "table inet {TABLE} {{\n  map uids {{ typeof meta skuid : ct mark; }}\n  chain out {{\n    type filter hook output priority 0; policy accept;\n    ct mark 0 ct mark set meta skuid map @uids\n  }}\n}}\n"
        ))?;
        let mut agent = NftAgent {
            acct_restore: None,
            uids: HashSet::new(),
            seen: HashMap::new(),
            ended: HashSet::new(),
            events: conntrack::Events::subscribe().map_err(fallback)?,
            users: UserNames::default(),
            drops_at_start: conntrack_drops(),
            last_drain_wall_ns: wall_ns(),
            stats: AgentStats::default(),
            removed: false,
            processes: HashMap::new(),
        };
        let acct = std::fs::read_to_string(ACCT).unwrap_or_default();
        if acct.trim() == "0" {
            std::fs::write(ACCT, "1").map_err(|e| fallback(format!("{ACCT}: {e}")))?;
            agent.acct_restore = Some("0".into());
            tracing::warn!("agent: turned nf_conntrack_acct on (it was off; restored at exit)");
        }
        agent.learn_uids(passwd_uids())?;
        for c in conntrack::dump().map_err(fallback)? {
            agent.seen.insert(
                (c.id, c.orig),
                Seen {
                    orig: c.orig_counts,
                    reply: c.reply_counts,
                    drain: 0,
                },
            );
        }
        tracing::info!(
            table = TABLE,
            "agent: nftables meta skuid → ct mark and conntrack accounting (ctnetlink) started"
        );
        Ok(agent)
    }

    pub fn stats(&self) -> AgentStats {
        self.stats
    }

    fn learn_uids(&mut self, uids: HashSet<u32>) -> Result<(), AgentError> {
        let new: Vec<u32> = uids
            .into_iter()
            .filter(|u| *u < MARK_FLAG && !self.uids.contains(u))
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        let elements: Vec<String> = new
            .iter()
            .map(|u| format!("{u} : {:#x}", MARK_FLAG | u))
            .collect();
        nft(&format!(
            "add element inet {TABLE} uids {{ {} }}\n",
            elements.join(", ")
        ))?;
        self.uids.extend(new);
        Ok(())
    }

    fn emit(
        &mut self,
        c: &Conn,
        since: Seen,
        now_wall: u64,
        sink: &mut dyn RecordSink,
    ) -> Result<(), AgentError> {
        let user = (c.mark & MARK_FLAG != 0).then(|| self.users.name(c.mark & !MARK_FLAG));
        let reply = c.reply.unwrap_or(Tuple {
            src: c.orig.dst,
            dst: c.orig.src,
            src_port: c.orig.dst_port,
            dst_port: c.orig.src_port,
            proto: c.orig.proto,
        });
        for (t, now, was) in [
            (c.orig, c.orig_counts, since.orig),
            (reply, c.reply_counts, since.reply),
        ] {
            // A counter below what was seen is a new entry with a reused id.
            let (p, b) = if now.0 < was.0 || now.1 < was.1 {
                now
            } else {
                (now.0 - was.0, now.1 - was.1)
            };
            if p == 0 {
                continue;
            }
            let record = FlowRecord {
                src_addr: t.src,
                dst_addr: t.dst,
                src_port: t.src_port,
                dst_port: t.dst_port,
                proto: t.proto,
                packets: p,
                bytes: b,
                start_ns: self.last_drain_wall_ns.min(now_wall),
                end_ns: now_wall,
                user: user.clone(),
                process: Some(
                    self.processes
                        .get(&(c.id, c.orig))
                        .cloned()
                        .unwrap_or_else(|| process_label(None, None)),
                ),
                ..FlowRecord::default()
            };
            self.stats.records += 1;
            self.stats.packets += p;
            self.stats.bytes += b;
            self.stats.unknown_process += u64::from(!self.processes.contains_key(&(c.id, c.orig)));
            sink.push(&record)?;
        }
        Ok(())
    }

    /// Ended connections (events), then a dump: each entry's growth.
    pub fn drain(&mut self, sink: &mut dyn RecordSink) -> Result<usize, AgentError> {
        let diag = match sockdiag::dump() {
            Ok(d) => {
                self.learn_uids(d.values().map(|s| s.uid).collect())?;
                d
            }
            Err(e) => {
                tracing::warn!(error = %e, "agent: sock_diag failed; uids not refreshed");
                HashMap::new()
            }
        };
        let now_wall = wall_ns();
        let zero = Seen {
            orig: (0, 0),
            reply: (0, 0),
            drain: 0,
        };
        let drain = self.stats.drains + 1;
        let mut n = 0;
        let ended_before = std::mem::take(&mut self.ended);
        for c in self.events.take() {
            let key = (c.id, c.orig);
            if ended_before.contains(&key) {
                continue;
            }
            let since = self.seen.remove(&key).unwrap_or(zero);
            self.emit(&c, since, now_wall, sink)?;
            self.processes.remove(&key);
            self.ended.insert(key);
            n += 1;
        }
        let conns = conntrack::dump().map_err(fallback)?;
        self.resolve(&conns, &diag);
        for c in conns {
            let key = (c.id, c.orig);
            if self.ended.contains(&key) || ended_before.contains(&key) {
                continue;
            }
            let since = self.seen.get(&key).copied().unwrap_or(zero);
            self.emit(&c, since, now_wall, sink)?;
            if self.seen.len() < MAX_SEEN || self.seen.contains_key(&key) {
                self.seen.insert(
                    key,
                    Seen {
                        orig: c.orig_counts,
                        reply: c.reply_counts,
                        drain,
                    },
                );
            }
            n += 1;
        }
        // Entries gone from two dumps whose DESTROY never came (events
        // overrun): forgotten; what they counted after the last dump is lost
        // (`events_lost` says it happened).
        let before = self.seen.len();
        self.seen.retain(|_, s| s.drain + 2 >= drain);
        if self.seen.len() < before {
            let seen = &self.seen;
            self.processes.retain(|k, _| seen.contains_key(k));
        }
        self.last_drain_wall_ns = now_wall;
        self.stats.drains = drain;
        let dropped = conntrack_drops().saturating_sub(self.drops_at_start);
        if dropped > self.stats.conntrack_dropped {
            tracing::warn!(
                packets = dropped - self.stats.conntrack_dropped,
                "agent: conntrack table full: the kernel dropped packets of new connections since the last drain (not accounted; counted in the summary)"
            );
        }
        self.stats.conntrack_dropped = dropped;
        self.stats.events_lost = self.events.overruns;
        sink.flush()?;
        Ok(n)
    }

    /// Names the processes of marked entries not named yet: the local
    /// socket of the entry's uid bound to its source port (it sent first)
    /// or, for an accepted connection, to its destination port; its inode
    /// through `/proc` gives the pid. Entries whose socket is gone stay
    /// `unknown process`.
    fn resolve(&mut self, conns: &[Conn], diag: &HashMap<u64, sockdiag::DiagSocket>) {
        let by_port: HashMap<(u8, u16, u32), u32> = diag
            .values()
            .filter(|d| d.inode != 0)
            .map(|d| ((d.protocol, d.local_port, d.uid), d.inode))
            .collect();
        let mut wanted: Vec<((u32, Tuple), u32)> = Vec::new();
        for c in conns {
            let key = (c.id, c.orig);
            if c.mark & MARK_FLAG == 0 || self.processes.contains_key(&key) {
                continue;
            }
            let uid = c.mark & !MARK_FLAG;
            let p = c.orig.proto;
            if let Some(i) = by_port
                .get(&(p, c.orig.src_port, uid))
                .or_else(|| by_port.get(&(p, c.orig.dst_port, uid)))
            {
                wanted.push((key, *i));
            }
        }
        if wanted.is_empty() {
            return;
        }
        let inodes: HashSet<u32> = wanted.iter().map(|(_, i)| *i).collect();
        let pids = sockdiag::pids_of_inodes(&inodes);
        for (key, inode) in wanted {
            if let Some(pid) = pids.get(&inode) {
                if self.processes.len() < MAX_SEEN {
                    self.processes
                        .insert(key, process_label(comm_of(*pid).as_deref(), Some(*pid)));
                }
            }
        }
    }

    fn remove(&mut self) {
        if self.removed {
            return;
        }
        self.removed = true;
        if let Err(e) = nft(&format!("delete table inet {TABLE}\n")) {
            tracing::warn!(error = %e, "agent: removing the nftables table");
        }
        if let Some(v) = self.acct_restore.take() {
            if let Err(e) = std::fs::write(ACCT, v) {
                tracing::warn!(error = %e, "agent: restoring nf_conntrack_acct");
            }
        }
    }

    /// A last drain, then the table goes and the sysctl is restored.
    pub fn stop(mut self, sink: &mut dyn RecordSink) -> Result<AgentStats, AgentError> {
        let r = self.drain(sink);
        self.remove();
        r.map(|_| self.stats)
    }
}

impl Drop for NftAgent {
    fn drop(&mut self) {
        self.remove();
    }
}
