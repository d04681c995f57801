//! The frontend ("master") side of the vhost-user protocol, as much of it as a virtio-fs device
//! needs: feature negotiation, the guest memory table, and starting and stopping vrings. The
//! backend (virtiofsd) then serves the queues itself, straight from the shared guest memory;
//! the VMM only relays the guest's notifications (kick) and the backend's interrupts (call).
//!
//! Wire format (vhost-user specification, "Message specification"): a 12-byte header (request,
//! flags, payload size, all little-endian u32), then the payload; file descriptors travel as
//! SCM_RIGHTS with the message. Every read is bounded (a reply's payload is at most
//! [`MAX_REPLY`] bytes) and the socket has send and receive timeouts, so a broken backend makes
//! the device fail instead of wedging the vCPU thread that activated it.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};

/// Message types (vhost-user specification, "Front-end message types").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Request {
    GetFeatures = 1,
    SetFeatures = 2,
    SetOwner = 3,
    SetMemTable = 5,
    SetVringNum = 8,
    SetVringAddr = 9,
    SetVringBase = 10,
    GetVringBase = 11,
    SetVringKick = 12,
    SetVringCall = 13,
    GetProtocolFeatures = 15,
    SetProtocolFeatures = 16,
    SetVringEnable = 18,
}

/// Header flags: protocol version 1, "this is a reply", "reply with a u64 status".
const VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 1 << 2;
const FLAG_NEED_REPLY: u32 = 1 << 3;
const HEADER_LEN: usize = 12;
/// Largest reply payload accepted (the replies used here are 8 or 8 bytes of vring state).
pub const MAX_REPLY: usize = 64;
/// Most memory regions a SET_MEM_TABLE may carry.
pub const MAX_REGIONS: usize = 8;
/// How long one send or receive may wait for the backend: long enough for a virtiofsd on a
/// loaded (or software-emulated) host, short enough that a wedged one fails the device instead
/// of holding the guest's vCPU for good.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// The virtio feature bit that says the backend speaks protocol features.
pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// Protocol feature: the backend acknowledges messages flagged NEED_REPLY.
pub const PROTOCOL_F_REPLY_ACK: u64 = 1 << 3;

/// One guest memory region as the backend must map it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryRegion {
    pub guest_phys_addr: u64,
    pub size: u64,
    /// Where the region is mapped in this process (vring addresses are given in this space).
    pub user_addr: u64,
    /// Offset of the region in the file the fd refers to.
    pub mmap_offset: u64,
}

/// Where a vring lives, as addresses in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VringAddrs {
    pub desc: u64,
    pub used: u64,
    pub avail: u64,
}

/// Why a vhost-user exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    #[error("vhost-user socket I/O failed during {0:?}")]
    Io(Request, #[source] io::Error),
    #[error("the backend closed the vhost-user connection during {0:?}")]
    Closed(Request),
    #[error("the backend answered {request:?} with a malformed reply ({why})")]
    BadReply { request: Request, why: &'static str },
    #[error("the backend refused {0:?} (status {1})")]
    Refused(Request, u64),
    #[error("the backend does not offer VIRTIO_F_VERSION_1")]
    NoVersion1,
    #[error("too many memory regions ({0}, at most {MAX_REGIONS})")]
    TooManyRegions(usize),
    #[error("guest memory is not shared with the backend (the VMM maps it from a memfd for VMs with vhost-user devices)")]
    PrivateMemory,
    #[error("queue {0}'s rings do not each lie inside one guest memory region")]
    RingOutsideMemory(u32),
}

impl From<VhostUserError> for io::Error {
    fn from(e: VhostUserError) -> Self {
        io::Error::other(e)
    }
}

/// A connection to a vhost-user backend.
pub struct Frontend {
    sock: OwnedFd,
    /// The backend acknowledges messages sent with NEED_REPLY (REPLY_ACK was negotiated).
    reply_ack: bool,
    /// Whether VHOST_USER_F_PROTOCOL_FEATURES was negotiated (rings then start disabled and
    /// are enabled with SET_VRING_ENABLE).
    protocol_features: bool,
    /// The virtio features the backend offers.
    backend_features: u64,
}

impl Frontend {
    /// Takes over a connected stream socket and negotiates what does not depend on the guest:
    /// the backend's features, protocol features (REPLY_ACK when offered), ownership.
    pub fn connect(sock: OwnedFd) -> Result<Self, VhostUserError> {
        Self::connect_with_timeout(sock, IO_TIMEOUT)
    }

    /// [`Frontend::connect`] with another I/O timeout (tests).
    pub fn connect_with_timeout(sock: OwnedFd, timeout: Duration) -> Result<Self, VhostUserError> {
        use rustix::net::sockopt;
        let timeouts = sockopt::set_socket_timeout(&sock, sockopt::Timeout::Recv, Some(timeout))
            .and_then(|()| {
                sockopt::set_socket_timeout(&sock, sockopt::Timeout::Send, Some(timeout))
            });
        timeouts.map_err(|e| VhostUserError::Io(Request::GetFeatures, e.into()))?;
        let mut frontend = Self {
            sock,
            reply_ack: false,
            protocol_features: false,
            backend_features: 0,
        };
        frontend.backend_features = frontend.get_u64(Request::GetFeatures)?;
        if frontend.backend_features & super::super::features::VERSION_1 == 0 {
            return Err(VhostUserError::NoVersion1);
        }
        if frontend.backend_features & F_PROTOCOL_FEATURES != 0 {
            frontend.protocol_features = true;
            let offered = frontend.get_u64(Request::GetProtocolFeatures)?;
            let wanted = offered & PROTOCOL_F_REPLY_ACK;
            frontend.send(Request::SetProtocolFeatures, &wanted.to_le_bytes(), &[])?;
            frontend.reply_ack = wanted & PROTOCOL_F_REPLY_ACK != 0;
        }
        frontend.send_acked(Request::SetOwner, &[], &[])?;
        Ok(frontend)
    }

    /// The virtio features the backend offers.
    pub fn backend_features(&self) -> u64 {
        self.backend_features
    }

    /// SET_FEATURES: what the driver accepted (plus the protocol-features bit when it was
    /// negotiated, which the backend expects to see again).
    pub fn set_features(&mut self, acked: u64) -> Result<(), VhostUserError> {
        let mut value = acked & !F_PROTOCOL_FEATURES;
        if self.protocol_features {
            value |= F_PROTOCOL_FEATURES;
        }
        self.send_acked(Request::SetFeatures, &value.to_le_bytes(), &[])
    }

    /// SET_MEM_TABLE: the guest memory regions and the fds the backend maps them from.
    pub fn set_mem_table(
        &mut self,
        regions: &[(MemoryRegion, BorrowedFd<'_>)],
    ) -> Result<(), VhostUserError> {
        if regions.is_empty() || regions.len() > MAX_REGIONS {
            return Err(VhostUserError::TooManyRegions(regions.len()));
        }
        let mut payload = Vec::with_capacity(8 + 32 * regions.len());
        payload.extend_from_slice(&(regions.len() as u32).to_le_bytes());
        payload.extend_from_slice(&0u32.to_le_bytes());
        for (r, _) in regions {
            for v in [r.guest_phys_addr, r.size, r.user_addr, r.mmap_offset] {
                payload.extend_from_slice(&v.to_le_bytes());
            }
        }
        let fds: Vec<BorrowedFd<'_>> = regions.iter().map(|(_, fd)| *fd).collect();
        self.send_acked(Request::SetMemTable, &payload, &fds)
    }

    /// Starts vring `index`: size, first index, addresses, kick and call events, enabled.
    pub fn start_vring(
        &mut self,
        index: u32,
        size: u16,
        addrs: VringAddrs,
        kick: BorrowedFd<'_>,
        call: BorrowedFd<'_>,
    ) -> Result<(), VhostUserError> {
        self.send_acked(Request::SetVringNum, &vring_state(index, size.into()), &[])?;
        self.send_acked(Request::SetVringBase, &vring_state(index, 0), &[])?;
        let mut addr = Vec::with_capacity(40);
        addr.extend_from_slice(&index.to_le_bytes());
        addr.extend_from_slice(&0u32.to_le_bytes()); // flags: no dirty logging
        for v in [addrs.desc, addrs.used, addrs.avail, 0] {
            addr.extend_from_slice(&v.to_le_bytes());
        }
        self.send_acked(Request::SetVringAddr, &addr, &[])?;
        let index_word = u64::from(index).to_le_bytes();
        self.send_acked(Request::SetVringKick, &index_word, &[kick])?;
        self.send_acked(Request::SetVringCall, &index_word, &[call])?;
        if self.protocol_features {
            self.send_acked(Request::SetVringEnable, &vring_state(index, 1), &[])?;
        }
        Ok(())
    }

    /// Stops vring `index` (GET_VRING_BASE: the backend stops serving it and says where it
    /// stopped).
    pub fn stop_vring(&mut self, index: u32) -> Result<u32, VhostUserError> {
        self.send(Request::GetVringBase, &vring_state(index, 0), &[])?;
        let reply = self.receive(Request::GetVringBase)?;
        let state: [u8; 8] = reply
            .as_slice()
            .try_into()
            .map_err(|_| VhostUserError::BadReply {
                request: Request::GetVringBase,
                why: "not 8 bytes of vring state",
            })?;
        Ok(u32::from_le_bytes([state[4], state[5], state[6], state[7]]))
    }

    fn get_u64(&mut self, request: Request) -> Result<u64, VhostUserError> {
        self.send(request, &[], &[])?;
        let reply = self.receive(request)?;
        let value: [u8; 8] = reply
            .as_slice()
            .try_into()
            .map_err(|_| VhostUserError::BadReply {
                request,
                why: "not a u64",
            })?;
        Ok(u64::from_le_bytes(value))
    }

    /// Sends `request`; with REPLY_ACK, asks for and checks the backend's status.
    fn send_acked(
        &mut self,
        request: Request,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), VhostUserError> {
        let flags = if self.reply_ack { FLAG_NEED_REPLY } else { 0 };
        self.send_flags(request, flags, payload, fds)?;
        if self.reply_ack {
            let status = self.receive(request)?;
            let status: [u8; 8] =
                status
                    .as_slice()
                    .try_into()
                    .map_err(|_| VhostUserError::BadReply {
                        request,
                        why: "an acknowledgement that is not a u64",
                    })?;
            match u64::from_le_bytes(status) {
                0 => {}
                code => return Err(VhostUserError::Refused(request, code)),
            }
        }
        Ok(())
    }

    fn send(
        &mut self,
        request: Request,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), VhostUserError> {
        self.send_flags(request, 0, payload, fds)
    }

    fn send_flags(
        &mut self,
        request: Request,
        flags: u32,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), VhostUserError> {
        let message = encode(request, flags, payload);
        let mut space =
            [std::mem::MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_REGIONS))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(VhostUserError::TooManyRegions(fds.len()));
        }
        let mut sent = 0;
        while sent < message.len() {
            let iov = [io::IoSlice::new(&message[sent..])];
            // The fds go with the first part only.
            let result = if sent == 0 {
                sendmsg(&self.sock, &iov, &mut control, SendFlags::NOSIGNAL)
            } else {
                sendmsg(
                    &self.sock,
                    &iov,
                    &mut SendAncillaryBuffer::default(),
                    SendFlags::NOSIGNAL,
                )
            };
            match result {
                Ok(0) => return Err(VhostUserError::Closed(request)),
                Ok(n) => sent += n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(VhostUserError::Io(request, e.into())),
            }
        }
        Ok(())
    }

    /// Reads the reply to `request`: header checked, payload at most [`MAX_REPLY`] bytes.
    fn receive(&mut self, request: Request) -> Result<Vec<u8>, VhostUserError> {
        let mut header = [0u8; HEADER_LEN];
        self.read_exact(request, &mut header)?;
        let word =
            |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
        let (code, flags, size) = (word(0), word(4), word(8) as usize);
        if code != request as u32 {
            return Err(VhostUserError::BadReply {
                request,
                why: "a reply to another request",
            });
        }
        if flags & FLAG_REPLY == 0 || flags & 0x3 != VERSION {
            return Err(VhostUserError::BadReply {
                request,
                why: "not a version-1 reply",
            });
        }
        if size > MAX_REPLY {
            return Err(VhostUserError::BadReply {
                request,
                why: "payload too large",
            });
        }
        let mut payload = vec![0u8; size];
        self.read_exact(request, &mut payload)?;
        Ok(payload)
    }

    fn read_exact(&mut self, request: Request, buf: &mut [u8]) -> Result<(), VhostUserError> {
        let mut done = 0;
        while done < buf.len() {
            match rustix::io::read(self.sock.as_fd(), &mut buf[done..]) {
                Ok(0) => return Err(VhostUserError::Closed(request)),
                Ok(n) => done += n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(VhostUserError::Io(request, e.into())),
            }
        }
        Ok(())
    }
}

fn vring_state(index: u32, num: u32) -> [u8; 8] {
    let mut state = [0u8; 8];
    state[..4].copy_from_slice(&index.to_le_bytes());
    state[4..].copy_from_slice(&num.to_le_bytes());
    state
}

fn encode(request: Request, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(HEADER_LEN + payload.len());
    message.extend_from_slice(&(request as u32).to_le_bytes());
    message.extend_from_slice(&(VERSION | flags).to_le_bytes());
    message.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    message.extend_from_slice(payload);
    message
}

#[cfg(test)]
pub(crate) mod tests;
