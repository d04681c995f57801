//! SnapshotVm and RestoreVm through huskd and the `husk` CLI with a real Linux guest
//! (testbed): a file written in the guest is there in the restored VM, the source VM runs on,
//! the restored guest's wall clock is corrected, and bad requests get precise gRPC codes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use husk_proto::v1::{RestoreVmRequest, SnapshotVmRequest, VmState};
use husk_tests::huskd::Huskd;
use husk_tests::{bin, require_guest_kvm};
use tonic::Code;

const BOOT: Duration = Duration::from_secs(120);

#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn huskd_snapshot_and_restore_with_the_cli() {
    require_guest_kvm();
    let vmm = bin("husk-vmm").display().to_string();
    let huskd = Huskd::start("snapshot", &["--vmm", &vmm]);
    let created = huskd.husk(&[
        "create", "--name", "origin", "--memory", "128", "--net", "--start",
    ]);
    assert_eq!(created.code(), Some(0), "{}", created.stderr());
    huskd.wait_agent("origin", BOOT);
    // A marker file, and a wall clock far in the past that only a correction can undo.
    huskd.sh(
        "origin",
        "echo snapshot-marker > /tmp/marker && date -s '2001-09-09 01:46:40'",
    );

    let dir = huskd.dir.join("snap1");
    let mut client = huskd.client();
    let bad = huskd
        .block_on(client.snapshot_vm(SnapshotVmRequest {
            vm: "origin".into(),
            dir: "relative/dir".into(),
            leave_paused: false,
            diff: false,
        }))
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    let missing = huskd
        .block_on(client.restore_vm(RestoreVmRequest {
            dir: huskd.dir.join("nothing-here").display().to_string(),
            ..Default::default()
        }))
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");

    let out = huskd.husk(&["snapshot", "origin", &dir.display().to_string()]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr());
    assert!(out.stdout().contains("MiB"), "{}", out.stdout());
    assert_eq!(
        huskd.get("origin").state,
        VmState::Running as i32,
        "origin not resumed"
    );
    let again = huskd
        .block_on(client.snapshot_vm(SnapshotVmRequest {
            vm: "origin".into(),
            dir: dir.display().to_string(),
            leave_paused: false,
            diff: false,
        }))
        .unwrap_err();
    assert_eq!(again.code(), Code::AlreadyExists, "{again:?}");

    const MAC: &str = "06:00:00:00:00:42";
    let out = huskd.husk(&[
        "restore",
        "--name",
        "copy",
        "--mac",
        MAC,
        &dir.display().to_string(),
    ]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr());
    let copy = huskd.wait_agent("copy", BOOT);
    let origin = huskd.get("origin");
    assert_ne!(copy.id, origin.id);
    assert_ne!(
        copy.status.as_ref().unwrap().vsock_cid,
        origin.status.as_ref().unwrap().vsock_cid,
        "the copy must have its own CID"
    );
    assert_eq!(
        huskd.sh("copy", "cat /tmp/marker").trim(),
        "snapshot-marker"
    );
    // As root huskd jails every VMM, the restored ones too: the snapshot was moved out of the
    // source's jail and mirrored read-only into the copy's.
    if husk_tests::is_root() {
        let pid = copy.status.as_ref().unwrap().vmm_pid;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        assert!(
            !uid.split_whitespace().any(|f| f == "0"),
            "VMM {pid} not jailed: {uid}"
        );
    }
    // The copy has its own tap; huskd moves the guest's eth0 to the new MAC and addresses, and
    // the network works over the restored virtio-net device.
    let status = copy.status.clone().unwrap();
    assert_ne!(status.tap, origin.status.as_ref().unwrap().tap);
    let deadline = Instant::now() + Duration::from_secs(60);
    while huskd.sh("copy", "cat /sys/class/net/eth0/address").trim() != MAC {
        assert!(
            Instant::now() < deadline,
            "the copy's eth0 kept its old MAC"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let ping = huskd.sh("copy", &format!("ping -c 1 -W 5 {}", status.host_ip));
    assert!(ping.contains("1 packets received"), "{ping}");
    // huskd sets the restored guest's clock through the agent once it answers.
    let host_now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let guest: u64 = huskd.sh("copy", "date +%s").trim().parse().unwrap();
        if guest + 120 >= host_now {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the copy's clock stays at {guest}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // A diff snapshot of the copy (its RAM maps snap1's memory file) restores with both files.
    huskd.sh("copy", "echo diff-marker > /tmp/marker2");
    let dir2 = huskd.dir.join("snap2");
    let out = huskd.husk(&["snapshot", "--diff", "copy", &dir2.display().to_string()]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr());
    let out = huskd.husk(&["restore", "--name", "copy2", &dir2.display().to_string()]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr());
    huskd.wait_agent("copy2", BOOT);
    assert_eq!(
        huskd.sh("copy2", "cat /tmp/marker /tmp/marker2"),
        "snapshot-marker\ndiff-marker\n"
    );
    if husk_tests::is_root() {
        // A jailed, freshly booted VM's full snapshot left its jail: no base for a diff.
        let refused = huskd
            .block_on(client.snapshot_vm(SnapshotVmRequest {
                vm: "origin".into(),
                dir: huskd.dir.join("snap3").display().to_string(),
                leave_paused: false,
                diff: true,
            }))
            .unwrap_err();
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
        assert_eq!(huskd.get("origin").state, VmState::Running as i32);
    }
    // The origin's clock was not touched: it still runs in 2001.
    let origin_now: u64 = huskd.sh("origin", "date +%s").trim().parse().unwrap();
    assert!(origin_now < 1_100_000_000, "origin clock {origin_now}");
    for vm in ["copy2", "copy", "origin"] {
        let out = huskd.husk(&["rm", "--force", vm]);
        assert_eq!(out.code(), Some(0), "{}", out.stderr());
    }
}

/// Without a jail (huskd --no-jail, or huskd not run as root) the VMM writes a snapshot straight
/// into the directory huskd opened (through huskd's own fd), so a freshly booted VM takes diffs
/// against its last full snapshot, and a VM restored from such a diff goes on from it.
#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn an_unjailed_vm_takes_diffs_against_its_own_full_snapshot() {
    require_guest_kvm();
    let vmm = bin("husk-vmm").display().to_string();
    let huskd = Huskd::start("snapnojail", &["--vmm", &vmm, "--no-jail"]);
    let created = huskd.husk(&["create", "--name", "box", "--memory", "128", "--start"]);
    assert_eq!(created.code(), Some(0), "{}", created.stderr());
    huskd.wait_agent("box", BOOT);
    let (full, diff) = (huskd.dir.join("full"), huskd.dir.join("diff"));
    let out = huskd.husk(&["snapshot", "box", &full.display().to_string()]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr());
    huskd.sh("box", "echo after-the-full-snapshot > /tmp/marker");
    let out = huskd.husk(&["snapshot", "--diff", "box", &diff.display().to_string()]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr());
    let base = std::fs::read_to_string(diff.join("vm.base")).unwrap();
    assert_eq!(base, full.join("vm.mem").display().to_string());
    for file in ["vm.state", "vm.mem", "vm.pb", "vm.base"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(diff.join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }
    let out = huskd.husk(&["restore", "--name", "copy", &diff.display().to_string()]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr());
    huskd.wait_agent("copy", BOOT);
    assert_eq!(
        huskd.sh("copy", "cat /tmp/marker"),
        "after-the-full-snapshot\n"
    );
}
