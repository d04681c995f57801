//! huskd's API on any host (no guest boots here): status codes for bad requests, records that
//! survive a daemon restart, a VMM that cannot start turning into FAILED with its reason, gRPC
//! health and reflection, and the CLI's output and exit codes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use husk_proto::v1::{
    exec_request, CreateVmRequest, DeleteVmRequest, ExecRequest, ExecStart, GetVmRequest,
    ListVmsRequest, PauseVmRequest, StartVmRequest, StopVmRequest, VmSpec, VmState,
};
use husk_tests::bin;
use husk_tests::huskd::Huskd;
use tonic::Code;

/// A daemon whose default kernel is a file that is not a kernel: every start fails in husk-vmm.
fn daemon(tag: &str, extra: &[&str]) -> Huskd {
    Huskd::start_with_broken_kernel(tag, extra)
}

/// The status code of a call's result (Ok for success); a failure must carry a message.
fn code<T>(result: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match result {
        Ok(_) => Code::Ok,
        Err(s) => {
            assert!(!s.message().is_empty(), "a status without a message: {s:?}");
            s.code()
        }
    }
}

fn spec(name: &str) -> VmSpec {
    VmSpec {
        name: name.into(),
        command: vec!["true".into()],
        ..Default::default()
    }
}

#[test]
fn bad_requests_get_precise_status_codes() {
    let huskd = daemon("codes", &["--max-vms", "2"]);
    let mut c = huskd.client();
    let create = |spec: VmSpec| CreateVmRequest {
        spec: Some(spec),
        start: false,
        ..Default::default()
    };
    // Paths below the fixture's directory are allowed (--allow-path): missing files there are
    // INVALID_ARGUMENT.
    let inside = |name: &str| huskd.dir.join(name).display().to_string();
    let bad_specs = [
        VmSpec {
            vcpus: 64,
            ..spec("a")
        },
        VmSpec {
            memory_mib: 1,
            ..spec("a")
        },
        VmSpec {
            kernel: inside("nonexistent/vmlinux"),
            ..spec("a")
        },
        VmSpec {
            rootfs: inside("nonexistent/root.ext4"),
            ..spec("a")
        },
        VmSpec {
            name: "no spaces please".into(),
            ..spec("a")
        },
    ];
    for bad in bad_specs {
        let got = code(huskd.block_on(c.create_vm(create(bad.clone()))));
        assert_eq!(got, Code::InvalidArgument, "{bad:?}");
    }
    // Host files outside what huskd may open are PERMISSION_DENIED, whatever their kind.
    std::os::unix::fs::symlink("/etc/shadow", huskd.dir.join("shadow-link")).unwrap();
    let outside = [
        VmSpec {
            kernel: "/nonexistent/vmlinux".into(),
            ..spec("a")
        },
        VmSpec {
            disks: vec![husk_proto::v1::Disk {
                path: "/etc/shadow".into(),
                read_only: false,
                rate_limit: None,
                ..Default::default()
            }],
            ..spec("a")
        },
        VmSpec {
            rootfs: inside("shadow-link"),
            ..spec("a")
        },
        VmSpec {
            initrd: inside("../../etc/shadow"),
            ..spec("a")
        },
    ];
    for bad in outside {
        let got = code(huskd.block_on(c.create_vm(create(bad.clone()))));
        assert_eq!(got, Code::PermissionDenied, "{bad:?}");
    }
    let missing = huskd.block_on(c.create_vm(CreateVmRequest {
        spec: None,
        start: false,
        ..Default::default()
    }));
    assert_eq!(code(missing), Code::InvalidArgument);

    assert_eq!(
        code(huskd.block_on(c.create_vm(create(spec("one"))))),
        Code::Ok
    );
    assert_eq!(
        code(huskd.block_on(c.create_vm(create(spec("one"))))),
        Code::AlreadyExists
    );
    assert_eq!(
        code(huskd.block_on(c.create_vm(create(spec("two"))))),
        Code::Ok
    );
    assert_eq!(
        code(huskd.block_on(c.create_vm(create(spec("three"))))),
        Code::ResourceExhausted
    );

    assert_eq!(
        code(huskd.block_on(c.get_vm(GetVmRequest { vm: "nope".into() }))),
        Code::NotFound
    );
    assert_eq!(
        code(huskd.block_on(c.get_vm(GetVmRequest { vm: String::new() }))),
        Code::InvalidArgument
    );
    let stop = StopVmRequest {
        vm: "one".into(),
        timeout_ms: 0,
        force: false,
    };
    assert_eq!(
        code(huskd.block_on(c.stop_vm(stop))),
        Code::FailedPrecondition
    );
    assert_eq!(
        code(huskd.block_on(c.pause_vm(PauseVmRequest { vm: "one".into() }))),
        Code::FailedPrecondition
    );

    // Exec: the first message must be `start`, and the VM must be running.
    let no_start = tokio_stream::iter(vec![ExecRequest {
        msg: Some(exec_request::Msg::Stdin(b"x".to_vec())),
    }]);
    assert_eq!(
        code(huskd.block_on(c.exec(no_start))),
        Code::InvalidArgument
    );
    let start = ExecStart {
        vm: "one".into(),
        command: vec!["true".into()],
        ..Default::default()
    };
    let on_created = tokio_stream::iter(vec![ExecRequest {
        msg: Some(exec_request::Msg::Start(start)),
    }]);
    assert_eq!(
        code(huskd.block_on(c.exec(on_created))),
        Code::FailedPrecondition
    );

    let del = DeleteVmRequest {
        vm: "one".into(),
        force: false,
    };
    assert_eq!(code(huskd.block_on(c.delete_vm(del.clone()))), Code::Ok);
    assert_eq!(code(huskd.block_on(c.delete_vm(del))), Code::NotFound);
}

#[test]
fn a_vmm_that_cannot_start_leaves_the_vm_failed_with_its_reason() {
    let huskd = daemon("failed", &[]);
    let mut c = huskd.client();
    let vm = huskd
        .block_on(c.create_vm(CreateVmRequest {
            spec: Some(spec("broken")),
            start: true,
            ..Default::default()
        }))
        .unwrap()
        .into_inner();
    let failed = huskd.wait_state(&vm.id, VmState::Failed, Duration::from_secs(20));
    let status = failed.status.unwrap();
    assert!(
        status.failure_reason.contains("husk-vmm") && status.failure_reason.contains("kernel"),
        "the reason should carry the VMM's own words: {:?}",
        status.failure_reason
    );
    assert_eq!(status.vmm_pid, 0);
    let dir = huskd.vm_dir(&vm.id);
    for leftover in ["vmm/api.sock", "vmm/vsock.sock", "vmm.pid"] {
        assert!(!dir.join(leftover).exists(), "{leftover} left behind");
    }
    // A failed VM can be started again (and fails again the same way).
    let again = huskd.block_on(c.start_vm(StartVmRequest {
        vm: "broken".into(),
    }));
    assert!(again.is_ok(), "{again:?}");
    huskd.wait_state("broken", VmState::Failed, Duration::from_secs(20));
}

#[test]
fn records_survive_a_daemon_restart() {
    let mut huskd = daemon("restart", &[]);
    let mut c = huskd.client();
    let mut labelled = spec("kept");
    labelled.labels.insert("tier".into(), "db".into());
    huskd
        .block_on(c.create_vm(CreateVmRequest {
            spec: Some(labelled),
            start: false,
            ..Default::default()
        }))
        .unwrap();
    huskd
        .block_on(c.create_vm(CreateVmRequest {
            spec: Some(spec("other")),
            start: false,
            ..Default::default()
        }))
        .unwrap();
    huskd.restart();
    let mut c = huskd.client();
    let select = ListVmsRequest {
        label_selector: [("tier".to_string(), "db".to_string())].into(),
    };
    let vms = huskd.block_on(c.list_vms(select)).unwrap().into_inner().vms;
    assert_eq!(vms.len(), 1, "{vms:?}");
    assert_eq!(vms[0].spec.as_ref().unwrap().name, "kept");
    assert_eq!(vms[0].state, VmState::Created as i32);
    let all = huskd
        .block_on(c.list_vms(ListVmsRequest::default()))
        .unwrap()
        .into_inner()
        .vms;
    assert_eq!(all.len(), 2);
}

#[test]
fn health_and_reflection_are_served() {
    let huskd = daemon("health", &[]);
    let channel = huskd.channel();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let request = tonic_health::pb::HealthCheckRequest {
        service: "husk.v1.Husk".into(),
    };
    let reply = huskd.block_on(health.check(request)).unwrap().into_inner();
    assert_eq!(
        reply.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let unknown = tonic_health::pb::HealthCheckRequest {
        service: "no.Such".into(),
    };
    assert_eq!(
        huskd.block_on(health.check(unknown)).unwrap_err().code(),
        Code::NotFound
    );
}

/// Reflection lists every served service and describes each (health included), as grpcurl
/// asks it: list, then file_containing_symbol.
#[test]
fn reflection_lists_and_describes_every_service() {
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let huskd = daemon("reflection", &[]);
    let client = ServerReflectionClient::new(huskd.channel());
    let ask = |request: MessageRequest| {
        let mut client = client.clone();
        huskd.block_on(async move {
            let outbound = tokio_stream::iter(vec![ServerReflectionRequest {
                host: String::new(),
                message_request: Some(request),
            }]);
            let mut replies = client
                .server_reflection_info(outbound)
                .await
                .unwrap()
                .into_inner();
            replies
                .message()
                .await
                .unwrap()
                .unwrap()
                .message_response
                .unwrap()
        })
    };
    let MessageResponse::ListServicesResponse(list) =
        ask(MessageRequest::ListServices(String::new()))
    else {
        panic!("no service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for service in ["husk.v1.Husk", "grpc.health.v1.Health"] {
        assert!(
            names.iter().any(|n| n == service),
            "{service} not listed: {names:?}"
        );
        match ask(MessageRequest::FileContainingSymbol(service.into())) {
            MessageResponse::FileDescriptorResponse(files) => {
                assert!(
                    !files.file_descriptor_proto.is_empty(),
                    "{service}: no descriptor"
                )
            }
            other => panic!("{service} not described: {other:?}"),
        }
    }
}

#[test]
fn the_cli_prints_tables_json_and_gives_errors_non_zero_codes() {
    let huskd = daemon("cli", &[]);
    let created = huskd.husk(&[
        "create", "--name", "web", "--cpus", "2", "--label", "app=web", "--", "sh", "-c", "exit 3",
    ]);
    assert_eq!(created.code(), Some(0), "{}", created.stderr());
    let id = created.stdout().trim().to_string();
    assert_eq!(id.len(), 16, "create prints the id: {id:?}");

    let ps = huskd.husk(&["ps"]);
    assert_eq!(ps.code(), Some(0));
    let row = ps
        .stdout()
        .lines()
        .find(|l| l.contains("web"))
        .unwrap_or_default()
        .to_string();
    assert!(
        row.starts_with(&id) && row.contains("created") && row.contains("sh -c exit 3"),
        "{}",
        ps.stdout()
    );

    let json = huskd.husk(&["inspect", "--json", "web"]);
    assert!(
        json.stdout().contains(&format!("\"id\": \"{id}\""))
            && json.stdout().contains("\"vcpus\": 2"),
        "{}",
        json.stdout()
    );
    assert!(
        huskd
            .husk(&["ps", "--label", "app=none"])
            .stdout()
            .lines()
            .count()
            == 1,
        "only the header"
    );

    let dup = huskd.husk(&["create", "--name", "web"]);
    assert_eq!(dup.code(), Some(1));
    assert!(dup.stderr().contains("exists already"), "{}", dup.stderr());
    let missing = huskd.husk(&["stop", "ghost"]);
    assert_eq!(missing.code(), Some(1));
    assert!(
        missing.stderr().contains("ghost") && missing.stderr().contains("NotFound"),
        "{}",
        missing.stderr()
    );
    let rm = huskd.husk(&["rm", "web"]);
    assert_eq!(rm.code(), Some(0), "{}", rm.stderr());
    assert!(!huskd.vm_dir(&id).exists(), "rm removes the VM's directory");
}

#[test]
fn a_second_daemon_on_the_same_socket_is_refused() {
    let huskd = daemon("twice", &[]);
    let second = husk_tests::run_with_timeout(
        std::process::Command::new(bin("huskd"))
            .arg("--socket")
            .arg(&huskd.socket)
            .arg("--state-dir")
            .arg(huskd.dir.join("other")),
        Duration::from_secs(20),
    );
    assert_eq!(second.code(), Some(1));
    assert!(
        second.stderr().contains("another huskd"),
        "{}",
        second.stderr()
    );
    // The first still answers.
    assert!(huskd.husk(&["ps"]).code() == Some(0));
}
