//! Starting husk-vmm from a front end.

use std::io::{self, Write};
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Lets `fd` survive the exec into the child, at the same number (a tap handed to husk-vmm).
pub fn inherit_fd(cmd: &mut Command, fd: RawFd) {
    // SAFETY: runs in the child between fork and exec, where only async-signal-safe calls may
    // be made: fcntl is one, and nothing here allocates. `fd` is open in the parent at spawn
    // (the caller holds it), so it is open in the child while borrowed.
    unsafe {
        cmd.pre_exec(move || {
            let fd = BorrowedFd::borrow_raw(fd);
            let flags = rustix::io::fcntl_getfd(fd)?;
            rustix::io::fcntl_setfd(fd, flags - rustix::io::FdFlags::CLOEXEC)?;
            Ok(())
        });
    }
}

/// A pipe holding `cmdline` (then closed for writing), for husk-vmm's
/// `--cmdline-file /proc/self/fd/N`: the guest command line carries the application's argv and
/// environment, which must not appear on any process's command line (`/proc/PID/cmdline` is
/// readable by every local user). The caller passes the returned read end to the child.
pub fn cmdline_pipe(cmdline: &str) -> io::Result<OwnedFd> {
    let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    // A command line is far below a pipe's 64 KiB buffer: the write never blocks.
    std::fs::File::from(write).write_all(format!("{cmdline}\n").as_bytes())?;
    Ok(read)
}
