//! Disks attached to a running VM (testbed): a VM created with one empty disk slot gets a raw
//! image through AttachDisk; the guest's virtio_blk driver takes the configuration-change
//! interrupt, re-reads the capacity and reads the image's bytes; DetachDisk takes it away
//! again (size 0). Refusals carry precise gRPC codes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use husk_proto::v1::{AttachDiskRequest, DetachDiskRequest, Disk};
use husk_tests::huskd::Huskd;
use husk_tests::{bin, require_guest_kvm};
use tonic::Code;

const BOOT: Duration = Duration::from_secs(120);
/// The image: 64 sectors, each filled with its own number.
const SECTORS: usize = 64;

/// Polls the guest's size of `dev` (in sectors) until `done` holds it.
fn wait_size(huskd: &Huskd, dev: &str, done: impl Fn(u64) -> bool) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let size: u64 = huskd
            .sh("slots", &format!("cat /sys/block/{dev}/size"))
            .trim()
            .parse()
            .unwrap();
        if done(size) {
            return size;
        }
        assert!(Instant::now() < deadline, "{dev} stayed at {size} sectors");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn a_disk_attached_at_run_time_is_seen_read_and_detached_by_the_guest() {
    require_guest_kvm();
    let vmm = bin("husk-vmm").display().to_string();
    let huskd = Huskd::start("disk-attach", &["--vmm", &vmm]);
    let image = huskd.dir.join("data.raw");
    let bytes: Vec<u8> = (0..SECTORS).flat_map(|s| [s as u8; 512]).collect();
    std::fs::write(&image, &bytes).unwrap();

    let created = huskd.husk(&[
        "create",
        "--name",
        "slots",
        "--memory",
        "128",
        "--disk-slots",
        "1",
        "--start",
    ]);
    assert_eq!(created.code(), Some(0), "{}", created.stderr());
    huskd.wait_agent("slots", BOOT);
    // No rootfs and no --disk: the slot is vda, empty.
    assert_eq!(huskd.sh("slots", "cat /sys/block/vda/size").trim(), "0");
    // Linux never sends requests past the capacity: an empty slot reads as end of device.
    let empty_read = huskd.sh("slots", "dd if=/dev/vda of=/dev/null bs=512 count=1 2>&1");
    assert!(empty_read.contains("0+0 records in"), "{empty_read}");

    let mut client = huskd.client();
    let attach = |slot: u32, path: &str| AttachDiskRequest {
        vm: "slots".into(),
        slot,
        disk: Some(Disk {
            path: path.into(),
            read_only: false,
            ..Default::default()
        }),
    };
    let image_path = image.display().to_string();
    let bad_slot = huskd
        .block_on(client.attach_disk(attach(1, &image_path)))
        .unwrap_err();
    assert_eq!(bad_slot.code(), Code::InvalidArgument, "{bad_slot:?}");
    let outside = huskd
        .block_on(client.attach_disk(attach(0, "/etc/hostname")))
        .unwrap_err();
    assert_eq!(outside.code(), Code::PermissionDenied, "{outside:?}");
    let empty = huskd
        .block_on(client.detach_disk(DetachDiskRequest {
            vm: "slots".into(),
            slot: 0,
        }))
        .unwrap_err();
    assert_eq!(empty.code(), Code::FailedPrecondition, "{empty:?}");

    let out = huskd.husk(&["disk", "attach", "slots", "0", &image_path]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr());
    let vm = huskd.get("slots");
    let attached = &vm.status.as_ref().unwrap().attached_disks;
    assert_eq!(attached.len(), 1, "{attached:?}");
    assert_eq!(attached[0].disk.as_ref().unwrap().path, image_path);
    let again = huskd
        .block_on(client.attach_disk(attach(0, &image_path)))
        .unwrap_err();
    assert_eq!(again.code(), Code::AlreadyExists, "{again:?}");

    let size = wait_size(&huskd, "vda", |s| s > 0);
    assert_eq!(size, SECTORS as u64);
    // Sector 5 holds 512 bytes of 5; the guest reads them through the attached image.
    let od = huskd.sh(
        "slots",
        "dd if=/dev/vda bs=512 skip=5 count=1 2>/dev/null | od -An -tu1 | sort -u",
    );
    // od prints a repeated line once, then `*`.
    let values: Vec<&str> = od.split_whitespace().filter(|v| *v != "*").collect();
    assert!(
        values.iter().all(|v| *v == "5") && !values.is_empty(),
        "{od}"
    );
    // And writes reach the host file.
    huskd.sh(
        "slots",
        "printf 'written-in-guest' | dd of=/dev/vda bs=512 seek=10 conv=sync,fsync 2>/dev/null",
    );
    let host = std::fs::read(&image).unwrap();
    assert_eq!(&host[10 * 512..10 * 512 + 16], b"written-in-guest");

    let out = huskd.husk(&["disk", "detach", "slots", "0"]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr());
    assert_eq!(wait_size(&huskd, "vda", |s| s == 0), 0);
    assert!(huskd.get("slots").status.unwrap().attached_disks.is_empty());
    // The guest kernel saw the configuration change (virtblk_config_changed ->
    // set_capacity_and_notify logs it).
    let dmesg = huskd.sh("slots", "dmesg | grep 'capacity change' || true");
    assert!(
        dmesg.contains("vda"),
        "no capacity change in the guest's log: {dmesg}"
    );
}

/// A qcow2 image with a backing chain, and a copy-on-write attach over a raw base: the guest
/// reads the base's bytes through either; its writes go to the qcow2 image or to the VM's own
/// overlay (`slot0.qcow2`, removed at the detach), and the base is never written.
#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn qcow2_and_copy_on_write_disks_attach_at_run_time() {
    require_guest_kvm();
    let vmm = bin("husk-vmm").display().to_string();
    let huskd = Huskd::start("disk-attach-cow", &["--vmm", &vmm]);
    let base = huskd.dir.join("base.raw");
    let bytes: Vec<u8> = (0..SECTORS).flat_map(|s| [s as u8; 512]).collect();
    std::fs::write(&base, &bytes).unwrap();
    let top = huskd.dir.join("top.qcow2");
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&base)
        .arg(&top)
        .output()
        .expect("qemu-img (qemu-utils) is needed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let created = huskd.husk(&[
        "create",
        "--name",
        "slots",
        "--memory",
        "128",
        "--disk-slots",
        "1",
        "--start",
    ]);
    assert_eq!(created.code(), Some(0), "{}", created.stderr());
    huskd.wait_agent("slots", BOOT);
    let sector = |n: u32| {
        let od = huskd.sh(
            "slots",
            &format!("dd if=/dev/vda bs=512 skip={n} count=1 2>/dev/null | od -An -tu1 | sort -u"),
        );
        // The distinct byte values of the sector.
        od.split_whitespace()
            .filter(|v| *v != "*")
            .map(String::from)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
    };
    let write = |text: &str| {
        huskd.sh(
            "slots",
            &format!("printf '{text}' | dd of=/dev/vda bs=512 seek=7 conv=sync,fsync 2>/dev/null"),
        )
    };
    let check = |image: &std::path::Path| {
        let out = std::process::Command::new("qemu-img")
            .args(["check", "-q", "-f", "qcow2"])
            .arg(image)
            .output()
            .unwrap();
        assert!(out.status.success(), "qemu-img check {}", image.display());
    };

    // 1. The qcow2 image and its raw backing file.
    let top_path = top.display().to_string();
    let out = huskd.husk(&["disk", "attach", "slots", "0", &top_path]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr());
    assert_eq!(wait_size(&huskd, "vda", |s| s > 0), SECTORS as u64);
    assert_eq!(sector(5), ["5"]);
    write("into-the-qcow2");
    let out = huskd.husk(&["disk", "detach", "slots", "0"]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr());
    wait_size(&huskd, "vda", |s| s == 0);
    check(&top);
    assert_eq!(
        std::fs::read(&base).unwrap(),
        bytes,
        "the backing file changed"
    );
    // The write is in the qcow2 image: its guest view, converted, holds it at sector 7.
    let flat = huskd.dir.join("top.flat");
    let out = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(&top)
        .arg(&flat)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let flat = std::fs::read(&flat).unwrap();
    assert_eq!(&flat[7 * 512..7 * 512 + 14], b"into-the-qcow2");
    assert_eq!(flat[5 * 512], 5);

    // 2. Copy-on-write over the raw base: an overlay of the VM's own, gone at the detach.
    let cow = format!("{}:cow", base.display());
    let out = huskd.husk(&["disk", "attach", "slots", "0", &cow]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr());
    assert_eq!(wait_size(&huskd, "vda", |s| s > 0), SECTORS as u64);
    assert_eq!(sector(9), ["9"]);
    write("into-the-overlay");
    let vm = huskd.get("slots");
    let overlay = huskd.vm_dir(&vm.id).join("slot0.qcow2");
    assert!(overlay.exists(), "no overlay at {}", overlay.display());
    let out = huskd.husk(&["disk", "detach", "slots", "0"]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr());
    wait_size(&huskd, "vda", |s| s == 0);
    assert!(!overlay.exists(), "the overlay outlived its detach");
    assert_eq!(std::fs::read(&base).unwrap(), bytes, "the base was written");
}
