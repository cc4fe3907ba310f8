//! Traffic of local users for per-user tests: the test binary run again
//! as a user (`setpriv`) inside a namespace to play a role, a paced UDP
//! sender and a per-second receiver for IPv4 and IPv6, and the rate of a
//! steady stretch.

use crate::harness::Netns;
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The UDP payload of every datagram the sender sends.
pub const PAYLOAD: usize = 1000;

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
    let per_packet = ip_bytes(PAYLOAD, dst.is_ipv6()) * 8;
    let interval = Duration::from_secs_f64(per_packet as f64 / (kbps.max(1) as f64 * 1000.0));
    let buf = vec![0x5a_u8; PAYLOAD];
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let (mut sent, mut refused) = (0u64, 0u64);
    let mut next = start;
    while Instant::now() < end {
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

/// What a receiver got: IP bytes per second since the first datagram,
/// and when that came (ms since the Unix epoch).
#[derive(Clone, Debug, Default)]
pub struct Received {
    pub first_ms: u64,
    pub seconds: Vec<u64>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Receives [`PAYLOAD`]-byte datagrams on `sock` until nothing came for
/// two seconds (or `limit` passed); other datagrams are ignored.
pub fn receive(sock: &UdpSocket, limit: Duration) -> Received {
    let _ = sock.set_read_timeout(Some(Duration::from_millis(200)));
    let v6 = sock.local_addr().is_ok_and(|a| a.is_ipv6());
    let mut buf = vec![0u8; 65_536];
    let mut got = Received::default();
    let mut first: Option<Instant> = None;
    let mut last = Instant::now();
    let give_up = Instant::now() + limit;
    while Instant::now() < give_up && last.elapsed() < Duration::from_secs(2) {
        let Ok(n) = sock.recv(&mut buf) else { continue };
        if n != PAYLOAD {
            continue;
        }
        last = Instant::now();
        let t0 = *first.get_or_insert_with(|| {
            got.first_ms = now_ms();
            last
        });
        let s = last.duration_since(t0).as_secs() as usize;
        if got.seconds.len() <= s {
            got.seconds.resize(s + 1, 0);
        }
        got.seconds[s] += ip_bytes(n, v6);
    }
    got
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
/// `uid`, running only its test `child_test` with [`ROLE_ENV`] = `role`
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
/// KBPS SECS` prints `SENT sent refused`; `fetch BIND SERVER SECS` says
/// hello to the server three times, receives for at most `SECS + 10`
/// seconds and prints `RECEIVED first_ms b0 b1 …`.
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
            let (sent, refused) = paced_send(&sock, addr(dst)?, num(kbps)?, num(secs)?);
            println!("SENT {sent} {refused}");
        }
        ["fetch", from, server, secs] => {
            let sock = bind(from)?;
            let server = addr(server)?;
            for _ in 0..3 {
                sock.send_to(b"hello", server)
                    .map_err(|e| format!("hello to {server}: {e}"))?;
                std::thread::sleep(Duration::from_millis(50));
            }
            let got = receive(&sock, Duration::from_secs(num(secs)? + 10));
            let list: Vec<String> = got.seconds.iter().map(u64::to_string).collect();
            println!("RECEIVED {} {}", got.first_ms, list.join(" "));
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

/// The server of a `fetch`: in `ns`, waits for a hello on `bind` (ten
/// seconds at most), then sends to whoever said it at `kbps` for `secs`
/// seconds: `(sent, refused)`.
pub fn serve(
    ns: &Netns,
    bind: SocketAddr,
    kbps: u64,
    secs: u64,
) -> std::thread::JoinHandle<Result<(u64, u64), String>> {
    let name = ns.name().to_owned();
    let spawned = ns.spawn_in(move || {
        let sock = UdpSocket::bind(bind).map_err(|e| format!("bind {bind}: {e}"))?;
        let _ = sock.set_read_timeout(Some(Duration::from_secs(10)));
        let mut buf = [0u8; 64];
        let (_, peer) = sock
            .recv_from(&mut buf)
            .map_err(|e| format!("no hello on {bind}: {e}"))?;
        Ok(paced_send(&sock, peer, kbps, secs))
    });
    std::thread::spawn(move || match spawned {
        Ok(h) => h
            .join()
            .map_err(|_| "server panicked".to_owned())?
            .map_err(|e| e.to_string())?,
        Err(e) => Err(format!("entering {name}: {e}")),
    })
}
