//! Copy-on-write disks with the real guest: `husk run --rootfs` on a throw-away or kept qcow2
//! overlay, qcow2 data disks over a raw base, huskd VMs sharing one base image, and corrupt
//! images refused. QEMU's own `qemu-img check` judges every image husk wrote.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use husk_proto::v1::{CreateVmRequest, StreamConsoleRequest, VmSpec, VmState};
use husk_tests::huskd::Huskd;
use husk_tests::{bin, require_guest_kvm, run_with_timeout, Finished, Scratch};
use tokio_stream::StreamExt;

const LIMIT: Duration = Duration::from_secs(240);

use husk_tests::husk_run_sh as husk_run;

/// An ext4 root filesystem holding busybox and the applets the tests use.
fn busybox_rootfs(dir: &Path, name: &str) -> PathBuf {
    let tree = dir.join(format!("{name}.tree"));
    husk_tests::busybox_tree(
        &tree,
        &["proc", "sys", "dev", "tmp", "mnt"],
        &[
            "sh", "cat", "echo", "sync", "ls", "md5sum", "dd", "mount", "umount", "rm",
        ],
    );
    let image = dir.join(name);
    husk_tests::ext4_of_tree(&tree, &image, "64M");
    image
}

fn digest(path: &Path) -> Vec<u8> {
    // A cheap fingerprint of the whole file: every byte read, folded.
    let data = std::fs::read(path).unwrap();
    let mut h = [0u64; 4];
    for (i, chunk) in data.chunks(8).enumerate() {
        let mut b = [0u8; 8];
        b[..chunk.len()].copy_from_slice(chunk);
        h[i % 4] =
            h[i % 4].rotate_left(7) ^ u64::from_le_bytes(b).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    h.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn qemu_img_check_clean(path: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(path)
        .output()
        .expect("qemu-img (Debian's qemu-utils, installed by scripts/setup) is needed");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("No errors were found"),
        "qemu-img check {}: {text}",
        path.display()
    );
}

fn assert_ok(run: &Finished) {
    assert_eq!(
        run.code(),
        Some(0),
        "stdout:\n{}\nstderr:\n{}",
        run.stdout(),
        run.stderr()
    );
}

#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn rootfs_writes_go_to_an_overlay_and_the_base_stays_untouched() {
    let s = Scratch::new("cow-rootfs");
    let base = busybox_rootfs(&s.0, "base.ext4");
    let before = digest(&base);
    let overlay = s.path("kept.qcow2");
    let kept = [
        "--rootfs",
        base.to_str().unwrap(),
        "--overlay",
        overlay.to_str().unwrap(),
    ];
    assert_ok(&husk_run(&kept, "echo kept-data > /note; sync"));
    // A reopened overlay takes new writes too (its tables and refcounts as husk left them).
    assert_ok(&husk_run(&kept, "echo more-data >> /note; sync"));
    let again = husk_run(&kept, "cat /note");
    assert_ok(&again);
    assert!(again.stdout().contains("kept-data"), "{}", again.stdout());
    assert!(again.stdout().contains("more-data"), "{}", again.stdout());
    // A throw-away overlay: sees the base only, and its writes vanish.
    let fresh = husk_run(
        &["--rootfs", base.to_str().unwrap()],
        "cat /note 2>/dev/null || echo no-note; echo x > /scratch; cat /scratch",
    );
    assert_ok(&fresh);
    assert!(fresh.stdout().contains("no-note"), "{}", fresh.stdout());
    assert_eq!(digest(&base), before, "the base image changed");
    qemu_img_check_clean(&overlay);
    // --write-rootfs writes the image itself.
    assert_ok(&husk_run(
        &["--rootfs", base.to_str().unwrap(), "--write-rootfs"],
        "echo in-place > /inplace; sync",
    ));
    assert_ne!(
        digest(&base),
        before,
        "--write-rootfs did not write the image"
    );
}

#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn a_qcow2_data_disk_over_a_raw_base_keeps_the_guests_data() {
    let s = Scratch::new("qcow2-disk");
    let base = s.ext4("base.raw", 48);
    let before = digest(&base);
    let top = s.path("data.qcow2");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&base)
        .arg(&top)
        .output()
        .expect("qemu-img is needed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let disk = format!("--disk={}", top.display());
    let write = husk_run(
        &[&disk],
        "mount /dev/vda /mnt && dd if=/dev/urandom of=/mnt/blob bs=64k count=160 2>/dev/null \
         && md5sum /mnt/blob && umount /mnt && sync",
    );
    assert_ok(&write);
    let sum = write
        .stdout()
        .lines()
        .find(|l| l.contains("/mnt/blob"))
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .expect("no md5sum line");
    let read = husk_run(
        &[&disk],
        "echo 3 > /proc/sys/vm/drop_caches; mount -o ro /dev/vda /mnt && md5sum /mnt/blob",
    );
    assert_ok(&read);
    assert!(read.stdout().contains(&sum), "{} vs {sum}", read.stdout());
    qemu_img_check_clean(&top);
    assert_eq!(digest(&base), before, "the raw base changed");
}

#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn huskd_vms_share_one_base_each_with_its_own_overlay() {
    require_guest_kvm();
    let vmm = bin("husk-vmm").display().to_string();
    let huskd = Huskd::start("cow", &["--vmm", &vmm]);
    // The daemon may open files below its fixture directory.
    let base = busybox_rootfs(huskd.state_dir().parent().unwrap(), "cow-base.ext4");
    let before = digest(&base);
    let mut client = huskd.client();
    let script = "cat /who 2>/dev/null || echo nobody-yet; echo $HOSTNAME-wrote > /who; sync";
    let mut ids = Vec::new();
    for name in ["cow-a", "cow-b"] {
        let spec = VmSpec {
            name: name.into(),
            memory_mib: 128,
            rootfs: base.display().to_string(),
            rootfs_copy_on_write: true,
            command: vec!["sh".into(), "-c".into(), script.into()],
            ..Default::default()
        };
        let vm = huskd
            .block_on(client.create_vm(CreateVmRequest {
                spec: Some(spec),
                start: true,
                ..Default::default()
            }))
            .unwrap()
            .into_inner();
        wait_stopped(&huskd, &vm.id);
        ids.push(vm.id);
    }
    // Each VM started from the clean base: neither saw the other's file.
    for name in ["cow-a", "cow-b"] {
        let text = console(&huskd, name);
        assert!(text.contains("nobody-yet"), "{name} console:\n{text}");
    }
    // A second start of cow-a keeps its own overlay.
    let out = huskd.husk(&["start", "cow-a"]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr());
    wait_stopped(&huskd, &ids[0]);
    let text = console(&huskd, "cow-a");
    assert!(text.contains("-wrote"), "cow-a console:\n{text}");
    let overlay = huskd.vm_dir(&ids[0]).join("disk0.qcow2");
    qemu_img_check_clean(&overlay);
    assert_eq!(digest(&base), before, "the shared base changed");
    // Removing the VM removes its overlay.
    let out = huskd.husk(&["rm", "cow-a"]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr());
    assert!(!overlay.exists(), "{} left behind", overlay.display());
}

#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn a_snapshot_clone_goes_on_from_the_snapshots_disk_without_a_copy_of_the_base() {
    require_guest_kvm();
    let vmm = bin("husk-vmm").display().to_string();
    let huskd = Huskd::start("cow-snap", &["--vmm", &vmm]);
    let fixture = huskd.state_dir().parent().unwrap().to_path_buf();
    let base = busybox_rootfs(&fixture, "snap-base.ext4");
    let before = digest(&base);
    let base_arg = base.display().to_string();
    let out = huskd.husk(&[
        "create", "--name", "origin", "--memory", "128", "--rootfs", &base_arg, "--start",
    ]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr());
    huskd.wait_agent("origin", LIMIT);
    huskd.sh("origin", "echo at-snapshot > /state; sync");
    let snap = fixture.join("snap");
    let out = huskd.husk(&["snapshot", "origin", &snap.display().to_string()]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr());
    // The snapshot holds the overlay only (what the VM wrote), not the 64 MiB base.
    let copy = snap.join("disk0.qcow2");
    let copied = std::fs::metadata(&copy).unwrap().len();
    assert!(
        copied < 16 << 20,
        "the snapshot's overlay is {copied} bytes"
    );
    qemu_img_check_clean(&copy);
    // The source goes on writing its own overlay...
    huskd.sh("origin", "echo after-snapshot > /state; sync");
    // ...and two clones each go on from the snapshot's disk state, on overlays of their own.
    for clone in ["clone1", "clone2"] {
        let out = huskd.husk(&["restore", "--name", clone, &snap.display().to_string()]);
        assert_eq!(out.code(), Some(0), "{}", out.stderr());
        huskd.wait_agent(clone, LIMIT);
        assert_eq!(
            huskd.sh(clone, "cat /state").trim(),
            "at-snapshot",
            "{clone}"
        );
        huskd.sh(clone, &format!("echo {clone} > /state; sync"));
    }
    assert_eq!(huskd.sh("clone1", "cat /state").trim(), "clone1");
    assert_eq!(huskd.sh("origin", "cat /state").trim(), "after-snapshot");
    for vm in ["origin", "clone1", "clone2"] {
        let out = huskd.husk(&["stop", vm]);
        assert_eq!(out.code(), Some(0), "{}", out.stderr());
    }
    let clone1 = huskd.get("clone1");
    qemu_img_check_clean(&huskd.vm_dir(&clone1.id).join("disk0.qcow2"));
    qemu_img_check_clean(&copy);
    assert_eq!(digest(&base), before, "the base changed");
    // This image's content is new at every run (file times): its base is of no further use.
    std::fs::remove_file(&base).unwrap();
    let _ = std::fs::remove_file(base.with_extension("lock"));
}

/// Waits until the VM stopped; a failed VM fails the test with its VMM's log.
fn wait_stopped(huskd: &Huskd, id: &str) {
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        let vm = huskd.get(id);
        if vm.state == VmState::Stopped as i32 {
            return;
        }
        if vm.state == VmState::Failed as i32 {
            let log = std::fs::read_to_string(huskd.vm_dir(id).join("vmm.log")).unwrap_or_default();
            let console =
                std::fs::read_to_string(huskd.vm_dir(id).join("console.log")).unwrap_or_default();
            panic!(
                "VM {id} failed: {:?}\nvmm.log:\n{log}\nconsole:\n{console}",
                vm.status
            );
        }
        assert!(
            std::time::Instant::now() < deadline,
            "VM {id} did not stop: {vm:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn console(huskd: &Huskd, vm: &str) -> String {
    let mut client = huskd.client();
    let mut stream = huskd
        .block_on(client.stream_console(StreamConsoleRequest {
            vm: vm.into(),
            follow: false,
        }))
        .unwrap()
        .into_inner();
    let mut text = Vec::new();
    while let Some(chunk) = huskd.block_on(stream.next()) {
        text.extend(chunk.unwrap().data);
    }
    String::from_utf8_lossy(&text).into_owned()
}

/// No guest needed: the image is refused before any VM starts.
#[test]
fn a_corrupt_qcow2_is_refused_before_boot_with_the_reason() {
    let s = Scratch::new("corrupt");
    let bad = s.path("bad.qcow2");
    // The magic and version 3, then a cluster size of 2^40: a header no tool may trust.
    let mut header = vec![0u8; 4096];
    header[..4].copy_from_slice(b"QFI\xfb");
    header[4..8].copy_from_slice(&3u32.to_be_bytes());
    header[20..24].copy_from_slice(&40u32.to_be_bytes());
    std::fs::write(&bad, &header).unwrap();
    let mut cmd = Command::new(bin("husk"));
    cmd.args(["run", "--no-jail", "--disk"])
        .arg(&bad)
        .args(["--", "true"]);
    let run = run_with_timeout(&mut cmd, Duration::from_secs(30));
    assert_eq!(run.code(), Some(125), "stderr:\n{}", run.stderr());
    assert!(
        run.stderr().contains("corrupt qcow2 image") && run.stderr().contains("cluster_bits"),
        "stderr:\n{}",
        run.stderr()
    );
    // A qcow2 file named like a raw image is refused rather than shown to the guest as bytes.
    let hidden = s.path("disk.img");
    std::fs::copy(&bad, &hidden).unwrap();
    let mut cmd = Command::new(bin("husk"));
    cmd.args(["run", "--no-jail", "--disk"])
        .arg(&hidden)
        .args(["--", "true"]);
    let run = run_with_timeout(&mut cmd, Duration::from_secs(30));
    assert_eq!(run.code(), Some(125), "stderr:\n{}", run.stderr());
    assert!(
        run.stderr().contains("name it .qcow2"),
        "stderr:\n{}",
        run.stderr()
    );
}

/// `husk run --image oci-dir:` and `oci-archive:` of one image: its base is built once (the
/// archive finds it in the cache), the image's environment and working directory apply, and
/// what the container writes goes to a throw-away overlay, not the base.
#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn an_oci_image_runs_from_a_cached_base_built_once() {
    require_guest_kvm();
    let scratch = Scratch::new("oci-run");
    let archive = husk_tests::oci::build_oci_image(&scratch.path(""), "husk.test/oci-run:1");
    let layout = scratch.path("layout");
    let dir = format!("oci-dir:{}", layout.display());
    let first = husk_run(
        &["--memory", "128", "--image", &dir],
        "echo \"PATH=$PATH in $(pwd)\"; echo scribble > /written; cat /written",
    );
    let text = first.stdout() + &first.stderr();
    assert_eq!(first.code(), Some(0), "{text}");
    assert!(
        text.contains("PATH=/bin in /"),
        "the image's env and workdir: {text}"
    );
    assert!(text.contains("scribble"), "{text}");
    assert!(
        text.contains("making the base image"),
        "built the first time: {text}"
    );
    let base_line = text
        .lines()
        .find_map(|l| l.split(": base ").nth(1))
        .unwrap_or_else(|| panic!("no base path in: {text}"))
        .trim()
        .to_string();
    let base = PathBuf::from(&base_line);
    let before = digest(&base);
    // The archive of the same image finds the base; nothing is built, the base is unchanged
    // (the earlier run's write went to its overlay).
    let archived = format!("oci-archive:{}", archive.display());
    let second = husk_run(
        &["--memory", "128", "--image", &archived],
        "cat /written 2>/dev/null || echo clean-base",
    );
    let text = second.stdout() + &second.stderr();
    assert_eq!(second.code(), Some(0), "{text}");
    assert!(text.contains("clean-base"), "{text}");
    assert!(
        !text.contains("making the base image"),
        "built again: {text}"
    );
    assert_eq!(digest(&base), before, "the base changed");
    // This image's content is new at every run (file times): its base is of no further use.
    std::fs::remove_file(&base).unwrap();
    let _ = std::fs::remove_file(base.with_extension("lock"));
}
