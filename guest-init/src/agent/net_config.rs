//! `set_network`: moves an interface to a new MAC and IPv4 address, with the agent's own
//! interface ioctls, so that the host needs no tool (iproute2) in the guest image.
//!
//! A restored clone starts with the snapshot's MAC and addresses, which belong to the VM it was
//! taken from; huskd sends the new link's. The sequence is that of `ip link set down`, `ip link
//! set address`, `ip addr flush` + `add`, `ip link set up`, `ip route replace default`: taking
//! the interface down drops every route through it, so the default route is added afresh.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};

use husk_proto::agent::SetNetwork;

/// The interface a `set_network` without one names: the VM's only network device.
const DEFAULT_INTERFACE: &str = "eth0";

/// A checked `set_network` request.
#[derive(Debug, PartialEq, Eq)]
pub struct NetConfig {
    interface: String,
    mac: Option<[u8; 6]>,
    address: Ipv4Addr,
    netmask: Ipv4Addr,
    gateway: Option<Ipv4Addr>,
}

impl NetConfig {
    /// Checks a request; the error says which field is wrong.
    pub fn parse(msg: &SetNetwork) -> Result<Self, String> {
        let interface = if msg.interface.is_empty() {
            DEFAULT_INTERFACE.to_string()
        } else {
            msg.interface.clone()
        };
        // IFNAMSIZ (16) with its NUL.
        if interface.len() >= 16 || interface.contains(['/', '\0']) {
            return Err(format!("interface: {interface:?} is not an interface name"));
        }
        let mac = match msg.mac.len() {
            0 => None,
            6 => {
                let mut mac = [0u8; 6];
                mac.copy_from_slice(&msg.mac);
                Some(mac)
            }
            n => return Err(format!("mac: {n} bytes, a MAC has 6")),
        };
        let address: Ipv4Addr = msg
            .address
            .parse()
            .map_err(|_| format!("address: {:?} is not an IPv4 address", msg.address))?;
        if msg.prefix_len > 32 {
            return Err(format!("prefix_len: {} is over 32", msg.prefix_len));
        }
        let netmask = Ipv4Addr::from(u32::MAX.checked_shl(32 - msg.prefix_len).unwrap_or(0));
        let gateway = match msg.gateway.as_str() {
            "" => None,
            g => Some(
                g.parse()
                    .map_err(|_| format!("gateway: {g:?} is not an IPv4 address"))?,
            ),
        };
        Ok(Self {
            interface,
            mac,
            address,
            netmask,
            gateway,
        })
    }
}

/// Applies `config`: down, MAC, address and netmask, up, default route.
pub fn apply(config: &NetConfig) -> io::Result<()> {
    let sock = control_socket()?;
    let name = &config.interface;
    let mut req = ifreq(name);
    ioctl(&sock, libc::SIOCGIFFLAGS, &mut req, "read the flags of")?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags & !(libc::IFF_UP as libc::c_short);
    ioctl(&sock, libc::SIOCSIFFLAGS, &mut req, "take down")?;
    if let Some(mac) = config.mac {
        let mut req = ifreq(name);
        // SAFETY: sockaddr is plain data; all zeroes is a valid value.
        let mut hw: libc::sockaddr = unsafe { std::mem::zeroed() };
        hw.sa_family = libc::ARPHRD_ETHER;
        for (dst, src) in hw.sa_data.iter_mut().zip(mac) {
            *dst = src as libc::c_char;
        }
        req.ifr_ifru.ifru_hwaddr = hw;
        ioctl(&sock, libc::SIOCSIFHWADDR, &mut req, "set the MAC of")?;
    }
    // SIOCSIFADDR replaces the interface's address (flush + add for the one address it has).
    let mut req = ifreq(name);
    req.ifr_ifru.ifru_addr = sockaddr_of(config.address);
    ioctl(&sock, libc::SIOCSIFADDR, &mut req, "set the address of")?;
    let mut req = ifreq(name);
    req.ifr_ifru.ifru_netmask = sockaddr_of(config.netmask);
    ioctl(&sock, libc::SIOCSIFNETMASK, &mut req, "set the netmask of")?;
    let mut req = ifreq(name);
    req.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    ioctl(&sock, libc::SIOCSIFFLAGS, &mut req, "bring up")?;
    if let Some(gateway) = config.gateway {
        add_default_route(&sock, name, gateway)?;
    }
    Ok(())
}

/// The kernel's `struct rtentry` (linux/route.h), which the libc crate declares for musl only.
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

/// `ip route replace default via GATEWAY dev NAME`; an existing identical route is fine.
fn add_default_route(sock: &OwnedFd, name: &str, gateway: Ipv4Addr) -> io::Result<()> {
    let mut dev = [0 as libc::c_char; 16];
    for (dst, src) in dev.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    let mut route = RtEntry {
        rt_pad1: 0,
        rt_dst: sockaddr_of(Ipv4Addr::UNSPECIFIED),
        rt_gateway: sockaddr_of(gateway),
        rt_genmask: sockaddr_of(Ipv4Addr::UNSPECIFIED),
        rt_flags: libc::RTF_UP | libc::RTF_GATEWAY,
        rt_pad2: 0,
        rt_pad3: 0,
        rt_pad4: std::ptr::null_mut(),
        rt_metric: 0,
        rt_dev: dev.as_mut_ptr(),
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    };
    // SAFETY: SIOCADDRT reads a valid rtentry whose rt_dev points at a NUL-terminated name
    // that outlives the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCADDRT as _, &mut route) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(io::Error::new(
                e.kind(),
                format!("cannot add the default route via {gateway}: {e}"),
            ));
        }
    }
    Ok(())
}

/// A datagram socket for interface ioctls.
fn control_socket() -> io::Result<OwnedFd> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    Ok(rustix::net::socket_with(
        AddressFamily::INET,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// An ifreq naming `name` (shorter than IFNAMSIZ, checked by `NetConfig::parse`).
fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data; all zeroes is a valid value (and NUL-terminates the name).
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req
}

fn sockaddr_of(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes); the kernel reads the
    // family to know which it is.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ioctl(
    sock: &OwnedFd,
    request: libc::c_ulong,
    req: &mut libc::ifreq,
    what: &str,
) -> io::Result<()> {
    // SAFETY: the interface ioctls used here read or write one valid ifreq.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), request as _, req as *mut libc::ifreq) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        let name = String::from_utf8_lossy(
            &req.ifr_name
                .iter()
                .take_while(|c| **c != 0)
                .map(|c| *c as u8)
                .collect::<Vec<u8>>(),
        )
        .into_owned();
        return Err(io::Error::new(
            e.kind(),
            format!("cannot {what} {name}: {e}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(address: &str, prefix_len: u32, gateway: &str) -> SetNetwork {
        SetNetwork {
            interface: String::new(),
            mac: vec![6, 0, 169, 254, 128, 6],
            address: address.into(),
            prefix_len,
            gateway: gateway.into(),
        }
    }

    #[test]
    fn a_request_becomes_eth0_with_its_mac_netmask_and_gateway() {
        let config = NetConfig::parse(&request("169.254.128.6", 30, "169.254.128.5")).unwrap();
        assert_eq!(
            config,
            NetConfig {
                interface: "eth0".into(),
                mac: Some([6, 0, 169, 254, 128, 6]),
                address: Ipv4Addr::new(169, 254, 128, 6),
                netmask: Ipv4Addr::new(255, 255, 255, 252),
                gateway: Some(Ipv4Addr::new(169, 254, 128, 5)),
            }
        );
    }

    #[test]
    fn prefix_lengths_of_zero_and_thirty_two_give_the_edge_netmasks() {
        let zero = NetConfig::parse(&request("10.0.0.2", 0, "")).unwrap();
        assert_eq!(zero.netmask, Ipv4Addr::UNSPECIFIED);
        assert_eq!(zero.gateway, None);
        let full = NetConfig::parse(&request("10.0.0.2", 32, "")).unwrap();
        assert_eq!(full.netmask, Ipv4Addr::BROADCAST);
    }

    #[test]
    fn malformed_fields_are_named_in_the_error() {
        for (msg, field) in [
            (request("nope", 30, ""), "address"),
            (request("10.0.0.2", 33, ""), "prefix_len"),
            (request("10.0.0.2", 30, "x"), "gateway"),
            (
                SetNetwork {
                    mac: vec![1, 2, 3],
                    ..request("10.0.0.2", 30, "")
                },
                "mac",
            ),
            (
                SetNetwork {
                    interface: "a-name-much-too-long".into(),
                    ..request("10.0.0.2", 30, "")
                },
                "interface",
            ),
        ] {
            let err = NetConfig::parse(&msg).unwrap_err();
            assert!(err.starts_with(field), "{err}");
        }
    }

    #[test]
    fn the_route_entry_has_the_kernels_layout() {
        // linux/route.h on 64-bit: 120 bytes, rt_dev at 88 (what SIOCADDRT copies in).
        #[cfg(target_pointer_width = "64")]
        {
            assert_eq!(std::mem::size_of::<RtEntry>(), 120);
            assert_eq!(std::mem::offset_of!(RtEntry, rt_dev), 88);
        }
    }
}
