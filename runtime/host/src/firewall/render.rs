//! The nft script of one firewall change, as text: a pure function of what the table holds
//! now and what should change, so that every case is unit-tested without root.
//!
//! Layout of `table inet husk`: six base chains, one per hook husk needs, hold nothing but
//! jumps into per-VM chains named `<tap>-<role>`. Every change rewrites the base chains from
//! scratch (flush, then one jump per VM that stays), so removing a VM never needs rule handles,
//! and the whole change is one nft transaction: it applies completely or not at all.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::net::Ipv4Addr;

use super::ports::{PortMapping, Protocol};
use super::VmRules;

/// The table husk owns; nothing else on the host is touched.
pub const TABLE: &str = "inet husk";

/// The link-local range (RFC 3927): VM links, other VMs, and metadata-like services
/// (169.254.169.254) live there, so a guest may not reach it unless allowed.
pub const LINK_LOCAL: &str = "169.254.0.0/16";

/// One per-VM chain: what it filters and from which base chain it is jumped to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Anti-spoofing of everything the tap sends (filter prerouting).
    Src,
    /// The guest toward the host itself (filter input).
    Host,
    /// The guest toward the world: the egress policy (filter forward).
    Out,
    /// The world toward the guest: replies and published ports only (filter forward).
    In,
    /// DNS and published ports (nat prerouting and nat output).
    Dnat,
    /// Masquerade of the guest's traffic (nat postrouting).
    Snat,
}

impl Role {
    pub const ALL: [Role; 6] = [
        Role::Src,
        Role::Host,
        Role::Out,
        Role::In,
        Role::Dnat,
        Role::Snat,
    ];

    pub fn suffix(self) -> &'static str {
        match self {
            Role::Src => "src",
            Role::Host => "host",
            Role::Out => "out",
            Role::In => "in",
            Role::Dnat => "dnat",
            Role::Snat => "snat",
        }
    }

    /// The chain of this role for `tap`.
    pub fn chain(self, tap: &str) -> String {
        format!("{tap}-{}", self.suffix())
    }

    /// The tap and role of a per-VM chain name; None for a base chain (or a stranger's).
    pub fn parse_chain(name: &str) -> Option<(&str, Role)> {
        let (tap, suffix) = name.rsplit_once('-')?;
        let role = Role::ALL.into_iter().find(|r| r.suffix() == suffix)?;
        valid_tap_name(tap).then_some((tap, role))
    }
}

/// A base chain: its name and declaration (hook and priority).
struct Base {
    name: &'static str,
    decl: &'static str,
}

const BASES: [Base; 6] = [
    Base {
        name: "prerouting",
        decl: "type filter hook prerouting priority mangle; policy accept;",
    },
    Base {
        name: "input",
        decl: "type filter hook input priority filter; policy accept;",
    },
    Base {
        name: "forward",
        decl: "type filter hook forward priority filter; policy accept;",
    },
    Base {
        name: "nat_prerouting",
        decl: "type nat hook prerouting priority dstnat; policy accept;",
    },
    Base {
        name: "nat_output",
        decl: "type nat hook output priority -100; policy accept;",
    },
    Base {
        name: "nat_postrouting",
        decl: "type nat hook postrouting priority srcnat; policy accept;",
    },
];

/// Whether `name` can be a tap husk puts in its table: an interface name (15 bytes at most)
/// that nft takes as a bare identifier.
pub fn valid_tap_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    name.len() <= 15
        && bytes.next().is_some_and(|b| b.is_ascii_alphabetic())
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The per-VM chains the table holds now, by tap.
pub type Existing = BTreeMap<String, BTreeSet<Role>>;

/// The script that removes the chains of every tap in `existing` for which `drop` says so (and
/// any chain of `add`'s tap), adds `add`'s chains, and rewrites the base chains' jumps.
pub fn transaction(
    existing: &Existing,
    drop: impl Fn(&str) -> bool,
    add: Option<&VmRules>,
) -> String {
    let mut s = String::new();
    let new_tap = add.map(|r| r.tap.as_str());
    let _ = writeln!(s, "add table {TABLE}");
    for base in &BASES {
        let _ = writeln!(s, "add chain {TABLE} {} {{ {} }}", base.name, base.decl);
        let _ = writeln!(s, "flush chain {TABLE} {}", base.name);
    }
    let mut staying: Vec<(&str, &BTreeSet<Role>)> = Vec::new();
    for (tap, roles) in existing {
        if drop(tap) || Some(tap.as_str()) == new_tap {
            for role in roles {
                let _ = writeln!(s, "flush chain {TABLE} {}", role.chain(tap));
                let _ = writeln!(s, "delete chain {TABLE} {}", role.chain(tap));
            }
        } else {
            staying.push((tap, roles));
        }
    }
    let all_roles: BTreeSet<Role> = Role::ALL.into_iter().collect();
    if let Some(rules) = add {
        vm_chains(&mut s, rules);
        staying.push((&rules.tap, &all_roles));
    }
    staying.sort_by_key(|(tap, _)| *tap);
    for (tap, roles) in staying {
        for role in roles {
            let (base, cond) = match role {
                Role::Src => ("prerouting", format!("iifname \"{tap}\" ")),
                Role::Host => ("input", format!("iifname \"{tap}\" ")),
                Role::Out => ("forward", format!("iifname \"{tap}\" ")),
                Role::In => ("forward", format!("oifname \"{tap}\" ")),
                Role::Dnat => ("nat_prerouting", String::new()),
                Role::Snat => ("nat_postrouting", String::new()),
            };
            let chain = role.chain(tap);
            let _ = writeln!(s, "add rule {TABLE} {base} {cond}jump {chain}");
            if *role == Role::Dnat {
                let _ = writeln!(s, "add rule {TABLE} nat_output jump {chain}");
            }
        }
    }
    s
}

/// The six chains of one VM and their rules.
fn vm_chains(s: &mut String, r: &VmRules) {
    let tap = &r.tap;
    let rule = |s: &mut String, role: Role, text: &str| {
        let _ = writeln!(s, "add rule {TABLE} {} {text}", role.chain(tap));
    };
    for role in Role::ALL {
        let _ = writeln!(s, "add chain {TABLE} {}", role.chain(tap));
    }
    let mac = r
        .mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");

    // Anti-spoofing: the VM's own MAC and IPv4 address, nothing else (the guest has no IPv6).
    rule(s, Role::Src, &format!("ether saddr != {mac} drop"));
    rule(s, Role::Src, "meta nfproto ipv6 drop");
    rule(s, Role::Src, &format!("ip saddr != {} drop", r.guest_ip));

    let deny = set(&r.egress.deny);
    let allow = set(&r.egress.allow);

    // The guest toward the host itself: a host service listening on every address would
    // otherwise be reachable through the link's host end, so only ping answers there unless
    // host access was asked for; the host's other addresses only when allowed explicitly.
    rule(s, Role::Host, "ct state established,related accept");
    if let Some(deny) = &deny {
        rule(s, Role::Host, &format!("ip daddr {deny} drop"));
    }
    rule(
        s,
        Role::Host,
        &format!("ip daddr {} icmp type echo-request accept", r.host_ip),
    );
    if r.egress.host_access {
        rule(s, Role::Host, &format!("ip daddr {} accept", r.host_ip));
    }
    if let Some(allow) = &allow {
        rule(s, Role::Host, &format!("ip daddr {allow} accept"));
    }
    rule(s, Role::Host, "drop");

    // The guest toward the world. Replies and the DNS path (the only DNAT of the guest's own
    // traffic) first, then deny before allow, then the default denials, then the mode.
    rule(s, Role::Out, "ct state established,related accept");
    if r.dns.is_some() {
        rule(s, Role::Out, "ct status dnat accept");
    }
    if let Some(deny) = &deny {
        rule(s, Role::Out, &format!("ip daddr {deny} drop"));
    }
    if let Some(allow) = &allow {
        rule(s, Role::Out, &format!("ip daddr {allow} accept"));
    }
    rule(s, Role::Out, &format!("ip daddr {LINK_LOCAL} drop"));
    if allow.is_some() {
        rule(s, Role::Out, "drop");
    } else {
        rule(s, Role::Out, "accept");
    }

    // The world toward the guest: replies, and connections to its published ports.
    rule(s, Role::In, "ct state established,related accept");
    rule(s, Role::In, "ct status dnat accept");
    rule(s, Role::In, "drop");

    // DNS to any link-local address, not only this link's host end: a guest restored from a
    // snapshot keeps the resolv.conf naming the host end of the link it was booted on.
    if let Some(upstream) = r.dns {
        rule(
            s,
            Role::Dnat,
            &format!(
                "iifname \"{tap}\" ip daddr {LINK_LOCAL} meta l4proto {{ tcp, udp }} th dport 53 dnat ip to {upstream}"
            ),
        );
    }
    for p in &r.published {
        rule(s, Role::Dnat, &publish_rule(p, r.guest_ip));
    }

    rule(
        s,
        Role::Snat,
        &format!("ip saddr {} oifname != \"{tap}\" masquerade", r.guest_ip),
    );
}

/// DNAT of one published port: to any of the host's own addresses, or to the one named.
fn publish_rule(p: &PortMapping, guest: Ipv4Addr) -> String {
    let to = match p.host_ip {
        Some(ip) => format!("ip daddr {ip}"),
        None => "fib daddr type local".into(),
    };
    let proto = match p.protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    };
    format!(
        "{to} {proto} dport {} dnat ip to {guest}:{}",
        p.host_port, p.guest_port
    )
}

/// An anonymous nft set of CIDRs; None when there are none.
fn set(cidrs: &[super::Cidr]) -> Option<String> {
    (!cidrs.is_empty()).then(|| {
        let items: Vec<String> = cidrs.iter().map(ToString::to_string).collect();
        format!("{{ {} }}", items.join(", "))
    })
}
