//! What the IPFIX integration tests share: a generated capture, the
//! collector run as its binary, child processes that die with the test,
//! and reading `flows` back.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child process killed (and reaped) when dropped, also on a panic.
#[derive(Debug)]
pub struct ChildGuard {
    pub child: Child,
    pub name: &'static str,
}

impl ChildGuard {
    pub fn spawn(name: &'static str, cmd: &mut Command, log: &Path) -> ChildGuard {
        let out = std::fs::File::create(log).unwrap();
        let err = out.try_clone().unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        ChildGuard { child, name }
    }

    /// SIGTERM, then waits up to `grace` before SIGKILL; returns whether it
    /// ended by itself.
    pub fn terminate(&mut self, grace: Duration) -> bool {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let end = Instant::now() + grace;
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }

    /// Waits for the process to exit by itself within `limit`.
    pub fn wait(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A UDP port free on loopback now.
pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The `qosloop-collector` binary cargo built ([`crate::component`]).
pub fn collector_bin() -> PathBuf {
    crate::component("qosloop-collector").unwrap_or_else(|e| panic!("{e}"))
}

/// Starts the collector with `args`, logging to `dir/name.log`.
pub fn start_collector(dir: &Path, name: &'static str, args: &[String]) -> ChildGuard {
    let mut cmd = Command::new(collector_bin());
    cmd.args(args);
    ChildGuard::spawn(name, &mut cmd, &dir.join(format!("{name}.log")))
}

/// Waits until `addr` (UDP) is bound by someone: sending to a closed port
/// gets ECONNREFUSED on a connected socket.
pub fn wait_udp_bound(addr: SocketAddr, limit: Duration) {
    let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
    probe.connect(addr).unwrap();
    probe
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let end = Instant::now() + limit;
    while Instant::now() < end {
        // An empty datagram: counted as a short header by the collector.
        let _ = probe.send(&[]);
        let mut b = [0u8; 1];
        match probe.recv(&mut b) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                std::thread::sleep(Duration::from_millis(50));
            }
            _ => return,
        }
    }
    panic!("nothing listens on udp {addr} after {limit:?}");
}

/// One stored flow as the comparison sees it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Row {
    pub proto: u8,
    pub src: String,
    pub dst: String,
    pub sport: u16,
    pub dport: u16,
    pub packets: u64,
    pub bytes: u64,
}

type FlowRow = (
    i64,
    String,
    String,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    Option<i64>,
);

/// Every row of `flows` in the SQLite file `db`.
pub fn sqlite_rows(db: &Path) -> Vec<(Row, i64, i64, Option<i64>)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let url = format!("sqlite://{}", db.display());
        let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
        let rows: Vec<FlowRow> =
            sqlx::query_as(
                "SELECT proto, src_addr, dst_addr, src_port, dst_port, packets, bytes, start_ns, end_ns, sampling_interval FROM flows",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
        pool.close().await;
        rows.into_iter()
            .map(|(p, s, d, sp, dp, pk, by, st, en, si)| {
                (
                    Row {
                        proto: p as u8,
                        src: s,
                        dst: d,
                        sport: sp as u16,
                        dport: dp as u16,
                        packets: pk as u64,
                        bytes: by as u64,
                    },
                    st,
                    en,
                    si,
                )
            })
            .collect()
    })
}

/// Runs one SQL query returning rows of i64/text pairs from SQLite.
pub fn sqlite_query<T>(db: &Path, sql: &str) -> Vec<T>
where
    T: for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow> + Send + Unpin,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display()))
            .await
            .unwrap();
        let rows = sqlx::query_as::<_, T>(sql).fetch_all(&pool).await.unwrap();
        pool.close().await;
        rows
    })
}

/// A classic pcap file (Ethernet) from frames and their times in ns.
pub fn write_pcap(path: &Path, frames: &[(u64, Vec<u8>)]) {
    let mut b = Vec::new();
    b.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    b.extend_from_slice(&2u16.to_le_bytes());
    b.extend_from_slice(&4u16.to_le_bytes());
    b.extend_from_slice(&0i32.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&65535u32.to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes());
    for (t, f) in frames {
        b.extend_from_slice(&((t / 1_000_000_000) as u32).to_le_bytes());
        b.extend_from_slice(&((t % 1_000_000_000 / 1000) as u32).to_le_bytes());
        b.extend_from_slice(&(f.len() as u32).to_le_bytes());
        b.extend_from_slice(&(f.len() as u32).to_le_bytes());
        b.extend_from_slice(f);
    }
    std::fs::write(path, b).unwrap();
}

fn checksum(b: &[u8]) -> u16 {
    let mut s: u32 = 0;
    for c in b.chunks(2) {
        let w = if c.len() == 2 {
            u32::from(u16::from_be_bytes([c[0], c[1]]))
        } else {
            u32::from(c[0]) << 8
        };
        s += w;
    }
    while s > 0xffff {
        s = (s >> 16) + (s & 0xffff);
    }
    !(s as u16)
}

fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An Ethernet frame of an IPv4 packet.
pub fn ipv4_frame(src: [u8; 4], dst: [u8; 4], proto: u8, tos: u8, l4: &[u8]) -> Vec<u8> {
    let mut h = vec![0x45, tos];
    h.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
    h.extend_from_slice(&[0, 1, 0x40, 0, 64, proto, 0, 0]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(l4);
    ethernet(0x0800, &h)
}

/// An Ethernet frame of an IPv6 packet.
pub fn ipv6_frame(src: [u8; 16], dst: [u8; 16], next: u8, l4: &[u8]) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    h.extend_from_slice(&[next, 64]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend_from_slice(l4);
    ethernet(0x86dd, &h)
}

pub fn tcp(sport: u16, dport: u16, flags: u8, payload: usize) -> Vec<u8> {
    let mut t = sport.to_be_bytes().to_vec();
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0x10, 0, 0, 0, 0, 0]);
    t.extend(std::iter::repeat_n(b'x', payload));
    t
}

pub fn udp(sport: u16, dport: u16, payload: usize) -> Vec<u8> {
    let mut u = sport.to_be_bytes().to_vec();
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend(std::iter::repeat_n(b'u', payload));
    u
}

pub fn icmp(kind: u8, code: u8, payload: usize) -> Vec<u8> {
    let mut i = vec![kind, code, 0, 0, 0, 1, 0, 1];
    i.extend(std::iter::repeat_n(b'i', payload));
    i
}

/// The interop capture: IPv4 TCP (some with DSCP EF), UDP and ICMP, IPv6
/// TCP, UDP and ICMPv6, flows of 1 to 40 packets, 1 ms apart.
pub fn interop_frames() -> Vec<(u64, Vec<u8>)> {
    let mut frames = Vec::new();
    let mut t = 1_700_000_000_000_000_000u64;
    for f in 0u16..60 {
        let a = [10, 1, (f / 8) as u8, 1 + (f % 8) as u8];
        let b = [10, 2, 0, 1 + (f % 5) as u8];
        let mut a6 = [0u8; 16];
        a6[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
        a6[15] = f as u8;
        let mut b6 = a6;
        b6[14] = 1;
        for i in 0..(1 + usize::from(f) % 40) {
            t += 1_000_000;
            let frame = match f % 6 {
                0 => ipv4_frame(
                    a,
                    b,
                    6,
                    if f % 12 == 0 { 0xb8 } else { 0 },
                    &tcp(20000 + f, 80, 0x18, 10 * i),
                ),
                1 => ipv4_frame(a, b, 17, 0, &udp(30000 + f, 53, 3 * i)),
                2 => ipv4_frame(a, b, 1, 0, &icmp(8, 0, 16 + i)),
                3 => ipv6_frame(a6, b6, 6, &tcp(40000 + f, 443, 0x10, i)),
                4 => ipv6_frame(a6, b6, 17, &udp(50000 + f, 123, 48)),
                _ => ipv6_frame(a6, b6, 58, &icmp(128, 0, 8 + i)),
            };
            frames.push((t, frame));
        }
    }
    frames
}

/// Builds IPFIX messages byte by byte.
#[derive(Default, Debug)]
pub struct Ipfix {
    sets: Vec<u8>,
}

impl Ipfix {
    pub fn set(mut self, id: u16, body: &[u8]) -> Self {
        self.sets.extend_from_slice(&id.to_be_bytes());
        self.sets
            .extend_from_slice(&((body.len() + 4) as u16).to_be_bytes());
        self.sets.extend_from_slice(body);
        self
    }
    pub fn message(&self, seq: u32, domain: u32) -> Vec<u8> {
        let mut m = vec![0, 10];
        m.extend_from_slice(&((self.sets.len() + 16) as u16).to_be_bytes());
        m.extend_from_slice(&1_700_000_000u32.to_be_bytes());
        m.extend_from_slice(&seq.to_be_bytes());
        m.extend_from_slice(&domain.to_be_bytes());
        m.extend_from_slice(&self.sets);
        m
    }
}

/// Template 256: source, destination, ports, protocol, packets (4 bytes),
/// bytes (8), flowStart/EndMilliseconds.
pub fn v4_template() -> Vec<u8> {
    let mut t = vec![1, 0, 0, 9];
    for (id, len) in [
        (8u16, 4u16),
        (12, 4),
        (7, 2),
        (11, 2),
        (4, 1),
        (2, 4),
        (1, 8),
        (152, 8),
        (153, 8),
    ] {
        t.extend_from_slice(&id.to_be_bytes());
        t.extend_from_slice(&len.to_be_bytes());
    }
    t
}

/// One record of [`v4_template`]: 10.0.0.1:`sport` → 10.0.0.2:80/TCP.
pub fn v4_record(sport: u16, packets: u32, bytes: u64) -> Vec<u8> {
    let mut r = vec![10, 0, 0, 1, 10, 0, 0, 2];
    r.extend_from_slice(&sport.to_be_bytes());
    r.extend_from_slice(&80u16.to_be_bytes());
    r.push(6);
    r.extend_from_slice(&packets.to_be_bytes());
    r.extend_from_slice(&bytes.to_be_bytes());
    r.extend_from_slice(&1_700_000_000_000u64.to_be_bytes());
    r.extend_from_slice(&1_700_000_000_250u64.to_be_bytes());
    r
}

/// Polls `sql` (one i64) on SQLite until it returns `want`, within `limit`.
pub fn wait_for_value(db: &Path, sql: &str, want: i64, limit: Duration) -> i64 {
    let end = Instant::now() + limit;
    let mut last = -1;
    while Instant::now() < end {
        if db.exists() {
            let rows: Vec<(i64,)> = sqlite_query(db, sql);
            last = rows.first().map_or(-1, |r| r.0);
            if last == want {
                return last;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    last
}
