//! Rate limiters seen from a real guest: a disk limited with `husk run --disk-limit` reads at
//! its limit, measured by the guest's own clock.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use husk_tests::{bin, require_guest_kvm, run_with_timeout};

/// Bytes the guest reads: the whole disk, so that readahead cannot read more than this.
const DISK_BYTES: u64 = 16 << 20;
/// The limit (bytes per second) and its burst.
const RATE: u64 = 4 << 20;
const BURST: u64 = 256 << 10;

/// `T0=<uptime> T1=<uptime>` from the guest's output: seconds between them.
fn elapsed(out: &str) -> f64 {
    let field = |key: &str| -> f64 {
        let start = out
            .find(key)
            .unwrap_or_else(|| panic!("no {key} in:\n{out}"))
            + key.len();
        let text: String = out[start..]
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        text.parse()
            .unwrap_or_else(|_| panic!("bad {key}{text} in:\n{out}"))
    };
    field("T1=") - field("T0=")
}

#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn a_rate_limited_disk_reads_at_its_limit_and_never_above() {
    require_guest_kvm();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("limited.img");
    std::fs::write(&image, vec![0x5au8; DISK_BYTES as usize]).unwrap();
    let disk = image.display().to_string();
    let limit = format!("bw={RATE}:{BURST}");
    // /proc/uptime: the guest's clock, 10 ms resolution, over about 4 s.
    let script = format!(
        "read t0 _ < /proc/uptime; dd if=/dev/vda of=/dev/null bs=1M count={} 2>/dev/null; \
         echo dd=$?; read t1 _ < /proc/uptime; echo T0=$t0 T1=$t1",
        DISK_BYTES >> 20
    );
    let mut cmd = Command::new(bin("husk"));
    cmd.args(["run", "--disk", &disk, "--disk-limit", &limit])
        .args(["--", "sh", "-c", &script]);
    let run = run_with_timeout(&mut cmd, Duration::from_secs(120));
    let out = run.stdout();
    assert_eq!(run.code(), Some(0), "{out}\n{}", run.stderr());
    assert!(out.contains("dd=0"), "dd failed:\n{out}");
    let seconds = elapsed(&out);
    // The first BURST bytes come from the full bucket; the rest at RATE.
    let expected = (DISK_BYTES - BURST) as f64 / RATE as f64;
    let throughput = (DISK_BYTES - BURST) as f64 / seconds;
    eprintln!(
        "read {DISK_BYTES} bytes in {seconds:.2} s (expected {expected:.2} s): \
         {throughput:.0} B/s against a limit of {RATE} B/s"
    );
    // The limiter must cap: never more than 10% above the limit. Below it, the guest's own
    // time per request (a buffered read under nested TCG emulation, timed by the guest's clock)
    // adds to the limiter's waits: 11% under the limit was measured in the testbed on
    // 2026-12-07 with the guest kernel of the balloon work (with and without the balloon),
    // within 10% before. A limiter that throttles too hard still fails below 75%.
    let ratio = throughput / RATE as f64;
    assert!(
        (0.75..=1.10).contains(&ratio),
        "throughput {throughput:.0} B/s is {:.1}% of the limit {RATE} B/s (75..=110% expected)",
        ratio * 100.0
    );
}
