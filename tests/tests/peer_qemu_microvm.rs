//! The testbed's first real check: QEMU's microvm machine with KVM acceleration boots husk's
//! guest kernel to an init that prints a marker. It proves, before any husk code is involved,
//! that the testbed's KVM, the guest kernel and the marker image work together (and it is the
//! peer that husk is measured against in scripts/bench).
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use husk_tests::{artifact, require_guest_kvm, run_with_timeout};

fn qemu_microvm_boot(kernel: &str, cpus: u32) -> husk_tests::Finished {
    require_guest_kvm();
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-M",
        "microvm,acpi=off",
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-m",
        "256",
    ])
    .args([
        "-smp",
        &cpus.to_string(),
        "-nodefaults",
        "-no-user-config",
        "-nographic",
    ])
    .args(["-serial", "stdio", "-no-reboot"])
    .arg("-kernel")
    .arg(artifact(kernel))
    .arg("-initrd")
    .arg(artifact("images/marker.cpio.gz"))
    .args(["-append", "console=ttyS0 reboot=t panic=-1"]);
    run_with_timeout(&mut cmd, Duration::from_secs(120))
}

#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn qemu_microvm_boots_the_guest_vmlinux_to_init() {
    let run = qemu_microvm_boot("kernel/vmlinux", 1);
    let out = run.stdout();
    assert!(
        out.contains("HUSK-BOOT-MARKER"),
        "no marker in the guest console:\n{out}\n{}",
        run.stderr()
    );
    assert!(
        out.contains("Run /init as init process"),
        "kernel did not start /init:\n{out}"
    );
    eprintln!(
        "qemu microvm: vmlinux to marker and exit in {:?}",
        run.elapsed
    );
}

#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn qemu_microvm_boots_the_guest_bzimage_with_two_cpus() {
    let run = qemu_microvm_boot("kernel/bzImage", 2);
    let out = run.stdout();
    assert!(
        out.contains("HUSK-BOOT-MARKER"),
        "no marker in the guest console:\n{out}\n{}",
        run.stderr()
    );
    assert!(
        out.contains("smp: Brought up 1 node, 2 CPUs"),
        "guest did not bring up 2 CPUs:\n{out}"
    );
}
