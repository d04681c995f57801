//! One vsock stream connection between a guest port and a host Unix socket: its state machine
//! (§5.10.6.4-5), credit in both directions (§5.10.6.3), and the bounded buffer of guest bytes
//! the host socket has not taken yet.
//!
//! Credit: the guest may have at most `CONN_BUF_SIZE` bytes in flight towards the host; they
//! wait in `out_buf` until the non-blocking host socket takes them, and only then count in
//! `fwd_cnt`. A full buffer therefore stops the guest by withholding credit, and a guest that
//! ignores its credit is reset. Towards the guest, no more is read from the host socket than
//! the guest's advertised `buf_alloc` leaves room for.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;

use super::packet::{op, shutdown, Header};

/// Receive buffer the device advertises per connection (its `buf_alloc`), and so the most
/// guest bytes it ever holds for one connection.
pub const CONN_BUF_SIZE: u32 = 64 * 1024;
/// Below this much credit left in the guest's view, forwarded bytes are announced with a
/// CREDIT_UPDATE instead of waiting for the next packet to carry them.
const CREDIT_LOW: u32 = CONN_BUF_SIZE / 4;

/// Where a connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated: REQUEST queued or sent, waiting for the guest's RESPONSE.
    LocalInit,
    /// Data may flow (subject to each side's shutdown).
    Established,
}

/// What the device must do with a connection after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    /// Close the host socket and tell the guest with RST.
    Reset,
    /// Close the host socket; the guest already knows (it sent RST, or got SHUTDOWN both).
    Drop,
}

/// Pending control packets, in the order they are sent.
#[derive(Debug, Default)]
struct Pending {
    request: bool,
    response: bool,
    credit_update: bool,
    /// SHUTDOWN flags to send once all host data has been delivered.
    shutdown: u32,
}

/// Outcome of asking a connection for its next rx packet.
pub enum RxPacket {
    /// A packet with `len` payload bytes at the start of the scratch buffer.
    Packet { hdr: Header, len: usize },
    /// Nothing to send now.
    Nothing,
    /// The host socket failed: reset the connection.
    Failed,
}

/// A live connection. `host_port` is the port the host side is known by (the guest's
/// destination port, or a fresh local port for host-initiated connections).
pub struct Connection {
    pub stream: UnixStream,
    pub token: u64,
    pub host_port: u32,
    pub guest_port: u32,
    guest_cid: u64,
    state: ConnState,
    pending: Pending,
    /// Guest's receive buffer and how much of it it has consumed (from its headers).
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Payload bytes sent to the guest.
    tx_cnt: u32,
    /// Payload bytes received from the guest, forwarded to the host, and last announced.
    rx_cnt: u32,
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    /// Bytes for the host socket: an uncounted preamble (`OK <port>\n`), then guest data.
    out_buf: VecDeque<u8>,
    preamble_left: usize,
    /// Edge-triggered readiness: readable until a read says otherwise.
    host_readable: bool,
    host_eof: bool,
    host_hup: bool,
    /// SHUTDOWN flags received from the guest, and sent to it.
    guest_shutdown: u32,
    sent_shutdown: u32,
    write_shut: bool,
    /// A CREDIT_REQUEST went out since the guest last told us its credit.
    stall_asked: bool,
}

impl Connection {
    fn new(
        stream: UnixStream,
        token: u64,
        guest_cid: u64,
        host_port: u32,
        guest_port: u32,
    ) -> Self {
        Self {
            stream,
            token,
            host_port,
            guest_port,
            guest_cid,
            state: ConnState::LocalInit,
            pending: Pending::default(),
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            out_buf: VecDeque::new(),
            preamble_left: 0,
            host_readable: true,
            host_eof: false,
            host_hup: false,
            guest_shutdown: 0,
            sent_shutdown: 0,
            write_shut: false,
            stall_asked: false,
        }
    }

    /// A host client asked for guest port `guest_port`: a REQUEST goes to the guest.
    pub fn host_initiated(
        stream: UnixStream,
        token: u64,
        guest_cid: u64,
        host_port: u32,
        guest_port: u32,
    ) -> Self {
        let mut c = Self::new(stream, token, guest_cid, host_port, guest_port);
        c.pending.request = true;
        c
    }

    /// The guest's REQUEST `req` reached a listening host socket: answer RESPONSE.
    pub fn guest_initiated(stream: UnixStream, token: u64, req: &Header) -> Self {
        let mut c = Self::new(stream, token, req.src_cid, req.dst_port, req.src_port);
        c.state = ConnState::Established;
        c.pending.response = true;
        c.update_peer_credit(req);
        c
    }

    pub fn state(&self) -> ConnState {
        self.state
    }

    /// Every guest packet carries its current credit (§5.10.6.3).
    pub fn update_peer_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = hdr.fwd_cnt;
        self.stall_asked = false;
    }

    /// Bytes the guest still has room for. A guest claiming to have consumed more than it was
    /// sent only gets less.
    fn peer_free(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// The guest answered our REQUEST.
    pub fn on_response(&mut self) -> Verdict {
        if self.state != ConnState::LocalInit {
            return Verdict::Reset;
        }
        self.state = ConnState::Established;
        let line = format!("OK {}\n", self.host_port);
        self.preamble_left = line.len();
        self.out_buf.extend(line.as_bytes());
        self.flush()
    }

    /// Guest payload for the host socket.
    pub fn on_rw(&mut self, payload: &[u8]) -> Verdict {
        if self.state != ConnState::Established || self.guest_shutdown & shutdown::SEND != 0 {
            return Verdict::Reset;
        }
        let held = self.out_buf.len() - self.preamble_left;
        if held + payload.len() > CONN_BUF_SIZE as usize {
            crate::warn_limited!("vsock: guest port {} overran its credit", self.guest_port);
            return Verdict::Reset;
        }
        self.out_buf.extend(payload);
        self.rx_cnt = self.rx_cnt.wrapping_add(payload.len() as u32);
        self.flush()
    }

    /// The guest shut down one or both directions.
    pub fn on_shutdown(&mut self, flags: u32) -> Verdict {
        self.guest_shutdown |= flags & shutdown::BOTH;
        self.flush()
    }

    pub fn on_credit_request(&mut self) {
        self.pending.credit_update = true;
    }

    /// The host socket reported readiness (edge-triggered epoll bits).
    pub fn on_host_event(&mut self, readable: bool, hup: bool) -> Verdict {
        self.host_readable |= readable || hup;
        if hup {
            self.host_hup = true;
            if self.state == ConnState::LocalInit {
                return Verdict::Reset;
            }
            if self.host_eof && self.sent_shutdown != shutdown::BOTH {
                self.pending.shutdown = shutdown::BOTH;
            }
        }
        self.flush()
    }

    /// Writes what the host socket takes now, then acts on the guest's shutdown once the
    /// buffer is empty.
    pub fn flush(&mut self) -> Verdict {
        while !self.out_buf.is_empty() {
            let (front, _) = self.out_buf.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Verdict::Reset,
                Ok(n) => {
                    self.out_buf.drain(..n);
                    let preamble = n.min(self.preamble_left);
                    self.preamble_left -= preamble;
                    self.fwd_cnt = self.fwd_cnt.wrapping_add((n - preamble) as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return Verdict::Reset,
            }
        }
        if self.out_buf.is_empty() {
            if self.guest_shutdown == shutdown::BOTH {
                // §5.10.6.5: the peer of a full shutdown answers with RST once done.
                return Verdict::Reset;
            }
            if self.guest_shutdown & shutdown::SEND != 0 && !self.write_shut {
                self.write_shut = true;
                let _ = self.stream.shutdown(Shutdown::Write);
            }
        }
        let guest_view =
            CONN_BUF_SIZE.saturating_sub(self.rx_cnt.wrapping_sub(self.last_fwd_cnt_sent));
        if self.fwd_cnt != self.last_fwd_cnt_sent && guest_view < CREDIT_LOW {
            self.pending.credit_update = true;
        }
        Verdict::Keep
    }

    /// Host data may go to the guest now.
    fn can_send_data(&self) -> bool {
        self.state == ConnState::Established
            && self.host_readable
            && !self.host_eof
            && self.guest_shutdown & shutdown::RCV == 0
    }

    /// Whether [`Connection::next_rx`] may produce a packet (cheap; no I/O).
    pub fn wants_rx(&self) -> bool {
        let p = &self.pending;
        p.request
            || p.response
            || p.credit_update
            || p.shutdown != 0
            || (self.can_send_data() && (self.peer_free() > 0 || !self.stall_asked))
    }

    /// The next packet for the guest, its payload read from the host socket into `scratch`
    /// (sized to the rx buffer's room).
    pub fn next_rx(&mut self, scratch: &mut [u8]) -> RxPacket {
        let control = if self.pending.request {
            self.pending.request = false;
            Some((op::REQUEST, 0))
        } else if self.pending.response {
            self.pending.response = false;
            Some((op::RESPONSE, 0))
        } else if self.pending.credit_update {
            self.pending.credit_update = false;
            Some((op::CREDIT_UPDATE, 0))
        } else {
            None
        };
        if let Some((op, flags)) = control {
            return RxPacket::Packet {
                hdr: self.header(op, flags),
                len: 0,
            };
        }
        if self.can_send_data() {
            let room = (self.peer_free() as usize).min(scratch.len());
            if self.peer_free() == 0 {
                // The guest is full: ask once for its credit rather than wait for it.
                if !self.stall_asked {
                    self.stall_asked = true;
                    return RxPacket::Packet {
                        hdr: self.header(op::CREDIT_REQUEST, 0),
                        len: 0,
                    };
                }
            } else if room > 0 {
                match self.stream.read(&mut scratch[..room]) {
                    Ok(0) => {
                        self.host_eof = true;
                        self.pending.shutdown = if self.host_hup {
                            shutdown::BOTH
                        } else {
                            shutdown::SEND
                        };
                    }
                    Ok(n) => {
                        self.tx_cnt = self.tx_cnt.wrapping_add(n as u32);
                        return RxPacket::Packet {
                            hdr: self.header(op::RW, 0),
                            len: n,
                        };
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => self.host_readable = false,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => return RxPacket::Failed,
                }
            }
        }
        if self.pending.shutdown != 0 {
            let flags = std::mem::take(&mut self.pending.shutdown);
            self.sent_shutdown |= flags;
            return RxPacket::Packet {
                hdr: self.header(op::SHUTDOWN, flags),
                len: 0,
            };
        }
        RxPacket::Nothing
    }

    /// After a packet went out: the connection is over once the guest was told both
    /// directions are shut (it will answer RST, which finds no connection and is ignored).
    pub fn after_rx(&self) -> Verdict {
        if self.sent_shutdown == shutdown::BOTH {
            Verdict::Drop
        } else {
            Verdict::Keep
        }
    }

    fn header(&mut self, op: u16, flags: u32) -> Header {
        let mut hdr = Header::to_guest(self.guest_cid, self.host_port, self.guest_port, op);
        hdr.flags = flags;
        hdr.buf_alloc = CONN_BUF_SIZE;
        hdr.fwd_cnt = self.fwd_cnt;
        self.last_fwd_cnt_sent = self.fwd_cnt;
        // Every packet carries the update; a separate one is no longer needed.
        self.pending.credit_update = false;
        hdr
    }
}
