//! `qosloop-testbed bench meter`: one synthetic capture (64-byte packets over
//! 100k concurrent flows), measured on one core — the meter's pipeline
//! replayed from memory, the 100-pattern DFA, the whole meter over the file
//! — and, in the same run on the same file, softflowd (`-r`) and pmacctd
//! (`pcap_savefile`), reported as wall times and ratios. Also the flow
//! cache's resident memory per 1M flows.

use qosloop_meter::bench::{
    cache_memory, field_rules, measure_patterns, measure_pcap_replay, measure_pipeline, patterns,
    synthetic_frames, to_pcap,
};
use qosloop_meter::{run_file, CacheConfig, Classifier, CountSink, PipelineConfig, Progress};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Options of `qosloop-testbed bench meter`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Packets in the synthetic capture.
    #[arg(long, default_value_t = 3_000_000)]
    pub packets: usize,
    /// Concurrent flows (round robin).
    #[arg(long, default_value_t = 100_000)]
    pub flows: usize,
    /// Regex patterns compiled into the DFA.
    #[arg(long, default_value_t = 100)]
    pub patterns: usize,
    /// Skip softflowd and pmacctd.
    #[arg(long)]
    pub no_peers: bool,
}

fn mpps(packets: u64, d: Duration) -> f64 {
    packets as f64 / d.as_secs_f64().max(1e-9) / 1e6
}

/// CPU time (user + system) of this process's waited-for children, from
/// `/proc/self/stat` (cutime, cstime; clock ticks of 10 ms).
fn children_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, a)| a);
    let f: Vec<u64> = after
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let ticks = f.get(13).copied().unwrap_or(0) + f.get(14).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// A peer's wall time and CPU time.
struct PeerTime {
    wall: Duration,
    cpu: Duration,
}

/// Runs a peer to completion (bounded), returning its wall and CPU time.
fn timed_peer(cmd: Command, limit: Duration) -> anyhow::Result<PeerTime> {
    let cpu0 = children_cpu();
    let wall = timed(cmd, limit)?;
    Ok(PeerTime {
        wall,
        cpu: children_cpu().saturating_sub(cpu0),
    })
}

/// Runs a peer to completion (bounded), returning its wall time.
fn timed(mut cmd: Command, limit: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    loop {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                anyhow::bail!("exited with {status}: {}", err.trim());
            }
            return Ok(started.elapsed());
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("still running after {limit:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn softflowd(pcap: &Path, dir: &Path) -> anyhow::Result<PeerTime> {
    let bin =
        crate::harness::require_binary("softflowd", "softflowd").map_err(anyhow::Error::msg)?;
    // A collector socket so that its NetFlow datagrams land somewhere.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let port = sock.local_addr()?.port();
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let drain = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if sock.recv(&mut buf).is_ok() {
                    n += 1;
                }
            }
            n
        })
    };
    let mut cmd = Command::new(bin);
    cmd.arg("-r")
        .arg(pcap)
        .args(["-v", "10", "-n", &format!("127.0.0.1:{port}"), "-p"])
        .arg(dir.join("softflowd.pid"))
        .arg("-d");
    let r = timed_peer(cmd, Duration::from_secs(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let datagrams = drain.join().unwrap_or(0);
    println!("  softflowd sent {datagrams} NetFlow v10 datagrams");
    r
}

/// pmacctd with the print plugin; its cache is sized for the benchmark's
/// flows (the default 16411 buckets would make it walk long chains).
fn pmacctd(pcap: &Path, dir: &Path) -> anyhow::Result<PeerTime> {
    let bin = crate::harness::require_binary("pmacctd", "pmacct").map_err(anyhow::Error::msg)?;
    let conf = dir.join("pmacctd.conf");
    let out = dir.join("pmacct.csv");
    std::fs::write(
        &conf,
        format!(
            "daemonize: false\npcap_savefile: {}\npcap_savefile_wait: false\nplugins: print[p]\n\
             aggregate[p]: src_host, dst_host, src_port, dst_port, proto\nprint_output[p]: csv\n\
             print_output_file[p]: {}\nprint_refresh_time[p]: 3600\n\
             print_cache_entries[p]: 262139\n",
            pcap.display(),
            out.display()
        ),
    )?;
    let mut cmd = Command::new(bin);
    cmd.arg("-f").arg(&conf);
    let r = timed_peer(cmd, Duration::from_secs(300))?;
    let lines = std::fs::read_to_string(&out)
        .map(|s| s.lines().count())
        .unwrap_or(0);
    println!("  pmacctd wrote {} aggregates", lines.saturating_sub(1));
    Ok(r)
}

/// Runs the benchmark and prints its report.
pub async fn run(args: Args) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || run_blocking(args)).await?
}

fn run_blocking(args: Args) -> anyhow::Result<()> {
    println!(
        "bench meter: {} packets of 64 bytes over {} concurrent flows, one core; load average {}",
        args.packets,
        args.flows,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let frames = synthetic_frames(args.packets, args.flows, 64);
    let pcap = to_pcap(&frames);
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("bench.pcap");
    std::fs::write(&file, &pcap)?;
    let classifier = Arc::new(Classifier::new(Some(field_rules()?), None, None));
    let cache = CacheConfig {
        interim_ns: 0,
        ..CacheConfig::default()
    };

    let m = measure_pipeline(&frames, classifier.clone(), cache);
    println!(
        "decode + classify (10 field rules) + flow cache, frames in memory: {:.2} Mpkt/s wall, {:.2} Mpkt/s per CPU second ({} flows, {} records)  [target >= 5]",
        m.packets_per_second() / 1e6,
        m.packets_per_cpu_second() / 1e6,
        m.flows,
        m.records
    );
    let m = measure_pcap_replay(&pcap, classifier.clone(), cache);
    println!(
        "same, pcap image in memory (reader included): {:.2} Mpkt/s wall, {:.2} Mpkt/s per CPU second",
        m.packets_per_second() / 1e6,
        m.packets_per_cpu_second() / 1e6
    );

    for (anchored, what) in [
        (true, "anchored at the IP header (Fig. 5 style)"),
        (false, "unanchored signatures over whole frames"),
    ] {
        let rules = patterns(args.patterns, anchored)?;
        let (m64, hits) = measure_patterns(&frames, &rules, anchored);
        let big = synthetic_frames((args.packets / 20).max(1000), args.flows, 1500);
        let (m1500, _) = measure_patterns(&big, &rules, anchored);
        println!(
            "{} regex patterns, {what}: 64-byte frames {:.2} GB/s wall, {:.2} GB/s per CPU second ({hits} matched); 1500-byte frames {:.2} GB/s wall, {:.2} GB/s per CPU second; DFA {} KiB  [target >= 1 GB/s]",
            rules.len(),
            m64.bytes_per_second() / 1e9,
            m64.bytes_per_cpu_second() / 1e9,
            m1500.bytes_per_second() / 1e9,
            m1500.bytes_per_cpu_second() / 1e9,
            rules.dfa_bytes() / 1024
        );
    }

    let ours = {
        let started = Instant::now();
        let cpu0 = qosloop_meter::bench::thread_cpu();
        let mut sink = CountSink::default();
        let summary = run_file(
            &file,
            PipelineConfig {
                cache,
                caplen: 0,
                sampling: Default::default(),
            },
            classifier,
            &mut sink,
            Progress::Never,
        )?;
        let wall = started.elapsed();
        let cpu = qosloop_meter::bench::thread_cpu().saturating_sub(cpu0);
        println!(
            "qosloop-meter over the file: {:.3} s wall, {:.3} s CPU ({:.2} Mpkt/s wall, {} records)",
            wall.as_secs_f64(),
            cpu.as_secs_f64(),
            mpps(summary.stats.packets, wall),
            summary.stats.records
        );
        PeerTime { wall, cpu }
    };
    if !args.no_peers {
        for (name, result) in [
            ("softflowd -r", softflowd(&file, dir.path())),
            ("pmacctd pcap_savefile", pmacctd(&file, dir.path())),
        ] {
            match result {
                Ok(t) => println!(
                    "{name}: {:.3} s wall, {:.3} s CPU ({:.2} Mpkt/s wall); qosloop-meter is {:.1}x faster by wall time, {:.1}x by CPU time",
                    t.wall.as_secs_f64(),
                    t.cpu.as_secs_f64(),
                    mpps(args.packets as u64, t.wall),
                    t.wall.as_secs_f64() / ours.wall.as_secs_f64().max(1e-9),
                    t.cpu.as_secs_f64() / ours.cpu.as_secs_f64().max(1e-9)
                ),
                Err(e) => println!("{name}: not measured: {e:#}"),
            }
        }
    }
    let bytes = cache_memory(1_000_000);
    println!(
        "flow cache resident memory: {:.1} MiB per 1M flows ({} bytes per flow)",
        bytes as f64 / (1 << 20) as f64,
        bytes / 1_000_000
    );
    Ok(())
}
