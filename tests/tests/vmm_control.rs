//! husk-vmm's control socket and exit report with a real Linux guest: pause stops the guest
//! (its console output stops), resume lets it go on, describe shows the device counters, stop
//! ends the VM, and the exit report says so. One boot, several checks.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use husk_init::spec::PARAM;
use husk_proto::vmm::{info, ExitReport};
use husk_tests::vmm_client::VmmClient;
use husk_tests::{artifact, bin, require_guest_kvm, sh_boot_spec};
use prost::Message;

const LIMIT: Duration = Duration::from_secs(180);
/// How long the paused guest is watched for output.
const PAUSED_FOR: Duration = Duration::from_secs(2);

/// A scratch directory, removed at the end of the test.
// The TempDir is held only for its Drop, which removes the directory.
struct Scratch(PathBuf, #[allow(dead_code)] tempfile::TempDir);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("husk-{name}-"))
            .permissions(std::fs::Permissions::from_mode(0o755))
            .tempdir()
            .unwrap();
        Self(dir.path().to_path_buf(), dir)
    }
}

/// husk-vmm, killed if the test fails before it exits.
struct Vmm(Child);

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn console_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + LIMIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn pause_resume_describe_stop_and_exit_report_with_a_real_guest() {
    require_guest_kvm();
    let scratch = Scratch::new("vmm-control");
    let console = scratch.0.join("console");
    let api = scratch.0.join("api.sock");
    let report = scratch.0.join("exit-report");
    let script = "head -c 64 /dev/hwrng >/dev/null; while true; do echo tick; sleep 0.2; done";
    let spec = sh_boot_spec(script);
    let mut vmm = Vmm(Command::new(bin("husk-vmm"))
        .arg("--kernel")
        .arg(artifact("kernel/vmlinux"))
        .arg("--initrd")
        .arg(artifact("images/default.cpio.gz"))
        .arg("--console")
        .arg(format!("file:{}", console.display()))
        .arg("--api-sock")
        .arg(&api)
        .arg("--exit-report")
        .arg(&report)
        .arg("--cmdline")
        .arg(format!("quiet {PARAM}{spec}"))
        .stdin(Stdio::null())
        .spawn()
        .unwrap());

    let mut client = VmmClient::connect_when_ready(&api, LIMIT).unwrap();
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&api).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "control socket mode");
    wait_until("the guest prints ticks", || {
        std::fs::read_to_string(&console).is_ok_and(|c| c.matches("tick").count() >= 2)
    });

    let info = client.describe().unwrap();
    assert_eq!(info.state(), info::State::Running);
    assert_eq!((info.vcpus, info.memory_mib), (1, 256));
    assert!(info.boot_to_init_us > 0, "no boot time: {info:?}");
    let rng = info
        .devices
        .iter()
        .find(|d| d.kind == "rng")
        .unwrap_or_else(|| panic!("no rng device in {info:?}"));
    assert_eq!(rng.slot, 0);
    assert!(
        rng.requests > 0 && rng.bytes_read >= 64,
        "the guest read /dev/hwrng but the counters say {rng:?}"
    );

    let started = Instant::now();
    let info = client.pause().unwrap();
    let pause_latency = started.elapsed();
    assert_eq!(info.state(), info::State::Paused);
    let frozen = console_len(&console);
    std::thread::sleep(PAUSED_FOR);
    assert_eq!(
        console_len(&console),
        frozen,
        "the guest wrote to its console while paused"
    );
    let err = client.pause().unwrap_err().to_string();
    assert!(err.contains("already paused"), "{err}");
    assert_eq!(client.describe().unwrap().state(), info::State::Paused);

    let started = Instant::now();
    let info = client.resume().unwrap();
    let resume_latency = started.elapsed();
    assert_eq!(info.state(), info::State::Running);
    wait_until("the guest prints again after resume", || {
        console_len(&console) > frozen
    });
    let printing_again = started.elapsed();
    // What makes the paused check meaningful: running, the guest prints well within that time.
    assert!(
        printing_again < PAUSED_FOR,
        "the resumed guest took {printing_again:?} to print"
    );
    let err = client.resume().unwrap_err().to_string();
    assert!(err.contains("not paused"), "{err}");
    eprintln!(
        "pause round trip {pause_latency:?}, resume round trip {resume_latency:?}, \
         console output again {printing_again:?} after resume (nested emulation: functional \
         evidence only)"
    );

    // Stop a paused VM: the harder case.
    client.pause().unwrap();
    assert_eq!(client.stop().unwrap().state(), info::State::Stopping);
    let deadline = Instant::now() + LIMIT;
    let status = loop {
        if let Some(status) = vmm.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "husk-vmm did not exit after stop"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(143), "exit status after a stop request");
    assert!(!api.exists(), "the control socket was left behind");

    let report = ExitReport::decode(std::fs::read(&report).unwrap().as_slice()).unwrap();
    assert_eq!(report.exit_status, 143);
    assert_eq!(report.reason, "stopped by request");
    assert_eq!(report.guest_exit_code, None);
}

#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn the_exit_report_carries_the_guest_exit_code() {
    require_guest_kvm();
    let scratch = Scratch::new("vmm-exit-report");
    let report = scratch.0.join("exit-report");
    let spec = sh_boot_spec("exit 7");
    let finished = husk_tests::run_with_timeout(
        Command::new(bin("husk-vmm"))
            .arg("--kernel")
            .arg(artifact("kernel/vmlinux"))
            .arg("--initrd")
            .arg(artifact("images/default.cpio.gz"))
            .args(["--console", "none", "--exit-report"])
            .arg(&report)
            .arg("--cmdline")
            .arg(format!("quiet {PARAM}{spec}")),
        LIMIT,
    );
    assert_eq!(finished.code(), Some(7), "{}", finished.stderr());
    let report = ExitReport::decode(std::fs::read(&report).unwrap().as_slice()).unwrap();
    assert_eq!(
        (
            report.guest_exit_code,
            report.exit_status,
            report.reason.as_str()
        ),
        (Some(7), 7, "guest exited")
    );
}

#[test]
fn a_vmm_that_fails_to_start_writes_an_error_report() {
    let scratch = Scratch::new("vmm-error-report");
    let report = scratch.0.join("exit-report");
    let finished = husk_tests::run_with_timeout(
        Command::new(bin("husk-vmm"))
            .args(["--kernel", "/no/such/vmlinux", "--exit-report"])
            .arg(&report),
        Duration::from_secs(30),
    );
    assert_eq!(finished.code(), Some(125));
    let report = ExitReport::decode(std::fs::read(&report).unwrap().as_slice()).unwrap();
    assert_eq!((report.exit_status, report.guest_exit_code), (125, None));
    assert!(
        report.reason.starts_with("error: ") && report.reason.contains("/no/such/vmlinux"),
        "{}",
        report.reason
    );
}
