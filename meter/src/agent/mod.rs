//! The host agent (`qosloop-meter --agent`, Linubia of `seeds/000`):
//! every byte of local TCP, UDP and ICMP traffic, IPv4 and IPv6, accounted
//! to the user and the process that sent or received it, as flow records
//! with `user` and `process` set.
//!
//! Mechanism (docs/meter.md, "Host agent"): the [`programs`] count per
//! socket cookie and 5-tuple at the cgroup v2 root (links, which coexist
//! with systemd's `BPF_F_ALLOW_MULTI` programs and go away with the agent),
//! and record cookie → pid/uid/command when sockets are created or bound.
//! Every interim interval the agent flips the epoch cell so the programs
//! count into the other counter map, reads the idle one (frozen: no program
//! writes it any more), writes the records, marks the drain exported in a
//! one-word map and only then clears the idle map: an agent killed inside a
//! drain leaves either the whole batch (the next agent exports it) or the
//! mark (the next agent clears it unexported), so nothing is lost or
//! counted twice. Cookies without an
//! owner entry (sockets older than the agent, accepted sockets) are
//! resolved through `sock_diag` and `/proc`; what cannot be resolved keeps
//! the socket's uid and is called `unknown process` — never dropped.
//!
//! Maps and links may be pinned (`--agent-pin-dir`, a bpffs directory):
//! the programs of an agent that dies keep counting, and the next agent
//! takes them over and drains what was counted meanwhile. Without eBPF
//! (`--agent-mode nft`, or `auto` when the programs do not load) the
//! [`nft`] fallback accounts per user through nftables and conntrack.

mod conntrack;
mod names;
pub mod nft;
pub mod programs;
mod sockdiag;
mod stats;

use crate::sink::{RecordSink, SinkError};
use names::{comm_of, process_label, UserNames};
pub use programs::CountPath;
use programs::{CountMaps, CounterKey, Counts, Direction, OwnerEntry};
use qosloop_bpf::{AttachType, BpfError, CgroupLink, Map, MapType, ProgType, Program};
use qosloop_schema::FlowRecord;
pub use stats::AgentStats;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How the agent is configured.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The cgroup v2 directory the programs attach to (its whole subtree
    /// is accounted); the root of the hierarchy by default.
    pub cgroup: PathBuf,
    /// A bpffs directory to pin the maps in (restart without loss).
    pub pin_dir: Option<PathBuf>,
    /// Entries of each counter map (sockets × 5-tuples per interval).
    pub map_entries: u32,
    /// Records every this often.
    pub interim: Duration,
    /// How the counting program keys packets (the cache by default; the
    /// direct hash path is kept to measure against).
    pub count_path: CountPath,
    /// eBPF, the nftables + conntrack fallback, or the first that works.
    pub mode: AgentMode,
}

/// `--agent-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentMode {
    Bpf,
    Nft,
    /// eBPF when the programs load and attach (the probe), else nftables.
    Auto,
}

impl std::str::FromStr for AgentMode {
    type Err = String;
    fn from_str(s: &str) -> Result<AgentMode, String> {
        match s {
            "bpf" => Ok(AgentMode::Bpf),
            "nft" => Ok(AgentMode::Nft),
            "auto" => Ok(AgentMode::Auto),
            _ => Err(format!("agent_mode: {s:?} is not bpf, nft or auto")),
        }
    }
}

/// Entries of each counter map by default.
pub const DEFAULT_MAP_ENTRIES: u32 = 65_536;
/// Owners kept in user space; the least recently seen go first beyond it.
const MAX_OWNERS: usize = 262_144;
/// Drains at which an unknown cookie is looked up before it is left to
/// `unknown process` (its uid is kept).
const RESOLVE_ATTEMPTS: u32 = 5;

/// The links' pins in `--agent-pin-dir`, in attach order.
const LINK_PINS: [&str; 5] = [
    "qla_link_ingress",
    "qla_link_egress",
    "qla_link_sock_create",
    "qla_link_post_bind4",
    "qla_link_post_bind6",
];

/// Why the agent could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cgroup v2 at {path}: {why}")]
    Cgroup { path: String, why: String },
    #[error("{what}: {source}")]
    Bpf {
        what: String,
        #[source]
        source: BpfError,
    },
    #[error("assembling {0}")]
    Asm(#[from] qosloop_bpf::AsmError),
    #[error("output: {0}")]
    Sink(#[from] SinkError),
    #[error("nftables/conntrack fallback: {0}")]
    Fallback(String),
}

fn bpf(what: impl Into<String>) -> impl FnOnce(BpfError) -> AgentError {
    let what = what.into();
    move |source| AgentError::Bpf { what, source }
}

/// Where cgroup v2 is mounted: `/sys/fs/cgroup/unified` in a hybrid
/// layout, `/sys/fs/cgroup` in a unified one.
pub fn default_cgroup() -> PathBuf {
    for p in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
        if is_cgroup2(Path::new(p)) {
            return PathBuf::from(p);
        }
    }
    PathBuf::from("/sys/fs/cgroup/unified")
}

fn is_cgroup2(p: &Path) -> bool {
    nix::sys::statfs::statfs(p)
        .map(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
        .unwrap_or(false)
}

#[derive(Debug, Clone)]
struct Owner {
    pid: Option<u32>,
    comm: Option<String>,
    uid: u32,
    last_drain: u64,
}

/// The agent's maps.
#[derive(Debug)]
struct Maps {
    epoch: Map,
    counters: [Map; 2],
    owners: Map,
    overflow: Map,
    cache: Map,
    /// One word: [`EXPORTED`] from the moment a drain's records are out
    /// until the idle map and cache cells are cleared, else 0 (pinned with
    /// the others: what a killed agent had exported is not exported again).
    drain_state: Map,
}

/// `qla_drain`: the idle epoch's counts are in the sink; clearing them.
const EXPORTED: u32 = 1;

/// Test-only hook (named for what it is; built only with the `test-hooks`
/// feature, which the meter's own tests turn on): `before_export` or
/// `before_clear` makes the first drain with records pause there for up to
/// 30 s, saying so on the log, so a test can kill the agent inside a drain.
#[cfg(feature = "test-hooks")]
const TEST_PAUSE_ENV: &str = "QOSLOOP_AGENT_TEST_PAUSE_IN_DRAIN";

impl Maps {
    fn open(cfg: &AgentConfig) -> Result<Maps, AgentError> {
        let n = cfg.map_entries.max(16);
        let make =
            |name: &str, t: MapType, k: u32, v: u32, entries: u32| -> Result<Map, AgentError> {
                if let Some(dir) = &cfg.pin_dir {
                    let path = dir.join(name);
                    if path.exists() {
                        return Map::from_pinned(&path, t, k, v)
                            .map_err(bpf(format!("opening pinned map {}", path.display())));
                    }
                    let m = Map::create(t, k, v, entries, name)
                        .map_err(bpf(format!("creating map {name}")))?;
                    m.pin(&path)
                        .map_err(bpf(format!("pinning {}", path.display())))?;
                    return Ok(m);
                }
                Map::create(t, k, v, entries, name).map_err(bpf(format!("creating map {name}")))
            };
        use programs::*;
        Ok(Maps {
            epoch: make("qla_epoch", MapType::Array, 4, 4, 1)?,
            counters: [
                make("qla_count0", MapType::PercpuHash, KEY_SIZE, VALUE_SIZE, n)?,
                make("qla_count1", MapType::PercpuHash, KEY_SIZE, VALUE_SIZE, n)?,
            ],
            owners: make(
                "qla_owners",
                MapType::Hash,
                8,
                OWNER_SIZE,
                n.saturating_mul(2),
            )?,
            overflow: make("qla_overflow", MapType::PercpuArray, 4, OVERFLOW_SIZE, 1)?,
            cache: make(
                "qla_cache",
                MapType::PercpuArray,
                4,
                CACHE_SLOT_SIZE,
                CACHE_CELLS,
            )?,
            drain_state: make("qla_drain", MapType::Array, 4, 4, 1)?,
        })
    }
}

/// The running agent: programs attached, maps drained on demand.
#[derive(Debug)]
pub struct Agent {
    maps: Maps,
    programs: Vec<Program>,
    links: Vec<CgroupLink>,
    /// Where the links are pinned (removed at a clean stop).
    link_pins: Vec<PathBuf>,
    epoch: u32,
    owners: HashMap<u64, Owner>,
    /// Cookies sock_diag and /proc could not resolve yet, and how often
    /// they were tried.
    unresolved: HashMap<u64, u32>,
    users: UserNames,
    overflow_seen: (u64, u64),
    /// Said once: the kernel gave no RCU grace period after an epoch flip.
    grace_warned: bool,
    last_drain_wall_ns: u64,
    stats: AgentStats,
}

fn wall_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

impl Agent {
    /// Loads the programs (the probe: an error here means eBPF cannot be
    /// used on this host) and attaches them to `cfg.cgroup`.
    pub fn start(cfg: &AgentConfig) -> Result<Agent, AgentError> {
        if !is_cgroup2(&cfg.cgroup) {
            return Err(AgentError::Cgroup {
                path: cfg.cgroup.display().to_string(),
                why: "not a cgroup2 mount (give --agent-cgroup DIR)".into(),
            });
        }
        let cgroup = File::open(&cfg.cgroup).map_err(|e| AgentError::Cgroup {
            path: cfg.cgroup.display().to_string(),
            why: e.to_string(),
        })?;
        let maps = Maps::open(cfg)?;
        let mut programs = vec![];
        let mut links = vec![];
        let link_pins: Vec<PathBuf> = cfg
            .pin_dir
            .iter()
            .flat_map(|d| LINK_PINS.iter().map(move |n| d.join(n)))
            .collect();
        if !link_pins.is_empty() && link_pins.iter().all(|p| p.exists()) {
            // A predecessor's programs are still attached and counting
            // into the pinned maps: keep them, attach nothing twice.
            for p in &link_pins {
                links.push(
                    CgroupLink::from_pinned(p)
                        .map_err(bpf(format!("opening pinned link {}", p.display())))?,
                );
            }
            tracing::info!(
                "agent: the pinned programs of a previous agent are still attached; counting on with them"
            );
        } else {
            // An incomplete set (an agent died while attaching): detach it.
            for p in &link_pins {
                let _ = std::fs::remove_file(p);
            }
            Self::attach(cfg, &cgroup, &maps, &mut programs, &mut links)?;
            for (link, p) in links.iter().zip(&link_pins) {
                link.pin(p)
                    .map_err(bpf(format!("pinning link {}", p.display())))?;
            }
        }
        let epoch = maps
            .epoch
            .lookup(&0u32.to_ne_bytes())
            .ok()
            .flatten()
            .map(|v| u32::from_ne_bytes([v[0], v[1], v[2], v[3]]) & 1)
            .unwrap_or(0);
        let mut agent = Agent {
            maps,
            programs,
            links,
            link_pins,
            epoch,
            owners: HashMap::new(),
            unresolved: HashMap::new(),
            users: UserNames::default(),
            overflow_seen: (0, 0),
            grace_warned: false,
            last_drain_wall_ns: wall_ns(),
            stats: AgentStats::default(),
        };
        agent.overflow_seen = agent.overflow_totals();
        agent.finish_interrupted_drain()?;
        tracing::info!(
            cgroup = %cfg.cgroup.display(),
            pinned = cfg.pin_dir.is_some(),
            epoch,
            "agent: eBPF cgroup_skb ingress/egress and cgroup_sock owner programs attached"
        );
        Ok(agent)
    }

    /// Loads the counting and owner programs and links them to `cgroup`
    /// (ingress, egress, sock_create, post_bind4, post_bind6: the order of
    /// [`LINK_PINS`]).
    fn attach(
        cfg: &AgentConfig,
        cgroup: &File,
        maps: &Maps,
        programs: &mut Vec<Program>,
        links: &mut Vec<CgroupLink>,
    ) -> Result<(), AgentError> {
        let count_maps = CountMaps {
            epoch: maps.epoch.raw_fd(),
            counters: [maps.counters[0].raw_fd(), maps.counters[1].raw_fd()],
            overflow: maps.overflow.raw_fd(),
            cache: maps.cache.raw_fd(),
        };
        let owner = programs::owner_program(maps.owners.raw_fd())?;
        for (attach, dir) in [
            (AttachType::CgroupInetIngress, Direction::Ingress),
            (AttachType::CgroupInetEgress, Direction::Egress),
        ] {
            let insns = programs::count_program(count_maps, dir, cfg.count_path)?;
            let count =
                Program::load(ProgType::CgroupSkb, None, &insns, "qla_count").map_err(bpf(
                    format!("loading the counting program (cgroup_skb, {attach:?})"),
                ))?;
            links.push(
                count
                    .link(cgroup.as_fd(), attach)
                    .map_err(bpf(format!("attaching qla_count at {attach:?}")))?,
            );
            programs.push(count);
        }
        for attach in [
            AttachType::CgroupInetSockCreate,
            AttachType::CgroupInet4PostBind,
            AttachType::CgroupInet6PostBind,
        ] {
            let p = Program::load(ProgType::CgroupSock, Some(attach), &owner, "qla_owner")
                .map_err(bpf(format!("loading the owner program ({attach:?})")))?;
            links.push(
                p.link(cgroup.as_fd(), attach)
                    .map_err(bpf(format!("attaching qla_owner at {attach:?}")))?,
            );
            programs.push(p);
        }
        Ok(())
    }

    /// The loaded programs (for run-time statistics): the counting
    /// programs (ingress, egress) first, then the owner programs.
    pub fn programs(&self) -> &[Program] {
        &self.programs
    }

    /// The counting programs (ingress, egress).
    pub fn count_programs(&self) -> &[Program] {
        &self.programs[..2.min(self.programs.len())]
    }

    /// Reads the idle epoch's cache cells (every CPU's copy) into `into`;
    /// no program writes them once the epoch flipped. They are zeroed by
    /// [`Agent::clear_idle`] once their records are out.
    fn read_cache(
        &self,
        idle: u32,
        into: &mut HashMap<CounterKey, Counts>,
    ) -> Result<(), AgentError> {
        let slot = self.maps.cache.slot_size();
        for cell in programs::cache_cells_of(idle) {
            let k = cell.to_ne_bytes();
            let Some(v) = self
                .maps
                .cache
                .lookup(&k)
                .map_err(bpf("reading the cache"))?
            else {
                continue;
            };
            for s in v.chunks_exact(slot.max(programs::CACHE_SLOT_SIZE as usize)) {
                let counts = Counts::sum(
                    &s[programs::KEY_SIZE as usize..],
                    programs::VALUE_SIZE as usize,
                );
                if counts.packets == 0 {
                    continue;
                }
                if let Some(key) = CounterKey::decode(s) {
                    into.entry(key).or_default().merge(counts);
                }
            }
        }
        Ok(())
    }

    /// Empties the idle epoch's counter map and cache cells (their counts
    /// are in the sink), then says so in `qla_drain`.
    fn clear_idle(&self, idle: u32) -> Result<(), AgentError> {
        self.maps.counters[idle as usize & 1]
            .drain(1024, |_, _| {})
            .map_err(bpf("clearing a counter map"))?;
        let zero = vec![0u8; self.maps.cache.user_value_size()];
        for cell in programs::cache_cells_of(idle) {
            self.maps
                .cache
                .update(&cell.to_ne_bytes(), &zero)
                .map_err(bpf("clearing the cache"))?;
        }
        self.set_drain_state(0)
    }

    fn set_drain_state(&self, state: u32) -> Result<(), AgentError> {
        self.maps
            .drain_state
            .update(&0u32.to_ne_bytes(), &state.to_ne_bytes())
            .map_err(bpf("writing the drain state"))
    }

    /// A previous agent on the same pinned maps was stopped after its last
    /// drain's records were out but before it cleared the idle map: clear
    /// it now, without exporting it again.
    fn finish_interrupted_drain(&self) -> Result<(), AgentError> {
        let state = self
            .maps
            .drain_state
            .lookup(&0u32.to_ne_bytes())
            .map_err(bpf("reading the drain state"))?
            .map_or(0, |v| u32::from_ne_bytes([v[0], v[1], v[2], v[3]]));
        if state == EXPORTED {
            tracing::warn!(
                "agent: the previous agent stopped after exporting a drain but before clearing it; cleared now, not exported again"
            );
            self.clear_idle(self.epoch ^ 1)?;
        }
        Ok(())
    }

    pub fn stats(&self) -> AgentStats {
        self.stats
    }

    fn overflow_totals(&self) -> (u64, u64) {
        let Ok(Some(v)) = self.maps.overflow.lookup(&0u32.to_ne_bytes()) else {
            return (0, 0);
        };
        let slot = self.maps.overflow.slot_size();
        v.chunks_exact(slot.max(16)).fold((0, 0), |(p, b), s| {
            let w = |at: usize| {
                let mut x = [0u8; 8];
                x.copy_from_slice(&s[at..at + 8]);
                u64::from_ne_bytes(x)
            };
            (p + w(0), b + w(8))
        })
    }

    /// Whether a full counter map refused packets since the last look
    /// (they are counted; an early drain makes room).
    pub fn overflowed(&mut self) -> bool {
        let now = self.overflow_totals();
        let risen = now.0 > self.overflow_seen.0;
        if risen {
            self.stats.map_full_packets += now.0 - self.overflow_seen.0;
            self.stats.map_full_bytes += now.1.saturating_sub(self.overflow_seen.1);
            tracing::warn!(
                packets = now.0 - self.overflow_seen.0,
                "agent: counter map full; packets counted as overflow, draining early"
            );
            self.overflow_seen = now;
        }
        risen
    }

    fn take_owners(&mut self) -> Result<(), AgentError> {
        let mut fresh = Vec::new();
        self.maps
            .owners
            .drain(512, |k, v| fresh.extend(OwnerEntry::decode(k, v)))
            .map_err(bpf("draining the owner map"))?;
        let drain = self.stats.drains;
        for e in fresh {
            self.owners.insert(
                e.cookie,
                Owner {
                    pid: Some(e.pid),
                    comm: Some(e.comm),
                    uid: e.uid,
                    last_drain: drain,
                },
            );
        }
        Ok(())
    }

    /// Owners of cookies the owner program never saw, from sock_diag and
    /// /proc. `ports` are the ports each cookie's packets carried: an
    /// accepted connection that closed before this drain (its socket is in
    /// TIME_WAIT, without a descriptor) goes to the process listening on
    /// one of them.
    fn resolve(&mut self, ports: &HashMap<u64, Vec<u16>>) {
        let diag = match sockdiag::dump() {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "agent: sock_diag failed; owners stay unknown");
                return;
            }
        };
        let listeners: HashMap<u16, u32> = diag
            .values()
            .filter(|d| d.state == sockdiag::LISTEN && d.inode != 0)
            .map(|d| (d.local_port, d.inode))
            .collect();
        let inodes: HashSet<u32> = ports
            .keys()
            .filter_map(|c| diag.get(c).map(|d| d.inode))
            .chain(listeners.values().copied())
            .filter(|&i| i != 0)
            .collect();
        let pids = sockdiag::pids_of_inodes(&inodes);
        tracing::debug!(
            cookies = ports.len(),
            in_sock_diag = ports.keys().filter(|c| diag.contains_key(c)).count(),
            sockets = diag.len(),
            pids = pids.len(),
            "agent: resolving owners"
        );
        for (c, seen_ports) in ports {
            let direct = diag.get(c).and_then(|d| pids.get(&d.inode));
            let by_listener = || {
                seen_ports
                    .iter()
                    .find_map(|p| listeners.get(p).and_then(|i| pids.get(i)))
            };
            // A socket not yet accepted has no descriptor: asked again at
            // the next drains, a few times.
            let Some(pid) = direct.or_else(by_listener) else {
                if self.unresolved.len() < MAX_OWNERS {
                    *self.unresolved.entry(*c).or_insert(0) += 1;
                }
                continue;
            };
            self.unresolved.remove(c);
            self.owners.insert(
                *c,
                Owner {
                    pid: Some(*pid),
                    comm: comm_of(*pid),
                    uid: diag.get(c).map_or(0, |d| d.uid),
                    last_drain: self.stats.drains,
                },
            );
        }
    }

    /// Flips the epoch and turns the idle counter map into records.
    pub fn drain(&mut self, sink: &mut dyn RecordSink) -> Result<usize, AgentError> {
        self.take_owners()?;
        let idle = self.epoch as usize;
        self.epoch ^= 1;
        self.maps
            .epoch
            .update(&0u32.to_ne_bytes(), &self.epoch.to_ne_bytes())
            .map_err(bpf("flipping the epoch"))?;
        // A run that read the old epoch may still be writing its cells or
        // its map (a run in process context can be preempted for
        // milliseconds on a busy host): wait until every such run is out.
        // A fixed sleep here let a preempted run flush a cell into the
        // overflow after the drain had read that cell, counting it twice.
        if let Err(e) = qosloop_bpf::wait_for_running_programs() {
            if !self.grace_warned {
                self.grace_warned = true;
                tracing::warn!(error = %e, "agent: no RCU grace period from the kernel; waiting 10 ms after each epoch flip instead (a run preempted longer can be counted twice or lost)");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // Owners recorded meanwhile (sockets created just before the flip).
        self.take_owners()?;
        // Read, export, then clear: the idle map is frozen (no program
        // writes it after the flip), so a kill before the records are out
        // leaves it whole for the next agent, and `qla_drain` tells that
        // agent when they were out already.
        let mut merged: HashMap<CounterKey, Counts> = HashMap::new();
        let slot = self.maps.counters[idle].slot_size();
        self.maps.counters[idle]
            .read_all(1024, |k, v| {
                if let Some(key) = CounterKey::decode(k) {
                    merged.entry(key).or_default().merge(Counts::sum(v, slot));
                }
            })
            .map_err(bpf("reading a counter map"))?;
        self.read_cache(idle as u32, &mut merged)?;
        let entries: Vec<(CounterKey, Counts)> = merged.into_iter().collect();
        let mut unknown: HashMap<u64, Vec<u16>> = HashMap::new();
        for (k, _) in &entries {
            let c = k.cookie;
            if c != 0
                && !self.owners.contains_key(&c)
                && self
                    .unresolved
                    .get(&c)
                    .is_none_or(|&n| n < RESOLVE_ATTEMPTS)
            {
                let ports = unknown.entry(c).or_default();
                if k.proto == 6 && ports.len() < 4 {
                    ports.extend([k.src_port, k.dst_port]);
                }
            }
        }
        if !unknown.is_empty() {
            self.resolve(&unknown);
        }
        let now_wall = wall_ns();
        let now_mono = qosloop_bpf::ktime_ns();
        let since = self.last_drain_wall_ns;
        self.last_drain_wall_ns = now_wall;
        self.stats.drains += 1;
        let drain = self.stats.drains;
        let n = entries.len();
        let mut paused = false;
        for (key, counts) in entries {
            if counts.packets == 0 {
                continue;
            }
            let (owner_uid, process) = match self.owners.get_mut(&key.cookie) {
                Some(o) => {
                    o.last_drain = drain;
                    (Some(o.uid), process_label(o.comm.as_deref(), o.pid))
                }
                None => {
                    self.stats.unknown_process += 1;
                    (None, process_label(None, None))
                }
            };
            let uid = counts.uid.or(owner_uid);
            let first_wall = if counts.first_mono_ns != 0 && counts.first_mono_ns <= now_mono {
                now_wall.saturating_sub(now_mono - counts.first_mono_ns)
            } else {
                since
            };
            let record = FlowRecord {
                src_addr: key.src,
                dst_addr: key.dst,
                src_port: key.src_port,
                dst_port: key.dst_port,
                proto: key.proto,
                packets: counts.packets,
                bytes: counts.bytes,
                start_ns: first_wall.max(since).min(now_wall),
                end_ns: now_wall,
                user: uid.map(|u| self.users.name(u)),
                process: Some(process),
                ..FlowRecord::default()
            };
            self.stats.records += 1;
            self.stats.packets += counts.packets;
            self.stats.bytes += counts.bytes;
            if !paused {
                paused = true;
                test_pause("before_export");
            }
            sink.push(&record)?;
        }
        sink.flush()?;
        self.set_drain_state(EXPORTED)?;
        if paused {
            test_pause("before_clear");
        }
        self.clear_idle(idle as u32)?;
        if self.owners.len() > MAX_OWNERS {
            // The owners not seen for longest go first.
            let mut ages: Vec<u64> = self.owners.values().map(|o| o.last_drain).collect();
            ages.sort_unstable();
            let cut = ages[ages.len() - MAX_OWNERS];
            self.owners.retain(|_, o| o.last_drain >= cut);
            self.unresolved.clear();
        }
        Ok(n)
    }

    /// Detaches the programs and drains both counter maps: everything
    /// counted is in `sink` afterwards.
    pub fn stop(mut self, sink: &mut dyn RecordSink) -> Result<AgentStats, AgentError> {
        for p in &self.link_pins {
            if let Err(e) = std::fs::remove_file(p) {
                tracing::warn!(pin = %p.display(), error = %e, "agent: removing a link pin");
            }
        }
        self.links.clear();
        self.overflowed();
        self.drain(sink)?;
        self.drain(sink)?;
        Ok(self.stats)
    }
}

/// The test-only pause (see [`TEST_PAUSE_ENV`]): once per process, at
/// `point` when the variable names it. Nothing without `test-hooks`.
#[cfg(not(feature = "test-hooks"))]
fn test_pause(_point: &str) {}

/// The test-only pause (see [`TEST_PAUSE_ENV`]): once per process, at
/// `point` when the variable names it.
#[cfg(feature = "test-hooks")]
fn test_pause(point: &str) {
    static DONE: AtomicBool = AtomicBool::new(false);
    if std::env::var(TEST_PAUSE_ENV).is_ok_and(|v| v == point)
        && !DONE.swap(true, Ordering::Relaxed)
    {
        tracing::warn!(
            point,
            "agent: test hook {TEST_PAUSE_ENV}: pausing inside a drain"
        );
        std::thread::sleep(Duration::from_secs(30));
    }
}

/// Runs the agent until `stop`: drains every `cfg.interim` (and early when
/// a counter map fills), then detaches and drains what is left.
pub fn run(
    cfg: &AgentConfig,
    sink: &mut dyn RecordSink,
    stop: &AtomicBool,
) -> Result<AgentStats, AgentError> {
    let mut agent = match cfg.mode {
        AgentMode::Nft => return run_nft(cfg, sink, stop),
        AgentMode::Bpf => Agent::start(cfg)?,
        AgentMode::Auto => match Agent::start(cfg) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "agent: eBPF unavailable; falling back to nftables and conntrack");
                return run_nft(cfg, sink, stop);
            }
        },
    };
    // A pinned map may hold what a previous agent counted after its last
    // drain: out now, before this agent's first interval.
    if cfg.pin_dir.is_some() {
        agent.drain(sink)?;
        agent.drain(sink)?;
    }
    let mut next = Instant::now() + cfg.interim;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50).min(cfg.interim));
        if agent.overflowed() || Instant::now() >= next {
            agent.drain(sink)?;
            next = Instant::now() + cfg.interim;
        }
    }
    agent.stop(sink)
}

/// The fallback's loop: a drain every `cfg.interim`, then the table goes.
fn run_nft(
    cfg: &AgentConfig,
    sink: &mut dyn RecordSink,
    stop: &AtomicBool,
) -> Result<AgentStats, AgentError> {
    let mut agent = nft::NftAgent::start()?;
    let mut next = Instant::now() + cfg.interim;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50).min(cfg.interim));
        if Instant::now() >= next {
            agent.drain(sink)?;
            next = Instant::now() + cfg.interim;
        }
    }
    agent.stop(sink)
}
