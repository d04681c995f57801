//! Thin wrappers over the fd system calls the agent's sessions need.

use std::io;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A close-on-exec pipe: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: fds has room for the two descriptors pipe2 writes.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: both fds are fresh and ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sets O_NONBLOCK on the open file description behind `fd`.
pub fn set_nonblocking(fd: &impl AsRawFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd we hold; no memory is passed.
    unsafe {
        let flags = check(libc::fcntl(fd.as_raw_fd(), libc::F_GETFL))?;
        check(libc::fcntl(
            fd.as_raw_fd(),
            libc::F_SETFL,
            flags | libc::O_NONBLOCK,
        ))?;
    }
    Ok(())
}

/// One read; EINTR is retried.
pub fn read(fd: &impl AsRawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: buf is valid for buf.len() bytes of writes.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// One write; EINTR is retried.
pub fn write(fd: &impl AsRawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: buf is valid for buf.len() bytes of reads.
        let n = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// poll(2) without a timeout; EINTR is retried. Fills each entry's `revents`.
pub fn poll(fds: &mut [libc::pollfd]) -> io::Result<()> {
    loop {
        // SAFETY: fds is a valid array of fds.len() pollfd entries.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if rc >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Waits until `fd` is readable (or hung up).
pub fn wait_readable(fd: &impl AsRawFd) -> io::Result<()> {
    let mut fds = [libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    poll(&mut fds)
}

/// shutdown(2) of both directions of a socket: wakes every thread blocked on it.
pub fn shutdown_socket(sock: &impl AsRawFd) {
    // SAFETY: shutdown on a socket we hold; an error (already shut down) is harmless.
    unsafe { libc::shutdown(sock.as_raw_fd(), libc::SHUT_RDWR) };
}

/// SO_RCVTIMEO; `None` clears it.
pub fn set_read_timeout(sock: &impl AsRawFd, limit: Option<Duration>) -> io::Result<()> {
    set_timeout(sock, libc::SO_RCVTIMEO, limit)
}

/// SO_SNDTIMEO; `None` clears it.
pub fn set_write_timeout(sock: &impl AsRawFd, limit: Option<Duration>) -> io::Result<()> {
    set_timeout(sock, libc::SO_SNDTIMEO, limit)
}

fn set_timeout(
    sock: &impl AsRawFd,
    option: libc::c_int,
    limit: Option<Duration>,
) -> io::Result<()> {
    let limit = limit.unwrap_or_default();
    let tv = libc::timeval {
        tv_sec: limit.as_secs() as _,
        tv_usec: limit.subsec_micros() as _,
    };
    // SAFETY: tv is a valid timeval of the size given.
    check(unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            std::ptr::addr_of!(tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    })?;
    Ok(())
}
