//! Helpers of the host agent's tests: namespaces, users, cgroups and bpffs
//! mounts the tests create (and remove on drop), the agent binary run in a
//! namespace, generators run as a user.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use qosloop_schema::FlowRecord;
use qosloop_testkit::frames as support;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const PYTHON: &str = "/usr/bin/python3";

pub fn prerequisites() -> Option<()> {
    for (bin, pkg) in [
        ("ip", "iproute2"),
        ("nsenter", "util-linux"),
        ("setpriv", "util-linux"),
        ("useradd", "passwd"),
        ("userdel", "passwd"),
    ] {
        support::need_binary(bin, pkg)?;
    }
    if !Path::new(PYTHON).is_file() {
        return support::skip("/usr/bin/python3 not found: install the Debian package python3");
    }
    support::need_root("users, namespaces, eBPF")
}

/// A network namespace with loopback up; deleted on drop.
pub struct Netns(pub String);

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!("qla{tag}{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        assert!(Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap()
            .success());
        let ns = Netns(name);
        assert!(Command::new("ip")
            .args(["-n", &ns.0, "link", "set", "lo", "up"])
            .status()
            .unwrap()
            .success());
        ns
    }

    pub fn path(&self) -> String {
        format!("--net=/run/netns/{}", self.0)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A local user without home; removed on drop (processes killed first):
/// the test kit's (`harness::TestUser`), with which a later run sweeps what
/// a killed run left.
pub struct User(pub qosloop_testkit::harness::TestUser);

impl User {
    pub fn new(tag: &str) -> User {
        User(qosloop_testkit::harness::TestUser::create(tag).unwrap())
    }
}

impl std::ops::Deref for User {
    type Target = qosloop_testkit::harness::TestUser;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

/// The agent running in `ns`, writing JSON lines; SIGKILLed on drop if
/// the test did not stop it.
pub struct AgentRun {
    child: Option<Child>,
    records: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl AgentRun {
    pub fn start(ns: &Netns, interim_ms: u32) -> AgentRun {
        Self::start_with(ns, interim_ms, &[])
    }

    /// With more command-line arguments.
    pub fn start_with(ns: &Netns, interim_ms: u32, extra: &[String]) -> AgentRun {
        Self::start_with_env(ns, interim_ms, extra, &[])
    }

    /// With more command-line arguments and environment variables.
    pub fn start_with_env(
        ns: &Netns,
        interim_ms: u32,
        extra: &[String],
        env: &[(&str, &str)],
    ) -> AgentRun {
        let dir = tempfile::tempdir().unwrap();
        let records = dir.path().join("records.jsonl");
        let log = dir.path().join("agent.log");
        let child = Command::new("nsenter")
            .arg(ns.path())
            .arg(env!("CARGO_BIN_EXE_qosloop-meter"))
            .args([
                "--agent",
                "--interim-ms",
                &interim_ms.to_string(),
                "--records-out",
            ])
            .arg(&records)
            .args(extra)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "qosloop_meter=debug")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut run = AgentRun {
            child: Some(child),
            records,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(&run.log).unwrap_or_default();
            if text.contains("programs attached") || text.contains("(ctnetlink) started") {
                break;
            }
            if let Some(status) = run.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("agent exited {status} before attaching: {text}");
            }
            assert!(Instant::now() < deadline, "agent did not attach: {text}");
            std::thread::sleep(Duration::from_millis(50));
        }
        run
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Bytes of records written so far.
    pub fn records_len(&self) -> u64 {
        std::fs::metadata(&self.records).map_or(0, |m| m.len())
    }

    /// SIGKILL: no flush, no detach; the records written so far.
    pub fn kill9(mut self) -> Vec<FlowRecord> {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        std::fs::read_to_string(&self.records)
            .unwrap_or_default()
            .lines()
            .map(|l| FlowRecord::from_json_line(l).unwrap())
            .collect()
    }

    /// SIGTERM, exit 0, every record.
    pub fn stop(mut self) -> (Vec<FlowRecord>, String) {
        let mut child = self.child.take().unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let status = child.wait().unwrap();
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        assert!(status.success(), "agent exit {status}: {log}");
        let records = std::fs::read_to_string(&self.records)
            .unwrap()
            .lines()
            .map(|l| FlowRecord::from_json_line(l).unwrap())
            .collect();
        (records, log)
    }
}

impl Drop for AgentRun {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// UDP sender: prints its pid, sends `count` datagrams of `size` bytes to
/// 127.0.0.1:`port`, waits for a line on stdin (or `linger` seconds), exits.
pub const SENDER: &str = r#"
import os, socket, sys, time
port, count, size, linger = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
print(os.getpid(), flush=True)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(count):
    s.sendto(b"x" * size, ("127.0.0.1", port))
    if i % 64 == 63:
        time.sleep(0.001)
print("sent", flush=True)
time.sleep(linger)
"#;

/// A process started as `user` in `ns`, with its first stdout line (the
/// pid) read.
pub struct Gen {
    pub child: Child,
    pub pid: u32,
    pub out: BufReader<std::process::ChildStdout>,
}

impl Gen {
    pub fn start(ns: &Netns, user: &User, script: &str, args: &[String]) -> Gen {
        Self::start_in(ns, user, script, args, None)
    }

    /// Started inside `cgroup` (its sockets belong to that cgroup).
    pub fn start_in(
        ns: &Netns,
        user: &User,
        script: &str,
        args: &[String],
        cgroup: Option<&TestCgroup>,
    ) -> Gen {
        let mut cmd = match cgroup {
            Some(cg) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg("echo $$ > \"$0/cgroup.procs\" && exec nsenter \"$@\"")
                    .arg(&cg.0);
                c
            }
            None => Command::new("nsenter"),
        };
        let mut child = cmd
            .arg(ns.path())
            .args([
                "setpriv",
                &format!("--reuid={}", user.uid),
                &format!("--regid={}", user.uid),
                "--clear-groups",
                PYTHON,
                "-c",
                script,
            ])
            .args(args)
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let pid = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("generator said {line:?}"));
        Gen { child, pid, out }
    }

    pub fn wait_line(&mut self, want: &str) {
        let mut line = String::new();
        loop {
            line.clear();
            assert!(
                self.out.read_line(&mut line).unwrap() > 0,
                "generator ended before {want:?}"
            );
            if line.trim() == want {
                return;
            }
        }
    }

    /// Waits for a line starting with `prefix`; returns the rest of it.
    pub fn wait_line_prefix(&mut self, prefix: &str) -> String {
        let mut line = String::new();
        loop {
            line.clear();
            assert!(
                self.out.read_line(&mut line).unwrap() > 0,
                "generator ended before a line {prefix:?}"
            );
            if let Some(rest) = line.trim().strip_prefix(prefix) {
                return rest.to_owned();
            }
        }
    }

    pub fn wait(mut self) {
        assert!(self.child.wait().unwrap().success());
    }
}

impl Drop for Gen {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn sender(ns: &Netns, user: &User, port: u16, count: u32, size: u32, linger: f64) -> Gen {
    Gen::start(
        ns,
        user,
        SENDER,
        &[
            port.to_string(),
            count.to_string(),
            size.to_string(),
            linger.to_string(),
        ],
    )
}

/// Bytes of UDP records to `port` matching `pred`.
pub fn udp_bytes(records: &[FlowRecord], port: u16, pred: impl Fn(&FlowRecord) -> bool) -> u64 {
    records
        .iter()
        .filter(|r| r.proto == 17 && r.dst_port == port && pred(r))
        .map(|r| r.bytes)
        .sum()
}

pub fn within_one_percent(got: u64, want: u64) -> bool {
    (got as f64 - want as f64).abs() <= want as f64 * 0.01
}

/// A cgroup v2 directory under the hierarchy's root; removed on drop (its
/// processes must be gone by then: generators are killed before).
pub struct TestCgroup(pub PathBuf);

impl TestCgroup {
    pub fn new(tag: &str) -> TestCgroup {
        let root = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .iter()
            .map(Path::new)
            .find(|p| p.join("cgroup.procs").is_file() && !p.join("cpuset").exists())
            .expect("a cgroup v2 hierarchy");
        let dir = root.join(format!("qla-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir).unwrap();
        TestCgroup(dir)
    }

    pub fn arg(&self) -> String {
        self.0.display().to_string()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("could not remove cgroup {}", self.0.display());
    }
}

/// A bpffs instance mounted on a temporary directory; unmounted on drop
/// (which removes every pin in it: pinned links detach).
pub struct Bpffs {
    dir: tempfile::TempDir,
}

impl Bpffs {
    pub fn new() -> Bpffs {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "mount -t bpf: {out:?}");
        Bpffs { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// The summary line's "map full: N packets, B bytes not attributed".
pub fn map_full(log: &str) -> Option<(u64, u64)> {
    let at = log.rfind("map full: ")?;
    let mut words = log[at + 10..].split_whitespace();
    let packets = words.next()?.parse().ok()?;
    words.next()?;
    let bytes = words.next()?.parse().ok()?;
    Some((packets, bytes))
}
