//! Test helpers: guest memory, an interrupt line that counts, a fake device, and a driver that
//! puts descriptor chains on a split queue exactly as a guest would.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::{AvailRing, DescriptorTable, UsedRing};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::{
    features, ActivateContext, DeviceCounters, DeviceError, InterruptLine, VirtioDevice,
    VirtioInterrupt,
};
use crate::GuestMemoryMmap;

/// 1 MiB of guest memory at address 0.
pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
}

/// An interrupt line that counts how often it was raised.
#[derive(Default, Clone)]
pub struct CountingLine(pub Arc<AtomicU32>);

impl InterruptLine for CountingLine {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// Observable state of a [`FakeDevice`] (the device itself moves into the transport).
#[derive(Default)]
pub struct FakeDevice {
    activations: AtomicU32,
    notifications: AtomicU32,
    fail_next: AtomicBool,
}

impl FakeDevice {
    pub fn handle(self: &Arc<Self>) -> FakeDeviceHandle {
        FakeDeviceHandle {
            state: self.clone(),
            counters: DeviceCounters::default(),
        }
    }
    pub fn activations(&self) -> u32 {
        self.activations.load(Ordering::SeqCst)
    }
    pub fn notifications(&self) -> u32 {
        self.notifications.load(Ordering::SeqCst)
    }
    pub fn fail_next_notify(&self) {
        self.fail_next.store(true, Ordering::SeqCst);
    }
}

/// A device with type 99 and one queue of 16, offering only VERSION_1.
pub struct FakeDeviceHandle {
    state: Arc<FakeDevice>,
    counters: DeviceCounters,
}

impl VirtioDevice for FakeDeviceHandle {
    fn device_type(&self) -> u32 {
        99
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16]
    }
    fn offered_features(&self) -> u64 {
        features::VERSION_1
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&[0xde, 0xad], offset, data);
    }
    fn activate(&mut self, _ctx: ActivateContext) -> Result<(), DeviceError> {
        self.state.activations.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn process_queue(&mut self, _index: usize) -> Result<(), DeviceError> {
        self.state.notifications.fetch_add(1, Ordering::SeqCst);
        if self.state.fail_next.swap(false, Ordering::SeqCst) {
            return Err(DeviceError::BrokenQueue(0));
        }
        Ok(())
    }
    fn reset(&mut self) {}
    fn counters(&self) -> &DeviceCounters {
        &self.counters
    }
}

/// Descriptor flags (virtio 1.2 §2.7.5).
pub const NEXT: u16 = 1;
pub const WRITE: u16 = 2;
pub const INDIRECT: u16 = 4;

/// A guest driver for one split queue in [`guest_memory`]: rings at 0x1000, buffers from
/// 0x4_0000 upward.
///
/// The rings are laid out here (virtio 1.2 §2.7: descriptor table, then the available ring of
/// 6 + 2 * size bytes, then the used ring 4-aligned), not with virtio-queue's
/// `MockSplitQueue::create`, whose used ring overlaps the second half of the available ring.
pub struct Driver<'a> {
    pub mem: &'a GuestMemoryMmap,
    size: u16,
    table: DescriptorTable<'a, GuestMemoryMmap>,
    avail: AvailRing<'a, GuestMemoryMmap>,
    used: UsedRing<'a, GuestMemoryMmap>,
    addrs: [u64; 3],
    next_desc: u16,
    next_buf: u64,
}

impl<'a> Driver<'a> {
    pub fn new(mem: &'a GuestMemoryMmap, size: u16) -> Self {
        Self::new_at(mem, size, 0x1000, 0x4_0000)
    }

    /// A second queue needs its rings and its buffers elsewhere.
    pub fn new_at(mem: &'a GuestMemoryMmap, size: u16, rings: u64, buffers: u64) -> Self {
        let avail_addr = rings + 16 * u64::from(size);
        let used_addr = (avail_addr + 6 + 2 * u64::from(size)).next_multiple_of(4);
        Self {
            mem,
            size,
            table: DescriptorTable::new(mem, GuestAddress(rings), size),
            avail: AvailRing::new(mem, GuestAddress(avail_addr), size),
            used: UsedRing::new(mem, GuestAddress(used_addr), size),
            addrs: [rings, avail_addr, used_addr],
            next_desc: 0,
            next_buf: buffers,
        }
    }

    /// The queue as the device sees it after the transport set it up.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        let [desc, avail, used] = self.addrs;
        let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
        let (lo, hi) = split(desc);
        q.set_desc_table_address(lo, hi);
        let (lo, hi) = split(avail);
        q.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(used);
        q.set_used_ring_address(lo, hi);
        q.set_ready(true);
        q
    }

    /// Allocates a guest buffer holding `data` (zeros when writable and empty).
    pub fn buffer(&mut self, data: &[u8], len: u32) -> u64 {
        let addr = self.next_buf;
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
        self.next_buf += u64::from(len.max(1)).next_multiple_of(0x1000);
        addr
    }

    /// Places raw descriptors (addr, len, flags, next) starting at the next free table slot and
    /// makes the first one available. Returns the head index.
    pub fn raw_chain(&mut self, descs: &[(u64, u32, u16, u16)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
            self.table.store(head + i as u16, d).unwrap();
        }
        self.next_desc += descs.len() as u16;
        self.make_available(head);
        head
    }

    /// A well-formed chain: each element is (data, len, device-writable).
    pub fn chain(&mut self, parts: &[(&[u8], u32, bool)]) -> u16 {
        let head = self.next_desc;
        let descs: Vec<_> = parts
            .iter()
            .enumerate()
            .map(|(i, &(data, len, writable))| {
                let addr = self.buffer(data, len);
                let last = i + 1 == parts.len();
                let flags = if last { 0 } else { NEXT } | if writable { WRITE } else { 0 };
                (addr, len, flags, head + i as u16 + 1)
            })
            .collect();
        self.raw_chain(&descs)
    }

    /// Appends `head` to the available ring.
    pub fn make_available(&mut self, head: u16) {
        let avail = &self.avail;
        let idx = avail.idx().load();
        avail
            .ring()
            .ref_at(usize::from(idx % self.size))
            .unwrap()
            .store(u16::to_le(head));
        avail.idx().store(u16::to_le(idx.wrapping_add(1)));
    }

    /// Overwrites the available index (hostile drivers).
    pub fn set_avail_idx(&self, idx: u16) {
        self.avail.idx().store(u16::to_le(idx));
    }

    /// Used ring entries so far, as (descriptor head, length written).
    pub fn used(&self) -> Vec<(u32, u32)> {
        let used = &self.used;
        let n = used.idx().load();
        (0..n)
            .map(|i| {
                let e = used
                    .ring()
                    .ref_at(usize::from(i % self.size))
                    .unwrap()
                    .load();
                (e.id(), e.len())
            })
            .collect()
    }

    /// Reads guest memory.
    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    /// Address of descriptor `index`'s buffer.
    pub fn desc_addr(&self, index: u16) -> u64 {
        let raw = self.table.load(index).unwrap();
        SplitDescriptor::from(raw).addr().0
    }
}

/// Activation context for a device with the queues given, interrupt counting into `line`.
pub fn activate_ctx(
    mem: &GuestMemoryMmap,
    queues: Vec<Queue>,
    line: CountingLine,
) -> ActivateContext {
    ActivateContext {
        mem: mem.clone(),
        queues,
        interrupt: Arc::new(VirtioInterrupt::new(Box::new(line))),
        acked_features: features::VERSION_1,
    }
}
