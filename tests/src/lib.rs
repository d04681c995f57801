//! Shared helpers for husk's integration tests.
//!
//! Tests that boot a Linux guest need a hardware-style KVM (VT-x/AMD-V). They are marked
//! `#[ignore]` so that a plain `cargo test` on a PVM host lists them as ignored instead of
//! counting them as passed; `scripts/test` runs them with `--ignored` inside `scripts/testbed`.
//! Run directly with `--ignored` where no such KVM exists, they fail with a message saying so.
// Test-harness code: a failed expectation here is a failed test, which is what a panic reports.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod agent;
pub mod containerd;
pub mod cri;
pub mod huskd;
pub mod oci;
pub mod vmm_client;

use std::io::Read;
use std::path::{Path, PathBuf};
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
    use std::os::unix::process::CommandExt;
    let start = Instant::now();
    // Its own process group: on a time-out everything it started goes too (a VMM that outlived
    // it would hold the output pipes open, and reading them would never end).
    let mut child = cmd
        .process_group(0)
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
            // The process group this function created (its leader is `child`).
            let _ = rustix::process::kill_process_group(
                rustix::process::Pid::from_child(&child),
                rustix::process::Signal::KILL,
            );
            let _ = child.kill();
            let _ = child.wait();
            // Whatever escaped the group may still hold the pipes: wait for the output only a
            // little, then report with what there is.
            let (out, err) = join_within(out_reader, err_reader, Duration::from_secs(10));
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

/// Joins both reader threads if they finish within `grace`; empty output for one that does not.
fn join_within(
    out: std::thread::JoinHandle<Vec<u8>>,
    err: std::thread::JoinHandle<Vec<u8>>,
    grace: Duration,
) -> (Vec<u8>, Vec<u8>) {
    let deadline = Instant::now() + grace;
    while !(out.is_finished() && err.is_finished()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let take = |h: std::thread::JoinHandle<Vec<u8>>| {
        if h.is_finished() {
            h.join().unwrap_or_default()
        } else {
            b"(output still held open by a leftover process)".to_vec()
        }
    };
    (take(out), take(err))
}

/// `husk run OPTIONS -- sh -c SCRIPT` (the guest must be able to run: see
/// [`require_guest_kvm`]), finished within 240 s.
pub fn husk_run_sh(options: &[&str], script: &str) -> Finished {
    require_guest_kvm();
    let mut cmd = Command::new(bin("husk"));
    cmd.arg("run")
        .args(options)
        .args(["--", "sh", "-c", script]);
    run_with_timeout(&mut cmd, std::time::Duration::from_secs(240))
}

/// Starts `husk run OPTIONS -- sh -c SCRIPT` in its own process group (so a test can signal the
/// whole run), stdout piped for [`wait_for_line`], stderr inherited.
pub fn spawn_husk(options: &[&str], script: &str) -> std::process::Child {
    use std::os::unix::process::CommandExt;
    require_guest_kvm();
    Command::new(bin("husk"))
        .arg("run")
        .args(options)
        .args(["--", "sh", "-c", script])
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// Reads the child's stdout until a line contains `marker`; the rest is drained in the
/// background so the guest never blocks on a full pipe. Panics with everything seen when the
/// output ends first, or after `limit`.
pub fn wait_for_line(child: &mut std::process::Child, marker: &str, limit: Duration) {
    use std::io::BufRead;
    let stdout = child.stdout.take().expect("stdout must be piped");
    let (tx, rx) = std::sync::mpsc::channel();
    let wanted = marker.to_string();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut sent = false;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if !sent && line.contains(&wanted) {
                let _ = tx.send(Ok(()));
                sent = true;
            }
            seen.push(line);
        }
        if !sent {
            let _ = tx.send(Err(seen.join("\n")));
        }
    });
    match rx.recv_timeout(limit) {
        Ok(Ok(())) => {}
        Ok(Err(out)) => panic!("the guest ended without printing {marker:?}:\n{out}"),
        Err(_) => panic!("no {marker:?} from the guest within {limit:?}"),
    }
}

/// The process `husk run` (pid) started: husk-vmm, or the jailer that execs it (same pid).
pub fn husk_run_child_pid(husk: u32) -> u32 {
    let children = std::fs::read_to_string(format!("/proc/{husk}/task/{husk}/children")).unwrap();
    children
        .split_whitespace()
        .next()
        .expect("husk run has no child process")
        .parse()
        .unwrap()
}

/// Host-initiated vsock through a husk-vmm vsock socket `uds`: `CONNECT port`, send `payload`,
/// close the sending half, and return everything the guest side sent back until it closed.
pub fn vsock_exchange(uds: &std::path::Path, port: u32, payload: &[u8]) -> Vec<u8> {
    use std::io::{BufRead, Write};
    let mut conn = std::os::unix::net::UnixStream::connect(uds).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    conn.write_all(format!("CONNECT {port}\n").as_bytes())
        .unwrap();
    let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
    let mut ok = String::new();
    reader.read_line(&mut ok).unwrap();
    assert!(ok.starts_with("OK "), "handshake answer {ok:?}");
    conn.write_all(payload).unwrap();
    conn.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = Vec::new();
    reader.read_to_end(&mut answer).unwrap();
    answer
}

/// The `husk.spec=` value (guest-init/src/spec.rs) that runs `sh -c SCRIPT` as the application.
pub fn sh_boot_spec(script: &str) -> String {
    husk_init::spec::BootSpec {
        argv: ["sh", "-c", script]
            .iter()
            .map(|a| a.as_bytes().to_vec())
            .collect(),
        ..husk_init::spec::BootSpec::default()
    }
    .encode()
    .unwrap()
}

/// Sends `sig` to the process `pid`; an error when there is no such process (or `pid` is not
/// one: zero or negative).
pub fn signal(pid: i32, sig: rustix::process::Signal) -> rustix::io::Result<()> {
    let pid = rustix::process::Pid::from_raw(pid).ok_or(rustix::io::Errno::SRCH)?;
    rustix::process::kill_process(pid, sig)
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// A scratch directory on the host (mode 0755, so that a jailed VMM's launcher and huskd can
/// reach what the test puts there), removed at the end of the test.
// The TempDir is held only for its Drop, which removes the directory.
pub struct Scratch(pub PathBuf, #[allow(dead_code)] tempfile::TempDir);

impl Scratch {
    pub fn new(name: &str) -> Self {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new()
            .prefix(&format!("husk-{name}-"))
            .permissions(std::fs::Permissions::from_mode(0o755))
            .tempdir()
            .unwrap();
        Self(dir.path().to_path_buf(), dir)
    }

    /// `name` inside the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// An empty ext4 image of `mib` MiB.
    pub fn ext4(&self, name: &str, mib: u32) -> PathBuf {
        let path = self.path(name);
        let out = Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&path)
            .arg(format!("{mib}M"))
            .output()
            .expect("mkfs.ext4 (e2fsprogs) is needed");
        assert!(
            out.status.success(),
            "mkfs.ext4: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        path
    }
}

/// A root file system tree at `tree`: the directories `dirs`, busybox-static in `bin/`, and a
/// link to it for each of `applets`.
pub fn busybox_tree(tree: &Path, dirs: &[&str], applets: &[&str]) {
    for d in dirs.iter().chain(&["bin"]) {
        std::fs::create_dir_all(tree.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", tree.join("bin/busybox"))
        .expect("/bin/busybox (Debian's busybox-static) is needed");
    for applet in applets {
        std::os::unix::fs::symlink("busybox", tree.join("bin").join(applet)).unwrap();
    }
}

/// An ext4 image at `image` of the tree `tree` (`mkfs.ext4 -d`), `size` as mkfs takes it
/// ("64M").
pub fn ext4_of_tree(tree: &Path, image: &Path, size: &str) {
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(tree)
        .arg(image)
        .arg(size)
        .output()
        .expect("mkfs.ext4 (e2fsprogs) is needed");
    assert!(
        out.status.success(),
        "mkfs.ext4: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
