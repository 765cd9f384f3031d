//! Scheduling settings and process accounting: CPU pinning, CPU time,
//! resident and proportional memory of the proxy processes and the memory
//! of the eBPF maps they hold, from /proc.

use std::process::Command;

use anyhow::bail;

/// Where the benchmark's processes may run. On these 2-vCPU VMs waking
/// an idle vCPU is expensive, so unpinned numbers mostly count wake-ups
/// per hop, and pinned ones (everything on CPU 0) show processing cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pinning {
    Pinned,
    Unpinned,
}

impl Pinning {
    pub fn name(self) -> &'static str {
        match self {
            Pinning::Pinned => "pinned",
            Pinning::Unpinned => "unpinned",
        }
    }

    /// Command prefix for the client.
    pub fn prefix(self) -> &'static [&'static str] {
        match self {
            Pinning::Pinned => &["taskset", "-c", "0"],
            Pinning::Unpinned => &[],
        }
    }
}

/// Applies `pinning` to every thread of `pids`.
pub fn set_affinity(pids: &[u32], pinning: Pinning) -> anyhow::Result<()> {
    let cpus = match pinning {
        Pinning::Pinned => "0".to_string(),
        Pinning::Unpinned => format!("0-{}", num_cpus().saturating_sub(1)),
    };
    for pid in pids {
        let out = Command::new("taskset")
            .args(["-a", "-p", "-c", &cpus, &pid.to_string()])
            .output()?;
        if !out.status.success() {
            bail!("taskset {pid}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    Ok(())
}

pub fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// CPU time (ns) used so far by every thread of `pids`: the first field
/// of each thread's schedstat, nanosecond-precise unlike /proc/pid/stat.
pub fn proxy_cpu_ns(pids: &[u32]) -> u64 {
    pids.iter()
        .flat_map(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/task"))
                .into_iter()
                .flatten()
        })
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|text| text.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Resident set size (bytes) of `pid`, from VmRSS.
pub fn rss_bytes(pid: u32) -> u64 {
    proc_kib_field(pid, "status", "VmRSS:")
}

/// Proportional set size (bytes) of `pid`: each page shared with other
/// processes counted as its share, from smaps_rollup.
pub fn pss_bytes(pid: u32) -> u64 {
    proc_kib_field(pid, "smaps_rollup", "Pss:")
}

/// The `<field> <n> kB` line of `/proc/<pid>/<file>`, in bytes (0 if the
/// process or the line is gone).
fn proc_kib_field(pid: u32, file: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with(field))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(0)
}

/// Kernel memory (bytes) of the eBPF maps `pid` holds open: the
/// `memlock` of each map in its descriptors' fdinfo, each map once.
pub fn bpf_map_bytes(pid: u32) -> u64 {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return 0;
    };
    let mut seen = std::collections::BTreeMap::new();
    for entry in fds.flatten() {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:")) {
            seen.insert(id, memlock);
        }
    }
    seen.values().sum()
}
