//! virtio-net (virtio 1.2 §5.1): one rx/tx queue pair on a tap. Frames keep their 12-byte
//! virtio-net header end to end, so checksum offload and TSO negotiated with the guest are
//! carried out by the host kernel. Mergeable rx buffers let a 64 KiB GSO frame use many small
//! guest buffers.
//!
//! The other backend is a stream socket to passt (`stream`, rootless networking), which takes
//! no offloads: on it the device offers none, so the guest sends and expects whole frames.

pub mod stream;
pub mod tap;

use std::io;

use tap::{NetBackend, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, VNET_HDR_LEN};
use virtio_queue::{Queue, QueueOwnedT, QueueT};

use super::queue_worker::{chain_bytes, serve_queue_gated, Gated, Progress};
use super::throttle::{limiter_for, new_throttle, Clock, Throttle};
use super::{
    device_id, features, ActivateContext, DeviceCounters, DeviceError, QueueSet, VirtioDevice,
    WORK_BUDGET,
};
use crate::rate_limiter::{RateLimitConfig, RateLimiter};
use crate::GuestMemoryMmap;

/// Feature bits (§5.1.3).
pub mod feature {
    pub const CSUM: u64 = 1 << 0;
    pub const GUEST_CSUM: u64 = 1 << 1;
    pub const MTU: u64 = 1 << 3;
    pub const MAC: u64 = 1 << 5;
    pub const GUEST_TSO4: u64 = 1 << 7;
    pub const GUEST_TSO6: u64 = 1 << 8;
    pub const HOST_TSO4: u64 = 1 << 11;
    pub const HOST_TSO6: u64 = 1 << 12;
    pub const MRG_RXBUF: u64 = 1 << 15;
    pub const STATUS: u64 = 1 << 16;
}

const RX: usize = 0;
const TX: usize = 1;
const QUEUE_SIZE: u16 = 256;
/// Largest frame either way: a 64 KiB GSO packet, its Ethernet header and the virtio-net header.
const MAX_FRAME: usize = 65_535 + 14 + VNET_HDR_LEN;
/// The largest Ethernet frame (without virtio-net header) the device takes or gives: what a
/// backend that frames them itself ([`stream::StreamBackend`]) must accept.
pub const MAX_ETHERNET_FRAME: usize = MAX_FRAME - VNET_HDR_LEN;
/// Features that make frames carry pending checksums or segmentation: offered only when the
/// backend takes them ([`NetBackend::takes_vnet_offloads`]).
const OFFLOAD_FEATURES: u64 = feature::CSUM
    | feature::GUEST_CSUM
    | feature::GUEST_TSO4
    | feature::GUEST_TSO6
    | feature::HOST_TSO4
    | feature::HOST_TSO6;
const STATUS_LINK_UP: u16 = 1;

enum State {
    Inactive,
    Active {
        ctx: ActivateContext,
        mergeable: bool,
    },
}

/// A virtio-net device.
pub struct Net {
    backend: Box<dyn NetBackend>,
    /// Config space (§5.1.4): mac, status, max_virtqueue_pairs (unused: one pair), mtu.
    config: [u8; 12],
    /// Whether the device announces an MTU (VIRTIO_NET_F_MTU).
    announces_mtu: bool,
    state: State,
    /// A frame read from the backend that waits for guest rx buffers (its length in `rx_buf`).
    rx_pending: Option<usize>,
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
    counters: DeviceCounters,
    /// Queues left with work when the budget ran out.
    unfinished: QueueSet,
    /// Limiters of the rx and tx queues (`None`: unlimited, the default).
    rx_limiter: Option<RateLimiter>,
    tx_limiter: Option<RateLimiter>,
    /// The limiters' timer; `None` only if the timerfd could not be created.
    throttle: Option<Throttle>,
}

impl Net {
    pub fn new(backend: Box<dyn NetBackend>, mac: [u8; 6]) -> Self {
        let mut config = [0u8; 12];
        config[..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&STATUS_LINK_UP.to_le_bytes());
        Self {
            backend,
            config,
            announces_mtu: false,
            state: State::Inactive,
            rx_pending: None,
            rx_buf: vec![0; MAX_FRAME],
            tx_buf: vec![0; MAX_FRAME],
            counters: DeviceCounters::default(),
            unfinished: QueueSet::default(),
            rx_limiter: None,
            tx_limiter: None,
            throttle: new_throttle(),
        }
    }

    /// Announces `mtu` to the guest (VIRTIO_NET_F_MTU): its driver then uses it as the
    /// interface's MTU and maximum. For a VM that stands in for an interface with a smaller
    /// MTU than Ethernet's (an overlay network's), whose larger frames would be dropped.
    pub fn with_mtu(mut self, mtu: u16) -> Self {
        self.config[10..12].copy_from_slice(&mtu.to_le_bytes());
        self.announces_mtu = true;
        self
    }

    /// Sets the rx and tx rate limits (see [`VirtioDevice::set_rate_limit`]).
    pub fn with_rate_limits(mut self, rx: RateLimitConfig, tx: RateLimitConfig) -> Self {
        self.set_rate_limit(RX, rx);
        self.set_rate_limit(TX, tx);
        self
    }

    /// Replaces the limiters' clock (tests).
    pub fn set_clock(&mut self, clock: Clock) {
        if let Some(t) = &mut self.throttle {
            t.set_clock(clock);
        }
    }

    fn process_tx(&mut self) -> Result<(), DeviceError> {
        let State::Active { ctx, .. } = &mut self.state else {
            return Ok(());
        };
        let Some(queue) = ctx.queues.get_mut(TX) else {
            return Ok(());
        };
        let (backend, buf, counters, mem) = (
            &mut self.backend,
            &mut self.tx_buf,
            &self.counters,
            &ctx.mem,
        );
        let throttle = self.throttle.as_ref();
        let mut gate = self
            .tx_limiter
            .as_mut()
            .and_then(|l| throttle.map(|t| (l, t.now())));
        let gate = |chain: &super::queue_worker::Chain<'_>| match &mut gate {
            None => Ok(()),
            Some((limiter, now)) => limiter.consume(chain_bytes(chain), *now),
        };
        let outcome =
            serve_queue_gated(queue, TX, mem, &ctx.interrupt, WORK_BUDGET, gate, |chain| {
                match read_frame(chain, mem, buf) {
                    Some(len) => match backend.send(&buf[..len]) {
                        Ok(()) => {
                            counters.add(&counters.requests, 1);
                            counters.add(&counters.bytes_read, len as u64);
                        }
                        // The host queue is full or the frame is bad: drop it, as a NIC would.
                        Err(_) => counters.add(&counters.errors, 1),
                    },
                    None => counters.add(&counters.errors, 1),
                }
                0
            })?;
        match outcome {
            Gated::Done(Progress::More) => self.unfinished.insert(TX),
            Gated::Done(Progress::Idle) => {}
            Gated::Parked(wait) => {
                if let Some(t) = &mut self.throttle {
                    t.park(TX, wait);
                }
            }
        }
        Ok(())
    }

    /// Moves frames from the backend into guest rx buffers until one side runs dry, or until
    /// [`WORK_BUDGET`] frames (the rest is left for the next turn).
    fn process_rx(&mut self) -> Result<(), DeviceError> {
        let State::Active { ctx, mergeable } = &mut self.state else {
            return Ok(());
        };
        let Some(queue) = ctx.queues.get_mut(RX) else {
            return Ok(());
        };
        let mem = &ctx.mem;
        let mut delivered = false;
        // Every attempt counts, failed reads and retries included: nothing loops unbounded.
        let mut out_of_budget = true;
        // The clock is read once per turn, and only when limited.
        let throttle = self.throttle.as_mut();
        let mut limit = self
            .rx_limiter
            .as_mut()
            .and_then(|l| throttle.map(|t| (l, (t.now(), t))));
        for _ in 0..WORK_BUDGET {
            let len = match self.rx_pending.take() {
                Some(len) => len,
                None => {
                    // Frames are charged once read (their size is not known before), so an
                    // empty bucket leaves the next ones in the tap, never dropped.
                    if let Some((limiter, (now, throttle))) = &mut limit {
                        let wait = limiter.wait_for(1, *now);
                        if !wait.is_zero() {
                            throttle.park(RX, wait);
                            out_of_budget = false;
                            break;
                        }
                    }
                    match read_frame_from(self.backend.as_mut(), &mut self.rx_buf) {
                        Ok(Some(len)) => {
                            if let Some((limiter, (now, _))) = &mut limit {
                                limiter.charge(len as u64, *now);
                            }
                            len
                        }
                        Ok(None) => {
                            self.counters.add(&self.counters.errors, 1);
                            continue;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            out_of_budget = false;
                            break;
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(DeviceError::Backend(e)),
                    }
                }
            };
            let frame = &mut self.rx_buf[..len];
            match deliver(queue, mem, frame, *mergeable, &self.counters)? {
                Delivery::Done => delivered = true,
                Delivery::Dropped => {}
                Delivery::NoBuffers => {
                    self.rx_pending = Some(len);
                    // Ask for a kick when buffers arrive; if some arrived meanwhile, go on.
                    if !wait_for_more_buffers(queue, mem)? {
                        continue;
                    }
                    out_of_budget = false;
                    break;
                }
            }
        }
        if out_of_budget {
            // Frames may be left on the tap, and its edge-triggered event will not come again.
            self.unfinished.insert(RX);
        }
        if delivered
            && queue
                .needs_notification(mem)
                .map_err(|_| DeviceError::BrokenQueue(RX))?
        {
            ctx.interrupt.signal_used_queue();
        }
        Ok(())
    }
}

/// After [`deliver`] put back chains that were too few for a frame: asks the driver to kick
/// when it adds buffers. `Ok(false)` when some were added meanwhile (try again now).
///
/// virtio-queue's `enable_notification` cannot serve here: it compares against (and, with
/// EVENT_IDX, publishes) the position we rolled back to, which would report "more buffers"
/// forever and never get a kick. So we publish the driver's current index ourselves.
fn wait_for_more_buffers(queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, DeviceError> {
    use std::sync::atomic::Ordering;
    let broken = |_| DeviceError::BrokenQueue(RX);
    let seen = queue.avail_idx(mem, Ordering::Acquire).map_err(broken)?;
    if queue.event_idx_enabled() {
        // avail_event sits after the used ring's entries (virtio 1.2 §2.7.10).
        let offset = 4 + 8 * u64::from(queue.size());
        let addr =
            vm_memory::Address::checked_add(&vm_memory::GuestAddress(queue.used_ring()), offset);
        let addr = addr.ok_or(DeviceError::BrokenQueue(RX))?;
        vm_memory::Bytes::store(mem, u16::to_le(seen.0), addr, Ordering::Release)
            .map_err(|_| DeviceError::BrokenQueue(RX))?;
    } else {
        queue.enable_notification(mem).map_err(broken)?;
    }
    std::sync::atomic::fence(Ordering::SeqCst);
    Ok(queue.avail_idx(mem, Ordering::Acquire).map_err(broken)? == seen)
}

/// Copies a tx chain's readable bytes (header + frame) into `buf`; `None` if malformed.
fn read_frame(
    chain: super::queue_worker::Chain<'_>,
    mem: &GuestMemoryMmap,
    buf: &mut [u8],
) -> Option<usize> {
    let mut reader = chain.reader(mem).ok()?;
    let len = reader.available_bytes();
    if !(VNET_HDR_LEN..=buf.len()).contains(&len) {
        return None;
    }
    io::Read::read_exact(&mut reader, &mut buf[..len]).ok()?;
    Some(len)
}

/// Reads one frame from `backend` into `buf` (sized for the largest frame): `Ok(None)` for a
/// frame the device cannot use (shorter than the virtio-net header, or a backend claiming more
/// bytes than the buffer holds), which is dropped.
fn read_frame_from(backend: &mut dyn NetBackend, buf: &mut [u8]) -> io::Result<Option<usize>> {
    let len = backend.recv(buf)?;
    Ok((VNET_HDR_LEN..=buf.len()).contains(&len).then_some(len))
}

enum Delivery {
    Done,
    Dropped,
    NoBuffers,
}

/// Chains taken from the rx queue for one frame, not yet on the used ring. Chains the device
/// cannot write into are held back too once a usable one was taken, so that a rollback can
/// give every position back (a used entry cannot be taken back) and so that their empty used
/// entries come after the frame's (a mergeable frame's buffers must be consecutive).
struct Gathered<'a> {
    usable: Vec<(u16, virtio_queue::Writer<'a>)>,
    unusable: Vec<u16>,
    capacity: usize,
}

impl Gathered<'_> {
    fn taken(&self) -> usize {
        self.usable.len() + self.unusable.len()
    }

    /// Puts every chain back on the available ring (nothing was written into any).
    fn roll_back(self, queue: &mut Queue) {
        for _ in 0..self.taken() {
            queue.go_to_previous_position();
        }
    }

    /// Returns the unusable chains empty, each counted as an error.
    fn release_unusable(
        unusable: Vec<u16>,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        counters: &DeviceCounters,
    ) -> Result<(), DeviceError> {
        for head in unusable {
            queue
                .add_used(mem, head, 0)
                .map_err(|_| DeviceError::BrokenQueue(RX))?;
            counters.add(&counters.errors, 1);
        }
        Ok(())
    }
}

/// Puts one frame into the rx queue: several chains when `mergeable` (num_buffers says how
/// many), else one chain that must hold it whole. A frame that even the whole ring cannot hold
/// is dropped: waiting for buffers would stall rx forever, as the driver has no room left.
fn deliver(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    frame: &mut [u8],
    mergeable: bool,
    counters: &DeviceCounters,
) -> Result<Delivery, DeviceError> {
    let broken = |_| DeviceError::BrokenQueue(RX);
    let mut got = Gathered {
        usable: Vec::new(),
        unusable: Vec::new(),
        capacity: 0,
    };
    while got.capacity < frame.len() {
        let Some(chain) = queue.iter(mem).map_err(broken)?.next() else {
            let ring_full = got.taken() >= usize::from(queue.size());
            got.roll_back(queue);
            if ring_full {
                counters.add(&counters.errors, 1);
                return Ok(Delivery::Dropped);
            }
            return Ok(Delivery::NoBuffers);
        };
        let head = chain.head_index();
        match chain.writer(mem) {
            Ok(w) if w.available_bytes() > 0 => {
                got.capacity = got.capacity.saturating_add(w.available_bytes());
                got.usable.push((head, w));
            }
            // Nothing taken before it: it can go back empty at once.
            _ if got.usable.is_empty() => {
                Gathered::release_unusable(vec![head], queue, mem, counters)?;
            }
            _ => got.unusable.push(head),
        }
        if !mergeable && got.capacity < frame.len() && !got.usable.is_empty() {
            // Without mergeable buffers one chain must hold the frame: drop it.
            for (head, _) in got.usable {
                queue.add_used(mem, head, 0).map_err(broken)?;
            }
            Gathered::release_unusable(got.unusable, queue, mem, counters)?;
            counters.add(&counters.errors, 1);
            return Ok(Delivery::Dropped);
        }
    }
    write_frame(queue, mem, frame, got.usable, counters)?;
    Gathered::release_unusable(got.unusable, queue, mem, counters)?;
    Ok(Delivery::Done)
}

/// Writes `frame` across `chains` (which hold it) and puts them on the used ring, setting
/// num_buffers: bytes 10..12 of virtio_net_hdr_v1 (§5.1.6).
fn write_frame(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    frame: &mut [u8],
    chains: Vec<(u16, virtio_queue::Writer<'_>)>,
    counters: &DeviceCounters,
) -> Result<(), DeviceError> {
    let n = u16::try_from(chains.len()).unwrap_or(u16::MAX);
    if let Some(num_buffers) = frame.get_mut(10..12) {
        num_buffers.copy_from_slice(&n.to_le_bytes());
    }
    let mut offset = 0;
    for (head, mut writer) in chains {
        let rest = frame.get(offset..).unwrap_or_default();
        let take = writer.available_bytes().min(rest.len());
        if io::Write::write_all(&mut writer, &rest[..take]).is_err() {
            counters.add(&counters.errors, 1);
        }
        offset += take;
        let len = u32::try_from(take).unwrap_or(u32::MAX);
        queue
            .add_used(mem, head, len)
            .map_err(|_| DeviceError::BrokenQueue(RX))?;
    }
    counters.add(&counters.requests, 1);
    counters.add(&counters.bytes_written, frame.len() as u64);
    Ok(())
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_id::NET
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }
    fn offered_features(&self) -> u64 {
        let base = features::VERSION_1
            | features::RING_EVENT_IDX
            | features::RING_INDIRECT_DESC
            | feature::MAC
            | feature::STATUS
            | feature::MRG_RXBUF
            | if self.announces_mtu { feature::MTU } else { 0 };
        if self.backend.takes_vnet_offloads() {
            base | OFFLOAD_FEATURES
        } else {
            base
        }
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data);
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), DeviceError> {
        // A driver cannot ack what was not offered (the transport masks it); masked again so
        // that a backend without offloads is never asked for any.
        let acked = ctx.acked_features & self.offered_features();
        let mut offloads = 0;
        if acked & feature::GUEST_CSUM != 0 {
            offloads |= TUN_F_CSUM;
            if acked & feature::GUEST_TSO4 != 0 {
                offloads |= TUN_F_TSO4;
            }
            if acked & feature::GUEST_TSO6 != 0 {
                offloads |= TUN_F_TSO6;
            }
        }
        self.backend
            .set_offloads(offloads)
            .map_err(DeviceError::Backend)?;
        self.state = State::Active {
            ctx,
            mergeable: acked & feature::MRG_RXBUF != 0,
        };
        // Frames may already be waiting on the tap.
        self.process_rx()
    }
    fn process_queue(&mut self, index: usize) -> Result<(), DeviceError> {
        match index {
            RX => self.process_rx(),
            TX => self.process_tx(),
            _ => Ok(()),
        }
    }
    fn backend_fd(&self) -> Option<std::os::unix::io::RawFd> {
        self.backend.fd()
    }
    fn process_backend(&mut self) -> Result<(), DeviceError> {
        self.process_rx()
    }
    fn take_unfinished(&mut self) -> QueueSet {
        std::mem::take(&mut self.unfinished)
    }
    fn timer_fd(&self) -> Option<std::os::unix::io::RawFd> {
        self.throttle.as_ref().map(Throttle::fd)
    }
    fn timer_expired(&mut self) {
        if let Some(t) = &mut self.throttle {
            for q in t.expired().iter() {
                self.unfinished.insert(q);
            }
        }
    }
    fn set_rate_limit(&mut self, index: usize, config: RateLimitConfig) -> bool {
        let Some(t) = &self.throttle else {
            return false;
        };
        let limiter = limiter_for(config, t.now());
        match index {
            RX => self.rx_limiter = limiter,
            TX => self.tx_limiter = limiter,
            _ => return false,
        }
        true
    }
    fn reset(&mut self) {
        self.state = State::Inactive;
        self.rx_pending = None;
        self.unfinished = QueueSet::default();
        if let Some(t) = &mut self.throttle {
            t.clear();
        }
    }
    fn counters(&self) -> &DeviceCounters {
        &self.counters
    }
}

#[cfg(test)]
mod tests;
