//! Snapshot and restore of a real Linux guest (husk-vmm's control socket and --restore-*): a
//! guest process counts into a file and onto the console; the VM is paused, snapshotted and
//! killed; restored VMs go on counting from where it stopped, their disks take new writes, and
//! three clones of one snapshot run side by side, each with its own vsock CID, socket and disk.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use husk_init::spec::PARAM;
use husk_proto::vmm::info;
use husk_tests::agent::{exec_request, AgentClient};
use husk_tests::vmm_client::VmmClient;
use husk_tests::{artifact, bin, require_guest_kvm, sh_boot_spec};

const LIMIT: Duration = Duration::from_secs(240);
const DISK_BYTES: u64 = 1 << 20;

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
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

/// One husk-vmm process with its console, control socket and vsock socket; killed on drop.
struct Vm {
    child: Child,
    console: PathBuf,
    api: PathBuf,
    vsock: PathBuf,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Vm {
    fn spawn(dir: &Scratch, name: &str, args: &[String]) -> Vm {
        let console = dir.path(&format!("{name}.console"));
        let api = dir.path(&format!("{name}.api"));
        let vsock = dir.path(&format!("{name}.vsock"));
        let child = Command::new(bin("husk-vmm"))
            .args(args)
            .arg("--console")
            .arg(format!("file:{}", console.display()))
            .arg("--api-sock")
            .arg(&api)
            .arg("--vsock")
            .arg(format!("cid={},path={}", cid_of(name), vsock.display()))
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        Vm {
            child,
            console,
            api,
            vsock,
        }
    }

    fn client(&self) -> VmmClient {
        VmmClient::connect_when_ready(&self.api, LIMIT).unwrap()
    }

    fn agent(&self) -> AgentClient {
        AgentClient::new(&self.vsock)
    }

    /// Every `count N` the guest printed, in order.
    fn counts(&self) -> Vec<u64> {
        let text = std::fs::read_to_string(&self.console).unwrap_or_default();
        text.lines()
            .filter_map(|l| l.trim().strip_prefix("count "))
            .filter_map(|n| n.trim().parse().ok())
            .collect()
    }

    /// Runs `script` in the guest through the agent; its stdout.
    fn sh(&self, script: &str) -> String {
        self.agent().wait_ready(LIMIT).unwrap();
        let out = self
            .agent()
            .exec(exec_request(&["sh", "-c", script]))
            .unwrap();
        assert_eq!(out.code, Some(0), "{script}: {out:?}");
        out.stdout_text()
    }
}

/// A distinct guest CID per VM name.
fn cid_of(name: &str) -> u32 {
    3 + name.bytes().map(u32::from).sum::<u32>() % 1000
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + LIMIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn disk_contains(path: &Path, text: &str) -> bool {
    let bytes = std::fs::read(path).unwrap();
    bytes.windows(text.len()).any(|w| w == text.as_bytes())
}

/// Counts after a restore must continue the snapshot's count: no reset, no gap beyond the one
/// line that may have been in flight.
fn assert_continues(vm: &Vm, last_before: u64) {
    wait_until("the restored guest counts", || vm.counts().len() >= 3);
    let counts = vm.counts();
    assert!(
        counts[0] > last_before && counts[0] <= last_before + 2,
        "the restored count starts at {} after {last_before}: {counts:?}",
        counts[0]
    );
    assert!(
        counts.windows(2).all(|w| w[1] == w[0] + 1),
        "counts jump: {counts:?}"
    );
    let file: u64 = vm.sh("cat /tmp/counter").trim().parse().unwrap();
    assert!(
        file > last_before,
        "counter file {file} after {last_before}"
    );
}

fn restore_args(state: &Path, mem: &Path, disk: &Path) -> Vec<String> {
    vec![
        "--restore-state".into(),
        state.display().to_string(),
        "--restore-mem".into(),
        mem.display().to_string(),
        "--disk".into(),
        disk.display().to_string(),
    ]
}

#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn a_snapshot_restores_and_clones_with_the_guest_going_on_where_it_stopped() {
    require_guest_kvm();
    let dir = Scratch::new("snapshot");
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; DISK_BYTES as usize]).unwrap();
    let script = "i=0; while true; do i=$((i+1)); echo $i > /tmp/counter; echo \"count $i\"; \
                  sleep 0.02; done";
    let spec = sh_boot_spec(script);
    let origin = Vm::spawn(
        &dir,
        "origin",
        &[
            "--kernel".into(),
            artifact("kernel/vmlinux").display().to_string(),
            "--initrd".into(),
            artifact("images/default.cpio.gz").display().to_string(),
            "--disk".into(),
            disk.display().to_string(),
            "--cmdline".into(),
            format!("quiet {PARAM}{spec}"),
        ],
    );
    let mut client = origin.client();
    origin.agent().wait_ready(LIMIT).unwrap();
    wait_until("the guest counts", || origin.counts().len() >= 5);

    // Snapshot: refused while running, taken while paused, then the origin is killed.
    let (state, mem) = (dir.path("vm.state"), dir.path("vm.mem"));
    let e = client.snapshot(&state, &mem, false).unwrap_err();
    assert!(e.to_string().contains("not paused"), "{e}");
    client.pause().unwrap();
    let done = client.snapshot(&state, &mem, false).unwrap();
    assert_eq!(client.describe().unwrap().state(), info::State::Paused);
    assert_eq!(done.memory_bytes, 256 << 20);
    assert!(
        done.memory_written < done.memory_bytes,
        "the memory file is not sparse: {done:?}"
    );
    eprintln!("snapshot: {done:?}");
    let last = *origin.counts().last().unwrap();
    drop(client);
    drop(origin);

    // Restore into a new process: counting goes on, the disk takes a new write.
    let restored = Vm::spawn(&dir, "restored", &restore_args(&state, &mem, &disk));
    assert_eq!(
        restored.client().describe().unwrap().state(),
        info::State::Running
    );
    assert_continues(&restored, last);
    restored.sh("echo written-after-restore | dd of=/dev/vda conv=fsync 2>/dev/null");
    assert!(disk_contains(&disk, "written-after-restore"));

    // A diff snapshot of the restored VM holds only what changed since the full one, and a VM
    // restored from it (base + diff) goes on from the diff's point.
    let mut client = restored.client();
    client.pause().unwrap();
    let (state2, mem2) = (dir.path("diff.state"), dir.path("diff.mem"));
    let diff = client.snapshot(&state2, &mem2, true).unwrap();
    eprintln!("diff snapshot: {diff:?}");
    assert!(
        diff.memory_written < done.memory_written,
        "the diff wrote {} bytes, the full snapshot {}",
        diff.memory_written,
        done.memory_written
    );
    let last2 = *restored.counts().last().unwrap();
    assert!(last2 > last);
    drop(client);
    drop(restored);
    let from_diff = Vm::spawn(&dir, "fromdiff", &restore_args(&state2, &mem2, &disk));
    assert_continues(&from_diff, last2);
    drop(from_diff);

    // Three clones of the same snapshot at once, each with its own CID, socket and disk.
    let clones: Vec<(Vm, PathBuf)> = (0..3)
        .map(|i| {
            let own_disk = dir.path(&format!("clone{i}.img"));
            std::fs::copy(&disk, &own_disk).unwrap();
            let vm = Vm::spawn(
                &dir,
                &format!("clone{i}"),
                &restore_args(&state, &mem, &own_disk),
            );
            (vm, own_disk)
        })
        .collect();
    let cids: Vec<u32> = (0..3).map(|i| cid_of(&format!("clone{i}"))).collect();
    assert!(cids[0] != cids[1] && cids[1] != cids[2] && cids[0] != cids[2]);
    for (i, (vm, own_disk)) in clones.iter().enumerate() {
        assert_continues(vm, last);
        let text = format!("clone-{i}-was-here");
        vm.sh(&format!(
            "echo {text} | dd of=/dev/vda conv=fsync 2>/dev/null"
        ));
        assert!(disk_contains(own_disk, &text));
        for (j, (_, other)) in clones.iter().enumerate() {
            assert_eq!(
                disk_contains(other, &text),
                i == j,
                "clone {i} wrote disk {j}"
            );
        }
    }
}
