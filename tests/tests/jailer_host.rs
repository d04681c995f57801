//! husk-jailer on this host (no guest needed; root needed, as for the jailer itself): the jailed
//! husk-vmm sees only what its jail mirrors, a failing step is named, and `--cleanup` leaves no
//! directory or cgroup behind, also after the VMM was killed with SIGKILL while running a
//! (PVM-emulated) kernel under its filters.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use husk_tests::{artifact, bin};

/// The jail base of this test process (not the default /run/husk/jail).
fn base() -> PathBuf {
    std::env::temp_dir().join(format!("husk-jailer-test-{}", std::process::id()))
}

fn is_root() -> bool {
    husk_tests::is_root()
}

fn jailer(id: &str, extra: &[&str], vmm_args: &[&str]) -> Command {
    let mut cmd = Command::new(bin("husk-jailer"));
    cmd.args([
        "--id",
        id,
        "--uid",
        "65534",
        "--gid",
        "65534",
        "--chroot-base",
    ])
    .arg(base())
    .arg("--exec-file")
    .arg(bin("husk-vmm").canonicalize().unwrap())
    .args(extra)
    .arg("--")
    .args(vmm_args);
    cmd
}

fn run(mut cmd: Command) -> Output {
    cmd.stdin(Stdio::null()).output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn cgroup_of(id: &str) -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        if !right.starts_with("cgroup2 ") {
            return None;
        }
        Some(PathBuf::from(left.split(' ').nth(4)?).join("husk").join(id))
    })
}

fn cleanup_leaves_nothing(id: &str) {
    let out = run({
        let mut c = Command::new(bin("husk-jailer"));
        c.args(["--cleanup", "--id", id, "--chroot-base"])
            .arg(base());
        c
    });
    assert!(out.status.success(), "cleanup: {}", stderr(&out));
    assert!(!base().join(id).exists(), "jail directory left");
    if let Some(cgroup) = cgroup_of(id) {
        assert!(!cgroup.exists(), "{} left", cgroup.display());
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&format!("{}/{id}", base().display())));
}

#[test]
fn the_jailed_vmm_sees_only_what_its_jail_mirrors() {
    if !is_root() {
        eprintln!("skipped: husk-jailer needs root");
        return;
    }
    // /etc/passwd exists on the host, but not in a jail that does not mirror it.
    let out = run(jailer("see1", &[], &["--kernel", "/etc/passwd"]));
    assert_eq!(out.status.code(), Some(125));
    assert!(
        stderr(&out).contains("/etc/passwd does not exist"),
        "{}",
        stderr(&out)
    );
    cleanup_leaves_nothing("see1");
    // Mirrored with --file, it is there (and not a kernel).
    let out = run(jailer(
        "see2",
        &["--file", "/etc/passwd"],
        &["--kernel", "/etc/passwd"],
    ));
    assert!(stderr(&out).contains("is not a kernel"), "{}", stderr(&out));
    cleanup_leaves_nothing("see2");
    // The VMM itself runs: it prints its filters and exits 0.
    let out = run(jailer("see3", &[], &["--print-seccomp"]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("vcpu ("));
    cleanup_leaves_nothing("see3");
    // In a new PID namespace the jailer stays as the VMM's parent and passes its status on.
    let out = run(jailer(
        "see4",
        &["--new-pid-ns"],
        &["--kernel", "/etc/passwd"],
    ));
    assert_eq!(out.status.code(), Some(125), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("/etc/passwd does not exist"),
        "{}",
        stderr(&out)
    );
    cleanup_leaves_nothing("see4");
}

#[test]
fn a_failing_step_is_named_and_undone() {
    if !is_root() {
        eprintln!("skipped: husk-jailer needs root");
        return;
    }
    let cases: [(&str, &[&str], &str); 4] = [
        (
            "bad1",
            &["--keep-fd", "987"],
            "closing inherited fds: --keep-fd 987 is not open",
        ),
        ("bad2", &["--file", "/nonexistent/kernel"], "binding --file"),
        (
            "bad3",
            &["--cgroup", "nonexistent.file=1"],
            "setting up the cgroup",
        ),
        (
            "bad4",
            &["--netns", "/nonexistent/netns"],
            "opening --netns",
        ),
    ];
    for (id, extra, step) in cases {
        let out = run(jailer(id, extra, &["--print-seccomp"]));
        assert_eq!(out.status.code(), Some(125), "{id}");
        assert!(stderr(&out).contains(step), "{id}: {}", stderr(&out));
        // What the failed run created is gone already.
        assert!(!base().join(id).exists(), "{id}: jail directory left");
    }
    let out = run(jailer("bad..id", &[], &[]));
    assert!(
        stderr(&out).contains("arguments: invalid --id"),
        "{}",
        stderr(&out)
    );
    // A jail that exists is never reused.
    std::fs::create_dir_all(base().join("busy")).unwrap();
    let out = run(jailer("busy", &[], &["--print-seccomp"]));
    assert!(
        stderr(&out).contains("creating the jail directory"),
        "{}",
        stderr(&out)
    );
    cleanup_leaves_nothing("busy");
}

#[test]
fn a_vmm_killed_with_sigkill_in_its_jail_is_cleaned_up() {
    if !is_root() || !Path::new("/dev/kvm").exists() {
        eprintln!("skipped: needs root and /dev/kvm");
        return;
    }
    let kernel = artifact("kernel/vmlinux");
    let kernel = kernel.to_str().unwrap();
    let disk = std::env::temp_dir().join(format!("husk-jailer-disk-{}", std::process::id()));
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    // Root-owned 0600: only the passed fd gets the jailed VMM to it.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk)
        .unwrap();
    let fd = file.as_raw_fd();
    let fd_disk = format!("/proc/self/fd/{fd}");
    let fd_text = fd.to_string();
    let mut cmd = jailer(
        "kill9",
        &["--file", kernel, "--keep-fd", &fd_text],
        &[
            "--kernel",
            kernel,
            "--allow-pvm",
            "--console",
            "none",
            "--disk",
            &fd_disk,
        ],
    );
    // SAFETY: clears FD_CLOEXEC on the disk fd in the child before exec; the fd is open
    // there (the parent keeps `file` until the child runs) and fcntl is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            let fd = std::os::fd::BorrowedFd::borrow_raw(fd);
            let _ = rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty());
            Ok(())
        });
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    // Wait until the jailer has become the VMM with its vCPU thread under a filter.
    let deadline = Instant::now() + Duration::from_secs(20);
    let vcpu_filtered = || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .ok()
            .is_some_and(|tasks| {
                tasks.flatten().any(|t| {
                    let dir = t.path();
                    let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
                    let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
                    comm.starts_with("vcpu") && status.contains("Seccomp:\t2")
                })
            })
    };
    while !vcpu_filtered() {
        assert!(
            Instant::now() < deadline,
            "no filtered vCPU thread in the jailed VMM"
        );
        if child.try_wait().unwrap().is_some() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            panic!("the jailed VMM ended early: {err}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(
        status.contains("Uid:\t65534\t65534\t65534\t65534"),
        "{status}"
    );
    // The child this test started.
    let _ = husk_tests::signal(pid as i32, rustix::process::Signal::KILL);
    child.wait().unwrap();
    drop(file);
    cleanup_leaves_nothing("kill9");
    std::fs::remove_file(&disk).unwrap();
    let _ = std::fs::remove_dir(base());
}
