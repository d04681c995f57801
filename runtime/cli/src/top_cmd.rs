//! `husk top`: a live view of the host's VMs (state, CPU %, memory, I/O, uptime) from huskd's
//! GetHostUsage, refreshed every `--interval` seconds, sorted by `--sort`; `--once` prints one
//! view (two samples `--interval` apart, for the rates) and `--json` makes it machine-readable.

use std::io::Write;
use std::time::Duration;

use clap::{Args, ValueEnum};
use husk_proto::v1::husk_client::HuskClient;
use husk_proto::v1::{GetHostUsageRequest, HostUsage, VmState, VmUsage};
use tonic::transport::Channel;

use crate::image_store::human_size;
use crate::remote::RemoteError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SortKey {
    Cpu,
    Mem,
    Name,
    Uptime,
    Io,
}

/// `husk top ...`.
#[derive(Debug, Args)]
pub struct TopArgs {
    /// Sort by (descending, but name ascending)
    #[arg(long, value_enum, default_value = "cpu")]
    pub sort: SortKey,
    /// Seconds between samples
    #[arg(long, default_value_t = 2.0, value_parser = interval)]
    pub interval: f64,
    /// Print one view and exit (two samples --interval apart)
    #[arg(long)]
    pub once: bool,
    /// With --once: print JSON
    #[arg(long, requires = "once")]
    pub json: bool,
}

fn interval(text: &str) -> Result<f64, String> {
    let v: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    if (0.1..=3600.0).contains(&v) {
        Ok(v)
    } else {
        Err("the interval must be between 0.1 and 3600 seconds".into())
    }
}

/// One VM's row: its latest sample and rates against the one before.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub vm: VmUsage,
    pub cpu_percent: f64,
    pub io_bytes_per_s: f64,
    pub uptime_s: i64,
}

/// Rows of `now` with rates from `before` (a VM new in `now` gets 0).
pub fn rows(before: &HostUsage, now: &HostUsage, sort: SortKey) -> Vec<Row> {
    let wall = (now.sampled_unix_ms - before.sampled_unix_ms).max(1) as f64 / 1000.0;
    let mut rows: Vec<Row> = now
        .vms
        .iter()
        .map(|vm| {
            let prev = before.vms.iter().find(|p| p.id == vm.id);
            let io = |u: &VmUsage| {
                u.disk_read_bytes + u.disk_written_bytes + u.net_rx_bytes + u.net_tx_bytes
            };
            let (cpu, bytes) = prev.map_or((0.0, 0.0), |p| {
                (
                    (vm.cpu_seconds - p.cpu_seconds).max(0.0),
                    io(vm).saturating_sub(io(p)) as f64,
                )
            });
            Row {
                vm: vm.clone(),
                cpu_percent: cpu / wall * 100.0,
                io_bytes_per_s: bytes / wall,
                uptime_s: if vm.started_unix_ms > 0 {
                    ((now.sampled_unix_ms - vm.started_unix_ms) / 1000).max(0)
                } else {
                    0
                },
            }
        })
        .collect();
    rows.sort_by(|a, b| match sort {
        SortKey::Cpu => b.cpu_percent.total_cmp(&a.cpu_percent),
        SortKey::Mem => b.vm.vmm_rss_bytes.cmp(&a.vm.vmm_rss_bytes),
        SortKey::Io => b.io_bytes_per_s.total_cmp(&a.io_bytes_per_s),
        SortKey::Uptime => b.uptime_s.cmp(&a.uptime_s),
        SortKey::Name => a.vm.name.cmp(&b.vm.name),
    });
    rows
}

fn state_name(state: i32) -> &'static str {
    match VmState::try_from(state) {
        Ok(VmState::Running) => "running",
        Ok(VmState::Paused) => "paused",
        Ok(VmState::Stopping) => "stopping",
        _ => "other",
    }
}

fn uptime(s: i64) -> String {
    match s {
        s if s >= 86400 => format!("{}d{}h", s / 86400, s % 86400 / 3600),
        s if s >= 3600 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m{}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

/// The view as text: a host line, then a table.
pub fn render(now: &HostUsage, rows: &[Row]) -> String {
    let rss: u64 = rows.iter().map(|r| r.vm.vmm_rss_bytes).sum();
    let cpu: f64 = rows.iter().map(|r| r.cpu_percent).sum();
    let mut out = format!(
        "host: {} CPUs, {} of {} memory available; {} VMs running or paused ({} held, max {}): \
         {:.1}% CPU, {} resident\n",
        now.cpus,
        human_size(now.memory_available_bytes),
        human_size(now.memory_total_bytes),
        rows.len(),
        now.vms_total,
        now.max_vms,
        cpu,
        human_size(rss),
    );
    out.push_str(&format!(
        "{:<20} {:<8} {:>6} {:>10} {:>8} {:>9} {:>10} {:>11} {:>8}\n",
        "NAME", "STATE", "CPU%", "RSS", "GUEST", "BALLOON", "GUEST FREE", "I/O/s", "UPTIME"
    ));
    for r in rows {
        let free = if r.vm.guest_free_bytes > 0 {
            human_size(r.vm.guest_free_bytes)
        } else {
            "-".into()
        };
        out.push_str(&format!(
            "{:<20} {:<8} {:>6.1} {:>10} {:>8} {:>9} {:>10} {:>11} {:>8}\n",
            truncate(&r.vm.name, 20),
            state_name(r.vm.state),
            r.cpu_percent,
            human_size(r.vm.vmm_rss_bytes),
            human_size(u64::from(r.vm.memory_mib) << 20),
            human_size(r.vm.balloon_bytes),
            free,
            human_size(r.io_bytes_per_s as u64),
            uptime(r.uptime_s),
        ));
    }
    out
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n - 1).chain(['~']).collect()
    }
}

/// The view as JSON: the host and one object per VM.
pub fn to_json(now: &HostUsage, rows: &[Row]) -> serde_json::Value {
    let vms: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "id": r.vm.id,
                "name": r.vm.name,
                "state": state_name(r.vm.state),
                "vcpus": r.vm.vcpus,
                "memory_mib": r.vm.memory_mib,
                "cpu_percent": (r.cpu_percent * 10.0).round() / 10.0,
                "vmm_rss_bytes": r.vm.vmm_rss_bytes,
                "balloon_bytes": r.vm.balloon_bytes,
                "guest_free_bytes": r.vm.guest_free_bytes,
                "guest_available_bytes": r.vm.guest_available_bytes,
                "disk_read_bytes": r.vm.disk_read_bytes,
                "disk_written_bytes": r.vm.disk_written_bytes,
                "net_rx_bytes": r.vm.net_rx_bytes,
                "net_tx_bytes": r.vm.net_tx_bytes,
                "io_bytes_per_second": r.io_bytes_per_s.round(),
                "uptime_seconds": r.uptime_s,
            })
        })
        .collect();
    serde_json::json!({
        "host": {
            "cpus": now.cpus,
            "memory_total_bytes": now.memory_total_bytes,
            "memory_available_bytes": now.memory_available_bytes,
            "vms_total": now.vms_total,
            "max_vms": now.max_vms,
        },
        "vms": vms,
    })
}

async fn sample(client: &mut HuskClient<Channel>) -> Result<HostUsage, RemoteError> {
    Ok(client
        .get_host_usage(GetHostUsageRequest {})
        .await?
        .into_inner())
}

/// Runs `husk top`.
pub async fn run(client: &mut HuskClient<Channel>, args: &TopArgs) -> Result<i32, RemoteError> {
    let pause = Duration::from_secs_f64(args.interval);
    let mut before = sample(client).await?;
    loop {
        tokio::time::sleep(pause).await;
        let now = sample(client).await?;
        let rows = rows(&before, &now, args.sort);
        if args.once {
            if args.json {
                println!("{}", to_json(&now, &rows));
            } else {
                print!("{}", render(&now, &rows));
            }
            return Ok(0);
        }
        // Home, clear the screen, draw: a plain refresh any terminal understands.
        let mut stdout = std::io::stdout().lock();
        let _ = write!(stdout, "\x1b[H\x1b[2J{}", render(&now, &rows));
        let _ = stdout.flush();
        before = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(id: &str, cpu: f64, rss: u64, started: i64) -> VmUsage {
        VmUsage {
            id: id.into(),
            name: format!("vm-{id}"),
            state: VmState::Running as i32,
            memory_mib: 128,
            cpu_seconds: cpu,
            vmm_rss_bytes: rss,
            disk_read_bytes: 1000,
            started_unix_ms: started,
            ..Default::default()
        }
    }

    fn host(at: i64, vms: Vec<VmUsage>) -> HostUsage {
        HostUsage {
            sampled_unix_ms: at,
            cpus: 2,
            memory_total_bytes: 4 << 30,
            memory_available_bytes: 2 << 30,
            max_vms: 10,
            vms_total: vms.len() as u32,
            vms,
        }
    }

    #[test]
    fn rates_come_from_two_samples_and_new_vms_start_at_zero() {
        let before = host(10_000, vec![vm("a", 1.0, 10, 0), vm("b", 5.0, 30, 4_000)]);
        let mut later_a = vm("a", 1.5, 10, 0);
        later_a.disk_read_bytes = 3000;
        let now = host(
            12_000,
            vec![later_a, vm("b", 5.1, 30, 4_000), vm("c", 9.0, 20, 11_000)],
        );
        let by_cpu = rows(&before, &now, SortKey::Cpu);
        let names: Vec<&str> = by_cpu.iter().map(|r| r.vm.id.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert!((by_cpu[0].cpu_percent - 25.0).abs() < 1e-9);
        assert!((by_cpu[0].io_bytes_per_s - 1000.0).abs() < 1e-9);
        assert_eq!(by_cpu[2].cpu_percent, 0.0, "a new VM has no rate yet");
        assert_eq!(by_cpu[1].uptime_s, 8);
        let by_mem = rows(&before, &now, SortKey::Mem);
        assert_eq!(by_mem[0].vm.id, "b");
        let by_name = rows(&before, &now, SortKey::Name);
        assert_eq!(by_name[0].vm.id, "a");
    }

    #[test]
    fn the_views_hold_every_vm() {
        let before = host(0, vec![vm("a", 0.0, 50 << 20, 0)]);
        let now = host(1000, vec![vm("a", 0.2, 50 << 20, 0)]);
        let rows = rows(&before, &now, SortKey::Cpu);
        let text = render(&now, &rows);
        assert!(text.contains("vm-a"), "{text}");
        assert!(text.contains("20.0"), "{text}");
        assert!(text.starts_with("host: 2 CPUs"), "{text}");
        let json = to_json(&now, &rows);
        assert_eq!(json["vms"][0]["cpu_percent"], 20.0);
        assert_eq!(json["host"]["cpus"], 2);
        assert_eq!(uptime(3725), "1h2m");
        assert_eq!(truncate("abcdef", 4), "abc~");
    }
}
