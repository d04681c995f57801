//! containerd-shim-husk-v2 with Debian's real containerd (1.6) and real guests (testbed).
//!
//! Each test starts its own containerd (temporary root, state and sockets; CRI off; the native
//! snapshotter, since the testbed's root is an overlay) with the shim on its PATH and a huskd
//! fixture behind `$HUSK_HOST`, imports a busybox OCI image that it builds itself (no
//! registry), and drives everything with `ctr`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use husk_tests::containerd::{
    self as shared, interfaces, process_alive, tail, CNI_PLUGINS, CTR_LIMIT, RUNTIME,
};
use husk_tests::huskd::Huskd;
use husk_tests::{bin, require_guest_kvm, run_with_timeout, Finished};

const IMAGE: &str = "docker.io/library/husk-busybox:test";

/// A containerd of one test and the huskd its shims use.
struct Containerd {
    dir: PathBuf,
    socket: PathBuf,
    child: Option<Child>,
    huskd: Huskd,
}

impl Containerd {
    fn start(tag: &str) -> Self {
        let dir = PathBuf::from(format!("/tmp/husk-ctrd-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Self::start_in(tag, "native")
    }

    /// Starts containerd with the overlayfs snapshotter (containerd's default). The testbed's
    /// root is itself an overlay, which cannot hold overlay upper directories: containerd's
    /// root goes on a tmpfs (mounted before containerd starts; unmounted on drop).
    fn start_overlay(tag: &str) -> Self {
        let dir = PathBuf::from(format!("/tmp/husk-ctrd-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("root")).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "tmpfs"])
            .arg(dir.join("root"))
            .status()
            .unwrap();
        assert!(status.success());
        Self::start_in(tag, "overlayfs")
    }

    /// Starts containerd in /tmp/husk-ctrd-TAG-PID (kept if it exists: a test may have mounted
    /// something there) and imports the test image with `snapshotter`.
    fn start_in(tag: &str, snapshotter: &str) -> Self {
        Self::start_with(tag, snapshotter, None)
    }

    /// As [`Self::start_in`]; `husk_host` replaces the fixture huskd's address in the shims'
    /// environment.
    fn start_with(tag: &str, snapshotter: &str, husk_host: Option<&str>) -> Self {
        let vmm = bin("husk-vmm").display().to_string();
        let dir = PathBuf::from(format!("/tmp/husk-ctrd-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // The shims' rootfs images (HUSK_SHIM_STATE_DIR) lie below the fixture's directory.
        let allowed = dir.display().to_string();
        let huskd = Huskd::start(
            &format!("ctrd-{tag}"),
            &["--vmm", &vmm, "--allow-path", &allowed],
        );
        let socket = dir.join("c.sock");
        let config = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\", \
             \"io.containerd.snapshotter.v1.btrfs\", \"io.containerd.snapshotter.v1.zfs\", \
             \"io.containerd.snapshotter.v1.devmapper\", \"io.containerd.snapshotter.v1.aufs\"]\n\
             [grpc]\n  address = \"{sock}\"\n",
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            sock = socket.display(),
        );
        std::fs::write(dir.join("config.toml"), config).unwrap();
        let husk_host = husk_host
            .map(str::to_string)
            .unwrap_or_else(|| format!("unix://{}", huskd.socket.display()));
        let child = shared::spawn_containerd(&dir, &husk_host);
        let me = Self {
            dir,
            socket,
            child: Some(child),
            huskd,
        };
        shared::wait_for_containerd(&me.socket, "husk", || me.log());
        me.import_image(snapshotter);
        me
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// Both daemons' logs, for failure messages.
    fn logs(&self) -> String {
        format!(
            "containerd log (tail):\n{}\nhuskd log (tail):\n{}",
            tail(&self.log(), 60),
            tail(&self.huskd.log(), 30)
        )
    }

    fn ctr(&self, args: &[&str]) -> Finished {
        shared::ctr(&self.socket, "husk", args)
    }

    /// `ctr` that must succeed; returns its stdout.
    fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert_eq!(
            out.code(),
            Some(0),
            "ctr {args:?} failed: {}\n{}\n{}",
            out.stdout(),
            out.stderr(),
            self.logs()
        );
        out.stdout()
    }

    fn import_image(&self, snapshotter: &str) {
        let tar = husk_tests::oci::build_oci_image(&self.dir.join("image"), IMAGE);
        let out = self.ctr_ok(&[
            "image",
            "import",
            "--snapshotter",
            snapshotter,
            tar.to_str().unwrap(),
        ]);
        assert!(
            self.ctr_ok(&["image", "ls", "-q"]).contains(IMAGE),
            "import did not name the image {IMAGE}: {out}"
        );
    }

    /// The STATUS column of `ctr task ls` for `id` (None: no such task).
    fn task_status(&self, id: &str) -> Option<String> {
        let out = self.ctr_ok(&["task", "ls"]);
        out.lines().skip(1).find_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.first() == Some(&id)).then(|| cols.get(2).unwrap_or(&"").to_string())
        })
    }

    /// The PID column of `ctr task ls` for `id` (the VMM's host PID).
    fn task_pid(&self, id: &str) -> u32 {
        let out = self.ctr_ok(&["task", "ls"]);
        out.lines()
            .skip(1)
            .find_map(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                (cols.first() == Some(&id)).then(|| cols[1].parse().unwrap())
            })
            .unwrap_or_else(|| panic!("no task {id}: {out}"))
    }

    fn wait_status(&self, id: &str, want: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let got = self.task_status(id);
            if got.as_deref() == Some(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "task {id} not {want} within {limit:?} (is {got:?})\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    fn vm_count(&self) -> usize {
        shared::vm_count(&self.huskd)
    }

    /// Per-container image files the shim left under HUSK_SHIM_STATE_DIR (the shared bases
    /// in `_bases/` stay by design: see [`Self::bases`]).
    fn leftover_images(&self) -> Vec<PathBuf> {
        shared::leftover_images(&self.dir.join("images"))
    }
}

impl Containerd {
    fn bases_dir(&self) -> PathBuf {
        self.dir.join("images/_bases")
    }

    /// The shared base images (`_bases/*.ext4`) the shims built.
    fn bases(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(self.bases_dir())
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "ext4"))
            .collect();
        v.sort();
        v
    }

    /// `containerd-shim-husk-v2 prune-bases` with this containerd's state directory; its stdout.
    fn prune_bases(&self) -> String {
        let out = run_with_timeout(
            Command::new(bin("containerd-shim-husk-v2"))
                .arg("prune-bases")
                .env("HUSK_SHIM_STATE_DIR", self.dir.join("images")),
            Duration::from_secs(30),
        );
        assert_eq!(out.code(), Some(0), "prune-bases: {}", out.stderr());
        out.stdout()
    }

    /// PIDs of the live shims of this containerd (found by their -address flag).
    fn shims(&self) -> Vec<i32> {
        shared::shim_pids(&self.socket)
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // With the shims of tasks a failed test left behind (only this containerd's).
        shared::stop_containerd(self.child.take(), &self.socket);
        // Unmount whatever containerd left (native snapshots need none; be thorough).
        shared::unmount_below(&self.dir);
        // The tmpfs root (overlay test), should it still be there.
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.join("root"))
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `ctr run --rm` prints the container's output and returns its exit code; the OCI env and
/// cwd reach the process; afterwards no VM, image or shim is left.
#[test]
#[ignore = "needs a guest-capable KVM: run through scripts/testbed"]
fn ctr_run_prints_output_and_returns_the_exit_code() {
    require_guest_kvm();
    let ctrd = Containerd::start("run");
    let out = ctrd.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "native",
        "--runtime",
        RUNTIME,
        "--env",
        "GREETING=hello-from-husk",
        "--cwd",
        "/tmp",
        IMAGE,
        "run1",
        "sh",
        "-c",
        "echo \"$GREETING in $(pwd) as $(id -u)\"; echo to-stderr >&2; exit 7",
    ]);
    assert_eq!(
        out.code(),
        Some(7),
        "stdout: {}\nstderr: {}\n{}",
        out.stdout(),
        out.stderr(),
        ctrd.logs()
    );
    assert!(
        out.stdout().contains("hello-from-husk in /tmp as 0"),
        "stdout: {}\nstderr: {}",
        out.stdout(),
        out.stderr()
    );
    assert!(
        out.stderr().contains("to-stderr"),
        "stderr: {}",
        out.stderr()
    );
    // --rm deleted task and container: the VM and its image are gone.
    assert_eq!(ctrd.task_status("run1"), None);
    assert_eq!(ctrd.vm_count(), 0, "{}", ctrd.huskd.log());
    assert_eq!(ctrd.leftover_images(), Vec::<PathBuf>::new());
}

/// A detached container: `ctr task exec` runs a second process (as another user), `ctr task
/// ls` shows the state, `ctr task kill` delivers the signal, and `ctr task delete` leaves
/// nothing behind (VMM, image, mounts, interfaces).
#[test]
#[ignore = "needs a guest-capable KVM: run through scripts/testbed"]
fn exec_kill_and_delete_leave_nothing_behind() {
    require_guest_kvm();
    let ctrd = Containerd::start("life");
    let nets_before = interfaces();
    ctrd.ctr_ok(&[
        "run",
        "-d",
        "--snapshotter",
        "native",
        "--runtime",
        RUNTIME,
        IMAGE,
        "life1",
        "sh",
        "-c",
        "trap 'echo got-term; exit 42' TERM; while true; do sleep 1; done",
    ]);
    ctrd.wait_status("life1", "RUNNING", Duration::from_secs(120));
    let vmm_pid = ctrd.task_pid("life1");
    assert!(process_alive(vmm_pid), "the task's PID is the VMM's");
    let exec = ctrd.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        "--user",
        "1000:1000",
        "--cwd",
        "/tmp",
        "life1",
        "sh",
        "-c",
        "echo exec:$(id -u):$(id -g):$(pwd); exit 3",
    ]);
    assert_eq!(
        exec.code(),
        Some(3),
        "stdout: {}\nstderr: {}\n{}",
        exec.stdout(),
        exec.stderr(),
        ctrd.logs()
    );
    assert!(
        exec.stdout().contains("exec:1000:1000:/tmp"),
        "{}",
        exec.stdout()
    );
    // The init process is still running and listed; the signal reaches its trap.
    assert_eq!(ctrd.task_status("life1").as_deref(), Some("RUNNING"));
    let ps = ctrd.ctr_ok(&["task", "ps", "life1"]);
    assert!(ps.contains(&vmm_pid.to_string()), "{ps}");
    // Pause and resume stop and restart the VM's vCPUs.
    ctrd.ctr_ok(&["task", "pause", "life1"]);
    assert_eq!(ctrd.task_status("life1").as_deref(), Some("PAUSED"));
    ctrd.ctr_ok(&["task", "resume", "life1"]);
    assert_eq!(ctrd.task_status("life1").as_deref(), Some("RUNNING"));
    // Stats: the VMM's CPU time and resident memory, as cgroups v1 metrics.
    let metrics = ctrd.ctr_ok(&["task", "metrics", "life1"]);
    assert!(metrics.contains("memory.usage_in_bytes"), "{metrics}");
    ctrd.ctr_ok(&["task", "kill", "--signal", "SIGTERM", "life1"]);
    ctrd.wait_status("life1", "STOPPED", Duration::from_secs(60));
    // `ctr task delete` reports the task's exit status: the trap's 42.
    let delete = ctrd.ctr(&["task", "delete", "life1"]);
    assert_eq!(delete.code(), Some(0), "{}", delete.stderr());
    assert!(
        delete.stderr().contains("exit code 42"),
        "{}",
        delete.stderr()
    );
    ctrd.ctr_ok(&["container", "delete", "life1"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while process_alive(vmm_pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!process_alive(vmm_pid), "the VMM outlived the task");
    assert_eq!(ctrd.vm_count(), 0, "{}", ctrd.huskd.log());
    assert_eq!(ctrd.leftover_images(), Vec::<PathBuf>::new());
    assert_eq!(interfaces(), nets_before);
    // The shim ended after containerd's Shutdown.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ctrd.shims().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(ctrd.shims(), Vec::<i32>::new(), "shim still running");
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        !mounts.contains(&*ctrd.dir.to_string_lossy()),
        "mounts left: {mounts}"
    );
}

/// The exit status `ctr task wait` reports for a signal is exact, and a container whose VMM is
/// killed is reported exited (status 255), not hung.
#[test]
#[ignore = "needs a guest-capable KVM: run through scripts/testbed"]
fn a_killed_vmm_is_reported_as_an_exit() {
    require_guest_kvm();
    let ctrd = Containerd::start("vmmkill");
    ctrd.ctr_ok(&[
        "run",
        "-d",
        "--snapshotter",
        "native",
        "--runtime",
        RUNTIME,
        IMAGE,
        "dead1",
        "sleep",
        "600",
    ]);
    ctrd.wait_status("dead1", "RUNNING", Duration::from_secs(120));
    let vmm_pid = ctrd.task_pid("dead1");
    // The VMM this test's huskd started.
    assert_eq!(
        husk_tests::signal(vmm_pid as i32, rustix::process::Signal::KILL),
        Ok(())
    );
    // Reported as exited (status 255), not hung.
    ctrd.wait_status("dead1", "STOPPED", Duration::from_secs(60));
    let delete = ctrd.ctr(&["task", "delete", "dead1"]);
    assert_eq!(delete.code(), Some(0), "{}", delete.stderr());
    assert!(
        delete.stderr().contains("exit code 255"),
        "{}\n{}",
        delete.stderr(),
        ctrd.logs()
    );
    ctrd.ctr_ok(&["container", "delete", "dead1"]);
    assert_eq!(ctrd.vm_count(), 0, "{}", ctrd.huskd.log());
    assert_eq!(ctrd.leftover_images(), Vec::<PathBuf>::new());
}

/// Stdin flows from `ctr run` through the FIFO into the process, and its end is an EOF.
#[test]
#[ignore = "needs a guest-capable KVM: run through scripts/testbed"]
fn stdin_reaches_the_container_and_ends_with_eof() {
    use std::io::Write;
    require_guest_kvm();
    let ctrd = Containerd::start("stdin");
    let mut child = Command::new("ctr")
        .arg("--address")
        .arg(&ctrd.socket)
        .args([
            "--namespace",
            "husk",
            "run",
            "--rm",
            "--snapshotter",
            "native",
        ])
        .args(["--runtime", RUNTIME, IMAGE, "in1"])
        .args([
            "sh",
            "-c",
            "n=0; while read l; do n=$((n+1)); echo \"got:$l\"; done; echo lines:$n",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"alpha\nbeta\n").unwrap();
    drop(stdin);
    let deadline = Instant::now() + CTR_LIMIT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("ctr run with stdin hung\n{}", ctrd.logs());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        ["got:alpha", "got:beta", "lines:2"],
        "stderr: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        ctrd.logs()
    );
    assert_eq!(out.status.code(), Some(0));
}

/// With containerd's default snapshotter (overlayfs, what Kubernetes nodes use) the rootfs
/// arrives as an overlay mount: the shim builds the image's shared base from its layers (the
/// one layer read in place) and leaves no mount behind.
#[test]
#[ignore = "needs a guest-capable KVM: run through scripts/testbed"]
fn the_overlayfs_snapshotter_works_and_leaves_no_mounts() {
    require_guest_kvm();
    let ctrd = Containerd::start_overlay("overlay");
    let out = ctrd.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        IMAGE,
        "ov1",
        "sh",
        "-c",
        "echo overlay-ok > /tmp/x; cat /tmp/x; ls /bin/busybox",
    ]);
    assert_eq!(
        out.code(),
        Some(0),
        "{} {}\n{}",
        out.stdout(),
        out.stderr(),
        ctrd.logs()
    );
    assert!(out.stdout().contains("overlay-ok"), "{}", out.stdout());
    assert!(out.stdout().contains("/bin/busybox"), "{}", out.stdout());
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let ours: Vec<&str> = mounts
        .lines()
        .filter(|l| l.contains(&*ctrd.dir.to_string_lossy()) && l.starts_with("overlay"))
        .collect();
    assert_eq!(ours, Vec::<&str>::new(), "overlay mounts left behind");
    assert_eq!(ctrd.vm_count(), 0);
    assert_eq!(ctrd.leftover_images(), Vec::<PathBuf>::new());
    assert_eq!(ctrd.bases().len(), 1, "{}", ctrd.logs());
}

/// Two containers of one image (overlayfs snapshotter), one after the other: the first builds
/// the image's shared base, the second starts on that same file without any copy (its inode
/// and mtime unchanged, still the only base), and each VM writes to its own overlay: what
/// container 1 wrote is not in container 2. `prune-bases` leaves a base that a running
/// container uses and removes it once no container does.
#[test]
#[ignore = "needs a guest-capable KVM: run through scripts/testbed"]
fn the_second_container_of_an_image_reuses_its_base_without_a_copy() {
    use std::os::unix::fs::MetadataExt;
    require_guest_kvm();
    let ctrd = Containerd::start_overlay("shared");
    let run = |args: &[&str]| {
        let out = ctrd.ctr(args);
        assert_eq!(
            out.code(),
            Some(0),
            "{args:?}: {} {}\n{}",
            out.stdout(),
            out.stderr(),
            ctrd.logs()
        );
        out.stdout()
    };
    let first = run(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        IMAGE,
        "sh1",
        "sh",
        "-c",
        "echo written-by-1 > /etc/from-c1 && cat /etc/from-c1",
    ]);
    assert!(first.contains("written-by-1"), "{first}");
    let bases = ctrd.bases();
    assert_eq!(bases.len(), 1, "{bases:?}\n{}", ctrd.logs());
    let base = &bases[0];
    let before = std::fs::metadata(base).unwrap();
    assert_eq!(before.mode() & 0o777, 0o444, "the base is read-only");
    // The second container, kept running for the prune below.
    run(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        IMAGE,
        "sh2",
        "sleep",
        "600",
    ]);
    ctrd.wait_status("sh2", "RUNNING", Duration::from_secs(120));
    let exec = ctrd.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        "sh2",
        "sh",
        "-c",
        "cat /etc/from-c1 2>/dev/null || echo no-file-from-1; echo mine > /etc/from-c2; cat /etc/from-c2",
    ]);
    assert_eq!(exec.code(), Some(0), "{}\n{}", exec.stderr(), ctrd.logs());
    assert!(
        exec.stdout().contains("no-file-from-1") && !exec.stdout().contains("written-by-1"),
        "container 1's write is visible in container 2: {}",
        exec.stdout()
    );
    assert!(exec.stdout().contains("mine"), "{}", exec.stdout());
    // No copy: the same file, untouched, and still the only base; the shim said so.
    assert_eq!(ctrd.bases(), bases);
    let after = std::fs::metadata(base).unwrap();
    assert_eq!(
        (after.ino(), after.mtime(), after.mtime_nsec(), after.len()),
        (
            before.ino(),
            before.mtime(),
            before.mtime_nsec(),
            before.len()
        )
    );
    let log = ctrd.log();
    assert!(
        log.contains("container sh2: rootfs image") && log.contains("cached shared base"),
        "{}",
        ctrd.logs()
    );
    assert!(
        !log.contains("container sh2: building the shared base"),
        "{}",
        ctrd.logs()
    );
    assert!(
        !log.contains("does not support copy-on-write"),
        "{}",
        ctrd.logs()
    );
    // The VM's disk is the base, copy-on-write; there is no per-container image.
    let mut client = ctrd.huskd.client();
    let vm = ctrd
        .huskd
        .block_on(client.get_vm(husk_proto::v1::GetVmRequest {
            vm: "husk-sh2".into(),
        }))
        .unwrap()
        .into_inner();
    let spec = vm.spec.unwrap();
    let base_name = base.file_name().unwrap().to_string_lossy().into_owned();
    assert!(spec.rootfs.ends_with(&base_name), "{}", spec.rootfs);
    assert!(spec.rootfs_copy_on_write);
    assert_eq!(ctrd.leftover_images(), Vec::<PathBuf>::new());
    // In use by sh2: prune leaves it.
    assert_eq!(ctrd.prune_bases(), "");
    assert!(base.exists());
    ctrd.ctr_ok(&["task", "kill", "--signal", "SIGKILL", "sh2"]);
    ctrd.wait_status("sh2", "STOPPED", Duration::from_secs(60));
    ctrd.ctr_ok(&["task", "delete", "sh2"]);
    ctrd.ctr_ok(&["container", "delete", "sh2"]);
    assert_eq!(ctrd.vm_count(), 0, "{}", ctrd.huskd.log());
    // Unused now: removed.
    assert_eq!(
        ctrd.prune_bases().trim(),
        format!("removed {}", base.display())
    );
    assert_eq!(ctrd.bases(), Vec::<PathBuf>::new());
}

/// Without a reachable huskd, `ctr run` fails at once with a message that names the socket,
/// and leaves no image behind. (No guest is booted: runs on any host with containerd.)
#[test]
fn without_huskd_ctr_run_fails_clearly() {
    let dir = PathBuf::from(format!("/tmp/husk-ctrd-nohuskd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ctrd = Containerd::start_with("nohuskd", "native", Some("unix:///nonexistent/huskd.sock"));
    let out = ctrd.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "native",
        "--runtime",
        RUNTIME,
        IMAGE,
        "nh1",
        "true",
    ]);
    assert_ne!(out.code(), Some(0), "{}", out.stdout());
    assert!(
        out.stderr()
            .contains("cannot reach huskd at unix:///nonexistent/huskd.sock"),
        "{}",
        out.stderr()
    );
    assert_eq!(ctrd.leftover_images(), Vec::<PathBuf>::new());
}

/// A container on a pseudo-terminal (`ctr run -t`, itself under `script` for a terminal) that
/// takes ctr's terminal size.
#[test]
#[ignore = "needs a guest-capable KVM: run through scripts/testbed"]
fn a_terminal_container_runs_on_a_pty() {
    require_guest_kvm();
    let ctrd = Containerd::start("tty");
    let inner = format!(
        "stty rows 33 cols 111; \
         ctr --address {} --namespace husk run -t --rm --snapshotter native --runtime {RUNTIME} \
         {IMAGE} tty1 sh -c 'tty; sleep 1; echo size:$(stty size); echo tty-ok; exit 5'",
        ctrd.socket.display()
    );
    let out = run_with_timeout(
        Command::new("script").args(["-qec", &inner, "/dev/null"]),
        CTR_LIMIT,
    );
    assert_eq!(
        out.code(),
        Some(5),
        "{} {}\n{}",
        out.stdout(),
        out.stderr(),
        ctrd.logs()
    );
    assert!(out.stdout().contains("/dev/pts/"), "{}", out.stdout());
    assert!(out.stdout().contains("tty-ok"), "{}", out.stdout());
    // ctr sent its terminal's size (ResizePty) once the process started.
    assert!(out.stdout().contains("size:33 111"), "{}", out.stdout());
}

/// A shim that dies: containerd runs `containerd-shim-husk-v2 delete`, which removes the VM
/// and the image.
#[test]
#[ignore = "needs a guest-capable KVM: run through scripts/testbed"]
fn a_dead_shim_is_cleaned_up_by_the_delete_action() {
    require_guest_kvm();
    let ctrd = Containerd::start("shimdead");
    ctrd.ctr_ok(&[
        "run",
        "-d",
        "--snapshotter",
        "native",
        "--runtime",
        RUNTIME,
        IMAGE,
        "sd1",
        "sleep",
        "600",
    ]);
    ctrd.wait_status("sd1", "RUNNING", Duration::from_secs(120));
    assert_eq!(ctrd.vm_count(), 1);
    let shims = ctrd.shims();
    assert_eq!(shims.len(), 1, "{shims:?}");
    // The shim this test's containerd started.
    assert_eq!(
        husk_tests::signal(shims[0], rustix::process::Signal::KILL),
        Ok(())
    );
    // containerd notices the shim's end and cleans up through `delete`.
    let deadline = Instant::now() + Duration::from_secs(60);
    while ctrd.vm_count() != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(ctrd.vm_count(), 0, "{}", ctrd.logs());
    let _ = ctrd.ctr(&["task", "delete", "--force", "sd1"]);
    ctrd.ctr_ok(&["container", "delete", "sd1"]);
    assert_eq!(ctrd.leftover_images(), Vec::<PathBuf>::new());
}

/// A network namespace configured by Debian's CNI plugins (bridge + host-local, MTU 1400 as an
/// overlay network would have), as CRI sets up a pod's: `/var/run/netns/NAME`, its `eth0` a veth on bridge `BRIDGE` whose address is
/// the gateway (`SUBNET.1`), removed again (CNI DEL) on drop.
struct CniNetns {
    name: String,
    bridge: String,
    config: String,
    data_dir: PathBuf,
}

impl CniNetns {
    fn add(name: &str, bridge: &str, subnet: &str) -> Self {
        assert!(
            Path::new(CNI_PLUGINS).join("bridge").exists(),
            "{CNI_PLUGINS}/bridge is missing (Debian package containernetworking-plugins): \
             scripts/setup"
        );
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        let ok = Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .unwrap();
        assert!(ok.success(), "ip netns add {name}");
        let data_dir = PathBuf::from(format!("/tmp/husk-cni-{name}"));
        let config = format!(
            r#"{{"cniVersion": "0.4.0", "name": "husk-test-{name}", "type": "bridge",
                "bridge": "{bridge}", "isGateway": true, "ipMasq": false, "mtu": 1400,
                "ipam": {{"type": "host-local", "subnet": "{subnet}.0/24",
                          "dataDir": "{data}", "routes": [{{"dst": "0.0.0.0/0"}}]}}}}"#,
            data = data_dir.display()
        );
        let me = Self {
            name: name.into(),
            bridge: bridge.into(),
            config,
            data_dir,
        };
        let out = me.plugin("ADD");
        assert!(
            out.status.success(),
            "CNI bridge ADD: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        me
    }

    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    /// Runs the bridge plugin with CNI_COMMAND `command` (the CNI protocol: environment and
    /// the network config on stdin).
    fn plugin(&self, command: &str) -> std::process::Output {
        use std::io::Write;
        let mut child = Command::new(Path::new(CNI_PLUGINS).join("bridge"))
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &self.name)
            .env("CNI_NETNS", self.path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", CNI_PLUGINS)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(self.config.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    /// The tc filters on the namespace's eth0 (`tc filter show dev eth0 ingress`).
    fn eth0_filters(&self) -> String {
        let out = Command::new("ip")
            .args([
                "netns", "exec", &self.name, "tc", "filter", "show", "dev", "eth0",
            ])
            .args(["ingress"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The links of the namespace (`ip -o link`).
    fn links(&self) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "ip", "-o", "link"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for CniNetns {
    fn drop(&mut self) {
        let _ = self.plugin("DEL");
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

/// `ctr run --with-ns network:PATH`, the namespace configured by CNI as for a pod: the guest
/// takes eth0's address and MTU, reaches the bridge's gateway (the host) and serves the host at that
/// address; when the container ends, eth0 is the namespace's again and no tap is left in it.
#[test]
#[ignore = "needs a guest-capable KVM: run through scripts/testbed"]
fn a_cni_configured_namespace_gives_the_guest_its_address_both_ways() {
    require_guest_kvm();
    let cni = CniNetns::add("husk-cni-t1", "huskcni1", "10.99.7");
    let ctrd = Containerd::start("cni");
    let with_ns = format!("network:{}", cni.path());
    // The guest prints its address, pings the gateway, then serves one request on 8080.
    let script = "ip -4 -o addr show eth0; echo MTU=$(cat /sys/class/net/eth0/mtu); \
                  ping -c 1 -W 5 10.99.7.1 >/dev/null && echo PING-OK; \
                  printf 'HTTP/1.0 200 OK\\r\\n\\r\\nFROM-THE-POD\\n' | timeout 120 nc -l -p 8080; \
                  echo SERVED";
    let mut run = Command::new("ctr")
        .arg("--address")
        .arg(&ctrd.socket)
        .args([
            "--namespace",
            "husk",
            "run",
            "--rm",
            "--snapshotter",
            "native",
        ])
        .args(["--runtime", RUNTIME, "--with-ns", &with_ns, IMAGE, "cni1"])
        .args(["sh", "-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // From the host, the guest's server at the CNI address (the bridge routes to the veth,
    // whose traffic the tc filters hand to the VM).
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut page = String::new();
    while Instant::now() < deadline {
        if let Ok(Some(_)) = run.try_wait() {
            break;
        }
        if let Ok(mut s) = std::net::TcpStream::connect_timeout(
            &"10.99.7.2:8080".parse().unwrap(),
            Duration::from_secs(2),
        ) {
            use std::io::{Read, Write};
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
            let _ = s.read_to_string(&mut page);
            if page.contains("FROM-THE-POD") {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let filters_while_running = cni.eth0_filters();
    let out = run_with_timeout_child(run, CTR_LIMIT);
    let (stdout, stderr) = out;
    assert!(
        page.contains("FROM-THE-POD"),
        "the host did not reach the guest at 10.99.7.2:8080 ({page:?})\nstdout: {stdout}\n\
         stderr: {stderr}\n{}",
        ctrd.logs()
    );
    assert!(
        stdout.contains("inet 10.99.7.2/24"),
        "the guest's eth0 has not the CNI address:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("PING-OK"),
        "no ping to the gateway:\n{stdout}"
    );
    assert!(stdout.contains("SERVED"), "{stdout}");
    // The CNI network's MTU (1400, below Ethernet's) reached the guest's driver.
    assert!(stdout.contains("MTU=1400"), "{stdout}");
    assert!(
        filters_while_running.contains("mirred"),
        "no redirect on eth0 while the VM ran: {filters_while_running}"
    );
    // The VM is gone: its tap went with it, the redirect with the VM's end.
    assert_eq!(ctrd.vm_count(), 0, "{}", ctrd.huskd.log());
    let deadline = Instant::now() + Duration::from_secs(10);
    while cni.eth0_filters().contains("mirred") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        !cni.eth0_filters().contains("mirred"),
        "the redirect outlived the VM"
    );
    assert!(
        !cni.links().contains("husktap"),
        "a tap outlived the VM: {}",
        cni.links()
    );
}

/// Waits for a spawned child with piped output (killed past `limit`); its stdout and stderr.
fn run_with_timeout_child(mut child: Child, limit: Duration) -> (String, String) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `ctr run --mount type=bind,...`: a host directory below huskd's allowed paths reaches the
/// container as a shared directory (virtio-fs), read-write or read-only as the OCI options say;
/// a read-only one refuses writes even from the container's root.
#[test]
#[ignore = "needs a guest-capable KVM: run through scripts/testbed"]
fn a_bind_mount_reaches_the_container_as_a_shared_directory() {
    require_guest_kvm();
    let ctrd = Containerd::start("bind");
    let data = ctrd.dir.join("data");
    let conf = ctrd.dir.join("conf");
    for d in [&data, &conf] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(data.join("in.txt"), "from-the-host\n").unwrap();
    std::fs::write(conf.join("setting"), "kept\n").unwrap();
    let rw = format!(
        "type=bind,src={},dst=/data,options=rbind:rw",
        data.display()
    );
    let ro = format!(
        "type=bind,src={},dst=/conf,options=rbind:ro",
        conf.display()
    );
    let out = ctrd.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "native",
        "--runtime",
        RUNTIME,
        "--mount",
        &rw,
        "--mount",
        &ro,
        IMAGE,
        "bind1",
        "sh",
        "-c",
        "cat /data/in.txt /conf/setting && echo from-the-container > /data/out.txt && \
         if echo no > /conf/setting; then echo WROTE-RO; fi; sync",
    ]);
    let text = out.stdout() + &out.stderr();
    assert_eq!(out.code(), Some(0), "{text}\n{}", ctrd.logs());
    assert!(
        text.contains("from-the-host") && text.contains("kept"),
        "{text}"
    );
    assert!(!text.contains("WROTE-RO"), "{text}");
    assert_eq!(
        std::fs::read_to_string(data.join("out.txt")).unwrap(),
        "from-the-container\n"
    );
    assert_eq!(
        std::fs::read_to_string(conf.join("setting")).unwrap(),
        "kept\n"
    );
    assert_eq!(ctrd.vm_count(), 0, "{}", ctrd.huskd.log());
}
