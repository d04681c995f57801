//! Routes packets between the guest and host sockets: guest tx packets to their connection
//! (or to a new one, or to an RST), host readiness to connections, and connections' packets
//! to the rx queue. Free of queue handling: the device feeds it parsed packets and rx room.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Bound;
use std::os::unix::net::UnixStream;

use super::connection::{ConnState, Connection, RxPacket, Verdict};
use super::packet::{op, Header, Rejected, TxPacket, HOST_CID, MAX_PAYLOAD};
use super::unix_backend::{Serviced, UnixBackend};
use crate::virtio::DeviceCounters;

/// Most live connections; more are refused (RST to the guest, close to the host client).
pub const MAX_CONNECTIONS: usize = 1024;
/// Most RSTs waiting for rx buffers; beyond this a guest flooding bad packets loses answers.
const MAX_PENDING_RESETS: usize = 1024;
/// Host-initiated connections get local ports from here up, away from well-known ports.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// epoll_wait rounds per `process_backend`, so that one busy call cannot starve the loop.
const MAX_POLL_ROUNDS: usize = 16;

/// A connection is named by its two ports (the CIDs are fixed: host 2, guest `guest_cid`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnKey {
    pub host_port: u32,
    pub guest_port: u32,
}

pub struct Muxer {
    guest_cid: u64,
    backend: UnixBackend,
    conns: BTreeMap<ConnKey, Connection>,
    tokens: HashMap<u64, ConnKey>,
    resets: VecDeque<Header>,
    /// Round-robin position among connections for rx fairness.
    cursor: Option<ConnKey>,
    next_local_port: u32,
    scratch: Vec<u8>,
    /// After a restore, until the guest sends a packet with its (possibly new) CID: the
    /// driver has not handled TRANSPORT_RESET yet and may still answer with the snapshot's CID.
    awaiting_reset: bool,
}

impl Muxer {
    pub fn new(guest_cid: u64, backend: UnixBackend) -> Self {
        Self {
            guest_cid,
            backend,
            conns: BTreeMap::new(),
            tokens: HashMap::new(),
            resets: VecDeque::new(),
            cursor: None,
            next_local_port: FIRST_LOCAL_PORT,
            scratch: vec![0; MAX_PAYLOAD],
            awaiting_reset: false,
        }
    }

    /// The VM was restored and TRANSPORT_RESET sent: see `awaiting_reset`.
    pub fn await_transport_reset(&mut self) {
        self.awaiting_reset = true;
    }

    pub fn backend(&self) -> &UnixBackend {
        &self.backend
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// A tx packet the guest got wrong: count it, and answer RST when it names a connection
    /// of this guest (never to a spoofed CID, never to an RST).
    pub fn on_rejected(&mut self, rej: Rejected, counters: &DeviceCounters) {
        counters.add(&counters.errors, 1);
        log::debug!("vsock: dropped a guest packet: {}", rej.err);
        if let Some(hdr) = rej.hdr {
            if hdr.src_cid == self.guest_cid && hdr.dst_cid == HOST_CID && hdr.op != op::RST {
                self.reset(key_of(&hdr), hdr.reset_reply());
            }
        }
    }

    /// A well-formed tx packet.
    pub fn on_packet(&mut self, pkt: TxPacket, counters: &DeviceCounters) {
        let hdr = pkt.hdr;
        if hdr.src_cid != self.guest_cid && self.awaiting_reset && hdr.dst_cid == HOST_CID {
            // A restored driver that has not handled TRANSPORT_RESET yet answers a host
            // client's connection with the snapshot's CID. Nothing from that CID is accepted,
            // but the host side of the connection it names is closed now (with an RST to the
            // guest), so that the client retries at once instead of waiting out its timeout.
            log::debug!(
                "vsock: packet with the snapshot's CID {} before TRANSPORT_RESET was handled",
                hdr.src_cid
            );
            let key = key_of(&hdr);
            if self.conns.contains_key(&key) {
                self.reset_conn(key);
            }
            return;
        }
        if hdr.src_cid == self.guest_cid {
            self.awaiting_reset = false;
        }
        if hdr.src_cid != self.guest_cid {
            // Spoofing another CID: drop without an answer, it would go nowhere sensible.
            counters.add(&counters.errors, 1);
            crate::warn_limited!(
                "vsock: guest packet with source CID {} dropped",
                hdr.src_cid
            );
            return;
        }
        if hdr.dst_cid != HOST_CID {
            // Only the host is reachable (no guest-to-guest, no loopback through the device).
            counters.add(&counters.errors, 1);
            if hdr.op != op::RST {
                self.push_reset(hdr.reset_reply());
            }
            return;
        }
        let key = key_of(&hdr);
        let Some(conn) = self.conns.get_mut(&key) else {
            match hdr.op {
                op::REQUEST => self.connect_guest(&hdr),
                op::RST => {}
                _ => self.push_reset(hdr.reset_reply()),
            }
            return;
        };
        conn.update_peer_credit(&hdr);
        let verdict = match hdr.op {
            op::RESPONSE => conn.on_response(),
            op::RST => Verdict::Drop,
            op::SHUTDOWN => conn.on_shutdown(hdr.flags),
            op::RW => conn.on_rw(&pkt.payload),
            op::CREDIT_UPDATE => Verdict::Keep,
            op::CREDIT_REQUEST => {
                conn.on_credit_request();
                Verdict::Keep
            }
            // A REQUEST for a live connection, or an op the parser let through.
            _ => Verdict::Reset,
        };
        if verdict == Verdict::Reset && hdr.op != op::SHUTDOWN {
            counters.add(&counters.errors, 1);
        }
        self.apply(key, verdict);
    }

    /// The guest connects to host port `dst_port`: to `<uds_path>_<port>`.
    fn connect_guest(&mut self, req: &Header) {
        if self.conns.len() >= MAX_CONNECTIONS {
            crate::warn_limited!("vsock: connection limit reached, guest request refused");
            self.push_reset(req.reset_reply());
            return;
        }
        let stream = match self.backend.connect_port(req.dst_port) {
            Ok(s) => s,
            Err(e) => {
                log::debug!("vsock: guest connect to port {}: {e}", req.dst_port);
                self.push_reset(req.reset_reply());
                return;
            }
        };
        match self.backend.register(&stream) {
            Ok(token) => {
                let key = key_of(req);
                self.tokens.insert(token, key);
                let conn = Connection::guest_initiated(stream, token, req);
                self.conns.insert(key, conn);
            }
            Err(e) => {
                crate::warn_limited!("vsock: cannot watch a host socket: {e}");
                self.push_reset(req.reset_reply());
            }
        }
    }

    /// A host client asked for guest port `port`.
    fn connect_host(&mut self, stream: UnixStream, token: u64, port: u32) {
        if self.conns.len() >= MAX_CONNECTIONS {
            crate::warn_limited!("vsock: connection limit reached, host client refused");
            self.backend.deregister(&stream);
            return;
        }
        let host_port = self.alloc_local_port();
        let key = ConnKey {
            host_port,
            guest_port: port,
        };
        self.tokens.insert(token, key);
        let conn = Connection::host_initiated(stream, token, self.guest_cid, host_port, port);
        self.conns.insert(key, conn);
    }

    /// A local port no live connection uses (at most MAX_CONNECTIONS are taken, so the search
    /// ends quickly).
    fn alloc_local_port(&mut self) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.keys().any(|k| k.host_port == port) {
                return port;
            }
        }
    }

    /// Services every ready host socket. `active`: whether there is a guest to talk to.
    pub fn process_host(&mut self, active: bool) -> std::io::Result<()> {
        for _ in 0..MAX_POLL_ROUNDS {
            let ready = self.backend.poll()?;
            for r in &ready {
                match self.backend.service(r, active) {
                    Serviced::Done => continue,
                    Serviced::Connect {
                        stream,
                        token,
                        port,
                    } => {
                        if active {
                            self.connect_host(stream, token, port);
                        } else {
                            self.backend.deregister(&stream);
                        }
                        continue;
                    }
                    Serviced::NotMine => {}
                }
                let Some(&key) = self.tokens.get(&r.token) else {
                    continue; // closed earlier in this batch
                };
                if let Some(conn) = self.conns.get_mut(&key) {
                    let verdict = conn.on_host_event(r.readable, r.hup);
                    self.apply(key, verdict);
                }
            }
            // Sockets accepted in this round may be ready already: go on until quiet.
            if ready.is_empty() {
                break;
            }
        }
        Ok(())
    }

    /// The next packet for the guest when an rx buffer has room for `room` payload bytes; its
    /// payload is `self.scratch()[..len]`. RSTs go first, then connections in turn.
    pub fn next_rx(&mut self, room: usize) -> Option<(Header, usize)> {
        if let Some(hdr) = self.resets.pop_front() {
            return Some((hdr, 0));
        }
        let room = room.min(self.scratch.len());
        let start = self.cursor.map_or(Bound::Unbounded, Bound::Excluded);
        let candidates: Vec<ConnKey> = self
            .conns
            .range((start, Bound::Unbounded))
            .chain(self.conns.range((Bound::Unbounded, start_inclusive(start))))
            .filter(|(_, c)| c.wants_rx())
            .map(|(k, _)| *k)
            .collect();
        for key in candidates {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            match conn.next_rx(&mut self.scratch[..room]) {
                RxPacket::Nothing => continue,
                RxPacket::Failed => self.reset_conn(key),
                RxPacket::Packet { hdr, len } => {
                    self.cursor = Some(key);
                    let verdict = conn.after_rx();
                    self.apply(key, verdict);
                    return Some((hdr, len));
                }
            }
        }
        // A connection that failed queued an RST.
        self.resets.pop_front().map(|hdr| (hdr, 0))
    }

    pub fn scratch(&self) -> &[u8] {
        &self.scratch
    }

    /// A packet could not be written into the guest's buffer: its connection's stream has a
    /// hole now, so it is reset.
    pub fn rx_lost(&mut self, hdr: &Header) {
        if hdr.op != op::RST {
            self.reset_conn(ConnKey {
                host_port: hdr.src_port,
                guest_port: hdr.dst_port,
            });
        }
    }

    fn apply(&mut self, key: ConnKey, verdict: Verdict) {
        match verdict {
            Verdict::Keep => {}
            Verdict::Reset => self.reset_conn(key),
            Verdict::Drop => self.remove(key),
        }
    }

    fn reset_conn(&mut self, key: ConnKey) {
        let rst = Header::to_guest(self.guest_cid, key.host_port, key.guest_port, op::RST);
        self.reset(key, rst);
    }

    /// Closes the connection `key` if there is one, and tells the guest with `rst`.
    fn reset(&mut self, key: ConnKey, rst: Header) {
        self.remove(key);
        self.push_reset(rst);
    }

    fn push_reset(&mut self, rst: Header) {
        if self.resets.len() < MAX_PENDING_RESETS {
            self.resets.push_back(rst);
        }
    }

    fn remove(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.remove(&key) {
            self.tokens.remove(&conn.token);
            self.backend.deregister(&conn.stream);
            if conn.state() == ConnState::LocalInit {
                log::debug!(
                    "vsock: guest refused host connection to port {}",
                    key.guest_port
                );
            }
        }
    }

    /// Closes every connection and host client (device reset).
    pub fn close_all(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove(key);
        }
        self.resets.clear();
        self.cursor = None;
        self.backend.clear_handshakes();
    }
}

fn key_of(guest_hdr: &Header) -> ConnKey {
    ConnKey {
        host_port: guest_hdr.dst_port,
        guest_port: guest_hdr.src_port,
    }
}

/// The upper bound that closes the wrap-around range `..=cursor`.
fn start_inclusive(start: Bound<ConnKey>) -> Bound<ConnKey> {
    match start {
        Bound::Excluded(k) => Bound::Included(k),
        _ => Bound::Excluded(ConnKey {
            host_port: 0,
            guest_port: 0,
        }),
    }
}
