//! Task stats for a container, reported as the cgroups v1 `Metrics` message that `ctr task
//! metrics` and kubelet's CRI stats decode: for a container with a VM of its own (and a pod's
//! sandbox), what the VM costs on the host, read from the VMM process (`/proc/<pid>/stat` CPU
//! times, `/proc/<pid>/status` resident memory); for a container in a pod's VM, what its own
//! processes use inside the guest (huskd GetContainerStats, measured by the guest agent).

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

/// The metrics of the VMM `pid` with `processes` running in the guest, as an `Any`.
pub fn vmm_metrics(pid: u32, processes: u64) -> Result<Any, StatsError> {
    use husk_init::procfs::{cpu_ticks, rss_bytes, ticks_to_ns};
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|_| StatsError::Gone(pid))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|_| StatsError::Gone(pid))?;
    let ticks = rustix::param::clock_ticks_per_second().max(1);
    let (user, kernel) = cpu_ticks(&stat).ok_or(StatsError::Format(pid))?;
    metrics(
        ticks_to_ns(user, ticks),
        ticks_to_ns(kernel, ticks),
        rss_bytes(&status).unwrap_or(0),
        processes,
    )
}

/// The metrics of a container in a pod's VM, as the guest agent measured them.
pub fn container_metrics(stats: &husk_proto::v1::ContainerStats) -> Result<Any, StatsError> {
    metrics(
        stats.cpu_user_ns,
        stats.cpu_system_ns,
        stats.memory_rss_bytes,
        u64::from(stats.processes),
    )
}

/// CPU time, resident memory and process count as cgroups v1 `Metrics` in an `Any`.
fn metrics(user: u64, kernel: u64, rss: u64, processes: u64) -> Result<Any, StatsError> {
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
    fn a_containers_guest_stats_read_as_cgroups_v1_metrics() {
        let any = container_metrics(&husk_proto::v1::ContainerStats {
            cpu_user_ns: 3,
            cpu_system_ns: 4,
            memory_rss_bytes: 5 << 20,
            processes: 2,
        })
        .unwrap();
        let m = Metrics::parse_from_bytes(&any.value).unwrap();
        assert_eq!(m.cpu.usage.total, 7);
        assert_eq!(m.memory.usage.usage, 5 << 20);
        assert_eq!(m.pids.current, 2);
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
