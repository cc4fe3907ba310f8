//! A CPU cap per capture node, so that nodes sharing this machine behave
//! like separate, equally slow machines. cgroup v2 (`cpu.max`, `cpu.stat`)
//! where its cpu controller is enabled; otherwise — the hybrid layout of
//! the development machines, where `cpu` is bound to v1 — the v1 `cpu`
//! (`cfs_quota_us`) and `cpuacct` (`usage`) hierarchies, same semantics.
//! The groups are removed on drop (after their processes have ended).

use std::path::{Path, PathBuf};

const ROOT: &str = "/sys/fs/cgroup";

/// A capped group.
#[derive(Debug)]
pub struct CpuCap {
    dirs: Vec<PathBuf>,
    usage: PathBuf,
    v2: bool,
}

fn write(path: &Path, value: &str) -> anyhow::Result<()> {
    std::fs::write(path, value)
        .map_err(|e| anyhow::anyhow!("writing {value:?} to {}: {e}", path.display()))
}

impl CpuCap {
    /// A group named `name` limited to `share` of one core.
    pub fn create(name: &str, share: f64) -> anyhow::Result<CpuCap> {
        let period = 100_000u64;
        let quota = ((share * period as f64) as u64).max(1_000);
        let unified = Path::new(ROOT).join("unified");
        let v2_root = if Path::new(ROOT).join("cgroup.controllers").is_file() {
            PathBuf::from(ROOT)
        } else {
            unified
        };
        let v2_cpu = std::fs::read_to_string(v2_root.join("cgroup.subtree_control"))
            .is_ok_and(|c| c.split_whitespace().any(|w| w == "cpu"));
        if v2_cpu {
            let dir = v2_root.join(name);
            std::fs::create_dir_all(&dir)?;
            let cap = CpuCap {
                dirs: vec![dir.clone()],
                usage: dir.join("cpu.stat"),
                v2: true,
            };
            write(&dir.join("cpu.max"), &format!("{quota} {period}"))?;
            return Ok(cap);
        }
        let cpu = Path::new(ROOT).join("cpu").join(name);
        let acct = Path::new(ROOT).join("cpuacct").join(name);
        anyhow::ensure!(
            cpu.parent().is_some_and(Path::is_dir) && acct.parent().is_some_and(Path::is_dir),
            "no cgroup cpu controller: neither cgroup v2 with cpu enabled nor v1 cpu and cpuacct under {ROOT}"
        );
        // Made first, removed on drop even if a step below fails.
        let mut cap = CpuCap {
            dirs: Vec::new(),
            usage: acct.join("cpuacct.usage"),
            v2: false,
        };
        for d in [&cpu, &acct] {
            std::fs::create_dir_all(d)?;
            cap.dirs.push(d.clone());
        }
        write(&cpu.join("cpu.cfs_period_us"), &period.to_string())?;
        write(&cpu.join("cpu.cfs_quota_us"), &quota.to_string())?;
        Ok(cap)
    }

    /// Moves process `pid` into the group.
    pub fn add(&self, pid: u32) -> anyhow::Result<()> {
        for d in &self.dirs {
            write(&d.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// CPU time used by the group so far, in seconds.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        let text = std::fs::read_to_string(&self.usage)?;
        let value = if self.v2 {
            text.lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .map(|us| us / 1e6)
        } else {
            text.trim().parse::<f64>().ok().map(|ns| ns / 1e9)
        };
        value.ok_or_else(|| anyhow::anyhow!("unreadable CPU usage in {}", self.usage.display()))
    }
}

impl Drop for CpuCap {
    fn drop(&mut self) {
        for d in &self.dirs {
            // Fails only while a process is still inside; retry briefly.
            for _ in 0..50 {
                if std::fs::remove_dir(d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
}
