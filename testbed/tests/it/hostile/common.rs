//! What every attack of the suite shares: the daemon process under its caps,
//! the one-attack-at-a-time lock with a scratch directory, the attackers'
//! sockets, and the framing both protocols use (an 8-byte header with the
//! message type in byte 1 and the length in bytes 4..8).

use qosloop_testbed::harness::{free_port, require_binary, tail_of};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The address-space cap every daemon runs under (the 2 GiB).
const AS_CAP: u64 = 2 << 30;
/// Descriptors every daemon may hold (soft = hard: it cannot raise them).
const NOFILE_CAP: u32 = 1024;

/// One attack at a time (an async lock: it is held across awaits, and a
/// test that panics releases it).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------------------
// Processes

/// Where the daemon binaries are: `QOSLOOP_HOSTILE_BIN_DIR`, else next to
/// this test binary (cargo builds them side by side).
pub fn bin_dir() -> Result<PathBuf, String> {
    if let Some(d) = std::env::var_os("QOSLOOP_HOSTILE_BIN_DIR") {
        return Ok(PathBuf::from(d));
    }
    qosloop_testbed::procs::component_dir().map_err(|e| e.to_string())
}

fn prerequisites() -> Result<PathBuf, String> {
    require_binary("prlimit", "util-linux")?;
    bin_dir()
}

/// What one attack holds while it runs: the binaries, a scratch directory
/// and the lock that keeps the other attacks waiting. Fields drop in
/// order: the directory goes before the lock is released.
pub struct Bench {
    pub bin: PathBuf,
    pub dir: tempfile::TempDir,
    _one: tokio::sync::MutexGuard<'static, ()>,
}

/// The bench of one attack, or `None` (the test is skipped, saying why)
/// when `prlimit` or the binaries are missing.
pub async fn bench() -> Option<Bench> {
    let bin = qosloop_testbed::harness::prerequisite(prerequisites())?;
    let one = SERIAL.lock().await;
    Some(Bench {
        bin,
        dir: tempfile::tempdir().unwrap(),
        _one: one,
    })
}

/// A free port on 127.0.0.1.
pub fn loopback_addr() -> SocketAddr {
    SocketAddr::new(Ipv4Addr::LOCALHOST.into(), free_port().unwrap())
}

/// The SQLite database of `dir`, as `--db` takes it.
pub fn sqlite_url(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("flows.db").display())
}

/// The policies every policy server of the suite loads.
fn sample_policies() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../schema/ldap/sample-policy.ldif")
}

/// `qosloop-collector` flags: listen on `listen`, store in `db`, then `extra`.
pub fn collector_args(listen: String, db: &str, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--listen".to_owned(),
        listen,
        "--db".to_owned(),
        db.to_owned(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// `qosloop-policy-server` flags: the sample policies, the PDP on `pdp`,
/// the web API on `http`, then `extra`.
pub fn policy_server_args(db: &str, pdp: String, http: String, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--db".to_owned(),
        db.to_owned(),
        "--policies".to_owned(),
        sample_policies().display().to_string(),
        "--pdp-listen".to_owned(),
        pdp,
        "--http".to_owned(),
        http,
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// How many idle attack sockets this process can hold on each of `ports`
/// ports at once, up to `want`: the attacks hold over 2,000 sockets, so the
/// soft descriptor limit is raised to the hard one first (best effort);
/// under a lower limit the attack is scaled down, saying so (the
/// per-address limits are still exceeded many times over).
pub fn attack_sockets(want: usize, ports: usize) -> usize {
    let nofile = qosloop_schema::guard::raise_nofile_limit() as usize;
    let can = nofile.saturating_sub(256) / ports.max(1);
    if can < want {
        eprintln!(
            "this process may hold {nofile} descriptors: {can} idle sockets per port, not {want}"
        );
    }
    want.min(can)
}

/// A process's stdout and stderr, one after the other.
pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `bin args…` to its end (at most 20 s): (exit code, output).
pub fn run_to_end(bin: &Path, args: &[String]) -> (Option<i32>, String) {
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            let out = child.wait_with_output().unwrap();
            return (out.status.code(), output_text(&out));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    (None, "still running after 20 s".into())
}

/// A daemon logging to a file, killed and reaped on drop.
pub struct Daemon {
    pub name: &'static str,
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    /// `name` from `bin` under `prlimit` (the address-space and descriptor
    /// caps), logging to `log`.
    pub fn start(bin: &Path, name: &'static str, args: &[String], log: PathBuf) -> Daemon {
        // prlimit sets the limits and execs the daemon: same pid.
        let mut cmd = Command::new("prlimit");
        cmd.arg(format!("--as={AS_CAP}"))
            .arg(format!("--nofile={NOFILE_CAP}:{NOFILE_CAP}"))
            .arg("--")
            .arg(bin.join(name))
            .args(args);
        Daemon::spawn(cmd, name, log)
    }

    /// `cmd` with `RUST_LOG=info`, stdout and stderr to `log`.
    pub fn spawn(mut cmd: Command, name: &'static str, log: PathBuf) -> Daemon {
        let out = std::fs::File::create(&log).unwrap();
        let child = cmd
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Daemon { name, child, log }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines of the log, for a failure message.
    pub fn tail(&self) -> String {
        tail_of(&self.log, 20)
    }

    /// Panics with the log's tail when the process has exited.
    pub fn assert_alive(&mut self, after: &str) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "{} died ({status}) {after}; last lines of its log:\n{}",
                self.name,
                self.tail()
            );
        }
    }

    /// (VmRSS, VmHWM) in kB.
    fn memory_kb(&self) -> (u64, u64) {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    fn assert_within(&self, budget_kb: u64, after: &str) {
        let (rss, hwm) = self.memory_kb();
        eprintln!(
            "{} {after}: VmRSS {} MiB, VmHWM {} MiB (budget {} MiB)",
            self.name,
            rss / 1024,
            hwm / 1024,
            budget_kb / 1024
        );
        assert!(
            hwm <= budget_kb,
            "{} peaked at {} MiB resident {after}, over its budget of {} MiB",
            self.name,
            hwm / 1024,
            budget_kb / 1024
        );
    }

    /// Alive, and its peak resident memory within `budget_kb`.
    pub fn assert_bounded(&mut self, budget_kb: u64, after: &str) {
        self.assert_alive(after);
        self.assert_within(budget_kb, after);
    }

    /// The log without terminal colours.
    fn log_text(&self) -> String {
        let raw = std::fs::read_to_string(&self.log).unwrap_or_default();
        let mut out = String::with_capacity(raw.len());
        let mut chars = raw.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                // ESC [ parameters final-letter
                for d in chars.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    }

    pub fn log_size(&self) -> u64 {
        std::fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0)
    }

    /// Panics unless a line of the log contains every one of `words`.
    pub fn assert_logged(&self, words: &[&str], what: &str) {
        let text = self.log_text();
        assert!(
            text.lines().any(|l| words.iter().all(|w| l.contains(w))),
            "{} did not log {what} (a line with {words:?}); last lines:\n{}",
            self.name,
            self.tail()
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until something accepts connections on `addr` (from 127.0.0.1).
pub async fn wait_listening(d: &mut Daemon, addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        d.assert_alive("while starting");
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr)).await
        {
            drop(s);
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{} does not listen on {addr}:\n{}", d.name, d.tail());
}

// ---------------------------------------------------------------------------
// Attackers' sockets

/// 127.0.0.`n`: the attackers' addresses start at 127.0.0.2.
pub fn attacker(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
}

/// A TCP connection from `src` (any port) to `dst`, within 3 s.
pub async fn connect_from(src: IpAddr, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(src, 0))?;
    match tokio::time::timeout(Duration::from_secs(3), sock.connect(dst)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// `n` connections spread over the attacker addresses `first..first+addrs`,
/// opened concurrently; those that failed to connect are left out.
pub async fn open_many(n: usize, first: u8, addrs: u8, dst: SocketAddr) -> Vec<TcpStream> {
    let mut set = tokio::task::JoinSet::new();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let src = attacker(first + (i % usize::from(addrs)) as u8);
        set.spawn(connect_from(src, dst));
        // A bounded number of handshakes in flight.
        if set.len() >= 128 {
            if let Some(Ok(Ok(s))) = set.join_next().await {
                out.push(s);
            }
        }
    }
    while let Some(r) = set.join_next().await {
        if let Ok(Ok(s)) = r {
            out.push(s);
        }
    }
    out
}

/// How many of `socks` the peer has closed (EOF, reset) by now, without
/// waiting: a closed socket reads 0 bytes or an error at once.
pub async fn closed_count(socks: &mut [TcpStream]) -> usize {
    let mut closed = 0;
    for s in socks.iter_mut() {
        let mut b = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(1), s.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => closed += 1,
            _ => {}
        }
    }
    closed
}

/// Writes `bytes` unless the peer stops reading for 10 s or closes.
pub async fn send_bounded(s: &mut TcpStream, bytes: &[u8]) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(10), s.write_all(bytes)).await,
        Ok(Ok(()))
    )
}

/// One read of a CRANE or COPS message from a daemon.
pub enum Read {
    /// The message type (header byte 1) and the body (at most 1 MiB).
    Message(u8, Vec<u8>),
    /// The daemon closed the connection, or cut a message short.
    Closed,
    /// Nothing (more) came before the deadline.
    Quiet,
}

/// Reads one message (8-byte header, length in bytes 4..8) by `deadline`.
pub async fn read_message(s: &mut TcpStream, deadline: tokio::time::Instant) -> Read {
    let mut head = [0u8; 8];
    match tokio::time::timeout_at(deadline, s.read_exact(&mut head)).await {
        Err(_) => return Read::Quiet,
        Ok(Err(_)) => return Read::Closed,
        Ok(Ok(_)) => {}
    }
    let len = u32::from_be_bytes([head[4], head[5], head[6], head[7]]) as usize;
    let mut body = vec![0u8; len.saturating_sub(8).min(1 << 20)];
    match tokio::time::timeout_at(deadline, s.read_exact(&mut body)).await {
        Ok(Ok(_)) => Read::Message(head[1], body),
        _ => Read::Closed,
    }
}
