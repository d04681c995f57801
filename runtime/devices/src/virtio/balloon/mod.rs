//! virtio-balloon (virtio 1.2 §5.5): the host asks the guest to give up memory down to a
//! target, learns how the guest uses its memory, and takes back the pages the guest frees.
//!
//! - **Inflate/deflate**: the host sets `num_pages` (the balloon's target size, in 4 KiB pages)
//!   and raises the configuration interrupt; the driver allocates that many pages, sends their
//!   frame numbers on the inflate queue, and writes how many it holds to `actual`. Each inflated
//!   page is discarded on the host ([`discard`]). Deflated pages need nothing: the guest faults
//!   them back in by touching them. With DEFLATE_ON_OOM the guest deflates by itself under
//!   memory pressure instead of invoking its OOM killer.
//! - **Statistics** (STATS_VQ): the driver keeps one buffer of (tag, value) pairs on the stats
//!   queue. The device holds it; [`Balloon::request_stats`] hands it back, and the driver
//!   refills it with fresh numbers and queues it again. So statistics are as fresh as the last
//!   request (huskd asks on every describe): no timer runs in the VMM for them.
//! - **Free page reporting** (PAGE_REPORTING): the driver sends ranges of free memory (2 MiB
//!   blocks and larger, as its buddy allocator merges them) and the device discards them: an
//!   idle guest's RSS shrinks back to what it uses, without the host choosing a target.
//!
//! Queue numbering follows Linux's driver, which numbers only the queues whose feature was
//! negotiated (the specification's fixed numbers, 2 for stats and 4 for reporting, are not what
//! drivers do): inflate 0, deflate 1, then stats if negotiated, then reporting.
//!
//! A hostile driver can make the device discard only guest RAM (every range is checked), and at
//! most [`MAX_PFNS_PER_CHAIN`] pages per chain; it cannot make the host allocate anything.

pub mod discard;

use std::io::Read;
use std::time::{Duration, Instant};

use prost::Message;
use virtio_queue::{Queue, QueueOwnedT, QueueT};

use self::discard::{PageDiscard, PAGE_SIZE};
use super::queue_worker::{serve_queue_bounded, Chain, Progress};
use super::{
    device_id, features, ActivateContext, DeviceCounters, DeviceError, QueueSet, VirtioDevice,
    WORK_BUDGET,
};
use crate::GuestMemoryMmap;

/// Feature bits (virtio 1.2 §5.5.3).
pub mod feature {
    pub const STATS_VQ: u64 = 1 << 1;
    pub const DEFLATE_ON_OOM: u64 = 1 << 2;
    pub const PAGE_REPORTING: u64 = 1 << 5;
}

/// Statistics tags (virtio 1.2 §5.5.6.3), with the names husk reports them under.
pub const STAT_NAMES: [(u16, &str); 10] = [
    (0, "swap_in"),
    (1, "swap_out"),
    (2, "major_faults"),
    (3, "minor_faults"),
    (4, "free_memory"),
    (5, "total_memory"),
    (6, "available_memory"),
    (7, "disk_caches"),
    (8, "hugetlb_allocations"),
    (9, "hugetlb_failures"),
];

const QUEUE_SIZE: u16 = 256;
/// Inflate, deflate, stats, reporting: the most a driver can set up.
const QUEUE_SIZES: [u16; 4] = [QUEUE_SIZE; 4];
/// Most page frame numbers read from one inflate or deflate chain (Linux sends at most 256).
pub const MAX_PFNS_PER_CHAIN: usize = 4096;
/// Most statistics read from one stats buffer (Linux sends 10; newer kernels a few more).
const MAX_STATS: usize = 64;
/// Bytes of one statistic: le16 tag, le64 value, packed.
const STAT_BYTES: usize = 10;
/// Configuration space: num_pages, actual, free_page_hint_cmd_id, poison_val (le32 each).
const CONFIG_BYTES: usize = 16;

/// Which optional parts of the device are offered to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalloonFeatures {
    pub stats: bool,
    pub free_page_reporting: bool,
    pub deflate_on_oom: bool,
}

impl Default for BalloonFeatures {
    /// Everything on: statistics, free page reporting, deflate on OOM.
    fn default() -> Self {
        Self {
            stats: true,
            free_page_reporting: true,
            deflate_on_oom: true,
        }
    }
}

impl BalloonFeatures {
    fn bits(self) -> u64 {
        let mut bits = features::VERSION_1 | features::RING_INDIRECT_DESC;
        if self.stats {
            bits |= feature::STATS_VQ;
        }
        if self.free_page_reporting {
            bits |= feature::PAGE_REPORTING;
        }
        if self.deflate_on_oom {
            bits |= feature::DEFLATE_ON_OOM;
        }
        bits
    }
}

/// What a queue is for, by its index and the negotiated features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Inflate,
    Deflate,
    Stats,
    Reporting,
}

fn role_of(acked: u64, index: usize) -> Option<Role> {
    let mut roles = vec![Role::Inflate, Role::Deflate];
    if acked & feature::STATS_VQ != 0 {
        roles.push(Role::Stats);
    }
    if acked & feature::PAGE_REPORTING != 0 {
        roles.push(Role::Reporting);
    }
    roles.get(index).copied()
}

/// The balloon's state a snapshot keeps (the transport keeps the queues). The stats buffer the
/// device held is not recorded: saving the transport rewinds the stats queue to its used index,
/// so a restored device finds the buffer available again ([`VirtioDevice::restored`]).
#[derive(Clone, PartialEq, Message)]
pub struct BalloonState {
    #[prost(uint32, tag = "1")]
    pub target_pages: u32,
    #[prost(uint32, tag = "2")]
    pub actual_pages: u32,
}

/// What the device knows, for the VMM's describe.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BalloonReport {
    /// Pages the host asked the guest to give up.
    pub target_pages: u32,
    /// Pages the guest says it holds in the balloon.
    pub actual_pages: u32,
    /// The guest's last statistics, as (tag, value), and how old they are.
    pub stats: Vec<(u16, u64)>,
    pub stats_age: Option<Duration>,
    /// Pages the guest inflated and deflated since the VMM started.
    pub inflated_pages: u64,
    pub deflated_pages: u64,
    /// Bytes of free memory the guest reported (and the host discarded).
    pub reported_bytes: u64,
    /// Whether the driver accepted statistics and free page reporting.
    pub stats_enabled: bool,
    pub reporting_enabled: bool,
}

enum State {
    Inactive,
    Active {
        ctx: ActivateContext,
        /// The stats buffer the device holds until it wants fresh numbers.
        stats_head: Option<u16>,
    },
}

/// The virtio-balloon device.
pub struct Balloon {
    offered: u64,
    target_pages: u32,
    actual_pages: u32,
    config_changed: bool,
    discard: Box<dyn PageDiscard>,
    state: State,
    stats: Vec<(u16, u64)>,
    stats_at: Option<Instant>,
    inflated_pages: u64,
    deflated_pages: u64,
    reported_bytes: u64,
    counters: DeviceCounters,
    unfinished: QueueSet,
}

impl Balloon {
    pub fn new(features: BalloonFeatures, discard: Box<dyn PageDiscard>) -> Self {
        Self {
            offered: features.bits(),
            target_pages: 0,
            actual_pages: 0,
            config_changed: false,
            discard,
            state: State::Inactive,
            stats: Vec::new(),
            stats_at: None,
            inflated_pages: 0,
            deflated_pages: 0,
            reported_bytes: 0,
            counters: DeviceCounters::default(),
            unfinished: QueueSet::default(),
        }
    }

    /// Asks the guest to hold `pages` 4 KiB pages in the balloon (0: give everything back).
    /// The transport raises the configuration interrupt (see
    /// [`crate::virtio::mmio::MmioTransport::update_device`]).
    pub fn set_target_pages(&mut self, pages: u32) {
        if pages != self.target_pages {
            self.target_pages = pages;
            self.config_changed = true;
        }
    }

    /// The device's numbers now.
    pub fn report(&self) -> BalloonReport {
        let acked = match &self.state {
            State::Active { ctx, .. } => ctx.acked_features,
            State::Inactive => 0,
        };
        BalloonReport {
            target_pages: self.target_pages,
            actual_pages: self.actual_pages,
            stats: self.stats.clone(),
            stats_age: self.stats_at.map(|t| t.elapsed()),
            inflated_pages: self.inflated_pages,
            deflated_pages: self.deflated_pages,
            reported_bytes: self.reported_bytes,
            stats_enabled: acked & feature::STATS_VQ != 0,
            reporting_enabled: acked & feature::PAGE_REPORTING != 0,
        }
    }

    /// Hands the held stats buffer back to the driver, which answers with fresh statistics.
    /// Nothing happens when the device holds none (statistics not negotiated, or a request is
    /// already out).
    pub fn request_stats(&mut self) -> Result<(), DeviceError> {
        let State::Active { ctx, stats_head } = &mut self.state else {
            return Ok(());
        };
        let Some(head) = stats_head.take() else {
            return Ok(());
        };
        let Some(index) = stats_queue(ctx.acked_features) else {
            return Ok(());
        };
        let Some(queue) = ctx.queues.get_mut(index) else {
            return Ok(());
        };
        let broken = |_| DeviceError::BrokenQueue(index);
        queue.add_used(&ctx.mem, head, 0).map_err(broken)?;
        if queue.needs_notification(&ctx.mem).map_err(broken)? {
            ctx.interrupt.signal_used_queue();
        }
        Ok(())
    }

    /// Reads up to [`MAX_PFNS_PER_CHAIN`] page frame numbers from a chain's readable buffers.
    fn read_pfns(mem: &GuestMemoryMmap, chain: Chain<'_>) -> Option<Vec<u32>> {
        let mut reader = chain.reader(mem).ok()?;
        let len = reader.available_bytes().min(MAX_PFNS_PER_CHAIN * 4);
        let mut bytes = vec![0u8; len - len % 4];
        reader.read_exact(&mut bytes).ok()?;
        Some(
            bytes
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        )
    }

    /// Discards the pages `pfns` names, one madvise per run of consecutive frames.
    fn discard_pfns(
        discard: &mut dyn PageDiscard,
        counters: &DeviceCounters,
        mem: &GuestMemoryMmap,
        pfns: &[u32],
    ) {
        for (first, count) in runs(pfns) {
            let addr = u64::from(first) * PAGE_SIZE;
            if let Err(e) = discard.discard(mem, addr, count * PAGE_SIZE) {
                counters.add(&counters.errors, 1);
                crate::warn_limited!("balloon: {e}");
            }
        }
    }

    fn parse_stats(mem: &GuestMemoryMmap, chain: Chain<'_>) -> Option<Vec<(u16, u64)>> {
        let mut reader = chain.reader(mem).ok()?;
        let len = reader.available_bytes().min(MAX_STATS * STAT_BYTES);
        let mut bytes = vec![0u8; len - len % STAT_BYTES];
        reader.read_exact(&mut bytes).ok()?;
        Some(
            bytes
                .chunks_exact(STAT_BYTES)
                .map(|s| {
                    let tag = u16::from_le_bytes([s[0], s[1]]);
                    let mut value = [0u8; 8];
                    value.copy_from_slice(&s[2..]);
                    (tag, u64::from_le_bytes(value))
                })
                .collect(),
        )
    }

    /// Takes the driver's stats buffer: records its numbers and holds it. A second buffer while
    /// one is held breaks the protocol; the older one goes back unread.
    fn take_stats(&mut self, index: usize) -> Result<(), DeviceError> {
        let State::Active { ctx, stats_head } = &mut self.state else {
            return Ok(());
        };
        let Some(queue) = ctx.queues.get_mut(index) else {
            return Ok(());
        };
        let broken = |_| DeviceError::BrokenQueue(index);
        let mem = &ctx.mem;
        let mut returned = false;
        // A driver keeps one buffer out; a few more are tolerated, and the walk is bounded.
        for _ in 0..WORK_BUDGET {
            let Some(chain) = queue.iter(mem).map_err(broken)?.next() else {
                break;
            };
            let head = chain.head_index();
            match Self::parse_stats(mem, chain) {
                Some(stats) => {
                    self.counters
                        .add(&self.counters.bytes_read, (stats.len() * STAT_BYTES) as u64);
                    self.counters.add(&self.counters.requests, 1);
                    self.stats = stats;
                    self.stats_at = Some(Instant::now());
                }
                None => self.counters.add(&self.counters.errors, 1),
            }
            if let Some(old) = stats_head.replace(head) {
                queue.add_used(mem, old, 0).map_err(broken)?;
                returned = true;
            }
        }
        if returned && queue.needs_notification(mem).map_err(broken)? {
            ctx.interrupt.signal_used_queue();
        }
        Ok(())
    }
}

/// The stats queue's index under `acked` features, if statistics were negotiated.
fn stats_queue(acked: u64) -> Option<usize> {
    (0..QUEUE_SIZES.len()).find(|&i| role_of(acked, i) == Some(Role::Stats))
}

/// Runs of consecutive frame numbers, as (first, count), in the order given.
fn runs(pfns: &[u32]) -> Vec<(u32, u64)> {
    let mut out: Vec<(u32, u64)> = Vec::new();
    for &pfn in pfns {
        match out.last_mut() {
            Some((first, count)) if u64::from(*first) + *count == u64::from(pfn) => *count += 1,
            _ => out.push((pfn, 1)),
        }
    }
    out
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        device_id::BALLOON
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }
    fn offered_features(&self) -> u64 {
        self.offered
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; CONFIG_BYTES];
        config[0..4].copy_from_slice(&self.target_pages.to_le_bytes());
        config[4..8].copy_from_slice(&self.actual_pages.to_le_bytes());
        super::read_config_bytes(&config, offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (bytes 4..8) is the driver's to write.
        let mut actual = self.actual_pages.to_le_bytes();
        for (i, byte) in data.iter().enumerate() {
            let at = offset.saturating_add(i as u64);
            if (4..8).contains(&at) {
                actual[(at - 4) as usize] = *byte;
            }
        }
        self.actual_pages = u32::from_le_bytes(actual);
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), DeviceError> {
        self.state = State::Active {
            ctx,
            stats_head: None,
        };
        // Serve what the driver queued while the device was not started: Linux queues its
        // first stats buffer and kicks before DRIVER_OK (virtio 1.2 §3.1.1 lets a driver add
        // buffers then; the device uses them once started), and the transport drops kicks of
        // an inactive device, so statistics depended on whether the event loop read that kick
        // before or after DRIVER_OK. After a restore, saving the transport rewound each queue
        // to its used index: a stats buffer the saved device held, or an inflate or report the
        // guest kicked just before the pause, is available again with no kick to come, and the
        // guest's balloon worker waits for its answer. At a boot this runs on the vCPU thread
        // that wrote DRIVER_OK, with only the stats buffer waiting (guest memory reads, no
        // system call); at a restore, before the seccomp filters.
        for index in 0..QUEUE_SIZES.len() {
            self.process_queue(index)?;
        }
        Ok(())
    }
    fn process_queue(&mut self, index: usize) -> Result<(), DeviceError> {
        let State::Active { ctx, .. } = &mut self.state else {
            return Ok(());
        };
        let Some(role) = role_of(ctx.acked_features, index) else {
            return Ok(());
        };
        if !ctx.queues.get(index).is_some_and(|q| q.ready()) {
            return Ok(());
        }
        if role == Role::Stats {
            return self.take_stats(index);
        }
        let Some(queue): Option<&mut Queue> = ctx.queues.get_mut(index) else {
            return Ok(());
        };
        let mem = &ctx.mem;
        let discard = self.discard.as_mut();
        let counters = &self.counters;
        let (mut inflated, mut deflated, mut reported) = (0u64, 0u64, 0u64);
        let progress =
            serve_queue_bounded(queue, index, mem, &ctx.interrupt, WORK_BUDGET, |chain| {
                counters.add(&counters.requests, 1);
                match role {
                    Role::Inflate | Role::Deflate => {
                        let Some(pfns) = Self::read_pfns(mem, chain) else {
                            counters.add(&counters.errors, 1);
                            return 0;
                        };
                        counters.add(&counters.bytes_read, pfns.len() as u64 * 4);
                        if role == Role::Inflate {
                            Self::discard_pfns(discard, counters, mem, &pfns);
                            inflated += pfns.len() as u64;
                        } else {
                            deflated += pfns.len() as u64;
                        }
                    }
                    Role::Reporting => {
                        // Each descriptor is one free range (the driver marks them writable;
                        // the device writes nothing into them).
                        for desc in chain {
                            let (addr, len) = (desc.addr().0, u64::from(desc.len()));
                            match discard.discard(mem, addr, len) {
                                Ok(()) => reported += len,
                                Err(e) => {
                                    counters.add(&counters.errors, 1);
                                    crate::warn_limited!("balloon: free page report: {e}");
                                }
                            }
                        }
                    }
                    Role::Stats => {}
                }
                0
            })?;
        self.inflated_pages += inflated;
        self.deflated_pages += deflated;
        self.reported_bytes += reported;
        if progress == Progress::More {
            self.unfinished.insert(index);
        }
        Ok(())
    }
    fn take_unfinished(&mut self) -> QueueSet {
        std::mem::take(&mut self.unfinished)
    }
    fn reset(&mut self) {
        // The driver gave every page back when it reset the device.
        self.state = State::Inactive;
        self.actual_pages = 0;
        self.unfinished = QueueSet::default();
    }
    fn save_device_state(&self) -> Vec<u8> {
        BalloonState {
            target_pages: self.target_pages,
            actual_pages: self.actual_pages,
        }
        .encode_to_vec()
    }
    fn restore_device_state(&mut self, state: &[u8]) -> Result<(), String> {
        let state = BalloonState::decode(state).map_err(|e| format!("balloon state: {e}"))?;
        self.target_pages = state.target_pages;
        self.actual_pages = state.actual_pages;
        Ok(())
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
