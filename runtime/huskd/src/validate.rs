//! Checks a VmSpec from a client and fills in defaults. Everything refused here is
//! INVALID_ARGUMENT with a message that names the field.

use std::path::Path;

use husk_proto::v1::{network, Disk, VmSpec};
use tonic::Status;

/// vCPU range, as husk-vmm accepts it.
pub const VCPUS: std::ops::RangeInclusive<u32> = 1..=32;
/// Memory range in MiB, as husk-vmm accepts it.
pub const MEMORY_MIB: std::ops::RangeInclusive<u32> = 64..=262_144;
pub const DEFAULT_VCPUS: u32 = 1;
pub const DEFAULT_MEMORY_MIB: u32 = 256;
/// More disks than this would not fit the VMM's MMIO slots with net, vsock and rng.
pub const MAX_DISKS: usize = 8;

/// Files the daemon uses when the spec leaves kernel or initrd empty.
pub struct Defaults<'a> {
    pub kernel: &'a Path,
    pub initrd: &'a Path,
}

/// Validates `spec` and returns it with defaults filled in (paths made absolute).
pub fn normalize(mut spec: VmSpec, defaults: &Defaults<'_>) -> Result<VmSpec, Status> {
    if !spec.name.is_empty() {
        check_name(&spec.name)?;
    }
    spec.kernel = file_field("kernel", &spec.kernel, Some(defaults.kernel))?;
    spec.initrd = file_field("initrd", &spec.initrd, Some(defaults.initrd))?;
    if !spec.rootfs.is_empty() {
        spec.rootfs = file_field("rootfs", &spec.rootfs, None)?;
    }
    if spec.disks.len() > MAX_DISKS {
        return Err(invalid(format!(
            "disks: {} given, at most {MAX_DISKS}",
            spec.disks.len()
        )));
    }
    for (i, disk) in spec.disks.iter_mut().enumerate() {
        *disk = Disk {
            path: file_field(&format!("disks[{i}].path"), &disk.path, None)?,
            read_only: disk.read_only,
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
    if spec.extra_cmdline.contains('\0') || spec.extra_cmdline.contains('\n') {
        return Err(invalid("extra_cmdline: must be one line without NUL bytes"));
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
    Ok(spec)
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

/// Parses `xx:xx:xx:xx:xx:xx`; a multicast address is refused.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    (parts.next().is_none() && mac[0] & 1 == 0).then_some(mac)
}

fn file_field(field: &str, value: &str, default: Option<&Path>) -> Result<String, Status> {
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
    husk_host::paths::require_file(path, &what, "").map_err(invalid)?;
    Ok(path.display().to_string())
}

fn invalid(message: impl Into<String>) -> Status {
    Status::invalid_argument(message.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn defaults() -> Defaults<'static> {
        Defaults {
            kernel: Path::new("/proc/self/status"),
            initrd: Path::new("/proc/self/stat"),
        }
    }

    #[test]
    fn defaults_are_filled_in() {
        let spec = normalize(VmSpec::default(), &defaults()).unwrap();
        assert_eq!(spec.vcpus, DEFAULT_VCPUS);
        assert_eq!(spec.memory_mib, DEFAULT_MEMORY_MIB);
        assert_eq!(spec.kernel, "/proc/self/status");
        assert_eq!(spec.initrd, "/proc/self/stat");
        assert!(spec.network.is_some());
    }

    #[test]
    fn every_bad_field_is_invalid_argument_naming_the_field() {
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
                    kernel: "/nonexistent/vmlinux".into(),
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
                    initrd: "/".into(),
                    ..Default::default()
                },
                "not a file",
            ),
            (
                VmSpec {
                    rootfs: "/nonexistent.ext4".into(),
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
                    }),
                    ..Default::default()
                },
                "network.mac",
            ),
            (
                VmSpec {
                    disks: vec![Disk {
                        path: "/nonexistent.img".into(),
                        read_only: false,
                    }],
                    ..Default::default()
                },
                "disks[0]",
            ),
        ];
        for (spec, needle) in cases {
            let err = normalize(spec.clone(), &defaults()).unwrap_err();
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
}
