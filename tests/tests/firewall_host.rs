//! husk's nftables table on this host (no guest needed; root and Debian's nftables needed):
//! the rules of a VM are applied, listed, removed, and collected once their tap is gone, and
//! traffic through them (a network namespace standing in for the guest) is NATted, filtered and
//! published as docs/networking.md says. All inside fresh network namespaces, so that the
//! host's own firewall is never touched.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::Path;
use std::process::Command;

use husk_host::firewall::{self, EgressPolicy, VmRules};

/// A named network namespace (`ip netns`) that this test thread has entered; deleted on drop.
struct NetNs(String);

impl NetNs {
    /// Creates the namespace and moves the calling thread (and every process it starts) into it.
    fn enter(name: &str) -> Self {
        let _ = Command::new("ip").args(["netns", "del", name]).status();
        run("ip", &["netns", "add", name]);
        let ns = NetNs(name.into());
        let fd = std::fs::File::open(Path::new("/run/netns").join(name)).unwrap();
        rustix::thread::move_into_link_name_space(
            fd.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .unwrap();
        ns
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The chain names of husk's table, as `nft -j list table inet husk` gives them.
fn chains() -> Vec<String> {
    let out = Command::new("/usr/sbin/nft")
        .args(["-j", "list", "table", "inet", "husk"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // `"chain": {"family": "inet", "table": "husk", "name": "NAME", ...}`: no JSON crate here.
    text.split("\"chain\": {")
        .skip(1)
        .filter_map(|c| c.split("\"name\": \"").nth(1)?.split('"').next())
        .map(String::from)
        .collect()
}

fn rules(tap: &str) -> VmRules {
    VmRules {
        tap: tap.into(),
        mac: [0x06, 0x00, 169, 254, 200, 2],
        host_ip: Ipv4Addr::new(169, 254, 200, 1),
        guest_ip: Ipv4Addr::new(169, 254, 200, 2),
        dns: Some(Ipv4Addr::new(192, 0, 2, 53)),
        published: vec![
            "8080:80".parse().unwrap(),
            "127.0.0.1:5353:53/udp".parse().unwrap(),
        ],
        egress: EgressPolicy {
            allow: vec!["192.0.2.0/24".parse().unwrap()],
            deny: vec!["192.0.2.9".parse().unwrap()],
            host_access: false,
        },
    }
}

#[test]
fn a_vms_rules_are_applied_removed_and_collected_after_its_tap_is_gone() {
    if !husk_tests::is_root() || !Path::new("/usr/sbin/nft").exists() {
        eprintln!(
            "SKIPPED (LOUDLY): husk's firewall test needs root and /usr/sbin/nft \
             (Debian package nftables); nothing was checked"
        );
        return;
    }
    let _ns = NetNs::enter(&format!("husk-fw-{}", std::process::id()));
    // Persistent taps stand in for the VMs' (which go with their VMM).
    run("ip", &["tuntap", "add", "huskt0", "mode", "tap"]);
    run("ip", &["tuntap", "add", "huskt1", "mode", "tap"]);

    firewall::apply(&rules("huskt0")).unwrap();
    firewall::apply(&rules("huskt1")).unwrap();
    let listed = chains();
    for tap in ["huskt0", "huskt1"] {
        for role in ["src", "host", "out", "in", "dnat", "snat"] {
            let chain = format!("{tap}-{role}");
            assert!(listed.contains(&chain), "{chain} missing from {listed:?}");
        }
    }
    let forwarding = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    assert_eq!(forwarding.trim(), "1", "husk switches IPv4 forwarding on");
    let table = run("/usr/sbin/nft", &["list", "table", "inet", "husk"]);
    assert!(
        table.contains("iifname \"huskt0\" jump huskt0-src"),
        "{table}"
    );
    assert!(table.contains("dnat ip to 169.254.200.2:80"), "{table}");

    // Applying again for a re-used name replaces its chains (one transaction, no error).
    firewall::apply(&rules("huskt0")).unwrap();
    assert_eq!(
        chains().iter().filter(|c| c.starts_with("huskt0-")).count(),
        6
    );

    firewall::remove("huskt0").unwrap();
    let listed = chains();
    assert!(
        !listed.iter().any(|c| c.starts_with("huskt0-")),
        "{listed:?}"
    );
    assert!(
        listed.iter().any(|c| c.starts_with("huskt1-")),
        "the other VM keeps its rules"
    );
    assert!(!run("/usr/sbin/nft", &["list", "table", "inet", "husk"]).contains("huskt0"));

    // The tap vanishes (as with a VMM killed with SIGKILL): garbage collection finds it gone.
    run("ip", &["tuntap", "del", "huskt1", "mode", "tap"]);
    firewall::collect_garbage().unwrap();
    let listed = chains();
    assert!(
        listed.iter().all(|c| !c.starts_with("huskt")),
        "per-VM chains left: {listed:?}"
    );
    assert!(firewall::taps_with_rules().unwrap().is_empty());
}

/// Runs `args` in the named namespace; its output, and whether it succeeded.
fn in_ns(ns: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// Serves TEXT on TCP PORT on every address of the namespace it runs in (one answer per
/// connection, then close).
const SERVER: &str = "import socket, sys\n\
s = socket.socket()\n\
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
s.bind(('0.0.0.0', int(sys.argv[1])))\n\
s.listen(8)\n\
while True:\n    c, _ = s.accept()\n    c.sendall(sys.argv[2].encode())\n    c.close()\n";

/// Connects to IP PORT (2 s at most) and prints what it reads; exits 1 when it cannot.
const CLIENT: &str = "import socket, sys\n\
try:\n    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)\n    print(c.recv(100).decode())\n\
except OSError as e:\n    print('FAILED', e)\n    sys.exit(1)\n";

/// Sends one UDP datagram from SOURCE to DEST:9 (SOURCE must be an address of the namespace).
const SEND_FROM: &str = "import socket, sys\n\
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
s.bind((sys.argv[1], 0))\n\
s.sendto(b'x', (sys.argv[2], 9))\n";

struct Servers(Vec<std::process::Child>);

impl Drop for Servers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn serve(ns: Option<&str>, port: &str, text: &str) -> std::process::Child {
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "python3"]);
            c
        }
        None => Command::new("python3"),
    };
    cmd.args(["-c", SERVER, port, text]).spawn().unwrap()
}

fn fetch(ns: &str, ip: &str, port: &str) -> String {
    // Servers take a moment to listen: a refused connection is retried, a dropped one is not.
    for _ in 0..20 {
        let (_, out) = in_ns(ns, &["python3", "-c", CLIENT, ip, port]);
        if !out.contains("Connection refused") {
            return out;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    "FAILED refused".into()
}

fn counted(ns: &str) -> u64 {
    let (_, text) = in_ns(
        ns,
        &["/usr/sbin/nft", "list", "counter", "ip", "probe", "seen"],
    );
    text.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no packet count in {text:?}"))
}

/// A VM stand-in: namespace G behind veth `hvt0` (as a tap would be), addressed as husk
/// addresses a guest; an outside namespace O (198.18.99.1 and .3) behind `hvo`, the host
/// (this thread's own fresh namespace) at 198.18.99.2.
#[test]
fn traffic_through_a_vms_rules_is_natted_filtered_and_published_as_documented() {
    if !husk_tests::is_root() || !Path::new("/usr/sbin/nft").exists() {
        eprintln!(
            "SKIPPED (LOUDLY): husk's firewall test needs root and /usr/sbin/nft \
             (Debian package nftables); nothing was checked"
        );
        return;
    }
    let pid = std::process::id();
    let _host = NetNs::enter(&format!("husk-fwh-{pid}"));
    let (g, o) = (format!("husk-fwg-{pid}"), format!("husk-fwo-{pid}"));
    let _g = NamedNs::new(&g);
    let _o = NamedNs::new(&o);
    // No reverse-path filter: the anti-spoofing checked below is husk's own.
    std::fs::write("/proc/sys/net/ipv4/conf/all/rp_filter", "0").unwrap();
    std::fs::write("/proc/sys/net/ipv4/conf/default/rp_filter", "0").unwrap();
    run("ip", &["link", "set", "lo", "up"]);
    run(
        "ip",
        &[
            "link", "add", "hvt0", "type", "veth", "peer", "name", "eth0", "netns", &g,
        ],
    );
    run("ip", &["addr", "add", "169.254.200.1/30", "dev", "hvt0"]);
    run("ip", &["link", "set", "hvt0", "up"]);
    run(
        "ip",
        &[
            "link", "add", "hvo", "type", "veth", "peer", "name", "eth0", "netns", &o,
        ],
    );
    run("ip", &["addr", "add", "198.18.99.2/24", "dev", "hvo"]);
    run("ip", &["link", "set", "hvo", "up"]);
    for (ns, cmds) in [
        (
            &g,
            vec![
                vec!["ip", "link", "set", "eth0", "address", "06:00:a9:fe:c8:02"],
                vec!["ip", "addr", "add", "169.254.200.2/30", "dev", "eth0"],
                vec!["ip", "addr", "add", "198.18.99.77/32", "dev", "eth0"],
                vec!["ip", "link", "set", "eth0", "up"],
                vec!["ip", "link", "set", "lo", "up"],
                vec![
                    "ip",
                    "route",
                    "add",
                    "default",
                    "via",
                    "169.254.200.1",
                    "src",
                    "169.254.200.2",
                ],
            ],
        ),
        (
            &o,
            vec![
                vec!["ip", "addr", "add", "198.18.99.1/24", "dev", "eth0"],
                vec!["ip", "addr", "add", "198.18.99.3/32", "dev", "eth0"],
                vec!["ip", "link", "set", "eth0", "up"],
                vec!["ip", "link", "set", "lo", "up"],
                vec![
                    "/usr/sbin/nft",
                    "add table ip probe; add counter ip probe seen; \
                      add chain ip probe c { type filter hook prerouting priority -300; }; \
                      add rule ip probe c ip saddr 198.18.99.77 counter name seen",
                ],
            ],
        ),
    ] {
        for cmd in cmds {
            let (ok, out) = in_ns(ns, &cmd);
            assert!(ok, "{cmd:?} in {ns}: {out}");
        }
    }
    let _servers = Servers(vec![
        serve(Some(&o), "8000", "OUTSIDE"),
        serve(Some(&g), "80", "GUEST"),
        serve(None, "8001", "HOST"),
    ]);
    let send_spoofed = || {
        let (ok, out) = in_ns(
            &g,
            &["python3", "-c", SEND_FROM, "198.18.99.77", "198.18.99.1"],
        );
        assert!(ok, "{out}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    // Control: with forwarding on and no rules, a spoofed datagram gets out.
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").unwrap();
    send_spoofed();
    assert_eq!(counted(&o), 1, "the spoofing probe itself works");

    let rules = |host_access| VmRules {
        tap: "hvt0".into(),
        mac: [0x06, 0x00, 169, 254, 200, 2],
        host_ip: Ipv4Addr::new(169, 254, 200, 1),
        guest_ip: Ipv4Addr::new(169, 254, 200, 2),
        dns: None,
        published: vec!["18080:80".parse().unwrap()],
        egress: EgressPolicy {
            allow: Vec::new(),
            deny: vec!["198.18.99.3".parse().unwrap()],
            host_access,
        },
    };
    firewall::apply(&rules(false)).unwrap();

    // Egress through NAT; the denied address is not reachable.
    assert!(fetch(&g, "198.18.99.1", "8000").contains("OUTSIDE"));
    assert!(fetch(&g, "198.18.99.3", "8000").contains("FAILED"));
    // Without host access, a host service listening on every address is closed through the
    // link's host end too (ping still answers); the host's other addresses are closed.
    assert!(fetch(&g, "169.254.200.1", "8001").contains("FAILED"));
    let (pinged, out) = in_ns(
        &g,
        &["busybox", "ping", "-c", "1", "-W", "5", "169.254.200.1"],
    );
    assert!(pinged, "ping of the host end: {out}");
    assert!(fetch(&g, "198.18.99.2", "8001").contains("FAILED"));
    // The published port, from the outside and from the host itself; nothing else is open.
    assert!(fetch(&o, "198.18.99.2", "18080").contains("GUEST"));
    let from_host = Command::new("python3")
        .args(["-c", CLIENT, "198.18.99.2", "18080"])
        .output()
        .unwrap();
    let from_host = String::from_utf8_lossy(&from_host.stdout).into_owned();
    assert!(from_host.contains("GUEST"), "{from_host}");
    assert!(fetch(&o, "169.254.200.2", "80").contains("FAILED"));
    // Anti-spoofing: the guest's other address gets nothing out.
    send_spoofed();
    assert_eq!(counted(&o), 1, "a spoofed datagram got out");

    // Host access opens the host end (any port), and still nothing else of the host's.
    firewall::apply(&rules(true)).unwrap();
    assert!(fetch(&g, "169.254.200.1", "8001").contains("HOST"));
    assert!(fetch(&g, "198.18.99.2", "8001").contains("FAILED"));

    firewall::remove("hvt0").unwrap();
    assert!(firewall::taps_with_rules().unwrap().is_empty());
}

/// A named network namespace this thread does not enter; deleted on drop.
struct NamedNs(String);

impl NamedNs {
    fn new(name: &str) -> Self {
        let _ = Command::new("ip").args(["netns", "del", name]).status();
        run("ip", &["netns", "add", name]);
        NamedNs(name.into())
    }
}

impl Drop for NamedNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}
