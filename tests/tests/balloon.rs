//! virtio-balloon with a real Linux guest through huskd and the `husk` CLI (testbed): free page
//! reporting gives memory the guest touched and freed back to the host, a target inflates and
//! deflates the balloon, deflate-on-OOM lets the guest take memory back under pressure, the
//! balloon survives a snapshot and a restore, `husk top` and `husk capacity` report the VMs,
//! and bad requests get precise gRPC codes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use husk_proto::v1::{
    GetVmMemoryRequest, RestoreVmRequest, SetMemoryTargetRequest, SnapshotVmRequest, VmMemory,
};
use husk_tests::huskd::Huskd;
use husk_tests::{bin, require_guest_kvm};
use tonic::Code;

const BOOT: Duration = Duration::from_secs(120);
const MIB: u64 = 1 << 20;

fn memory(huskd: &Huskd, vm: &str) -> VmMemory {
    let mut client = huskd.client();
    huskd
        .block_on(client.get_vm_memory(GetVmMemoryRequest { vm: vm.into() }))
        .unwrap()
        .into_inner()
}

fn set_target(huskd: &Huskd, vm: &str, target_mib: u64) -> Result<VmMemory, tonic::Status> {
    let mut client = huskd.client();
    huskd
        .block_on(client.set_memory_target(SetMemoryTargetRequest {
            vm: vm.into(),
            target_mib,
        }))
        .map(tonic::Response::into_inner)
}

/// Polls the VM's memory until `done` holds (panics with the last view after `limit`).
fn wait_memory(
    huskd: &Huskd,
    vm: &str,
    what: &str,
    limit: Duration,
    done: impl Fn(&VmMemory) -> bool,
) -> VmMemory {
    let deadline = Instant::now() + limit;
    loop {
        let m = memory(huskd, vm);
        if done(&m) {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "{vm}: {what} not within {limit:?}: {m:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// MemFree of the guest, in bytes.
fn guest_mem_free(huskd: &Huskd, vm: &str) -> u64 {
    let line = huskd.sh(vm, "grep MemFree /proc/meminfo");
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn the_balloon_reclaims_freed_memory_follows_targets_and_survives_a_restore() {
    require_guest_kvm();
    let vmm = bin("husk-vmm").display().to_string();
    let huskd = Huskd::start("balloon", &["--vmm", &vmm]);
    let created = huskd.husk(&["create", "--name", "b1", "--memory", "256", "--start"]);
    assert_eq!(created.code(), Some(0), "{}", created.stderr());
    huskd.wait_agent("b1", BOOT);

    // The guest's driver took every part, and its statistics arrive (each call asks for more).
    let m = wait_memory(&huskd, "b1", "guest statistics", BOOT, |m| {
        m.guest_stats.contains_key("total_memory")
    });
    assert!(m.balloon && m.free_page_reporting, "{m:?}");
    assert_eq!(m.memory_mib, 256);
    let total = m.guest_stats["total_memory"];
    assert!(
        (200 * MIB..=256 * MIB).contains(&total),
        "guest total {total}"
    );

    // Free page reporting: 100 MiB touched in a tmpfs, then freed, comes back to the host.
    huskd.sh(
        "b1",
        "mkdir -p /tmp/fill && mount -t tmpfs -o size=200m tmpfs /tmp/fill",
    );
    let idle = memory(&huskd, "b1").vmm_rss_bytes;
    huskd.sh(
        "b1",
        "dd if=/dev/zero of=/tmp/fill/f bs=1M count=100 2>/dev/null",
    );
    let touched = memory(&huskd, "b1");
    assert!(
        touched.vmm_rss_bytes >= idle + 90 * MIB,
        "RSS {idle} -> {} after touching 100 MiB",
        touched.vmm_rss_bytes
    );
    huskd.sh("b1", "rm /tmp/fill/f");
    let freed = wait_memory(&huskd, "b1", "freed memory given back", BOOT, |m| {
        m.vmm_rss_bytes + 60 * MIB <= touched.vmm_rss_bytes
    });
    assert!(
        freed.reported_bytes >= 60 * MIB,
        "reported {} bytes",
        freed.reported_bytes
    );
    eprintln!(
        "VMM RSS: idle {} MiB, after touching 100 MiB {} MiB, after freeing it {} MiB",
        idle / MIB,
        touched.vmm_rss_bytes / MIB,
        freed.vmm_rss_bytes / MIB
    );

    // A target: the guest inflates to it (its free memory falls), then deflates back to 0.
    let free_before = guest_mem_free(&huskd, "b1");
    let out = huskd.husk(&["memory", "b1", "--target", "100M"]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr());
    assert!(out.stdout().contains("100 MiB target"), "{}", out.stdout());
    wait_memory(&huskd, "b1", "inflation to 100 MiB", BOOT, |m| {
        m.balloon_actual_mib == 100
    });
    let free_inflated = guest_mem_free(&huskd, "b1");
    assert!(
        free_inflated + 80 * MIB <= free_before,
        "guest MemFree {free_before} -> {free_inflated} with a 100 MiB balloon"
    );
    let m = set_target(&huskd, "b1", 0).unwrap();
    assert_eq!(m.balloon_target_mib, 0);
    wait_memory(&huskd, "b1", "deflation to 0", BOOT, |m| {
        m.balloon_actual_mib == 0
    });

    // Deflate on OOM: with 160 of 256 MiB in the balloon, the guest still writes 80 MiB; its
    // driver gives pages back instead of the OOM killer ending the writer.
    set_target(&huskd, "b1", 160).unwrap();
    wait_memory(&huskd, "b1", "inflation to 160 MiB", BOOT, |m| {
        m.balloon_actual_mib == 160
    });
    huskd.sh(
        "b1",
        "dd if=/dev/zero of=/tmp/fill/g bs=1M count=80 2>/dev/null && rm /tmp/fill/g",
    );
    let after_oom = memory(&huskd, "b1");
    assert!(
        after_oom.balloon_actual_mib < 160,
        "the balloon did not deflate under pressure: {after_oom:?}"
    );

    // Bad requests.
    let too_big = set_target(&huskd, "b1", 257).unwrap_err();
    assert_eq!(too_big.code(), Code::InvalidArgument, "{too_big:?}");
    let unknown = set_target(&huskd, "nope", 1).unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");

    // Snapshot and restore: the clone keeps the balloon's target and size, and its balloon
    // still works (statistics come, a new target is followed).
    set_target(&huskd, "b1", 64).unwrap();
    wait_memory(&huskd, "b1", "a 64 MiB balloon", BOOT, |m| {
        m.balloon_actual_mib == 64
    });
    let dir = huskd.dir.join("snap");
    let mut client = huskd.client();
    huskd
        .block_on(client.snapshot_vm(SnapshotVmRequest {
            vm: "b1".into(),
            dir: dir.display().to_string(),
            leave_paused: false,
            diff: false,
        }))
        .unwrap();
    huskd
        .block_on(client.restore_vm(RestoreVmRequest {
            dir: dir.display().to_string(),
            name: "b2".into(),
            ..Default::default()
        }))
        .unwrap();
    huskd.wait_agent("b2", BOOT);
    let clone = memory(&huskd, "b2");
    assert!(clone.balloon, "{clone:?}");
    assert_eq!(
        (clone.balloon_target_mib, clone.balloon_actual_mib),
        (64, 64)
    );
    wait_memory(&huskd, "b2", "fresh statistics in the clone", BOOT, |m| {
        m.guest_stats.contains_key("free_memory") && m.stats_age_ms < 5_000
    });
    set_target(&huskd, "b2", 0).unwrap();
    wait_memory(&huskd, "b2", "the clone's deflation", BOOT, |m| {
        m.balloon_actual_mib == 0
    });

    // husk top and husk capacity see both VMs, with the balloon's statistics.
    let top = huskd.husk(&[
        "top",
        "--once",
        "--json",
        "--interval",
        "1",
        "--sort",
        "name",
    ]);
    assert_eq!(top.code(), Some(0), "{}", top.stderr());
    let top: serde_json::Value = serde_json::from_str(&top.stdout()).unwrap();
    let vms = top["vms"].as_array().unwrap();
    let names: Vec<&str> = vms.iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["b1", "b2"], "{top}");
    for v in vms {
        assert!(v["vmm_rss_bytes"].as_u64().unwrap() > 10 * MIB, "{v}");
        assert!(v["guest_free_bytes"].as_u64().unwrap() > 0, "{v}");
        assert!(v["cpu_percent"].as_f64().unwrap() >= 0.0, "{v}");
        assert!(v["uptime_seconds"].as_i64().unwrap() >= 1, "{v}");
    }
    let cap = huskd.husk(&["capacity", "--shape", "1,128M", "--json"]);
    assert_eq!(cap.code(), Some(0), "{}", cap.stderr());
    let cap: serde_json::Value = serde_json::from_str(&cap.stdout()).unwrap();
    assert_eq!(cap["committed"]["vms"], 2, "{cap}");
    assert_eq!(cap["committed"]["memory_bytes"], 512 * MIB, "{cap}");
    let overhead = cap["overhead_bytes_per_vm"].as_u64().unwrap();
    assert!(overhead < 256 * MIB, "{cap}");
    let cpus = cap["host"]["cpus"].as_u64().unwrap();
    assert_eq!(cap["fit"]["by_cpu"], cpus * 4 - 2, "{cap}");
    let text = huskd.husk(&["capacity"]);
    assert!(
        text.stdout().contains("per-VM overhead"),
        "{}",
        text.stdout()
    );
    eprintln!("husk capacity:\n{}", text.stdout());

    // A VM without a balloon boots, and refuses targets.
    let created = huskd.husk(&[
        "create",
        "--name",
        "plain",
        "--memory",
        "128",
        "--no-balloon",
        "--start",
    ]);
    assert_eq!(created.code(), Some(0), "{}", created.stderr());
    huskd.wait_agent("plain", BOOT);
    assert!(!memory(&huskd, "plain").balloon);
    let none = set_target(&huskd, "plain", 10).unwrap_err();
    assert_eq!(none.code(), Code::FailedPrecondition, "{none:?}");
    let json = huskd.husk(&["memory", "plain", "--json"]);
    assert_eq!(json.code(), Some(0), "{}", json.stderr());
    let value: serde_json::Value = serde_json::from_str(&json.stdout()).unwrap();
    assert_eq!(value["balloon"], serde_json::Value::Null);
    assert_eq!(value["memory_mib"], 128);
}
