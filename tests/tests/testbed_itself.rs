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

/// The testbed runs a command with exactly the arguments it was given: newlines, quotes, `$`,
/// backslashes and empty words arrive unchanged in L1 (whose POSIX sh runs the command line).
/// Runs on the host: it starts the testbed itself (an L1, or directly where VT-x/AMD-V exists).
#[test]
fn the_testbed_passes_any_argument_vector_unchanged() {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let args = [
        "plain",
        "two words",
        "multi\nline\nscript",
        "it's",
        "$HOME and `date` and $(id)",
        "back\\slash",
        "",
        "tab\there",
    ];
    let out = std::process::Command::new(repo.join("scripts/testbed"))
        .args(["--timeout", "120", "--", "printf", "[%s]\n"])
        .args(args)
        .output()
        .expect("scripts/testbed runs");
    assert!(
        out.status.success(),
        "scripts/testbed failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected: String = args.iter().map(|a| format!("[{a}]\n")).collect();
    assert_eq!(String::from_utf8_lossy(&out.stdout), expected);
}
