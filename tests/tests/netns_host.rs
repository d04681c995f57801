//! A VM joined to a CNI-style network namespace (husk_host::netns), on this host without a
//! guest (root and iproute2's tc needed): the namespace's eth0 (a veth whose peer stands for
//! the CNI bridge) is redirected to a tap, so what the outside sends to eth0's address arrives
//! on the tap's fd, the VM's side, and what the VM writes leaves through eth0. All inside a
//! fresh network namespace, so the host's own interfaces are never touched.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use husk_host::net::LinkKind;
use husk_host::netns;

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Named namespaces deleted on drop.
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// Reads frames from the (non-blocking) tap fd until one satisfies `want` or 5 s pass.
fn frame_on_tap(tap: &OwnedFd, want: impl Fn(&[u8]) -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = vec![0u8; 65_600];
    while Instant::now() < deadline {
        match rustix::io::read(tap, &mut buf) {
            // A 12-byte virtio-net header, then the Ethernet frame.
            Ok(n) if n > 12 && want(&buf[12..n]) => return true,
            Ok(_) => {}
            Err(rustix::io::Errno::AGAIN) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("reading the tap: {e}"),
        }
    }
    false
}

#[test]
fn a_joined_namespace_hands_its_interfaces_traffic_and_identity_to_the_tap() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test needs root (network namespaces, taps, tc): run the suite as root"
    );
    let pid = std::process::id();
    let (outer, pod) = (format!("hk-outer-{pid}"), format!("hk-pod-{pid}"));
    let _cleanup = Namespaces(vec![outer.clone(), pod.clone()]);
    run("ip", &["netns", "add", &outer]);
    run("ip", &["netns", "add", &pod]);
    // This thread (and what it starts) lives in `outer`, the stand-in for the host and its
    // CNI bridge; `pod` is the container's namespace, configured as a CNI plugin would.
    let fd = std::fs::File::open(Path::new("/run/netns").join(&outer)).unwrap();
    rustix::thread::move_into_link_name_space(
        fd.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .unwrap();
    run("ip", &["link", "set", "lo", "up"]);
    run(
        "ip",
        &[
            "link", "add", "hkbr", "type", "veth", "peer", "name", "eth0", "netns", &pod,
        ],
    );
    run("ip", &["addr", "add", "10.77.0.1/24", "dev", "hkbr"]);
    run("ip", &["link", "set", "hkbr", "up"]);
    let in_pod = |args: &[&str]| {
        let mut all = vec!["netns", "exec", pod.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    };
    in_pod(&["ip", "addr", "add", "10.77.0.9/24", "dev", "eth0"]);
    in_pod(&["ip", "link", "set", "eth0", "mtu", "1400", "up"]);
    in_pod(&["ip", "route", "add", "default", "via", "10.77.0.1"]);
    let eth0_mac = in_pod(&["cat", "/sys/class/net/eth0/address"]);

    let path = format!("/var/run/netns/{pod}");
    let link = netns::connect(Path::new(&path), "eth0").unwrap();
    assert_eq!(link.guest_ip, Ipv4Addr::new(10, 77, 0, 9));
    assert_eq!(link.prefix_len, 24);
    assert_eq!(link.mtu, Some(1400), "the guest is told eth0's MTU");
    assert!(
        link.net_config().to_string().ends_with(",mtu=1400"),
        "{}",
        link.net_config()
    );
    assert_eq!(
        link.host_ip,
        Ipv4Addr::new(10, 77, 0, 1),
        "the default gateway"
    );
    let mac: Vec<String> = link.mac.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(mac.join(":"), eth0_mac.trim(), "the guest takes eth0's MAC");
    assert_eq!(
        link.kind,
        LinkKind::Netns {
            path: path.clone().into(),
            interface: "eth0".into()
        }
    );
    assert_eq!(
        link.kernel_param(),
        "ip=10.77.0.9::10.77.0.1:255.255.255.0::eth0:off"
    );
    let links = in_pod(&["ip", "-o", "link"]);
    assert!(links.contains(&link.tap_name), "no tap in the pod: {links}");
    let tap_mtu = in_pod(&["cat", &format!("/sys/class/net/{}/mtu", link.tap_name)]);
    assert_eq!(tap_mtu.trim(), "1400");

    // The outside sends to eth0's address: the ARP request for it reaches the VM's side.
    let socket = UdpSocket::bind("10.77.0.1:0").unwrap();
    socket.send_to(b"to-the-vm", "10.77.0.9:9999").unwrap();
    let arp_for_pod = |frame: &[u8]| {
        frame.len() >= 42 && frame[12..14] == [0x08, 0x06] && frame[38..42] == [10, 77, 0, 9]
    };
    assert!(
        frame_on_tap(&link.tap_fd, arp_for_pod),
        "no ARP request for 10.77.0.9 arrived on the tap"
    );
    // The VM answers (a frame written to the tap): it leaves through eth0 and the outside
    // learns the guest's MAC.
    let reply = arp_reply(link.mac, [10, 77, 0, 9], [10, 77, 0, 1]);
    let mut with_header = vec![0u8; 12];
    with_header.extend_from_slice(&reply);
    rustix::io::write(&link.tap_fd, &with_header).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut neighbours = String::new();
    while Instant::now() < deadline {
        neighbours = run("ip", &["neigh", "show", "10.77.0.9"]);
        if neighbours.contains(eth0_mac.trim()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        neighbours.contains(eth0_mac.trim()),
        "the VM's reply did not leave through eth0: {neighbours:?}"
    );

    // The VM ends: its tap goes with the fd; disconnect gives eth0 back.
    let tap_name = link.tap_name.clone();
    drop(link);
    assert!(!in_pod(&["ip", "-o", "link"]).contains(&tap_name));
    netns::disconnect(Path::new(&path), "eth0").unwrap();
    let qdiscs = in_pod(&["tc", "qdisc", "show", "dev", "eth0"]);
    assert!(!qdiscs.contains("ingress"), "{qdiscs}");
    // Twice is fine (a namespace already given back, or already gone).
    netns::disconnect(Path::new(&path), "eth0").unwrap();
    netns::disconnect(Path::new("/run/netns/hk-no-such-pod"), "eth0").unwrap();
}

/// An Ethernet ARP reply: `sender_ip` is at `mac`, to `target_ip` (broadcast).
fn arp_reply(mac: [u8; 6], sender_ip: [u8; 4], target_ip: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06]);
    f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 2]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&sender_ip);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&target_ip);
    f
}
