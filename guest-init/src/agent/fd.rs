//! Thin wrappers over the fd system calls the agent's sessions need: EINTR retried, errors as
//! `std::io::Error`.

use std::io;
use std::os::unix::io::{AsFd, OwnedFd};
use std::time::Duration;

use rustix::event::{PollFd, PollFlags};
use rustix::fs::OFlags;
use rustix::io::Errno;
use rustix::net::sockopt::{self, Timeout};
use rustix::pipe::PipeFlags;

/// Runs `call` until it is not interrupted by a signal.
fn retry<T>(mut call: impl FnMut() -> rustix::io::Result<T>) -> io::Result<T> {
    loop {
        match call() {
            Err(Errno::INTR) => {}
            result => return result.map_err(io::Error::from),
        }
    }
}

/// A close-on-exec pipe: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::pipe::pipe_with(PipeFlags::CLOEXEC)?)
}

/// Sets O_NONBLOCK on the open file description behind `fd`.
pub fn set_nonblocking(fd: &impl AsFd) -> io::Result<()> {
    let flags = rustix::fs::fcntl_getfl(fd)?;
    rustix::fs::fcntl_setfl(fd, flags | OFlags::NONBLOCK)?;
    Ok(())
}

/// One read; EINTR is retried.
pub fn read(fd: &impl AsFd, buf: &mut [u8]) -> io::Result<usize> {
    retry(|| rustix::io::read(fd, &mut *buf))
}

/// One write; EINTR is retried.
pub fn write(fd: &impl AsFd, buf: &[u8]) -> io::Result<usize> {
    retry(|| rustix::io::write(fd, buf))
}

/// poll(2) without a timeout; EINTR is retried. Fills each entry's `revents`.
pub fn poll(fds: &mut [PollFd<'_>]) -> io::Result<()> {
    retry(|| rustix::event::poll(fds, None)).map(drop)
}

/// Waits until `fd` is readable (or hung up).
pub fn wait_readable(fd: &impl AsFd) -> io::Result<()> {
    poll(&mut [PollFd::new(fd, PollFlags::IN)])
}

/// shutdown(2) of both directions of a socket: wakes every thread blocked on it.
pub fn shutdown_socket(sock: &impl AsFd) {
    // An error (already shut down) is harmless.
    let _ = rustix::net::shutdown(sock, rustix::net::Shutdown::Both);
}

/// SO_RCVTIMEO; `None` clears it.
pub fn set_read_timeout(sock: &impl AsFd, limit: Option<Duration>) -> io::Result<()> {
    set_timeout(sock, Timeout::Recv, limit)
}

/// SO_SNDTIMEO; `None` clears it.
pub fn set_write_timeout(sock: &impl AsFd, limit: Option<Duration>) -> io::Result<()> {
    set_timeout(sock, Timeout::Send, limit)
}

fn set_timeout(sock: &impl AsFd, option: Timeout, limit: Option<Duration>) -> io::Result<()> {
    // A zero duration means "no timeout" to the kernel, which is what `None` asks rustix for
    // (rustix refuses Some(ZERO)).
    let limit = limit.filter(|l| !l.is_zero());
    Ok(sockopt::set_socket_timeout(sock, option, limit)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn timeouts_are_set_and_cleared_on_a_socket() {
        let (a, _b) = UnixStream::pair().unwrap();
        set_read_timeout(&a, Some(Duration::from_secs(2))).unwrap();
        assert_eq!(a.read_timeout().unwrap(), Some(Duration::from_secs(2)));
        set_write_timeout(&a, Some(Duration::from_millis(1500))).unwrap();
        assert_eq!(
            a.write_timeout().unwrap(),
            Some(Duration::from_millis(1500))
        );
        set_read_timeout(&a, None).unwrap();
        assert_eq!(a.read_timeout().unwrap(), None);
    }

    #[test]
    fn a_nonblocking_pipe_reports_would_block_when_empty() {
        let (r, w) = pipe().unwrap();
        set_nonblocking(&r).unwrap();
        let mut buf = [0u8; 4];
        let e = read(&r, &mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert_eq!(write(&w, b"hi").unwrap(), 2);
        wait_readable(&r).unwrap();
        assert_eq!(read(&r, &mut buf).unwrap(), 2);
        assert_eq!(&buf[..2], b"hi");
    }
}
