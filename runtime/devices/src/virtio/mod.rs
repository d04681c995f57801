//! virtio (1.2, modern devices only): what every device implements, and the pieces the
//! transport shares with devices (interrupt status, counters).

pub mod balloon;
pub mod block;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod queue_worker;
pub mod rng;
pub mod throttle;
pub mod vsock;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;

use crate::GuestMemoryMmap;

/// Device IDs (virtio 1.2 §5).
pub mod device_id {
    pub const NET: u32 = 1;
    pub const BLOCK: u32 = 2;
    pub const RNG: u32 = 4;
    pub const BALLOON: u32 = 5;
    pub const VSOCK: u32 = 19;
    pub const FS: u32 = 26;
}

/// Feature bits shared by all devices (virtio 1.2 §6).
pub mod features {
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    pub const VERSION_1: u64 = 1 << 32;
}

/// Device status bits (virtio 1.2 §2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    pub const FAILED: u32 = 128;
}

/// Interrupt status bits (virtio 1.2 §4.2.2, InterruptStatus).
pub const INTERRUPT_USED_RING: u32 = 1;
pub const INTERRUPT_CONFIG_CHANGE: u32 = 2;

/// How a device raises its interrupt line; the VMM implements it with a KVM irqfd.
pub trait InterruptLine: Send + Sync {
    fn trigger(&self) -> std::io::Result<()>;
}

impl InterruptLine for vmm_sys_util::eventfd::EventFd {
    fn trigger(&self) -> std::io::Result<()> {
        self.write(1)
    }
}

/// The interrupt status register shared by a transport and its device.
pub struct VirtioInterrupt {
    status: AtomicU32,
    line: Box<dyn InterruptLine>,
}

impl VirtioInterrupt {
    pub fn new(line: Box<dyn InterruptLine>) -> Self {
        Self {
            status: AtomicU32::new(0),
            line,
        }
    }

    /// The device put buffers in a used ring.
    pub fn signal_used_queue(&self) {
        self.raise(INTERRUPT_USED_RING);
    }

    /// The device changed its configuration space.
    pub fn signal_config_change(&self) {
        self.raise(INTERRUPT_CONFIG_CHANGE);
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.line.trigger() {
            log::error!("cannot raise virtio interrupt: {e}");
        }
    }

    /// Value of the InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Sets status bits saved in a snapshot, without raising the line (the restored irqchip
    /// already holds the line's state).
    pub fn restore_status(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
    }

    /// The driver acknowledged these bits (InterruptACK).
    pub fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// Per-device counters, readable by the VMM's control side at any time.
#[derive(Default)]
pub struct DeviceCounters {
    /// Requests (descriptor chains) completed.
    pub requests: AtomicU64,
    /// Bytes the device read from guest buffers.
    pub bytes_read: AtomicU64,
    /// Bytes the device wrote into guest buffers.
    pub bytes_written: AtomicU64,
    /// Malformed requests and backend failures.
    pub errors: AtomicU64,
}

/// A point-in-time copy of [`DeviceCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    pub requests: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub errors: u64,
}

impl DeviceCounters {
    pub fn snapshot(&self) -> CounterSnapshot {
        CounterSnapshot {
            requests: self.requests.load(Ordering::Relaxed),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn add(&self, counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct ActivateContext {
    pub mem: GuestMemoryMmap,
    pub queues: Vec<Queue>,
    pub interrupt: Arc<VirtioInterrupt>,
    /// Features the driver accepted (a subset of what the device offered).
    pub acked_features: u64,
}

/// Why a device could not start or stopped working; the transport then sets DEVICE_NEEDS_RESET.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("the driver broke queue {0}'s rings")]
    BrokenQueue(usize),
    #[error("backend failed")]
    Backend(#[source] std::io::Error),
}

/// Most descriptor chains (or rx frames) a device serves per queue and per event-loop turn: a
/// guest that keeps a queue full must not starve the other devices or the control path. What
/// is left over is reported by [`VirtioDevice::take_unfinished`] and served on a later turn.
pub const WORK_BUDGET: usize = 64;

/// A set of queue indices (bit `i` is queue `i`; devices have far fewer than 64 queues).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueSet(u64);

impl QueueSet {
    /// Adds queue `index` (indices past 63 are ignored: no device has that many queues).
    pub fn insert(&mut self, index: usize) {
        if index < 64 {
            self.0 |= 1 << index;
        }
    }

    pub fn contains(&self, index: usize) -> bool {
        index < 64 && self.0 & (1 << index) != 0
    }

    pub fn is_empty(&self) -> bool {
        self.0 == 0
    }

    /// The queue indices in the set, in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        (0..64).filter(|i| self.contains(*i))
    }
}

/// How the VMM's event loop watches a device's backend fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendTrigger {
    /// Reported once per new readiness: the device reads until `WouldBlock`, or until it must
    /// wait for the guest, and then resumes by itself from `process_queue` when the guest adds
    /// buffers. Right for a tap, which stays readable while a frame waits for buffers.
    Edge,
    /// Reported as long as the fd is readable: right for an epoll fd the device drains itself,
    /// which is readable exactly while something in it is ready, so nothing left over for a
    /// later call can be missed.
    Level,
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// virtio device ID ([`device_id`]).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the number of entries is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features offered to the driver (must include [`features::VERSION_1`]).
    fn offered_features(&self) -> u64;
    /// Reads device configuration space at `offset`; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space; read-only by default (writes ignored).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver is ready: start serving the queues. The transport guarantees one queue per
    /// entry of [`VirtioDevice::queue_max_sizes`], in that order.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), DeviceError>;
    /// The guest notified queue `index` (from the transport or from the VMM's ioeventfd).
    fn process_queue(&mut self, index: usize) -> Result<(), DeviceError>;
    /// A file descriptor the VMM's event loop watches for this device's backend (a tap, or an
    /// epoll fd multiplexing many sockets); when it is readable the loop calls
    /// [`VirtioDevice::process_backend`]. Fixed for the device's life. How it is watched is
    /// [`VirtioDevice::backend_trigger`].
    fn backend_fd(&self) -> Option<std::os::unix::io::RawFd> {
        None
    }
    /// How the event loop watches [`VirtioDevice::backend_fd`].
    fn backend_trigger(&self) -> BackendTrigger {
        BackendTrigger::Edge
    }
    /// The backend fd is ready: move data between the backend and the queues.
    fn process_backend(&mut self) -> Result<(), DeviceError> {
        Ok(())
    }
    /// The backend fd is ready while the device is not active (before DRIVER_OK, after a reset,
    /// or while it needs a reset): drop what cannot be served, so that the fd stops being
    /// ready. A device with a [`BackendTrigger::Level`] fd must implement it, or the event loop
    /// spins; an edge-triggered fd needs nothing (the default).
    fn drain_backend(&mut self) {}
    /// Queues whose work was cut short by [`WORK_BUDGET`] since the last call (the set is then
    /// cleared): the event loop runs [`VirtioDevice::process_queue`] for them again on its next
    /// turn, after the other ready events.
    fn take_unfinished(&mut self) -> QueueSet {
        QueueSet::default()
    }
    /// A timer fd the VMM's event loop watches (level-triggered) for a rate-limited device;
    /// when it is readable the loop calls [`VirtioDevice::timer_expired`]. Fixed for the
    /// device's life.
    fn timer_fd(&self) -> Option<std::os::unix::io::RawFd> {
        None
    }
    /// The timer fired: the device clears it and reports the queues it had parked through
    /// [`VirtioDevice::take_unfinished`].
    fn timer_expired(&mut self) {}
    /// Replaces the rate limit of queue `index` (full buckets; an unlimited config removes
    /// it). `false` when the device cannot limit that queue. The caller then notifies the
    /// device's queues, so that a parked queue runs under the new limit at once.
    fn set_rate_limit(
        &mut self,
        _index: usize,
        _config: crate::rate_limiter::RateLimitConfig,
    ) -> bool {
        false
    }
    /// The driver reset the device: drop the queues and go back to the initial state.
    fn reset(&mut self);
    /// Makes what the device wrote to its backend durable and self-consistent on the host (a
    /// disk: its flush, so a qcow2 image's tables are written back). Called while the VM is
    /// paused, before a snapshot, and with `closing` once the event loop has stopped, as the
    /// last thing before the VMM exits (a qcow2 image then also returns its unused clusters).
    fn sync_backend(&mut self, _closing: bool) -> std::io::Result<()> {
        Ok(())
    }
    /// The device was just re-activated from a snapshot (after [`VirtioDevice::activate`]):
    /// tell the driver whatever it must learn (vsock: TRANSPORT_RESET). Nothing by default.
    fn restored(&mut self) {}
    /// The device's own state for a snapshot, beyond its queues and features (which the
    /// transport saves): empty for devices that keep none.
    fn save_device_state(&self) -> Vec<u8> {
        Vec::new()
    }
    /// Puts back what [`VirtioDevice::save_device_state`] gave, before the device is
    /// re-activated. An empty `state` (a device that saved none, or an older snapshot) is
    /// accepted by every device; a damaged one is refused with a reason.
    fn restore_device_state(&mut self, state: &[u8]) -> Result<(), String> {
        if state.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} bytes of state for a device that keeps none",
                state.len()
            ))
        }
    }
    /// The device's counters.
    fn counters(&self) -> &DeviceCounters;
    /// Connections the device holds open now (vsock); `None` for devices without any.
    fn open_connections(&self) -> Option<u64> {
        None
    }
    /// Whether the device changed its configuration space since the last call (a disk slot
    /// got or lost its medium); the transport then bumps ConfigGeneration and raises the
    /// configuration-change interrupt. Polled by [`mmio::MmioTransport::update_device`].
    fn take_config_changed(&mut self) -> bool {
        false
    }
    /// The device as `Any`, for a VMM that must reach one device type's own operations
    /// (a disk slot's medium) through the transport. `None` by default.
    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        None
    }
}

/// Copies `config` bytes at `offset` into `data`; what lies past the end reads as zero.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

#[cfg(test)]
pub(crate) mod test_utils;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_past_the_end_are_zero_and_never_panic() {
        let config = [1u8, 2, 3, 4];
        let mut buf = [0xffu8; 4];
        read_config_bytes(&config, 2, &mut buf);
        assert_eq!(buf, [3, 4, 0, 0]);
        read_config_bytes(&config, 100, &mut buf);
        assert_eq!(buf, [0; 4]);
        read_config_bytes(&config, u64::MAX, &mut buf);
        assert_eq!(buf, [0; 4]);
    }

    #[test]
    fn queue_sets_hold_small_indices_and_ignore_impossible_ones() {
        let mut set = QueueSet::default();
        assert!(set.is_empty());
        set.insert(0);
        set.insert(2);
        set.insert(64);
        set.insert(usize::MAX);
        assert!(set.contains(2) && !set.contains(1) && !set.contains(64));
        assert_eq!(set.iter().collect::<Vec<_>>(), [0, 2]);
    }

    #[test]
    fn interrupt_status_is_set_by_signals_and_cleared_by_acks() {
        let irq = VirtioInterrupt::new(Box::new(test_utils::CountingLine::default()));
        irq.signal_used_queue();
        irq.signal_config_change();
        assert_eq!(irq.status(), INTERRUPT_USED_RING | INTERRUPT_CONFIG_CHANGE);
        irq.acknowledge(INTERRUPT_USED_RING);
        assert_eq!(irq.status(), INTERRUPT_CONFIG_CHANGE);
    }
}
