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

use husk_devices::virtio::net::tap::Tap;

/// What the VM and the application need to know about the link.
pub struct VmLink {
    pub tap_fd: OwnedFd,
    pub tap_name: String,
    pub host_ip: Ipv4Addr,
    pub guest_ip: Ipv4Addr,
    pub mac: [u8; 6],
}

const NETMASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 252);

impl VmLink {
    /// Creates and addresses a tap for one VM.
    pub fn create() -> Result<Self, String> {
        let tap = Tap::open("husk%d").map_err(|e| match e.kind() {
            io::ErrorKind::PermissionDenied => {
                format!("--net needs root (CAP_NET_ADMIN) to create a tap: {e}")
            }
            io::ErrorKind::NotFound => {
                "--net needs /dev/net/tun, which is missing (load the module: modprobe tun)".into()
            }
            _ => format!("cannot create a tap device: {e}"),
        })?;
        let name = tap.name().to_string();
        let index: u32 = name
            .strip_prefix("husk")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("unexpected tap name {name}"))?;
        let (host_ip, guest_ip) = addresses(index).ok_or("too many husk taps (8192 at most)")?;
        configure_host_side(&name, host_ip)
            .map_err(|e| format!("cannot address tap {name}: {e}"))?;
        let o = guest_ip.octets();
        let mac = [0x06, 0x00, o[0], o[1], o[2], o[3]];
        Ok(Self {
            tap_fd: tap.into_fd(),
            tap_name: name,
            host_ip,
            guest_ip,
            mac,
        })
    }

    /// Kernel `ip=` parameter that configures eth0 in the guest (CONFIG_IP_PNP).
    pub fn kernel_param(&self) -> String {
        format!(
            "ip={}::{}:{}::eth0:off",
            self.guest_ip, self.host_ip, NETMASK
        )
    }

    /// husk-vmm's `--net` value, for the fd as it will be numbered in the child.
    pub fn vmm_arg(&self) -> String {
        let m = self.mac;
        format!(
            "fd={},name={},mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            self.tap_fd.as_raw_fd(),
            self.tap_name,
            m[0],
            m[1],
            m[2],
            m[3],
            m[4],
            m[5]
        )
    }

    pub fn raw_fd(&self) -> RawFd {
        self.tap_fd.as_raw_fd()
    }
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

fn configure_host_side(name: &str, ip: Ipv4Addr) -> io::Result<()> {
    // SAFETY: a datagram socket used only for interface ioctls; closed when `sock` drops.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: raw is a fresh fd we own.
    let sock: OwnedFd = unsafe { std::os::unix::io::FromRawFd::from_raw_fd(raw) };
    set_addr(&sock, name, libc::SIOCSIFADDR, ip)?;
    set_addr(&sock, name, libc::SIOCSIFNETMASK, NETMASK)?;
    let mut req = ifreq(name);
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the flags member of a valid ifreq.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut req) != 0 {
            return Err(io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &req) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *dst = src as libc::c_char;
    }
    req
}

fn set_addr(sock: &OwnedFd, name: &str, request: libc::c_ulong, ip: Ipv4Addr) -> io::Result<()> {
    let mut req = ifreq(name);
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in fits in the sockaddr member of the ifreq union (16 bytes each); the
    // ioctl reads that member.
    unsafe {
        std::ptr::write_unaligned(
            std::ptr::addr_of_mut!(req.ifr_ifru.ifru_addr).cast::<libc::sockaddr_in>(),
            sin,
        );
        if libc::ioctl(sock.as_raw_fd(), request as _, &req) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
