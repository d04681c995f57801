//! The testbed provides what its users rely on: an AMD-SVM KVM with nested paging, tun, and the
//! host's files at the host's paths.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use husk_tests::require_guest_kvm;

#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn kvm_is_hardware_style_and_usable() {
    require_guest_kvm();
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm");
    assert!(kvm.is_ok(), "/dev/kvm cannot be opened: {kvm:?}");
    if std::env::var_os("HUSK_IN_TESTBED").is_some() {
        let npt = std::fs::read_to_string("/sys/module/kvm_amd/parameters/npt").unwrap_or_default();
        assert!(
            matches!(npt.trim(), "Y" | "1"),
            "nested paging is off in the testbed: {npt:?}"
        );
    }
}

#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn host_files_are_visible_at_their_host_paths() {
    require_guest_kvm();
    let me = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let text = std::fs::read_to_string(&me).unwrap_or_else(|e| panic!("{}: {e}", me.display()));
    assert!(text.contains("name = \"husk-tests\""));
}
