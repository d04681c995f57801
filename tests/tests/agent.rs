//! The guest agent in husk-init, driven from the host through the VMM's vsock socket: exec with
//! output, exit codes, stdin, a terminal, signals and concurrency; shutdown of an application
//! VM; sandbox mode (no application) with the agent's processes chrooted into a root disk.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use husk_init::spec::{BootSpec, PARAM};
use husk_proto::agent::{WindowSize, PROTOCOL_VERSION};
use husk_tests::agent::{exec_request, AgentClient};
use husk_tests::{artifact, bin, require_guest_kvm};

/// Boot plus the agent's first answer, in the testbed.
const BOOT_LIMIT: Duration = Duration::from_secs(120);

/// A scratch directory and a VM process, both gone at the end of the test.
struct Vm {
    dir: PathBuf,
    child: Child,
}

impl Vm {
    fn start(name: &str, configure: impl FnOnce(&mut Command, &PathBuf)) -> (Self, AgentClient) {
        require_guest_kvm();
        let dir = std::env::temp_dir().join(format!("husk-agent-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // Run as root, husk jails the VMM as an unprivileged user, which creates the socket here.
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o1777))
            .unwrap();
        let socket = dir.join("v.sock");
        let mut cmd = Command::new("true");
        configure(&mut cmd, &socket);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        (Self { dir, child }, AgentClient::new(socket))
    }

    /// The VM's exit code, waiting at most `limit`.
    fn wait(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "the VM did not end within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn exec_stdin_tty_signals_and_concurrency_then_shutdown_ends_the_app() {
    let (mut vm, agent) = Vm::start("app", |cmd, socket| {
        *cmd = Command::new(bin("husk"));
        cmd.arg("run")
            .arg("--vsock")
            .arg(socket)
            .args(["--", "sleep", "300"]);
    });
    let hello = agent.wait_ready(BOOT_LIMIT).unwrap();
    assert_eq!(hello.version, PROTOCOL_VERSION);
    assert!(hello.uptime_ms > 0);

    // Output on both streams and the exit code.
    let out = agent
        .exec(exec_request(&[
            "sh",
            "-c",
            "echo hello; echo err >&2; exit 7",
        ]))
        .unwrap();
    assert_eq!(
        (
            out.stdout_text().as_str(),
            out.stderr_text().as_str(),
            out.code
        ),
        ("hello\n", "err\n", Some(7)),
        "{out:?}"
    );

    // A command that does not exist.
    let out = agent.exec(exec_request(&["husk-nope"])).unwrap();
    assert_eq!(out.error.as_deref(), Some("exec: no such file: husk-nope"));

    // Stdin round trip.
    let mut cat = agent.start(exec_request(&["cat"])).unwrap();
    cat.stdin(b"through the agent\n").unwrap();
    cat.close_stdin().unwrap();
    let out = cat.finish().unwrap();
    assert_eq!(out.stdout_text(), "through the agent\n");
    assert_eq!(out.code, Some(0));

    // A terminal of the requested size that follows a resize.
    let mut request = exec_request(&["sh", "-c", "tty; stty size; echo READY; read x; stty size"]);
    request.tty = true;
    request.window = Some(WindowSize { rows: 24, cols: 80 });
    let mut shell = agent.start(request).unwrap();
    let first = shell.read_until("READY").unwrap();
    shell.resize(50, 132).unwrap();
    shell.stdin(b"\n").unwrap();
    let rest = shell.finish().unwrap();
    let text = first.stdout_text() + &rest.stdout_text();
    assert!(text.contains("/dev/pts/"), "not on a terminal:\n{text}");
    assert!(text.contains("24 80"), "initial size missing:\n{text}");
    assert!(text.contains("50 132"), "resize missing:\n{text}");
    assert_eq!(rest.code, Some(0));

    // A signal to an exec'd process.
    let mut sleeper = agent.start(exec_request(&["sleep", "100"])).unwrap();
    sleeper
        .signal(rustix::process::Signal::TERM.as_raw())
        .unwrap();
    let out = sleeper.finish().unwrap();
    assert_eq!(
        (out.code, out.signal),
        (Some(143), Some(rustix::process::Signal::TERM.as_raw()))
    );

    // Three at once, each with its own output and status.
    let runs: Vec<_> = (1..=3)
        .map(|i| {
            let agent = agent.clone();
            std::thread::spawn(move || {
                let script = format!("sleep 1; echo run{i}; exit {i}");
                agent.exec(exec_request(&["sh", "-c", &script])).unwrap()
            })
        })
        .collect();
    for (i, run) in (1..=3).zip(runs) {
        let out = run.join().unwrap();
        assert_eq!(out.stdout_text(), format!("run{i}\n"));
        assert_eq!(out.code, Some(i));
    }

    // Shutdown: the application gets SIGTERM and husk run passes its 143 on.
    agent.shutdown(0).unwrap();
    assert_eq!(vm.wait(Duration::from_secs(60)), Some(143));
}

#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn sandbox_mode_serves_the_agent_in_the_root_disk_until_shutdown() {
    let sandbox = BootSpec::sandbox().encode().unwrap();
    let (mut vm, agent) = Vm::start("sandbox", |cmd, socket| {
        let root = socket.with_file_name("root.ext4");
        std::fs::copy(artifact("images/default.ext4"), &root).unwrap();
        *cmd = Command::new(bin("husk-vmm"));
        cmd.arg("--kernel")
            .arg(artifact("kernel/vmlinux"))
            .arg("--initrd")
            .arg(artifact("images/default.cpio.gz"))
            .arg("--disk")
            .arg(&root)
            .arg("--vsock")
            .arg(format!("cid=3,path={}", socket.display()))
            .arg("--cmdline")
            .arg(format!("quiet husk.root=/dev/vda {PARAM}{sandbox}"));
    });
    agent.wait_ready(BOOT_LIMIT).unwrap();
    // Chrooted into the root disk: there, the disk is "/" (outside, it is /run/husk-root).
    let out = agent
        .exec(exec_request(&[
            "sh",
            "-c",
            "grep '^/dev/vda ' /proc/self/mounts",
        ]))
        .unwrap();
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout_text().starts_with("/dev/vda / ext4"),
        "not chrooted into the root disk:\n{}",
        out.stdout_text()
    );
    // The wall clock follows set_time.
    const INSTANT_S: i64 = 2_000_000_000;
    agent.set_time(INSTANT_S * 1_000_000_000).unwrap();
    let out = agent.exec(exec_request(&["date", "+%s"])).unwrap();
    let now: i64 = out.stdout_text().trim().parse().unwrap();
    assert!(
        (INSTANT_S..INSTANT_S + 60).contains(&now),
        "guest clock {now} after set_time({INSTANT_S} s)"
    );
    // Nothing else runs: the VM waits for the agent, then ends with 0.
    agent.shutdown(0).unwrap();
    assert_eq!(vm.wait(Duration::from_secs(60)), Some(0));
}
