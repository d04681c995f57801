//! `husk.root=/dev/vdX`: the application's root filesystem is that disk (ext4) instead of the
//! initramfs. PID 1 stays in the initramfs; the disk is mounted at [`ROOT_MOUNT`] with its own
//! /proc, /sys, /dev and /tmp, and the application runs chrooted into it. Any ext4 image works
//! as a root this way, including ones that do not contain husk-init (container images).

use std::ffi::CString;
use std::io;

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

fn c(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn mount(source: &str, target: &str, fstype: &str, flags: libc::c_ulong) -> io::Result<()> {
    std::fs::create_dir_all(target)?;
    let (source, target, fstype) = (c(source)?, c(target)?, c(fstype)?);
    // SAFETY: valid NUL-terminated strings that outlive the call; null data is allowed.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Mounts `device` (ext4) at [`ROOT_MOUNT`] and gives it the kernel filesystems.
pub fn mount_root(device: &str) -> Result<(), String> {
    mount(device, ROOT_MOUNT, "ext4", 0)
        .map_err(|e| format!("cannot mount root disk {device} (ext4): {e}"))?;
    let inner = |p: &str| format!("{ROOT_MOUNT}{p}");
    let steps: [(&str, String, &str, libc::c_ulong); 5] = [
        (
            "proc",
            inner("/proc"),
            "proc",
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        ),
        ("/sys", inner("/sys"), "", libc::MS_BIND | libc::MS_REC),
        ("/dev", inner("/dev"), "", libc::MS_BIND | libc::MS_REC),
        (
            "tmpfs",
            inner("/tmp"),
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
        ),
        (
            "tmpfs",
            inner("/run"),
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
        ),
    ];
    for (source, target, fstype, flags) in steps {
        mount(source, &target, fstype, flags).map_err(|e| format!("cannot mount {target}: {e}"))?;
    }
    Ok(())
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
}
