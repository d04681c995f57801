//! Templates through huskd and the `husk` CLI with a real Linux guest (testbed): a template is
//! built once, clones come up agent-ready with identities of their own (host name, MAC,
//! addresses, vsock CID, random state, clock, disk), a changed input makes the template stale
//! until it is rebuilt, and a deleted template's files stay while its clones run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use husk_proto::v1::{
    template, CreateTemplateRequest, CreateVmRequest, GetTemplateRequest, VmSpec,
};
use husk_tests::huskd::Huskd;
use husk_tests::{bin, require_guest_kvm};
use tonic::Code;

/// Bytes the template's disk starts with; clones write their own over it.
const DISK_BYTE: u8 = b'o';

#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn templates_clone_sandboxes_with_identities_of_their_own() {
    require_guest_kvm();
    let vmm = bin("husk-vmm").display().to_string();
    let huskd = Huskd::start("templates", &["--vmm", &vmm]);
    let disk = huskd.dir.join("data.raw");
    std::fs::write(&disk, vec![DISK_BYTE; 1 << 20]).unwrap();
    let disk_arg = format!("{}:cow", disk.display());
    let mut client = huskd.client();

    // Refusals before anything boots.
    let with_command = huskd
        .block_on(client.create_template(CreateTemplateRequest {
            name: "bad".into(),
            spec: Some(VmSpec {
                command: vec!["true".into()],
                ..Default::default()
            }),
            replace: false,
        }))
        .unwrap_err();
    assert_eq!(
        with_command.code(),
        Code::InvalidArgument,
        "{with_command:?}"
    );
    let writable = huskd.husk(&[
        "template",
        "create",
        "bad",
        "--disk",
        &disk.display().to_string(),
    ]);
    assert_ne!(writable.code(), Some(0));
    assert!(
        writable.stderr().contains("copy_on_write"),
        "{}",
        writable.stderr()
    );

    let started = Instant::now();
    let out = huskd.husk(&[
        "template", "create", "sbx", "--memory", "128", "--net", "--disk", &disk_arg,
    ]);
    assert_eq!(out.code(), Some(0), "{}{}", out.stdout(), out.stderr());
    assert!(out.stdout().contains("sbx: ready in"), "{}", out.stdout());
    eprintln!("template built in {:?}", started.elapsed());
    let again = huskd.husk(&["template", "create", "sbx", "--memory", "128"]);
    assert_ne!(again.code(), Some(0));
    assert!(again.stderr().contains("exists"), "{}", again.stderr());
    // The VM it was built from is gone.
    let vms = huskd.husk(&["ps"]);
    assert_eq!(vms.stdout().lines().count(), 1, "{}", vms.stdout());

    // Two clones, each agent-ready when CreateVm returns.
    let mut clone_ms = Vec::new();
    for (name, hostname) in [("c1", "clone-one"), ("c2", "clone-two")] {
        let t = Instant::now();
        let out = huskd.husk(&[
            "create",
            "--template",
            "sbx",
            "--name",
            name,
            "--hostname",
            hostname,
        ]);
        clone_ms.push(t.elapsed().as_millis());
        assert_eq!(out.code(), Some(0), "{}{}", out.stdout(), out.stderr());
        let vm = huskd.get(name);
        let status = vm.status.clone().unwrap();
        assert!(
            status.agent_ready,
            "{name} not agent-ready at return: {vm:?}"
        );
        assert_eq!(status.template, "sbx");
    }
    eprintln!("husk create --template (CLI process, wall ms): {clone_ms:?}");
    let (c1, c2) = (huskd.get("c1"), huskd.get("c2"));
    let (s1, s2) = (c1.status.unwrap(), c2.status.unwrap());
    assert_ne!(s1.vsock_cid, s2.vsock_cid);
    assert_ne!(s1.tap, s2.tap);
    assert_ne!(s1.guest_ip, s2.guest_ip);

    // Identities: host name, MAC and address, random state, clock.
    assert_eq!(huskd.sh("c1", "hostname").trim(), "clone-one");
    assert_eq!(huskd.sh("c2", "hostname").trim(), "clone-two");
    let mac1 = huskd.sh("c1", "cat /sys/class/net/eth0/address");
    let mac2 = huskd.sh("c2", "cat /sys/class/net/eth0/address");
    assert_ne!(mac1.trim(), mac2.trim());
    for (vm, status) in [("c1", &s1), ("c2", &s2)] {
        let addr = huskd.sh(vm, "ip -4 addr show eth0 2>/dev/null || ifconfig eth0");
        assert!(addr.contains(&status.guest_ip), "{vm}: {addr}");
        let ping = huskd.sh(vm, &format!("ping -c 1 -W 5 {}", status.host_ip));
        assert!(ping.contains("1 packets received"), "{vm}: {ping}");
    }
    // Different bytes are necessary, not sufficient: the guest kernel may also have reseeded on
    // its own since the restore. That the agent reseeds is unit-tested in reidentify.rs.
    let random = "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'";
    let (r1, r2) = (huskd.sh("c1", random), huskd.sh("c2", random));
    assert_eq!(r1.len(), 64, "{r1}");
    assert_ne!(r1, r2, "two clones drew the same random bytes");
    let host_now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let guest: u64 = huskd.sh("c1", "date +%s").trim().parse().unwrap();
    assert!(
        guest + 120 >= host_now,
        "c1's clock is at {guest}, the host's {host_now}"
    );

    // Each clone writes its own copy of the template's disk.
    huskd.sh(
        "c1",
        "printf c1c1 | dd of=/dev/vda bs=4 count=1 conv=notrunc,fsync 2>/dev/null",
    );
    assert_eq!(huskd.sh("c1", "head -c 4 /dev/vda"), "c1c1");
    assert_eq!(huskd.sh("c2", "head -c 4 /dev/vda"), "oooo");
    assert!(std::fs::read(&disk)
        .unwrap()
        .iter()
        .all(|&b| b == DISK_BYTE));

    // Requests a clone cannot carry, and templates that do not exist.
    let more = huskd
        .block_on(client.create_vm(CreateVmRequest {
            spec: Some(VmSpec {
                memory_mib: 512,
                ..Default::default()
            }),
            start: true,
            template: "sbx".into(),
            match_template: false,
        }))
        .unwrap_err();
    assert_eq!(more.code(), Code::InvalidArgument, "{more:?}");
    let unknown = huskd
        .block_on(client.create_vm(CreateVmRequest {
            spec: Some(VmSpec::default()),
            start: true,
            template: "nope".into(),
            match_template: false,
        }))
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");

    // A CreateVm of the template's shape is served from it when asked to match.
    let template = huskd
        .block_on(client.get_template(GetTemplateRequest { name: "sbx".into() }))
        .unwrap()
        .into_inner();
    assert_eq!(template.state, template::State::Ready as i32);
    assert_eq!(template.clones, 2);
    let old_build = template.build.clone();
    let mut shape = template.spec.clone().unwrap();
    shape.name = "m1".into();
    let matched = huskd
        .block_on(client.create_vm(CreateVmRequest {
            spec: Some(shape),
            start: true,
            template: String::new(),
            match_template: true,
        }))
        .unwrap()
        .into_inner();
    assert_eq!(
        matched.status.as_ref().unwrap().template,
        "sbx",
        "{matched:?}"
    );
    // The same through the CLI, with the options the template was made with.
    let out = huskd.husk(&[
        "create",
        "--match-template",
        "--name",
        "m2",
        "--memory",
        "128",
        "--net",
        "--disk",
        &disk_arg,
    ]);
    assert_eq!(out.code(), Some(0), "{}{}", out.stdout(), out.stderr());
    assert_eq!(huskd.get("m2").status.unwrap().template, "sbx");

    // A changed input makes the template stale; a rebuild serves again, and the old build's
    // clones run on from its files.
    std::fs::write(&disk, vec![DISK_BYTE; 1 << 20]).unwrap();
    let stale = huskd.husk(&["create", "--template", "sbx", "--name", "c3"]);
    assert_ne!(stale.code(), Some(0));
    assert!(stale.stderr().contains("STALE"), "{}", stale.stderr());
    let ls = huskd.husk(&["template", "ls"]);
    assert!(ls.stdout().contains("stale"), "{}", ls.stdout());
    let out = huskd.husk(&[
        "template",
        "create",
        "sbx",
        "--replace",
        "--memory",
        "128",
        "--net",
        "--disk",
        &disk_arg,
    ]);
    assert_eq!(out.code(), Some(0), "{}{}", out.stdout(), out.stderr());
    let out = huskd.husk(&["create", "--template", "sbx", "--name", "c3"]);
    assert_eq!(out.code(), Some(0), "{}{}", out.stdout(), out.stderr());
    assert_ne!(huskd.get("c3").status.unwrap().template_build, old_build);
    assert_eq!(huskd.sh("c1", "head -c 4 /dev/vda"), "c1c1");
    let builds = huskd.state_dir().join("templates/sbx");
    assert!(
        builds.join(&old_build).is_dir(),
        "the old build went while its clones run"
    );

    // Deleting the template keeps its files while clones exist; the last clone takes them.
    let out = huskd.husk(&["template", "rm", "sbx"]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr());
    assert_eq!(
        huskd.husk(&["template", "ls", "--json"]).stdout().trim(),
        "[]"
    );
    assert_eq!(huskd.sh("c3", "echo alive").trim(), "alive");
    let out = huskd.husk(&["rm", "-f", "c1", "c2", "c3", "m1", "m2"]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr());
    let deadline = Instant::now() + Duration::from_secs(10);
    while builds.exists() {
        assert!(Instant::now() < deadline, "template files left: {builds:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
