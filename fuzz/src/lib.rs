//! What the fuzz targets share: reading structured values off the fuzz input, guest memory, and
//! each virtio device on an in-memory or scratch backend behind the virtio-mmio transport.

use std::collections::VecDeque;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use husk_devices::virtio::block::backend::RawFile;
use husk_devices::virtio::block::Block;
use husk_devices::virtio::mmio::MmioTransport;
use husk_devices::virtio::net::tap::NetBackend;
use husk_devices::virtio::net::Net;
use husk_devices::virtio::balloon::discard::HostDiscard;
use husk_devices::virtio::balloon::{Balloon, BalloonFeatures};
use husk_devices::virtio::rng::{EntropySource, Rng};
use husk_devices::virtio::vsock::Vsock;
use husk_devices::virtio::{status, InterruptLine, VirtioDevice, VirtioInterrupt};
use husk_devices::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

/// The fuzz input read front to back; past its end every value is zero, so any input is a
/// complete program.
pub struct Input<'a>(pub &'a [u8]);

impl<'a> Input<'a> {
    /// Up to `n` bytes.
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }
    /// One byte.
    pub fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }
    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from(self.u8()) | (u16::from(self.u8()) << 8)
    }
    /// A little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | (u32::from(self.u16()) << 16)
    }
    /// A little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }
    /// True once everything is read.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// What is left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
}

/// First RAM region: 1 MiB at 0.
pub const RAM0: (u64, usize) = (0, 0x10_0000);
/// Second RAM region, after a hole, so that buffers can straddle a gap.
pub const RAM1: (u64, usize) = (0x20_0000, 0x1_0000);

/// Guest memory of two regions with a hole between them.
pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(RAM0.0), RAM0.1),
        (GuestAddress(RAM1.0), RAM1.1),
    ])
    .unwrap_or_else(|e| panic!("cannot map guest memory: {e}"))
}

/// Writes `data` at `addr`, as much as fits in guest memory.
pub fn poke(mem: &GuestMemoryMmap, addr: u64, data: &[u8]) {
    let _ = mem.write(data, GuestAddress(addr));
}

/// An interrupt line that goes nowhere.
struct NoLine;

impl InterruptLine for NoLine {
    fn trigger(&self) -> io::Result<()> {
        Ok(())
    }
}

/// A network backend that hands the guest scripted frames and drops what it sends.
pub struct ScriptedNet(pub VecDeque<Vec<u8>>);

impl NetBackend for ScriptedNet {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let frame = self.0.pop_front().ok_or(io::ErrorKind::WouldBlock)?;
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        Ok(n)
    }
    fn send(&mut self, _frame: &[u8]) -> io::Result<()> {
        Ok(())
    }
    fn set_offloads(&mut self, _flags: u32) -> io::Result<()> {
        Ok(())
    }
    fn takes_vnet_offloads(&self) -> bool {
        true
    }
    fn fd(&self) -> Option<std::os::unix::io::RawFd> {
        None
    }
}

/// Deterministic "entropy".
struct Counter(u8);

impl EntropySource for Counter {
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<()> {
        for b in buf {
            self.0 = self.0.wrapping_add(1);
            *b = self.0;
        }
        Ok(())
    }
}

/// A file in the temporary directory owned by this process.
pub fn scratch_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("husk-fuzz-{}-{name}", std::process::id()))
}

/// Size of the scratch disk behind virtio-blk.
pub const DISK_SIZE: u64 = 64 << 10;

/// The five virtio devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// virtio-blk on a scratch file (the real raw-file backend).
    Block,
    /// virtio-net on [`ScriptedNet`].
    Net,
    /// virtio-vsock on a scratch Unix socket (the real backend).
    Vsock,
    /// virtio-rng on a counter.
    Rng,
    /// virtio-balloon with every feature, discarding pages of the fuzz memory for real.
    Balloon,
}

impl Kind {
    /// The device named by one input byte.
    pub fn from_byte(b: u8) -> Kind {
        match b % 5 {
            0 => Kind::Block,
            1 => Kind::Net,
            2 => Kind::Vsock,
            3 => Kind::Rng,
            _ => Kind::Balloon,
        }
    }

    /// A fresh device of this kind; `frames` are what a net device receives from the host.
    pub fn device(self, frames: VecDeque<Vec<u8>>) -> Box<dyn VirtioDevice> {
        match self {
            Kind::Block => {
                let path = scratch_path("disk.img");
                // A fresh, zeroed disk every run keeps runs independent of each other.
                let _ = std::fs::remove_file(&path);
                std::fs::File::create(&path)
                    .and_then(|f| f.set_len(DISK_SIZE))
                    .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
                let disk = RawFile::open(&path, false)
                    .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
                Box::new(Block::new(Box::new(disk), false, "fuzz"))
            }
            Kind::Net => Box::new(Net::new(Box::new(ScriptedNet(frames)), [2, 0, 0, 0, 0, 1])),
            Kind::Vsock => {
                let path = scratch_path("vsock.sock");
                let _ = std::fs::remove_file(&path);
                Box::new(
                    Vsock::new(3, &path)
                        .unwrap_or_else(|e| panic!("cannot listen on {}: {e}", path.display())),
                )
            }
            Kind::Rng => Box::new(Rng::new(Box::new(Counter(0)))),
            Kind::Balloon => Box::new(Balloon::new(
                BalloonFeatures::default(),
                Box::new(HostDiscard),
            )),
        }
    }
}

/// `device` behind a virtio-mmio transport on `mem`.
pub fn transport(device: Box<dyn VirtioDevice>, mem: &GuestMemoryMmap) -> MmioTransport {
    let interrupt = Arc::new(VirtioInterrupt::new(Box::new(NoLine)));
    MmioTransport::new(device, mem.clone(), interrupt)
        .unwrap_or_else(|e| panic!("cannot build the transport: {e}"))
}

/// virtio-mmio register offsets: the device model's own, plus the configuration space and
/// the list of every register a driver may touch.
pub mod reg {
    pub use husk_devices::virtio::mmio::reg::*;

    /// Where the device's configuration space starts.
    pub const CONFIG: u64 = 0x100;
    /// Every register, for inputs that pick one by index.
    pub const ALL: [u64; 27] = [
        0x000,
        0x004,
        0x008,
        0x00c,
        DEVICE_FEATURES,
        DEVICE_FEATURES_SEL,
        DRIVER_FEATURES,
        DRIVER_FEATURES_SEL,
        QUEUE_SEL,
        QUEUE_NUM_MAX,
        QUEUE_NUM,
        QUEUE_READY,
        QUEUE_NOTIFY,
        INTERRUPT_STATUS,
        INTERRUPT_ACK,
        STATUS,
        QUEUE_DESC_LOW,
        QUEUE_DESC_HIGH,
        QUEUE_DRIVER_LOW,
        QUEUE_DRIVER_HIGH,
        QUEUE_DEVICE_LOW,
        QUEUE_DEVICE_HIGH,
        0x0ac,
        0x0b0,
        0x0b8,
        CONFIG_GENERATION,
        CONFIG,
    ];
}

/// Writes a 32-bit register.
pub fn write32(t: &mut MmioTransport, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

/// Reads a 32-bit register.
pub fn read32(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

/// Where queue `i`'s rings are laid out by [`start`]: descriptor table, driver and device rings.
pub fn rings(i: usize) -> (u64, u64, u64) {
    let base = 0x1000 + 0x1000 * i as u64;
    (base, base + 0x400, base + 0x800)
}

/// Queue size used by [`start`].
pub const QUEUE_SIZE: u16 = 16;
/// Where the buffers of [`start`]'s queues are expected (the targets put data there).
pub const BUFFERS: u64 = 0x1_0000;

/// Drives the transport as a Linux driver does: reset, acknowledge, negotiate `features` (as
/// far as the device offers them, plus VERSION_1), set up every queue at [`rings`] with
/// [`QUEUE_SIZE`] entries, and DRIVER_OK. Returns whether the device went live.
pub fn start(t: &mut MmioTransport, features: u64) -> bool {
    write32(t, reg::STATUS, 0);
    write32(t, reg::STATUS, status::ACKNOWLEDGE);
    write32(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    write32(t, reg::DEVICE_FEATURES_SEL, 0);
    let mut offered = u64::from(read32(t, reg::DEVICE_FEATURES));
    write32(t, reg::DEVICE_FEATURES_SEL, 1);
    offered |= u64::from(read32(t, reg::DEVICE_FEATURES)) << 32;
    let acked = (features & offered) | husk_devices::virtio::features::VERSION_1;
    for sel in 0..2u32 {
        write32(t, reg::DRIVER_FEATURES_SEL, sel);
        write32(t, reg::DRIVER_FEATURES, (acked >> (32 * sel)) as u32);
    }
    let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    write32(t, reg::STATUS, s);
    for i in 0..t.device().queue_max_sizes().len() {
        let (desc, driver, device) = rings(i);
        write32(t, reg::QUEUE_SEL, i as u32);
        write32(t, reg::QUEUE_NUM, u32::from(QUEUE_SIZE));
        for (low, value) in [
            (reg::QUEUE_DESC_LOW, desc),
            (reg::QUEUE_DRIVER_LOW, driver),
            (reg::QUEUE_DEVICE_LOW, device),
        ] {
            write32(t, low, value as u32);
            write32(t, low + 4, (value >> 32) as u32);
        }
        write32(t, reg::QUEUE_READY, 1);
    }
    write32(t, reg::STATUS, s | status::DRIVER_OK);
    t.is_active()
}
