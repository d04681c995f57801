//! `husk run --net` beyond its link (docs/networking.md), in the testbed: a network namespace
//! stands for "the outside world" (a veth pair to the root namespace, 198.18.K.0/24: .1 and .3
//! in the namespace, .2 on the host), with servers in it. The guest reaches it by IP through
//! NAT and by name through the DNS path, a published port reaches the guest from it and from the
//! host, the egress policy holds, a spoofed source is dropped, and no rules outlive their VM.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use husk_host::firewall;
use husk_tests::{bin, require_guest_kvm, run_with_timeout, spawn_husk, wait_for_line, Finished};

const LIMIT: Duration = Duration::from_secs(180);
/// The page every outside server serves.
const PAGE: &str = "HELLO-FROM-OUTSIDE";
const HTTP_PORT: u16 = 8000;

/// One test at a time: they all read husk's whole table.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn husk_run(options: &[&str], script: &str) -> Finished {
    require_guest_kvm();
    let mut cmd = Command::new(bin("husk"));
    cmd.arg("run")
        .arg("--net")
        .args(options)
        .args(["--", "sh", "-c", script]);
    run_with_timeout(&mut cmd, LIMIT)
}

fn sh(program: &str, args: &[&str]) -> std::process::Output {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"))
}

fn ok(program: &str, args: &[&str]) {
    let out = sh(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A client for the tests: connects to IP:PORT, prints what it reads (5 s at most).
const CLIENT: &str = "import socket, sys\n\
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)\n\
s.sendall(b'GET /hello.txt HTTP/1.0\\r\\n\\r\\n')\n\
data = b''\n\
try:\n    while len(data) < 4096:\n        chunk = s.recv(4096)\n        if not chunk:\n            break\n        data += chunk\n        if b'PAGE' in data or b'OUTSIDE' in data:\n            break\n\
except socket.timeout:\n    pass\n\
print(data.decode(errors='replace'))\n";

/// The outside world of test number `k`: namespace `husk-out-K`, veth `hkKa` (host, 198.18.K.2)
/// and `hkKb` (namespace, 198.18.K.1 and .3), a web server on port 8000 in the namespace.
struct Outside {
    k: u8,
    ns: String,
    servers: Vec<Child>,
    _dir: tempfile::TempDir,
}

impl Outside {
    fn new(k: u8) -> Self {
        require_guest_kvm();
        assert!(husk_tests::is_root(), "the networking tests need root");
        let ns = format!("husk-out-{k}");
        let (host_end, ns_end) = (format!("hk{k}a"), format!("hk{k}b"));
        // Leftovers of an earlier, killed run.
        let _ = sh("ip", &["netns", "del", &ns]);
        let _ = sh("ip", &["link", "del", &host_end]);
        ok("ip", &["netns", "add", &ns]);
        ok(
            "ip",
            &[
                "link", "add", &host_end, "type", "veth", "peer", "name", &ns_end,
            ],
        );
        ok("ip", &["link", "set", &ns_end, "netns", &ns]);
        ok(
            "ip",
            &["addr", "add", &format!("198.18.{k}.2/24"), "dev", &host_end],
        );
        ok("ip", &["link", "set", &host_end, "up"]);
        let in_ns = |args: &[&str]| {
            let mut all = vec!["netns", "exec", ns.as_str()];
            all.extend_from_slice(args);
            ok("ip", &all);
        };
        in_ns(&[
            "ip",
            "addr",
            "add",
            &format!("198.18.{k}.1/24"),
            "dev",
            &ns_end,
        ]);
        in_ns(&[
            "ip",
            "addr",
            "add",
            &format!("198.18.{k}.3/32"),
            "dev",
            &ns_end,
        ]);
        in_ns(&["ip", "link", "set", &ns_end, "up"]);
        in_ns(&["ip", "link", "set", "lo", "up"]);
        in_ns(&[
            "ip",
            "route",
            "add",
            "default",
            "via",
            &format!("198.18.{k}.2"),
        ]);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("hello.txt"), PAGE).unwrap();
        let mut outside = Outside {
            k,
            ns,
            servers: Vec::new(),
            _dir: dir,
        };
        let server = outside.spawn_in_ns(&[
            "python3",
            "-m",
            "http.server",
            &HTTP_PORT.to_string(),
            "--bind",
            "0.0.0.0",
            "--directory",
            outside._dir.path().to_str().unwrap(),
        ]);
        outside.servers.push(server);
        outside.wait_until_served(&outside.ip(1), HTTP_PORT, true);
        outside
    }

    /// 198.18.K.`host`.
    fn ip(&self, host: u8) -> String {
        format!("198.18.{}.{host}", self.k)
    }

    fn spawn_in_ns(&self, args: &[&str]) -> Child {
        Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    /// What the test client reads from IP:PORT, from inside the namespace or from the host.
    fn fetch(&self, ip: &str, port: u16, from_ns: bool) -> String {
        let port = port.to_string();
        let out = if from_ns {
            sh(
                "ip",
                &[
                    "netns", "exec", &self.ns, "python3", "-c", CLIENT, ip, &port,
                ],
            )
        } else {
            sh("python3", &["-c", CLIENT, ip, &port])
        };
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits (20 s at most) until IP:PORT serves the page, seen from the namespace or the host.
    fn wait_until_served(&self, ip: &str, port: u16, from_ns: bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = self.fetch(ip, port, from_ns);
            if got.contains(PAGE) || got.contains("GUEST-PAGE") {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "{ip}:{port} never answered (from {}): {got:?}",
                if from_ns { "the outside" } else { "the host" }
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Counts, in the namespace, IPv4 packets arriving from `source`; read with [`Self::count`].
    fn count_from(&self, source: &str) {
        let script = format!(
            "add table ip husktest\n\
             add chain ip husktest c {{ type filter hook prerouting priority -300; }}\n\
             add counter ip husktest seen\n\
             add rule ip husktest c ip saddr {source} counter name seen\n"
        );
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns, "/usr/sbin/nft", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "nft in the namespace");
    }

    fn count(&self) -> u64 {
        let out = sh(
            "ip",
            &[
                "netns",
                "exec",
                &self.ns,
                "/usr/sbin/nft",
                "list",
                "counter",
                "ip",
                "husktest",
                "seen",
            ],
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no packet count in {text:?}"))
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        for server in &mut self.servers {
            let _ = server.kill();
            let _ = server.wait();
        }
        let _ = sh("ip", &["netns", "del", &self.ns]);
        let _ = sh("ip", &["link", "del", &format!("hk{}a", self.k)]);
    }
}

/// A guest shell line that prints `MARK-ok` or `MARK-failed` for a fetch of the outside page.
/// `nc` with a hand-written request, not `wget`: the guest image's static busybox crashes in
/// glibc's NSS when wget looks up the "http" service.
fn guest_fetch(mark: &str, ip: &str) -> String {
    format!(
        "if printf 'GET /hello.txt HTTP/1.0\\r\\n\\r\\n' | timeout 6 nc -w 5 {ip} {HTTP_PORT} \
         | grep -q {PAGE}; then echo {mark}-ok; else echo {mark}-failed; fi; "
    )
}

fn taps_with_rules() -> Vec<String> {
    firewall::taps_with_rules().unwrap()
}

#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn the_guest_reaches_the_outside_world_by_ip_through_nat() {
    let _serial = serial();
    let outside = Outside::new(11);
    let run = husk_run(&[], &guest_fetch("OUT", &outside.ip(1)));
    let out = run.stdout();
    assert!(out.contains("OUT-ok"), "{out}\n{}", run.stderr());
}

#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn a_published_port_reaches_the_guest_from_the_outside_and_from_the_host() {
    let _serial = serial();
    let outside = Outside::new(12);
    let mut husk = spawn_husk(
        &["--net", "--publish", "18080:80"],
        "echo GUEST-PAGE > /tmp/page; \
         (while true; do nc -l -p 80 < /tmp/page; done) & sleep 1; echo SERVING; sleep 120",
    );
    wait_for_line(&mut husk, "SERVING", LIMIT);
    let host = outside.ip(2);
    let from_outside = outside.wait_until_served(&host, 18080, true);
    assert!(from_outside.contains("GUEST-PAGE"), "{from_outside}");
    let from_host = outside.wait_until_served(&host, 18080, false);
    assert!(from_host.contains("GUEST-PAGE"), "{from_host}");
    // An unpublished port stays closed.
    assert!(!outside.fetch(&host, 18081, true).contains("GUEST-PAGE"));
    let _ = husk_tests::signal(husk.id() as i32, rustix::process::Signal::KILL);
    let _ = husk.wait();
}

#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn a_denied_cidr_is_refused_an_allowed_one_works_and_the_hosts_own_addresses_are_closed() {
    let _serial = serial();
    let mut outside = Outside::new(13);
    // A server on the host's own (non-link) address, which the guest may not reach by default.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hello.txt"), PAGE).unwrap();
    let host_server = Command::new("python3")
        .args([
            "-m",
            "http.server",
            &HTTP_PORT.to_string(),
            "--bind",
            &outside.ip(2),
        ])
        .arg("--directory")
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    outside.servers.push(host_server);
    outside.wait_until_served(&outside.ip(2), HTTP_PORT, false);

    let deny = format!("{}/32", outside.ip(3));
    let script = format!(
        "{}{}{}",
        guest_fetch("ONE", &outside.ip(1)),
        guest_fetch("THREE", &outside.ip(3)),
        guest_fetch("HOST", &outside.ip(2))
    );
    let run = husk_run(&["--egress-deny", &deny], &script);
    let out = run.stdout();
    assert!(
        out.contains("ONE-ok"),
        "not denied, reachable:\n{out}\n{}",
        run.stderr()
    );
    assert!(out.contains("THREE-failed"), "denied:\n{out}");
    assert!(
        out.contains("HOST-failed"),
        "the host's own address is closed:\n{out}"
    );

    let allow = format!("{}/32", outside.ip(1));
    let run = husk_run(&["--egress-allow", &allow], &script);
    let out = run.stdout();
    assert!(out.contains("ONE-ok"), "allowed:\n{out}\n{}", run.stderr());
    assert!(
        out.contains("THREE-failed"),
        "not allowed (allow-list mode):\n{out}"
    );
    assert!(out.contains("HOST-failed"), "{out}");

    // An explicit allow opens the host's own address.
    let host = format!("{}/32", outside.ip(2));
    let run = husk_run(
        &["--egress-allow", &host],
        &guest_fetch("HOST", &outside.ip(2)),
    );
    assert!(
        run.stdout().contains("HOST-ok"),
        "{}\n{}",
        run.stdout(),
        run.stderr()
    );
}

#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn a_spoofed_source_address_from_the_guest_is_dropped() {
    let _serial = serial();
    let outside = Outside::new(14);
    let spoofed = outside.ip(77);
    outside.count_from(&spoofed);
    let target = outside.ip(1);
    let run = husk_run(
        &[],
        &format!(
            "ip addr add {spoofed}/32 dev eth0 && echo ADDED; \
             ping -c 3 -W 1 -I {spoofed} {target}; \
             ping -c 1 -W 3 {target} >/dev/null && echo REAL-OK; true"
        ),
    );
    let out = run.stdout();
    assert!(
        out.contains("ADDED"),
        "busybox ip cannot add an address:\n{out}"
    );
    assert!(
        out.contains("REAL-OK"),
        "the guest's own address works:\n{out}\n{}",
        run.stderr()
    );
    assert_eq!(
        outside.count(),
        0,
        "packets from the spoofed address got out:\n{out}"
    );
}

#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn no_rules_are_left_after_the_vm_ends_or_its_vmm_or_husk_is_killed() {
    let _serial = serial();
    require_guest_kvm();
    // The VM ends by itself.
    let run = husk_run(&[], "true");
    assert_eq!(run.code(), Some(0), "{}", run.stderr());
    assert_eq!(taps_with_rules(), Vec::<String>::new());

    // The VMM is killed with SIGKILL: husk run removes the rules.
    let mut husk = spawn_husk(&["--net"], "echo UP; sleep 600");
    wait_for_line(&mut husk, "UP", LIMIT);
    let taps = taps_with_rules();
    assert_eq!(taps.len(), 1, "one VM, one tap with rules: {taps:?}");
    let vmm = husk_tests::husk_run_child_pid(husk.id());
    husk_tests::signal(vmm as i32, rustix::process::Signal::KILL).unwrap();
    let _ = husk.wait();
    assert_eq!(
        taps_with_rules(),
        Vec::<String>::new(),
        "after kill -9 of the VMM"
    );

    // husk itself is killed with SIGKILL (its VMM follows): the next VM's start collects them.
    let mut husk = spawn_husk(&["--net"], "echo UP; sleep 600");
    wait_for_line(&mut husk, "UP", LIMIT);
    let taps = taps_with_rules();
    assert_eq!(taps.len(), 1, "{taps:?}");
    husk_tests::signal(husk.id() as i32, rustix::process::Signal::KILL).unwrap();
    let _ = husk.wait();
    let gone = Instant::now() + Duration::from_secs(10);
    while Path::new("/sys/class/net").join(&taps[0]).exists() {
        assert!(Instant::now() < gone, "tap {} outlived its VMM", taps[0]);
        std::thread::sleep(Duration::from_millis(50));
    }
    let run = husk_run(&[], "true");
    assert_eq!(run.code(), Some(0), "{}", run.stderr());
    assert_eq!(
        taps_with_rules(),
        Vec::<String>::new(),
        "collected by the next VM"
    );
}

/// A DNS responder (UDP) that answers A queries for `outside.test` with ADDRESS, NXDOMAIN else.
const DNS_SERVER: &str = r#"
import socket, sys
addr = bytes(int(x) for x in sys.argv[2].split('.'))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))
while True:
    q, peer = s.recvfrom(512)
    if len(q) < 12:
        continue
    i, labels = 12, []
    while i < len(q) and q[i] != 0:
        labels.append(q[i + 1:i + 1 + q[i]].decode(errors='replace'))
        i += 1 + q[i]
    question = q[12:i + 5]
    qtype = q[i + 1:i + 3]
    name = '.'.join(labels).lower()
    if name == 'outside.test' and qtype == b'\x00\x01':
        answer = b'\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04' + addr
        head = q[:2] + b'\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00'
    else:
        answer = b''
        rcode = b'\x81\x80' if name == 'outside.test' else b'\x81\x83'
        head = q[:2] + rcode + b'\x00\x01\x00\x00\x00\x00\x00\x00'
    s.sendto(head + question + answer, peer)
"#;

/// Whether this is the testbed's L1 (its /etc is a throw-away overlay): never rewrite the
/// resolv.conf of any other machine.
fn in_testbed_l1() -> bool {
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    hostname.trim() == "husk-testbed" && cmdline.contains("husk_run=")
}

#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn the_guest_resolves_a_name_through_the_hosts_resolver() {
    let _serial = serial();
    require_guest_kvm();
    if !in_testbed_l1() {
        eprintln!(
            "SKIPPED (LOUDLY): the DNS test points /etc/resolv.conf at a test resolver and only \
             does so in the testbed's L1 (scripts/testbed on a host without VT-x/AMD-V, or \
             HUSK_TESTBED_FORCE_L1=1)"
        );
        return;
    }
    let mut outside = Outside::new(15);
    let dns = outside.spawn_in_ns(&["python3", "-c", DNS_SERVER, &outside.ip(1), &outside.ip(1)]);
    outside.servers.push(dns);
    // /etc/resolv.conf may be a link (systemd-resolved): replace the link, not its target.
    let _ = std::fs::remove_file("/etc/resolv.conf");
    std::fs::write(
        "/etc/resolv.conf",
        format!("nameserver {}\n", outside.ip(1)),
    )
    .unwrap();
    // Python starts slowly in the emulated L1: wait until the responder listens.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let listening = sh(
            "ip",
            &["netns", "exec", &outside.ns, "ss", "-Hlun", "sport = :53"],
        );
        if !listening.stdout.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the test DNS responder never listened"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // busybox's nslookup has its own DNS client (the static image's glibc resolver cannot
    // load NSS); the name's address, the last "Address" line, is then fetched by IP.
    let run = husk_run(
        &[],
        &format!(
            "cat /etc/resolv.conf; nslookup outside.test; \
             ip=$(nslookup outside.test | awk '/^Address/ {{ a = $NF }} END {{ print a }}'); \
             {}",
            guest_fetch("BYNAME", "$ip")
        ),
    );
    let out = run.stdout();
    assert!(
        out.contains("nameserver 169.254."),
        "husk-init wrote resolv.conf:\n{out}"
    );
    assert!(
        out.contains(&outside.ip(1)),
        "the name resolved through the host:\n{out}\n{}",
        run.stderr()
    );
    assert!(out.contains("BYNAME-ok"), "fetched by name:\n{out}");
}
