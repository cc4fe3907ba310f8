//! Hostile peers against the real daemons (issue 11). Each test starts a
//! daemon binary of the workspace as a real process under a 2 GiB
//! address-space cap and 1,024 descriptors (`prlimit --as --nofile`), on
//! loopback, and replays one attack of the issue from 127.0.0.2 and up,
//! bounded in count and time. Then it checks that the daemon is still up and
//! answering, that its peak resident memory (VmHWM) stayed under a stated
//! budget, that a legitimate peer on 127.0.0.1 — the real `qosloop-meter`
//! exporting a capture, the real `qosloop-enforcer` in dry-run mode, an HTTP
//! client — gets its work done during and after the attack, and that the
//! daemon logged the refusal.
//!
//! Every process is killed and every socket closed when its handle drops,
//! also when an assertion fails half-way. The tests hold one lock, so the
//! daemons run one at a time (memory figures of one attack at a time, and a
//! 2-core machine).
//!
//! `QOSLOOP_HOSTILE_BIN_DIR` points the suite at other builds of the
//! binaries (to replay the attacks against an older commit).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use qosloop_schema::cops::{self, Handle, Message as Cops, PepHello, PepState};
use qosloop_schema::crane::{
    ByteOrder, CraneCodec, Data, Frame, Message, Start, TemplateSet, WireKey, WireTemplate,
    CAP_KEEPALIVE, DATA_FLAG_START,
};
use qosloop_schema::ie::{self, DataType};
use qosloop_schema::{EnforcementReport, ReportOutcome};
use qosloop_testbed::harness::{free_port, require_binary, tail_of};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The address-space cap every daemon runs under (the 2 GiB).
const AS_CAP: u64 = 2 << 30;
/// Descriptors every daemon may hold (soft = hard: it cannot raise them).
const NOFILE_CAP: u32 = 1024;
/// Peak resident memory the collector may reach under any one attack.
const COLLECTOR_BUDGET_KB: u64 = 768 * 1024;
/// Peak resident memory the policy server may reach under any one attack.
const POLICY_SERVER_BUDGET_KB: u64 = 256 * 1024;

/// One attack at a time (an async lock: it is held across awaits, and a
/// test that panics releases it).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------------------
// Processes

/// Where the daemon binaries are: `QOSLOOP_HOSTILE_BIN_DIR`, else next to
/// this test binary (cargo builds them side by side).
fn bin_dir() -> Result<PathBuf, String> {
    if let Some(d) = std::env::var_os("QOSLOOP_HOSTILE_BIN_DIR") {
        return Ok(PathBuf::from(d));
    }
    qosloop_testbed::procs::component_dir().map_err(|e| e.to_string())
}

/// How many idle attack sockets this process can hold on each of `ports`
/// ports at once, up to `want`: the attacks hold over 2,000 sockets, so the
/// soft descriptor limit is raised to the hard one first (best effort);
/// under a lower limit the attack is scaled down, saying so (the
/// per-address limits are still exceeded many times over).
fn attack_sockets(want: usize, ports: usize) -> usize {
    let nofile = qosloop_schema::guard::raise_nofile_limit() as usize;
    let can = nofile.saturating_sub(256) / ports.max(1);
    if can < want {
        eprintln!(
            "this process may hold {nofile} descriptors: {can} idle sockets per port, not {want}"
        );
    }
    want.min(can)
}

fn prerequisites() -> Result<PathBuf, String> {
    require_binary("prlimit", "util-linux")?;
    bin_dir()
}

/// A daemon under `prlimit`, killed and reaped on drop.
struct Daemon {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(bin: &Path, name: &'static str, args: &[String], log: PathBuf) -> Daemon {
        let out = std::fs::File::create(&log).unwrap();
        // prlimit sets the limits and execs the daemon: same pid.
        let child = Command::new("prlimit")
            .arg(format!("--as={AS_CAP}"))
            .arg(format!("--nofile={NOFILE_CAP}:{NOFILE_CAP}"))
            .arg("--")
            .arg(bin.join(name))
            .args(args)
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

    /// Panics with the log's tail when the process has exited.
    fn assert_alive(&mut self, after: &str) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "{} died ({status}) {after}; last lines of its log:\n{}",
                self.name,
                tail_of(&self.log, 20)
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

    fn log_size(&self) -> u64 {
        std::fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0)
    }

    /// Panics unless a line of the log contains every one of `words`.
    fn assert_logged(&self, words: &[&str], what: &str) {
        let text = self.log_text();
        assert!(
            text.lines().any(|l| words.iter().all(|w| l.contains(w))),
            "{} did not log {what} (a line with {words:?}); last lines:\n{}",
            self.name,
            tail_of(&self.log, 20)
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
async fn wait_listening(d: &mut Daemon, addr: SocketAddr) {
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
    panic!(
        "{} does not listen on {addr}:\n{}",
        d.name,
        tail_of(&d.log, 20)
    );
}

/// 127.0.0.`n`: the attackers' addresses start at 127.0.0.2.
fn attacker(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
}

/// A TCP connection from `src` (any port) to `dst`, within 3 s.
async fn connect_from(src: IpAddr, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(src, 0))?;
    match tokio::time::timeout(Duration::from_secs(3), sock.connect(dst)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// `n` connections spread over the attacker addresses `first..first+addrs`,
/// opened concurrently; those that failed to connect are left out.
async fn open_many(n: usize, first: u8, addrs: u8, dst: SocketAddr) -> Vec<TcpStream> {
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
async fn closed_count(socks: &mut [TcpStream]) -> usize {
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

// ---------------------------------------------------------------------------
// CRANE

fn crane_bytes(frame: &Frame) -> Vec<u8> {
    let mut codec = CraneCodec::with_max_message(64 << 20);
    let mut buf = Default::default();
    cops::Encoder::encode(&mut codec, frame, &mut buf).unwrap();
    let bytes: &[u8] = &buf;
    bytes.to_vec()
}

fn frame(message: Message) -> Vec<u8> {
    crane_bytes(&Frame {
        session: 1,
        message,
    })
}

fn start(name: &str) -> Vec<u8> {
    frame(Message::Start(Start {
        max_version: 1,
        capabilities: CAP_KEEPALIVE,
        boot_ns: 1,
        stream_id: 7,
        exporter: name.into(),
    }))
}

fn templates(config_id: u16, templates: Vec<WireTemplate>) -> Vec<u8> {
    frame(Message::TemplateData(TemplateSet {
        config_id,
        byte_order: ByteOrder::Big,
        templates,
    }))
}

fn final_templates(config_id: u16) -> Vec<u8> {
    frame(Message::FinalTemplateData { config_id })
}

fn data(seq: u32, count: u32, records: Vec<u8>) -> Vec<u8> {
    frame(Message::Data(Data {
        template_id: 256,
        config_id: 1,
        flags: if seq == 0 { DATA_FLAG_START } else { 0 },
        seq,
        count,
        records: records.into(),
    }))
}

fn key(ie: qosloop_schema::IeId, data_type: DataType, disabled: bool) -> WireKey {
    WireKey {
        ie,
        data_type,
        disabled,
    }
}

/// What the collector answered, by message type code, until it closed the
/// connection, sent an ERROR, or `limit` passed. ERROR texts are kept.
#[derive(Debug, Default)]
struct Answers {
    kinds: Vec<u8>,
    errors: Vec<String>,
    closed: bool,
}

const CRANE_ERROR: u8 = 0x23;
const CRANE_DATA_ACK: u8 = 0x21;

/// Reads CRANE frames from `s` until an ERROR, the end, or `limit`;
/// `stop_after` ends the read early once that many frames came.
async fn crane_answers(s: &mut TcpStream, limit: Duration, stop_after: usize) -> Answers {
    let mut a = Answers::default();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let mut head = [0u8; 8];
        match tokio::time::timeout_at(deadline, s.read_exact(&mut head)).await {
            Err(_) => return a,
            Ok(Err(_)) => {
                a.closed = true;
                return a;
            }
            Ok(Ok(_)) => {}
        }
        let len = u32::from_be_bytes([head[4], head[5], head[6], head[7]]) as usize;
        let mut body = vec![0u8; len.saturating_sub(8).min(1 << 20)];
        if tokio::time::timeout_at(deadline, s.read_exact(&mut body))
            .await
            .map(|r| r.is_err())
            .unwrap_or(true)
        {
            a.closed = true;
            return a;
        }
        a.kinds.push(head[1]);
        if head[1] == CRANE_ERROR {
            // time(8) code(2) length(2) text
            let text = body.get(12..).unwrap_or_default();
            a.errors.push(String::from_utf8_lossy(text).into_owned());
            return a;
        }
        if a.kinds.len() >= stop_after {
            return a;
        }
    }
}

/// Writes `bytes` unless the peer stops reading for 10 s or closes.
async fn send_bounded(s: &mut TcpStream, bytes: &[u8]) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(10), s.write_all(bytes)).await,
        Ok(Ok(()))
    )
}

/// START + one template + FINAL from `src`, answers read.
async fn negotiated(
    dst: SocketAddr,
    src: IpAddr,
    name: &str,
    template: WireTemplate,
) -> (TcpStream, Answers) {
    let mut s = connect_from(src, dst).await.unwrap();
    let mut msg = start(name);
    msg.extend(templates(1, vec![template]));
    msg.extend(final_templates(1));
    assert!(send_bounded(&mut s, &msg).await);
    let a = crane_answers(&mut s, Duration::from_secs(5), 3).await;
    (s, a)
}

/// A pcap of `flows` one-packet UDP flows (Ethernet, IPv4).
fn write_pcap(path: &Path, flows: u32) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for v in [0xa1b2_c3d4u32.to_le_bytes().to_vec(), vec![2, 0, 4, 0]] {
        f.write_all(&v).unwrap();
    }
    for v in [0u32, 0, 65535, 1] {
        f.write_all(&v.to_le_bytes()).unwrap();
    }
    for i in 0..flows {
        let mut pkt = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00];
        let mut ip = vec![0x45, 0, 0, 46, 0, 0, 0x40, 0, 64, 17, 0, 0];
        ip.extend_from_slice(&[10, 9, (i >> 8) as u8, i as u8]);
        ip.extend_from_slice(&[192, 0, 2, 9]);
        let mut sum: u32 = ip
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
        pkt.extend_from_slice(&ip);
        pkt.extend_from_slice(&(1024 + i as u16).to_be_bytes());
        pkt.extend_from_slice(&[0, 9, 0, 26, 0, 0]);
        pkt.extend_from_slice(&[0u8; 18]);
        let ts_us = u64::from(i) * 100;
        f.write_all(&(1_700_000_000 + (ts_us / 1_000_000) as u32).to_le_bytes())
            .unwrap();
        f.write_all(&((ts_us % 1_000_000) as u32).to_le_bytes())
            .unwrap();
        f.write_all(&(pkt.len() as u32).to_le_bytes()).unwrap();
        f.write_all(&(pkt.len() as u32).to_le_bytes()).unwrap();
        f.write_all(&pkt).unwrap();
    }
    f.flush().unwrap();
}

/// The collector under test, with a SQLite database in `dir`.
struct Collector {
    daemon: Daemon,
    addr: SocketAddr,
    dir: PathBuf,
    bin: PathBuf,
    runs: u32,
}

impl Collector {
    async fn start(bin: &Path, dir: &Path, extra: &[&str]) -> Collector {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port().unwrap())
            .parse()
            .unwrap();
        let mut args = vec![
            "--listen".to_owned(),
            addr.to_string(),
            "--db".to_owned(),
            format!("sqlite://{}", dir.join("flows.db").display()),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut daemon = Daemon::start(bin, "qosloop-collector", &args, dir.join("collector.log"));
        wait_listening(&mut daemon, addr).await;
        write_pcap(&dir.join("legit.pcap"), 300);
        Collector {
            daemon,
            addr,
            dir: dir.to_owned(),
            bin: bin.to_owned(),
            runs: 0,
        }
    }

    /// The real meter exports a 300-flow capture from 127.0.0.1; panics
    /// unless every record was acknowledged.
    async fn legitimate_export(&mut self, when: &str) {
        self.runs += 1;
        let spool = self.dir.join(format!("spool{}", self.runs));
        let run = tokio::process::Command::new(self.bin.join("qosloop-meter"))
            .arg("--pcap")
            .arg(self.dir.join("legit.pcap"))
            .arg("--export")
            .arg(format!("crane://{}", self.addr))
            .arg("--export-spool")
            .arg(&spool)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(120), run)
            .await
            .unwrap_or_else(|_| panic!("the legitimate meter did not end {when} (120 s)"))
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && text.contains("all acknowledged"),
            "the legitimate exporter did not get its records stored {when} ({}):\n{text}\ncollector:\n{}",
            out.status,
            tail_of(&self.daemon.log, 20)
        );
    }

    async fn sql_i64(&self, q: &str) -> i64 {
        let url = format!("sqlite://{}", self.dir.join("flows.db").display());
        let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
        let (n,): (i64,) = sqlx::query_as(q).fetch_one(&pool).await.unwrap();
        pool.close().await;
        n
    }

    async fn sql_text(&self, q: &str) -> String {
        let url = format!("sqlite://{}", self.dir.join("flows.db").display());
        let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
        let (s,): (String,) = sqlx::query_as(q).fetch_one(&pool).await.unwrap();
        pool.close().await;
        s
    }

    /// Alive, within budget, and a legitimate export goes through.
    async fn assert_healthy(&mut self, after: &str) {
        self.daemon.assert_alive(after);
        self.daemon.assert_within(COLLECTOR_BUDGET_KB, after);
        self.legitimate_export(after).await;
        self.daemon.assert_alive(after);
    }
}

fn collector_bin() -> Option<PathBuf> {
    qosloop_testbed::harness::prerequisite(prerequisites())
}

// ---------------------------------------------------------------------------
// Collector attacks

/// Issue 11, item 1: a template with no key (or only disabled keys), then
/// DATA with a record count of 0xFFFFFFFF and an empty body. The decoder
/// built an empty record per count without consuming a byte until the
/// allocation failed and the collector aborted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_survives_keyless_template_with_huge_record_count() {
    let Some(bin) = collector_bin() else { return };
    let _one = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = Collector::start(&bin, dir.path(), &[]).await;
    let keyless = WireTemplate {
        id: 256,
        keys: vec![],
    };
    let all_disabled = WireTemplate {
        id: 256,
        keys: vec![
            key(ie::PROTOCOL_IDENTIFIER.id, DataType::Unsigned8, true),
            key(ie::OCTET_DELTA_COUNT.id, DataType::Unsigned64, true),
        ],
    };
    for (n, t) in [keyless, all_disabled].into_iter().enumerate() {
        let (mut s, first) = negotiated(c.addr, attacker(2), &format!("hostile-{n}"), t).await;
        if !first.closed && first.errors.is_empty() {
            // The template got through: send the DATA.
            send_bounded(&mut s, &data(0, u32::MAX, vec![])).await;
            let a = crane_answers(&mut s, Duration::from_secs(5), 1).await;
            assert!(
                !a.kinds.contains(&CRANE_DATA_ACK),
                "0xFFFFFFFF empty records were acknowledged: {a:?}"
            );
        }
        // Give an abort the time to happen.
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.daemon
            .assert_alive("after a keyless template and 0xFFFFFFFF records");
    }
    c.daemon
        .assert_logged(&["127.0.0.2"], "the refused session");
    c.assert_healthy("after the keyless-template attack").await;
}

/// Issue 11, item 2: one 1-byte key and a 16 MiB DATA of 1-byte records
/// (a 168-byte record per wire byte: 2.8 GB), then four 4 MiB messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_bounds_memory_of_one_byte_records() {
    let Some(bin) = collector_bin() else { return };
    let _one = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = Collector::start(&bin, dir.path(), &[]).await;
    let tiny = || WireTemplate {
        id: 256,
        keys: vec![key(ie::PROTOCOL_IDENTIFIER.id, DataType::Unsigned8, false)],
    };
    // One message as large as the collector accepts: 16 MiB with its
    // 8-byte header and 16-byte DATA header.
    let big = 16 * 1024 * 1024 - 8 - 16;
    let (mut s, _) = negotiated(c.addr, attacker(2), "hostile-big", tiny()).await;
    send_bounded(&mut s, &data(0, big as u32, vec![6u8; big])).await;
    let a = crane_answers(&mut s, Duration::from_secs(20), 1).await;
    eprintln!("16 MiB of 1-byte records: {a:?}");
    drop(s);
    c.daemon.assert_alive("after 16 MiB of 1-byte records");
    c.daemon
        .assert_within(COLLECTOR_BUDGET_KB, "after 16 MiB of 1-byte records");

    let four = 4 * 1024 * 1024;
    let (mut s, _) = negotiated(c.addr, attacker(3), "hostile-four", tiny()).await;
    for seq in 0..4u32 {
        if !send_bounded(&mut s, &data(seq, four as u32, vec![17u8; four])).await {
            break;
        }
    }
    let a = crane_answers(&mut s, Duration::from_secs(30), 4).await;
    eprintln!("four 4 MiB messages of 1-byte records: {a:?}");
    drop(s);
    c.daemon
        .assert_alive("after four 4 MiB messages of 1-byte records");
    c.assert_healthy("after the 1-byte-record attack").await;
}

/// Issue 11, item 3: 8-byte headers announcing 16 MiB made the collector
/// reserve 16 MiB per connection; 114 of them aborted it under the cap.
/// Here 120 connections from four addresses (30 each, under the per-address
/// limit) hold such a header while a legitimate exporter works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_does_not_reserve_what_a_header_announces() {
    let Some(bin) = collector_bin() else { return };
    let _one = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = Collector::start(&bin, dir.path(), &[]).await;
    let mut header = [1u8, 0x20, 1, 0, 0, 0, 0, 0];
    header[4..].copy_from_slice(&(16u32 * 1024 * 1024).to_be_bytes());
    let mut socks = open_many(120, 2, 4, c.addr).await;
    let mut sent = 0;
    for s in socks.iter_mut() {
        if send_bounded(s, &header).await {
            sent += 1;
        }
    }
    eprintln!("{sent} of {} connections sent a 16 MiB header", socks.len());
    assert!(sent >= 114, "only {sent} headers sent");
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.daemon.assert_alive("with 120 headers announcing 16 MiB");
    c.daemon
        .assert_within(COLLECTOR_BUDGET_KB, "with 120 headers announcing 16 MiB");
    c.legitimate_export("while 120 connections announce 16 MiB")
        .await;
    drop(socks);
    c.assert_healthy("after the announced-length attack").await;
}

/// Issue 11, item 4: 1,100 idle connections (the collector has 1,024
/// descriptors) and exporters that send KEEPALIVE before START, which were
/// held forever. The connection limits refuse what is over them, the
/// accept loop survives running out of descriptors, the legitimate
/// exporter still gets in, and a peer that never starts is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_limits_idle_connections_and_closes_keepalive_before_start() {
    let Some(bin) = collector_bin() else { return };
    let _one = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = Collector::start(&bin, dir.path(), &[]).await;
    // From four addresses: the per-address limit refuses most.
    let mut idle = open_many(attack_sockets(1100, 1), 2, 4, c.addr).await;
    eprintln!("{} idle connections open", idle.len());
    // Four that keep the collector busy with KEEPALIVE and never START.
    let mut keepers = Vec::new();
    for _ in 0..4 {
        if let Ok(s) = connect_from(attacker(9), c.addr).await {
            keepers.push(s);
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.daemon.assert_alive("with 1,100 idle connections");
    c.legitimate_export("while 1,100 idle connections are open")
        .await;
    // KEEPALIVE every 500 ms for up to 60 s: the collector must close them.
    let deadline = Instant::now() + Duration::from_secs(60);
    let ka = frame(Message::Keepalive);
    let mut open = keepers.len();
    while open > 0 && Instant::now() < deadline {
        open = 0;
        for s in keepers.iter_mut() {
            let _ = s.write_all(&ka).await;
            let mut b = [0u8; 64];
            match tokio::time::timeout(Duration::from_millis(100), s.read(&mut b)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {}
                _ => open += 1,
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        open,
        0,
        "{open} of {} peers sending KEEPALIVE before START are still held after 60 s",
        keepers.len()
    );
    let refused = closed_count(&mut idle).await;
    eprintln!(
        "{refused} of {} idle connections closed by the collector",
        idle.len()
    );
    assert!(
        refused > 0,
        "no idle connection over the limits was refused"
    );
    // Peer-repeatable lines are throttled (one a second): the kinds are
    // logged, not every peer.
    c.daemon
        .assert_logged(&["no START within"], "a peer that never sent START");
    c.daemon.assert_logged(
        &["connection refused", "refused_per_peer="],
        "the connections over the per-address limit",
    );
    drop(idle);
    c.assert_healthy("after the idle-connection attack").await;
}

/// Issue 11, item 5: a START with the name of an exporter that is
/// connected overwrote its address and boot time. Now it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_refuses_a_forged_start_with_a_live_exporters_name() {
    let Some(bin) = collector_bin() else { return };
    let _one = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = Collector::start(&bin, dir.path(), &[]).await;
    let t = WireTemplate::from_template(&qosloop_schema::Template::flow_v4(256)).unwrap();
    let (mut real, a) = negotiated(c.addr, attacker(1), "edge-meter", t.clone()).await;
    assert!(a.errors.is_empty() && !a.closed, "{a:?}");
    let (mut forged, a) = negotiated(c.addr, attacker(2), "edge-meter", t).await;
    eprintln!("forged START answered: {a:?}");
    assert!(
        a.closed || !a.errors.is_empty(),
        "a second START with a connected exporter's name was accepted: {a:?}"
    );
    let address = c
        .sql_text("SELECT address FROM exporters WHERE name = 'edge-meter'")
        .await;
    assert!(
        address.starts_with("127.0.0.1:"),
        "the forged START overwrote the exporter's address: {address}"
    );
    // The real exporter's session is still served.
    assert!(send_bounded(&mut real, &frame(Message::Keepalive)).await);
    let a = crane_answers(&mut real, Duration::from_secs(5), 1).await;
    assert!(a.errors.is_empty() && !a.closed, "{a:?}");
    let _ = forged.shutdown().await;
    c.daemon
        .assert_logged(&["127.0.0.2", "edge-meter"], "the refused name");
    c.assert_healthy("after the forged START").await;
}

/// Issue 11, item 6: one TMPL_DATA of 65,535 templates added 65,535
/// template rows (262 KB with keyless templates; 1.3 MB with one key each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_bounds_templates_per_exporter() {
    let Some(bin) = collector_bin() else { return };
    let _one = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = Collector::start(&bin, dir.path(), &[]).await;
    for (n, keys) in [
        vec![],
        vec![key(ie::PROTOCOL_IDENTIFIER.id, DataType::Unsigned8, false)],
    ]
    .into_iter()
    .enumerate()
    {
        let set: Vec<WireTemplate> = (0..=u16::MAX - 1)
            .map(|id| WireTemplate {
                id,
                keys: keys.clone(),
            })
            .collect();
        let mut s = connect_from(attacker(2 + n as u8), c.addr).await.unwrap();
        let mut msg = start(&format!("hostile-templates-{n}"));
        msg.extend(templates(1, set));
        eprintln!("TMPL_DATA of 65,535 templates: {} bytes", msg.len());
        send_bounded(&mut s, &msg).await;
        let a = crane_answers(&mut s, Duration::from_secs(20), 2).await;
        eprintln!("answers: {:?}", a.kinds);
        c.daemon.assert_alive("after 65,535 templates");
    }
    let rows = c.sql_i64("SELECT count(*) FROM templates").await;
    eprintln!("{rows} template rows");
    assert!(
        rows <= 1024,
        "{rows} template rows from two peers' TMPL_DATA"
    );
    c.daemon
        .assert_logged(&["127.0.0.2"], "the refused templates");
    c.assert_healthy("after the template flood").await;
}

// ---------------------------------------------------------------------------
// Policy server (PDP + HTTP)

struct PolicyServer {
    daemon: Daemon,
    pdp: SocketAddr,
    http: SocketAddr,
    dir: PathBuf,
    bin: PathBuf,
}

const COPS_CAT: u8 = 7;
const COPS_CC: u8 = 8;

impl PolicyServer {
    async fn start(bin: &Path, dir: &Path) -> PolicyServer {
        let pdp: SocketAddr = format!("127.0.0.1:{}", free_port().unwrap())
            .parse()
            .unwrap();
        let http: SocketAddr = format!("127.0.0.1:{}", free_port().unwrap())
            .parse()
            .unwrap();
        let policies =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../schema/ldap/sample-policy.ldif");
        let args = vec![
            "--db".to_owned(),
            format!("sqlite://{}", dir.join("flows.db").display()),
            "--policies".to_owned(),
            policies.display().to_string(),
            "--pdp-listen".to_owned(),
            pdp.to_string(),
            "--http".to_owned(),
            http.to_string(),
        ];
        let mut daemon = Daemon::start(
            bin,
            "qosloop-policy-server",
            &args,
            dir.join("policy-server.log"),
        );
        wait_listening(&mut daemon, http).await;
        wait_listening(&mut daemon, pdp).await;
        PolicyServer {
            daemon,
            pdp,
            http,
            dir: dir.to_owned(),
            bin: bin.to_owned(),
        }
    }

    /// GET `path` from 127.0.0.1: (status, body).
    async fn get(&self, path: &str) -> Option<(u16, String)> {
        let mut s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(self.http))
            .await
            .ok()?
            .ok()?;
        let req = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut out = Vec::new();
        // Read at most 64 MiB, for at most 10 s.
        let read = async {
            let mut chunk = vec![0u8; 64 * 1024];
            while out.len() < 64 << 20 {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => out.extend_from_slice(&chunk[..n]),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .ok()?;
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text.split(' ').nth(1)?.parse().ok()?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Some((status, body))
    }

    /// The counters of `/api/status` (`{"pdp": {…}, "http": {…}, …}`).
    async fn status(&self) -> serde_json::Value {
        match self.get("/api/status").await {
            Some((200, body)) => serde_json::from_str(&body).unwrap_or_default(),
            other => panic!(
                "/api/status did not answer: {other:?}\n{}",
                tail_of(&self.daemon.log, 20)
            ),
        }
    }

    /// The counter at `path` ("pdp.refused_pep_id_in_use"), 0 when absent.
    async fn counter(&self, path: &str) -> u64 {
        let status = self.status().await;
        let mut v = &status;
        for k in path.split('.') {
            v = &v[k];
        }
        v.as_u64().unwrap_or(0)
    }

    /// The API answers 200 on `/api/enforcers`; the body.
    async fn assert_api_answers(&self, when: &str) -> String {
        match self.get("/api/enforcers").await {
            Some((200, body)) => body,
            other => panic!(
                "the web API did not answer {when}: {other:?}\n{}",
                tail_of(&self.daemon.log, 20)
            ),
        }
    }

    /// The real enforcer (dry run) named `name`, connected from 127.0.0.1.
    fn enforcer(&self, name: &str) -> Daemon {
        let args: Vec<String> = [
            "--dry-run",
            "--interface",
            name,
            "--roles",
            "edge",
            "--capacity",
            "10mbit",
            "--pdp",
            &self.pdp.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let out = std::fs::File::create(self.dir.join(format!("{name}.log"))).unwrap();
        let child = Command::new(self.bin.join("qosloop-enforcer"))
            .args(&args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Daemon {
            name: "qosloop-enforcer",
            child,
            log: self.dir.join(format!("{name}.log")),
        }
    }

    /// Waits until `/api/enforcers` shows the enforcer whose PEPID contains
    /// `name` (the enforcer's is `qosloop-enforcer/INTERFACE/PID`) in
    /// `state`; its entry.
    async fn wait_enforcer(&self, name: &str, state: &str, when: &str) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Some((200, body)) = self.get("/api/enforcers").await {
                if let Ok(serde_json::Value::Array(v)) = serde_json::from_str(&body) {
                    let named = |e: &serde_json::Value| {
                        e["name"].as_str().is_some_and(|n| n.contains(name))
                    };
                    if let Some(e) = v.into_iter().find(named) {
                        if e["state"] == state {
                            return e;
                        }
                        last = e.to_string();
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!(
            "enforcer {name} is not {state} {when}: {last}\n{}",
            tail_of(&self.daemon.log, 20)
        );
    }

    fn assert_healthy(&mut self, after: &str) {
        self.daemon.assert_alive(after);
        self.daemon.assert_within(POLICY_SERVER_BUDGET_KB, after);
    }
}

fn cops_bytes(m: &Cops) -> Vec<u8> {
    let mut codec = cops::CopsCodec::new(1 << 20);
    let mut buf = Default::default();
    cops::Encoder::encode(&mut codec, m.clone(), &mut buf).unwrap();
    let bytes: &[u8] = &buf;
    bytes.to_vec()
}

/// COPS op codes of what the PDP sends, until it closes, a CC, `limit`, or
/// `stop_after` messages.
async fn cops_answers(s: &mut TcpStream, limit: Duration, stop_after: usize) -> (Vec<u8>, bool) {
    let mut ops = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let mut head = [0u8; 8];
        match tokio::time::timeout_at(deadline, s.read_exact(&mut head)).await {
            Err(_) => return (ops, false),
            Ok(Err(_)) => return (ops, true),
            Ok(Ok(_)) => {}
        }
        let len = u32::from_be_bytes([head[4], head[5], head[6], head[7]]) as usize;
        let mut body = vec![0u8; len.saturating_sub(8).min(1 << 20)];
        if tokio::time::timeout_at(deadline, s.read_exact(&mut body))
            .await
            .map(|r| r.is_err())
            .unwrap_or(true)
        {
            return (ops, true);
        }
        ops.push(head[1]);
        if head[1] == COPS_CC || ops.len() >= stop_after {
            return (ops, false);
        }
    }
}

fn opn(name: &str) -> Vec<u8> {
    cops_bytes(&Cops::opn(
        name,
        &PepHello {
            roles: vec!["edge".into()],
            interface: Some(name.chars().take(15).collect()),
            direction: None,
            software: "hostile".into(),
        },
    ))
}

fn policy_server_bin() -> Option<PathBuf> {
    qosloop_testbed::harness::prerequisite(prerequisites())
}

/// Issue 11, item 4 on the policy server: 1,100 idle sockets on the HTTP
/// port and 1,100 on the PDP port (1,024 descriptors) left the API
/// answering nothing and the PDP accepting no enforcer; a PEP that stops
/// reading was never closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_server_limits_idle_sockets_and_closes_a_pep_that_stops_reading() {
    let Some(bin) = policy_server_bin() else {
        return;
    };
    let _one = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut ps = PolicyServer::start(&bin, dir.path()).await;
    let n = attack_sockets(1100, 2);
    let idle_http = open_many(n, 2, 4, ps.http).await;
    let idle_pdp = open_many(n, 6, 4, ps.pdp).await;
    eprintln!(
        "{} idle HTTP and {} idle PDP connections open",
        idle_http.len(),
        idle_pdp.len()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    ps.daemon.assert_alive("with 2,200 idle connections");
    ps.assert_api_answers("while 2,200 idle connections are open")
        .await;
    let mut enforcer = ps.enforcer("qhostile0");
    ps.wait_enforcer(
        "qhostile0",
        "connected",
        "while 2,200 idle connections are open",
    )
    .await;
    enforcer.assert_alive("connected to the PDP under attack");

    // A PEP that opens, then sends KA after KA and never reads the echoes,
    // with a small receive buffer: the PDP's writes block; it must close it.
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.bind(SocketAddr::new(attacker(12), 0)).unwrap();
    let mut deaf = sock.connect(ps.pdp).await.unwrap();
    assert!(send_bounded(&mut deaf, &opn("deaf-pep")).await);
    let ka = cops_bytes(&Cops::ka());
    let burst: Vec<u8> = ka.iter().copied().cycle().take(ka.len() * 4096).collect();
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut closed = false;
    while Instant::now() < deadline {
        if let Ok(Err(_)) =
            tokio::time::timeout(Duration::from_secs(1), deaf.write_all(&burst)).await
        {
            closed = true;
        }
        if closed || ps.counter("pdp.write_timeouts").await > 0 {
            closed = true;
            break;
        }
    }
    assert!(
        closed,
        "a PEP that stopped reading was still served after 90 s\n{}",
        tail_of(&ps.daemon.log, 20)
    );
    let status = ps.status().await;
    eprintln!("counters after the attack: {status}");
    assert!(
        status["pdp"]["write_timeouts"].as_u64() >= Some(1),
        "the deaf PEP's write timeout is not counted: {status}"
    );
    for port in ["http", "pdp"] {
        assert!(
            status[port]["refused_limit_per_peer"].as_u64() > Some(0),
            "no {port} connection over the per-address limit was counted: {status}"
        );
    }
    drop(deaf);
    ps.assert_healthy("after the idle-socket and deaf-PEP attacks");
    drop(idle_http);
    drop(idle_pdp);
    ps.assert_api_answers("after the idle-socket attack").await;
    ps.wait_enforcer("qhostile0", "connected", "after the idle-socket attack")
        .await;
    enforcer.assert_alive("after the attack");
}

/// Issue 11, item 5 on the PDP: a second OPN with a connected enforcer's
/// PEPID overwrote its state ("disconnected" while connected), and an RPT
/// flood lost real reports and the Disconnected event, silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pdp_refuses_a_second_opn_for_a_connected_pep_and_counts_a_report_flood() {
    let Some(bin) = policy_server_bin() else {
        return;
    };
    let _one = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut ps = PolicyServer::start(&bin, dir.path()).await;
    let mut enforcer = ps.enforcer("qhostile1");
    let real = ps
        .wait_enforcer("qhostile1", "connected", "before the attack")
        .await;
    eprintln!("real enforcer: {real}");

    let pep_id = real["name"].as_str().unwrap().to_owned();
    // Refusals are logged at most once a second: let the one of the
    // readiness probe's connection ("closed before OPN") pass.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut forged = connect_from(attacker(2), ps.pdp).await.unwrap();
    assert!(send_bounded(&mut forged, &opn(&pep_id)).await);
    let (ops, closed) = cops_answers(&mut forged, Duration::from_secs(5), 2).await;
    eprintln!("forged OPN answered {ops:?}, closed {closed}");
    assert!(
        ops.first() == Some(&COPS_CC) || (closed && !ops.contains(&COPS_CAT)),
        "a second OPN with a connected PEP's name was accepted: {ops:?}"
    );
    drop(forged);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = ps
        .wait_enforcer("qhostile1", "connected", "after the forged OPN")
        .await;
    assert_eq!(
        after["address"], real["address"],
        "the forged OPN overwrote the enforcer's address"
    );
    ps.daemon
        .assert_logged(&["127.0.0.2", "qhostile1", "in use"], "the refused OPN");
    assert!(ps.counter("pdp.refused_pep_id_in_use").await >= 1);

    // A PEP of its own floods RPTs: 20,000 in at most 20 s.
    let mut flood = connect_from(attacker(3), ps.pdp).await.unwrap();
    assert!(send_bounded(&mut flood, &opn("flooder")).await);
    let (ops, _) = cops_answers(&mut flood, Duration::from_secs(5), 2).await;
    assert_eq!(ops, [COPS_CAT, 5], "OPN → CAT + SSQ");
    let h = Handle::from_u32(1);
    let mut msg = cops_bytes(&Cops::req(
        h.clone(),
        &PepState {
            roles: vec!["edge".into()],
            installed: vec![],
        },
    ));
    msg.extend(cops_bytes(&Cops::ssc()));
    assert!(send_bounded(&mut flood, &msg).await);
    let report = |i: u64| EnforcementReport {
        decision_id: i,
        version: 1,
        outcome: ReportOutcome::Installed,
        reconfig_ns: 1,
        at_ns: 1,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut sent = 0u64;
    while sent < 20_000 && Instant::now() < deadline {
        let batch: Vec<u8> = (sent..sent + 500)
            .flat_map(|i| cops_bytes(&Cops::rpt(h.clone(), &report(i))))
            .collect();
        if !send_bounded(&mut flood, &batch).await {
            break;
        }
        sent += 500;
    }
    eprintln!("{sent} RPTs sent");
    // Every report is counted: received (and stored or, past the queue,
    // dropped and counted as such).
    let deadline = Instant::now() + Duration::from_secs(30);
    while ps.counter("pdp.reports").await < sent && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(flood);
    let status = ps.status().await;
    eprintln!("counters after the RPT flood: {status}");
    // The real enforcer's own reports count too.
    assert!(
        status["pdp"]["reports"].as_u64().unwrap_or(0) >= sent,
        "of {sent} RPTs, reports went uncounted: {status}"
    );
    ps.assert_healthy("after the RPT flood");
    ps.assert_api_answers("after the RPT flood").await;
    // The real enforcer's end is recorded, flood or not.
    let _ = enforcer.child.kill();
    ps.wait_enforcer("qhostile1", "disconnected", "after it was killed")
        .await;
    let _ = enforcer.child.wait();
}

/// Issue 11, item 6 on the PDP: 500 OPNs with 60 KB PEPIDs made
/// `/api/enforcers` 30.8 MB per GET and wrote 60 MB of log in 0.2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pdp_bounds_pep_identifiers_and_their_log() {
    let Some(bin) = policy_server_bin() else {
        return;
    };
    let _one = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut ps = PolicyServer::start(&bin, dir.path()).await;
    let log_before = ps.daemon.log_size();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..500u32 {
        let pdp = ps.pdp;
        set.spawn(async move {
            let name = format!("{i:05}{}", "x".repeat(60_000));
            let Ok(mut s) = connect_from(attacker(2 + (i % 20) as u8), pdp).await else {
                return;
            };
            if send_bounded(&mut s, &opn(&name)).await {
                let _ = cops_answers(&mut s, Duration::from_secs(5), 2).await;
            }
        });
        if set.len() >= 50 {
            set.join_next().await;
        }
    }
    while set.join_next().await.is_some() {}
    ps.daemon.assert_alive("after 500 OPNs with 60 KB PEPIDs");
    let body = ps
        .assert_api_answers("after 500 OPNs with 60 KB PEPIDs")
        .await;
    eprintln!("/api/enforcers: {} bytes", body.len());
    assert!(
        body.len() < 1 << 20,
        "/api/enforcers is {} bytes after 500 OPNs with 60 KB PEPIDs",
        body.len()
    );
    let grown = ps.daemon.log_size() - log_before;
    eprintln!("log grew by {grown} bytes");
    assert!(
        grown < 4 << 20,
        "500 OPNs with 60 KB PEPIDs wrote {grown} bytes of log"
    );
    let refused = ps.counter("pdp.refused").await
        + ps.counter("pdp.refused_limit_per_peer").await
        + ps.counter("pdp.refused_limit_total").await;
    eprintln!("{refused} long PEPIDs refused (at OPN or by the connection limits)");
    assert!(
        refused >= 500,
        "only {refused} of 500 long PEPIDs were refused and counted"
    );
    ps.assert_healthy("after 500 OPNs with 60 KB PEPIDs");
    let _enforcer = ps.enforcer("qhostile2");
    ps.wait_enforcer("qhostile2", "connected", "after the long-PEPID attack")
        .await;
}

// ---------------------------------------------------------------------------
// Who can reach a port

/// Runs `bin args…` to its end (at most 20 s): (exit code, output).
fn run_to_end(bin: &Path, args: &[String]) -> (Option<i32>, String) {
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
            return (
                out.status.code(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    (None, "still running after 20 s".into())
}

/// Issue 11, item 5: the PDP listened on 0.0.0.0 by default, and any
/// listener could be opened beyond loopback without TLS. Now that is a
/// configuration error (exit 64, naming the address and the flag) unless
/// the listener has mutual TLS or the operator says
/// `--allow-insecure-remote`, which is logged at WARN.
#[test]
fn listeners_beyond_loopback_need_mutual_tls_or_the_explicit_opt_in() {
    let Some(bin) = qosloop_testbed::harness::prerequisite(bin_dir()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("flows.db").display());
    let any = |p: u16| format!("0.0.0.0:{p}");
    let policies = Path::new(env!("CARGO_MANIFEST_DIR")).join("../schema/ldap/sample-policy.ldif");
    let collector = |extra: &[&str]| {
        let mut a = vec![
            "--listen".to_owned(),
            any(free_port().unwrap()),
            "--db".to_owned(),
            db.clone(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let policy_server = |pdp: String, http: String, extra: &[&str]| {
        let mut a = vec![
            "--db".to_owned(),
            db.clone(),
            "--policies".to_owned(),
            policies.display().to_string(),
            "--pdp-listen".to_owned(),
            pdp,
            "--http".to_owned(),
            http,
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let loopback = |p: u16| format!("127.0.0.1:{p}");
    for (name, args) in [
        ("qosloop-collector", collector(&[])),
        (
            "qosloop-policy-server",
            policy_server(
                any(free_port().unwrap()),
                loopback(free_port().unwrap()),
                &[],
            ),
        ),
        (
            "qosloop-policy-server",
            policy_server(
                loopback(free_port().unwrap()),
                any(free_port().unwrap()),
                &[],
            ),
        ),
    ] {
        let (code, out) = run_to_end(&bin.join(name), &args);
        assert_eq!(code, Some(64), "{name} {args:?} started:\n{out}");
        assert!(
            out.contains("0.0.0.0") && out.contains("--allow-insecure-remote"),
            "{name}'s refusal names neither the address nor the flag:\n{out}"
        );
    }
    // With the opt-in they start, and say so at WARN.
    let opt_in = ["--allow-insecure-remote"];
    let c = collector(&opt_in);
    let addr: SocketAddr = c[1].replace("0.0.0.0", "127.0.0.1").parse().unwrap();
    let mut d = Daemon::start(&bin, "qosloop-collector", &c, dir.path().join("c.log"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(wait_listening(&mut d, addr));
    d.assert_logged(
        &["WARN", "beyond loopback without mutual TLS"],
        "the opt-in",
    );
    drop(d);
    let (pdp, http) = (free_port().unwrap(), free_port().unwrap());
    let args = policy_server(any(pdp), any(http), &opt_in);
    let mut d = Daemon::start(
        &bin,
        "qosloop-policy-server",
        &args,
        dir.path().join("ps.log"),
    );
    rt.block_on(wait_listening(&mut d, loopback(http).parse().unwrap()));
    rt.block_on(wait_listening(&mut d, loopback(pdp).parse().unwrap()));
    d.assert_logged(
        &["WARN", "beyond loopback without mutual TLS"],
        "the opt-in",
    );
}
