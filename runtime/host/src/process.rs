//! Starting husk-vmm from a front end.

use std::io;
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Lets `fd` survive the exec into the child, at the same number (a tap handed to husk-vmm).
pub fn inherit_fd(cmd: &mut Command, fd: RawFd) {
    // SAFETY: runs in the child between fork and exec; fcntl is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
