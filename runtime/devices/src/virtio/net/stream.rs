//! A connected stream socket as the host end of virtio-net, speaking the "qemu" socket protocol
//! of passt (rootless user-mode networking, `husk run --net=user`): each Ethernet frame is
//! preceded by its length as a 32-bit big-endian integer, with no virtio-net header.
//!
//! The socket is non-blocking and the device's event loop is edge-triggered, so both ways cope
//! with partial transfers:
//! - receiving, bytes are read into a buffer until it holds a whole frame; a frame cut across
//!   reads waits there for the rest. [`NetBackend::recv`] returns `WouldBlock` only after a read
//!   did, so the next readable edge is never missed;
//! - sending, a frame the socket takes only in part keeps its tail here; it goes out before the
//!   next frame, on the next send or receive. While a tail is pending, new frames are dropped
//!   (`WouldBlock`, counted as device errors), as a NIC drops frames when its queue is full.
//!
//! Both buffers are allocated once and bounded (one frame out, two frames in). A length prefix of
//! 0 or above the largest frame is a protocol error: framing is lost for good, so the link goes
//! down (logged once): nothing more is read, every frame from the guest is dropped. The peer
//! closing the socket takes the link down the same way. Nothing here panics on what the peer
//! sends.
//!
//! passt takes no offloads: frames to it are whole (checksummed, unsegmented), so the device
//! must not offer checksum offload or TSO on this backend ([`NetBackend::takes_vnet_offloads`]).
//! The 12-byte virtio-net header is stripped from each frame sent and a zeroed one is put in
//! front of each frame received.

use std::io;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::tap::{NetBackend, VNET_HDR_LEN};

/// Size of the length prefix of each frame.
const PREFIX_LEN: usize = 4;

/// Why the link went down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Down {
    /// The peer closed the connection.
    Closed,
    /// The peer sent a length prefix of 0 or above the largest frame.
    BadLength(u32),
    /// A read or write failed.
    Failed(i32),
}

/// The host end of a virtio-net device on a connected stream socket (see the module docs).
pub struct StreamBackend {
    fd: OwnedFd,
    /// Largest Ethernet frame either way (without virtio-net header).
    max_frame: usize,
    /// Received bytes: `inbuf[in_start..in_end]` not yet handed to the device.
    inbuf: Box<[u8]>,
    in_start: usize,
    in_end: usize,
    /// The frame being sent (prefix included); `out[out_pos..]` is not yet written.
    out: Vec<u8>,
    out_pos: usize,
    down: Option<Down>,
}

impl StreamBackend {
    /// Adopts `fd`, a connected stream socket, and makes it non-blocking. `max_frame` is the
    /// largest Ethernet frame (without virtio-net header) either way.
    pub fn new(fd: OwnedFd, max_frame: usize) -> io::Result<Self> {
        let flags = rustix::fs::fcntl_getfl(&fd)?;
        rustix::fs::fcntl_setfl(&fd, flags | rustix::fs::OFlags::NONBLOCK)?;
        let max_frame = max_frame.max(1);
        Ok(Self {
            fd,
            max_frame,
            inbuf: vec![0; 2 * (PREFIX_LEN + max_frame)].into_boxed_slice(),
            in_start: 0,
            in_end: 0,
            out: Vec::with_capacity(PREFIX_LEN + max_frame),
            out_pos: 0,
            down: None,
        })
    }

    /// Adopts an inherited socket fd.
    ///
    /// # Safety
    /// `fd` must be an open stream socket that nothing else will close.
    pub unsafe fn from_raw_fd(fd: RawFd, max_frame: usize) -> io::Result<Self> {
        // SAFETY: the caller guarantees fd is open and ours.
        Self::new(unsafe { OwnedFd::from_raw_fd(fd) }, max_frame)
    }

    /// Why the link is down, if it is.
    pub fn down(&self) -> Option<Down> {
        self.down
    }

    /// Takes the link down for good: buffered bytes are dropped, nothing more is read.
    fn go_down(&mut self, why: Down) {
        if self.down.is_none() {
            match why {
                Down::Closed => log::warn!("net: the user-mode network peer closed its socket"),
                Down::BadLength(n) => log::error!(
                    "net: the user-mode network peer sent a frame length of {n} (1..={} \
                     allowed); the link is down",
                    self.max_frame
                ),
                Down::Failed(errno) => log::error!(
                    "net: the user-mode network socket failed: {}; the link is down",
                    io::Error::from_raw_os_error(errno)
                ),
            }
        }
        self.down = Some(why);
        self.in_start = 0;
        self.in_end = 0;
        self.out.clear();
        self.out_pos = 0;
    }

    fn down_error(&self) -> io::Error {
        io::Error::new(io::ErrorKind::NotConnected, "the network link is down")
    }

    /// Writes what is left of the pending frame: `Ok(true)` when nothing is pending any more.
    fn flush(&mut self) -> io::Result<bool> {
        use rustix::net::SendFlags;
        while self.out_pos < self.out.len() {
            // send(2) with MSG_NOSIGNAL: a closed peer is an error here, never a SIGPIPE.
            match rustix::net::send(
                &self.fd,
                &self.out[self.out_pos..],
                SendFlags::NOSIGNAL | SendFlags::DONTWAIT,
            ) {
                Ok(0) => {
                    self.go_down(Down::Closed);
                    return Err(self.down_error());
                }
                Ok(n) => self.out_pos += n,
                Err(rustix::io::Errno::AGAIN) => return Ok(false),
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    self.go_down(Down::Failed(e.raw_os_error()));
                    return Err(e.into());
                }
            }
        }
        self.out.clear();
        self.out_pos = 0;
        Ok(true)
    }

    /// The next whole frame in the input buffer: its range in `inbuf`, without the prefix.
    /// `Err` on a bad length prefix (the link is then down).
    fn next_frame(&mut self) -> Result<Option<std::ops::Range<usize>>, Down> {
        let avail = &self.inbuf[self.in_start..self.in_end];
        let Some(prefix) = avail.get(..PREFIX_LEN) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
        if len == 0 || len as usize > self.max_frame {
            return Err(Down::BadLength(len));
        }
        let len = len as usize;
        if avail.len() < PREFIX_LEN + len {
            return Ok(None);
        }
        let start = self.in_start + PREFIX_LEN;
        self.in_start = start + len;
        if self.in_start == self.in_end {
            self.in_start = 0;
            self.in_end = 0;
        }
        Ok(Some(start..start + len))
    }

    /// Reads what the socket holds into the free end of the input buffer: `Ok(false)` when the
    /// socket had nothing (`WouldBlock`) or the link went down.
    fn fill(&mut self) -> bool {
        if self.in_start > 0 {
            // What is left is less than one frame (the buffer holds two): move it to the front.
            self.inbuf.copy_within(self.in_start..self.in_end, 0);
            self.in_end -= self.in_start;
            self.in_start = 0;
        }
        loop {
            let Some(free) = self.inbuf.get_mut(self.in_end..).filter(|f| !f.is_empty()) else {
                // Cannot happen (a frame in progress always fits); reading nothing is safe.
                return false;
            };
            match rustix::io::read(&self.fd, free) {
                Ok(0) => {
                    self.go_down(Down::Closed);
                    return false;
                }
                Ok(n) => {
                    self.in_end += n;
                    return true;
                }
                Err(rustix::io::Errno::AGAIN) => return false,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    self.go_down(Down::Failed(e.raw_os_error()));
                    return false;
                }
            }
        }
    }
}

impl NetBackend for StreamBackend {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.down.is_some() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        // A pending tail goes first; if it cannot, it waits for the next call (or send).
        let _ = self.flush();
        // Each turn either returns or reads new bytes; a frame needs at most a few reads, and a
        // socket with nothing left ends the loop with WouldBlock.
        while self.down.is_none() {
            match self.next_frame() {
                Ok(Some(range)) => {
                    let len = range.len();
                    let Some(dst) = buf.get_mut(..VNET_HDR_LEN + len) else {
                        // The device's buffer cannot hold it: a short frame, which it drops.
                        return Ok(0);
                    };
                    dst[..VNET_HDR_LEN].fill(0);
                    dst[VNET_HDR_LEN..].copy_from_slice(&self.inbuf[range]);
                    return Ok(VNET_HDR_LEN + len);
                }
                Ok(None) => {
                    if !self.fill() {
                        break;
                    }
                }
                Err(why) => self.go_down(why),
            }
        }
        Err(io::ErrorKind::WouldBlock.into())
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        if self.down.is_some() {
            return Err(self.down_error());
        }
        let payload = frame.get(VNET_HDR_LEN..).unwrap_or_default();
        if payload.is_empty() || payload.len() > self.max_frame {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "frame size out of range",
            ));
        }
        if !self.flush()? {
            // The socket is full: drop this frame, as a NIC with a full queue would.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        self.out.extend_from_slice(&len.to_be_bytes());
        self.out.extend_from_slice(payload);
        // Taken whole or in part: a part's tail stays pending, the frame counts as sent.
        self.flush()?;
        Ok(())
    }

    fn set_offloads(&mut self, _flags: u32) -> io::Result<()> {
        // No offload is ever offered on this backend (see takes_vnet_offloads).
        Ok(())
    }

    fn takes_vnet_offloads(&self) -> bool {
        false
    }

    fn fd(&self) -> Option<RawFd> {
        Some(self.fd.as_raw_fd())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    const MAX: usize = 1514;

    fn pair() -> (StreamBackend, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (StreamBackend::new(a.into(), MAX).unwrap(), b)
    }

    fn framed(payload: &[u8]) -> Vec<u8> {
        let mut v = (payload.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(payload);
        v
    }

    fn with_hdr(payload: &[u8]) -> Vec<u8> {
        let mut v = vec![0xaa; VNET_HDR_LEN];
        v.extend_from_slice(payload);
        v
    }

    fn would_block(r: io::Result<usize>) -> bool {
        matches!(r, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    #[test]
    fn whole_frames_arrive_with_a_zeroed_virtio_net_header() {
        let (mut backend, mut peer) = pair();
        let mut wire = framed(&[1, 2, 3, 4, 5]);
        wire.extend(framed(&[9; 60]));
        peer.write_all(&wire).unwrap();
        let mut buf = vec![0xff; 2048];
        assert_eq!(backend.recv(&mut buf).unwrap(), VNET_HDR_LEN + 5);
        assert_eq!(&buf[..VNET_HDR_LEN], &[0; VNET_HDR_LEN]);
        assert_eq!(&buf[VNET_HDR_LEN..VNET_HDR_LEN + 5], &[1, 2, 3, 4, 5]);
        assert_eq!(backend.recv(&mut buf).unwrap(), VNET_HDR_LEN + 60);
        assert_eq!(&buf[VNET_HDR_LEN..VNET_HDR_LEN + 60], &[9; 60]);
        assert!(would_block(backend.recv(&mut buf)));
        assert_eq!(backend.down(), None);
    }

    #[test]
    fn a_frame_split_across_reads_waits_for_its_rest() {
        let (mut backend, mut peer) = pair();
        let payload: Vec<u8> = (0..MAX).map(|i| i as u8).collect();
        let wire = framed(&payload);
        let mut buf = vec![0; 2048];
        // The prefix itself split, then the body in pieces.
        for cut in [&wire[..2], &wire[2..4], &wire[4..100], &wire[100..1000]] {
            peer.write_all(cut).unwrap();
            assert!(would_block(backend.recv(&mut buf)));
        }
        peer.write_all(&wire[1000..]).unwrap();
        assert_eq!(backend.recv(&mut buf).unwrap(), VNET_HDR_LEN + MAX);
        assert_eq!(&buf[VNET_HDR_LEN..VNET_HDR_LEN + MAX], &payload[..]);
        assert!(would_block(backend.recv(&mut buf)));
    }

    #[test]
    fn many_frames_in_a_row_all_arrive_in_order() {
        let (mut backend, peer) = pair();
        let mut buf = vec![0; 2048];
        // More than the input buffer holds at once, with partial frames at its edges.
        let sizes: Vec<usize> = (0..200).map(|i| 1 + (i * 37) % MAX).collect();
        let writer = {
            let sizes = sizes.clone();
            let mut peer = peer.try_clone().unwrap();
            std::thread::spawn(move || {
                for (i, &n) in sizes.iter().enumerate() {
                    peer.write_all(&framed(&vec![i as u8; n])).unwrap();
                }
            })
        };
        let mut got = 0;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while got < sizes.len() {
            assert!(std::time::Instant::now() < deadline, "stalled at {got}");
            match backend.recv(&mut buf) {
                Ok(n) => {
                    assert_eq!(n, VNET_HDR_LEN + sizes[got], "frame {got}");
                    assert!(buf[VNET_HDR_LEN..n].iter().all(|&b| b == got as u8));
                    got += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
        writer.join().unwrap();
        drop(peer);
    }

    #[test]
    fn sent_frames_lose_the_virtio_net_header_and_gain_a_length_prefix() {
        let (mut backend, mut peer) = pair();
        backend.send(&with_hdr(&[7; 42])).unwrap();
        backend.send(&with_hdr(&[8; 3])).unwrap();
        let mut got = vec![0; 4 + 42 + 4 + 3];
        peer.read_exact(&mut got).unwrap();
        let mut want = framed(&[7; 42]);
        want.extend(framed(&[8; 3]));
        assert_eq!(got, want);
    }

    #[test]
    fn a_partial_write_keeps_its_tail_and_drops_new_frames_until_it_is_out() {
        let (mut backend, mut peer) = pair();
        // Fill the socket until a frame goes out only in part.
        let frame = with_hdr(&[5; MAX]);
        let mut sent = 0;
        loop {
            match backend.send(&frame) {
                Ok(()) => sent += 1,
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
                    break;
                }
            }
            assert!(sent < 100_000, "the socket never filled");
        }
        assert!(backend.out_pos < backend.out.len(), "a tail is pending");
        // The peer drains everything: whole frames, the pending tail included, in order.
        let mut wire = Vec::new();
        let mut chunk = vec![0; 65536];
        peer.set_nonblocking(true).unwrap();
        let want = sent * (4 + MAX);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while wire.len() < want {
            assert!(
                std::time::Instant::now() < deadline,
                "{} of {want}",
                wire.len()
            );
            match peer.read(&mut chunk) {
                Ok(n) => wire.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // The tail goes out on the next call into the backend.
                    let _ = backend.recv(&mut [0; 2048]);
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(wire.len(), want);
        for f in wire.chunks(4 + MAX) {
            assert_eq!(f, &framed(&[5; MAX])[..]);
        }
        // Nothing pending any more: a new frame goes out whole.
        backend.send(&with_hdr(&[6; 10])).unwrap();
        let mut got = [0; 14];
        peer.set_nonblocking(false).unwrap();
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got[..], &framed(&[6; 10])[..]);
    }

    #[test]
    fn a_bad_length_prefix_takes_the_link_down_without_reading_further() {
        for bad in [0u32, MAX as u32 + 1, u32::MAX] {
            let (mut backend, mut peer) = pair();
            let mut wire = framed(&[1; 20]);
            wire.extend_from_slice(&bad.to_be_bytes());
            wire.extend_from_slice(&[0; 64]);
            peer.write_all(&wire).unwrap();
            let mut buf = vec![0; 2048];
            // The good frame before it still arrives.
            assert_eq!(backend.recv(&mut buf).unwrap(), VNET_HDR_LEN + 20);
            assert!(would_block(backend.recv(&mut buf)));
            assert_eq!(backend.down(), Some(Down::BadLength(bad)));
            // Later bytes are not read, and the guest's frames are refused.
            peer.write_all(&framed(&[2; 20])).unwrap();
            assert!(would_block(backend.recv(&mut buf)));
            let e = backend.send(&with_hdr(&[3; 20])).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::NotConnected);
        }
    }

    #[test]
    fn the_peer_closing_takes_the_link_down() {
        let (mut backend, mut peer) = pair();
        // A frame cut short by the close is dropped.
        peer.write_all(&framed(&[1; 30])[..10]).unwrap();
        drop(peer);
        let mut buf = vec![0; 2048];
        assert!(would_block(backend.recv(&mut buf)));
        assert_eq!(backend.down(), Some(Down::Closed));
        assert!(backend.send(&with_hdr(&[1; 20])).is_err());
        assert!(would_block(backend.recv(&mut buf)));
    }

    #[test]
    fn sending_to_a_closed_peer_fails_without_a_signal() {
        let (mut backend, peer) = pair();
        drop(peer);
        let e = backend.send(&with_hdr(&[1; 20])).unwrap_err();
        assert_ne!(e.kind(), io::ErrorKind::WouldBlock);
        assert!(matches!(
            backend.down(),
            Some(Down::Failed(_) | Down::Closed)
        ));
    }

    #[test]
    fn frames_out_of_range_are_refused_and_a_small_device_buffer_drops_one() {
        let (mut backend, mut peer) = pair();
        assert!(backend.send(&[0; VNET_HDR_LEN]).is_err());
        assert!(backend.send(&[0; 3]).is_err());
        assert!(backend.send(&with_hdr(&[0; MAX + 1])).is_err());
        assert_eq!(backend.down(), None);
        peer.write_all(&framed(&[4; 100])).unwrap();
        peer.write_all(&framed(&[5; 10])).unwrap();
        assert_eq!(backend.recv(&mut [0; 64]).unwrap(), 0);
        let mut buf = vec![0; 2048];
        assert_eq!(backend.recv(&mut buf).unwrap(), VNET_HDR_LEN + 10);
        assert!(!backend.takes_vnet_offloads());
    }

    #[test]
    fn random_bytes_in_random_pieces_never_panic_and_end_in_would_block_or_down() {
        // A deterministic generator (xorshift): the same hostile streams every run.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut buf = vec![0; VNET_HDR_LEN + MAX];
        for round in 0..200 {
            let (mut backend, mut peer) = pair();
            peer.set_nonblocking(true).unwrap();
            for _ in 0..20 {
                // Mostly plausible frames, sometimes garbage lengths, in random pieces.
                let mut wire = Vec::new();
                let len = match next() % 8 {
                    0 => next() as u32,
                    1 => 0,
                    _ => 1 + (next() % MAX as u64) as u32,
                };
                wire.extend_from_slice(&len.to_be_bytes());
                let body = (next() % (MAX as u64 + 8)) as usize;
                wire.extend((0..body).map(|_| next() as u8));
                let mut at = 0;
                while at < wire.len() {
                    let n = (1 + next() % 3000) as usize;
                    let end = (at + n).min(wire.len());
                    if peer.write(&wire[at..end]).is_err() {
                        break;
                    }
                    at = end;
                    // Drain what is whole; every call ends (a frame or WouldBlock).
                    for _ in 0..64 {
                        match backend.recv(&mut buf) {
                            Ok(n) => assert!(n == 0 || n > VNET_HDR_LEN, "round {round}"),
                            Err(e) => {
                                assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
                                break;
                            }
                        }
                    }
                }
                if backend.down().is_some() {
                    break;
                }
            }
            assert!(backend.inbuf.len() == 2 * (PREFIX_LEN + MAX), "no growth");
        }
    }
}
