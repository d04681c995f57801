//! Checks a VmSpec from a client and fills in defaults. Everything refused here is
//! INVALID_ARGUMENT with a message that names the field, except a host file outside what the
//! path policy allows, which is PERMISSION_DENIED.

use std::path::Path;

use husk_host::firewall::{Cidr, EgressPolicy, NetworkPolicy, PolicyError, PortMapping, Protocol};
use husk_host::policy::PathPolicy;
use husk_proto::v1::{
    network, port_mapping, Disk, Egress, Limits, Network, RateLimit, UpdateRateLimitsRequest,
    VmSpec,
};
use tonic::Status;

/// vCPU range, as husk-vmm accepts it.
pub const VCPUS: std::ops::RangeInclusive<u32> = 1..=32;
/// Memory range in MiB, as husk-vmm accepts it.
pub const MEMORY_MIB: std::ops::RangeInclusive<u32> = 64..=262_144;
pub const DEFAULT_VCPUS: u32 = 1;
pub const DEFAULT_MEMORY_MIB: u32 = 256;
/// More disks than this would not fit the VMM's MMIO slots with net, vsock and rng.
pub const MAX_DISKS: usize = 8;
/// Most disk slots (`VmSpec.disk_slots`).
pub const MAX_DISK_SLOTS: u32 = husk_host::vmm_args::MAX_DISK_SLOTS;
/// Most block devices of one VM: rootfs, disks and slots together.
pub const MAX_BLOCK_DEVICES: usize = 16;

/// Files the daemon uses when the spec leaves kernel or initrd empty.
pub struct Defaults<'a> {
    pub kernel: &'a Path,
    pub initrd: &'a Path,
}

/// Validates `spec` and returns it with defaults filled in (paths made absolute).
/// A disk format field: empty (by the file name), "raw" or "qcow2".
fn check_format(field: &str, value: &str) -> Result<(), Status> {
    husk_host::disk_image::FormatSource::parse(value)
        .map(drop)
        .map_err(|e| invalid(format!("{field}: {e}")))
}

pub fn normalize(
    mut spec: VmSpec,
    defaults: &Defaults<'_>,
    policy: &PathPolicy,
) -> Result<VmSpec, Status> {
    if !spec.name.is_empty() {
        check_name(&spec.name)?;
    }
    let file = |field: &str, value: &str, default: Option<&Path>, write: bool| {
        file_field(policy, field, value, default, write)
    };
    spec.kernel = file("kernel", &spec.kernel, Some(defaults.kernel), false)?;
    spec.initrd = file("initrd", &spec.initrd, Some(defaults.initrd), false)?;
    if !spec.rootfs.is_empty() {
        // A copy-on-write rootfs is only read: the VM writes its overlay.
        spec.rootfs = file("rootfs", &spec.rootfs, None, !spec.rootfs_copy_on_write)?;
        check_format("rootfs_format", &spec.rootfs_format)?;
    } else if spec.rootfs_copy_on_write || !spec.rootfs_format.is_empty() {
        return Err(invalid(
            "rootfs_copy_on_write, rootfs_format: there is no rootfs",
        ));
    }
    if spec.disks.len() > MAX_DISKS {
        return Err(invalid(format!(
            "disks: {} given, at most {MAX_DISKS}",
            spec.disks.len()
        )));
    }
    if spec.disk_slots > MAX_DISK_SLOTS {
        return Err(invalid(format!(
            "disk_slots: {} is out of range 0..={MAX_DISK_SLOTS}",
            spec.disk_slots
        )));
    }
    // Every block device takes one of the VM's 19 virtio-mmio slots; 3 stay for net, vsock and
    // rng.
    let block = spec.disks.len() + usize::from(!spec.rootfs.is_empty()) + spec.disk_slots as usize;
    if block > MAX_BLOCK_DEVICES {
        return Err(invalid(format!(
            "disk_slots: {} with {} disks (rootfs included) makes {block} block devices, at \
             most {MAX_BLOCK_DEVICES}",
            spec.disk_slots,
            block - spec.disk_slots as usize
        )));
    }
    check_mounts(&spec, policy)?;
    for (i, disk) in spec.disks.iter_mut().enumerate() {
        if disk.copy_on_write && disk.read_only {
            return Err(invalid(format!(
                "disks[{i}]: copy_on_write and read_only exclude each other (a read-only disk \
                 needs no overlay)"
            )));
        }
        check_format(&format!("disks[{i}].format"), &disk.format)?;
        *disk = Disk {
            path: file(
                &format!("disks[{i}].path"),
                &disk.path,
                None,
                !disk.read_only && !disk.copy_on_write,
            )?,
            read_only: disk.read_only,
            rate_limit: checked_limit(&format!("disks[{i}].rate_limit"), disk.rate_limit.take())?,
            format: std::mem::take(&mut disk.format),
            copy_on_write: disk.copy_on_write,
        };
    }
    if spec.vcpus == 0 {
        spec.vcpus = DEFAULT_VCPUS;
    }
    if !VCPUS.contains(&spec.vcpus) {
        return Err(invalid(format!(
            "vcpus: {} is out of range {}..={}",
            spec.vcpus,
            VCPUS.start(),
            VCPUS.end()
        )));
    }
    if spec.memory_mib == 0 {
        spec.memory_mib = DEFAULT_MEMORY_MIB;
    }
    if !MEMORY_MIB.contains(&spec.memory_mib) {
        return Err(invalid(format!(
            "memory_mib: {} is out of range {}..={}",
            spec.memory_mib,
            MEMORY_MIB.start(),
            MEMORY_MIB.end()
        )));
    }
    if spec.command.first().is_some_and(|c| c.is_empty()) {
        return Err(invalid("command: the program name (command[0]) is empty"));
    }
    for (i, arg) in spec.command.iter().enumerate() {
        if arg.contains('\0') {
            return Err(invalid(format!("command[{i}] contains a NUL byte")));
        }
    }
    for (key, value) in &spec.env {
        if key.is_empty() || key.contains('=') || key.contains('\0') || value.contains('\0') {
            return Err(invalid(format!(
                "env: {key:?} is not a valid variable name (or its value holds NUL)"
            )));
        }
    }
    if !spec.workdir.is_empty() && !spec.workdir.starts_with('/') {
        return Err(invalid(format!(
            "workdir: {:?} must be an absolute path",
            spec.workdir
        )));
    }
    if !spec.hostname.is_empty() && !husk_init::hostname::valid_hostname(&spec.hostname) {
        return Err(invalid(format!(
            "hostname: {:?} must be 1..=64 of a-z A-Z 0-9 - . (RFC 1123)",
            spec.hostname
        )));
    }
    if spec.extra_cmdline.contains('\0') || spec.extra_cmdline.contains('\n') {
        return Err(invalid("extra_cmdline: must be one line without NUL bytes"));
    }
    if let Some(limits) = &spec.limits {
        check_limits(limits, spec.vcpus, spec.memory_mib)?;
    }
    let network = spec.network.get_or_insert_with(Default::default);
    if network::Mode::try_from(network.mode).is_err() {
        return Err(invalid(format!(
            "network.mode: unknown mode {}",
            network.mode
        )));
    }
    if !network.mac.is_empty() {
        parse_mac(&network.mac).ok_or_else(|| {
            invalid(format!(
                "network.mac: {:?} is not xx:xx:xx:xx:xx:xx",
                network.mac
            ))
        })?;
    }
    if network.mode == network::Mode::Netns as i32 {
        if husk_host::netns::allowed(std::path::Path::new(&network.netns)).is_none() {
            return Err(invalid(format!(
                "network.netns: {:?}: only named namespaces (/run/netns/NAME or \
                 /var/run/netns/NAME) can be joined",
                network.netns
            )));
        }
        if network.netns_interface.is_empty() {
            network.netns_interface = "eth0".into();
        }
        if !husk_host::netns::interface_name_ok(&network.netns_interface) {
            return Err(invalid(format!(
                "network.netns_interface: {:?} is not an interface name",
                network.netns_interface
            )));
        }
    } else if !network.netns.is_empty() || !network.netns_interface.is_empty() {
        return Err(invalid(
            "network.netns, network.netns_interface: need network.mode MODE_NETNS",
        ));
    }
    network.rx_rate_limit = checked_limit("network.rx_rate_limit", network.rx_rate_limit.take())?;
    network.tx_rate_limit = checked_limit("network.tx_rate_limit", network.tx_rate_limit.take())?;
    let policy = network_policy(network)?;
    if network.mode != network::Mode::Tap as i32 && policy != NetworkPolicy::default() {
        return Err(invalid(
            "network.ports, network.egress: need network.mode MODE_TAP",
        ));
    }
    // Stored normalized, as the firewall applies them (CIDRs as network/prefix).
    network.egress = Some(Egress {
        allow: policy
            .egress
            .allow
            .iter()
            .map(ToString::to_string)
            .collect(),
        deny: policy.egress.deny.iter().map(ToString::to_string).collect(),
        host_access: policy.egress.host_access,
    })
    .filter(|e| !e.allow.is_empty() || !e.deny.is_empty() || e.host_access);
    Ok(spec)
}

/// The published ports and egress policy of `network`, checked: ports 1..65535, a host port
/// published once per protocol, a host address that is this host's, CIDRs that parse.
pub fn network_policy(network: &Network) -> Result<NetworkPolicy, Status> {
    let mut published = Vec::new();
    for (i, p) in network.ports.iter().enumerate() {
        let field = format!("network.ports[{i}]");
        let port = |name: &str, value: u32| {
            u16::try_from(value)
                .ok()
                .filter(|v| *v != 0)
                .ok_or_else(|| {
                    invalid(format!(
                        "{field}.{name}: {value} is out of range (1..65535)"
                    ))
                })
        };
        let host_ip =
            match p.host_ip.as_str() {
                "" => None,
                ip => Some(ip.parse().map_err(|_| {
                    invalid(format!("{field}.host_ip: {ip:?} is not an IPv4 address"))
                })?),
            };
        let protocol = match port_mapping::Protocol::try_from(p.protocol) {
            Ok(port_mapping::Protocol::Tcp) => Protocol::Tcp,
            Ok(port_mapping::Protocol::Udp) => Protocol::Udp,
            Err(_) => {
                return Err(invalid(format!(
                    "{field}.protocol: unknown protocol {}",
                    p.protocol
                )))
            }
        };
        published.push(PortMapping {
            host_ip,
            host_port: port("host_port", p.host_port)?,
            guest_port: port("guest_port", p.guest_port)?,
            protocol,
        });
    }
    let cidrs = |name: &str, list: &[String]| -> Result<Vec<Cidr>, Status> {
        list.iter()
            .enumerate()
            .map(|(i, c)| {
                c.parse().map_err(|_| {
                    invalid(format!(
                        "network.egress.{name}[{i}]: {c:?} is not an IPv4 CIDR (A.B.C.D/N)"
                    ))
                })
            })
            .collect()
    };
    let egress = network.egress.clone().unwrap_or_default();
    let policy = NetworkPolicy {
        published,
        egress: EgressPolicy {
            allow: cidrs("allow", &egress.allow)?,
            deny: cidrs("deny", &egress.deny)?,
            host_access: egress.host_access,
        },
    };
    policy.check().map_err(|e| {
        let i = match &e {
            PolicyError::DuplicateHostPort(p, ..) | PolicyError::NotLocal(p, _) => {
                policy.published.iter().rposition(|q| q == p).unwrap_or(0)
            }
        };
        invalid(format!("network.ports[{i}]: {e}"))
    })?;
    Ok(policy)
}

/// Names: 1..=63 of `[A-Za-z0-9_.-]`, starting with a letter or digit.
pub fn check_name(name: &str) -> Result<(), Status> {
    let ok = name.len() <= 63
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "name: {name:?} must be 1-63 letters, digits, '-', '_' or '.', starting with a \
             letter or digit"
        )))
    }
}

/// Parses `xx:xx:xx:xx:xx:xx`; a multicast address is refused. The one MAC parser, shared with
/// husk-vmm's `--net` (husk_host::vmm_args).
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    husk_host::vmm_args::parse_mac(text).ok()
}

/// Limits a spec sets must leave the VM room to run: memory_max_mib at least the guest's RAM,
/// at least a tenth of a core, threads for every vCPU and the VMM's own.
fn check_limits(limits: &Limits, vcpus: u32, memory_mib: u32) -> Result<(), Status> {
    if limits.memory_max_mib != 0 && limits.memory_max_mib < memory_mib {
        return Err(invalid(format!(
            "limits.memory_max_mib: {} is below the guest's memory_mib {memory_mib}",
            limits.memory_max_mib
        )));
    }
    if limits.cpu_millis != 0 && limits.cpu_millis < 100 {
        return Err(invalid(format!(
            "limits.cpu_millis: {} is below 100 (a tenth of a core)",
            limits.cpu_millis
        )));
    }
    let threads = vcpus.saturating_add(4);
    if limits.pids_max != 0 && limits.pids_max < threads {
        return Err(invalid(format!(
            "limits.pids_max: {} is below {threads} (the VMM's threads for {vcpus} vCPUs)",
            limits.pids_max
        )));
    }
    if limits.open_files != 0 && limits.open_files < 64 {
        return Err(invalid(format!(
            "limits.open_files: {} is below 64",
            limits.open_files
        )));
    }
    Ok(())
}

/// Most shared directories (`VmSpec.mounts`).
pub const MAX_MOUNTS: usize = husk_host::vmm_args::MAX_SHARED_DIRS;

/// The shared directories: at most [`MAX_MOUNTS`], each an existing directory under the path
/// policy, each guest path valid and used once; with the block devices they must fit the
/// VM's device slots.
fn check_mounts(spec: &VmSpec, policy: &PathPolicy) -> Result<(), Status> {
    if spec.mounts.len() > MAX_MOUNTS {
        return Err(invalid(format!(
            "mounts: {} given, at most {MAX_MOUNTS}",
            spec.mounts.len()
        )));
    }
    let block = spec.disks.len() + usize::from(!spec.rootfs.is_empty()) + spec.disk_slots as usize;
    if block + spec.mounts.len() > MAX_BLOCK_DEVICES {
        return Err(invalid(format!(
            "mounts: {} shared directories with {block} block devices make {}, at most              {MAX_BLOCK_DEVICES}",
            spec.mounts.len(),
            block + spec.mounts.len()
        )));
    }
    for (i, mount) in spec.mounts.iter().enumerate() {
        let field = format!("mounts[{i}]");
        if !husk_init::shares::valid_guest_path(&mount.guest_path) {
            return Err(invalid(format!(
                "{field}.guest_path: {:?} must be absolute, not /, at most {} bytes, without                  whitespace, ':' or '.'/'..' parts",
                mount.guest_path,
                husk_init::shares::MAX_GUEST_PATH
            )));
        }
        if spec.mounts[..i]
            .iter()
            .any(|m| m.guest_path == mount.guest_path)
        {
            return Err(invalid(format!(
                "{field}.guest_path: {} is mounted twice",
                mount.guest_path
            )));
        }
        let path = Path::new(&mount.host_path);
        if !path.is_absolute() {
            return Err(invalid(format!(
                "{field}.host_path: {:?} must be an absolute path",
                mount.host_path
            )));
        }
        policy
            .open_dir(&format!("{field}.host_path"), path)
            .map_err(|e| {
                if e.is_denied() {
                    Status::permission_denied(e.to_string())
                } else {
                    invalid(e.to_string())
                }
            })?;
    }
    Ok(())
}

fn file_field(
    policy: &PathPolicy,
    field: &str,
    value: &str,
    default: Option<&Path>,
    write: bool,
) -> Result<String, Status> {
    let path = match (value.is_empty(), default) {
        (false, _) => Path::new(value),
        (true, Some(d)) => d,
        (true, None) => return Err(invalid(format!("{field}: empty path"))),
    };
    if !path.is_absolute() {
        return Err(invalid(format!(
            "{field}: {} must be an absolute path (huskd does not share the client's working \
             directory)",
            path.display()
        )));
    }
    let what = if value.is_empty() {
        format!("{field} (the daemon's default)")
    } else {
        field.to_string()
    };
    policy.check_file(&what, path, write).map_err(|e| {
        if e.is_denied() {
            Status::permission_denied(e.to_string())
        } else {
            invalid(e.to_string())
        }
    })?;
    Ok(path.display().to_string())
}

/// The disk of an AttachDisk request, checked: a path, and a raw image (attach takes no
/// qcow2, no copy-on-write overlay and no rate limit). The path itself is checked when huskd
/// opens it under the policy.
pub fn attached_disk(disk: Option<&Disk>) -> Result<Disk, Status> {
    let disk = disk.ok_or_else(|| invalid("disk: missing"))?;
    if disk.path.is_empty() {
        return Err(invalid("disk.path: empty"));
    }
    check_format("disk.format", &disk.format)?;
    if disk.copy_on_write && disk.read_only {
        return Err(invalid(
            "disk: copy_on_write and read_only exclude each other (a read-only disk needs no \
             overlay)",
        ));
    }
    if disk.rate_limit.is_some() {
        return Err(invalid("disk.rate_limit: not supported by AttachDisk"));
    }
    if !Path::new(&disk.path).is_absolute() {
        return Err(invalid(format!(
            "disk.path: {} must be an absolute path",
            disk.path
        )));
    }
    Ok(Disk {
        path: disk.path.clone(),
        read_only: disk.read_only,
        format: disk.format.clone(),
        copy_on_write: disk.copy_on_write,
        ..Default::default()
    })
}

fn invalid(message: impl Into<String>) -> Status {
    Status::invalid_argument(message.into())
}

/// A rate limit with every bucket's rate above zero; one with no bucket is stored as none.
fn checked_limit(field: &str, limit: Option<RateLimit>) -> Result<Option<RateLimit>, Status> {
    let Some(limit) = limit else {
        return Ok(None);
    };
    for (name, bucket) in [("bandwidth", &limit.bandwidth), ("ops", &limit.ops)] {
        if bucket.as_ref().is_some_and(|b| b.rate == 0) {
            return Err(invalid(format!("{field}.{name}.rate: must be above zero")));
        }
    }
    Ok(Some(limit).filter(|l| !crate::rate_limits::is_unlimited(l)))
}

/// The values of an UpdateRateLimits request (before the VM is looked at).
pub fn rate_limit_values(request: &UpdateRateLimitsRequest) -> Result<(), Status> {
    if request.disks.is_empty() && request.net_rx.is_none() && request.net_tx.is_none() {
        return Err(invalid("disks, net_rx, net_tx: give at least one limit"));
    }
    for (i, d) in request.disks.iter().enumerate() {
        checked_limit(&format!("disks[{i}].limit"), d.limit)?;
    }
    checked_limit("net_rx", request.net_rx)?;
    checked_limit("net_tx", request.net_tx)?;
    Ok(())
}

/// The devices an UpdateRateLimits request names, against the VM's spec: disks by their
/// number (the rootfs first), network limits only with a network device.
pub fn rate_limit_targets(request: &UpdateRateLimitsRequest, spec: &VmSpec) -> Result<(), Status> {
    let disks = spec.disks.len() + usize::from(!spec.rootfs.is_empty());
    for (i, d) in request.disks.iter().enumerate() {
        if d.disk as usize >= disks {
            return Err(invalid(format!(
                "disks[{i}].disk: the VM has {disks} disk(s), numbered from 0 (the rootfs first)"
            )));
        }
    }
    let has_net = spec
        .network
        .as_ref()
        .is_some_and(|n| n.mode != network::Mode::None as i32);
    if !has_net && (request.net_rx.is_some() || request.net_tx.is_some()) {
        return Err(invalid("net_rx, net_tx: the VM has no network device"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    /// A policy over a scratch root holding a kernel and an initrd (the daemon's defaults).
    struct Fixture {
        root: std::path::PathBuf,
        policy: PathPolicy,
    }

    impl Fixture {
        fn new(tag: &str) -> Self {
            let root =
                std::env::temp_dir().join(format!("huskd-validate-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            std::fs::create_dir_all(root.join("dir")).unwrap();
            std::fs::write(root.join("vmlinux"), b"k").unwrap();
            std::fs::write(root.join("initrd"), b"i").unwrap();
            let policy = PathPolicy::new(std::slice::from_ref(&root), &[]);
            Self { root, policy }
        }

        fn path(&self, name: &str) -> String {
            self.root.join(name).display().to_string()
        }

        fn normalize(&self, spec: VmSpec) -> Result<VmSpec, Status> {
            let (kernel, initrd) = (self.root.join("vmlinux"), self.root.join("initrd"));
            let defaults = Defaults {
                kernel: &kernel,
                initrd: &initrd,
            };
            normalize(spec, &defaults, &self.policy)
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }

    #[test]
    fn defaults_are_filled_in() {
        let f = Fixture::new("defaults");
        let spec = f.normalize(VmSpec::default()).unwrap();
        assert_eq!(spec.vcpus, DEFAULT_VCPUS);
        assert_eq!(spec.memory_mib, DEFAULT_MEMORY_MIB);
        assert_eq!(spec.kernel, f.path("vmlinux"));
        assert_eq!(spec.initrd, f.path("initrd"));
        assert!(spec.network.is_some());
    }

    #[test]
    fn host_files_outside_the_policy_are_permission_denied() {
        let f = Fixture::new("policy");
        let link = f.root.join("shadow-link");
        std::os::unix::fs::symlink("/etc/shadow", &link).unwrap();
        for path in ["/etc/shadow", &link.display().to_string(), &f.path("../x")] {
            for spec in [
                VmSpec {
                    kernel: path.to_string(),
                    ..Default::default()
                },
                VmSpec {
                    disks: vec![Disk {
                        path: path.to_string(),
                        read_only: true,
                        rate_limit: None,
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            ] {
                let err = f.normalize(spec).unwrap_err();
                assert_eq!(err.code(), Code::PermissionDenied, "{path}: {err:?}");
                assert!(err.message().contains("--allow-path"), "{}", err.message());
            }
        }
    }

    #[test]
    fn limits_that_leave_no_room_to_run_are_refused() {
        let f = Fixture::new("limits");
        let with = |limits: Limits| VmSpec {
            memory_mib: 512,
            vcpus: 2,
            limits: Some(limits),
            ..Default::default()
        };
        for (limits, needle) in [
            (
                Limits {
                    memory_max_mib: 256,
                    ..Default::default()
                },
                "memory_max_mib",
            ),
            (
                Limits {
                    cpu_millis: 10,
                    ..Default::default()
                },
                "cpu_millis",
            ),
            (
                Limits {
                    pids_max: 3,
                    ..Default::default()
                },
                "pids_max",
            ),
            (
                Limits {
                    open_files: 8,
                    ..Default::default()
                },
                "open_files",
            ),
        ] {
            let err = f.normalize(with(limits)).unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument);
            assert!(err.message().contains(needle), "{}", err.message());
        }
        assert!(f
            .normalize(with(Limits {
                memory_max_mib: 1024,
                cpu_millis: 500,
                ..Default::default()
            }))
            .is_ok());
    }

    #[test]
    fn every_bad_field_is_invalid_argument_naming_the_field() {
        let f = Fixture::new("fields");
        let cases: Vec<(VmSpec, &str)> = vec![
            (
                VmSpec {
                    vcpus: 33,
                    ..Default::default()
                },
                "vcpus",
            ),
            (
                VmSpec {
                    memory_mib: 8,
                    ..Default::default()
                },
                "memory_mib",
            ),
            (
                VmSpec {
                    kernel: f.path("nonexistent/vmlinux"),
                    ..Default::default()
                },
                "kernel",
            ),
            (
                VmSpec {
                    kernel: "relative/vmlinux".into(),
                    ..Default::default()
                },
                "absolute",
            ),
            (
                VmSpec {
                    initrd: f.path("dir"),
                    ..Default::default()
                },
                "not a regular file",
            ),
            (
                VmSpec {
                    rootfs: f.path("nonexistent.ext4"),
                    ..Default::default()
                },
                "rootfs",
            ),
            (
                VmSpec {
                    name: "bad name".into(),
                    ..Default::default()
                },
                "name",
            ),
            (
                VmSpec {
                    name: "-x".into(),
                    ..Default::default()
                },
                "name",
            ),
            (
                VmSpec {
                    command: vec![String::new()],
                    ..Default::default()
                },
                "command",
            ),
            (
                VmSpec {
                    workdir: "tmp".into(),
                    ..Default::default()
                },
                "workdir",
            ),
            (
                VmSpec {
                    env: [("A=B".to_string(), "c".to_string())].into(),
                    ..Default::default()
                },
                "env",
            ),
            (
                VmSpec {
                    network: Some(husk_proto::v1::Network {
                        mode: 7,
                        mac: String::new(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                "network.mode",
            ),
            (
                VmSpec {
                    network: Some(husk_proto::v1::Network {
                        mode: 1,
                        mac: "01:00:00:00:00:01".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                "network.mac",
            ),
            (
                VmSpec {
                    disks: vec![Disk {
                        path: f.path("nonexistent.img"),
                        read_only: false,
                        rate_limit: None,
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                "disks[0]",
            ),
        ];
        for (spec, needle) in cases {
            let err = f.normalize(spec.clone()).unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{spec:?}");
            assert!(
                err.message().contains(needle),
                "{needle}: {}",
                err.message()
            );
        }
    }

    #[test]
    fn macs_parse_and_multicast_is_refused() {
        assert_eq!(parse_mac("06:00:0a:0B:0c:0d"), Some([6, 0, 10, 11, 12, 13]));
        assert_eq!(parse_mac("06:00:0a:0b:0c"), None);
        assert_eq!(parse_mac("06:00:0a:0b:0c:0d:0e"), None);
        assert_eq!(parse_mac("6:00:0a:0b:0c:0d"), None);
        assert_eq!(parse_mac("07:00:0a:0b:0c:0d"), None);
    }

    fn tap(
        ports: Vec<husk_proto::v1::PortMapping>,
        allow: &[&str],
        deny: &[&str],
    ) -> husk_proto::v1::Network {
        husk_proto::v1::Network {
            mode: network::Mode::Tap as i32,
            ports,
            egress: Some(Egress {
                allow: allow.iter().map(|s| s.to_string()).collect(),
                deny: deny.iter().map(|s| s.to_string()).collect(),
                host_access: false,
            }),
            ..Default::default()
        }
    }

    fn port(
        host_ip: &str,
        host_port: u32,
        guest_port: u32,
        udp: bool,
    ) -> husk_proto::v1::PortMapping {
        husk_proto::v1::PortMapping {
            host_ip: host_ip.into(),
            host_port,
            guest_port,
            protocol: if udp {
                port_mapping::Protocol::Udp as i32
            } else {
                port_mapping::Protocol::Tcp as i32
            },
        }
    }

    #[test]
    fn a_joined_namespace_must_be_a_named_one_and_takes_no_husk_policy() {
        let f = Fixture::new("netns");
        let netns = |path: &str, interface: &str| VmSpec {
            network: Some(husk_proto::v1::Network {
                mode: network::Mode::Netns as i32,
                netns: path.into(),
                netns_interface: interface.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let ok = f.normalize(netns("/var/run/netns/cni-1234", "")).unwrap();
        assert_eq!(ok.network.unwrap().netns_interface, "eth0");
        for (spec, needle) in [
            (netns("/proc/1/ns/net", ""), "network.netns"),
            (netns("/run/netns/../x", ""), "network.netns"),
            (netns("/run/netns/a", "eth0;x"), "network.netns_interface"),
            (
                netns("/run/netns/a", "a-very-long-name0"),
                "network.netns_interface",
            ),
        ] {
            let err = f.normalize(spec).unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument);
            assert!(err.message().contains(needle), "{}", err.message());
        }
        let mut with_ports = netns("/run/netns/a", "");
        with_ports.network.as_mut().unwrap().ports = vec![port("", 8080, 80, false)];
        let err = f.normalize(with_ports).unwrap_err();
        assert!(
            err.message().contains("need network.mode MODE_TAP"),
            "{}",
            err.message()
        );
        let mut tap_with_netns = netns("/run/netns/a", "");
        tap_with_netns.network.as_mut().unwrap().mode = network::Mode::Tap as i32;
        let err = f.normalize(tap_with_netns).unwrap_err();
        assert!(
            err.message().contains("need network.mode MODE_NETNS"),
            "{}",
            err.message()
        );
    }

    #[test]
    fn published_ports_and_egress_cidrs_are_checked_and_stored_normalized() {
        let f = Fixture::new("net");
        let spec = VmSpec {
            network: Some(tap(
                vec![port("", 8080, 80, false), port("127.0.0.1", 8080, 80, true)],
                &["10.1.2.3/8"],
                &["192.0.2.9"],
            )),
            ..Default::default()
        };
        let network = f.normalize(spec).unwrap().network.unwrap();
        let egress = network.egress.unwrap();
        assert_eq!(egress.allow, ["10.0.0.0/8"]);
        assert_eq!(egress.deny, ["192.0.2.9/32"]);
        assert_eq!(network.ports.len(), 2);
    }

    #[test]
    fn a_bad_published_port_or_cidr_is_refused_naming_the_field() {
        let f = Fixture::new("net");
        let cases = [
            (tap(vec![port("", 0, 80, false)], &[], &[]), "network.ports[0].host_port: 0 is out of range (1..65535)"),
            (tap(vec![port("", 80, 65536, false)], &[], &[]), "network.ports[0].guest_port: 65536 is out of range"),
            (tap(vec![port("x", 80, 80, false)], &[], &[]), "network.ports[0].host_ip: \"x\" is not an IPv4 address"),
            (
                tap(vec![port("", 80, 80, false), port("", 80, 81, false)], &[], &[]),
                "network.ports[1]: published port 80:81/tcp: host port 80/tcp is published twice",
            ),
            (
                tap(vec![port("192.0.2.77", 80, 80, false)], &[], &[]),
                "network.ports[0]: published port 192.0.2.77:80:80/tcp: 192.0.2.77 is not an address of this host",
            ),
            (tap(vec![], &["10.0.0.0/33"], &[]), "network.egress.allow[0]: \"10.0.0.0/33\" is not an IPv4 CIDR"),
            (tap(vec![], &[], &["ten"]), "network.egress.deny[0]: \"ten\" is not an IPv4 CIDR"),
            (
                husk_proto::v1::Network {
                    ports: vec![port("", 80, 80, false)],
                    ..Default::default()
                },
                "need network.mode MODE_TAP",
            ),
        ];
        for (network, want) in cases {
            let err = f
                .normalize(VmSpec {
                    network: Some(network),
                    ..Default::default()
                })
                .unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument);
            assert!(
                err.message().contains(want),
                "{} lacks {want}",
                err.message()
            );
        }
    }
}
