//! huskd with real Linux guests (testbed): several VMs at once, exec through the guest agent,
//! graceful stop, a VMM killed under huskd's feet, a huskd restart that adopts running VMs,
//! events, console, and concurrent starts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use husk_proto::v1::{
    event, exec_request, exec_response, network, CreateVmRequest, DeleteVmRequest, Event,
    ExecRequest, ExecStart, Network, PauseVmRequest, ResumeVmRequest, StartVmRequest,
    StopVmRequest, StreamConsoleRequest, VmSpec, VmState, WatchEventsRequest,
};
use husk_tests::huskd::{interface_exists, Huskd};
use husk_tests::{bin, require_guest_kvm};
use tokio_stream::StreamExt;
use tonic::Code;

const BOOT: Duration = Duration::from_secs(90);

fn daemon(tag: &str) -> Huskd {
    let vmm = bin("husk-vmm").display().to_string();
    Huskd::start(tag, &["--vmm", &vmm])
}

fn sandbox(name: &str, net: bool) -> VmSpec {
    VmSpec {
        name: name.into(),
        memory_mib: 128,
        network: Some(Network {
            mode: if net {
                network::Mode::Tap
            } else {
                network::Mode::None
            } as i32,
            mac: String::new(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

struct ExecResult {
    stdout: String,
    stderr: String,
    code: i32,
}

/// Runs `command` in `vm` through Exec, feeding `stdin` then closing it.
fn exec(
    huskd: &Huskd,
    vm: &str,
    command: &[&str],
    stdin: &[u8],
) -> Result<ExecResult, tonic::Status> {
    let mut client = huskd.client();
    let start = ExecStart {
        vm: vm.into(),
        command: command.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let requests = vec![
        ExecRequest {
            msg: Some(exec_request::Msg::Start(start)),
        },
        ExecRequest {
            msg: Some(exec_request::Msg::Stdin(stdin.to_vec())),
        },
        ExecRequest {
            msg: Some(exec_request::Msg::CloseStdin(true)),
        },
    ];
    huskd.block_on(async {
        let mut replies = client
            .exec(tokio_stream::iter(requests))
            .await?
            .into_inner();
        let mut out = ExecResult {
            stdout: String::new(),
            stderr: String::new(),
            code: -1,
        };
        while let Some(reply) = replies.next().await {
            match reply?.msg {
                Some(exec_response::Msg::Stdout(d)) => {
                    out.stdout.push_str(&String::from_utf8_lossy(&d))
                }
                Some(exec_response::Msg::Stderr(d)) => {
                    out.stderr.push_str(&String::from_utf8_lossy(&d))
                }
                Some(exec_response::Msg::Exit(exit)) => {
                    out.code = exit.code;
                    return Ok(out);
                }
                _ => {}
            }
        }
        Err(tonic::Status::internal("exec stream ended without an exit"))
    })
}

/// Collects every event of the daemon in the background.
fn watch_all(huskd: &Huskd) -> std::sync::Arc<std::sync::Mutex<Vec<Event>>> {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut client = huskd.client();
    let stream = huskd
        .block_on(client.watch_events(WatchEventsRequest::default()))
        .unwrap()
        .into_inner();
    let sink = seen.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut stream = stream;
            while let Some(Ok(event)) = stream.next().await {
                sink.lock().unwrap().push(event);
            }
        });
    });
    seen
}

fn kinds_for(events: &[Event], vm_id: &str) -> Vec<event::Kind> {
    events
        .iter()
        .filter(|e| e.vm_id == vm_id)
        .map(|e| event::Kind::try_from(e.kind).unwrap())
        .collect()
}

#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn three_vms_exec_stop_kill_and_a_daemon_restart() {
    require_guest_kvm();
    let mut huskd = daemon("three");
    let events = watch_all(&huskd);
    let mut client = huskd.client();
    let mut ids = Vec::new();
    for (name, net) in [("alpha", true), ("beta", false), ("gamma", false)] {
        let vm = huskd
            .block_on(client.create_vm(CreateVmRequest {
                spec: Some(sandbox(name, net)),
                start: true,
                ..Default::default()
            }))
            .unwrap()
            .into_inner();
        assert_eq!(vm.state, VmState::Running as i32);
        ids.push(vm.id);
    }
    for name in ["alpha", "beta", "gamma"] {
        huskd.wait_agent(name, BOOT);
    }

    // Each VM runs a command with its own exit code; stdout, stderr and stdin flow.
    for (i, name) in ["alpha", "beta", "gamma"].iter().enumerate() {
        let script = format!(
            "echo out-{name}; echo err-{name} >&2; read line; echo got-$line; exit {}",
            10 + i
        );
        let r = exec(&huskd, name, &["sh", "-c", &script], b"ping\n").unwrap();
        assert_eq!(
            r.code,
            10 + i as i32,
            "{name}: stdout {:?} stderr {:?}",
            r.stdout,
            r.stderr
        );
        assert_eq!(r.stdout, format!("out-{name}\ngot-ping\n"));
        assert_eq!(r.stderr, format!("err-{name}\n"));
    }
    // Each VMM runs as its own uid: one VM's VMM user cannot reach another VM's sockets (the
    // vsock socket leads to the guest agent, i.e. root in that guest), while its own work.
    let uid = |name: &str| huskd.get(name).status.unwrap().jail_uid;
    let (alpha_uid, beta_uid) = (uid("alpha"), uid("beta"));
    assert!(alpha_uid >= 100_000 && beta_uid >= 100_000 && alpha_uid != beta_uid);
    let connect_as = |uid: u32, vm: &str| {
        use std::os::unix::process::CommandExt;
        let socket = huskd.vm_dir(&huskd.get(vm).id).join("vmm/vsock.sock");
        let script = format!(
            "import socket; s = socket.socket(socket.AF_UNIX); s.connect({:?}); \
             s.sendall(b'CONNECT 1024\\n'); print(s.recv(16))",
            socket.display().to_string()
        );
        std::process::Command::new("python3")
            .args(["-c", &script])
            .uid(uid)
            .gid(uid)
            .output()
            .unwrap()
    };
    // vms/ and each VM's directory are root's alone (0700): nobody else even reaches a VM's
    // sockets (a jailed VMM sees its own `vmm/` through its jail's bind mount). Opened up to
    // traversal for this check, the per-VM uid is the wall that remains.
    let vms = huskd.state_dir().join("vms");
    let set_mode = |mode: u32| {
        use std::os::unix::fs::PermissionsExt;
        for dir in [vms.clone(), vms.join(&ids[0]), vms.join(&ids[1])] {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
        }
    };
    let closed = connect_as(alpha_uid, "alpha");
    assert!(
        !closed.status.success(),
        "vms/ let a VMM user in: {closed:?}"
    );
    set_mode(0o711);
    let across = connect_as(alpha_uid, "beta");
    assert!(
        !across.status.success()
            && String::from_utf8_lossy(&across.stderr).contains("PermissionError"),
        "alpha's VMM user reached beta's vsock socket: {across:?}"
    );
    let own = connect_as(beta_uid, "beta");
    assert!(
        own.status.success() && String::from_utf8_lossy(&own.stdout).contains("OK"),
        "beta's VMM user cannot reach its own socket: {own:?}"
    );
    set_mode(0o700);

    // A command that does not exist is refused with a clear status.
    let missing = exec(&huskd, "beta", &["no-such-program"], b"")
        .err()
        .expect("must fail");
    assert_eq!(missing.code(), Code::InvalidArgument, "{missing:?}");

    // alpha has its own network link to the host.
    let alpha = huskd.get("alpha");
    let alpha_status = alpha.status.clone().unwrap();
    assert!(
        interface_exists(&alpha_status.tap),
        "tap {} missing",
        alpha_status.tap
    );
    let ping = exec(
        &huskd,
        "alpha",
        &["ping", "-c", "1", "-W", "5", &alpha_status.host_ip],
        b"",
    )
    .unwrap();
    assert_eq!(
        ping.code, 0,
        "alpha cannot ping the host at {}: {}",
        alpha_status.host_ip, ping.stdout
    );

    // Pause stops the guest, resume lets it go on.
    huskd
        .block_on(client.pause_vm(PauseVmRequest { vm: "gamma".into() }))
        .unwrap();
    assert_eq!(huskd.get("gamma").state, VmState::Paused as i32);
    let again = huskd
        .block_on(client.pause_vm(PauseVmRequest { vm: "gamma".into() }))
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);
    huskd
        .block_on(client.resume_vm(ResumeVmRequest { vm: "gamma".into() }))
        .unwrap();
    assert_eq!(
        exec(&huskd, "gamma", &["echo", "after-resume"], b"")
            .unwrap()
            .stdout,
        "after-resume\n"
    );

    // Graceful stop of alpha: STOPPED, its tap and sockets gone.
    let stopped = huskd
        .block_on(client.stop_vm(StopVmRequest {
            vm: "alpha".into(),
            timeout_ms: 20_000,
            force: false,
        }))
        .unwrap()
        .into_inner();
    assert_eq!(stopped.state, VmState::Stopped as i32, "{stopped:?}");
    assert!(
        !interface_exists(&alpha_status.tap),
        "tap {} left after stop",
        alpha_status.tap
    );
    assert!(!huskd.vm_dir(&ids[0]).join("vmm/vsock.sock").exists());

    // kill -9 of beta's VMM: FAILED with a reason, nothing left behind.
    let beta_pid = huskd.get("beta").status.unwrap().vmm_pid;
    assert!(beta_pid > 0);
    let _ = husk_tests::signal(beta_pid as i32, rustix::process::Signal::KILL);
    let failed = huskd.wait_state("beta", VmState::Failed, Duration::from_secs(20));
    let reason = failed.status.unwrap().failure_reason;
    assert!(reason.contains("signal 9"), "{reason}");
    for leftover in ["vmm/api.sock", "vmm/vsock.sock", "vmm.pid"] {
        assert!(
            !huskd.vm_dir(&ids[1]).join(leftover).exists(),
            "{leftover} left after kill -9"
        );
    }

    // Restart huskd: gamma still runs, is adopted and stays controllable. The huskd that
    // ends is caught in the middle of a snapshot: gamma's VMM paused, a staging directory
    // written, the record still saying RUNNING. The next huskd records what the VMM says
    // (PAUSED) and removes the staging.
    let gamma_pid = huskd.get("gamma").status.unwrap().vmm_pid;
    huskd.kill_daemon();
    let gamma_vmm = huskd.vm_dir(&ids[2]).join("vmm");
    husk_tests::vmm_client::VmmClient::connect(&gamma_vmm.join("api.sock"))
        .unwrap()
        .pause()
        .unwrap();
    std::fs::create_dir_all(gamma_vmm.join("snapshot")).unwrap();
    std::fs::write(gamma_vmm.join("snapshot/vm.mem"), b"partial").unwrap();
    huskd.restart();
    huskd.wait_state("gamma", VmState::Paused, Duration::from_secs(20));
    assert!(
        !gamma_vmm.join("snapshot").exists(),
        "the interrupted snapshot's staging was left"
    );
    let mut client = huskd.client();
    huskd
        .block_on(client.resume_vm(husk_proto::v1::ResumeVmRequest { vm: "gamma".into() }))
        .unwrap();
    let gamma = huskd.wait_agent("gamma", Duration::from_secs(30));
    assert_eq!(gamma.state, VmState::Running as i32);
    assert_eq!(
        gamma.status.unwrap().vmm_pid,
        gamma_pid,
        "the same VMM, adopted"
    );
    assert_eq!(huskd.get("alpha").state, VmState::Stopped as i32);
    assert_eq!(huskd.get("beta").state, VmState::Failed as i32);
    let r = exec(&huskd, "gamma", &["sh", "-c", "exit 5"], b"").unwrap();
    assert_eq!(r.code, 5);
    // A VMM the new huskd did not start is still watched: kill it and see FAILED.
    let _ = husk_tests::signal(gamma_pid as i32, rustix::process::Signal::KILL);
    huskd.wait_state("gamma", VmState::Failed, Duration::from_secs(20));

    let seen = events.lock().unwrap().clone();
    let alpha_kinds = kinds_for(&seen, &ids[0]);
    for kind in [
        event::Kind::Created,
        event::Kind::Started,
        event::Kind::AgentReady,
        event::Kind::Stopped,
    ] {
        assert!(
            alpha_kinds.contains(&kind),
            "alpha events {alpha_kinds:?} lack {kind:?}"
        );
    }
    assert!(kinds_for(&seen, &ids[1]).contains(&event::Kind::Failed));
    let gamma_kinds = kinds_for(&seen, &ids[2]);
    assert!(
        gamma_kinds.contains(&event::Kind::Paused) && gamma_kinds.contains(&event::Kind::Resumed)
    );

    for id in &ids {
        huskd
            .block_on(client.delete_vm(DeleteVmRequest {
                vm: id.clone(),
                force: false,
            }))
            .unwrap();
        assert!(!huskd.vm_dir(id).exists());
    }
}

#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn the_application_exit_is_reported_with_its_console_output() {
    require_guest_kvm();
    let huskd = daemon("app");
    let events = watch_all(&huskd);
    let mut client = huskd.client();
    let spec = VmSpec {
        command: vec![
            "sh".into(),
            "-c".into(),
            "echo hello from the app; exit 3".into(),
        ],
        ..sandbox("app", false)
    };
    let vm = huskd
        .block_on(client.create_vm(CreateVmRequest {
            spec: Some(spec),
            start: true,
            ..Default::default()
        }))
        .unwrap()
        .into_inner();
    let done = huskd.wait_state(&vm.id, VmState::Stopped, BOOT);
    assert_eq!(done.status.as_ref().unwrap().exit_code, Some(3), "{done:?}");
    let mut console = huskd
        .block_on(client.stream_console(StreamConsoleRequest {
            vm: "app".into(),
            follow: false,
        }))
        .unwrap()
        .into_inner();
    let mut text = Vec::new();
    while let Some(chunk) = huskd.block_on(console.next()) {
        text.extend(chunk.unwrap().data);
    }
    let text = String::from_utf8_lossy(&text);
    assert!(text.contains("hello from the app"), "console:\n{text}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let seen = events.lock().unwrap().clone();
        let exit = seen
            .iter()
            .find(|e| e.vm_id == vm.id && e.kind == event::Kind::AppExited as i32);
        if let Some(exit) = exit {
            assert_eq!(exit.exit_code, Some(3));
            break;
        }
        assert!(Instant::now() < deadline, "no APP_EXITED event: {seen:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The CLI shows the same through logs and inspect.
    let logs = huskd.husk(&["logs", "app"]);
    assert!(
        logs.stdout().contains("hello from the app"),
        "{}",
        logs.stdout()
    );
    let inspect = huskd.husk(&["inspect", "app"]);
    assert!(
        inspect.stdout().contains("exit code    3"),
        "{}",
        inspect.stdout()
    );
}

#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn concurrent_starts_one_wins_and_the_cli_drives_a_sandbox() {
    require_guest_kvm();
    let huskd = daemon("race");
    let created = huskd.husk(&[
        "create",
        "--name",
        "box",
        "--memory",
        "128",
        "--net",
        "--net-tx-limit",
        "bw=1M",
    ]);
    assert_eq!(created.code(), Some(0), "{}", created.stderr());
    let mut a = huskd.client();
    let mut b = huskd.client();
    let (ra, rb) = huskd.block_on(async {
        tokio::join!(
            a.start_vm(StartVmRequest { vm: "box".into() }),
            b.start_vm(StartVmRequest { vm: "box".into() })
        )
    });
    let codes = [
        ra.as_ref().err().map(|s| s.code()),
        rb.as_ref().err().map(|s| s.code()),
    ];
    assert!(
        codes.contains(&None) && codes.contains(&Some(Code::FailedPrecondition)),
        "one start wins, the other is FAILED_PRECONDITION: {ra:?} {rb:?}"
    );
    huskd.wait_agent("box", BOOT);
    let ex = huskd.husk(&["exec", "box", "sh", "-c", "echo cli-exec; exit 4"]);
    assert_eq!(ex.code(), Some(4), "{}", ex.stderr());
    assert_eq!(ex.stdout(), "cli-exec\n");
    let ps = huskd.husk(&["ps"]);
    assert!(ps.stdout().contains("running"), "{}", ps.stdout());
    assert!(ps.stdout().contains(" tx:bw=1M "), "{}", ps.stdout());
    // A limit changed on the running VM (UpdateRateLimits through its VMM) shows in ps too.
    let update = huskd.husk(&["update", "box", "--net-rx-limit", "ops=500"]);
    assert_eq!(update.code(), Some(0), "{}", update.stderr());
    let ps = huskd.husk(&["ps"]);
    assert!(
        ps.stdout().contains(" rx:ops=500 tx:bw=1M "),
        "{}",
        ps.stdout()
    );
    for verb in ["pause", "resume"] {
        let r = huskd.husk(&[verb, "box"]);
        assert_eq!(r.code(), Some(0), "{verb}: {}", r.stderr());
    }
    let stop = huskd.husk(&["stop", "box"]);
    assert_eq!(stop.code(), Some(0), "{}", stop.stderr());
    let inspect = huskd.husk(&["inspect", "--json", "box"]);
    assert!(
        inspect.stdout().contains("\"state\": \"stopped\""),
        "{}",
        inspect.stdout()
    );
    assert_eq!(huskd.husk(&["rm", "box"]).code(), Some(0));
}

#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn a_python_grpc_client_drives_a_full_lifecycle() {
    require_guest_kvm();
    let python = husk_tests::husk_home().join("python/bin/python3");
    assert!(
        python.exists(),
        "{} is missing: scripts/setup installs grpcio there",
        python.display()
    );
    let huskd = daemon("python");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let run = husk_tests::run_with_timeout(
        std::process::Command::new(python)
            .arg(root.join("tests/python/lifecycle.py"))
            .arg(format!("unix://{}", huskd.socket.display()))
            .arg(root.join("proto")),
        Duration::from_secs(240),
    );
    assert!(
        run.code() == Some(0) && run.stdout().contains("PYTHON-LIFECYCLE-OK"),
        "python client failed:\n{}\n{}\nhuskd log:\n{}",
        run.stdout(),
        run.stderr(),
        huskd.log()
    );
}
