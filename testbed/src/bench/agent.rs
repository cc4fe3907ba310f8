//! `qosloop-testbed bench agent`: the host agent's cost. Two namespaces
//! joined by a veth pair; iperf3 (TCP) across it, rounds alternating
//! without the agent, with its direct hash-path counting program and with
//! its cached one (the default), attached at the cgroup v2 root, in the same
//! run; the counting program's own time per packet from the kernel's
//! run-time statistics (`BPF_ENABLE_STATS`).

use crate::harness::{Netns, VethPair};
use qosloop_meter::agent::{self, Agent, AgentConfig, CountPath};
use qosloop_meter::CountSink;
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
    let paths = [CountPath::Direct, CountPath::Cached];
    let mut without = Vec::new();
    let mut with: [Vec<f64>; 2] = [vec![], vec![]];
    // Run time and runs of each counting program kind.
    let mut cost = [(0u64, 0u64); 2];
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
                }
                agent.stop(&mut CountSink::default())?;
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
        "bench agent: iperf3 TCP over veth, {} rounds of {} s each (without, direct, cached), load average {}",
        args.rounds,
        args.seconds,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    println!("without agent: {:.2} Gbit/s (median)", w / 1e9);
    for (i, name) in ["direct hash path", "cached (default)"].iter().enumerate() {
        let a = median(with[i].clone());
        println!(
            "with agent, {name}: {:.2} Gbit/s (median) = {:.1}% of without  [goal >= 97%]; counting programs: {} runs, {:.0} ns per packet (BPF_ENABLE_STATS)  [anchor ~106-143 ns]",
            a / 1e9,
            100.0 * a / w.max(1.0),
            cost[i].1,
            cost[i].0 as f64 / cost[i].1.max(1) as f64
        );
    }
    Ok(())
}
