//! Host files the VMM is given: a path, or an fd its parent opened for it.
//!
//! `/proc/self/fd/N` names an inherited fd: it is taken over (duplicated, close-on-exec)
//! instead of being opened again. That is what makes a jailed VMM work: its jail has no /proc,
//! and its unprivileged user could not open a root-owned disk image anyway, so the launcher
//! (husk run, huskd) opens the image with its own rights and passes the fd. Without a jail the
//! same argument behaves the same, so one command line works both ways.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{BorrowedFd, RawFd};
use std::path::Path;

/// The prefix that names an inherited fd.
pub const FD_PREFIX: &str = "/proc/self/fd/";

/// The fd number `path` names, if it is `/proc/self/fd/N` (N > 2).
pub fn inherited_fd(path: &Path) -> Option<RawFd> {
    let n = path.to_str()?.strip_prefix(FD_PREFIX)?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok().filter(|fd| *fd > 2)
}

/// Opens `path` as `options` say, or takes over the inherited fd it names; an inherited fd must
/// have been opened with write access when `write` is asked for.
pub fn open(path: &Path, options: &OpenOptions, write: bool) -> io::Result<File> {
    let Some(fd) = inherited_fd(path) else {
        return options.open(path);
    };
    // SAFETY: the fd is only borrowed for the two fcntl calls below, at set-up, while nothing
    // in this process closes inherited fds; if it is not open they fail with EBADF.
    let inherited = unsafe { BorrowedFd::borrow_raw(fd) };
    let flags = rustix::fs::fcntl_getfl(inherited).map_err(|e| {
        io::Error::other(format!(
            "fd {fd} was not passed to this process ({})",
            io::Error::from(e)
        ))
    })?;
    if write && flags & rustix::fs::OFlags::RWMODE == rustix::fs::OFlags::RDONLY {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("fd {fd} is open read-only"),
        ));
    }
    // A duplicate: the same path may be named twice, and the inherited number stays valid.
    Ok(File::from(rustix::io::fcntl_dupfd_cloexec(inherited, 3)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;

    #[test]
    fn only_proc_self_fd_numbers_name_inherited_fds() {
        assert_eq!(inherited_fd(Path::new("/proc/self/fd/7")), Some(7));
        assert_eq!(inherited_fd(Path::new("/proc/self/fd/2")), None);
        assert_eq!(inherited_fd(Path::new("/proc/self/fd/")), None);
        assert_eq!(inherited_fd(Path::new("/proc/self/fd/7/x")), None);
        assert_eq!(inherited_fd(Path::new("/proc/1/fd/7")), None);
        assert_eq!(inherited_fd(Path::new("/tmp/disk")), None);
    }

    #[test]
    fn an_inherited_fd_is_duplicated_and_its_access_mode_checked() {
        let path = std::env::temp_dir().join(format!("husk-host-files-{}", std::process::id()));
        std::fs::write(&path, b"data").unwrap();
        let ro = File::open(&path).unwrap();
        let name = format!("{FD_PREFIX}{}", ro.as_raw_fd());
        let mut opts = OpenOptions::new();
        opts.read(true).write(true);
        let err = open(Path::new(&name), &opts, true).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        let mut dup = open(Path::new(&name), &opts, false).unwrap();
        assert_ne!(dup.as_raw_fd(), ro.as_raw_fd());
        let mut text = String::new();
        dup.read_to_string(&mut text).unwrap();
        assert_eq!(text, "data");
        let mut rw = open(&path, &opts, true).unwrap();
        rw.write_all(b"!").unwrap();
        std::fs::remove_file(&path).unwrap();
    }
}
