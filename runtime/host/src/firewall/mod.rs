//! The host firewall of VM links: one nftables table, `inet husk`, owned by husk (nothing else
//! on the host is touched). Per VM, chains named after its tap give it masquerade to the
//! host's uplinks, forwarding to the world and back, anti-spoofing, DNS through the host's
//! resolver, published ports and its egress policy. See docs/networking.md.
//!
//! Cleanup never depends on a process that may be killed: taps vanish with their VMM
//! (`net`), and [`collect_garbage`] deletes the chains of every tap that no longer exists. It
//! runs inside every change (so applying one VM's rules also sweeps the dead) and when huskd
//! starts.

mod nft;
pub mod ports;
pub mod render;
pub mod resolv;

use std::net::Ipv4Addr;

pub use ports::{Cidr, ParseError, PortMapping, Protocol};

/// Why the firewall could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("husk's networking needs nftables: /usr/sbin/nft is missing (install the Debian package nftables)")]
    NoNft,
    #[error("cannot run /usr/sbin/nft: {0}")]
    Run(std::io::Error),
    #[error("nft refused husk's rules: {0}")]
    Refused(String),
    #[error("cannot read husk's nftables table: {0}")]
    List(String),
    #[error("cannot lock {path}: {cause}")]
    Lock {
        path: &'static str,
        cause: std::io::Error,
    },
    #[error("cannot switch on IPv4 forwarding ({path}): {cause}")]
    Forwarding {
        path: &'static str,
        cause: std::io::Error,
    },
    #[error("tap name {0:?} cannot name an nftables chain")]
    TapName(String),
}

/// What the guest may reach beyond its link. Deny wins over allow; with any allow, only what is
/// allowed is reachable (allow-list mode). The link-local range and the host's own addresses
/// are denied unless allowed explicitly; of the link's host end only ping answers, unless
/// `host_access` opens it (a service the host runs for its guests there).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressPolicy {
    pub allow: Vec<Cidr>,
    pub deny: Vec<Cidr>,
    /// The guest may open connections to the link's host end (any port).
    pub host_access: bool,
}

/// The firewall rules of one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmRules {
    pub tap: String,
    pub mac: [u8; 6],
    pub host_ip: Ipv4Addr,
    pub guest_ip: Ipv4Addr,
    /// The host's resolver that DNS to the link's host end goes to; None: no DNS.
    pub dns: Option<Ipv4Addr>,
    pub published: Vec<PortMapping>,
    pub egress: EgressPolicy,
}

/// What a VM's owner asks of its network beyond the link: published ports and egress policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkPolicy {
    pub published: Vec<PortMapping>,
    pub egress: EgressPolicy,
}

/// Why a network policy was refused (the CLI and huskd give these messages).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("published port {0}: host port {1}/{2} is published twice")]
    DuplicateHostPort(PortMapping, u16, Protocol),
    #[error("published port {0}: {1} is not an address of this host")]
    NotLocal(PortMapping, Ipv4Addr),
}

impl NetworkPolicy {
    /// Refuses a host port (per protocol) published twice, and a host address that is not
    /// this host's.
    pub fn check(&self) -> Result<(), PolicyError> {
        let mut seen = std::collections::HashSet::new();
        for p in &self.published {
            if !seen.insert((p.host_port, p.protocol)) {
                return Err(PolicyError::DuplicateHostPort(*p, p.host_port, p.protocol));
            }
            if let Some(ip) = p.host_ip {
                if !is_local_address(ip) {
                    return Err(PolicyError::NotLocal(*p, ip));
                }
            }
        }
        Ok(())
    }
}

/// Whether `ip` is one of this host's addresses (in this network namespace): only those can be
/// bound to.
pub fn is_local_address(ip: Ipv4Addr) -> bool {
    std::net::UdpSocket::bind((ip, 0)).is_ok()
}

impl VmRules {
    /// The rules of the VM on `link`, with DNS through `dns` (the host's resolver) when given.
    pub fn new(link: &crate::net::VmLink, policy: &NetworkPolicy, dns: Option<Ipv4Addr>) -> Self {
        VmRules {
            tap: link.tap_name.clone(),
            mac: link.mac,
            host_ip: link.host_ip,
            guest_ip: link.guest_ip,
            dns,
            published: policy.published.clone(),
            egress: policy.egress.clone(),
        }
    }
}

/// The kernel parameter that makes husk-init write `nameserver HOST_IP` into the guest's
/// /etc/resolv.conf.
pub fn dns_kernel_param(host_ip: Ipv4Addr) -> String {
    format!("husk.dns={host_ip}")
}

/// Where IPv4 forwarding is switched on (husk does so, and never switches it off: other
/// VMs, or the host's own setup, may rely on it).
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// Installs the rules of one VM: in one transaction, drops any chain of the same tap (a re-used
/// name) and of taps that no longer exist, then adds this VM's. Switches IPv4 forwarding on.
pub fn apply(rules: &VmRules) -> Result<(), FirewallError> {
    if !render::valid_tap_name(&rules.tap) {
        return Err(FirewallError::TapName(rules.tap.clone()));
    }
    nft::require()?;
    std::fs::write(IP_FORWARD, b"1").map_err(|cause| FirewallError::Forwarding {
        path: IP_FORWARD,
        cause,
    })?;
    nft::change(|existing| {
        render::transaction(existing, |tap| !crate::net::link_exists(tap), Some(rules))
    })
}

/// Removes the rules of the VM on `tap` (and of any other tap that is gone).
pub fn remove(tap: &str) -> Result<(), FirewallError> {
    nft::require()?;
    nft::change(|existing| {
        render::transaction(existing, |t| t == tap || !crate::net::link_exists(t), None)
    })
}

/// Deletes every per-VM chain whose tap no longer exists (huskd runs it when it starts).
/// Without nft (nothing was ever installed) there is nothing to collect.
pub fn collect_garbage() -> Result<(), FirewallError> {
    if nft::require().is_err() {
        return Ok(());
    }
    nft::change(|existing| render::transaction(existing, |t| !crate::net::link_exists(t), None))
}

/// The taps that have chains in husk's table now (for tests and diagnostics).
pub fn taps_with_rules() -> Result<Vec<String>, FirewallError> {
    nft::require()?;
    Ok(nft::existing()?.into_keys().collect())
}

#[cfg(test)]
mod tests;
