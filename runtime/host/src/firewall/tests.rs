//! The rendered scripts, case by case (applying them needs root: tests/tests/firewall_host.rs).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use super::nft::parse_listing;
use super::render::{transaction, valid_tap_name, Existing, Role};
use super::*;

fn rules(tap: &str) -> VmRules {
    VmRules {
        tap: tap.into(),
        mac: [0x06, 0x00, 169, 254, 128, 2],
        host_ip: Ipv4Addr::new(169, 254, 128, 1),
        guest_ip: Ipv4Addr::new(169, 254, 128, 2),
        dns: None,
        published: Vec::new(),
        egress: EgressPolicy::default(),
    }
}

fn all_roles() -> BTreeSet<Role> {
    Role::ALL.into_iter().collect()
}

const BASES: &str = "\
add table inet husk
add chain inet husk prerouting { type filter hook prerouting priority mangle; policy accept; }
flush chain inet husk prerouting
add chain inet husk input { type filter hook input priority filter; policy accept; }
flush chain inet husk input
add chain inet husk forward { type filter hook forward priority filter; policy accept; }
flush chain inet husk forward
add chain inet husk nat_prerouting { type nat hook prerouting priority dstnat; policy accept; }
flush chain inet husk nat_prerouting
add chain inet husk nat_output { type nat hook output priority -100; policy accept; }
flush chain inet husk nat_output
add chain inet husk nat_postrouting { type nat hook postrouting priority srcnat; policy accept; }
flush chain inet husk nat_postrouting
";

#[test]
fn a_vm_gets_anti_spoofing_forwarding_and_masquerade_and_the_base_chains_jump_to_it() {
    let script = transaction(&Existing::new(), |_| false, Some(&rules("husk0")));
    let want = format!(
        "{BASES}\
add chain inet husk husk0-src
add chain inet husk husk0-host
add chain inet husk husk0-out
add chain inet husk husk0-in
add chain inet husk husk0-dnat
add chain inet husk husk0-snat
add rule inet husk husk0-src ether saddr != 06:00:a9:fe:80:02 drop
add rule inet husk husk0-src meta nfproto ipv6 drop
add rule inet husk husk0-src ip saddr != 169.254.128.2 drop
add rule inet husk husk0-host ct state established,related accept
add rule inet husk husk0-host ip daddr 169.254.128.1 icmp type echo-request accept
add rule inet husk husk0-host drop
add rule inet husk husk0-out ct state established,related accept
add rule inet husk husk0-out ip daddr 169.254.0.0/16 drop
add rule inet husk husk0-out accept
add rule inet husk husk0-in ct state established,related accept
add rule inet husk husk0-in ct status dnat accept
add rule inet husk husk0-in drop
add rule inet husk husk0-snat ip saddr 169.254.128.2 oifname != \"husk0\" masquerade
add rule inet husk prerouting iifname \"husk0\" jump husk0-src
add rule inet husk input iifname \"husk0\" jump husk0-host
add rule inet husk forward iifname \"husk0\" jump husk0-out
add rule inet husk forward oifname \"husk0\" jump husk0-in
add rule inet husk nat_prerouting jump husk0-dnat
add rule inet husk nat_output jump husk0-dnat
add rule inet husk nat_postrouting jump husk0-snat
"
    );
    assert_eq!(script, want);
}

#[test]
fn dns_to_a_link_local_address_goes_to_the_upstream_resolver_and_passes_the_egress_policy() {
    let mut r = rules("husk0");
    r.dns = Some(Ipv4Addr::new(192, 0, 2, 53));
    r.egress.allow = vec!["10.0.0.0/8".parse().unwrap()];
    let script = transaction(&Existing::new(), |_| false, Some(&r));
    assert!(script.contains(
        "add rule inet husk husk0-dnat iifname \"husk0\" ip daddr 169.254.0.0/16 \
         meta l4proto { tcp, udp } th dport 53 dnat ip to 192.0.2.53\n"
    ));
    let out: Vec<&str> = script
        .lines()
        .filter(|l| l.starts_with("add rule inet husk husk0-out "))
        .collect();
    assert_eq!(
        out,
        [
            "add rule inet husk husk0-out ct state established,related accept",
            "add rule inet husk husk0-out ct status dnat accept",
            "add rule inet husk husk0-out ip daddr { 10.0.0.0/8 } accept",
            "add rule inet husk husk0-out ip daddr 169.254.0.0/16 drop",
            "add rule inet husk husk0-out drop",
        ]
    );
}

#[test]
fn deny_comes_before_allow_and_an_explicit_allow_opens_the_hosts_own_addresses() {
    let mut r = rules("husk3");
    r.egress.deny = vec!["10.1.0.0/16".parse().unwrap(), "192.0.2.9".parse().unwrap()];
    r.egress.allow = vec!["10.0.0.0/8".parse().unwrap()];
    let script = transaction(&Existing::new(), |_| false, Some(&r));
    let lines: Vec<&str> = script.lines().collect();
    let pos = |l: &str| lines.iter().position(|x| *x == l).unwrap();
    let deny = "add rule inet husk husk3-out ip daddr { 10.1.0.0/16, 192.0.2.9/32 } drop";
    let allow = "add rule inet husk husk3-out ip daddr { 10.0.0.0/8 } accept";
    assert!(pos(deny) < pos(allow));
    let host: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("add rule inet husk husk3-host "))
        .collect();
    assert_eq!(
        host,
        [
            "add rule inet husk husk3-host ct state established,related accept",
            "add rule inet husk husk3-host ip daddr { 10.1.0.0/16, 192.0.2.9/32 } drop",
            "add rule inet husk husk3-host ip daddr 169.254.128.1 icmp type echo-request accept",
            "add rule inet husk husk3-host ip daddr { 10.0.0.0/8 } accept",
            "add rule inet husk husk3-host drop",
        ]
    );
    assert_eq!(
        lines.last().copied(),
        Some("add rule inet husk nat_postrouting jump husk3-snat")
    );
}

#[test]
fn the_links_host_end_answers_ping_only_unless_host_access_opens_it() {
    let host_rules = |r: &VmRules| -> Vec<String> {
        transaction(&Existing::new(), |_| false, Some(r))
            .lines()
            .filter(|l| l.starts_with("add rule inet husk husk4-host "))
            .map(str::to_string)
            .collect()
    };
    let mut r = rules("husk4");
    assert_eq!(
        host_rules(&r),
        [
            "add rule inet husk husk4-host ct state established,related accept",
            "add rule inet husk husk4-host ip daddr 169.254.128.1 icmp type echo-request accept",
            "add rule inet husk husk4-host drop",
        ]
    );
    r.egress.host_access = true;
    assert_eq!(
        host_rules(&r),
        [
            "add rule inet husk husk4-host ct state established,related accept",
            "add rule inet husk husk4-host ip daddr 169.254.128.1 icmp type echo-request accept",
            "add rule inet husk husk4-host ip daddr 169.254.128.1 accept",
            "add rule inet husk husk4-host drop",
        ]
    );
}

#[test]
fn a_published_port_is_dnatted_from_any_host_address_or_the_one_named() {
    let mut r = rules("husk0");
    r.published = vec![
        "8080:80".parse().unwrap(),
        "192.0.2.2:5353:53/udp".parse().unwrap(),
    ];
    let script = transaction(&Existing::new(), |_| false, Some(&r));
    assert!(script.contains(
        "add rule inet husk husk0-dnat fib daddr type local tcp dport 8080 \
         dnat ip to 169.254.128.2:80\n"
    ));
    assert!(script.contains(
        "add rule inet husk husk0-dnat ip daddr 192.0.2.2 udp dport 5353 \
         dnat ip to 169.254.128.2:53\n"
    ));
    // Reachable from other hosts (prerouting) and from the host itself (output).
    assert!(script.contains("add rule inet husk nat_prerouting jump husk0-dnat\n"));
    assert!(script.contains("add rule inet husk nat_output jump husk0-dnat\n"));
}

#[test]
fn a_reused_tap_name_first_drops_its_stale_chains_in_the_same_transaction() {
    let mut existing = Existing::new();
    existing.insert("husk0".into(), all_roles());
    let script = transaction(&existing, |_| false, Some(&rules("husk0")));
    let flush = script.find("flush chain inet husk husk0-src\n").unwrap();
    let delete = script.find("delete chain inet husk husk0-src\n").unwrap();
    let add = script.find("add chain inet husk husk0-src\n").unwrap();
    assert!(flush < delete && delete < add);
    // The base chains are flushed before any per-VM chain goes, so nothing still jumps to it.
    assert!(
        script
            .find("flush chain inet husk nat_postrouting\n")
            .unwrap()
            < flush
    );
    assert_eq!(script.matches("jump husk0-src").count(), 1);
}

#[test]
fn removing_one_vm_keeps_the_jumps_of_the_others() {
    let mut existing = Existing::new();
    existing.insert("husk0".into(), all_roles());
    existing.insert("husk1".into(), all_roles());
    let script = transaction(&existing, |t| t == "husk0", None);
    for role in Role::ALL {
        assert!(script.contains(&format!("delete chain inet husk {}\n", role.chain("husk0"))));
        assert!(!script.contains(&format!("delete chain inet husk {}", role.chain("husk1"))));
    }
    assert!(!script.contains("jump husk0-"));
    assert!(script.contains("add rule inet husk forward oifname \"husk1\" jump husk1-in\n"));
    assert!(script.contains("add rule inet husk nat_output jump husk1-dnat\n"));
}

#[test]
fn garbage_collection_deletes_only_the_chains_of_taps_that_are_gone() {
    let mut existing = Existing::new();
    existing.insert("husk0".into(), all_roles());
    existing.insert("husk7".into(), [Role::Src, Role::Out].into_iter().collect());
    let live = ["husk0"];
    let script = transaction(&existing, |t| !live.contains(&t), None);
    assert!(script.contains("delete chain inet husk husk7-src\n"));
    assert!(script.contains("delete chain inet husk husk7-out\n"));
    assert!(
        !script.contains("husk7-in"),
        "only chains that exist are deleted"
    );
    assert!(!script.contains("delete chain inet husk husk0"));
    assert!(script.contains("add rule inet husk prerouting iifname \"husk0\" jump husk0-src\n"));
}

#[test]
fn only_husks_own_chain_names_are_read_back_from_the_table() {
    let json = br#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
        {"table": {"family": "inet", "name": "husk", "handle": 1}},
        {"chain": {"family": "inet", "table": "husk", "name": "forward", "handle": 3}},
        {"chain": {"family": "inet", "table": "husk", "name": "husk4-out", "handle": 7}},
        {"chain": {"family": "inet", "table": "husk", "name": "my-tap-dnat", "handle": 8}},
        {"chain": {"family": "inet", "table": "husk", "name": "husk4-other", "handle": 9}},
        {"rule": {"family": "inet", "table": "husk", "chain": "husk4-out", "handle": 10}}]}"#;
    let existing = parse_listing(json).unwrap();
    assert_eq!(existing.len(), 2);
    assert_eq!(existing["husk4"], [Role::Out].into_iter().collect());
    assert_eq!(existing["my-tap"], [Role::Dnat].into_iter().collect());
    assert!(parse_listing(b"not json").is_err());
}

#[test]
fn tap_names_that_nft_cannot_take_bare_are_refused() {
    assert!(valid_tap_name("husk0"));
    assert!(valid_tap_name("my_tap-1"));
    assert!(!valid_tap_name(""));
    assert!(!valid_tap_name("0tap"));
    assert!(!valid_tap_name("tap;drop"));
    assert!(!valid_tap_name("a-name-of-16-byt"));
    let err = apply(&rules("bad name")).unwrap_err();
    assert!(matches!(err, FirewallError::TapName(_)), "{err}");
}

#[test]
fn a_host_port_published_twice_or_on_a_foreign_address_is_refused() {
    let policy = |ports: &[&str]| NetworkPolicy {
        published: ports.iter().map(|p| p.parse().unwrap()).collect(),
        egress: EgressPolicy::default(),
    };
    assert_eq!(
        policy(&["8080:80", "8080:81/udp", "127.0.0.1:9090:90"]).check(),
        Ok(())
    );
    let err = policy(&["8080:80", "8080:81"]).check().unwrap_err();
    assert_eq!(
        err.to_string(),
        "published port 8080:81/tcp: host port 8080/tcp is published twice"
    );
    // 192.0.2.0/24 is TEST-NET-1: never a real host's.
    let err = policy(&["192.0.2.77:8080:80"]).check().unwrap_err();
    assert_eq!(
        err.to_string(),
        "published port 192.0.2.77:8080:80/tcp: 192.0.2.77 is not an address of this host"
    );
}

#[test]
fn the_dns_kernel_parameter_names_the_links_host_end() {
    assert_eq!(
        dns_kernel_param(Ipv4Addr::new(169, 254, 128, 1)),
        "husk.dns=169.254.128.1"
    );
}
