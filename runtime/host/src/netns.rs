//! A VM joined to a network namespace that someone else configured (a container's, set up by
//! CNI plugins): the VM takes the place of the namespace's interface.
//!
//! A tap is created inside the namespace, and traffic is redirected both ways between the
//! interface (`eth0`) and the tap by tc ingress filters (`mirred egress redirect`), the
//! "tc-filter" mode of Kata Containers. The guest gets the interface's address, prefix, MAC and
//! default gateway, so that to the rest of the network it *is* that interface: whatever the CNI
//! plugins set up (a bridge, routes, port maps, policies) applies to the guest unchanged. The
//! namespace's own stack keeps its address but no longer sees the traffic.
//!
//! Policy: only named namespaces (`/run/netns/NAME`, `/var/run/netns/NAME`, where `ip netns`
//! and containerd's CRI plugin put them) are opened, without following a link, and the file
//! must be a network namespace. The tap is not persistent: it goes with the VMM; the tc filters
//! go with the namespace (or with [`disconnect`]).

use std::ffi::OsStr;
use std::io;
use std::net::Ipv4Addr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use husk_devices::virtio::net::tap::Tap;
use rustix::fs::{Mode, OFlags};
use rustix::net::{AddressFamily, SocketFlags, SocketType};
use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};

use crate::net::{interface_ipv4, interface_mac, interface_mtu, set_mtu, set_up, LinkKind, VmLink};

/// Where named network namespaces live (`/var/run` is a link to `/run` on current systems).
const NETNS_DIRS: [&str; 2] = ["/run/netns", "/var/run/netns"];
/// Where iproute2's `tc` is installed (never looked up in PATH: huskd runs as root).
const TC: [&str; 2] = ["/usr/sbin/tc", "/sbin/tc"];

/// Why a VM could not be joined to a namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error(
        "network namespace {0:?}: only named namespaces (/run/netns/NAME or \
         /var/run/netns/NAME) are allowed"
    )]
    NotAllowed(PathBuf),
    #[error("network namespace {path:?}: {cause}")]
    Open { path: PathBuf, cause: io::Error },
    #[error("{path:?} is not a network namespace")]
    NotNetns { path: PathBuf },
    #[error("interface {interface:?} in the namespace: {cause}")]
    Interface { interface: String, cause: io::Error },
    #[error("interface {0:?} has no IPv4 address in the namespace")]
    NoAddress(String),
    #[error("cannot create a tap in the namespace: {0}")]
    Tap(io::Error),
    #[error("tc is missing (Debian package iproute2)")]
    NoTc,
    #[error("tc {args}: {message}")]
    Tc { args: String, message: String },
    #[error("joining the namespace: {0}")]
    Thread(io::Error),
}

/// A checked, open network namespace.
pub struct Netns {
    fd: OwnedFd,
    path: PathBuf,
}

impl Netns {
    /// Opens the named namespace at `path`, if policy allows it (see the module's comment).
    pub fn open(path: &Path) -> Result<Self, NetnsError> {
        let (dir, name) =
            allowed(path).ok_or_else(|| NetnsError::NotAllowed(path.to_path_buf()))?;
        let open_err = |cause: io::Error| NetnsError::Open {
            path: path.to_path_buf(),
            cause,
        };
        // The directories are root's; the name itself is never followed if it is a link.
        let dir_fd = rustix::fs::open(
            dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| open_err(e.into()))?;
        let fd = rustix::fs::openat(
            &dir_fd,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| open_err(e.into()))?;
        const NSFS_MAGIC: i64 = 0x6e73_6673;
        let fs = rustix::fs::fstatfs(&fd).map_err(|e| open_err(e.into()))?;
        if fs.f_type as i64 != NSFS_MAGIC {
            return Err(NetnsError::NotNetns {
                path: path.to_path_buf(),
            });
        }
        Ok(Self {
            fd,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `work` on a thread of its own inside the namespace (setns moves one thread only,
    /// and that thread ends with `work`, so no other code ever runs in the namespace).
    fn run_inside<T: Send>(
        &self,
        work: impl FnOnce() -> Result<T, NetnsError> + Send,
    ) -> Result<T, NetnsError> {
        let fd = self.fd.as_fd();
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    move_into_link_name_space(fd, Some(LinkNameSpaceType::Network)).map_err(
                        |e| match e {
                            rustix::io::Errno::INVAL => NetnsError::NotNetns {
                                path: self.path.clone(),
                            },
                            e => NetnsError::Thread(e.into()),
                        },
                    )?;
                    work()
                })
                .join()
                .unwrap_or_else(|_| {
                    Err(NetnsError::Thread(io::Error::other(
                        "the namespace thread panicked",
                    )))
                })
        })
    }

    /// Runs `tc ARGS` inside the namespace.
    fn tc(&self, args: &[&str]) -> Result<(), NetnsError> {
        let tc = TC
            .iter()
            .find(|p| Path::new(p).exists())
            .ok_or(NetnsError::NoTc)?;
        let mut cmd = Command::new(tc);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // Close-on-exec: the namespace fd reaches the child's pre_exec, not tc itself.
        let raw = self.fd.as_raw_fd();
        // SAFETY: runs in the child between fork and exec; setns is one system call, and the
        // closure allocates nothing. `raw` is open there: `self.fd` outlives `output()` below.
        unsafe {
            cmd.pre_exec(move || {
                let fd = BorrowedFd::borrow_raw(raw);
                move_into_link_name_space(fd, Some(LinkNameSpaceType::Network))?;
                Ok(())
            });
        }
        let out = cmd.output().map_err(|e| NetnsError::Tc {
            args: args.join(" "),
            message: e.to_string(),
        })?;
        if out.status.success() {
            Ok(())
        } else {
            Err(NetnsError::Tc {
                args: args.join(" "),
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }

    /// Redirects everything that arrives on `from` out of `to`.
    fn redirect(&self, from: &str, to: &str) -> Result<(), NetnsError> {
        self.tc(&["qdisc", "add", "dev", from, "ingress"])?;
        self.tc(&[
            "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all", "u32", "match",
            "u8", "0", "0", "action", "mirred", "egress", "redirect", "dev", to,
        ])
    }
}

/// Whether policy lets a VM join the namespace at `path`: its directory and name if so.
pub fn allowed(path: &Path) -> Option<(&Path, &OsStr)> {
    let (dir, name) = (path.parent()?, path.file_name()?);
    (NETNS_DIRS.iter().any(|d| Path::new(d) == dir) && plain_name(name)).then_some((dir, name))
}

/// Whether `name` can be an interface name (IFNAMSIZ, no path or shell characters).
pub fn interface_name_ok(name: &str) -> bool {
    !name.is_empty() && name.len() <= 15 && plain_name(OsStr::new(name))
}

/// A namespace file name: no path tricks, nothing a shell or tc would read twice.
fn plain_name(name: &OsStr) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes != b"."
        && bytes != b".."
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(b))
}

/// Joins a VM to `interface` of the namespace at `netns`: the returned link's tap lives in the
/// namespace and carries the interface's traffic; its addresses and MAC are the interface's.
pub fn connect(netns: &Path, interface: &str) -> Result<VmLink, NetnsError> {
    if !interface_name_ok(interface) {
        return Err(NetnsError::Interface {
            interface: interface.into(),
            cause: io::Error::new(io::ErrorKind::InvalidInput, "not an interface name"),
        });
    }
    let ns = Netns::open(netns)?;
    let iface_err = |cause: io::Error| NetnsError::Interface {
        interface: interface.into(),
        cause,
    };
    let (tap, address, prefix_len, mac, mtu, gateway) = ns.run_inside(|| {
        let sock = rustix::net::socket_with(
            AddressFamily::INET,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC,
            None,
        )
        .map_err(|e| iface_err(e.into()))?;
        let mac = interface_mac(&sock, interface).map_err(iface_err)?;
        let mtu = interface_mtu(&sock, interface).map_err(iface_err)?;
        let (address, prefix_len) = match interface_ipv4(&sock, interface) {
            Ok(a) => a,
            Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {
                return Err(NetnsError::NoAddress(interface.into()))
            }
            Err(e) => return Err(iface_err(e)),
        };
        // /proc/thread-self: this thread's namespace, not the process's.
        let routes = std::fs::read_to_string("/proc/thread-self/net/route").unwrap_or_default();
        let gateway = default_gateway(&routes, interface);
        // Opened here, the tap belongs to the namespace.
        let tap = Tap::open("husktap%d").map_err(NetnsError::Tap)?;
        // The tap carries the interface's frames: the same MTU (told to the guest as well).
        set_mtu(&sock, tap.name(), mtu).map_err(NetnsError::Tap)?;
        set_up(&sock, tap.name()).map_err(NetnsError::Tap)?;
        Ok((tap, address, prefix_len, mac, mtu, gateway))
    })?;
    let tap_name = tap.name().to_string();
    // A namespace joined before (a VM restarted in it) has the old filters: replaced.
    let _ = ns.tc(&["qdisc", "del", "dev", interface, "ingress"]);
    ns.redirect(interface, &tap_name)?;
    ns.redirect(&tap_name, interface)?;
    Ok(VmLink {
        tap_fd: tap.into_fd(),
        tap_name,
        host_ip: gateway.unwrap_or(Ipv4Addr::UNSPECIFIED),
        guest_ip: address,
        prefix_len,
        mac,
        mtu: Some(mtu),
        kind: LinkKind::Netns {
            path: netns.to_path_buf(),
            interface: interface.to_string(),
        },
    })
}

/// Removes the redirect from `interface` of the namespace at `netns` (its VM has ended), so
/// that the namespace's own stack sees its traffic again. A namespace already gone is fine.
pub fn disconnect(netns: &Path, interface: &str) -> Result<(), NetnsError> {
    let ns = match Netns::open(netns) {
        Ok(ns) => ns,
        Err(NetnsError::Open { cause, .. }) if cause.kind() == io::ErrorKind::NotFound => {
            return Ok(())
        }
        Err(e) => return Err(e),
    };
    match ns.tc(&["qdisc", "del", "dev", interface, "ingress"]) {
        Err(NetnsError::Tc { message, .. })
            if message.contains("Cannot find device") || message.contains("Invalid handle") =>
        {
            Ok(())
        }
        other => other,
    }
}

/// The default route's gateway through `interface` in /proc/net/route's text (little-endian
/// hex addresses).
fn default_gateway(routes: &str, interface: &str) -> Option<Ipv4Addr> {
    routes.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            [iface, "00000000", gateway, ..] if *iface == interface => {
                let raw = u32::from_str_radix(gateway, 16).ok()?;
                let ip = Ipv4Addr::from(raw.to_le_bytes());
                (!ip.is_unspecified()).then_some(ip)
            }
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_named_namespaces_are_opened() {
        for path in [
            "/proc/1/ns/net",
            "/run/netns",
            "/run/netns/../../etc/passwd",
            "/run/netns/a/b",
            "/tmp/netns/x",
            "run/netns/x",
            "/run/netns/x y",
        ] {
            assert!(
                matches!(Netns::open(Path::new(path)), Err(NetnsError::NotAllowed(_))),
                "{path}"
            );
        }
        assert!(matches!(
            Netns::open(Path::new("/run/netns/husk-no-such-ns")),
            Err(NetnsError::Open { .. })
        ));
    }

    #[test]
    fn the_default_gateway_is_read_from_the_route_table_of_the_interface() {
        let routes = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n\
                      eth1\t00000000\t0100A8C0\t0003\t0\t0\t0\t00000000\n\
                      eth0\t0000580A\t00000000\t0001\t0\t0\t0\t0000FFFF\n\
                      eth0\t00000000\t0100580A\t0003\t0\t0\t0\t00000000\n";
        assert_eq!(
            default_gateway(routes, "eth0"),
            Some(Ipv4Addr::new(10, 88, 0, 1))
        );
        assert_eq!(
            default_gateway(routes, "eth1"),
            Some(Ipv4Addr::new(192, 168, 0, 1))
        );
        assert_eq!(default_gateway(routes, "eth2"), None);
        assert_eq!(default_gateway("", "eth0"), None);
    }
}
