//! husk-jailer and the seccomp filters with a real Linux guest: `husk run` as root jails the VMM
//! by default. The guest uses block, net and vsock with every filter on (kill mode); the VMM
//! runs as the unprivileged uid, in its own mount namespace, and sees only its jail;
//! memory.max kills an over-limit VMM and leaves another VM alone; no jail directory, cgroup or
//! mount remains after the VM ends or its VMM is killed with SIGKILL.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use husk_tests::{husk_run_child_pid as vmm_pid, spawn_husk, vsock_exchange, wait_for_line};

const LIMIT: Duration = Duration::from_secs(240);
const JAIL_BASE: &str = "/run/husk/jail";

/// A scratch directory the jailed VMM (uid 65534) may create its sockets in.
// The TempDir is held only for its Drop, which removes the directory.
struct Scratch(PathBuf, #[allow(dead_code)] tempfile::TempDir);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("husk-jail-{name}-"))
            .permissions(std::fs::Permissions::from_mode(0o755))
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), PermissionsExt::from_mode(0o1777)).unwrap();
        Self(dir.path().to_path_buf(), dir)
    }
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "husk run did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn status_field(pid: u32, task: &str, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{task}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn cgroup2_mount() -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            if !right.starts_with("cgroup2 ") {
                return None;
            }
            Some(PathBuf::from(left.split(' ').nth(4)?))
        })
        .expect("a cgroup2 mount in the testbed")
}

/// Nothing of jail `id` is left: directory, cgroup, mounts.
fn assert_no_trace(id: &str) {
    let dir = Path::new(JAIL_BASE).join(id);
    let cgroup = cgroup2_mount().join("husk").join(id);
    let deadline = Instant::now() + Duration::from_secs(5);
    while (dir.exists() || cgroup.exists()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!dir.exists(), "{} is left", dir.display());
    assert!(!cgroup.exists(), "{} is left", cgroup.display());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(id), "a mount of {id} is left:\n{mounts}");
}

/// What the jailed VMM sees as "/", read through /proc/<pid>/root.
fn jail_root_entries(pid: u32) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn ext4(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&path)
        .arg("16M")
        .output()
        .unwrap();
    assert!(out.status.success(), "mkfs.ext4 failed");
    path
}

#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn a_jailed_filtered_vm_uses_block_net_and_vsock_and_sees_only_its_jail() {
    let scratch = Scratch::new("devices");
    let image = ext4(&scratch.0, "data.img");
    // Root-owned, mode 0600: only the fd husk passes gets the jailed VMM to it.
    std::fs::set_permissions(&image, PermissionsExt::from_mode(0o600)).unwrap();
    let uds = scratch.0.join("v.sock");
    let (disk, uds_arg) = (image.display().to_string(), uds.display().to_string());
    let mut husk = spawn_husk(
        &["--disk", &disk, "--net", "--vsock", &uds_arg],
        "mount /dev/vda /mnt && echo jailed > /mnt/proof && sync && \
         ping -c 1 -W 5 $HUSK_HOST_IP >/dev/null && echo PING-OK; \
         echo READY; husk-init vsock-echo 6000",
    );
    wait_for_line(&mut husk, "READY", LIMIT);
    let pid = vmm_pid(husk.id());
    let id = format!("run-{}", husk.id());

    // The unprivileged uid, no way back to privileges, its own mount namespace and cgroup.
    assert_eq!(
        status_field(pid, &pid.to_string(), "Uid"),
        "65534\t65534\t65534\t65534"
    );
    assert_eq!(status_field(pid, &pid.to_string(), "NoNewPrivs"), "1");
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/mnt")).unwrap();
    assert_ne!(ns(&pid.to_string()), ns("self"));
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(cgroup.contains(&format!("/husk/{id}")), "{cgroup}");
    // Every thread (main, vCPU, vmm-events, vmm-api if any) runs under a seccomp filter.
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().file_name().to_string_lossy().into_owned();
        let name = std::fs::read_to_string(format!("/proc/{pid}/task/{task}/comm")).unwrap();
        assert_eq!(status_field(pid, &task, "Seccomp"), "2", "thread {name}");
    }
    // Its root holds the VMM, its libraries, the devices and the mirrored paths, nothing else.
    let root = jail_root_entries(pid);
    for entry in &root {
        assert!(
            ["dev", "husk-vmm", "lib", "lib64", "usr", "root", "home", "tmp", "work", "opt"]
                .contains(&entry.as_str()),
            "unexpected {entry} in the jail root {root:?}"
        );
    }
    assert!(root.contains(&"husk-vmm".to_string()) && root.contains(&"dev".to_string()));
    for host_file in ["/etc/passwd", "/etc/shadow", "/proc/1/status", "/bin/sh"] {
        let inside = format!("/proc/{pid}/root{host_file}");
        assert!(!Path::new(&inside).exists(), "the jail shows {host_file}");
    }
    let devices: Vec<String> = ["kvm", "net/tun", "urandom"]
        .iter()
        .map(|d| format!("/proc/{pid}/root/dev/{d}"))
        .collect();
    for d in &devices {
        let meta = std::fs::metadata(d).unwrap();
        assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), 65534, "{d}");
    }

    // vsock through the jail: the host connects to the guest's echo port.
    assert_eq!(
        vsock_exchange(&uds, 6000, b"through the jail"),
        b"through the jail"
    );

    let status = wait_exit(&mut husk);
    assert_eq!(status.code(), Some(0), "the guest ran to the end");
    assert_no_trace(&id);
    let out = Command::new("debugfs")
        .args(["-R", "cat /proof"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("jailed"));
}

#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn net_works_in_the_jail_with_filters_on() {
    let mut husk = spawn_husk(
        &["--net"],
        "ping -c 1 -W 5 $HUSK_HOST_IP >/dev/null && echo PING-OK",
    );
    let mut out = String::new();
    husk.stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let status = wait_exit(&mut husk);
    assert!(out.contains("PING-OK"), "{out}");
    assert_eq!(status.code(), Some(0));
}

#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn a_vmm_killed_with_sigkill_leaves_no_jail_cgroup_or_mount() {
    let mut husk = spawn_husk(&[], "echo UP; sleep 600");
    wait_for_line(&mut husk, "UP", LIMIT);
    let id = format!("run-{}", husk.id());
    assert!(
        Path::new(JAIL_BASE).join(&id).exists(),
        "the jail exists while the VM runs"
    );
    // The VMM the test started (through husk).
    let _ = husk_tests::signal(vmm_pid(husk.id()) as i32, rustix::process::Signal::KILL);
    assert_eq!(wait_exit(&mut husk).code(), Some(137));
    assert_no_trace(&id);
}

#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn a_killed_husk_run_takes_its_vmm_along_and_the_next_run_sweeps_its_jail() {
    let mut husk = spawn_husk(&[], "echo UP; sleep 600");
    wait_for_line(&mut husk, "UP", LIMIT);
    let id = format!("run-{}", husk.id());
    let vmm = vmm_pid(husk.id());
    // The husk run the test started.
    let _ = husk_tests::signal(husk.id() as i32, rustix::process::Signal::KILL);
    let _ = husk.wait();
    // The VMM, reparented, got its parent-death signal (re-armed by the jailer after its uid
    // drop): it is gone or a zombie waiting for its new parent.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let state = std::fs::read_to_string(format!("/proc/{vmm}/stat")).unwrap_or_default();
        let alive = state
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'));
        if !alive {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "VMM {vmm} outlived its killed husk run"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Nobody cleaned the jail up; the next husk run does.
    assert!(Path::new(JAIL_BASE).join(&id).exists());
    let mut next = spawn_husk(&[], "true");
    assert_eq!(wait_exit(&mut next).code(), Some(0));
    assert_no_trace(&id);
}

#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn memory_max_kills_the_over_limit_vmm_and_no_other() {
    // The bystander runs the whole time the other VM grows past its limit.
    let mut bystander = spawn_husk(&[], "echo UP; sleep 20; echo STILL-HERE");
    wait_for_line(&mut bystander, "UP", LIMIT);
    let mut greedy = spawn_husk(
        &["--memory", "512", "--cgroup", "memory.max=160M"],
        "echo FILLING; head -c 300000000 /dev/zero > /big; echo SURVIVED",
    );
    let mut out = String::new();
    greedy
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let status = wait_exit(&mut greedy);
    assert!(
        out.contains("FILLING") && !out.contains("SURVIVED"),
        "{out}"
    );
    assert_eq!(
        status.code(),
        Some(137),
        "the OOM killer ended the VMM: {out}"
    );
    assert_no_trace(&format!("run-{}", greedy.id()));
    let status = wait_exit(&mut bystander);
    assert_eq!(status.code(), Some(0), "the other VM ran to its end");
}
