//! Reading a control connection with recvmsg, so that a request can carry file descriptors
//! (the disk image of `attach_disk` and its backing chain: the VMM is jailed and cannot open
//! host paths itself).
//!
//! Descriptors arrive as SCM_RIGHTS on the request's bytes and are collected until the request
//! is complete. At most [`MAX_FDS`] are kept per request: every further one is closed at once
//! and the request is refused. They are received close-on-exec (MSG_CMSG_CLOEXEC), and a
//! control message the buffer cannot hold is cut by the kernel, which then closes what did
//! not fit (MSG_CTRUNC), so nothing a client sends leaks descriptors into the VMM.

use std::io::{self, IoSliceMut, Read};
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;

use rustix::net::{recvmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags};

/// Descriptors one request may carry: a disk image and its backing chain.
pub const MAX_FDS: usize = husk_devices::virtio::block::format::MAX_CHAIN;

/// The descriptors received with the request being read.
#[derive(Debug, Default)]
pub struct ReceivedFds {
    fds: Vec<OwnedFd>,
    /// Descriptors closed because the request carried too many.
    refused: usize,
}

impl ReceivedFds {
    /// What came with the request just completed (then nothing is held any more): its
    /// descriptors, in order, or `Err(n)` when it carried `n` > [`MAX_FDS`] (all closed).
    pub fn take(&mut self) -> Result<Vec<OwnedFd>, usize> {
        let fds = std::mem::take(&mut self.fds);
        match std::mem::take(&mut self.refused) {
            0 => Ok(fds),
            refused => Err(refused + fds.len()),
        }
    }

    fn keep(&mut self, fd: OwnedFd) {
        if self.fds.len() < MAX_FDS && self.refused == 0 {
            self.fds.push(fd);
        } else {
            // Dropping it closes it.
            self.refused += 1;
        }
    }
}

/// A connection read through recvmsg; implements `Read` for the frame reader.
pub struct FdReader<'a> {
    pub stream: &'a UnixStream,
    pub fds: &'a mut ReceivedFds,
}

impl Read for FdReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // Room for a few: a client sending more sees its request refused, not cut silently.
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS + 4))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let msg = recvmsg(
            self.stream,
            &mut [IoSliceMut::new(buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT,
        )
        .map_err(io::Error::from)?;
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(fds) = message {
                for fd in fds {
                    self.fds.keep(fd);
                }
            }
        }
        if msg.flags.contains(ReturnFlags::CTRUNC) {
            self.fds.refused += 1;
        }
        Ok(msg.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    use std::io::IoSlice;
    use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

    fn send_with_fds(stream: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(32))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
        sendmsg(
            stream,
            &[IoSlice::new(bytes)],
            &mut control,
            SendFlags::empty(),
        )
        .unwrap();
    }

    fn cloexec(fd: &OwnedFd) -> bool {
        rustix::io::fcntl_getfd(fd)
            .unwrap()
            .contains(rustix::io::FdFlags::CLOEXEC)
    }

    #[test]
    fn fds_are_kept_close_on_exec_in_order_and_too_many_are_refused() {
        let (client, server) = UnixStream::pair().unwrap();
        server.set_nonblocking(true).unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        let mut fds = ReceivedFds::default();

        send_with_fds(&client, b"abcd", &[file.as_fd()]);
        let mut buf = [0u8; 4];
        let n = FdReader {
            stream: &server,
            fds: &mut fds,
        }
        .read(&mut buf)
        .unwrap();
        assert_eq!(&buf[..n], b"abcd");
        let got = fds.take().unwrap();
        assert_eq!(got.len(), 1);
        assert_ne!(got[0].as_raw_fd(), file.as_raw_fd());
        assert!(cloexec(&got[0]));
        assert!(fds.take().unwrap().is_empty(), "taken once");

        // A chain: three fds, in the order sent.
        let other = std::fs::File::open("/dev/zero").unwrap();
        send_with_fds(&client, b"hi", &[file.as_fd(), other.as_fd(), file.as_fd()]);
        let n = FdReader {
            stream: &server,
            fds: &mut fds,
        }
        .read(&mut buf)
        .unwrap();
        assert_eq!(n, 2);
        let got = fds.take().unwrap();
        assert_eq!(got.len(), 3);
        let ino = |fd: &OwnedFd| rustix::fs::fstat(fd).unwrap().st_rdev;
        assert_eq!(ino(&got[1]), rustix::fs::fstat(&other).unwrap().st_rdev);
        assert_ne!(ino(&got[0]), ino(&got[1]));

        // More than MAX_FDS: all closed, the request refused.
        let many: Vec<BorrowedFd<'_>> = (0..MAX_FDS + 2).map(|_| file.as_fd()).collect();
        send_with_fds(&client, b"ef", &many);
        let n = FdReader {
            stream: &server,
            fds: &mut fds,
        }
        .read(&mut buf)
        .unwrap();
        assert_eq!(n, 2);
        assert_eq!(fds.take().unwrap_err(), MAX_FDS + 2);
        assert!(fds.take().unwrap().is_empty());

        // Plain bytes carry nothing; no data is WouldBlock.
        std::io::Write::write_all(&mut &client, b"g").unwrap();
        let mut reader = FdReader {
            stream: &server,
            fds: &mut fds,
        };
        assert_eq!(reader.read(&mut buf).unwrap(), 1);
        let e = reader.read(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert!(fds.take().unwrap().is_empty());
    }
}
