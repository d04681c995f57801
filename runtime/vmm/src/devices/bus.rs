//! A bus that routes port-I/O or MMIO accesses to devices by address range.
//!
//! Accesses nobody claims never fail: reads return all-ones (what an empty ISA bus or unmapped
//! MMIO returns on a PC), writes are dropped, and both are counted.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// A device on a [`Bus`]. `offset` is relative to the device's base; `data` is as long as the
/// guest's access (1, 2, 4 or 8 bytes), so implementations must bounds-check both.
pub trait BusDevice: Send {
    /// Fills `data` for a guest read.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a guest write.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors while wiring devices onto a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps an existing one, or is empty.
    #[error("range {base:#x}+{len:#x} is empty or overlaps another device")]
    Overlap {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
}

struct BusRange {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// Counters of accesses that reached no device.
#[derive(Debug, Default)]
pub struct UnhandledCounts {
    /// Reads answered with all-ones.
    pub reads: AtomicU64,
    /// Writes dropped.
    pub writes: AtomicU64,
}

/// An address space (port I/O or MMIO) with devices on it.
#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, BusRange>,
    unhandled: UnhandledCounts,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0);
        let overlaps = |end: u64| {
            self.ranges
                .range(..end)
                .next_back()
                .is_some_and(|(b, r)| b + r.len > base)
        };
        match end {
            Some(end) if !overlaps(end) => {
                self.ranges.insert(base, BusRange { len, device });
                Ok(())
            }
            _ => Err(BusError::Overlap { base, len }),
        }
    }

    fn resolve(&self, addr: u64) -> Option<(u64, &BusRange)> {
        let (base, range) = self.ranges.range(..=addr).next_back()?;
        (addr - base < range.len).then_some((addr - base, range))
    }

    /// Dispatches a read; returns whether a device handled it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, range)) => {
                let mut dev = range.device.lock().unwrap_or_else(PoisonError::into_inner);
                dev.read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                self.unhandled.reads.fetch_add(1, Ordering::Relaxed);
                husk_devices::debug_limited!("unhandled read of {} bytes at {addr:#x}", data.len());
                false
            }
        }
    }

    /// Dispatches a write; returns whether a device handled it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, range)) => {
                let mut dev = range.device.lock().unwrap_or_else(PoisonError::into_inner);
                dev.write(offset, data);
                true
            }
            None => {
                self.unhandled.writes.fetch_add(1, Ordering::Relaxed);
                husk_devices::debug_limited!("unhandled write of {data:02x?} at {addr:#x}");
                false
            }
        }
    }

    /// Counters of unclaimed accesses.
    pub fn unhandled(&self) -> &UnhandledCounts {
        &self.unhandled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range_with_relative_offsets() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b, [2]);
        assert!(bus.write(0x3ff, &[7]));
        assert_eq!(dev.lock().unwrap().writes, vec![(7, vec![7])]);
        assert!(!bus.write(0x400, &[1]));
    }

    #[test]
    fn unclaimed_reads_are_all_ones_and_counted() {
        let bus = Bus::new();
        let mut b = [0u8; 4];
        assert!(!bus.read(0xd000_0000, &mut b));
        assert_eq!(b, [0xff; 4]);
        assert!(!bus.write(0x80, &[0]));
        assert_eq!(bus.unhandled().reads.load(Ordering::Relaxed), 1);
        assert_eq!(bus.unhandled().writes.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn rejects_overlapping_and_empty_ranges() {
        let mut bus = Bus::new();
        let d = || Arc::new(Mutex::new(Recorder::default())) as Arc<Mutex<dyn BusDevice>>;
        bus.insert(d(), 0x60, 1).unwrap();
        bus.insert(d(), 0x64, 1).unwrap();
        assert!(bus.insert(d(), 0x5f, 2).is_err());
        assert!(bus.insert(d(), 0x64, 1).is_err());
        assert!(bus.insert(d(), 0x70, 0).is_err());
        assert!(bus.insert(d(), u64::MAX, 2).is_err());
        bus.insert(d(), 0x61, 3).unwrap();
    }
}
