//! virtio-vsock (virtio 1.2 §5.10), stream sockets only, with host Unix sockets behind it
//! (host protocol below). Three queues: rx (0) carries packets to the guest, tx (1) packets
//! from it, event (2) is held but unused (it only carries TRANSPORT_RESET, which matters after
//! a snapshot restore). Configuration space is the guest's CID.
//!
//! The guest's packets are checked field by field; a bad one is dropped, counted, and answered
//! with RST when it names one of the guest's connections. Memory is bounded: at most
//! [`MAX_CONNECTIONS`] connections with [`CONN_BUF_SIZE`] bytes buffered each, at most 64
//! host clients in handshake, and payloads of at most [`packet::MAX_PAYLOAD`].
//!
//! Host protocol (Firecracker's), on Unix sockets:
//! - Host-initiated: a client connects to `uds_path` and writes `CONNECT <port>\n`; the guest
//!   gets a REQUEST from CID 2 and a fresh local port (from 2^30 up). When the guest answers
//!   RESPONSE the client reads `OK <local_port>\n` and the socket carries the stream; when it
//!   answers RST (or the line is malformed) the client's socket is closed.
//! - Guest-initiated: a REQUEST to CID 2 port P connects to `<uds_path>_P`; RESPONSE when that
//!   succeeds, RST when it does not.
//! - Closing: host EOF becomes SHUTDOWN(SEND) to the guest, a host socket closed in both
//!   directions SHUTDOWN(RCV|SEND) (the connection is then forgotten); the guest's
//!   SHUTDOWN(SEND) becomes shutdown(SHUT_WR) once its data is written, its full SHUTDOWN or
//!   RST closes the host socket (a full SHUTDOWN is answered with RST, §5.10.6.5).

mod connection;
mod muxer;
pub mod packet;
mod unix_backend;

use std::os::unix::io::RawFd;
use std::path::Path;

use virtio_queue::{QueueOwnedT, QueueT};

use super::queue_worker::{serve_queue_bounded, Progress};
use super::{
    device_id, features, ActivateContext, DeviceCounters, DeviceError, QueueSet, VirtioDevice,
    WORK_BUDGET,
};
use muxer::Muxer;
use packet::HDR_LEN;
use unix_backend::UnixBackend;

pub use connection::CONN_BUF_SIZE;
pub use muxer::MAX_CONNECTIONS;
pub use unix_backend::UnixBackendError;

const QUEUE_SIZE: u16 = 256;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
const EVENT_QUEUE: usize = 2;
/// CIDs 0-2 are reserved (§5.10.4: hypervisor, local, host).
const FIRST_GUEST_CID: u64 = 3;

/// Why a vsock device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is reserved (must be at least 3)")]
    ReservedCid(u64),
    #[error("cannot start the vsock host backend")]
    Backend(#[from] UnixBackendError),
}

enum State {
    Inactive,
    Active { ctx: ActivateContext },
}

/// A virtio-vsock device.
pub struct Vsock {
    config: [u8; 8],
    muxer: Muxer,
    state: State,
    counters: DeviceCounters,
    /// Queues left with work when the budget ran out.
    unfinished: QueueSet,
}

impl Vsock {
    /// A device for a guest with CID `guest_cid`, listening for host clients on `uds_path`
    /// (which must not exist; it is removed when the device is dropped).
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        // The guest reads a u64 CID but Linux keeps it in 32 bits; refuse what it cannot hold.
        if guest_cid < FIRST_GUEST_CID || guest_cid > u64::from(u32::MAX - 1) {
            return Err(VsockError::ReservedCid(guest_cid));
        }
        let backend = UnixBackend::new(uds_path)?;
        Ok(Self {
            config: guest_cid.to_le_bytes(),
            muxer: Muxer::new(guest_cid, backend),
            state: State::Inactive,
            counters: DeviceCounters::default(),
            unfinished: QueueSet::default(),
        })
    }

    /// Live connections (for metrics and tests).
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    /// Host clients that connected but have not sent their `CONNECT` line yet.
    pub fn pending_host_clients(&self) -> usize {
        self.muxer.backend().handshake_count()
    }

    /// Fills the guest's rx buffers with whatever the muxer has for it (at most [`WORK_BUDGET`]
    /// packets), and interrupts the guest if it asked to be. [`Progress::More`] when the budget
    /// ran out: the rest waits for the next turn.
    fn deliver_rx(
        ctx: &mut ActivateContext,
        muxer: &mut Muxer,
        counters: &DeviceCounters,
    ) -> Result<Progress, DeviceError> {
        let broken = |_| DeviceError::BrokenQueue(RX_QUEUE);
        let mem = &ctx.mem;
        let Some(queue) = ctx.queues.get_mut(RX_QUEUE) else {
            return Ok(Progress::Idle);
        };
        let mut used = 0usize;
        let progress = loop {
            if used >= WORK_BUDGET {
                break Progress::More;
            }
            let chain = queue.iter(mem).map_err(broken)?.next();
            let Some(chain) = chain else {
                // Out of buffers: ask to be told of new ones, unless some just arrived.
                if queue.enable_notification(mem).map_err(broken)? {
                    continue;
                }
                break Progress::Idle;
            };
            let head = chain.head_index();
            let written = match packet::rx_capacity(&chain, mem) {
                Err(e) => {
                    log::debug!("vsock: unusable rx buffer: {e}");
                    counters.add(&counters.errors, 1);
                    0
                }
                Ok(room) => {
                    let Some((hdr, len)) = muxer.next_rx(room) else {
                        // Nothing to send: leave the buffer for later.
                        queue.go_to_previous_position();
                        break Progress::Idle;
                    };
                    match packet::write_rx(chain, mem, &hdr, &muxer.scratch()[..len]) {
                        Ok(n) => {
                            counters.add(&counters.requests, 1);
                            counters.add(&counters.bytes_written, u64::from(n));
                            n
                        }
                        Err(e) => {
                            crate::warn_limited!("vsock: cannot write an rx packet: {e}");
                            counters.add(&counters.errors, 1);
                            muxer.rx_lost(&hdr);
                            0
                        }
                    }
                }
            };
            queue.add_used(mem, head, written).map_err(broken)?;
            used += 1;
        };
        if used > 0 && queue.needs_notification(mem).map_err(broken)? {
            ctx.interrupt.signal_used_queue();
        }
        Ok(progress)
    }

    fn process_tx(
        ctx: &mut ActivateContext,
        muxer: &mut Muxer,
        counters: &DeviceCounters,
    ) -> Result<Progress, DeviceError> {
        let mem = &ctx.mem;
        let Some(queue) = ctx.queues.get_mut(TX_QUEUE) else {
            return Ok(Progress::Idle);
        };
        serve_queue_bounded(queue, TX_QUEUE, mem, &ctx.interrupt, WORK_BUDGET, |chain| {
            match packet::read_tx(chain, mem) {
                Ok(pkt) => {
                    counters.add(&counters.requests, 1);
                    let n = (HDR_LEN + pkt.payload.len()) as u64;
                    counters.add(&counters.bytes_read, n);
                    muxer.on_packet(pkt, counters);
                }
                Err(rej) => muxer.on_rejected(rej, counters),
            }
            0
        })
    }
}

/// virtio_vsock_event.id of TRANSPORT_RESET (§5.10.6.6).
const EVENT_TRANSPORT_RESET: u32 = 0;

impl Vsock {
    /// Puts one TRANSPORT_RESET event in the driver's event queue and interrupts it.
    fn send_transport_reset(&mut self) -> Result<(), DeviceError> {
        let State::Active { ctx } = &mut self.state else {
            return Ok(());
        };
        let broken = |_| DeviceError::BrokenQueue(EVENT_QUEUE);
        let mem = &ctx.mem;
        let Some(queue) = ctx.queues.get_mut(EVENT_QUEUE) else {
            return Ok(());
        };
        let Some(chain) = queue.iter(mem).map_err(broken)?.next() else {
            log::warn!("vsock: no event buffer for TRANSPORT_RESET");
            return Ok(());
        };
        let head = chain.head_index();
        let written = match chain.writer(mem) {
            Ok(mut w) => {
                match std::io::Write::write_all(&mut w, &EVENT_TRANSPORT_RESET.to_le_bytes()) {
                    Ok(()) => 4,
                    Err(_) => 0,
                }
            }
            Err(_) => 0,
        };
        queue.add_used(mem, head, written).map_err(broken)?;
        if queue.needs_notification(mem).map_err(broken)? {
            ctx.interrupt.signal_used_queue();
        }
        Ok(())
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_id::VSOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }
    fn offered_features(&self) -> u64 {
        features::VERSION_1 | features::RING_EVENT_IDX | features::RING_INDIRECT_DESC
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data);
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), DeviceError> {
        self.state = State::Active { ctx };
        Ok(())
    }
    fn process_queue(&mut self, index: usize) -> Result<(), DeviceError> {
        let State::Active { ctx } = &mut self.state else {
            return Ok(());
        };
        let (muxer, counters) = (&mut self.muxer, &self.counters);
        if index == TX_QUEUE && Self::process_tx(ctx, muxer, counters)? == Progress::More {
            self.unfinished.insert(TX_QUEUE);
        }
        // rx: new buffers; tx: answers (RESPONSE, RST, credit) and data unblocked by credit.
        // The event queue's buffers wait for a TRANSPORT_RESET that only restore sends.
        if matches!(index, RX_QUEUE | TX_QUEUE)
            && Self::deliver_rx(ctx, muxer, counters)? == Progress::More
        {
            self.unfinished.insert(RX_QUEUE);
        }
        Ok(())
    }
    fn take_unfinished(&mut self) -> QueueSet {
        std::mem::take(&mut self.unfinished)
    }
    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.muxer.backend().epoll_fd())
    }
    fn backend_trigger(&self) -> super::BackendTrigger {
        // The backend fd is an epoll fd of sockets that process_backend drains in bounded
        // rounds: level-triggered, so what a round leaves is reported again.
        super::BackendTrigger::Level
    }
    fn process_backend(&mut self) -> Result<(), DeviceError> {
        let active = matches!(self.state, State::Active { .. });
        if let Err(e) = self.muxer.process_host(active) {
            self.counters.add(&self.counters.errors, 1);
            return Err(DeviceError::Backend(e));
        }
        let State::Active { ctx } = &mut self.state else {
            return Ok(());
        };
        if Self::deliver_rx(ctx, &mut self.muxer, &self.counters)? == Progress::More {
            self.unfinished.insert(RX_QUEUE);
        }
        Ok(())
    }
    fn drain_backend(&mut self) {
        // Accept-and-close rather than stop watching the listener until activation: a client
        // (huskd polls every 100 ms for the agent) learns at once that nobody is there instead
        // of hanging in the backlog, no stale clients pile up for the guest to be offered
        // later, and nothing must be re-armed on activation. Events of live connections (a
        // device that needs a reset) are taken too: they are edge-triggered, so taking them
        // is what stops the epoll fd from being ready.
        if let Err(e) = self.muxer.process_host(false) {
            self.counters.add(&self.counters.errors, 1);
            crate::warn_limited!("vsock: cannot drain the host sockets: {e}");
        }
    }
    fn reset(&mut self) {
        self.muxer.close_all();
        self.state = State::Inactive;
        self.unfinished = QueueSet::default();
    }
    fn restored(&mut self) {
        // The guest's connections belonged to the old VMM's host sockets, and its CID may have
        // been overridden: TRANSPORT_RESET makes the driver drop every connection and re-read
        // the CID from configuration space (§5.10.6.6).
        if let Err(e) = self.send_transport_reset() {
            log::warn!("vsock: cannot send TRANSPORT_RESET after restore: {e}");
            self.counters.add(&self.counters.errors, 1);
        }
        self.muxer.await_transport_reset();
    }
    fn counters(&self) -> &DeviceCounters {
        &self.counters
    }
    fn open_connections(&self) -> Option<u64> {
        Some(self.connection_count() as u64)
    }
}

#[cfg(test)]
mod test_guest;
#[cfg(test)]
mod tests;
