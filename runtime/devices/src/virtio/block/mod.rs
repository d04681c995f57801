//! virtio-blk (virtio 1.2 §5.2): a raw or qcow2 image (with its backing chain) as a disk. One request queue; read-only
//! disks; flush; discard and write-zeroes; get-id (serial).
//!
//! A device can also be a *slot* ([`Block::empty_slot`]): a disk drive with no medium at boot,
//! which the VMM fills ([`Block::insert_medium`]) or empties ([`Block::eject_medium`]) while
//! the guest runs. The guest learns of the new capacity through a configuration-change
//! interrupt (see [`VirtioDevice::take_config_changed`]). Features are fixed once the driver
//! negotiated them, so a slot offers what any medium could need (flush, discard,
//! write-zeroes) and never VIRTIO_BLK_F_RO: a read-only medium in a slot answers writes with
//! IOERR instead of being announced read-only.

pub mod backend;
pub mod format;
pub mod guest_buffers;
mod medium;
pub mod qcow2;
pub mod request;

use std::path::Path;

use backend::{DiskBackend, RawFile};
pub use medium::MediumError;
use medium::NoMedium;
use request::{DiskLimits, ID_BYTES, SECTOR_SIZE};

use super::queue_worker::{chain_bytes, serve_queue_gated, Gated, Progress};
use super::throttle::{limiter_for, new_throttle, Clock, Throttle};
use super::{
    device_id, features, ActivateContext, DeviceCounters, DeviceError, QueueSet, VirtioDevice,
    WORK_BUDGET,
};
use crate::rate_limiter::{RateLimitConfig, RateLimiter};

/// Feature bits (§5.2.3).
mod feature {
    pub const SEG_MAX: u64 = 1 << 2;
    pub const RO: u64 = 1 << 5;
    pub const BLK_SIZE: u64 = 1 << 6;
    pub const FLUSH: u64 = 1 << 9;
    pub const DISCARD: u64 = 1 << 13;
    pub const WRITE_ZEROES: u64 = 1 << 14;
}

const QUEUE_SIZE: u16 = 256;
/// Data segments per request the driver may use (the chain adds header and status).
const SEG_MAX: u32 = 126;
/// Bytes of a request that are not data: the 16-byte header and the status byte.
const REQUEST_OVERHEAD: u64 = 17;
/// Sectors one discard / write-zeroes request may cover (4 GiB - 512).
const MAX_DISCARD_SECTORS: u32 = u32::MAX / 512;

enum State {
    Inactive,
    Active { ctx: ActivateContext },
}

/// A virtio-blk device.
pub struct Block {
    disk: Box<dyn DiskBackend>,
    limits: DiskLimits,
    config: [u8; 60],
    state: State,
    counters: DeviceCounters,
    /// Queues left with work when the budget ran out.
    unfinished: QueueSet,
    /// The request queue's limiter (`None`: unlimited, the default).
    limiter: Option<RateLimiter>,
    /// The limiter's timer; `None` only if the timerfd could not be created.
    throttle: Option<Throttle>,
    /// A slot whose medium changes at run time (see the module documentation).
    slot: bool,
    /// Whether `disk` is a real medium (always true outside slots).
    has_medium: bool,
    /// The configuration space changed since the transport last asked.
    config_changed: bool,
}

impl Block {
    /// A disk backed by the raw image at `path`. `serial` is what the guest reads with get-id
    /// (at most 20 bytes; /sys/block/vdX/serial in Linux).
    pub fn open(path: &Path, read_only: bool, serial: &str) -> std::io::Result<Self> {
        let file = RawFile::open(path, read_only)?;
        Ok(Self::new(Box::new(file), read_only, serial))
    }

    /// A disk on any backend.
    pub fn new(disk: Box<dyn DiskBackend>, read_only: bool, serial: &str) -> Self {
        let capacity_sectors = disk.size() / SECTOR_SIZE;
        Self {
            config: config_space(capacity_sectors),
            limits: disk_limits(disk.as_ref(), read_only, serial),
            disk,
            state: State::Inactive,
            counters: DeviceCounters::default(),
            unfinished: QueueSet::default(),
            limiter: None,
            throttle: new_throttle(),
            slot: false,
            has_medium: true,
            config_changed: false,
        }
    }

    /// A slot with no medium: capacity 0, every I/O request fails with IOERR until
    /// [`Block::insert_medium`]. `serial` is the get-id answer while it is empty.
    pub fn empty_slot(serial: &str) -> Self {
        let mut block = Self::new(Box::new(NoMedium), false, serial);
        block.slot = true;
        block.has_medium = false;
        block
    }

    /// What the guest reads with get-id.
    pub fn serial(&self) -> String {
        serial_of(&self.limits.id)
    }

    /// Whether this device is a slot, and whether it holds a medium now.
    pub fn is_slot(&self) -> bool {
        self.slot
    }
    pub fn has_medium(&self) -> bool {
        self.has_medium
    }

    /// Puts `disk` into an empty slot: the guest sees its capacity after the
    /// configuration-change interrupt. A `read_only` medium answers writes, discards and
    /// write-zeroes with IOERR (the slot cannot announce VIRTIO_BLK_F_RO after negotiation).
    pub fn insert_medium(
        &mut self,
        disk: Box<dyn DiskBackend>,
        read_only: bool,
        serial: &str,
    ) -> Result<(), MediumError> {
        if !self.slot {
            return Err(MediumError::NotASlot);
        }
        if self.has_medium {
            return Err(MediumError::Occupied);
        }
        self.set_medium(disk, read_only, serial);
        self.has_medium = true;
        Ok(())
    }

    /// Takes the medium out of a slot (capacity 0 again) and gives it back; requests the guest
    /// sends from now on fail with IOERR.
    pub fn eject_medium(&mut self) -> Result<Box<dyn DiskBackend>, MediumError> {
        if !self.slot {
            return Err(MediumError::NotASlot);
        }
        if !self.has_medium {
            return Err(MediumError::Empty);
        }
        let serial = self.serial();
        let old = self.set_medium(Box::new(NoMedium), false, &serial);
        self.has_medium = false;
        Ok(old)
    }

    /// Swaps the backend and the limits and capacity that follow from it; returns the old one.
    fn set_medium(
        &mut self,
        disk: Box<dyn DiskBackend>,
        read_only: bool,
        serial: &str,
    ) -> Box<dyn DiskBackend> {
        self.limits = disk_limits(disk.as_ref(), read_only, serial);
        let capacity = self.capacity_sectors().to_le_bytes();
        self.config[0..8].copy_from_slice(&capacity);
        self.config_changed = true;
        std::mem::replace(&mut self.disk, disk)
    }

    /// Sets the rate limit of the request queue (see [`VirtioDevice::set_rate_limit`]).
    pub fn with_rate_limit(mut self, config: RateLimitConfig) -> Self {
        self.set_rate_limit(0, config);
        self
    }

    /// Replaces the limiter's clock (tests).
    pub fn set_clock(&mut self, clock: Clock) {
        if let Some(t) = &mut self.throttle {
            t.set_clock(clock);
        }
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.limits.capacity_bytes / SECTOR_SIZE
    }
}

/// What requests to `disk` may do.
fn disk_limits(disk: &dyn DiskBackend, read_only: bool, serial: &str) -> DiskLimits {
    let mut id = [0u8; ID_BYTES];
    let n = serial.len().min(ID_BYTES);
    id[..n].copy_from_slice(&serial.as_bytes()[..n]);
    DiskLimits {
        capacity_bytes: disk.size() / SECTOR_SIZE * SECTOR_SIZE,
        read_only,
        max_descriptors: SEG_MAX as usize + 2,
        id,
    }
}

/// The serial a get-id answer holds (up to its first NUL).
fn serial_of(id: &[u8; ID_BYTES]) -> String {
    let end = id.iter().position(|b| *b == 0).unwrap_or(ID_BYTES);
    String::from_utf8_lossy(&id[..end]).into_owned()
}

/// struct virtio_blk_config (§5.2.4), little-endian.
fn config_space(capacity_sectors: u64) -> [u8; 60] {
    let mut c = [0u8; 60];
    c[0..8].copy_from_slice(&capacity_sectors.to_le_bytes());
    c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
    c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
    c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes()); // max_discard_sectors
    c[40..44].copy_from_slice(&1u32.to_le_bytes()); // max_discard_seg
    c[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
    c[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
    c[52..56].copy_from_slice(&1u32.to_le_bytes()); // max_write_zeroes_seg
    c[56] = 1; // write_zeroes_may_unmap
    c
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_id::BLOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn offered_features(&self) -> u64 {
        let mut f = features::VERSION_1
            | features::RING_EVENT_IDX
            | features::RING_INDIRECT_DESC
            | feature::SEG_MAX
            | feature::BLK_SIZE
            | feature::FLUSH;
        // A slot's media come and go after negotiation: it offers what a writable one needs.
        if self.limits.read_only && !self.slot {
            f |= feature::RO;
        } else {
            f |= feature::DISCARD | feature::WRITE_ZEROES;
        }
        f
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
        let Some(queue) = ctx.queues.get_mut(index) else {
            return Ok(());
        };
        let (disk, limits, counters, mem) =
            (self.disk.as_ref(), &self.limits, &self.counters, &ctx.mem);
        // The clock is read once per turn, and only when limited.
        let throttle = self.throttle.as_ref();
        let mut gate = self
            .limiter
            .as_mut()
            .and_then(|l| throttle.map(|t| (l, t.now())));
        let outcome = serve_queue_gated(
            queue,
            index,
            mem,
            &ctx.interrupt,
            WORK_BUDGET,
            |chain| match &mut gate {
                None => Ok(()),
                Some((limiter, now)) => {
                    let data = chain_bytes(chain).saturating_sub(REQUEST_OVERHEAD);
                    limiter.consume(data, *now)
                }
            },
            |chain| request::serve(chain, mem, disk, limits, counters),
        )?;
        match outcome {
            Gated::Done(Progress::More) => self.unfinished.insert(index),
            Gated::Done(Progress::Idle) => {}
            Gated::Parked(wait) => {
                if let Some(t) = &mut self.throttle {
                    t.park(index, wait);
                }
            }
        }
        Ok(())
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
        if index != 0 {
            return false;
        }
        self.limiter = limiter_for(config, t.now());
        true
    }
    fn take_unfinished(&mut self) -> QueueSet {
        std::mem::take(&mut self.unfinished)
    }
    fn sync_backend(&mut self, closing: bool) -> std::io::Result<()> {
        if !self.has_medium || self.limits.read_only {
            return Ok(());
        }
        if closing {
            self.disk.close()
        } else {
            self.disk.quiesce()
        }
    }
    fn reset(&mut self) {
        self.state = State::Inactive;
        self.unfinished = QueueSet::default();
        if let Some(t) = &mut self.throttle {
            t.clear();
        }
    }
    fn counters(&self) -> &DeviceCounters {
        &self.counters
    }
    fn take_config_changed(&mut self) -> bool {
        std::mem::take(&mut self.config_changed)
    }
    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        Some(self)
    }
}

#[cfg(test)]
mod tests;
