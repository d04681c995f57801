//! The VMs' numbers for a Prometheus scrape, read when asked: each live VM's VMM process (CPU
//! time from its cgroup when jailed, else from /proc; resident memory), its shape, and its
//! devices' counters from the VMM's control socket (`describe`, at most [`DESCRIBE_LIMIT`]
//! each, all VMs at once). See docs/metrics.md.

use std::fmt::Write;
use std::sync::Arc;
use std::time::Duration;

use husk_proto::v1::VmState;
use husk_proto::vmm::{vmm_request, vmm_response, Describe, Info, VmmRequest, VmmResponse};

use super::{lock, Daemon, VmEntry};
use crate::metrics::{escape, header};
use crate::wire;

/// How long one VMM may take to describe itself during a scrape.
const DESCRIBE_LIMIT: Duration = Duration::from_secs(1);

/// Every state a VM can be in, with its label value.
const STATES: &[(VmState, &str)] = &[
    (VmState::Created, "created"),
    (VmState::Starting, "starting"),
    (VmState::Running, "running"),
    (VmState::Paused, "paused"),
    (VmState::Stopping, "stopping"),
    (VmState::Stopped, "stopped"),
    (VmState::Failed, "failed"),
];

/// One live VM's numbers (also what GetHostUsage reports, see `usage.rs`).
pub(super) struct VmSample {
    pub entry: Arc<VmEntry>,
    pub labels: String,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub cpu_seconds: Option<f64>,
    pub rss_bytes: Option<u64>,
    pub info: Option<Info>,
}

/// CPU seconds of the VMM `pid`: its cgroup's `usage_usec` when it has a cgroup of its own
/// (a jailed VMM: vCPUs, device threads and anything else in the jail), else its own
/// utime + stime.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let cgroup_of = |who: &str| {
        std::fs::read_to_string(format!("/proc/{who}/cgroup"))
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("0::").map(str::to_string))
    };
    let own = cgroup_of(&pid.to_string());
    if let Some(path) = own.filter(|p| Some(p) != cgroup_of("self").as_ref() && p != "/") {
        let stat = std::fs::read_to_string(format!("/sys/fs/cgroup{path}/cpu.stat")).ok();
        let usec = stat.as_deref().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|v| v.trim().parse::<u64>().ok())
        });
        if let Some(usec) = usec {
            return Some(usec as f64 / 1e6);
        }
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (user, system) = husk_init::procfs::cpu_ticks(&stat)?;
    let ticks = rustix::param::clock_ticks_per_second().max(1);
    Some((user + system) as f64 / ticks as f64)
}

fn rss_bytes(pid: u32) -> Option<u64> {
    husk_init::procfs::rss_bytes(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

async fn describe(entry: &VmEntry) -> Option<Info> {
    let request = VmmRequest {
        msg: Some(vmm_request::Msg::Describe(Describe::default())),
    };
    let reply: VmmResponse = wire::request_reply(&entry.api_socket(), &request, DESCRIBE_LIMIT)
        .await
        .ok()?;
    match reply.msg {
        Some(vmm_response::Msg::Info(info)) => Some(info),
        _ => None,
    }
}

async fn sample(entry: Arc<VmEntry>) -> VmSample {
    let vm = entry.snapshot();
    let spec = vm.spec.clone().unwrap_or_default();
    let pid = vm.status.as_ref().map_or(0, |s| s.vmm_pid);
    let labels = format!(
        "id=\"{}\",vm=\"{}\"",
        escape(&entry.id),
        escape(&entry.name())
    );
    VmSample {
        entry: entry.clone(),
        labels,
        memory_mib: spec.memory_mib,
        vcpus: spec.vcpus,
        cpu_seconds: (pid != 0).then(|| cpu_seconds(pid)).flatten(),
        rss_bytes: (pid != 0).then(|| rss_bytes(pid)).flatten(),
        info: describe(&entry).await,
    }
}

/// Samples every running or paused VM of `entries` at once, in label order.
pub(super) async fn sample_live(entries: Vec<Arc<VmEntry>>) -> Vec<VmSample> {
    let mut tasks = tokio::task::JoinSet::new();
    for entry in entries
        .into_iter()
        .filter(|e| matches!(e.state(), VmState::Running | VmState::Paused))
    {
        tasks.spawn(sample(entry));
    }
    let mut samples = Vec::new();
    while let Some(done) = tasks.join_next().await {
        if let Ok(s) = done {
            samples.push(s);
        }
    }
    samples.sort_by(|a, b| a.labels.cmp(&b.labels));
    samples
}

/// Writes one metric family: `# HELP`, `# TYPE`, then a line per (labels, value).
fn family(out: &mut String, name: &str, kind: &str, help: &str, rows: &[(String, String)]) {
    header(out, name, kind, help);
    for (labels, value) in rows {
        let _ = writeln!(out, "{name}{{{labels}}} {value}");
    }
}

impl Daemon {
    /// The whole page a scrape gets.
    pub async fn render_metrics(&self) -> String {
        let entries: Vec<Arc<VmEntry>> = lock(&self.vms).values().cloned().collect();
        let mut out = String::with_capacity(4096);
        let counts: Vec<(String, String)> = STATES
            .iter()
            .map(|(state, label)| {
                let n = entries.iter().filter(|e| e.state() == *state).count();
                (format!("state=\"{label}\""), n.to_string())
            })
            .collect();
        family(
            &mut out,
            "husk_vms",
            "gauge",
            "VMs huskd holds, by state.",
            &counts,
        );
        header(
            &mut out,
            "husk_vms_max",
            "gauge",
            "VMs huskd holds at most (--max-vms).",
        );
        let _ = writeln!(out, "husk_vms_max {}", self.config.max_vms);

        let samples = sample_live(entries).await;
        let rows = |f: &dyn Fn(&VmSample) -> Option<String>| -> Vec<(String, String)> {
            samples
                .iter()
                .filter_map(|s| f(s).map(|v| (s.labels.clone(), v)))
                .collect()
        };
        family(
            &mut out,
            "husk_vm_cpu_seconds_total",
            "counter",
            "CPU time of a running VM's VMM (its jail's cgroup when jailed): vCPUs and devices.",
            &rows(&|s| s.cpu_seconds.map(|v| format!("{v:.6}"))),
        );
        family(
            &mut out,
            "husk_vm_memory_rss_bytes",
            "gauge",
            "Resident memory of a running VM's VMM process, the guest RAM it touched included.",
            &rows(&|s| s.rss_bytes.map(|v| v.to_string())),
        );
        family(
            &mut out,
            "husk_vm_guest_memory_bytes",
            "gauge",
            "Guest RAM a running VM was given.",
            &rows(&|s| Some((u64::from(s.memory_mib) << 20).to_string())),
        );
        family(
            &mut out,
            "husk_vm_vcpus",
            "gauge",
            "vCPUs of a running VM.",
            &rows(&|s| Some(s.vcpus.to_string())),
        );
        family(
            &mut out,
            "husk_vm_boot_to_init_seconds",
            "gauge",
            "Time from a running VM's VMM start to its guest init's first report (0: none yet).",
            &rows(&|s| {
                s.info
                    .as_ref()
                    .map(|i| format!("{}", i.boot_to_init_us as f64 / 1e6))
            }),
        );
        family(
            &mut out,
            "husk_vm_vsock_connections",
            "gauge",
            "Connections a running VM's vsock device holds open now (the guest agent's included).",
            &rows(&|s| {
                let info = s.info.as_ref()?;
                let vsock = info.devices.iter().find(|d| d.kind == "vsock")?;
                Some(vsock.connections.to_string())
            }),
        );
        balloon_families(&mut out, &samples);
        device_families(&mut out, &samples);
        self.metrics.render(&mut out);
        out
    }
}

/// The balloons of the running VMs that have one, and their guests' memory statistics.
fn balloon_families(out: &mut String, samples: &[VmSample]) {
    type Pick = fn(&husk_proto::vmm::Balloon) -> Option<u64>;
    let families: [(&str, &str, &str, Pick); 5] = [
        (
            "husk_vm_balloon_target_bytes",
            "gauge",
            "Memory a VM's balloon should take back from its guest (SetMemoryTarget).",
            |b| Some(b.target_mib << 20),
        ),
        (
            "husk_vm_balloon_bytes",
            "gauge",
            "Memory the guest holds in its balloon, given back to the host.",
            |b| Some(b.actual_mib << 20),
        ),
        (
            "husk_vm_balloon_reported_bytes_total",
            "counter",
            "Guest memory freed and given back to the host through free page reporting.",
            |b| Some(b.reported_bytes),
        ),
        (
            "husk_vm_guest_free_bytes",
            "gauge",
            "Memory the guest kernel reports free (balloon statistics; as old as the last scrape).",
            |b| b.stats.get("free_memory").copied(),
        ),
        (
            "husk_vm_guest_available_bytes",
            "gauge",
            "Memory the guest kernel reports available (free, plus caches it can drop).",
            |b| b.stats.get("available_memory").copied(),
        ),
    ];
    for (name, kind, help, pick) in families {
        let rows: Vec<(String, String)> = samples
            .iter()
            .filter_map(|s| {
                let balloon = s.info.as_ref()?.balloon.as_ref()?;
                Some((s.labels.clone(), pick(balloon)?.to_string()))
            })
            .collect();
        family(out, name, kind, help, &rows);
    }
}

/// The virtio devices' counters, a row per device of every running VM.
fn device_families(out: &mut String, samples: &[VmSample]) {
    type Pick = fn(&husk_proto::vmm::DeviceCounters) -> u64;
    let families: [(&str, &str, Pick); 4] = [
        (
            "husk_vm_device_requests_total",
            "Requests a device completed: block requests, net frames, vsock packets, rng fills.",
            |d| d.requests,
        ),
        (
            "husk_vm_device_read_bytes_total",
            "Bytes a device read from its backend into guest memory (disk reads, frames received).",
            |d| d.bytes_read,
        ),
        (
            "husk_vm_device_written_bytes_total",
            "Bytes a device wrote out of guest memory to its backend (disk writes, frames sent).",
            |d| d.bytes_written,
        ),
        (
            "husk_vm_device_errors_total",
            "Requests a device refused or failed.",
            |d| d.errors,
        ),
    ];
    for (name, help, pick) in families {
        let mut rows = Vec::new();
        for s in samples {
            for d in s.info.iter().flat_map(|i| &i.devices) {
                let labels = format!(
                    "{},device=\"{}\",slot=\"{}\"",
                    s.labels,
                    escape(&d.kind),
                    d.slot
                );
                rows.push((labels, pick(d).to_string()));
            }
        }
        family(out, name, "counter", help, &rows);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_cpu_time_and_memory() {
        let me = std::process::id();
        assert!(cpu_seconds(me).is_some_and(|s| s >= 0.0));
        assert!(rss_bytes(me).is_some_and(|b| b > 0));
        assert_eq!(rss_bytes(u32::MAX), None);
    }

    #[test]
    fn families_have_help_type_and_one_line_per_row() {
        let mut out = String::new();
        family(
            &mut out,
            "husk_x",
            "gauge",
            "An example.",
            &[
                ("id=\"a\"".into(), "1".into()),
                ("id=\"b\"".into(), "2".into()),
            ],
        );
        assert_eq!(
            out,
            "# HELP husk_x An example.\n# TYPE husk_x gauge\nhusk_x{id=\"a\"} 1\nhusk_x{id=\"b\"} 2\n"
        );
    }
}
