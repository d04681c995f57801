//! `husk.root=/dev/vdX`: the application's root filesystem is that disk (ext4) instead of the
//! initramfs. PID 1 stays in the initramfs; the disk is mounted at [`ROOT_MOUNT`] with its own
//! /proc, /sys, /dev and /tmp, and the application runs chrooted into it. Any ext4 image works
//! as a root this way, including ones that do not contain husk-init (container images).

use std::io;

use rustix::mount::MountFlags;

/// Where the application's root disk is mounted.
pub const ROOT_MOUNT: &str = "/run/husk-root";
const PARAM: &str = "husk.root=";

/// The root device named on the kernel command line, if any.
pub fn root_device(cmdline: &str) -> Option<&str> {
    cmdline
        .split_ascii_whitespace()
        .find_map(|p| p.strip_prefix(PARAM))
        .filter(|d| !d.is_empty())
}

/// mount(2) with no data (a bind mount passes an empty file system type, as before).
pub fn mount(source: &str, target: &str, fstype: &str, flags: MountFlags) -> io::Result<()> {
    std::fs::create_dir_all(target)?;
    rustix::mount::mount(source, target, fstype, flags, None)?;
    Ok(())
}

/// Why the application's root could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RootError {
    #[error("cannot mount root disk {device} (ext4)")]
    Disk {
        device: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot mount {target}")]
    Inner {
        target: String,
        #[source]
        source: io::Error,
    },
}

/// The kernel filesystems of a root mounted at `root`, in mount order: (source, target, type,
/// flags).
fn inner_mounts(root: &str) -> [(&'static str, String, &'static str, MountFlags); 5] {
    let inner = |p: &str| format!("{root}{p}");
    let nosuid_nodev = MountFlags::NOSUID | MountFlags::NODEV;
    let bind_rec = MountFlags::BIND | MountFlags::REC;
    [
        (
            "proc",
            inner("/proc"),
            "proc",
            nosuid_nodev | MountFlags::NOEXEC,
        ),
        ("/sys", inner("/sys"), "", bind_rec),
        ("/dev", inner("/dev"), "", bind_rec),
        ("tmpfs", inner("/tmp"), "tmpfs", nosuid_nodev),
        ("tmpfs", inner("/run"), "tmpfs", nosuid_nodev),
    ]
}

/// Mounts `device` (ext4) at [`ROOT_MOUNT`] and gives it the kernel filesystems.
pub fn mount_root(device: &str) -> Result<(), RootError> {
    mount_root_at(device, ROOT_MOUNT)
}

/// Mounts `device` (ext4) at `target` and gives it the kernel filesystems: the application's
/// root, or a pod container's (see `agent::containers`).
pub fn mount_root_at(device: &str, target: &str) -> Result<(), RootError> {
    mount(device, target, "ext4", MountFlags::empty()).map_err(|source| RootError::Disk {
        device: device.to_string(),
        source,
    })?;
    for (source, inner, fstype, flags) in inner_mounts(target) {
        mount(source, &inner, fstype, flags).map_err(|source| RootError::Inner {
            target: inner,
            source,
        })?;
    }
    Ok(())
}

/// Mounts the virtio-fs file system `share.tag` at its guest path, inside `root` when the
/// application has one (the directory is created if missing). `nosuid,nodev`: a shared host
/// directory must not carry set-uid programs or device nodes into the guest's privileges.
pub fn mount_share(share: &husk_init::shares::SharedMount, root: Option<&str>) -> io::Result<()> {
    let target = format!("{}{}", root.unwrap_or(""), share.guest_path);
    let mut flags = MountFlags::NOSUID | MountFlags::NODEV;
    if share.read_only {
        flags |= MountFlags::RDONLY;
    }
    mount(&share.tag, &target, "virtiofs", flags)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_root_parameter() {
        assert_eq!(
            root_device("console=ttyS0 husk.root=/dev/vda quiet"),
            Some("/dev/vda")
        );
        assert_eq!(root_device("console=ttyS0 husk.root= quiet"), None);
        assert_eq!(root_device("root=/dev/vda"), None);
    }

    #[test]
    fn the_root_disk_mounts_keep_the_flags_they_had_with_libc() {
        let nosuid_nodev = libc::MS_NOSUID | libc::MS_NODEV;
        let bind_rec = libc::MS_BIND | libc::MS_REC;
        let expected = [
            nosuid_nodev | libc::MS_NOEXEC,
            bind_rec,
            bind_rec,
            nosuid_nodev,
            nosuid_nodev,
        ];
        for ((_, target, _, flags), want) in inner_mounts(ROOT_MOUNT).into_iter().zip(expected) {
            assert_eq!(libc::c_ulong::from(flags.bits()), want, "{target}");
        }
        assert_eq!(inner_mounts(ROOT_MOUNT)[1].1, "/run/husk-root/sys");
    }
}
