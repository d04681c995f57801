//! `husk run --net`: a tap for the VM, addressed on the host, handed to husk-vmm as an fd.
//!
//! The tap is created non-persistent: the kernel removes it when the last fd closes. husk
//! closes its own copy once husk-vmm holds one, so the tap lives exactly as long as the VMM,
//! and a killed VMM (or a killed husk) can never leave a tap behind.
//!
//! Addresses: each VM gets a /30 in link-local space (169.254.128.0/17, never routed, so no
//! clash with the host's networks), chosen from the tap's kernel-assigned index (`huskN`), which
//! is unique among live taps: host .1, guest .2 of the /30.

use std::io;
use std::net::Ipv4Addr;
use std::os::unix::io::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use husk_devices::virtio::net::tap::Tap;
use rustix::ioctl::{Opcode, Updater};
use rustix::net::{AddressFamily, SocketFlags, SocketType};

use crate::vmm_args::{NetConfig, TapSource};

/// Why a VM's link could not be made.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("--net needs root (CAP_NET_ADMIN) to create a tap: {0}")]
    NeedsRoot(io::Error),
    #[error("--net needs /dev/net/tun, which is missing (load the module: modprobe tun)")]
    NoTun,
    #[error("cannot create a tap device: {0}")]
    Create(io::Error),
    #[error("unexpected tap name {0}")]
    TapName(String),
    #[error("too many husk taps (8192 at most)")]
    TooMany,
    #[error("cannot address tap {name}: {cause}")]
    Address { name: String, cause: io::Error },
}

/// What the VM and the application need to know about the link.
pub struct VmLink {
    pub tap_fd: OwnedFd,
    pub tap_name: String,
    /// The guest's gateway: the host end of a husk link, the namespace's default gateway for
    /// a joined namespace (unspecified when it has none).
    pub host_ip: Ipv4Addr,
    pub guest_ip: Ipv4Addr,
    pub prefix_len: u8,
    pub mac: [u8; 6],
    /// The MTU the guest is told (a joined namespace's interface's); `None`: its default.
    pub mtu: Option<u16>,
    pub kind: LinkKind,
}

/// Whose link it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkKind {
    /// husk's own /30 to the host, behind husk's firewall (NAT, published ports, policy).
    Tap,
    /// A container's namespace, configured by others, whose `interface` the VM replaces
    /// (husk_host::netns); no husk firewall.
    Netns { path: PathBuf, interface: String },
}

/// The prefix of husk's own links: a /30, host .1, guest .2.
pub const LINK_PREFIX_LEN: u8 = 30;
const NETMASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 252);

impl VmLink {
    /// Creates and addresses a tap for one VM.
    pub fn create() -> Result<Self, NetError> {
        let tap = Tap::open("husk%d").map_err(|e| match e.kind() {
            io::ErrorKind::PermissionDenied => NetError::NeedsRoot(e),
            io::ErrorKind::NotFound => NetError::NoTun,
            _ => NetError::Create(e),
        })?;
        let name = tap.name().to_string();
        let index: u32 = name
            .strip_prefix("husk")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| NetError::TapName(name.clone()))?;
        let (host_ip, guest_ip) = addresses(index).ok_or(NetError::TooMany)?;
        configure_host_side(&name, host_ip).map_err(|cause| NetError::Address {
            name: name.clone(),
            cause,
        })?;
        let o = guest_ip.octets();
        let mac = [0x06, 0x00, o[0], o[1], o[2], o[3]];
        Ok(Self {
            tap_fd: tap.into_fd(),
            tap_name: name,
            host_ip,
            guest_ip,
            prefix_len: LINK_PREFIX_LEN,
            mac,
            mtu: None,
            kind: LinkKind::Tap,
        })
    }

    /// Kernel `ip=` parameter that configures eth0 in the guest (CONFIG_IP_PNP).
    pub fn kernel_param(&self) -> String {
        let gateway = if self.host_ip.is_unspecified() {
            String::new()
        } else {
            self.host_ip.to_string()
        };
        format!(
            "ip={}::{gateway}:{}::eth0:off",
            self.guest_ip,
            netmask(self.prefix_len)
        )
    }

    /// husk-vmm's network device: this tap's fd (inherited at the same number), name and MAC.
    pub fn net_config(&self) -> NetConfig {
        NetConfig {
            tap: TapSource::Fd(self.tap_fd.as_raw_fd(), self.tap_name.clone()),
            mac: self.mac,
            mtu: self.mtu,
        }
    }

    pub fn raw_fd(&self) -> RawFd {
        self.tap_fd.as_raw_fd()
    }
}

/// The netmask of a prefix length (32 at most).
pub fn netmask(prefix_len: u8) -> Ipv4Addr {
    let bits = u32::MAX
        .checked_shl(32 - u32::from(prefix_len.min(32)))
        .unwrap_or(0);
    Ipv4Addr::from(bits)
}

/// Host and guest addresses for tap number `index`.
fn addresses(index: u32) -> Option<(Ipv4Addr, Ipv4Addr)> {
    if index >= 8192 {
        return None;
    }
    let third = 128 + index / 64;
    let fourth = (index % 64) * 4;
    let host = Ipv4Addr::new(169, 254, third as u8, (fourth + 1) as u8);
    let guest = Ipv4Addr::new(169, 254, third as u8, (fourth + 2) as u8);
    Some((host, guest))
}

/// Whether a network interface named `name` exists in this thread's network namespace (taps
/// vanish with their VMM: the firewall's garbage collection asks this).
pub fn link_exists(name: &str) -> bool {
    let Ok(sock) = rustix::net::socket_with(
        AddressFamily::INET,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC,
        None,
    ) else {
        // Without a socket nothing can be known: keep the rules rather than drop a live VM's.
        return true;
    };
    match if_ioctl::<{ libc::SIOCGIFFLAGS as Opcode }>(&sock, IfReq::new(name)) {
        Ok(_) => true,
        Err(e) => e.raw_os_error() != Some(libc::ENODEV),
    }
}

fn configure_host_side(name: &str, ip: Ipv4Addr) -> io::Result<()> {
    // A datagram socket used only for interface ioctls; closed when `sock` drops.
    let sock = rustix::net::socket_with(
        AddressFamily::INET,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC,
        None,
    )?;
    if_ioctl::<{ libc::SIOCSIFADDR as Opcode }>(&sock, IfReq::with_addr(name, ip))?;
    if_ioctl::<{ libc::SIOCSIFNETMASK as Opcode }>(&sock, IfReq::with_addr(name, NETMASK))?;
    set_up(&sock, name)
}

/// The IPv4 address and prefix length of `name` (EADDRNOTAVAIL: it has none).
pub(crate) fn interface_ipv4(sock: &OwnedFd, name: &str) -> io::Result<(Ipv4Addr, u8)> {
    let addr = if_ioctl::<{ libc::SIOCGIFADDR as Opcode }>(sock, IfReq::new(name))?.ipv4();
    let mask = if_ioctl::<{ libc::SIOCGIFNETMASK as Opcode }>(sock, IfReq::new(name))?.ipv4();
    Ok((addr, u32::from(mask).count_ones() as u8))
}

/// The MAC address of `name`.
pub(crate) fn interface_mac(sock: &OwnedFd, name: &str) -> io::Result<[u8; 6]> {
    let req = if_ioctl::<{ libc::SIOCGIFHWADDR as Opcode }>(sock, IfReq::new(name))?;
    // A struct sockaddr: the family (ARPHRD_*), then the hardware address.
    let mut mac = [0; 6];
    mac.copy_from_slice(&req.data[2..8]);
    Ok(mac)
}

/// The MTU of `name`.
pub(crate) fn interface_mtu(sock: &OwnedFd, name: &str) -> io::Result<u16> {
    let req = if_ioctl::<{ libc::SIOCGIFMTU as Opcode }>(sock, IfReq::new(name))?;
    Ok(u16::try_from(req.int()).unwrap_or(u16::MAX))
}

/// Sets the MTU of `name`.
pub(crate) fn set_mtu(sock: &OwnedFd, name: &str, mtu: u16) -> io::Result<()> {
    let mut req = IfReq::new(name);
    req.set_int(i32::from(mtu));
    if_ioctl::<{ libc::SIOCSIFMTU as Opcode }>(sock, req)?;
    Ok(())
}

/// Brings `name` up.
pub(crate) fn set_up(sock: &OwnedFd, name: &str) -> io::Result<()> {
    let mut req = if_ioctl::<{ libc::SIOCGIFFLAGS as Opcode }>(sock, IfReq::new(name))?;
    req.set_flags(req.flags() | (libc::IFF_UP | libc::IFF_RUNNING) as i16);
    if_ioctl::<{ libc::SIOCSIFFLAGS as Opcode }>(sock, req)?;
    Ok(())
}

/// Interface names are at most 15 bytes and a NUL (IFNAMSIZ).
const IFNAMSIZ: usize = 16;

/// `struct ifreq` as the `SIOC[GS]IF*` requests used here read and write it: the interface name,
/// then a union of which they use the start (a `struct sockaddr`, or the flags as a short).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> Self {
        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            data: [0; 24],
        };
        for (dst, src) in req.name.iter_mut().zip(name.bytes().take(IFNAMSIZ - 1)) {
            *dst = src;
        }
        req
    }

    /// With an AF_INET `struct sockaddr_in`: family, port 0, the address in network order.
    fn with_addr(name: &str, ip: Ipv4Addr) -> Self {
        let mut req = Self::new(name);
        req.data[..2].copy_from_slice(&AddressFamily::INET.as_raw().to_ne_bytes());
        req.data[4..8].copy_from_slice(&ip.octets());
        req
    }

    /// The address of an AF_INET `struct sockaddr_in` the kernel wrote.
    fn ipv4(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.data[4], self.data[5], self.data[6], self.data[7])
    }

    /// The `int` member of the union (ifr_mtu).
    fn int(&self) -> i32 {
        i32::from_ne_bytes([self.data[0], self.data[1], self.data[2], self.data[3]])
    }

    fn set_int(&mut self, value: i32) {
        self.data[..4].copy_from_slice(&value.to_ne_bytes());
    }

    fn flags(&self) -> i16 {
        i16::from_ne_bytes([self.data[0], self.data[1]])
    }

    fn set_flags(&mut self, flags: i16) {
        self.data[..2].copy_from_slice(&flags.to_ne_bytes());
    }
}

/// Runs the interface request `OPCODE` on `sock` with `req`; returns `req` as the kernel left
/// it.
fn if_ioctl<const OPCODE: Opcode>(sock: &OwnedFd, mut req: IfReq) -> io::Result<IfReq> {
    // SAFETY: every opcode used here takes a pointer to one `struct ifreq`, whose layout IfReq
    // has (same size, name first; tested below), and `req` lives through the call.
    unsafe { rustix::ioctl::ioctl(sock, Updater::<OPCODE, IfReq>::new(&mut req)) }?;
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interface_request_is_laid_out_as_the_kernels_ifreq() {
        assert_eq!(
            std::mem::size_of::<IfReq>(),
            std::mem::size_of::<libc::ifreq>()
        );
        let req = IfReq::with_addr("husk7", Ipv4Addr::new(169, 254, 128, 1));
        assert_eq!(&req.name[..6], b"husk7\0");
        let family = (libc::AF_INET as u16).to_ne_bytes();
        assert_eq!(
            req.data[..8],
            [family[0], family[1], 0, 0, 169, 254, 128, 1]
        );
        assert!(req.data[8..].iter().all(|b| *b == 0));
        let mut flagged = IfReq::new("a-name-longer-than-fifteen-bytes");
        assert_eq!(
            flagged.name[IFNAMSIZ - 1],
            0,
            "the name stays NUL-terminated"
        );
        flagged.set_flags(0x41);
        assert_eq!(flagged.flags(), 0x41);
    }

    #[test]
    fn prefixes_become_netmasks_and_the_kernel_parameter_leaves_out_a_missing_gateway() {
        assert_eq!(netmask(30), NETMASK);
        assert_eq!(netmask(16), Ipv4Addr::new(255, 255, 0, 0));
        assert_eq!(netmask(0), Ipv4Addr::UNSPECIFIED);
        assert_eq!(netmask(32), Ipv4Addr::BROADCAST);
        let sock = rustix::net::socket_with(
            AddressFamily::INET,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        let (lo, prefix) = interface_ipv4(&sock, "lo").unwrap();
        assert_eq!((lo, prefix), (Ipv4Addr::LOCALHOST, 8));
        assert_eq!(interface_mtu(&sock, "lo").unwrap(), 65535);
        let link = VmLink {
            tap_fd: sock,
            tap_name: "t".into(),
            host_ip: Ipv4Addr::UNSPECIFIED,
            guest_ip: Ipv4Addr::new(10, 88, 0, 5),
            prefix_len: 16,
            mac: [0; 6],
            mtu: None,
            kind: LinkKind::Tap,
        };
        assert_eq!(link.kernel_param(), "ip=10.88.0.5:::255.255.0.0::eth0:off");
    }

    #[test]
    fn the_loopback_interface_exists_and_a_made_up_one_does_not() {
        assert!(link_exists("lo"));
        assert!(!link_exists("husk-nosuch0"));
    }

    #[test]
    fn each_tap_index_gets_its_own_link_local_slash_30() {
        assert_eq!(
            addresses(0),
            Some((
                Ipv4Addr::new(169, 254, 128, 1),
                Ipv4Addr::new(169, 254, 128, 2)
            ))
        );
        assert_eq!(
            addresses(63),
            Some((
                Ipv4Addr::new(169, 254, 128, 253),
                Ipv4Addr::new(169, 254, 128, 254)
            ))
        );
        assert_eq!(
            addresses(64),
            Some((
                Ipv4Addr::new(169, 254, 129, 1),
                Ipv4Addr::new(169, 254, 129, 2)
            ))
        );
        assert_eq!(
            addresses(8191).map(|a| a.1),
            Some(Ipv4Addr::new(169, 254, 255, 254))
        );
        assert_eq!(addresses(8192), None);
    }
}
