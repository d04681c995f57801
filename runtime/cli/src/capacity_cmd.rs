//! `husk capacity [--shape CPUS,MEMORY]`: what the host has, what its VMs commit and use, and
//! how many more VMs of a shape fit, from one GetHostUsage sample. See docs/capacity.md for
//! the definitions; in short:
//!
//! - per-VM overhead: the median, over running VMs with balloon statistics whose RSS covers
//!   what their guest says it uses (total - free; a freshly restored clone, mapped lazily, does
//!   not), of the VMM's RSS beyond that use: the VMM's own memory and the guest kernel's
//!   reserved memory;
//! - reclaimable: guest memory that is free in the guest yet still resident on the host (each
//!   VM's RSS less the overhead less what its guest uses), which a balloon target takes back;
//! - a new VM needs its memory plus the overhead when it uses all of it ("each using all"), or
//!   what the running VMs hold per MiB of guest memory ("like the running VMs").

use clap::Args;
use husk_proto::v1::husk_client::HuskClient;
use husk_proto::v1::{GetHostUsageRequest, HostUsage};
use tonic::transport::Channel;

use crate::image_store::{human_size, parse_size};
use crate::remote::RemoteError;

const MIB: u64 = 1 << 20;

/// `husk capacity ...`.
#[derive(Debug, Args)]
pub struct CapacityArgs {
    /// The VM shape to fit: vCPUs and memory (e.g. 1,256M or 2,1G)
    #[arg(long, value_name = "CPUS,MEMORY", default_value = "1,256M", value_parser = parse_shape)]
    pub shape: Shape,
    /// vCPUs the host may run per CPU
    #[arg(long, value_name = "RATIO", default_value_t = 4.0)]
    pub cpu_overcommit: f64,
    /// Host memory kept out of the VMs' reach (for the host and huskd)
    #[arg(long, value_name = "SIZE", default_value = "512M", value_parser = parse_size)]
    pub reserve: u64,
    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub vcpus: u32,
    pub memory_bytes: u64,
}

fn parse_shape(text: &str) -> Result<Shape, String> {
    let (cpus, memory) = text
        .split_once(',')
        .ok_or_else(|| format!("{text:?}: use CPUS,MEMORY (e.g. 1,256M)"))?;
    let vcpus: u32 = cpus
        .trim()
        .parse()
        .ok()
        .filter(|n| (1..=32).contains(n))
        .ok_or_else(|| format!("{cpus:?}: 1 to 32 vCPUs"))?;
    let memory_bytes = parse_size(memory)?;
    if memory_bytes < 64 * MIB {
        return Err("a VM has at least 64 MiB".into());
    }
    Ok(Shape {
        vcpus,
        memory_bytes,
    })
}

/// The report's numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct Capacity {
    pub vms: usize,
    pub committed_vcpus: u64,
    pub committed_memory_bytes: u64,
    pub used_bytes: u64,
    /// `None` when no running VM has balloon statistics.
    pub overhead_bytes: Option<u64>,
    pub reclaimable_bytes: u64,
    pub usable_bytes: u64,
    pub fit_by_cpu: u64,
    pub fit_each_using_all: u64,
    pub fit_with_reclaim: u64,
    /// `None` with no running VMs to learn from.
    pub fit_like_running: Option<u64>,
}

impl Capacity {
    /// The most VMs that fit, CPU and memory both (memory as if each new VM used all of it).
    pub fn fit(&self) -> u64 {
        self.fit_by_cpu.min(self.fit_each_using_all)
    }
}

fn median(mut v: Vec<u64>) -> Option<u64> {
    v.sort_unstable();
    v.get(v.len() / 2).copied()
}

pub fn compute(usage: &HostUsage, shape: Shape, cpu_overcommit: f64, reserve: u64) -> Capacity {
    let vms = &usage.vms;
    // What the guest uses and the host holds for it: its total less its free memory less its
    // balloon (with deflate-on-OOM, husk's default, inflated pages stay in the guest's total,
    // and the host holds none of them).
    let guest_used = |v: &husk_proto::v1::VmUsage| {
        (v.guest_total_bytes > 0).then(|| {
            v.guest_total_bytes
                .saturating_sub(v.guest_free_bytes)
                .saturating_sub(v.balloon_bytes)
        })
    };
    // A restored clone maps its memory file lazily: its RSS is below what its guest uses until
    // the guest has touched it all, and says nothing about the overhead. Such VMs are skipped.
    let overhead = median(
        vms.iter()
            .filter_map(|v| v.vmm_rss_bytes.checked_sub(guest_used(v)?))
            .collect(),
    );
    let reclaimable: u64 = vms
        .iter()
        .filter_map(|v| {
            let used = guest_used(v)?;
            Some(
                v.vmm_rss_bytes
                    .saturating_sub(overhead.unwrap_or(0))
                    .saturating_sub(used)
                    .min(v.guest_free_bytes),
            )
        })
        .sum();
    let usable = usage.memory_available_bytes.saturating_sub(reserve);
    let per_vm = shape.memory_bytes + overhead.unwrap_or(0);
    let committed_vcpus: u64 = vms.iter().map(|v| u64::from(v.vcpus)).sum();
    let vcpu_room = (f64::from(usage.cpus) * cpu_overcommit).floor() as u64;
    let memory: u64 = vms.iter().map(|v| u64::from(v.memory_mib) * MIB).sum();
    let rss: u64 = vms.iter().map(|v| v.vmm_rss_bytes).sum();
    let fit_like_running = (memory > 0 && rss > 0).then(|| {
        let per_guest_byte = rss as f64 / memory as f64;
        (usable as f64 / (shape.memory_bytes as f64 * per_guest_byte)).floor() as u64
    });
    Capacity {
        vms: vms.len(),
        committed_vcpus,
        committed_memory_bytes: memory,
        used_bytes: rss,
        overhead_bytes: overhead,
        reclaimable_bytes: reclaimable,
        usable_bytes: usable,
        fit_by_cpu: vcpu_room.saturating_sub(committed_vcpus) / u64::from(shape.vcpus.max(1)),
        fit_each_using_all: usable / per_vm.max(1),
        fit_with_reclaim: (usable + reclaimable) / per_vm.max(1),
        fit_like_running,
    }
}

fn render(usage: &HostUsage, args: &CapacityArgs, c: &Capacity) -> String {
    let overhead = c
        .overhead_bytes
        .map_or("unknown (no VM with balloon statistics)".into(), |o| {
            format!(
                "{} (median VMM RSS beyond the guest's used memory)",
                human_size(o)
            )
        });
    let like = c
        .fit_like_running
        .map_or("- (no running VMs)".to_string(), |n| n.to_string());
    format!(
        "host             {} CPUs, {} memory, {} available ({} kept for the host)\n\
         committed        {} VMs: {} vCPUs, {} guest memory\n\
         used             {} resident (VMM RSS)\n\
         per-VM overhead  {overhead}\n\
         reclaimable      {} (free in the guests, still resident: a balloon target takes it)\n\
         \n\
         more VMs of {} vCPU, {}:\n\
         \x20 by CPU ({} vCPUs per CPU)       {}\n\
         \x20 by memory, each using all       {}\n\
         \x20 by memory, with reclaim         {}\n\
         \x20 by memory, like the running VMs {like}\n\
         \x20 fit (CPU and memory, each using all) {}\n",
        usage.cpus,
        human_size(usage.memory_total_bytes),
        human_size(usage.memory_available_bytes),
        human_size(args.reserve),
        c.vms,
        c.committed_vcpus,
        human_size(c.committed_memory_bytes),
        human_size(c.used_bytes),
        human_size(c.reclaimable_bytes),
        args.shape.vcpus,
        human_size(args.shape.memory_bytes),
        args.cpu_overcommit,
        c.fit_by_cpu,
        c.fit_each_using_all,
        c.fit_with_reclaim,
        c.fit(),
    )
}

fn to_json(usage: &HostUsage, args: &CapacityArgs, c: &Capacity) -> serde_json::Value {
    serde_json::json!({
        "host": {
            "cpus": usage.cpus,
            "memory_total_bytes": usage.memory_total_bytes,
            "memory_available_bytes": usage.memory_available_bytes,
            "reserve_bytes": args.reserve,
            "cpu_overcommit": args.cpu_overcommit,
        },
        "committed": {
            "vms": c.vms,
            "vcpus": c.committed_vcpus,
            "memory_bytes": c.committed_memory_bytes,
        },
        "used_bytes": c.used_bytes,
        "overhead_bytes_per_vm": c.overhead_bytes,
        "reclaimable_bytes": c.reclaimable_bytes,
        "shape": { "vcpus": args.shape.vcpus, "memory_bytes": args.shape.memory_bytes },
        "fit": {
            "by_cpu": c.fit_by_cpu,
            "by_memory_each_using_all": c.fit_each_using_all,
            "by_memory_with_reclaim": c.fit_with_reclaim,
            "by_memory_like_running": c.fit_like_running,
            "fit": c.fit(),
        },
    })
}

/// Runs `husk capacity`.
pub async fn run(
    client: &mut HuskClient<Channel>,
    args: &CapacityArgs,
) -> Result<i32, RemoteError> {
    let usage = client
        .get_host_usage(GetHostUsageRequest {})
        .await?
        .into_inner();
    let capacity = compute(&usage, args.shape, args.cpu_overcommit, args.reserve);
    if args.json {
        println!("{}", to_json(&usage, args, &capacity));
    } else {
        print!("{}", render(&usage, args, &capacity));
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use husk_proto::v1::VmUsage;

    fn vm(rss_mib: u64, total_mib: u64, free_mib: u64) -> VmUsage {
        VmUsage {
            vcpus: 1,
            memory_mib: 256,
            vmm_rss_bytes: rss_mib * MIB,
            guest_total_bytes: total_mib * MIB,
            guest_free_bytes: free_mib * MIB,
            ..Default::default()
        }
    }

    fn host(vms: Vec<VmUsage>) -> HostUsage {
        HostUsage {
            cpus: 2,
            memory_total_bytes: 4096 * MIB,
            memory_available_bytes: 3072 * MIB,
            vms,
            ..Default::default()
        }
    }

    #[test]
    fn shapes_are_cpus_and_a_size() {
        assert_eq!(
            parse_shape("2,1G"),
            Ok(Shape {
                vcpus: 2,
                memory_bytes: 1 << 30
            })
        );
        assert!(parse_shape("0,1G").is_err());
        assert!(parse_shape("1").is_err());
        assert!(parse_shape("1,32M").is_err());
    }

    #[test]
    fn overhead_reclaim_and_fits_follow_the_definitions() {
        // Guests use 40 MiB (240 total - 200 free); the VMMs hold 50, 60 and 150 MiB, and a
        // lazily restored clone 30 MiB (skipped for the overhead).
        let usage = host(vec![
            vm(50, 240, 200),
            vm(60, 240, 200),
            vm(150, 240, 200),
            vm(30, 240, 200),
        ]);
        let shape = Shape {
            vcpus: 1,
            memory_bytes: 256 * MIB,
        };
        let c = compute(&usage, shape, 4.0, 512 * MIB);
        assert_eq!(c.overhead_bytes, Some(20 * MIB), "median of 10, 20, 110");
        // Resident beyond overhead and use: 0, 0, 90 MiB (at most the guest's free 200).
        assert_eq!(c.reclaimable_bytes, 90 * MIB);
        assert_eq!(c.usable_bytes, 2560 * MIB);
        assert_eq!(c.fit_by_cpu, 8 - 4);
        assert_eq!(c.fit_each_using_all, 2560 / 276);
        assert_eq!(c.fit_with_reclaim, 2650 / 276);
        // 290 MiB resident for 1024 MiB of guests: a 256 MiB VM holds about 72.5 MiB.
        assert_eq!(c.fit_like_running, Some(35));
        assert_eq!(c.fit(), 4);
    }

    #[test]
    fn balloon_pages_are_not_counted_as_used() {
        // 240 total, 100 free, 100 in the balloon: the guest uses 40 and the VMM holds 50.
        let mut v = vm(50, 240, 100);
        v.balloon_bytes = 100 * MIB;
        let shape = Shape {
            vcpus: 1,
            memory_bytes: 256 * MIB,
        };
        let c = compute(&host(vec![v]), shape, 4.0, 0);
        assert_eq!(c.overhead_bytes, Some(10 * MIB));
    }

    #[test]
    fn an_empty_host_has_no_overhead_to_learn_from() {
        let c = compute(
            &host(Vec::new()),
            Shape {
                vcpus: 2,
                memory_bytes: 512 * MIB,
            },
            1.0,
            0,
        );
        assert_eq!((c.overhead_bytes, c.fit_like_running), (None, None));
        assert_eq!((c.fit_by_cpu, c.fit_each_using_all), (1, 6));
    }
}
