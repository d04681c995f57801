//! Containers of a pod inside one running VM (testbed): huskd AddContainer puts each
//! container's ext4 root into a free disk slot (copy-on-write over its image), the guest agent
//! mounts it, and Exec with `container` runs chrooted into it; pod volumes are shared between
//! the containers; RemoveContainer kills what runs in one and frees its slot. This is the
//! mechanism the containerd shim uses for Kubernetes pods (tests/tests/cri_pods.rs drives it
//! through CRI).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use husk_proto::v1::{
    exec_request, exec_response, AddContainerRequest, DetachDiskRequest, Disk, ExecRequest,
    ExecStart, PodFile, PodVolume, RemoveContainerRequest,
};
use husk_tests::huskd::Huskd;
use husk_tests::{bin, require_guest_kvm};
use tokio_stream::StreamExt;
use tonic::Code;

const BOOT: Duration = Duration::from_secs(120);

/// An ext4 image holding busybox and `/etc/who` = `who`.
fn container_image(dir: &Path, who: &str) -> PathBuf {
    let root = dir.join(format!("{who}-root"));
    husk_tests::busybox_tree(
        &root,
        &["etc", "tmp", "proc", "sys", "dev", "run"],
        &["sh", "cat", "echo", "sleep", "ls"],
    );
    std::fs::write(root.join("etc/who"), format!("{who}\n")).unwrap();
    let image = dir.join(format!("{who}.ext4"));
    husk_tests::ext4_of_tree(&root, &image, "32M");
    image
}

/// Runs `script` with sh in `container` of VM `vm` (empty: the VM's own root); (code, stdout,
/// stderr), or the call's error.
fn exec(
    huskd: &Huskd,
    vm: &str,
    container: &str,
    script: &str,
) -> Result<(i32, String, String), tonic::Status> {
    let mut client = huskd.client();
    let start = ExecStart {
        vm: vm.into(),
        command: vec!["sh".into(), "-c".into(), script.into()],
        container: container.into(),
        ..Default::default()
    };
    let requests = vec![
        ExecRequest {
            msg: Some(exec_request::Msg::Start(start)),
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
        let (mut out, mut err) = (String::new(), String::new());
        while let Some(reply) = replies.next().await {
            match reply?.msg {
                Some(exec_response::Msg::Stdout(d)) => out.push_str(&String::from_utf8_lossy(&d)),
                Some(exec_response::Msg::Stderr(d)) => err.push_str(&String::from_utf8_lossy(&d)),
                Some(exec_response::Msg::Exit(exit)) => return Ok((exit.code, out, err)),
                _ => {}
            }
        }
        Err(tonic::Status::internal("exec stream ended without an exit"))
    })
}

/// `script` must succeed in `container`; its stdout.
fn sh(huskd: &Huskd, container: &str, script: &str) -> String {
    let (code, out, err) = exec(huskd, "pod", container, script)
        .unwrap_or_else(|s| panic!("exec {script:?} in {container:?}: {s:?}"));
    assert_eq!(code, 0, "{script:?} in {container:?}: {out}{err}");
    out
}

fn add(huskd: &Huskd, container: &str, image: &Path) -> Result<(), tonic::Status> {
    let mut client = huskd.client();
    huskd
        .block_on(client.add_container(AddContainerRequest {
            vm: "pod".into(),
            container: container.into(),
            rootfs: Some(Disk {
                path: image.display().to_string(),
                copy_on_write: true,
                ..Default::default()
            }),
            volumes: vec![PodVolume {
                name: "shared".into(),
                path: "/shared".into(),
                ..Default::default()
            }],
            files: vec![PodFile {
                path: "/etc/greeting".into(),
                content: format!("hi {container}\n").into_bytes(),
                read_only: true,
            }],
        }))
        .map(|_| ())
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn containers_of_a_pod_get_their_own_roots_and_share_volumes_in_one_vm() {
    require_guest_kvm();
    let vmm = bin("husk-vmm").display().to_string();
    let huskd = Huskd::start("pod-containers", &["--vmm", &vmm]);
    let web = container_image(&huskd.dir, "web");
    let client_image = container_image(&huskd.dir, "client");
    let third = container_image(&huskd.dir, "third");
    let web_sum = sha256(&web);
    let created = huskd.husk(&[
        "create",
        "--name",
        "pod",
        "--memory",
        "192",
        "--disk-slots",
        "2",
        "--hostname",
        "pod-0.example",
        "--start",
    ]);
    assert_eq!(created.code(), Some(0), "{}", created.stderr());
    huskd.wait_agent("pod", BOOT);

    // The host name huskd gave the guest, which every container shares.
    assert_eq!(sh(&huskd, "", "hostname").trim(), "pod-0.example");
    add(&huskd, "web", &web).unwrap();
    add(&huskd, "client", &client_image).unwrap();
    // Each container sees its own root; the VM's own root is not theirs.
    assert_eq!(sh(&huskd, "web", "cat /etc/who").trim(), "web");
    assert_eq!(sh(&huskd, "client", "cat /etc/who").trim(), "client");
    assert_eq!(
        exec(&huskd, "pod", "", "cat /etc/who").unwrap().0,
        1,
        "the VM's root has no /etc/who"
    );
    // Files copied in: each container its own, read-only.
    assert_eq!(
        sh(&huskd, "client", "cat /etc/greeting").trim(),
        "hi client"
    );
    let (code, _, _) = exec(&huskd, "pod", "web", "echo x > /etc/greeting").unwrap();
    assert_ne!(code, 0, "a read-only file was written");
    // The pod volume is one directory for both.
    sh(&huskd, "web", "echo from-web > /shared/hello");
    assert_eq!(sh(&huskd, "client", "cat /shared/hello").trim(), "from-web");
    // Writes go to the container's overlay, never to its image.
    sh(&huskd, "web", "echo changed > /etc/who && sync");
    assert_eq!(sh(&huskd, "web", "cat /etc/who").trim(), "changed");
    assert_eq!(
        sha256(&web),
        web_sum,
        "the container's base image was written"
    );

    let vm = huskd.get("pod");
    let mut holders: Vec<(u32, String)> = vm
        .status
        .unwrap()
        .attached_disks
        .iter()
        .map(|a| (a.slot, a.container.clone()))
        .collect();
    holders.sort();
    assert_eq!(holders, vec![(0, "web".into()), (1, "client".into())]);

    // Refusals: a taken name, no free slot, a bad id, a slot that holds a container's root.
    let mut c = huskd.client();
    assert_eq!(
        add(&huskd, "web", &third).unwrap_err().code(),
        Code::AlreadyExists
    );
    assert_eq!(
        add(&huskd, "third", &third).unwrap_err().code(),
        Code::ResourceExhausted
    );
    assert_eq!(
        add(&huskd, "../x", &third).unwrap_err().code(),
        Code::InvalidArgument
    );
    let detach = huskd
        .block_on(c.detach_disk(DetachDiskRequest {
            vm: "pod".into(),
            slot: 1,
        }))
        .unwrap_err();
    assert_eq!(detach.code(), Code::FailedPrecondition, "{detach:?}");
    let missing = exec(&huskd, "pod", "nope", "true").unwrap_err();
    assert!(
        missing.message().contains("no container nope"),
        "{missing:?}"
    );

    // A process left running in "client" ends with it; the slot is free again.
    sh(
        &huskd,
        "client",
        "sleep 1000 >/dev/null 2>&1 & echo started",
    );
    let sleeping = sh(
        &huskd,
        "",
        "ls -l /proc/*/root 2>/dev/null | grep -c husk-containers/client || true",
    );
    assert_ne!(sleeping.trim(), "0", "the background sleep is not running");
    huskd
        .block_on(c.remove_container(RemoveContainerRequest {
            vm: "pod".into(),
            container: "client".into(),
        }))
        .unwrap();
    let left = sh(
        &huskd,
        "",
        "ls -l /proc/*/root 2>/dev/null | grep -c husk-containers/client || true",
    );
    assert_eq!(
        left.trim(),
        "0",
        "a process of the removed container survived"
    );
    assert!(exec(&huskd, "pod", "client", "true").is_err());
    let gone = huskd
        .block_on(c.remove_container(RemoveContainerRequest {
            vm: "pod".into(),
            container: "client".into(),
        }))
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
    // The freed slot takes the next container; the volume kept its contents.
    add(&huskd, "third", &third).unwrap();
    assert_eq!(
        sh(&huskd, "third", "cat /etc/who; cat /shared/hello"),
        "third\nfrom-web\n"
    );
    assert_eq!(sh(&huskd, "web", "cat /etc/who").trim(), "changed");
    let overlays: Vec<String> = std::fs::read_dir(huskd.state_dir().join("vms"))
        .unwrap()
        .flatten()
        .flat_map(|vm_dir| {
            std::fs::read_dir(vm_dir.path())
                .into_iter()
                .flatten()
                .flatten()
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("slot") && n.ends_with(".qcow2"))
        .collect();
    assert_eq!(
        overlays.len(),
        2,
        "one overlay per live container: {overlays:?}"
    );
}
