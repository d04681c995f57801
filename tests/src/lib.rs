//! Shared helpers for husk's integration tests.
//!
//! Tests that boot a Linux guest need a hardware-style KVM (VT-x/AMD-V). They are marked
//! `#[ignore]` so that a plain `cargo test` on a PVM host lists them as ignored instead of
//! counting them as passed; `scripts/test` runs them with `--ignored` inside `scripts/testbed`.
//! Run directly with `--ignored` where no such KVM exists, they fail with a message saying so.
// Test-harness code: a failed expectation here is a failed test, which is what a panic reports.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod agent;
pub mod huskd;
pub mod vmm_client;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Panics unless this machine has a KVM that can run a Linux guest.
pub fn require_guest_kvm() {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpuinfo.split_whitespace().any(|w| w == "vmx" || w == "svm");
    let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
    let kvm = std::path::Path::new("/dev/kvm").exists();
    assert!(
        kvm && hw && !pvm,
        "this test boots a Linux guest and needs a hardware-style KVM (found: /dev/kvm {kvm}, \
         vmx/svm {hw}, PVM {pvm}); run it through scripts/testbed"
    );
}

/// `$HUSK_HOME`, default `~/.local/share/husk`.
pub fn husk_home() -> PathBuf {
    std::env::var_os("HUSK_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".local/share/husk")
        })
}

/// A file under `$HUSK_HOME` that scripts/setup builds; panics with the fix when it is missing.
pub fn artifact(relative: &str) -> PathBuf {
    let path = husk_home().join(relative);
    assert!(
        path.exists(),
        "{} is missing: run scripts/setup first",
        path.display()
    );
    path
}

/// The directory holding the workspace's binaries (`$HUSK_BIN_DIR`, default target/debug).
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("HUSK_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug"));
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run cargo build --workspace first",
        path.display()
    );
    path
}

/// The result of [`run_with_timeout`].
#[derive(Debug)]
pub struct Finished {
    pub output: Output,
    pub elapsed: Duration,
}

impl Finished {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }
    pub fn code(&self) -> Option<i32> {
        self.output.status.code()
    }
}

/// Runs `cmd` to completion, killing it (and failing the test) after `limit`.
pub fn run_with_timeout(cmd: &mut Command, limit: Duration) -> Finished {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let out = out_reader.join().unwrap_or_default();
            let err = err_reader.join().unwrap_or_default();
            panic!(
                "{cmd:?} did not finish within {limit:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&err)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let output = Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    };
    Finished {
        output,
        elapsed: start.elapsed(),
    }
}
