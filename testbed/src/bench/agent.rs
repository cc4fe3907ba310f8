//! `qosloop-testbed bench agent`: the host agent's cost. Two namespaces
//! joined by a veth pair; iperf3 (TCP) across it, rounds alternating
//! without the agent, with each of its counting programs (the direct hash
//! path, the first cached program, the current cached one, the default)
//! and with a minimal per-uid counter (the kind of program the issue's
//! ~106–143 ns anchor was measured with), attached at the cgroup v2 root,
//! in the same run; each program's own time per packet from the kernel's
//! run-time statistics (`BPF_ENABLE_STATS`) and what the verifier made of
//! it (instructions after its rewrites, helper calls left, machine code).

use crate::harness::{Netns, VethPair};
use qosloop_bpf::{helper, reg, Alu, Asm, AttachType, Cond, Map, MapType, ProgType, Program, Size};
use qosloop_meter::agent::{self, Agent, AgentConfig, CountPath};
use qosloop_meter::CountSink;
use std::os::fd::AsFd;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Options of `qosloop-testbed bench agent`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Rounds of each kind (without, with the agent), alternating.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Seconds of iperf3 per round.
    #[arg(long, default_value_t = 4)]
    pub seconds: u64,
}

/// The two namespaces joined by a veth pair; deleted on drop.
struct Pair {
    client: Netns,
    server: Netns,
}

impl Pair {
    fn new() -> anyhow::Result<Pair> {
        let client = Netns::create("agent-a")?;
        let server = Netns::create("agent-b")?;
        VethPair::connect(&client, "10.216.0.1/24", &server, "10.216.0.2/24")?;
        Ok(Pair { client, server })
    }
}

/// One iperf3 round: received bits/s.
fn iperf(pair: &Pair, seconds: u64) -> anyhow::Result<f64> {
    let out = pair
        .client
        .command("iperf3")
        .args(["-c", "10.216.0.2", "-J", "-t"])
        .arg(seconds.to_string())
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "iperf3 client: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| anyhow::anyhow!("iperf3 -J without end.sum_received.bits_per_second"))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || run_blocking(args)).await?
}

fn run_blocking(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        nix::unistd::geteuid().is_root(),
        "bench agent needs root (namespaces, eBPF)"
    );
    let pair = Pair::new()?;
    let mut server = pair
        .server
        .command("iperf3")
        .arg("-s")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(300));
    let stats = qosloop_bpf::enable_run_time_stats()?;
    let cfg = |count_path| AgentConfig {
        cgroup: agent::default_cgroup(),
        pin_dir: None,
        map_entries: agent::DEFAULT_MAP_ENTRIES,
        interim: Duration::from_secs(1),
        count_path,
        mode: agent::AgentMode::Bpf,
    };
    let paths = [CountPath::Direct, CountPath::CachedV1, CountPath::Cached];
    let names = [
        "direct hash path",
        "first cached program",
        "cached (default)",
        "per-uid counter (anchor kind)",
    ];
    let mut without = Vec::new();
    let mut with: [Vec<f64>; 4] = Default::default();
    // Run time and runs of each counting program kind.
    let mut cost = [(0u64, 0u64); 4];
    // Instructions after the verifier, helper calls among them, JIT bytes.
    let mut shape = [(0u32, 0usize, 0u32); 4];
    let result = (|| -> anyhow::Result<()> {
        for _ in 0..args.rounds {
            without.push(iperf(&pair, args.seconds)?);
            for (i, path) in paths.iter().enumerate() {
                let mut agent = Agent::start(&cfg(*path))?;
                let stop = AtomicBool::new(false);
                let bps = std::thread::scope(|s| -> anyhow::Result<f64> {
                    let drainer = s.spawn(|| -> anyhow::Result<()> {
                        let mut sink = CountSink::default();
                        while !stop.load(Ordering::Relaxed) {
                            std::thread::sleep(Duration::from_millis(200));
                            agent.drain(&mut sink)?;
                        }
                        Ok(())
                    });
                    let bps = iperf(&pair, args.seconds);
                    stop.store(true, Ordering::Relaxed);
                    drainer
                        .join()
                        .map_err(|_| anyhow::anyhow!("drain thread panicked"))??;
                    bps
                })?;
                with[i].push(bps);
                for p in agent.count_programs() {
                    let info = p.info()?;
                    cost[i].0 += info.run_time_ns;
                    cost[i].1 += info.run_cnt;
                    shape[i] = (info.xlated_insns, calls(&p.xlated()?), info.jited_bytes);
                }
                agent.stop(&mut CountSink::default())?;
            }
            let anchor = PerUid::attach()?;
            with[3].push(iperf(&pair, args.seconds)?);
            for p in &anchor.programs {
                let info = p.info()?;
                cost[3].0 += info.run_time_ns;
                cost[3].1 += info.run_cnt;
                shape[3] = (info.xlated_insns, calls(&p.xlated()?), info.jited_bytes);
            }
        }
        Ok(())
    })();
    drop(stats);
    let _ = server.kill();
    let _ = server.wait();
    result?;
    let w = median(without);
    println!(
        "bench agent: iperf3 TCP over veth, {} rounds of {} s each (without, direct, first cached, cached, per-uid), load average {}",
        args.rounds,
        args.seconds,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    println!("without agent: {:.2} Gbit/s (median)", w / 1e9);
    for (i, name) in names.iter().enumerate() {
        let a = median(with[i].clone());
        println!(
            "with {name}: {:.2} Gbit/s (median) = {:.1}% of without  [goal >= 97%]; {} runs, {:.0} ns per packet (BPF_ENABLE_STATS)  [anchor ~106-143 ns]; {} insns after the verifier, {} helper calls, {} bytes JIT",
            a / 1e9,
            100.0 * a / w.max(1.0),
            cost[i].1,
            cost[i].0 as f64 / cost[i].1.max(1) as f64,
            shape[i].0,
            shape[i].1,
            shape[i].2,
        );
    }
    Ok(())
}

/// Helper calls left in a program's instructions after the verifier
/// (`BPF_JMP | BPF_CALL`; inlined lookups are gone from the count).
fn calls(xlated: &[u8]) -> usize {
    xlated.chunks_exact(8).filter(|i| i[0] == 0x85).count()
}

/// A minimal per-uid counter on ingress and egress of the cgroup v2 root
/// (socket uid → packets, bytes in a per-CPU hash map): the kind of program
/// the anchor was measured with, here to compare in the same run.
/// Detached and freed on drop.
struct PerUid {
    programs: Vec<Program>,
    _links: Vec<qosloop_bpf::CgroupLink>,
    _map: Map,
}

impl PerUid {
    fn attach() -> anyhow::Result<PerUid> {
        use reg::*;
        let map = Map::create(MapType::PercpuHash, 4, 16, 4096, "qlb_per_uid")?;
        let mut a = Asm::new();
        a.mov(R6, R1)
            .call(helper::GET_SOCKET_UID)
            .store(Size::W, FP, -4, R0)
            .load_map_fd(R1, map.raw_fd())
            .mov(R2, FP)
            .alu_imm(Alu::Add, R2, -4)
            .call(helper::MAP_LOOKUP_ELEM)
            .jump_imm(Cond::Eq, R0, 0, "new")
            .load(Size::DW, R1, R0, 0)
            .alu_imm(Alu::Add, R1, 1)
            .store(Size::DW, R0, 0, R1)
            .load(Size::W, R2, R6, 0)
            .load(Size::DW, R1, R0, 8)
            .alu(Alu::Add, R1, R2)
            .store(Size::DW, R0, 8, R1)
            .goto("pass")
            .label("new")
            .store_imm(Size::DW, FP, -24, 1)
            .load(Size::W, R2, R6, 0)
            .store(Size::DW, FP, -16, R2)
            .load_map_fd(R1, map.raw_fd())
            .mov(R2, FP)
            .alu_imm(Alu::Add, R2, -4)
            .mov(R3, FP)
            .alu_imm(Alu::Add, R3, -24)
            .mov_imm(R4, 0)
            .call(helper::MAP_UPDATE_ELEM)
            .label("pass")
            .mov_imm(R0, 1)
            .exit();
        let insns = a.finish()?;
        let cgroup = std::fs::File::open(agent::default_cgroup())?;
        let mut programs = vec![];
        let mut links = vec![];
        for attach in [AttachType::CgroupInetIngress, AttachType::CgroupInetEgress] {
            let p = Program::load(ProgType::CgroupSkb, None, &insns, "qlb_per_uid")?;
            links.push(p.link(cgroup.as_fd(), attach)?);
            programs.push(p);
        }
        Ok(PerUid {
            programs,
            _links: links,
            _map: map,
        })
    }
}
