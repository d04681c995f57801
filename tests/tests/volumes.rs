//! Shared host directories (virtio-fs) with the real guest: `husk run -v` reads and writes a
//! host directory, `:ro` is refused by the host even when the guest remounts it read-write,
//! a share lands inside a `--rootfs` root, nothing is left running afterwards; huskd VMs get
//! VmSpec.mounts under the path policy, and their snapshots are refused precisely.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use std::time::Duration;

use husk_proto::v1::{CreateVmRequest, Mount, SnapshotVmRequest, VmSpec};
use husk_tests::huskd::Huskd;
use husk_tests::{bin, require_guest_kvm, Scratch};

const LIMIT: Duration = Duration::from_secs(240);

use husk_tests::husk_run_sh as husk_run;

/// virtiofsd processes on the host (the testbed runs one test at a time).
fn backends() -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .filter(|c| {
            c.split(|b| *b == 0)
                .next()
                .is_some_and(|argv0| argv0.ends_with(b"virtiofsd"))
        })
        .count()
}

#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn a_shared_directory_is_read_and_written_from_the_guest() {
    let scratch = Scratch::new("volume-rw");
    let share = scratch.path("share");
    std::fs::create_dir_all(&share).unwrap();
    std::fs::write(share.join("from-host.txt"), "hello from the host\n").unwrap();
    let volume = format!("{}:/data", share.display());
    let before = backends();
    let out = husk_run(
        &["--memory", "128", "-v", &volume],
        "cat /data/from-host.txt && echo written-by-guest > /data/from-guest.txt \
         && mkdir /data/sub && echo deep > /data/sub/f && sync && echo guest-done",
    );
    assert_eq!(out.code(), Some(0), "{}\n{}", out.stdout(), out.stderr());
    assert!(
        out.stdout().contains("hello from the host"),
        "{}",
        out.stdout()
    );
    assert!(out.stdout().contains("guest-done"), "{}", out.stdout());
    assert_eq!(
        std::fs::read_to_string(share.join("from-guest.txt")).unwrap(),
        "written-by-guest\n"
    );
    assert_eq!(
        std::fs::read_to_string(share.join("sub/f")).unwrap(),
        "deep\n"
    );
    assert_eq!(backends(), before, "a virtiofsd outlived its VM");
}

#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn a_read_only_share_is_refused_by_the_host_even_after_a_guest_remount() {
    let scratch = Scratch::new("volume-ro");
    let share = scratch.path("share");
    std::fs::create_dir_all(&share).unwrap();
    std::fs::write(share.join("keep.txt"), "original\n").unwrap();
    let volume = format!("{}:/data:ro", share.display());
    let before = backends();
    // The guest's own read-only mount refuses first; a root guest can remount it read-write,
    // and then the host's read-only bind mount under virtiofsd must refuse.
    let out = husk_run(
        &["--memory", "128", "-v", &volume],
        "cat /data/keep.txt; \
         if echo x > /data/new.txt; then echo WROTE-RO; else echo refused-by-guest; fi; \
         mount -o remount,rw /data && echo remounted; \
         if echo changed > /data/keep.txt; then echo WROTE-HOST; else echo refused-by-host; fi; \
         if rm /data/keep.txt; then echo REMOVED; fi; true",
    );
    let text = out.stdout() + &out.stderr();
    assert_eq!(out.code(), Some(0), "{text}");
    assert!(text.contains("original"), "{text}");
    assert!(text.contains("refused-by-guest"), "{text}");
    assert!(text.contains("refused-by-host"), "{text}");
    assert!(
        !text.contains("WROTE") && !text.contains("REMOVED"),
        "{text}"
    );
    assert_eq!(
        std::fs::read_to_string(share.join("keep.txt")).unwrap(),
        "original\n"
    );
    assert!(!share.join("new.txt").exists());
    assert_eq!(backends(), before, "a virtiofsd outlived its VM");
}

#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn a_missing_host_directory_is_a_clear_error_before_any_vm() {
    require_guest_kvm();
    let out = husk_run(&["-v", "/nonexistent-husk-share:/data"], "true");
    assert_ne!(out.code(), Some(0));
    assert!(
        out.stderr().contains("/nonexistent-husk-share"),
        "{}",
        out.stderr()
    );
}

#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn huskd_shares_mounts_under_its_path_policy_and_refuses_their_snapshots() {
    require_guest_kvm();
    let vmm = bin("husk-vmm").display().to_string();
    let huskd = Huskd::start("volumes", &["--vmm", &vmm]);
    // The daemon may open what lies below its fixture directory, and nothing else.
    let fixture = huskd.state_dir().parent().unwrap().to_path_buf();
    let share = fixture.join("share");
    std::fs::create_dir_all(&share).unwrap();
    std::fs::write(share.join("in.txt"), "from-host\n").unwrap();
    let mut client = huskd.client();
    let spec = |host: &Path| VmSpec {
        name: "vol".into(),
        memory_mib: 128,
        mounts: vec![Mount {
            host_path: host.display().to_string(),
            guest_path: "/srv/data".into(),
            read_only: false,
        }],
        ..Default::default()
    };
    // Outside the policy: PERMISSION_DENIED, nothing created.
    let outside = Scratch::new("volume-outside");
    let denied = huskd
        .block_on(client.create_vm(CreateVmRequest {
            spec: Some(spec(&outside.path(""))),
            start: false,
            ..Default::default()
        }))
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied}");

    let before = backends();
    let vm = huskd
        .block_on(client.create_vm(CreateVmRequest {
            spec: Some(spec(&share)),
            start: true,
            ..Default::default()
        }))
        .unwrap()
        .into_inner();
    huskd.wait_agent(&vm.id, LIMIT);
    assert!(backends() > before, "no virtiofsd serves the VM");
    let out = huskd.husk(&[
        "exec",
        "vol",
        "sh",
        "-c",
        "cat /srv/data/in.txt && echo from-guest > /srv/data/out.txt && sync",
    ]);
    assert_eq!(out.code(), Some(0), "{}{}", out.stdout(), out.stderr());
    assert!(out.stdout().contains("from-host"), "{}", out.stdout());
    assert_eq!(
        std::fs::read_to_string(share.join("out.txt")).unwrap(),
        "from-guest\n"
    );
    let refused = huskd
        .block_on(client.snapshot_vm(SnapshotVmRequest {
            vm: vm.id.clone(),
            dir: fixture.join("snap").display().to_string(),
            ..Default::default()
        }))
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused}");
    assert!(refused.message().contains("/srv/data"), "{refused}");
    assert!(!fixture.join("snap").exists());
    let out = huskd.husk(&["stop", "vol"]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while backends() > before && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(backends(), before, "a virtiofsd outlived its VM");
}
