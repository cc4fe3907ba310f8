//! Traffic of local users for per-user tests: the test binary run again
//! as a user (`setpriv`) inside a namespace to play a role, a paced UDP
//! sender and a receiver for IPv4 and IPv6 that keeps every datagram's
//! kernel receive time, and the rate of a steady stretch (a figure to
//! print, not to assert).
//!
//! A sender ends its stream with an end marker that says how many
//! datagrams it sent ([`send_end`]); the receiver stops once all of them
//! are accounted for — received, or dropped by its own socket because its
//! thread ran late (the kernel counts those: [`Received::socket_drops`]) —
//! or, when some never come (a limit dropped them on the way), once
//! nothing more came for a while after the marker. A receiver never stops
//! early because a busy host held the sender back.

use crate::harness::Netns;
use crate::inprofile::Arrival;
use crate::traffic::{kernel_time, wait_for_kernel_timestamps};
use nix::sys::socket::{self, MsgFlags};
use std::io::IoSliceMut;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd as _;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The UDP payload of every datagram the sender sends.
pub const PAYLOAD: usize = 1000;

/// The start of an end marker: `END <datagrams sent>`.
const END: &str = "END ";

/// How long a receiver that has the end marker but not every datagram it
/// announces waits for more before it stops (the rest was dropped on the
/// way). Only a run that loses datagrams waits it out.
const QUIET_AFTER_END: Duration = Duration::from_secs(2);

/// The bytes of a packet as the kernel's limits count them (the IP
/// packet): the UDP payload and the IP and UDP headers.
pub fn ip_bytes(payload: usize, v6: bool) -> u64 {
    (payload + if v6 { 48 } else { 28 }) as u64
}

/// Sends [`PAYLOAD`]-byte datagrams from `sock` to `dst` at `kbps` (of IP
/// bytes) for `secs` seconds: the count sent and the sends refused (a
/// packet the output path drops fails its `send` with EPERM). A sender
/// that falls behind (a shaped socket blocks) sends at once what is due,
/// never beyond the deadline.
pub fn paced_send(sock: &UdpSocket, dst: SocketAddr, kbps: u64, secs: u64) -> (u64, u64) {
    paced_send_until(
        sock,
        dst,
        kbps,
        &AtomicBool::new(false),
        Duration::from_secs(secs),
    )
}

/// [`paced_send`] until `stop` is set, for at most `max`.
pub fn paced_send_until(
    sock: &UdpSocket,
    dst: SocketAddr,
    kbps: u64,
    stop: &AtomicBool,
    max: Duration,
) -> (u64, u64) {
    let per_packet = ip_bytes(PAYLOAD, dst.is_ipv6()) * 8;
    let interval = Duration::from_secs_f64(per_packet as f64 / (kbps.max(1) as f64 * 1000.0));
    let buf = vec![0x5a_u8; PAYLOAD];
    let start = Instant::now();
    let end = start + max;
    let (mut sent, mut refused) = (0u64, 0u64);
    let mut next = start;
    while Instant::now() < end && !stop.load(Ordering::Relaxed) {
        match sock.send_to(&buf, dst) {
            Ok(_) => sent += 1,
            Err(_) => refused += 1,
        }
        next += interval;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    (sent, refused)
}

/// Ends a stream of `sent` datagrams from `sock` to `dst`: the end marker,
/// three times 100 ms apart (a marker is a datagram, and the first may
/// meet a full queue or an empty token bucket).
pub fn send_end(sock: &UdpSocket, dst: SocketAddr, sent: u64) {
    let marker = format!("{END}{sent}");
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(100));
        let _ = sock.send_to(marker.as_bytes(), dst);
    }
}

/// What a receiver got.
#[derive(Clone, Debug, Default)]
pub struct Received {
    /// When the first datagram came (ms since the Unix epoch).
    pub first_ms: u64,
    /// IP bytes per second since the first datagram, as the receiver's
    /// thread read them (a figure for humans).
    pub seconds: Vec<u64>,
    /// Every datagram's kernel receive time (`SO_TIMESTAMPNS`, ns since
    /// the Unix epoch) and IP length, in order.
    pub arrivals: Vec<Arrival>,
    /// Datagrams the receiving socket itself dropped (its buffer was full
    /// because the receiver ran late), as the kernel counts them.
    pub socket_drops: u64,
    /// What the sender's end marker said it sent, if a marker came.
    pub announced: Option<u64>,
}

impl Received {
    /// Datagrams received.
    pub fn packets(&self) -> u64 {
        self.arrivals.len() as u64
    }

    /// IP bytes received.
    pub fn bytes(&self) -> u64 {
        self.arrivals.iter().map(|a| u64::from(a.bytes)).sum()
    }

    /// The lines a user child prints ([`play_role`]) for [`child_received`].
    fn lines(&self) -> String {
        let list = |v: &mut dyn Iterator<Item = u64>| {
            v.map(|n| n.to_string()).collect::<Vec<_>>().join(" ")
        };
        let bytes = self.arrivals.first().map_or(0, |a| u64::from(a.bytes));
        let mut out = format!(
            "RECEIVED {} {}\nARRIVALS {bytes} {}\nDROPS {}\n",
            self.first_ms,
            list(&mut self.seconds.iter().copied()),
            list(&mut self.arrivals.iter().map(|a| a.at_ns)),
            self.socket_drops
        );
        if let Some(n) = self.announced {
            out.push_str(&format!("{END}{n}\n"));
        }
        out
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Asks for kernel receive timestamps on `sock` and waits until the
/// kernel stamps packets on arrival ([`wait_for_kernel_timestamps`]):
/// before the first datagram is asked for.
pub fn stamp_on_arrival(sock: &UdpSocket) -> Result<(), String> {
    socket::setsockopt(sock, socket::sockopt::ReceiveTimestampns, &true)
        .map_err(|e| format!("asking for receive timestamps: {e}"))?;
    wait_for_kernel_timestamps().map_err(|e| e.to_string())
}

/// Receives [`PAYLOAD`]-byte datagrams and the sender's end marker on
/// `sock` until every datagram the marker announces is accounted for
/// (received or dropped by this socket), or nothing came for
/// [`QUIET_AFTER_END`] after the marker, or `limit` passed; other
/// datagrams are ignored. The socket's buffer is made as large as the
/// caller may (root: 16 MiB). Call [`stamp_on_arrival`] on it before
/// anything is sent to it.
pub fn receive(sock: &UdpSocket, limit: Duration) -> Received {
    const RCVBUF: usize = 16 << 20;
    let _ = socket::setsockopt(sock, socket::sockopt::RcvBufForce, &RCVBUF)
        .or_else(|_| socket::setsockopt(sock, socket::sockopt::RcvBuf, &RCVBUF));
    let _ = sock.set_read_timeout(Some(Duration::from_millis(100)));
    let v6 = sock.local_addr().is_ok_and(|a| a.is_ipv6());
    let mut buf = vec![0u8; 65_536];
    let mut cmsg = nix::cmsg_space!(nix::sys::time::TimeSpec);
    let mut got = Received::default();
    let mut first: Option<Instant> = None;
    let mut last = Instant::now();
    let give_up = Instant::now() + limit;
    while Instant::now() < give_up {
        if let Some(n) = got.announced {
            got.socket_drops = socket_drops(sock).unwrap_or(got.socket_drops);
            if got.packets() + got.socket_drops >= n || last.elapsed() >= QUIET_AFTER_END {
                break;
            }
        }
        let mut iov = [IoSliceMut::new(&mut buf)];
        let Ok(msg) = socket::recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::empty(),
        ) else {
            continue;
        };
        let (n, at_ns) = (msg.bytes, kernel_time(&msg).unwrap_or_else(now_ns));
        last = Instant::now();
        if n != PAYLOAD {
            if let Some(sent) = std::str::from_utf8(&buf[..n])
                .ok()
                .and_then(|m| m.strip_prefix(END)?.parse().ok())
            {
                got.announced = Some(sent);
            }
            continue;
        }
        let t0 = *first.get_or_insert_with(|| {
            got.first_ms = now_ms();
            last
        });
        let s = last.duration_since(t0).as_secs() as usize;
        if got.seconds.len() <= s {
            got.seconds.resize(s + 1, 0);
        }
        got.seconds[s] += ip_bytes(n, v6);
        got.arrivals.push(Arrival {
            at_ns,
            bytes: ip_bytes(n, v6) as u32,
        });
    }
    got.socket_drops = socket_drops(sock).unwrap_or(got.socket_drops);
    got
}

/// What the kernel counts as dropped by `sock` (the last column of its
/// line in `/proc/net/udp` or `udp6`, found by the socket's inode).
fn socket_drops(sock: &UdpSocket) -> Option<u64> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", sock.as_raw_fd())).ok()?;
    let inode = link
        .to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .to_owned();
    ["udp", "udp6"].iter().find_map(|table| {
        let text = std::fs::read_to_string(format!("/proc/thread-self/net/{table}")).ok()?;
        udp_drops(&text, &inode)
    })
}

/// The drops of the socket with `inode` in a `/proc/net/udp` text.
fn udp_drops(text: &str, inode: &str) -> Option<u64> {
    text.lines().skip(1).find_map(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        (cols.get(9) == Some(&inode)).then(|| cols.last()?.parse().ok())?
    })
}

/// Average kbit/s of `seconds[from..]` without the last (partial) second.
/// `None` when fewer than three seconds are left.
pub fn kbps_from(seconds: &[u64], from: usize) -> Option<f64> {
    let end = seconds.len().checked_sub(1)?;
    let steady = seconds.get(from..end)?;
    (steady.len() >= 3)
        .then(|| steady.iter().sum::<u64>() as f64 * 8.0 / 1000.0 / steady.len() as f64)
}

/// The environment variable that gives a re-run test binary its role.
pub const ROLE_ENV: &str = "QOSLOOP_USER_ROLE";

/// The running test binary started again in `ns` under `setpriv` as
/// `uid`, running only its test `child_test` (its full name in the binary,
/// `module::test`) with [`ROLE_ENV`] = `role`
/// (so its sockets belong to the user, as if the user's own program used
/// them). Its stdout is piped: read it with [`child_numbers`].
pub fn as_user(ns: &Netns, uid: u32, child_test: &str, role: &str) -> std::io::Result<Child> {
    let exe = std::env::current_exe()?;
    Command::new("ip")
        .args(["netns", "exec", ns.name(), "setpriv"])
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .arg("--clear-groups")
        .arg(exe)
        .args(["--exact", child_test, "--nocapture", "--test-threads=1"])
        .env(ROLE_ENV, role)
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
}

/// Plays a role given by [`as_user`] (call it from the child test;
/// `Ok(false)` when this process was not started as one): `send BIND DST
/// KBPS SECS` sends for `SECS` seconds, ends the stream ([`send_end`]) and
/// prints `SENT sent refused`; `fetch BIND SERVER SECS` says hello to the
/// server three times, receives ([`receive`], for at most `SECS + 60`
/// seconds) and prints what it got for [`child_received`].
pub fn play_role() -> Result<bool, String> {
    let Ok(role) = std::env::var(ROLE_ENV) else {
        return Ok(false);
    };
    let w: Vec<&str> = role.split_whitespace().collect();
    let addr = |s: &str| {
        s.parse::<SocketAddr>()
            .map_err(|e| format!("{ROLE_ENV}: {s}: {e}"))
    };
    let num = |s: &str| {
        s.parse::<u64>()
            .map_err(|e| format!("{ROLE_ENV}: {s}: {e}"))
    };
    let bind = |s: &str| UdpSocket::bind(addr(s)?).map_err(|e| format!("bind {s}: {e}"));
    match w[..] {
        ["send", from, dst, kbps, secs] => {
            let sock = bind(from)?;
            let dst = addr(dst)?;
            let (sent, refused) = paced_send(&sock, dst, num(kbps)?, num(secs)?);
            send_end(&sock, dst, sent);
            println!("SENT {sent} {refused}");
        }
        ["fetch", from, server, secs] => {
            let sock = bind(from)?;
            stamp_on_arrival(&sock)?;
            let server = addr(server)?;
            for _ in 0..3 {
                sock.send_to(b"hello", server)
                    .map_err(|e| format!("hello to {server}: {e}"))?;
                std::thread::sleep(Duration::from_millis(50));
            }
            let got = receive(&sock, Duration::from_secs(num(secs)? + 60));
            print!("{}", got.lines());
        }
        _ => return Err(format!("{ROLE_ENV}={role}: not a role")),
    }
    Ok(true)
}

/// The numbers of the line starting with `tag` that a finished child
/// printed; `Err` with its output when it failed or printed none.
pub fn child_numbers(child: Child, tag: &str) -> Result<Vec<u64>, String> {
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!("user child failed ({}): {text}", out.status));
    }
    let line = text
        .lines()
        .find_map(|l| l.split_once(&format!("{tag} ")).map(|(_, rest)| rest))
        .ok_or_else(|| format!("no {tag} line: {text}"))?;
    line.split_whitespace()
        .map(|x| x.parse().map_err(|e| format!("{x}: {e}")))
        .collect()
}

/// What a `fetch` child received, from the lines it printed; `Err` with
/// its output when it failed or printed none.
pub fn child_received(child: Child) -> Result<Received, String> {
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!("user child failed ({}): {text}", out.status));
    }
    parse_received(&text).ok_or_else(|| format!("no RECEIVED, ARRIVALS and DROPS lines: {text}"))
}

fn parse_received(text: &str) -> Option<Received> {
    let numbers = |tag: &str| -> Option<Vec<u64>> {
        // libtest may print the test's name before the first line.
        let line = text
            .lines()
            .find_map(|l| l.split_once(tag).map(|(_, rest)| rest))?;
        line.split_whitespace().map(|x| x.parse().ok()).collect()
    };
    let received = numbers("RECEIVED ")?;
    let arrivals = numbers("ARRIVALS ")?;
    let (bytes, times) = arrivals.split_first()?;
    Some(Received {
        first_ms: *received.first()?,
        seconds: received[1..].to_vec(),
        arrivals: times
            .iter()
            .map(|&at_ns| Arrival {
                at_ns,
                bytes: *bytes as u32,
            })
            .collect(),
        socket_drops: *numbers("DROPS ")?.first()?,
        announced: numbers(END).and_then(|n| n.first().copied()),
    })
}

/// The server of a `fetch`: in `ns`, waits for a hello on `bind` (ten
/// seconds at most), then sends to whoever said it at `kbps` for `secs`
/// seconds and ends the stream ([`send_end`]): `(sent, refused)`.
pub fn serve(
    ns: &Netns,
    bind: SocketAddr,
    kbps: u64,
    secs: u64,
) -> std::thread::JoinHandle<Result<(u64, u64), String>> {
    serve_until(
        ns,
        bind,
        kbps,
        Arc::new(AtomicBool::new(false)),
        Duration::from_secs(secs),
    )
}

/// [`serve`] until `stop` is set, for at most `max`.
pub fn serve_until(
    ns: &Netns,
    bind: SocketAddr,
    kbps: u64,
    stop: Arc<AtomicBool>,
    max: Duration,
) -> std::thread::JoinHandle<Result<(u64, u64), String>> {
    let name = ns.name().to_owned();
    let spawned = ns.spawn_in(move || {
        let sock = UdpSocket::bind(bind).map_err(|e| format!("bind {bind}: {e}"))?;
        let _ = sock.set_read_timeout(Some(Duration::from_secs(10)));
        let mut buf = [0u8; 64];
        let (_, peer) = sock
            .recv_from(&mut buf)
            .map_err(|e| format!("no hello on {bind}: {e}"))?;
        let (sent, refused) = paced_send_until(&sock, peer, kbps, &stop, max);
        send_end(&sock, peer, sent);
        Ok((sent, refused))
    });
    std::thread::spawn(move || match spawned {
        Ok(h) => h
            .join()
            .map_err(|_| "server panicked".to_owned())?
            .map_err(|e| e.to_string())?,
        Err(e) => Err(format!("entering {name}: {e}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_childs_lines_read_back_as_what_it_received() {
        let got = Received {
            first_ms: 7,
            seconds: vec![2056, 1028],
            arrivals: [10, 20, 30]
                .map(|at_ns| Arrival { at_ns, bytes: 1028 })
                .to_vec(),
            socket_drops: 1,
            announced: Some(4),
        };
        let back = parse_received(&format!("test x::user_child ... {}", got.lines())).unwrap();
        assert_eq!(back.first_ms, 7);
        assert_eq!(back.seconds, got.seconds);
        assert_eq!(back.arrivals, got.arrivals);
        assert_eq!((back.socket_drops, back.announced), (1, Some(4)));
        assert_eq!((back.packets(), back.bytes()), (3, 3084));
        let none = Received::default();
        let back = parse_received(&none.lines()).unwrap();
        assert_eq!((back.packets(), back.announced), (0, None));
    }

    #[test]
    fn drops_are_the_last_column_of_the_sockets_line() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
                    \x20 12: 0100007F:1F90 00000000:0000 07 00000000:00000000 00:00000000 00000000  1000        0 4321 2 0000000000000000 0\n\
                    \x20 13: 0100007F:1F91 00000000:0000 07 00000000:00000000 00:00000000 00000000  1000        0 1234 2 0000000000000000 17\n";
        assert_eq!(udp_drops(text, "1234"), Some(17));
        assert_eq!(udp_drops(text, "4321"), Some(0));
        assert_eq!(udp_drops(text, "999"), None);
    }
}
