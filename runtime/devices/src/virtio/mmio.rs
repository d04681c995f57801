//! The virtio-mmio transport (virtio 1.2 §4.2.2, version 2 "modern" layout only): the register
//! window a guest driver programs, feature negotiation, queue setup, the status state machine
//! and the interrupt status. Every register access from the guest lands here; none can panic.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};

use super::{features, status, ActivateContext, VirtioDevice, VirtioInterrupt};
use crate::GuestMemoryMmap;

pub mod persist;

/// Size of one device's MMIO window: registers up to 0x100, then configuration space.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const VERSION_MODERN: u32 = 2;
const VENDOR_ID: u32 = 0x4b53_5548; // "HUSK"
const CONFIG_SPACE_OFFSET: u64 = 0x100;

/// Register offsets of the virtio-mmio transport (virtio 1.2, 4.2.2): public for drivers written
/// against this device model (fuzz targets, tests).
pub mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
}

/// Where the device is in its life (saved in snapshots as a number, see [`persist`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifecycle {
    /// Before DRIVER_OK, or after a reset.
    Setup,
    /// DRIVER_OK was accepted; the device serves its queues.
    Active,
    /// The device gave up (bad queue setup, backend failure); the driver must reset it.
    NeedsReset,
}

/// One virtio device behind its MMIO register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
    /// Queue configuration as the driver programs it (the device works on copies once active).
    queues: Vec<Queue>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    acked_features: u64,
    status: u32,
    config_generation: u32,
    lifecycle: Lifecycle,
    /// Guest accesses that did not follow the spec (wrong width, unknown register...).
    bad_accesses: u64,
}

impl MmioTransport {
    /// Wraps `device`. Fails only if the device declares an impossible queue size.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<Self, virtio_queue::Error> {
        let queues = new_queues(device.queue_max_sizes())?;
        Ok(Self {
            device,
            mem,
            interrupt,
            queues,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            acked_features: 0,
            status: 0,
            config_generation: 0,
            lifecycle: Lifecycle::Setup,
            bad_accesses: 0,
        })
    }

    /// The device behind this transport.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The device behind this transport, to change its settings (rate limits) from another
    /// thread while the transport is locked.
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// Runs `change` on the device (from another thread, with the transport locked), then
    /// tells the driver if the device's configuration space changed: ConfigGeneration moves
    /// on, so a driver reading the configuration across the change reads it again, and an
    /// active device raises the configuration-change interrupt (virtio 1.2 §4.2.2, §2.5.1).
    pub fn update_device<R>(&mut self, change: impl FnOnce(&mut dyn VirtioDevice) -> R) -> R {
        let result = change(self.device.as_mut());
        if self.device.take_config_changed() {
            self.config_generation = self.config_generation.wrapping_add(1);
            // Before DRIVER_OK the driver reads the configuration when it starts anyway.
            if self.is_active() {
                self.interrupt.signal_config_change();
            }
        }
        result
    }

    /// The device's rate-limit timer fired: parked queues come back through
    /// [`MmioTransport::take_unfinished`] (only while the device is active).
    pub fn process_timer(&mut self) {
        self.device.timer_expired();
    }

    /// Whether the driver has started the device.
    pub fn is_active(&self) -> bool {
        matches!(self.lifecycle, Lifecycle::Active)
    }

    /// The device's backend is ready (its [`VirtioDevice::backend_fd`] is readable). An
    /// inactive device still drains it: a level-triggered fd left ready would spin the loop.
    pub fn process_backend(&mut self) {
        if !self.is_active() {
            self.device.drain_backend();
            return;
        }
        if let Err(e) = self.device.process_backend() {
            self.fail(&e.to_string());
        }
    }

    /// Queues whose work the device cut short at its budget (see
    /// [`super::VirtioDevice::take_unfinished`]); empty unless the device is active.
    pub fn take_unfinished(&mut self) -> super::QueueSet {
        let unfinished = self.device.take_unfinished();
        if self.is_active() {
            unfinished
        } else {
            super::QueueSet::default()
        }
    }

    /// Guest accesses that broke the register protocol so far.
    pub fn bad_accesses(&self) -> u64 {
        self.bad_accesses
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// A guest read of `data.len()` bytes at `offset` in the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        let Ok(word) = <&mut [u8; 4]>::try_from(&mut *data) else {
            self.bad_access("read", offset, data.len());
            data.fill(0);
            return;
        };
        let value = match offset {
            reg::MAGIC => MAGIC_VALUE,
            reg::VERSION => VERSION_MODERN,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_select {
                0 => self.device.offered_features() as u32,
                1 => (self.device.offered_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            // No shared memory regions: length all-ones means "absent" (§4.2.2).
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => {
                u32::MAX
            }
            reg::CONFIG_GENERATION => self.config_generation,
            _ => {
                self.bad_access("read", offset, 4);
                0
            }
        };
        *word = value.to_le_bytes();
    }

    /// A guest write of `data` at `offset` in the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            if matches!(self.lifecycle, Lifecycle::Setup | Lifecycle::Active) {
                self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
            }
            return;
        }
        let Ok(word) = <[u8; 4]>::try_from(data) else {
            self.bad_access("write", offset, data.len());
            return;
        };
        let value = u32::from_le_bytes(word);
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_select = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_select = value,
            reg::DRIVER_FEATURES => self.set_driver_features(value),
            reg::QUEUE_SEL => self.queue_select = value,
            reg::QUEUE_NUM => self.with_setup_queue(|q| q.set_size(value as u16)),
            reg::QUEUE_READY => self.with_setup_queue(|q| q.set_ready(value == 1)),
            reg::QUEUE_DESC_LOW => {
                self.with_setup_queue(|q| q.set_desc_table_address(Some(value), None))
            }
            reg::QUEUE_DESC_HIGH => {
                self.with_setup_queue(|q| q.set_desc_table_address(None, Some(value)))
            }
            reg::QUEUE_DRIVER_LOW => {
                self.with_setup_queue(|q| q.set_avail_ring_address(Some(value), None))
            }
            reg::QUEUE_DRIVER_HIGH => {
                self.with_setup_queue(|q| q.set_avail_ring_address(None, Some(value)))
            }
            reg::QUEUE_DEVICE_LOW => {
                self.with_setup_queue(|q| q.set_used_ring_address(Some(value), None))
            }
            reg::QUEUE_DEVICE_HIGH => {
                self.with_setup_queue(|q| q.set_used_ring_address(None, Some(value)))
            }
            reg::QUEUE_NOTIFY => self.notify(value),
            reg::INTERRUPT_ACK => self.interrupt.acknowledge(value),
            reg::STATUS => self.set_status(value),
            reg::SHM_SEL => {}
            _ => self.bad_access("write", offset, 4),
        }
    }

    /// The guest notified queue `index` (also the entry point for the VMM's ioeventfds).
    pub fn notify(&mut self, index: u32) {
        if !self.is_active() {
            return;
        }
        let Ok(index) = usize::try_from(index) else {
            return;
        };
        if index >= self.queues.len() {
            self.bad_access("notify", index as u64, 4);
            return;
        }
        if let Err(e) = self.device.process_queue(index) {
            self.fail(&e.to_string());
        }
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(usize::try_from(self.queue_select).ok()?)
    }

    /// Queue registers may change only during setup (§4.2.2.3: not once the driver is OK).
    fn with_setup_queue(&mut self, change: impl FnOnce(&mut Queue)) {
        if !matches!(self.lifecycle, Lifecycle::Setup) || self.status & status::DRIVER_OK != 0 {
            self.bad_access("queue setup after DRIVER_OK", 0, 4);
            return;
        }
        match usize::try_from(self.queue_select)
            .ok()
            .and_then(|i| self.queues.get_mut(i))
        {
            Some(queue) => change(queue),
            None => self.bad_access("queue setup of a queue that does not exist", 0, 4),
        }
    }

    fn set_driver_features(&mut self, value: u32) {
        if self.status & status::FEATURES_OK != 0 {
            self.bad_access("features after FEATURES_OK", 0, 4);
            return;
        }
        let shift = match self.driver_features_select {
            0 => 0,
            1 => 32,
            _ => return,
        };
        self.acked_features &= !(0xffff_ffffu64 << shift);
        self.acked_features |= u64::from(value) << shift;
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // Bits only ever get added (§2.1.2); anything else is a driver bug we refuse.
        if value & self.status != self.status {
            self.bad_access("status cleared bits without reset", 0, 4);
            return;
        }
        let added = value & !self.status;
        if added & status::FEATURES_OK != 0 && !self.features_acceptable() {
            // Leave FEATURES_OK unset: the driver reads it back and gives up (§3.1.1).
            self.status = value & !status::FEATURES_OK;
            return;
        }
        self.status = value;
        if added & status::DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn features_acceptable(&self) -> bool {
        let offered = self.device.offered_features();
        self.acked_features & !offered == 0 && self.acked_features & features::VERSION_1 != 0
    }

    fn activate(&mut self) {
        if self.status & status::FEATURES_OK == 0 {
            return self.fail("DRIVER_OK without FEATURES_OK");
        }
        let event_idx = self.acked_features & features::RING_EVENT_IDX != 0;
        for (i, queue) in self.queues.iter_mut().enumerate() {
            if queue.ready() && !queue.is_valid(&self.mem) {
                let message = format!("queue {i} has invalid addresses or size");
                return self.fail(&message);
            }
            queue.set_event_idx(event_idx);
        }
        // The device gets its own copies; the transport keeps the programmed registers.
        let queues: Result<Vec<Queue>, _> = self
            .queues
            .iter()
            .map(|q| Queue::try_from(q.state()))
            .collect();
        let Ok(queues) = queues else {
            return self.fail("queue state could not be copied");
        };
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues,
            interrupt: self.interrupt.clone(),
            acked_features: self.acked_features,
        };
        match self.device.activate(ctx) {
            Ok(()) => self.lifecycle = Lifecycle::Active,
            Err(e) => self.fail(&e.to_string()),
        }
    }

    /// Marks the device as needing a reset and tells the driver (§2.1.2): the VMM keeps running.
    fn fail(&mut self, why: &str) {
        crate::warn_limited!(
            "virtio device {} needs reset: {why}",
            self.device.device_type()
        );
        self.bad_accesses += 1;
        self.lifecycle = Lifecycle::NeedsReset;
        self.status |= status::DEVICE_NEEDS_RESET;
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt.signal_config_change();
    }

    fn reset(&mut self) {
        self.device.reset();
        if let Ok(queues) = new_queues(self.device.queue_max_sizes()) {
            self.queues = queues;
        }
        self.interrupt.acknowledge(u32::MAX);
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.acked_features = 0;
        self.status = 0;
        self.lifecycle = Lifecycle::Setup;
    }

    fn bad_access(&mut self, what: &str, offset: u64, len: usize) {
        self.bad_accesses += 1;
        log::debug!("virtio-mmio: ignored guest {what} at {offset:#x} ({len} bytes)");
    }
}

fn new_queues(max_sizes: &[u16]) -> Result<Vec<Queue>, virtio_queue::Error> {
    max_sizes.iter().map(|&max| Queue::new(max)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::{guest_memory, CountingLine, FakeDevice};
    use crate::virtio::INTERRUPT_CONFIG_CHANGE;

    pub(super) fn transport() -> (MmioTransport, Arc<FakeDevice>) {
        let state = Arc::new(FakeDevice::default());
        let irq = Arc::new(VirtioInterrupt::new(Box::new(CountingLine::default())));
        let t = MmioTransport::new(Box::new(state.handle()), guest_memory(), irq).unwrap();
        (t, state)
    }

    pub(super) fn read32(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    pub(super) fn write32(t: &mut MmioTransport, offset: u64, v: u32) {
        t.write(offset, &v.to_le_bytes());
    }

    /// The Linux driver's sequence (virtio 1.2 §3.1.1), queue 0 at valid addresses.
    pub(super) fn bring_up(t: &mut MmioTransport, features_hi: u32) {
        write32(t, reg::STATUS, status::ACKNOWLEDGE);
        write32(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        write32(t, reg::DRIVER_FEATURES_SEL, 1);
        write32(t, reg::DRIVER_FEATURES, features_hi);
        write32(
            t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        write32(t, reg::QUEUE_SEL, 0);
        write32(t, reg::QUEUE_NUM, 16);
        write32(t, reg::QUEUE_DESC_LOW, 0x1000);
        write32(t, reg::QUEUE_DRIVER_LOW, 0x2000);
        write32(t, reg::QUEUE_DEVICE_LOW, 0x3000);
        write32(t, reg::QUEUE_READY, 1);
        let s = read32(t, reg::STATUS);
        write32(t, reg::STATUS, s | status::DRIVER_OK);
    }

    #[test]
    fn identifies_itself_as_a_modern_virtio_mmio_device() {
        let (mut t, _) = transport();
        assert_eq!(read32(&mut t, reg::MAGIC), 0x7472_6976);
        assert_eq!(read32(&mut t, reg::VERSION), 2);
        assert_eq!(read32(&mut t, reg::DEVICE_ID), 99);
        assert_eq!(read32(&mut t, reg::QUEUE_NUM_MAX), 16);
        write32(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(
            read32(&mut t, reg::DEVICE_FEATURES),
            1,
            "VERSION_1 is bit 32"
        );
    }

    #[test]
    fn a_correct_driver_sequence_activates_the_device_and_notifies_reach_it() {
        let (mut t, dev) = transport();
        bring_up(&mut t, 1);
        assert!(t.is_active());
        assert_eq!(dev.activations(), 1);
        write32(&mut t, reg::QUEUE_NOTIFY, 0);
        assert_eq!(dev.notifications(), 1);
        assert_eq!(t.bad_accesses(), 0);
    }

    #[test]
    fn features_without_version_1_or_beyond_the_offer_are_refused() {
        let (mut t, dev) = transport();
        bring_up(&mut t, 0); // legacy driver: no VERSION_1
        assert_eq!(read32(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        assert!(!t.is_active());
        assert_eq!(dev.activations(), 0);

        let (mut t, _) = transport();
        bring_up(&mut t, 1 | 2); // bit 33 was never offered
        assert!(!t.is_active());
    }

    #[test]
    fn invalid_queue_addresses_mark_the_device_needs_reset_instead_of_crashing() {
        let (mut t, dev) = transport();
        write32(&mut t, reg::QUEUE_SEL, 0);
        write32(&mut t, reg::QUEUE_DESC_HIGH, 0xffff_ffff); // far outside guest memory
        bring_up_keep_addresses(&mut t);
        assert!(!t.is_active());
        assert_eq!(dev.activations(), 0);
        assert_ne!(read32(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert_ne!(
            read32(&mut t, reg::INTERRUPT_STATUS) & INTERRUPT_CONFIG_CHANGE,
            0
        );
        // A reset brings it back.
        write32(&mut t, reg::STATUS, 0);
        assert_eq!(read32(&mut t, reg::STATUS), 0);
        bring_up(&mut t, 1);
        assert!(t.is_active());
    }

    fn bring_up_keep_addresses(t: &mut MmioTransport) {
        write32(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        write32(t, reg::DRIVER_FEATURES_SEL, 1);
        write32(t, reg::DRIVER_FEATURES, 1);
        write32(
            t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        write32(t, reg::QUEUE_NUM, 16);
        write32(t, reg::QUEUE_READY, 1);
        write32(
            t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
    }

    #[test]
    fn wild_accesses_are_counted_and_ignored() {
        let (mut t, dev) = transport();
        let mut one = [0xaau8; 1];
        t.read(reg::MAGIC, &mut one); // registers are 32-bit only
        assert_eq!(one, [0]);
        t.write(reg::STATUS, &[1, 2]);
        write32(&mut t, 0x0f0, 7); // no such register
        write32(&mut t, reg::QUEUE_SEL, 1000); // no such queue
        write32(&mut t, reg::QUEUE_NUM, 8);
        write32(&mut t, reg::QUEUE_NOTIFY, 0); // not active: ignored
        let mut b = [0u8; 4];
        t.read(u64::MAX, &mut b); // config space far past its end
        assert_eq!(read32(&mut t, reg::STATUS), 0);
        assert_eq!(dev.notifications(), 0);
        assert!(t.bad_accesses() >= 4);
    }

    #[test]
    fn queue_registers_are_frozen_once_the_driver_is_ok() {
        let (mut t, _) = transport();
        bring_up(&mut t, 1);
        let before = t.bad_accesses();
        write32(&mut t, reg::QUEUE_NUM, 4);
        write32(&mut t, reg::QUEUE_READY, 0);
        assert_eq!(read32(&mut t, reg::QUEUE_READY), 1);
        assert_eq!(t.bad_accesses(), before + 2);
    }

    #[test]
    fn clearing_status_bits_without_reset_is_refused() {
        let (mut t, _) = transport();
        write32(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        write32(&mut t, reg::STATUS, status::ACKNOWLEDGE);
        assert_eq!(
            read32(&mut t, reg::STATUS),
            status::ACKNOWLEDGE | status::DRIVER
        );
    }

    #[test]
    fn a_disk_slot_filled_at_run_time_bumps_the_generation_and_raises_config_change() {
        use crate::virtio::block::{backend::RawFile, Block};
        let path = std::env::temp_dir().join(format!("husk-mmio-slot-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let second = path.with_extension("2");
        std::fs::write(&second, vec![0u8; 512]).unwrap();
        let line = CountingLine::default();
        let irq = Arc::new(VirtioInterrupt::new(Box::new(line.clone())));
        let mut t =
            MmioTransport::new(Box::new(Block::empty_slot("s")), guest_memory(), irq).unwrap();
        bring_up(&mut t, 1);
        assert!(t.is_active());
        let generation = read32(&mut t, reg::CONFIG_GENERATION);
        let raised = line.0.load(std::sync::atomic::Ordering::SeqCst);
        let insert = |t: &mut MmioTransport, path: &std::path::Path| {
            t.update_device(|dev| {
                let block = dev.as_any_mut().and_then(|a| a.downcast_mut::<Block>());
                let disk = Box::new(RawFile::open(path, false).unwrap());
                block.unwrap().insert_medium(disk, false, "d")
            })
        };
        insert(&mut t, &path).unwrap();
        assert_eq!(read32(&mut t, reg::CONFIG_GENERATION), generation + 1);
        assert_eq!(
            read32(&mut t, reg::INTERRUPT_STATUS) & INTERRUPT_CONFIG_CHANGE,
            INTERRUPT_CONFIG_CHANGE
        );
        assert_eq!(line.0.load(std::sync::atomic::Ordering::SeqCst), raised + 1);
        assert_eq!(read32(&mut t, 0x100), 8, "capacity in sectors, low half");
        write32(&mut t, reg::INTERRUPT_ACK, INTERRUPT_CONFIG_CHANGE);

        // A refused change changes nothing the driver sees.
        assert!(insert(&mut t, &second).is_err());
        assert_eq!(read32(&mut t, reg::CONFIG_GENERATION), generation + 1);
        assert_eq!(read32(&mut t, reg::INTERRUPT_STATUS), 0);

        t.update_device(|dev| {
            let block = dev.as_any_mut().and_then(|a| a.downcast_mut::<Block>());
            block.unwrap().eject_medium().map(drop)
        })
        .unwrap();
        assert_eq!(read32(&mut t, reg::CONFIG_GENERATION), generation + 2);
        assert_eq!(read32(&mut t, 0x100), 0);
        assert_ne!(
            read32(&mut t, reg::INTERRUPT_STATUS) & INTERRUPT_CONFIG_CHANGE,
            0
        );
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(&second);
    }

    #[test]
    fn a_device_that_fails_while_active_asks_for_reset() {
        let (mut t, dev) = transport();
        bring_up(&mut t, 1);
        dev.fail_next_notify();
        write32(&mut t, reg::QUEUE_NOTIFY, 0);
        assert!(!t.is_active());
        assert_ne!(read32(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        write32(&mut t, reg::QUEUE_NOTIFY, 0);
        assert_eq!(dev.notifications(), 1, "no queue work after the failure");
    }
}
