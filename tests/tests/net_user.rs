//! Rootless networking, `husk run --net=user` (docs/networking.md, "Rootless: --net=user"):
//! user-mode networking through passt.
//!
//! On any host (no guest): the real passt, started by husk's own launch code with husk's
//! arguments, answers ARP over the socket husk hands the VMM, binds the published ports, and
//! quits when the VMM's end closes. These fail loudly when passt is missing (scripts/setup
//! installs the Debian package).
//!
//! In the testbed (guests): husk runs as an unprivileged user (nobody) and the guest reaches an
//! "outside world" (a network namespace, 198.18.K.0/24 as in networking.rs, K = 21..23) by IP
//! and by name, not the host's loopback (no --host-access), serves a published port to the host
//! and the outside, and no passt outlives its VM, even when husk is killed. As root (jailed
//! VMM, passt as nobody) with --host-access, the gateway is the host's loopback, and 16 MiB
//! cross each way intact.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use husk_host::passt::{self, Passt, PasstConfig};
use husk_tests::{bin, require_guest_kvm, run_with_timeout, wait_for_line};

const LIMIT: Duration = Duration::from_secs(180);
/// The page the outside server serves.
const PAGE: &str = "HELLO-FROM-OUTSIDE";
const HTTP_PORT: u16 = 8000;
/// The unprivileged user husk runs as in the testbed tests.
const NOBODY: u32 = 65534;

fn require_passt() {
    assert!(
        Path::new(passt::PASST).exists(),
        "{} is missing: install the Debian package passt (scripts/setup does)",
        passt::PASST
    );
}

/// passt's uid when these tests start it: as husk does (nobody when root).
fn runas() -> Option<(u32, u32)> {
    husk_tests::is_root().then_some((NOBODY, NOBODY))
}

/// A frame in passt's framing: its length (32-bit big-endian), then the frame.
fn send_frame(sock: &mut UnixStream, frame: &[u8]) {
    let mut wire = (frame.len() as u32).to_be_bytes().to_vec();
    wire.extend_from_slice(frame);
    sock.write_all(&wire).unwrap();
}

/// The next frame from passt (however its bytes were split across writes).
fn recv_frame(sock: &mut UnixStream) -> Vec<u8> {
    let mut len = [0; 4];
    sock.read_exact(&mut len).unwrap();
    let len = u32::from_be_bytes(len) as usize;
    assert!((14..=65_549).contains(&len), "frame length {len}");
    let mut frame = vec![0; len];
    sock.read_exact(&mut frame).unwrap();
    frame
}

/// An ARP request from the guest (its MAC and address) for `target`.
fn arp_request(target: std::net::Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&passt::GUEST_MAC);
    f.extend_from_slice(&[0x08, 0x06]); // ARP
    f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]); // Ethernet/IPv4, request
    f.extend_from_slice(&passt::GUEST_MAC);
    f.extend_from_slice(&passt::GUEST_IP.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f.resize(60, 0);
    f
}

/// Whether process `pid` is gone or a zombie.
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

/// A TCP port nothing listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn passt_answers_arp_binds_published_ports_and_quits_with_the_vmms_end() {
    require_passt();
    let port = free_port();
    let config = PasstConfig {
        published: vec![format!("{port}:80").parse().unwrap()],
        host_access: false,
        dns: true,
        runas: runas(),
    };
    let mut passt = Passt::start(&config).unwrap_or_else(|e| panic!("{e}"));
    let pid = passt.pid().unwrap();
    // The test plays the VMM: it takes the end husk hands husk-vmm.
    let mut vmm = UnixStream::from(passt.take_vmm_end().unwrap());
    vmm.set_read_timeout(Some(Duration::from_secs(10))).unwrap();

    for target in [passt::GATEWAY_IP, passt::DNS_IP] {
        send_frame(&mut vmm, &arp_request(target));
        let reply = recv_frame(&mut vmm);
        assert!(reply.len() >= 42, "{reply:02x?}");
        assert_eq!(&reply[0..6], &passt::GUEST_MAC, "to the guest");
        assert_eq!(&reply[6..12], &passt::PASST_MAC, "from passt's MAC");
        assert_eq!(&reply[12..14], &[0x08, 0x06], "ARP");
        assert_eq!(&reply[20..22], &[0, 2], "a reply");
        assert_eq!(&reply[22..28], &passt::PASST_MAC, "sender hardware address");
        assert_eq!(&reply[28..32], &target.octets(), "sender protocol address");
        assert_eq!(&reply[32..38], &passt::GUEST_MAC, "target hardware address");
        assert_eq!(&reply[38..42], &passt::GUEST_IP.octets(), "target address");
    }
    // The published port is bound on the host (passt accepts, then tries the guest).
    std::net::TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse().unwrap(),
        Duration::from_secs(5),
    )
    .unwrap_or_else(|e| panic!("published port {port}: {e}"));

    // The VMM's end closes: passt quits by itself.
    drop(vmm);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !exited(pid) {
        assert!(
            Instant::now() < deadline,
            "passt {pid} outlived the VMM's end"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    passt.stop();
    assert!(
        std::net::TcpStream::connect(format!("127.0.0.1:{port}")).is_err(),
        "port {port} still bound"
    );
}

#[test]
fn passt_refusing_to_start_is_reported_with_its_reason() {
    require_passt();
    // A published port already taken: passt quits; husk says why.
    let taken = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let config = PasstConfig {
        published: vec![format!("{port}:80").parse().unwrap()],
        runas: runas(),
        ..PasstConfig::default()
    };
    let e = Passt::start(&config).err().expect("passt started anyway");
    let text = e.to_string();
    assert!(
        text.starts_with("--net=user: passt failed to start:") && text.contains(&port.to_string()),
        "{text}"
    );
}

#[test]
fn the_cli_refuses_an_egress_policy_with_user_networking() {
    let out = Command::new(bin("husk"))
        .args([
            "run",
            "--net=user",
            "--egress-deny",
            "10.0.0.0/8",
            "--",
            "true",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(
        err.contains("--egress-deny is not available with --net=user")
            && err.contains("passt has no egress filter"),
        "{err}"
    );
}

// ---- testbed: guests, husk as an unprivileged user ----

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

/// Whether this is the testbed's L1 (its /etc and /dev are throw-away): never change another
/// machine's resolv.conf or /dev/kvm.
fn in_testbed_l1() -> bool {
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    hostname.trim() == "husk-testbed" && cmdline.contains("husk_run=")
}

/// What husk needs to run as nobody: /dev/kvm usable by it, and a guest kernel and initramfs it
/// can read. Kernel and initramfs are copied out of $HUSK_HOME (under /root, which nobody
/// cannot enter) into a directory of their own. /dev/kvm: usable by all already, or through its
/// group (given to husk as a supplementary group), or, in the testbed's throw-away L1 only
/// (where it is root's alone), opened up with chmod 0666.
struct Unprivileged {
    dir: tempfile::TempDir,
    groups: Option<u32>,
}

impl Unprivileged {
    fn new() -> Self {
        use std::os::unix::fs::MetadataExt;
        require_guest_kvm();
        assert!(husk_tests::is_root(), "these tests need root to set up");
        let kvm = std::fs::metadata("/dev/kvm").unwrap();
        let mut groups = None;
        if kvm.mode() & 0o006 != 0o006 {
            if kvm.mode() & 0o060 == 0o060 && kvm.gid() != 0 {
                groups = Some(kvm.gid());
            } else if in_testbed_l1() {
                std::fs::set_permissions("/dev/kvm", std::fs::Permissions::from_mode(0o666))
                    .unwrap();
            } else {
                panic!(
                    "/dev/kvm (mode {:o}, gid {}) is not usable by an unprivileged user here; \
                     give it a group (0660) or run these tests through scripts/testbed",
                    kvm.mode() & 0o777,
                    kvm.gid()
                );
            }
        }
        let dir = tempfile::Builder::new()
            .prefix("husk-netuser-")
            .tempdir_in("/tmp")
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        for (from, to) in [
            ("kernel/vmlinux", "vmlinux"),
            ("images/default.cpio.gz", "initrd.cpio.gz"),
        ] {
            let to = dir.path().join(to);
            std::fs::copy(husk_tests::artifact(from), &to).unwrap();
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        Unprivileged { dir, groups }
    }

    /// `husk run --net=user OPTIONS -- sh -c SCRIPT` as nobody, in its own process group.
    fn command(&self, options: &[&str], script: &str) -> Command {
        self.command_as(true, options, script)
    }

    /// [`Self::command`], as nobody or as root.
    fn command_as(&self, nobody: bool, options: &[&str], script: &str) -> Command {
        use std::ffi::OsString;
        use std::os::unix::process::CommandExt;
        let mut argv: Vec<OsString> = Vec::new();
        if nobody {
            argv.extend([
                // By path, the util-linux one.
                OsString::from("/usr/bin/setpriv"),
                format!("--reuid={NOBODY}").into(),
                format!("--regid={NOBODY}").into(),
                match self.groups {
                    Some(gid) => format!("--groups={gid}").into(),
                    None => "--clear-groups".into(),
                },
                "--".into(),
            ]);
        }
        argv.extend([
            bin("husk").into(),
            "run".into(),
            "--net=user".into(),
            "--kernel".into(),
            self.path("vmlinux").into(),
            "--initrd".into(),
            self.path("initrd.cpio.gz").into(),
        ]);
        argv.extend(options.iter().map(OsString::from));
        argv.extend(["--", "sh", "-c", script].map(OsString::from));
        let mut cmd = Command::new(argv.remove(0));
        cmd.args(argv)
            .env("HOME", self.dir.path())
            .env("HUSK_HOME", self.dir.path())
            .current_dir(self.dir.path())
            .process_group(0);
        cmd
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// passt processes (its binary execs passt.avx2 where it can) whose real uid is nobody's (from
/// /proc/PID/status: passt makes itself non-dumpable, so /proc/PID is root's).
fn passts_of_nobody() -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
        let uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|u| u.split_whitespace().next())
            .and_then(|u| u.parse::<u32>().ok());
        if comm.starts_with("passt") && uid == Some(NOBODY) && !exited(pid) {
            found.push(pid);
        }
    }
    found
}

fn assert_no_passt_left() {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = passts_of_nobody();
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "passt left running: {left:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The outside world of test `k`: namespace `husk-uout-K`, veth `huKa` (L1, 198.18.K.2) and
/// `huKb` (namespace, 198.18.K.1), a web server on port 8000 there (networking.rs's pattern).
/// passt needs an IPv4 default route on the host to pick its template interface: L1 has none,
/// so one is added through the veth there (L1 only).
struct Outside {
    k: u8,
    ns: String,
    servers: Vec<Child>,
    _dir: tempfile::TempDir,
}

impl Outside {
    fn new(k: u8) -> Self {
        let ns = format!("husk-uout-{k}");
        let (host_end, ns_end) = (format!("hu{k}a"), format!("hu{k}b"));
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
        in_ns(&["ip", "link", "set", &ns_end, "up"]);
        in_ns(&["ip", "link", "set", "lo", "up"]);
        let default = sh("ip", &["-4", "route", "show", "default"]);
        if default.stdout.is_empty() && in_testbed_l1() {
            ok(
                "ip",
                &[
                    "route",
                    "add",
                    "default",
                    "via",
                    &format!("198.18.{k}.1"),
                    "dev",
                    &host_end,
                ],
            );
        }
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
        outside.wait_listening("tcp", HTTP_PORT);
        outside
    }

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

    /// Waits (30 s at most: Python starts slowly in the emulated L1) for a listener.
    fn wait_listening(&self, proto: &str, port: u16) {
        let flag = if proto == "tcp" { "-Hltn" } else { "-Hlun" };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = sh(
                "ip",
                &[
                    "netns",
                    "exec",
                    &self.ns,
                    "ss",
                    flag,
                    &format!("sport = :{port}"),
                ],
            );
            if !out.stdout.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nothing listens on {proto} port {port} in {}",
                self.ns
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        for server in &mut self.servers {
            let _ = server.kill();
            let _ = server.wait();
        }
        let _ = sh("ip", &["netns", "del", &self.ns]);
        // The default route through it, if added, goes with the link.
        let _ = sh("ip", &["link", "del", &format!("hu{}a", self.k)]);
    }
}

/// A guest shell line printing `MARK-ok` or `MARK-failed` for a fetch of the outside page (nc
/// with a hand-written request: the guest image's busybox wget crashes).
fn guest_fetch(mark: &str, ip: &str) -> String {
    guest_fetch_at(mark, ip, HTTP_PORT)
}

fn guest_fetch_at(mark: &str, ip: &str, port: u16) -> String {
    format!(
        "if printf 'GET /hello.txt HTTP/1.0\\r\\n\\r\\n' | timeout 6 nc -w 5 {ip} {port} \
         | grep -q {PAGE}; then echo {mark}-ok; else echo {mark}-failed; fi; "
    )
}

/// The port of [`LoopbackServer`].
const LOOPBACK_PORT: u16 = 8001;

/// A web server on the host's loopback only (127.0.0.1:8001), serving the page: what the guest
/// reaches at the gateway address with --host-access, and not without.
struct LoopbackServer {
    child: Child,
    _dir: tempfile::TempDir,
}

impl LoopbackServer {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("hello.txt"), PAGE).unwrap();
        let child = Command::new("python3")
            .args(["-m", "http.server", &LOOPBACK_PORT.to_string()])
            .args(["--bind", "127.0.0.1", "--directory"])
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while sh("ss", &["-Hltn", &format!("sport = :{LOOPBACK_PORT}")])
            .stdout
            .is_empty()
        {
            assert!(
                Instant::now() < deadline,
                "the loopback server never listened"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        LoopbackServer { child, _dir: dir }
    }
}

impl Drop for LoopbackServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A DNS responder (UDP) that answers A queries for `outside.test` with ADDRESS, NXDOMAIN else
/// (networking.rs's).
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

#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn a_rootless_guest_reaches_the_outside_by_ip_and_by_name_and_leaves_no_passt() {
    require_passt();
    let user = Unprivileged::new();
    let mut outside = Outside::new(21);
    // DNS by name only in L1, whose /etc is throw-away: the host's resolver becomes a test
    // responder in the outside world, which passt forwards the guest's queries to.
    let dns = in_testbed_l1();
    if dns {
        let responder =
            outside.spawn_in_ns(&["python3", "-c", DNS_SERVER, &outside.ip(1), &outside.ip(1)]);
        outside.servers.push(responder);
        let _ = std::fs::remove_file("/etc/resolv.conf");
        std::fs::write(
            "/etc/resolv.conf",
            format!("nameserver {}\n", outside.ip(1)),
        )
        .unwrap();
        outside.wait_listening("udp", 53);
    } else {
        eprintln!(
            "SKIPPED (LOUDLY): the by-name part points /etc/resolv.conf at a test resolver and \
             only does so in the testbed's L1"
        );
    }
    let by_name = if dns {
        format!(
            "nslookup outside.test; \
             ip=$(nslookup outside.test | awk '/^Address/ {{ a = $NF }} END {{ print a }}'); {}",
            guest_fetch("BYNAME", "$ip")
        )
    } else {
        String::new()
    };
    // Without --host-access the gateway address is not the host (--no-map-gw).
    let _loopback = LoopbackServer::new();
    let script = format!(
        "echo \"host=$HUSK_HOST_IP guest=$HUSK_GUEST_IP\"; cat /etc/resolv.conf; {}{}{by_name}",
        guest_fetch("BYIP", &outside.ip(1)),
        guest_fetch_at("GW", "10.0.2.2", LOOPBACK_PORT)
    );
    let run = run_with_timeout(&mut user.command(&[], &script), LIMIT);
    let out = run.stdout();
    let err = run.stderr();
    assert_eq!(run.code(), Some(0), "{out}\n{err}");
    assert!(out.contains("host=10.0.2.2 guest=10.0.2.15"), "{out}");
    assert!(out.contains("BYIP-ok"), "by IP, as nobody:\n{out}\n{err}");
    assert!(
        out.contains("GW-failed"),
        "the host's loopback, not asked for:\n{out}"
    );
    if dns {
        assert!(out.contains("nameserver 10.0.2.3"), "{out}");
        assert!(
            out.contains("BYNAME-ok"),
            "by name through passt:\n{out}\n{err}"
        );
    }
    assert_no_passt_left();
}

#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn a_rootless_guests_published_port_serves_the_host_and_passt_goes_with_a_killed_husk() {
    require_passt();
    let user = Unprivileged::new();
    let outside = Outside::new(22);
    let mut husk = user
        .command(
            &["--publish", "18090:80"],
            "echo GUEST-PAGE > /tmp/page; \
             (while true; do nc -l -p 80 < /tmp/page; done) & sleep 1; echo SERVING; sleep 120",
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    wait_for_line(&mut husk, "SERVING", LIMIT);
    let fetch = |ip: &str, from_ns: bool| -> String {
        let client = "import socket, sys\n\
s = socket.create_connection((sys.argv[1], 18090), timeout=5)\n\
s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\n\
print(s.recv(4096).decode(errors='replace'))\n";
        let out = if from_ns {
            sh(
                "ip",
                &["netns", "exec", &outside.ns, "python3", "-c", client, ip],
            )
        } else {
            sh("python3", &["-c", client, ip])
        };
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for (ip, from_ns) in [("127.0.0.1", false), (outside.ip(2).as_str(), true)] {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = fetch(ip, from_ns);
            if got.contains("GUEST-PAGE") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{ip}:18090 never served the guest's page: {got:?}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    assert!(!passts_of_nobody().is_empty(), "passt runs as nobody");
    // kill -9 of husk: its VMM dies with it (parent-death signal), and passt with the VMM's
    // end of their socket (and its own parent-death signal).
    let _ = husk_tests::signal(husk.id() as i32, rustix::process::Signal::KILL);
    let _ = husk.wait();
    assert_no_passt_left();
}

/// sha256 of `data`, by the host's sha256sum.
fn sha256_hex(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data).unwrap());
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn as_root_user_networking_runs_jailed_and_host_access_reaches_the_hosts_loopback() {
    // 16 MiB each way through passt, intact: frames cut across reads and writes of the socket.
    const BYTES: usize = 16 << 20;
    require_passt();
    let setup = Unprivileged::new();
    let outside = Outside::new(23);
    let _loopback = LoopbackServer::new();
    // On the host's loopback, which --host-access maps the gateway address to: a sink for the
    // guest's upload, a source for its download.
    let sink = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let source = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (sink_port, source_port) = (
        sink.local_addr().unwrap().port(),
        source.local_addr().unwrap().port(),
    );
    let received = std::thread::spawn(move || {
        let (mut conn, _) = sink.accept().unwrap();
        let mut data = Vec::with_capacity(BYTES);
        Read::by_ref(&mut conn)
            .take(BYTES as u64)
            .read_to_end(&mut data)
            .unwrap();
        data
    });
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let download: Vec<u8> = (0..BYTES)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let download_sum = sha256_hex(&download);
    let sent = std::thread::spawn(move || {
        let (mut conn, _) = source.accept().unwrap();
        conn.write_all(&download).unwrap();
    });
    let script = format!(
        "{}{}\
         head -c {BYTES} /dev/urandom > /tmp/blob && sha256sum /tmp/blob && \
         nc 10.0.2.2 {sink_port} < /tmp/blob && echo SENT; \
         nc 10.0.2.2 {source_port} > /tmp/in; sha256sum /tmp/in",
        guest_fetch("BYIP", &outside.ip(1)),
        guest_fetch_at("GW", "10.0.2.2", LOOPBACK_PORT)
    );
    // As root: the VMM runs in husk-jailer's jail, passt as the jail's user (nobody).
    let run = run_with_timeout(
        &mut setup.command_as(false, &["--host-access", "--memory", "512"], &script),
        LIMIT,
    );
    let (out, err) = (run.stdout(), run.stderr());
    assert_eq!(run.code(), Some(0), "{out}\n{err}");
    assert!(out.contains("BYIP-ok"), "by IP, as root:\n{out}\n{err}");
    assert!(
        out.contains("GW-ok"),
        "--host-access: the gateway is the host's loopback:\n{out}\n{err}"
    );
    let data = received.join().unwrap();
    assert_eq!(data.len(), BYTES, "upload:\n{out}");
    let sum_of = |file: &str| {
        out.lines()
            .find(|l| l.ends_with(file))
            .and_then(|l| l.split_whitespace().next())
            .map(str::to_string)
    };
    assert_eq!(
        sum_of("/tmp/blob"),
        Some(sha256_hex(&data)),
        "upload changed:\n{out}"
    );
    sent.join().unwrap();
    assert_eq!(
        sum_of("/tmp/in"),
        Some(download_sum),
        "download changed:\n{out}"
    );
    assert_no_passt_left();
}
