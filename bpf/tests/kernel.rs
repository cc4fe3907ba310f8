//! `qosloop-bpf` against the running kernel (root): maps, a refused program
//! with its verifier log, cgroup attach with BPF_F_ALLOW_MULTI on a cgroup
//! the test creates, pinning in a bpffs the test mounts, run-time stats.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use qosloop_bpf::{
    enable_run_time_stats, reg, Asm, AttachType, Map, MapType, ProgType, Program,
    ATTACH_ALLOW_MULTI,
};
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> bool {
    if euid() == 0 {
        return true;
    }
    if matches!(std::env::var("CI").as_deref(), Ok("true") | Ok("1")) {
        panic!("prerequisite missing under CI=true: needs root (bpf(2))");
    }
    eprintln!("skipped: needs root (bpf(2))");
    false
}

fn euid() -> u32 {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse()
                .unwrap_or(1)
        })
        .unwrap_or(1)
}

fn pass_program() -> Vec<u8> {
    let mut a = Asm::new();
    a.mov_imm(reg::R0, 1).exit();
    a.finish().unwrap()
}

#[test]
fn hash_map_round_trip_and_batched_drain() {
    if !root() {
        return;
    }
    let m = Map::create(MapType::Hash, 8, 8, 64, "qlb_test").unwrap();
    for k in 0u64..40 {
        m.update(&k.to_ne_bytes(), &(k * 10).to_ne_bytes()).unwrap();
    }
    assert_eq!(
        m.lookup(&7u64.to_ne_bytes()).unwrap(),
        Some(70u64.to_ne_bytes().to_vec())
    );
    assert!(m.delete(&7u64.to_ne_bytes()).unwrap());
    assert!(!m.delete(&7u64.to_ne_bytes()).unwrap());
    assert_eq!(m.keys().unwrap().len(), 39);
    let mut sum = 0u64;
    let n = m
        .drain(16, |_, v| sum += u64::from_ne_bytes(v.try_into().unwrap()))
        .unwrap();
    assert_eq!(n, 39);
    assert_eq!(sum, (0..40u64).map(|k| k * 10).sum::<u64>() - 70);
    assert!(m.keys().unwrap().is_empty(), "drain removes what it reads");
    // A wrong key size is an error, not a kernel read past the buffer.
    assert!(m.lookup(&[0u8; 4]).is_err());
}

#[test]
fn a_refused_program_carries_the_verifier_log() {
    if !root() {
        return;
    }
    let mut a = Asm::new();
    a.exit(); // r0 never set
    let err = Program::load(
        ProgType::SocketFilter,
        None,
        &a.finish().unwrap(),
        "qlb_bad",
    )
    .unwrap_err();
    assert!(err.to_string().contains("R0"), "{err}");
}

/// A child cgroup of the v2 hierarchy, removed on drop.
struct Cgroup(PathBuf);

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn cgroup_attach_with_allow_multi_twice_then_detach() {
    if !root() {
        return;
    }
    let base = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .into_iter()
        .find(|p| Path::new(p).join("cgroup.procs").exists())
        .expect("a cgroup v2 hierarchy");
    let cg = Cgroup(Path::new(base).join(format!("qlb_test_{}", std::process::id())));
    std::fs::create_dir(&cg.0).unwrap();
    let dir = std::fs::File::open(&cg.0).unwrap();
    use std::os::fd::AsFd;
    let p1 = Program::load(ProgType::CgroupSkb, None, &pass_program(), "qlb_one").unwrap();
    let p2 = Program::load(ProgType::CgroupSkb, None, &pass_program(), "qlb_two").unwrap();
    let egress = AttachType::CgroupInetEgress;
    p1.attach(dir.as_fd(), egress, ATTACH_ALLOW_MULTI).unwrap();
    p2.attach(dir.as_fd(), egress, ATTACH_ALLOW_MULTI).unwrap();
    p1.detach(dir.as_fd(), egress).unwrap();
    p2.detach(dir.as_fd(), egress).unwrap();
    // Detached: a second detach is refused.
    assert!(p1.detach(dir.as_fd(), egress).is_err());
    let link = p1.link(dir.as_fd(), egress).unwrap();
    drop(link);
}

#[test]
fn a_pinned_map_is_reopened_and_a_wrong_layout_refused() {
    if !root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "bpf", "bpf"])
        .arg(dir.path())
        .status()
        .unwrap()
        .success();
    assert!(mounted, "mount -t bpf");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Unmount(dir.path().to_owned());
    let path = dir.path().join("m");
    let m = Map::create(MapType::Hash, 4, 8, 8, "qlb_pin").unwrap();
    m.update(&1u32.to_ne_bytes(), &5u64.to_ne_bytes()).unwrap();
    m.pin(&path).unwrap();
    drop(m);
    let again = Map::from_pinned(&path, MapType::Hash, 4, 8).unwrap();
    assert_eq!(
        again.lookup(&1u32.to_ne_bytes()).unwrap(),
        Some(5u64.to_ne_bytes().to_vec())
    );
    assert!(Map::from_pinned(&path, MapType::Hash, 8, 8).is_err());
}

#[test]
fn run_time_stats_count_runs() {
    if !root() {
        return;
    }
    let stats = enable_run_time_stats().unwrap();
    let p = Program::load(ProgType::SocketFilter, None, &pass_program(), "qlb_stats").unwrap();
    // Attach as a socket filter and send to ourselves: the program runs.
    let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    use std::os::fd::AsFd;
    p.attach_to_socket(rx.as_fd()).unwrap();
    let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for _ in 0..10 {
        tx.send_to(b"x", rx.local_addr().unwrap()).unwrap();
    }
    let mut buf = [0u8; 4];
    for _ in 0..10 {
        rx.recv(&mut buf).unwrap();
    }
    let info = p.info().unwrap();
    assert!(info.run_cnt >= 10, "{info:?}");
    assert!(info.run_time_ns > 0, "{info:?}");
    drop(stats);
}

/// The agent's drain relies on this: after its epoch flip it waits for
/// every program run that read the old epoch (a run preempted mid-way once
/// flushed a cache cell the drain had already read, counting it twice).
/// The kernel must grant the grace period here; where it refuses
/// (`nohz_full`), the agent falls back to a sleep and says so.
#[test]
fn the_kernel_grants_a_grace_period_for_running_programs() {
    qosloop_bpf::wait_for_running_programs().expect("membarrier(MEMBARRIER_CMD_GLOBAL)");
}
