//! GetHostUsage: the host (CPUs, memory) and what each running or paused VM uses on it now, for
//! `husk top` and `husk capacity`. The per-VM numbers are the metrics scrape's (`metrics.rs`).

use std::sync::Arc;

use husk_proto::v1::{HostUsage, VmUsage};

use super::metrics::{sample_live, VmSample};
use super::{lock, Daemon, VmEntry};

/// MemTotal and MemAvailable of /proc/meminfo, in bytes.
pub(super) fn host_memory(meminfo: &str) -> (u64, u64) {
    let field = |name: &str| {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map_or(0, |kib| kib * 1024)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

fn vm_usage(s: &VmSample) -> VmUsage {
    let vm = s.entry.snapshot();
    let mut usage = VmUsage {
        id: s.entry.id.clone(),
        name: s.entry.name(),
        state: vm.state,
        vcpus: s.vcpus,
        memory_mib: s.memory_mib,
        cpu_seconds: s.cpu_seconds.unwrap_or(0.0),
        vmm_rss_bytes: s.rss_bytes.unwrap_or(0),
        started_unix_ms: vm.status.as_ref().map_or(0, |st| st.started_unix_ms),
        ..VmUsage::default()
    };
    let Some(info) = &s.info else {
        return usage;
    };
    for d in &info.devices {
        match d.kind.as_str() {
            "block" => {
                usage.disk_read_bytes += d.bytes_read;
                usage.disk_written_bytes += d.bytes_written;
            }
            "net" => {
                usage.net_rx_bytes += d.bytes_read;
                usage.net_tx_bytes += d.bytes_written;
            }
            _ => {}
        }
    }
    if let Some(b) = &info.balloon {
        usage.balloon_bytes = b.actual_mib << 20;
        let stat = |name: &str| b.stats.get(name).copied().unwrap_or(0);
        usage.guest_free_bytes = stat("free_memory");
        usage.guest_available_bytes = stat("available_memory");
        usage.guest_total_bytes = stat("total_memory");
    }
    usage
}

impl Daemon {
    /// See GetHostUsage in husk.proto.
    pub async fn host_usage(&self) -> HostUsage {
        let entries: Vec<Arc<VmEntry>> = lock(&self.vms).values().cloned().collect();
        let vms_total = entries.len() as u32;
        let samples = sample_live(entries).await;
        let (total, available) =
            host_memory(&std::fs::read_to_string("/proc/meminfo").unwrap_or_default());
        HostUsage {
            sampled_unix_ms: super::vm::now_ms(),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            memory_total_bytes: total,
            memory_available_bytes: available,
            max_vms: self.config.max_vms as u32,
            vms_total,
            vms: samples.iter().map(vm_usage).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_fields_become_bytes_and_missing_ones_zero() {
        let text = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   12000000 kB\n";
        assert_eq!(host_memory(text), (24_000_000 * 1024, 12_000_000 * 1024));
        assert_eq!(host_memory("nothing"), (0, 0));
        let real = host_memory(&std::fs::read_to_string("/proc/meminfo").unwrap());
        assert!(real.0 > 0 && real.1 > 0 && real.1 <= real.0);
    }
}
