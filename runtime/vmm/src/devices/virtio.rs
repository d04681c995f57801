//! Attaching virtio devices to the VM: a 4 KiB MMIO window each in the virtio window, an
//! interrupt line (irqfd), one ioeventfd per queue so guest notifications reach the event loop
//! without a VM exit to user space, and the `virtio_mmio.device=` parameter that announces the
//! device to the guest kernel (which has no ACPI or PCI to discover it otherwise).

use std::os::unix::io::RawFd;
use std::sync::{Arc, Mutex, PoisonError};

use husk_devices::virtio::mmio::persist::{TransportState, TransportStateError};
use husk_devices::virtio::mmio::{MmioTransport, MMIO_WINDOW_SIZE};
use husk_devices::virtio::{BackendTrigger, CounterSnapshot, VirtioDevice, VirtioInterrupt};
use kvm_ioctls::IoEventAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::x86_64::layout::{VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START};
use crate::devices::bus::{Bus, BusDevice, BusError};
use crate::vstate::vm::{Vm, VmError};

/// First interrupt line for virtio devices (0-4 are the PIT, keyboard, cascade and serial).
const FIRST_IRQ: u32 = 5;
/// IOAPIC pins end at 23.
const LAST_IRQ: u32 = 23;
/// QueueNotify register offset (virtio 1.2 §4.2.2).
const QUEUE_NOTIFY_OFFSET: u64 = 0x50;

/// Errors while attaching a virtio device.
#[derive(Debug, thiserror::Error)]
pub enum VirtioAttachError {
    /// More devices than interrupt lines or MMIO slots.
    #[error("too many virtio devices (at most {0})")]
    TooMany(usize),
    /// The transport refused the device's queue layout.
    #[error("virtio device {0} has an invalid queue layout")]
    Queues(u32),
    /// An EventFd could not be created.
    #[error("cannot create an event for a virtio device")]
    EventFd(#[source] std::io::Error),
    /// KVM refused the irqfd.
    #[error(transparent)]
    Irq(#[from] VmError),
    /// KVM refused an ioeventfd.
    #[error("cannot register a queue notification event")]
    IoEvent(#[source] kvm_ioctls::Error),
    /// The MMIO window overlaps another device.
    #[error(transparent)]
    Bus(#[from] BusError),
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        MmioTransport::read(self, offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        MmioTransport::write(self, offset, data);
    }
}

/// A virtio device on the VM, with what the event loop needs to drive it.
pub struct VirtioSlot {
    /// Short name for logs (`block0`, `net0`...).
    pub name: String,
    /// The transport (shared with the MMIO bus).
    pub transport: Arc<Mutex<MmioTransport>>,
    /// One event per queue, signalled by KVM when the guest writes the queue's index to
    /// QueueNotify.
    pub queue_events: Vec<EventFd>,
    /// The device's backend fd, if it has one, and how to watch it.
    pub backend_fd: Option<(RawFd, BackendTrigger)>,
    /// The device's rate-limit timer, if it can be rate limited.
    pub timer_fd: Option<RawFd>,
    /// Kernel command-line parameter announcing the device.
    pub cmdline: String,
}

impl VirtioSlot {
    /// The device's counters now.
    pub fn counters(&self) -> CounterSnapshot {
        let t = self
            .transport
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        t.device().counters().snapshot()
    }

    /// See [`husk_devices::virtio::VirtioDevice::sync_backend`].
    pub fn sync_backend(&self, closing: bool) -> std::io::Result<()> {
        self.transport
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .device_mut()
            .sync_backend(closing)
    }

    /// The transport's snapshot state (the VM must be paused, see
    /// [`MmioTransport::save_state`]).
    pub fn save_state(&self) -> TransportState {
        self.transport
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .save_state()
    }

    /// Puts a freshly attached device back in a saved state.
    pub fn restore_state(&self, state: &TransportState) -> Result<(), TransportStateError> {
        self.transport
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .restore_state(state)
    }

    /// Replaces the rate limit of queue `queue` (see [`VirtioDevice::set_rate_limit`]), then
    /// notifies every queue so that one parked under the old limit goes on under the new one
    /// (a spurious notification costs one empty walk). `false` if the device refused.
    pub fn set_rate_limit(
        &self,
        queue: usize,
        config: husk_devices::rate_limiter::RateLimitConfig,
    ) -> bool {
        let accepted = self
            .transport
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .device_mut()
            .set_rate_limit(queue, config);
        if accepted {
            for evt in &self.queue_events {
                let _ = evt.write(1);
            }
        }
        accepted
    }

    /// Connections the device holds open now (see [`VirtioDevice::open_connections`]).
    pub fn open_connections(&self) -> Option<u64> {
        let t = self
            .transport
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        t.device().open_connections()
    }

    /// The device's virtio type ([`husk_devices::virtio::device_id`]).
    pub fn device_type(&self) -> u32 {
        let t = self
            .transport
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        t.device().device_type()
    }
}

/// MMIO base and interrupt line of the `index`-th virtio device.
pub fn slot_address(index: usize) -> Result<(u64, u32), VirtioAttachError> {
    let max =
        ((LAST_IRQ - FIRST_IRQ + 1) as usize).min((VIRTIO_MMIO_SIZE / MMIO_WINDOW_SIZE) as usize);
    if index >= max {
        return Err(VirtioAttachError::TooMany(max));
    }
    Ok((
        VIRTIO_MMIO_START + index as u64 * MMIO_WINDOW_SIZE,
        FIRST_IRQ + index as u32,
    ))
}

/// Puts `device` in virtio slot `index` of `vm`, on `mmio_bus`.
pub fn attach(
    vm: &Vm,
    mmio_bus: &mut Bus,
    index: usize,
    name: String,
    device: Box<dyn VirtioDevice>,
) -> Result<VirtioSlot, VirtioAttachError> {
    let (base, irq) = slot_address(index)?;
    let irq_event = EventFd::new(EFD_NONBLOCK).map_err(VirtioAttachError::EventFd)?;
    vm.register_irqfd(&irq_event, irq)?;
    let interrupt = Arc::new(VirtioInterrupt::new(Box::new(irq_event)));
    let device_type = device.device_type();
    let queue_count = device.queue_max_sizes().len();
    let backend_fd = device.backend_fd().map(|fd| (fd, device.backend_trigger()));
    let timer_fd = device.timer_fd();
    let transport = MmioTransport::new(device, vm.memory().clone(), interrupt)
        .map_err(|_| VirtioAttachError::Queues(device_type))?;
    let transport = Arc::new(Mutex::new(transport));
    let mut queue_events = Vec::with_capacity(queue_count);
    for queue in 0..queue_count {
        let evt = EventFd::new(EFD_NONBLOCK).map_err(VirtioAttachError::EventFd)?;
        let addr = IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET);
        vm.fd()
            .register_ioevent(&evt, &addr, queue as u32)
            .map_err(VirtioAttachError::IoEvent)?;
        queue_events.push(evt);
    }
    mmio_bus.insert(transport.clone(), base, MMIO_WINDOW_SIZE)?;
    Ok(VirtioSlot {
        name,
        transport,
        queue_events,
        backend_fd,
        timer_fd,
        cmdline: format!("virtio_mmio.device=4K@{base:#x}:{irq}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_4k_apart_with_their_own_irq_and_limited() {
        assert_eq!(slot_address(0).unwrap(), (0xd000_0000, 5));
        assert_eq!(slot_address(2).unwrap(), (0xd000_2000, 7));
        assert_eq!(slot_address(18).unwrap(), (0xd001_2000, 23));
        assert!(matches!(
            slot_address(19),
            Err(VirtioAttachError::TooMany(19))
        ));
    }
}
