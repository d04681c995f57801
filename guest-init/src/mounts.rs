//! The filesystems every guest needs before the application runs, and a console on fds 0..2.

use std::ffi::CString;
use std::io;

struct Mount {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: libc::c_ulong,
    data: &'static str,
}

const NOSUID_NODEV: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV;

/// In mount order: /dev before /dev/pts, and so on.
const MOUNTS: &[Mount] = &[
    Mount {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV | libc::MS_NOEXEC,
        data: "",
    },
    Mount {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV | libc::MS_NOEXEC,
        data: "",
    },
    Mount {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: libc::MS_NOSUID,
        data: "mode=0755",
    },
    Mount {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: libc::MS_NOSUID | libc::MS_NOEXEC,
        data: "gid=5,mode=620,ptmxmode=666",
    },
    Mount {
        source: "tmpfs",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: "mode=1777",
    },
    Mount {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: "mode=1777",
    },
    Mount {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: "mode=0755",
    },
    Mount {
        source: "cgroup2",
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: NOSUID_NODEV | libc::MS_NOEXEC,
        data: "",
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
    let c = |s: &str| CString::new(s).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
    let (source, target, fstype, data) = (c(m.source)?, c(m.target)?, c(m.fstype)?, c(m.data)?);
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            m.flags,
            data.as_ptr().cast(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    match io::Error::last_os_error() {
        e if e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
        e => Err(e),
    }
}

/// Makes sure fds 0, 1 and 2 are the console. The kernel opens /dev/console for PID 1 only if
/// the root filesystem has that node; an initramfs built without root privileges does not.
pub fn ensure_console_stdio() {
    // SAFETY: F_GETFD on a possibly closed fd only reads the fd table.
    let stdio_open = (0..3).all(|fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0);
    if stdio_open {
        return;
    }
    // SAFETY: the path is a valid NUL-terminated string.
    let fd = unsafe { libc::open(c"/dev/console".as_ptr(), libc::O_RDWR | libc::O_NOCTTY) };
    if fd < 0 {
        return;
    }
    for target in 0..3 {
        if fd != target {
            // SAFETY: fd is open; dup2 replaces target atomically.
            unsafe { libc::dup2(fd, target) };
        }
    }
    if fd > 2 {
        // SAFETY: fd is ours and no longer needed after the dups.
        unsafe { libc::close(fd) };
    }
}
