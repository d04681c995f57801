//! The filesystems every guest needs before the application runs, and a console on fds 0..2.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, IntoRawFd};

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::mount::MountFlags;

struct Mount {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MountFlags,
    data: &'static CStr,
}

const NOSUID_NODEV: MountFlags = MountFlags::NOSUID.union(MountFlags::NODEV);

/// In mount order: /dev before /dev/pts, and so on.
const MOUNTS: &[Mount] = &[
    Mount {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV.union(MountFlags::NOEXEC),
        data: c"",
    },
    Mount {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV.union(MountFlags::NOEXEC),
        data: c"",
    },
    Mount {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MountFlags::NOSUID,
        data: c"mode=0755",
    },
    Mount {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MountFlags::NOSUID.union(MountFlags::NOEXEC),
        data: c"gid=5,mode=620,ptmxmode=666",
    },
    Mount {
        source: "tmpfs",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: c"mode=1777",
    },
    Mount {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: c"mode=1777",
    },
    Mount {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: c"mode=0755",
    },
    Mount {
        source: "cgroup2",
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: NOSUID_NODEV.union(MountFlags::NOEXEC),
        data: c"",
    },
];

/// Mounts the standard filesystems. A target that is already mounted (EBUSY: the kernel mounts
/// devtmpfs itself for a disk root) is fine; other failures are reported and skipped, because a
/// guest without, say, /sys can still run most applications.
pub fn mount_standard_filesystems() -> Vec<String> {
    let mut warnings = Vec::new();
    for m in MOUNTS {
        if let Err(e) = mount_one(m) {
            warnings.push(format!("cannot mount {} on {}: {e}", m.fstype, m.target));
        }
    }
    warnings
}

fn mount_one(m: &Mount) -> io::Result<()> {
    std::fs::create_dir_all(m.target)?;
    match rustix::mount::mount(m.source, m.target, m.fstype, m.flags, m.data) {
        Ok(()) | Err(Errno::BUSY) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Makes sure fds 0, 1 and 2 are the console. The kernel opens /dev/console for PID 1 only if
/// the root filesystem has that node; an initramfs built without root privileges does not.
pub fn ensure_console_stdio() {
    use rustix::stdio;
    // F_GETFD on a closed fd fails with EBADF: it only reads the fd table.
    let stdio_open = [stdio::stdin(), stdio::stdout(), stdio::stderr()]
        .into_iter()
        .all(|fd| rustix::io::fcntl_getfd(fd).is_ok());
    if stdio_open {
        return;
    }
    // No O_CLOEXEC, as before: the copies on 0..2 are what every process inherits.
    let Ok(console) = rustix::fs::open(
        c"/dev/console",
        OFlags::RDWR | OFlags::NOCTTY,
        Mode::empty(),
    ) else {
        return;
    };
    // dup2 onto each of 0..2 that the console fd is not itself (rustix skips that case).
    let _ = stdio::dup2_stdin(&console);
    let _ = stdio::dup2_stdout(&console);
    let _ = stdio::dup2_stderr(&console);
    // The console fd may itself be one of 0..2 (the lowest free fd): that one must stay open.
    if console.as_raw_fd() <= 2 {
        let _ = console.into_raw_fd();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_mount_keeps_the_flags_and_data_it_had_with_libc() {
        let nosuid_nodev = libc::MS_NOSUID | libc::MS_NODEV;
        let expected: [(&str, libc::c_ulong, &str); 8] = [
            ("/proc", nosuid_nodev | libc::MS_NOEXEC, ""),
            ("/sys", nosuid_nodev | libc::MS_NOEXEC, ""),
            ("/dev", libc::MS_NOSUID, "mode=0755"),
            (
                "/dev/pts",
                libc::MS_NOSUID | libc::MS_NOEXEC,
                "gid=5,mode=620,ptmxmode=666",
            ),
            ("/dev/shm", nosuid_nodev, "mode=1777"),
            ("/tmp", nosuid_nodev, "mode=1777"),
            ("/run", nosuid_nodev, "mode=0755"),
            ("/sys/fs/cgroup", nosuid_nodev | libc::MS_NOEXEC, ""),
        ];
        assert_eq!(MOUNTS.len(), expected.len());
        for (m, (target, flags, data)) in MOUNTS.iter().zip(expected) {
            assert_eq!(m.target, target);
            assert_eq!(libc::c_ulong::from(m.flags.bits()), flags, "{target}");
            assert_eq!(m.data.to_str(), Ok(data), "{target}");
        }
    }
}
