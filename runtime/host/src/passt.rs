//! Rootless networking (`husk run --net=user`): user-mode networking through passt
//! (Debian package `passt`), with no tap, no firewall rules and no privilege.
//!
//! husk makes a `socketpair(AF_UNIX, SOCK_STREAM)`: one end goes to passt (`--fd`), the other to
//! husk-vmm (`--net stream=FD`). Over it flow Ethernet frames, each preceded by its length
//! (32-bit big-endian): passt's "qemu" protocol. passt answers the guest's ARP and turns its TCP,
//! UDP and ICMP into ordinary sockets of the calling user on the host; published ports are
//! passt's `-t`/`-u` forwards.
//!
//! Lifetime: passt runs in the foreground as husk's child and quits when its socket's other end
//! closes (`--fd` serves one client), that is when husk-vmm exits or is killed, whatever
//! happens to husk; it also gets SIGKILL if husk dies first (parent-death signal, kept as
//! long as passt does not change its uid, which it does only when started as root, to
//! `--runas`). husk kills and reaps it after the VM in any case ([`Passt::stop`]).
//!
//! The guest's network (fixed, the same for every VM: each has its own passt):
//! guest [`GUEST_IP`]/[`PREFIX_LEN`], gateway [`GATEWAY_IP`] (`HUSK_HOST_IP`), DNS at
//! [`DNS_IP`] (passt forwards it to the host's resolver). Without host access passt is told
//! `--no-map-gw`: the gateway address is then not the host's loopback.

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::firewall::{PortMapping, Protocol};
use crate::run_dirs::read_bounded;
use crate::vmm_args::{NetConfig, TapSource};

/// Where Debian installs passt (run by absolute path, never through `PATH`).
pub const PASST: &str = "/usr/bin/passt";
/// The guest's address.
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// The guest's default gateway: passt itself (and, with host access, the host's loopback).
pub const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The guest's nameserver: passt forwards DNS sent there to the host's resolver.
pub const DNS_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
/// Prefix length of the guest's subnet.
pub const PREFIX_LEN: u8 = 24;
/// The guest's MTU (the virtio-net device's default; passt is told so).
pub const MTU: u16 = 1500;
/// The guest's MAC (locally administered, unicast).
pub const GUEST_MAC: [u8; 6] = [0x06, 0x00, 10, 0, 2, 15];
/// passt's own MAC, the source of every frame it sends to the guest.
pub const PASST_MAC: [u8; 6] = [0x9a, 0x55, 0x9a, 0x55, 0x9a, 0x55];
/// How long passt may take to be ready (its ports bound) before husk gives up.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Why passt could not be started.
#[derive(Debug, thiserror::Error)]
pub enum PasstError {
    #[error("--net=user needs passt: {PASST} is missing (install the Debian package passt)")]
    Missing,
    #[error("--net=user: {0}: {1}")]
    Io(&'static str, io::Error),
    #[error("--net=user: passt failed to start: {0}")]
    Failed(String),
    #[error("--net=user: passt was not ready within {0:?}")]
    NotReady(Duration),
}

/// What the guest's user-mode network offers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PasstConfig {
    /// Published ports (`-t`/`-u`).
    pub published: Vec<PortMapping>,
    /// The guest may reach the host's own services through the gateway address (passt maps
    /// it to the host's loopback); without it, `--no-map-gw`.
    pub host_access: bool,
    /// Forward the guest's DNS (sent to [`DNS_IP`]) to the host's resolver.
    pub dns: bool,
    /// The uid and gid passt switches to when started as root (it refuses to stay root).
    pub runas: Option<(u32, u32)>,
}

fn mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// passt's `-t`/`-u` value of a published port: `[HOSTIP/]HOSTPORT:GUESTPORT`.
pub fn port_spec(p: &PortMapping) -> (&'static str, String) {
    let flag = match p.protocol {
        Protocol::Tcp => "--tcp-ports",
        Protocol::Udp => "--udp-ports",
    };
    let addr = p.host_ip.map(|ip| format!("{ip}/")).unwrap_or_default();
    (flag, format!("{addr}{}:{}", p.host_port, p.guest_port))
}

/// passt's command line (without the program): the socket `fd`, files in `dir` (its pid
/// file, written once it is ready, and its log).
pub fn passt_args(config: &PasstConfig, fd: RawFd, dir: &Path) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |s: &str| a.push(s.into());
    for s in [
        "--foreground",
        "--quiet",
        "--ipv4-only",
        "--fd",
        &fd.to_string(),
        "--address",
        &GUEST_IP.to_string(),
        "--netmask",
        &PREFIX_LEN.to_string(),
        "--gateway",
        &GATEWAY_IP.to_string(),
        "--mtu",
        &MTU.to_string(),
        "--mac-addr",
        &mac(&PASST_MAC),
        // The guest is configured by its kernel (ip=): no DHCP, no IPv6 autoconfiguration.
        "--no-dhcp",
        "--no-ndp",
        "--no-dhcpv6",
        "--no-ra",
    ] {
        push(s);
    }
    if !config.host_access {
        push("--no-map-gw");
    }
    if config.dns {
        // To the first nameserver of the host's /etc/resolv.conf, which passt reads itself
        // (a loopback one too: passt runs on the host). This passt forwards only there: an
        // address given with --dns would not be used for forwarding.
        push("--dns-forward");
        push(&DNS_IP.to_string());
    }
    if let Some((uid, gid)) = config.runas {
        push("--runas");
        push(&format!("{uid}:{gid}"));
    }
    for p in &config.published {
        let (flag, spec) = port_spec(p);
        push(flag);
        push(&spec);
    }
    a.push("--pid".into());
    a.push(dir.join("passt.pid").into());
    a.push("--log-file".into());
    a.push(dir.join("passt.log").into());
    a
}

/// Whether `resolv_conf` (the text of /etc/resolv.conf) names an IPv4 nameserver, which passt
/// forwards the guest's DNS to (the first one, loopback or not).
pub fn has_ipv4_nameserver(resolv_conf: &str) -> bool {
    resolv_conf.lines().any(|line| {
        let mut words = line.split_whitespace();
        words.next() == Some("nameserver")
            && words.next().is_some_and(|a| a.parse::<Ipv4Addr>().is_ok())
    })
}

/// [`has_ipv4_nameserver`] of this host's /etc/resolv.conf (at most 64 KiB read).
pub fn host_has_ipv4_nameserver() -> bool {
    read_bounded(std::path::Path::new("/etc/resolv.conf"), 64 * 1024)
        .is_ok_and(|text| has_ipv4_nameserver(&text))
}

/// The guest kernel's `ip=` parameter for eth0 (CONFIG_IP_PNP, no autoconfiguration).
pub fn kernel_param() -> String {
    let mask = Ipv4Addr::from(u32::MAX << (32 - u32::from(PREFIX_LEN)));
    format!("ip={GUEST_IP}::{GATEWAY_IP}:{mask}::eth0:off")
}

/// A running passt and the VMM's end of its socket.
pub struct Passt {
    child: Option<Child>,
    /// husk-vmm's end of the socket pair, until the VMM holds it ([`Passt::close_vmm_end`]).
    vmm_end: Option<OwnedFd>,
    dir: PathBuf,
}

impl Passt {
    /// Starts passt and waits until it is ready (its ports bound): a clear error if it is not
    /// installed or quits (a published port in use, no usable host interface...).
    pub fn start(config: &PasstConfig) -> Result<Self, PasstError> {
        Self::start_program(Path::new(PASST), config)
    }

    /// [`Passt::start`] with another passt binary (tests).
    pub fn start_program(program: &Path, config: &PasstConfig) -> Result<Self, PasstError> {
        if !program.exists() {
            return Err(PasstError::Missing);
        }
        let (vmm_end, passt_end) = rustix::net::socketpair(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::STREAM,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .map_err(|e| PasstError::Io("socketpair", e.into()))?;
        let dir = private_dir(config.runas).map_err(|e| PasstError::Io("private directory", e))?;
        let mut passt = Passt {
            child: None,
            vmm_end: Some(vmm_end),
            dir,
        };
        let stderr = File::create(passt.dir.join("stderr"))
            .map_err(|e| PasstError::Io("passt's stderr file", e))?;
        let mut cmd = Command::new(program);
        cmd.args(passt_args(config, passt_end.as_raw_fd(), &passt.dir))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        crate::process::inherit_fd(&mut cmd, passt_end.as_raw_fd());
        // Its own process group: Ctrl-C on husk's terminal stops the VM (which then closes the
        // socket), not the network under it.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        // SAFETY: runs in the child between fork and exec; prctl is async-signal-safe and
        // nothing here allocates.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                let kill = rustix::process::Signal::KILL;
                rustix::process::set_parent_process_death_signal(Some(kill))?;
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| PasstError::Io("cannot start passt", e))?;
        passt.child = Some(child);
        // Only passt holds its end now: it sees the VMM's end close.
        drop(passt_end);
        passt.wait_ready()?;
        Ok(passt)
    }

    fn wait_ready(&mut self) -> Result<(), PasstError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let pid_file = self.dir.join("passt.pid");
        loop {
            // Written by passt after its set-up (ports bound), right before it serves.
            if read_bounded(&pid_file, 64).is_ok_and(|s| !s.trim().is_empty()) {
                return Ok(());
            }
            let Some(child) = self.child.as_mut() else {
                return Err(PasstError::Failed("not started".into()));
            };
            if let Some(status) = child
                .try_wait()
                .map_err(|e| PasstError::Io("waiting for passt", e))?
            {
                self.child = None;
                return Err(PasstError::Failed(format!(
                    "{} ({status})",
                    self.failure_reason()
                )));
            }
            if Instant::now() > deadline {
                return Err(PasstError::NotReady(READY_TIMEOUT));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// passt's last message on stderr (without its complaints about a missing syslog).
    fn failure_reason(&self) -> String {
        let text = read_bounded(&self.dir.join("stderr"), 64 * 1024).unwrap_or_default();
        text.lines()
            .map(str::trim)
            .rfind(|l| {
                !l.is_empty()
                    && !l.contains("to syslog")
                    && !l.starts_with("Don't run as root")
                    && !l.starts_with("Usage:")
            })
            .unwrap_or("it exited without a message")
            .to_string()
    }

    /// The VMM's end of the socket (to inherit at the same number).
    pub fn vmm_fd(&self) -> Option<RawFd> {
        self.vmm_end.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// husk-vmm's `--net`: the socket end, with the guest's MAC.
    pub fn net_config(&self) -> Option<NetConfig> {
        self.vmm_fd().map(|fd| NetConfig {
            tap: TapSource::Stream(fd),
            mac: GUEST_MAC,
            mtu: None,
        })
    }

    /// Closes this process's copy of the VMM's end, once the VMM holds its own: then passt
    /// quits when the VMM goes.
    pub fn close_vmm_end(&mut self) {
        self.vmm_end = None;
    }

    /// Takes the VMM's end of the socket (for a caller that plays the VMM itself, e.g. tests).
    pub fn take_vmm_end(&mut self) -> Option<OwnedFd> {
        self.vmm_end.take()
    }

    /// passt's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Ends passt (SIGKILL if it has not quit by itself), reaps it and removes its files.
    pub fn stop(&mut self) {
        self.vmm_end = None;
        if let Some(mut child) = self.child.take() {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Passt {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A new directory for passt's pid file and log under /tmp (Debian's AppArmor profile for
/// passt lets it write its pid and log files only under /tmp and $HOME), with an empty pid file.
///
/// Run as the caller, 0700. Started as root, passt drops its capabilities before it opens its
/// log (as root, without CAP_DAC_OVERRIDE: the directory stays root's, 0711) and switches to
/// `runas` before it writes its pid file (created here, owned by `runas`).
fn private_dir(runas: Option<(u32, u32)>) -> io::Result<PathBuf> {
    let mode = if runas.is_some() { 0o711 } else { 0o700 };
    let dir = crate::run_dirs::private_dir("husk-passt-", mode)?;
    let pid_file = dir.join("passt.pid");
    let made = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&pid_file)
        .and_then(|_| match runas {
            Some((uid, gid)) => std::os::unix::fs::chown(&pid_file, Some(uid), Some(gid)),
            None => Ok(()),
        });
    if let Err(e) = made {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(e);
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: Vec<OsString>) -> Vec<String> {
        args.into_iter().map(|a| a.into_string().unwrap()).collect()
    }

    #[test]
    fn the_command_line_names_the_socket_the_guest_network_and_no_host_mapping_by_default() {
        let a = strings(passt_args(&PasstConfig::default(), 7, Path::new("/tmp/d")));
        let joined = a.join(" ");
        assert!(
            joined.starts_with("--foreground --quiet --ipv4-only --fd 7 "),
            "{joined}"
        );
        assert!(
            joined.contains(
                "--address 10.0.2.15 --netmask 24 --gateway 10.0.2.2 --mtu 1500 \
                 --mac-addr 9a:55:9a:55:9a:55"
            ),
            "{joined}"
        );
        assert!(a.contains(&"--no-map-gw".to_string()));
        assert!(!joined.contains("--dns"), "{joined}");
        assert!(!joined.contains("--runas"), "{joined}");
        assert!(joined.ends_with("--pid /tmp/d/passt.pid --log-file /tmp/d/passt.log"));
    }

    #[test]
    fn ports_dns_host_access_and_runas_reach_passt() {
        let config = PasstConfig {
            published: vec![
                "8080:80".parse().unwrap(),
                "127.0.0.1:5353:53/udp".parse().unwrap(),
            ],
            host_access: true,
            dns: true,
            runas: Some((65534, 65534)),
        };
        let joined = strings(passt_args(&config, 9, Path::new("/x"))).join(" ");
        assert!(!joined.contains("--no-map-gw"), "{joined}");
        assert!(joined.contains(" --dns-forward 10.0.2.3 "), "{joined}");
        assert!(!joined.contains("--dns "), "{joined}");
        assert!(joined.contains("--runas 65534:65534"), "{joined}");
        assert!(
            joined.contains("--tcp-ports 8080:80 --udp-ports 127.0.0.1/5353:53"),
            "{joined}"
        );
    }

    #[test]
    fn an_ipv4_nameserver_is_found_loopback_or_not() {
        assert!(has_ipv4_nameserver(
            "# x\nsearch a\nnameserver 127.0.0.53\n"
        ));
        assert!(has_ipv4_nameserver(
            "nameserver ::1\nnameserver\t192.0.2.1 # c\n"
        ));
        assert!(!has_ipv4_nameserver(
            "nameserver ::1\n#nameserver 192.0.2.1\n"
        ));
        assert!(!has_ipv4_nameserver(""));
    }

    #[test]
    fn the_guest_is_configured_by_its_kernel_on_passts_subnet() {
        assert_eq!(
            kernel_param(),
            "ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off"
        );
    }

    #[test]
    fn a_dead_husks_directory_is_swept_and_a_live_ones_kept() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let stale = PathBuf::from(format!("/tmp/husk-passt-{dead}-test"));
        std::fs::create_dir_all(stale.join("x")).unwrap();
        let dir = private_dir(None).unwrap();
        assert!(dir.join("passt.pid").exists());
        assert!(!stale.exists(), "{} left", stale.display());
        // Ours (alive) stays, through another sweep.
        let again = private_dir(None).unwrap();
        assert!(dir.exists());
        std::fs::remove_dir_all(&again).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_passt_is_named_with_its_package() {
        let e = Passt::start_program(Path::new("/nonexistent/passt"), &PasstConfig::default())
            .err()
            .unwrap();
        assert_eq!(
            e.to_string(),
            "--net=user needs passt: /usr/bin/passt is missing (install the Debian package passt)"
        );
    }

    #[test]
    fn a_passt_that_quits_at_once_is_reported_with_its_message() {
        let e = Passt::start_program(Path::new("/bin/false"), &PasstConfig::default())
            .err()
            .unwrap();
        assert!(
            e.to_string()
                .starts_with("--net=user: passt failed to start:"),
            "{e}"
        );
    }
}
