//! Task stats for a container: what its VM costs on the host, read from the VMM process
//! (`/proc/<pid>/stat` CPU times, `/proc/<pid>/status` resident memory), reported as the
//! cgroups v1 `Metrics` message that `ctr task metrics` and kubelet's CRI stats decode.

use containerd_shim_protos::cgroups::metrics::{
    CPUStat, CPUUsage, MemoryEntry, MemoryStat, Metrics, PidsStat,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::{Message, MessageField, MessageFull};

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("the VM's process {0} is gone")]
    Gone(u32),
    #[error("/proc/{0}/stat is not in the expected format")]
    Format(u32),
    #[error("encoding the metrics: {0}")]
    Encode(String),
}

/// CPU time (user, system) in nanoseconds from the text of `/proc/<pid>/stat`.
fn cpu_ns(stat: &str, ticks_per_second: u64) -> Option<(u64, u64)> {
    // Fields after the command name (which may contain spaces and parentheses).
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let ns = |ticks: u64| ticks.saturating_mul(1_000_000_000) / ticks_per_second.max(1);
    Some((ns(utime), ns(stime)))
}

/// Resident memory in bytes from the text of `/proc/<pid>/status`.
fn rss_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The metrics of the VMM `pid` with `processes` running in the guest, as an `Any`.
pub fn vmm_metrics(pid: u32, processes: u64) -> Result<Any, StatsError> {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|_| StatsError::Gone(pid))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|_| StatsError::Gone(pid))?;
    let ticks = rustix::param::clock_ticks_per_second().max(1);
    let (user, kernel) = cpu_ns(&stat, ticks).ok_or(StatsError::Format(pid))?;
    let rss = rss_bytes(&status).unwrap_or(0);
    let mut m = Metrics::new();
    let mut usage = CPUUsage::new();
    usage.user = user;
    usage.kernel = kernel;
    usage.total = user + kernel;
    let mut cpu = CPUStat::new();
    cpu.usage = MessageField::some(usage);
    m.cpu = MessageField::some(cpu);
    let mut entry = MemoryEntry::new();
    entry.usage = rss;
    let mut memory = MemoryStat::new();
    memory.rss = rss;
    memory.usage = MessageField::some(entry);
    m.memory = MessageField::some(memory);
    let mut pids = PidsStat::new();
    pids.current = processes;
    m.pids = MessageField::some(pids);
    let mut any = Any::new();
    any.type_url = Metrics::descriptor().full_name().to_string();
    any.value = m
        .write_to_bytes()
        .map_err(|e| StatsError::Encode(e.to_string()))?;
    Ok(any)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_are_parsed() {
        let stat = "1234 (husk vmm (x)) S 1 1234 1234 0 -1 4194560 500 0 0 0 250 100 0 0 20 0 3 0";
        assert_eq!(cpu_ns(stat, 100), Some((2_500_000_000, 1_000_000_000)));
        assert_eq!(cpu_ns("garbage", 100), None);
        assert_eq!(rss_bytes("Name:\tx\nVmRSS:\t  2048 kB\n"), Some(2 << 20));
    }

    #[test]
    fn this_process_reads_as_cgroups_v1_metrics() {
        let any = vmm_metrics(std::process::id(), 3).unwrap();
        assert_eq!(any.type_url, "io.containerd.cgroups.v1.Metrics");
        let m = Metrics::parse_from_bytes(&any.value).unwrap();
        assert!(m.memory.usage.usage > 0);
        assert_eq!(m.pids.current, 3);
        assert!(matches!(vmm_metrics(u32::MAX, 0), Err(StatsError::Gone(_))));
    }
}
