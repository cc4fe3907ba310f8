//! The coordinator: nodes connect, it spreads the buckets over the nodes
//! able to capture and tells each its share. A node is lost when its
//! connection closes (kill -9 closes it at once) or when it stays silent
//! for [`LOST_AFTER`]; its buckets go to the others, and the window in
//! which they were uncovered — from the lost node's last heartbeat to the
//! last of the new filters installed, as the nodes report — is logged,
//! written to the report and kept in the summary. A node whose filter
//! install fails is excluded the same way, with the kernel's reason.
//!
//! Make-before-break: when a rebalance moves buckets between live nodes
//! (a join), every node first gets the union of what it holds and its new
//! share; only when all of those are installed do the nodes that give
//! buckets up get their smaller share. A moved bucket is never uncovered;
//! it is captured twice from the first gainer's install to the last
//! loser's, and that duplicate window is reported (`handover`). A node
//! that says in its hello which share it holds (reconnecting to a
//! restarted coordinator) keeps the buckets nobody owns.
//!
//! Guards ([`CoordinatorLimits`]): at most `max_nodes` members and
//! `max_connections` open connections (members and peers that have not
//! said hello, which must within 2 s); a node's frames are at most
//! [`MAX_NODE_FRAME`] bytes; with `allow`, only peers in those prefixes
//! are served. Every refusal is answered with a `refused` message naming
//! the reason, logged as an event and counted by reason in the summary.

use super::assign::{mask_of, rebalance, unowned, Owners};
use super::proto::{
    read_frame_max, write_frame, FrameError, ToCoordinator, ToNode, LOST_AFTER, MAX_NODE_FRAME,
};
use super::share::ShareMode;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::{IpAddr, Shutdown, TcpListener, TcpStream};
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
    /// Buckets moved between live nodes: captured by both from
    /// `duplicate_from_ns` (first gainer installed) to `duplicate_to_ns`
    /// (last loser installed), never by neither.
    Handover {
        epoch: u64,
        moved: u32,
        duplicate_from_ns: u64,
        duplicate_to_ns: u64,
        duplicate_ms: f64,
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
    /// Refused connections by reason (`not_allowed`, `too_many_connections`,
    /// `too_many_nodes`, `oversized_frame`, `bad_hello`, `bad_name`,
    /// `duplicate_name`).
    pub refusals: BTreeMap<&'static str, u64>,
}

/// What the coordinator accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoordinatorLimits {
    /// Members at most; a further hello is refused.
    pub max_nodes: usize,
    /// Open connections at most (members and peers before their hello).
    pub max_connections: usize,
    /// Peers allowed to connect (address, prefix length); empty: any.
    pub allow: Vec<(IpAddr, u8)>,
    /// With a shared secret, a node must answer a challenge after its
    /// hello (`--dicap-secret`); refused: `no_secret`, `bad_secret`.
    pub secret: Option<super::proto::Secret>,
}

impl Default for CoordinatorLimits {
    fn default() -> Self {
        CoordinatorLimits {
            max_nodes: 64,
            max_connections: 80,
            allow: Vec::new(),
            secret: None,
        }
    }
}

/// Whether `ip` lies in `net/len` (an IPv4-mapped IPv6 peer counts as IPv4).
pub fn in_prefix(ip: IpAddr, net: IpAddr, len: u8) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) if len <= 32 => {
            let m = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            u32::from(a) & m == u32::from(n) & m
        }
        (IpAddr::V6(a), IpAddr::V6(n)) if len <= 128 => {
            let m = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len)
            };
            u128::from(a) & m == u128::from(n) & m
        }
        _ => false,
    }
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

/// A make-before-break step in progress: gainers installing the union,
/// then losers installing their smaller share.
#[derive(Debug, Default)]
struct Handover {
    epoch: u64,
    moved: u32,
    gaining: BTreeSet<String>,
    giving: Vec<(String, u64)>,
    releasing: BTreeSet<String>,
    first_ns: u64,
    last_ns: u64,
}

/// After a start, how long nodes that come back with a share keep it
/// before anything moves: a node's longest reconnection backoff plus a
/// lost-node timeout.
const RESTART_GRACE: Duration = Duration::from_millis(
    super::node::BACKOFF_MAX.as_millis() as u64 + LOST_AFTER.as_millis() as u64,
);

#[derive(Debug)]
struct State {
    started: Instant,
    /// Shares were adopted in the grace: rebalance once it ends.
    adopted: bool,
    /// The share last sent to (or adopted from) each member: what it holds
    /// once it has installed it.
    sent: BTreeMap<String, u64>,
    handover: Option<Handover>,
    mode: ShareMode,
    members: BTreeMap<String, Member>,
    failed: BTreeMap<String, String>,
    owners: Owners,
    epoch: u64,
    pending: Vec<Pending>,
    events: Vec<Event>,
    report: Option<std::fs::File>,
    refusals: BTreeMap<&'static str, u64>,
    /// Connections open now (served by a thread).
    open: usize,
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
        let mut handover = Handover {
            epoch,
            ..Handover::default()
        };
        for name in &healthy {
            let held = self.sent.get(name).copied().unwrap_or(0);
            let new = mask_of(&next, name);
            masks.insert(name.clone(), new);
            // Make before break: first what it holds and what it gains.
            let first = held | new;
            if first != new {
                handover.giving.push((name.clone(), new));
                handover.moved += (held & !new).count_ones();
            }
            if first == held {
                continue;
            }
            match self.send(name, epoch, first) {
                Ok(()) => {
                    waiting.insert(name.clone());
                    handover.gaining.insert(name.clone());
                }
                Err(e) => broken.push((name.clone(), e)),
            }
        }
        self.owners = next;
        self.log(Event::Assigned {
            epoch,
            masks,
            at_ns: now_ns(),
        });
        // A newer rebalance replaces a handover in progress: its losers'
        // smaller shares are recomputed from what they were sent.
        self.handover = (!handover.giving.is_empty()).then_some(handover);
        self.advance_handover();
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

    fn send(&mut self, name: &str, epoch: u64, mask: u64) -> Result<(), String> {
        let msg = ToNode::Assign {
            epoch,
            mode: self.mode,
            mask,
        };
        let m = self
            .members
            .get_mut(name)
            .ok_or_else(|| "not a member".to_owned())?;
        write_frame(&mut m.writer, &msg).map_err(|e| e.to_string())?;
        self.sent.insert(name.to_owned(), mask);
        Ok(())
    }

    /// Moves a handover on: once every gainer installed, the losers get
    /// their smaller share; once they installed, the duplicate window is
    /// logged.
    fn advance_handover(&mut self) {
        let Some(mut h) = self.handover.take() else {
            return;
        };
        h.gaining.retain(|n| self.members.contains_key(n));
        h.releasing.retain(|n| self.members.contains_key(n));
        if h.gaining.is_empty() && !h.giving.is_empty() {
            let mut broken = Vec::new();
            for (name, mask) in std::mem::take(&mut h.giving) {
                match self.send(&name, h.epoch, mask) {
                    Ok(()) => {
                        h.releasing.insert(name);
                    }
                    Err(e) => broken.push((name, e)),
                }
            }
            self.handover = Some(h);
            for (name, why) in broken {
                self.lose(&name, None, &format!("sending its share failed: {why}"));
            }
            return;
        }
        if h.gaining.is_empty() && h.giving.is_empty() && h.releasing.is_empty() {
            let to = h.last_ns.max(h.first_ns);
            self.log(Event::Handover {
                epoch: h.epoch,
                moved: h.moved,
                duplicate_from_ns: h.first_ns,
                duplicate_to_ns: to,
                duplicate_ms: to.saturating_sub(h.first_ns) as f64 / 1e6,
            });
            return;
        }
        self.handover = Some(h);
    }

    /// `name` installed `mask` of `epoch` at `at_ns`.
    fn installed(&mut self, name: &str, epoch: u64, mask: u64, at_ns: u64) {
        if let Some(h) = self.handover.as_mut().filter(|h| h.epoch == epoch) {
            if self.sent.get(name) == Some(&mask) {
                if h.gaining.remove(name) && (h.first_ns == 0 || at_ns < h.first_ns) {
                    h.first_ns = at_ns;
                }
                if h.releasing.remove(name) {
                    h.last_ns = h.last_ns.max(at_ns);
                }
            }
        }
        self.advance_handover();
    }

    fn refused(&mut self, kind: &'static str, peer: &str, reason: String) {
        *self.refusals.entry(kind).or_default() += 1;
        tracing::warn!(%peer, %reason, "dicap coordinator refused a connection");
        self.log(Event::Refused {
            peer: peer.to_owned(),
            reason,
        });
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
        self.sent.remove(name);
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

/// Runs the coordinator on `listener` until `stop` is set, with the
/// default limits.
pub fn run_coordinator(
    listener: TcpListener,
    mode: ShareMode,
    report: Option<&Path>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<CoordinatorSummary> {
    run_coordinator_with(listener, mode, report, &CoordinatorLimits::default(), stop)
}

/// Sends `refused` on a connection not served further (short timeout:
/// a peer that does not read is not waited for).
fn refuse_now(stream: &TcpStream, reason: &str) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
    let mut w = stream;
    let _ = write_frame(
        &mut w,
        &ToNode::Refused {
            reason: reason.to_owned(),
        },
    );
    let _ = stream.shutdown(Shutdown::Both);
}

/// Runs the coordinator on `listener` until `stop` is set.
pub fn run_coordinator_with(
    listener: TcpListener,
    mode: ShareMode,
    report: Option<&Path>,
    limits: &CoordinatorLimits,
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
        sent: BTreeMap::new(),
        handover: None,
        started: Instant::now(),
        adopted: false,
        refusals: BTreeMap::new(),
        open: 0,
    }));
    listener.set_nonblocking(true)?;
    let conns = AtomicU64::new(0);
    std::thread::scope(|scope| {
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((stream, peer)) => {
                    let allowed = limits.allow.is_empty()
                        || limits
                            .allow
                            .iter()
                            .any(|&(net, len)| in_prefix(peer.ip(), net, len));
                    let mut st = lock(&state);
                    if !allowed {
                        let reason = format!("peer {} is not in --dicap-allow", peer.ip());
                        st.refused("not_allowed", &peer.to_string(), reason.clone());
                        drop(st);
                        refuse_now(&stream, &reason);
                        continue;
                    }
                    if st.open >= limits.max_connections {
                        let reason = format!(
                            "too many connections: {} open, the limit is {}",
                            st.open, limits.max_connections
                        );
                        st.refused("too_many_connections", &peer.to_string(), reason.clone());
                        drop(st);
                        refuse_now(&stream, &reason);
                        continue;
                    }
                    st.open += 1;
                    drop(st);
                    let conn = conns.fetch_add(1, Ordering::Relaxed);
                    let state = state.clone();
                    let max_nodes = limits.max_nodes;
                    let secret = limits.secret.clone();
                    scope.spawn(move || {
                        serve(
                            stream,
                            peer.to_string(),
                            conn,
                            (max_nodes, secret.as_ref()),
                            &state,
                        );
                        lock(&state).open -= 1;
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => tracing::warn!(%e, "dicap coordinator: accept failed"),
            }
            let mut st = lock(&state);
            if st.adopted && st.started.elapsed() >= RESTART_GRACE {
                st.adopted = false;
                st.reassign(None);
            }
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
    let mut st = lock(&state);
    let events = std::mem::take(&mut st.events);
    let refusals = std::mem::take(&mut st.refusals);
    Ok(CoordinatorSummary { events, refusals })
}

fn serve(
    stream: TcpStream,
    peer: String,
    conn: u64,
    (max_nodes, secret): (usize, Option<&super::proto::Secret>),
    state: &Mutex<State>,
) {
    let mut reader = stream;
    let _ = reader.set_nonblocking(false);
    let refuse = |w: &TcpStream, kind: &'static str, reason: String| {
        lock(state).refused(kind, &peer, reason.clone());
        refuse_now(w, &reason);
    };
    let _ = reader.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = reader.set_write_timeout(Some(Duration::from_secs(2)));
    let (name, holds) = match read_frame_max::<ToCoordinator>(&mut reader, MAX_NODE_FRAME) {
        Ok(ToCoordinator::Hello { node, mask }) => (node, mask.unwrap_or(0)),
        Ok(other) => {
            return refuse(
                &reader,
                "bad_hello",
                format!("expected hello first, got {other:?}"),
            )
        }
        Err(e @ FrameError::TooLarge(..)) => {
            return refuse(&reader, "oversized_frame", format!("no hello: {e}"))
        }
        Err(e) => return refuse(&reader, "bad_hello", format!("no hello: {e}")),
    };
    if name.is_empty() || name.len() > MAX_NAME {
        return refuse(
            &reader,
            "bad_name",
            format!("node name must have 1-{MAX_NAME} bytes"),
        );
    }
    if let Some(secret) = secret {
        if let Err((kind, reason)) = super::proto::challenge(&mut reader, secret, &name) {
            return refuse(&reader, kind, reason);
        }
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
                "duplicate_name",
                format!("a node named {name:?} is already connected"),
            );
        }
        if st.members.len() >= max_nodes {
            let n = st.members.len();
            drop(st);
            return refuse(
                &reader,
                "too_many_nodes",
                format!("node {name:?} refused: the coordinator already has {n} nodes, its limit (--dicap-max-nodes)"),
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
        // What it holds already (after a coordinator restart): the buckets
        // nobody owns stay with it; the rest it is told to drop, after
        // their owners hold them (make before break).
        st.sent.insert(name.clone(), holds);
        for b in 0..64usize {
            if holds >> b & 1 == 1 && st.owners[b].is_none() {
                st.owners[b] = Some(name.clone());
            }
        }
        // Just restarted: the other nodes are on their way back with
        // their shares; nothing moves until the grace ends.
        if holds != 0 && st.started.elapsed() < RESTART_GRACE {
            st.adopted = true;
        } else {
            st.reassign(None);
        }
    }
    let _ = reader.set_read_timeout(None);
    loop {
        let msg = match read_frame_max::<ToCoordinator>(&mut reader, MAX_NODE_FRAME) {
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
                mask,
            } => {
                if let Some(m) = st.members.get_mut(&name) {
                    m.last_seen = Instant::now();
                }
                st.installed(&name, epoch, mask, installed_ns);
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
                // It installed reject-all.
                st.sent.insert(name.clone(), 0);
                if let Some(h) = st.handover.as_mut() {
                    h.gaining.remove(&name);
                    h.releasing.remove(&name);
                }
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
            ToCoordinator::Hello { .. } | ToCoordinator::Auth { .. } => {
                drop(st);
                lock(state).lose(&name, Some(conn), "protocol error: a second hello or auth");
                return;
            }
        }
    }
}
