//! The coordinator: nodes connect, it spreads the buckets over the nodes
//! able to capture and tells each its share. A node is lost when its
//! connection closes (kill -9 closes it at once) or when it stays silent
//! for [`LOST_AFTER`]; its buckets go to the others, and the window in
//! which they were uncovered — from the lost node's last heartbeat to the
//! last of the new filters installed, as the nodes report — is logged,
//! written to the report and kept in the summary. A node whose filter
//! install fails is excluded the same way, with the kernel's reason.

use super::assign::{mask_of, rebalance, unowned, Owners};
use super::proto::{read_frame, write_frame, FrameError, ToCoordinator, ToNode, LOST_AFTER};
use super::share::ShareMode;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Longest accepted node name.
const MAX_NAME: usize = 64;

/// What happened, in order: the coordinator's report (JSON Lines).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Joined {
        node: String,
        at_ns: u64,
    },
    Refused {
        peer: String,
        reason: String,
    },
    Assigned {
        epoch: u64,
        masks: BTreeMap<String, u64>,
        at_ns: u64,
    },
    Lost {
        node: String,
        reason: String,
        last_heartbeat_ns: u64,
        detected_ns: u64,
        buckets: u32,
    },
    InstallFailed {
        node: String,
        epoch: u64,
        error: String,
        buckets: u32,
    },
    /// No node is left to capture: everything is uncovered from `since_ns`.
    Uncovered {
        because: String,
        since_ns: u64,
    },
    /// Every node of `epoch` installed its filter: buckets freed by
    /// `because` were uncovered from `uncovered_from_ns` (the lost node's
    /// last heartbeat, or the assignment that failed) to `covered_ns`.
    Covered {
        epoch: u64,
        because: String,
        uncovered_from_ns: u64,
        covered_ns: u64,
        uncovered_ms: f64,
        reassigned_after_detection_ms: f64,
    },
}

/// The coordinator's account at the end.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CoordinatorSummary {
    pub events: Vec<Event>,
}

#[derive(Debug)]
struct Member {
    conn: u64,
    writer: TcpStream,
    last_heartbeat_ns: u64,
    last_seen: Instant,
}

/// Buckets left uncovered by an event, waiting for the new filters.
#[derive(Debug)]
struct Pending {
    epoch: u64,
    because: String,
    uncovered_from_ns: u64,
    detected_ns: u64,
    waiting: BTreeSet<String>,
    covered_ns: u64,
}

#[derive(Debug)]
struct State {
    mode: ShareMode,
    members: BTreeMap<String, Member>,
    failed: BTreeMap<String, String>,
    owners: Owners,
    epoch: u64,
    pending: Vec<Pending>,
    events: Vec<Event>,
    report: Option<std::fs::File>,
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl State {
    fn log(&mut self, e: Event) {
        tracing::info!(event = ?e, "dicap");
        if let Some(f) = self.report.as_mut() {
            if let Ok(line) = serde_json::to_string(&e) {
                if let Err(err) = writeln!(f, "{line}") {
                    tracing::warn!(%err, "dicap report not written");
                }
            }
        }
        self.events.push(e);
    }

    /// Rebalances over the healthy members and sends every changed share;
    /// `cause` (reason, uncovered since, detected at) when buckets were left
    /// uncovered.
    fn reassign(&mut self, cause: Option<(String, u64, u64)>) {
        let healthy: Vec<String> = self
            .members
            .keys()
            .filter(|n| !self.failed.contains_key(*n))
            .cloned()
            .collect();
        let next = rebalance(&self.owners, &healthy);
        self.epoch += 1;
        let epoch = self.epoch;
        let mut masks = BTreeMap::new();
        let mut waiting = BTreeSet::new();
        let mut broken = Vec::new();
        for name in &healthy {
            let (old, new) = (mask_of(&self.owners, name), mask_of(&next, name));
            masks.insert(name.clone(), new);
            if old == new {
                continue;
            }
            let msg = ToNode::Assign {
                epoch,
                mode: self.mode,
                mask: new,
            };
            if let Some(m) = self.members.get_mut(name) {
                match write_frame(&mut m.writer, &msg) {
                    Ok(()) => {
                        waiting.insert(name.clone());
                    }
                    Err(e) => broken.push((name.clone(), e.to_string())),
                }
            }
        }
        self.owners = next;
        self.log(Event::Assigned {
            epoch,
            masks,
            at_ns: now_ns(),
        });
        if let Some((because, from, detected)) = cause {
            if healthy.is_empty() {
                // Nobody left to take the buckets: they stay uncovered.
                self.log(Event::Uncovered {
                    because,
                    since_ns: from,
                });
                return;
            }
            self.pending.push(Pending {
                epoch,
                because,
                uncovered_from_ns: from,
                detected_ns: detected,
                waiting: waiting.clone(),
                covered_ns: 0,
            });
        }
        // Earlier events still waiting now wait for this epoch's installs.
        for p in &mut self.pending {
            if p.epoch != epoch {
                p.epoch = epoch;
                p.waiting = waiting.clone();
            }
        }
        self.complete_pending();
        for (name, why) in broken {
            self.lose(&name, None, &format!("sending its share failed: {why}"));
        }
    }

    fn complete_pending(&mut self) {
        let (done, open): (Vec<Pending>, Vec<Pending>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|p| p.waiting.is_empty());
        self.pending = open;
        for p in done {
            let covered = if p.covered_ns == 0 {
                now_ns()
            } else {
                p.covered_ns
            };
            self.log(Event::Covered {
                epoch: p.epoch,
                because: p.because,
                uncovered_from_ns: p.uncovered_from_ns,
                covered_ns: covered,
                uncovered_ms: covered.saturating_sub(p.uncovered_from_ns) as f64 / 1e6,
                reassigned_after_detection_ms: covered.saturating_sub(p.detected_ns) as f64 / 1e6,
            });
        }
    }

    /// Removes `name` (if `conn` still names its connection) and hands its
    /// buckets to the others.
    fn lose(&mut self, name: &str, conn: Option<u64>, reason: &str) {
        let Some(m) = self.members.get(name) else {
            return;
        };
        if conn.is_some_and(|c| c != m.conn) {
            return;
        }
        let last = m.last_heartbeat_ns;
        let _ = m.writer.shutdown(Shutdown::Both);
        self.members.remove(name);
        self.failed.remove(name);
        let buckets = mask_of(&self.owners, name).count_ones();
        let detected = now_ns();
        self.log(Event::Lost {
            node: name.to_owned(),
            reason: reason.to_owned(),
            last_heartbeat_ns: last,
            detected_ns: detected,
            buckets,
        });
        for p in &mut self.pending {
            p.waiting.remove(name);
        }
        let cause = (buckets > 0).then(|| (format!("{name} lost: {reason}"), last, detected));
        self.reassign(cause);
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs the coordinator on `listener` until `stop` is set.
pub fn run_coordinator(
    listener: TcpListener,
    mode: ShareMode,
    report: Option<&Path>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<CoordinatorSummary> {
    let report = report.map(std::fs::File::create).transpose()?;
    let state = Arc::new(Mutex::new(State {
        mode,
        members: BTreeMap::new(),
        failed: BTreeMap::new(),
        owners: unowned(),
        epoch: 0,
        pending: Vec::new(),
        events: Vec::new(),
        report,
    }));
    listener.set_nonblocking(true)?;
    let conns = AtomicU64::new(0);
    std::thread::scope(|scope| {
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((stream, peer)) => {
                    let conn = conns.fetch_add(1, Ordering::Relaxed);
                    let state = state.clone();
                    scope.spawn(move || serve(stream, peer.to_string(), conn, &state));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => tracing::warn!(%e, "dicap coordinator: accept failed"),
            }
            let mut st = lock(&state);
            let silent: Vec<String> = st
                .members
                .iter()
                .filter(|(_, m)| m.last_seen.elapsed() > LOST_AFTER)
                .map(|(n, _)| n.clone())
                .collect();
            for name in silent {
                let reason = format!("no heartbeat for {} ms", LOST_AFTER.as_millis());
                st.lose(&name, None, &reason);
            }
        }
        // Unblock every reader so the scope can end.
        for m in lock(&state).members.values() {
            let _ = m.writer.shutdown(Shutdown::Both);
        }
    });
    let events = std::mem::take(&mut lock(&state).events);
    Ok(CoordinatorSummary { events })
}

fn serve(stream: TcpStream, peer: String, conn: u64, state: &Mutex<State>) {
    let mut reader = stream;
    let _ = reader.set_nonblocking(false);
    let refuse = |mut w: &TcpStream, reason: String| {
        let _ = write_frame(
            &mut w,
            &ToNode::Refused {
                reason: reason.clone(),
            },
        );
        lock(state).log(Event::Refused {
            peer: peer.clone(),
            reason,
        });
    };
    let _ = reader.set_read_timeout(Some(Duration::from_secs(2)));
    let name = match read_frame::<ToCoordinator>(&mut reader) {
        Ok(ToCoordinator::Hello { node }) => node,
        Ok(other) => return refuse(&reader, format!("expected hello first, got {other:?}")),
        Err(e) => return refuse(&reader, format!("no hello: {e}")),
    };
    if name.is_empty() || name.len() > MAX_NAME {
        return refuse(&reader, format!("node name must have 1-{MAX_NAME} bytes"));
    }
    let Ok(writer) = reader.try_clone() else {
        return;
    };
    {
        let mut st = lock(state);
        if st.members.contains_key(&name) {
            drop(st);
            return refuse(
                &reader,
                format!("a node named {name:?} is already connected"),
            );
        }
        st.members.insert(
            name.clone(),
            Member {
                conn,
                writer,
                last_heartbeat_ns: now_ns(),
                last_seen: Instant::now(),
            },
        );
        st.log(Event::Joined {
            node: name.clone(),
            at_ns: now_ns(),
        });
        st.reassign(None);
    }
    let _ = reader.set_read_timeout(None);
    loop {
        let msg = match read_frame::<ToCoordinator>(&mut reader) {
            Ok(m) => m,
            Err(FrameError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                lock(state).lose(&name, Some(conn), "connection closed by the node");
                return;
            }
            Err(e) => {
                lock(state).lose(&name, Some(conn), &format!("connection failed: {e}"));
                return;
            }
        };
        let mut st = lock(state);
        if st.members.get(&name).is_none_or(|m| m.conn != conn) {
            return;
        }
        match msg {
            ToCoordinator::Heartbeat { sent_ns, .. } => {
                if let Some(m) = st.members.get_mut(&name) {
                    m.last_heartbeat_ns = sent_ns;
                    m.last_seen = Instant::now();
                }
            }
            ToCoordinator::Installed {
                epoch,
                installed_ns,
                ..
            } => {
                if let Some(m) = st.members.get_mut(&name) {
                    m.last_seen = Instant::now();
                }
                for p in st.pending.iter_mut().filter(|p| p.epoch == epoch) {
                    p.waiting.remove(&name);
                    p.covered_ns = p.covered_ns.max(installed_ns);
                }
                st.complete_pending();
            }
            ToCoordinator::InstallFailed { epoch, error } => {
                let buckets = mask_of(&st.owners, &name).count_ones();
                st.log(Event::InstallFailed {
                    node: name.clone(),
                    epoch,
                    error: error.clone(),
                    buckets,
                });
                st.failed.insert(name.clone(), error.clone());
                for p in &mut st.pending {
                    p.waiting.remove(&name);
                }
                let detected = now_ns();
                let from = st.events.iter().rev().find_map(|e| match e {
                    Event::Assigned {
                        epoch: e, at_ns, ..
                    } if *e == epoch => Some(*at_ns),
                    _ => None,
                });
                st.reassign(Some((
                    format!("{name}: filter install failed: {error}"),
                    from.unwrap_or(detected),
                    detected,
                )));
            }
            ToCoordinator::Hello { .. } => {
                drop(st);
                lock(state).lose(&name, Some(conn), "protocol error: a second hello");
                return;
            }
        }
    }
}
