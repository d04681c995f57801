//! The virtio-mmio transport in a snapshot: its one state type, [`TransportState`], which is
//! also the protobuf message husk-vmm's snapshot file holds for it, and the transport's
//! [`save_state`](MmioTransport::save_state) and [`restore_state`](MmioTransport::restore_state).
//!
//! The field tags are part of the snapshot file format (husk-vmm's `snapshot::state` embeds
//! these messages): never renumber or retype them. Every field a guest could have set is checked
//! here, when it goes back into a transport, not when the file is decoded.

use std::sync::atomic::Ordering;

use prost::Message;
use virtio_queue::{Queue, QueueT};

use super::{Lifecycle, MmioTransport};

/// A transport's state: the registers the driver programmed, where each queue stands, and the
/// interrupt status. No fds, no pointers.
#[derive(Clone, PartialEq, Message)]
pub struct TransportState {
    /// Queues in index order.
    #[prost(message, repeated, tag = "1")]
    pub queues: Vec<QueueState>,
    /// QueueSel.
    #[prost(uint32, tag = "2")]
    pub queue_select: u32,
    /// DeviceFeaturesSel.
    #[prost(uint32, tag = "3")]
    pub device_features_select: u32,
    /// DriverFeaturesSel.
    #[prost(uint32, tag = "4")]
    pub driver_features_select: u32,
    /// Features the driver accepted.
    #[prost(uint64, tag = "5")]
    pub acked_features: u64,
    /// Device status.
    #[prost(uint32, tag = "6")]
    pub status: u32,
    /// ConfigGeneration.
    #[prost(uint32, tag = "7")]
    pub config_generation: u32,
    /// A [`Lifecycle`], as its `u32` (unknown values are refused on restore).
    #[prost(uint32, tag = "8")]
    pub lifecycle: u32,
    /// InterruptStatus.
    #[prost(uint32, tag = "9")]
    pub interrupt_status: u32,
    /// The device's own state ([`crate::virtio::VirtioDevice::save_device_state`]); empty for
    /// most devices, and in snapshots older than the field.
    #[prost(bytes = "vec", tag = "10")]
    pub device_state: Vec<u8>,
}

/// One virtqueue as programmed. The 16-bit fields are 32-bit on the wire (protobuf has no
/// smaller integer); values that do not fit are refused on restore.
#[derive(Clone, PartialEq, Message)]
pub struct QueueState {
    /// Device maximum (the restored device's own maximum wins).
    #[prost(uint32, tag = "1")]
    pub max_size: u32,
    /// Next available-ring entry the device reads.
    #[prost(uint32, tag = "2")]
    pub next_avail: u32,
    /// Next used-ring entry the device writes.
    #[prost(uint32, tag = "3")]
    pub next_used: u32,
    /// VIRTIO_F_RING_EVENT_IDX negotiated.
    #[prost(bool, tag = "4")]
    pub event_idx: bool,
    /// Size the driver chose.
    #[prost(uint32, tag = "5")]
    pub size: u32,
    /// QueueReady.
    #[prost(bool, tag = "6")]
    pub ready: bool,
    /// Descriptor table address.
    #[prost(uint64, tag = "7")]
    pub desc_table: u64,
    /// Available (driver) ring address.
    #[prost(uint64, tag = "8")]
    pub avail_ring: u64,
    /// Used (device) ring address.
    #[prost(uint64, tag = "9")]
    pub used_ring: u64,
}

/// Why a saved transport state cannot be put back.
#[derive(Debug, thiserror::Error)]
pub enum TransportStateError {
    #[error("the snapshot has {saved} queues for a device with {device}")]
    QueueCount { saved: usize, device: usize },
    #[error("queue {queue}: {field} {value} does not fit in 16 bits")]
    QueueField {
        queue: usize,
        field: &'static str,
        value: u32,
    },
    #[error("queue {0}: invalid saved state")]
    Queue(usize, #[source] virtio_queue::Error),
    #[error("invalid lifecycle {0}")]
    Lifecycle(u32),
    #[error("the restored device did not start")]
    Activate,
    #[error("the device's own state: {0}")]
    DeviceState(String),
}

impl From<Lifecycle> for u32 {
    fn from(l: Lifecycle) -> u32 {
        match l {
            Lifecycle::Setup => 0,
            Lifecycle::Active => 1,
            Lifecycle::NeedsReset => 2,
        }
    }
}

impl TryFrom<u32> for Lifecycle {
    type Error = TransportStateError;

    fn try_from(v: u32) -> Result<Self, Self::Error> {
        match v {
            0 => Ok(Lifecycle::Setup),
            1 => Ok(Lifecycle::Active),
            2 => Ok(Lifecycle::NeedsReset),
            other => Err(TransportStateError::Lifecycle(other)),
        }
    }
}

impl From<virtio_queue::QueueState> for QueueState {
    fn from(q: virtio_queue::QueueState) -> Self {
        QueueState {
            max_size: q.max_size.into(),
            next_avail: q.next_avail.into(),
            next_used: q.next_used.into(),
            event_idx: q.event_idx_enabled,
            size: q.size.into(),
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl QueueState {
    /// Queue `index` in this state, limited to `max_size` (the device decides its queue limits,
    /// not the file).
    fn to_queue(&self, index: usize, max_size: u16) -> Result<Queue, TransportStateError> {
        let u16_of = |field, value: u32| {
            u16::try_from(value).map_err(|_| TransportStateError::QueueField {
                queue: index,
                field,
                value,
            })
        };
        // Checked even though it is replaced: a file with it out of range is damaged.
        u16_of("max_size", self.max_size)?;
        let state = virtio_queue::QueueState {
            max_size,
            next_avail: u16_of("next_avail", self.next_avail)?,
            next_used: u16_of("next_used", self.next_used)?,
            event_idx_enabled: self.event_idx,
            size: u16_of("size", self.size)?,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        };
        Queue::try_from(state).map_err(|e| TransportStateError::Queue(index, e))
    }
}

impl MmioTransport {
    /// The transport's state. Call only while nothing processes the device's queues (the VM is
    /// paused): every chain a device took is then back on the used ring (devices put back what
    /// they cannot finish), so the used index in guest memory is where the device stands.
    pub fn save_state(&self) -> TransportState {
        let active = self.is_active();
        let queues = self
            .queues
            .iter()
            .map(|q| {
                let mut state = q.state();
                if active && q.ready() {
                    if let Ok(used) = q.used_idx(&self.mem, Ordering::Acquire) {
                        state.next_used = used.0;
                        state.next_avail = used.0;
                    }
                }
                QueueState::from(state)
            })
            .collect();
        TransportState {
            queues,
            queue_select: self.queue_select,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            acked_features: self.acked_features,
            status: self.status,
            config_generation: self.config_generation,
            lifecycle: self.lifecycle.into(),
            interrupt_status: self.interrupt.status(),
            device_state: self.device.save_device_state(),
        }
    }

    /// Puts a fresh transport (same device kind, not yet seen by the guest) in `state`; an
    /// active device is started again on its saved queues and told it was restored. Nothing
    /// changes unless every field fits.
    pub fn restore_state(&mut self, state: &TransportState) -> Result<(), TransportStateError> {
        if state.queues.len() != self.queues.len() {
            return Err(TransportStateError::QueueCount {
                saved: state.queues.len(),
                device: self.queues.len(),
            });
        }
        let lifecycle = Lifecycle::try_from(state.lifecycle)?;
        let queues = state
            .queues
            .iter()
            .zip(&self.queues)
            .enumerate()
            .map(|(i, (saved, current))| saved.to_queue(i, current.max_size()))
            .collect::<Result<Vec<_>, _>>()?;
        self.device
            .restore_device_state(&state.device_state)
            .map_err(TransportStateError::DeviceState)?;
        self.queues = queues;
        self.queue_select = state.queue_select;
        self.device_features_select = state.device_features_select;
        self.driver_features_select = state.driver_features_select;
        self.acked_features = state.acked_features;
        self.status = state.status;
        self.config_generation = state.config_generation;
        self.interrupt.acknowledge(u32::MAX);
        self.interrupt.restore_status(state.interrupt_status);
        self.lifecycle = Lifecycle::Setup;
        match lifecycle {
            Lifecycle::Active => {
                self.activate();
                if !self.is_active() {
                    return Err(TransportStateError::Activate);
                }
                self.device.restored();
            }
            other => self.lifecycle = other,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::mmio::reg;
    use crate::virtio::mmio::tests::{bring_up, read32, transport, write32};

    #[test]
    fn an_active_transport_state_round_trips_into_a_fresh_transport() {
        let (mut t, _) = transport();
        bring_up(&mut t, 1);
        write32(&mut t, reg::QUEUE_SEL, 0);
        let saved = t.save_state();
        assert_eq!(
            Lifecycle::try_from(saved.lifecycle).ok(),
            Some(Lifecycle::Active)
        );
        assert_eq!(saved.queues[0].desc_table, 0x1000);
        assert_eq!(saved.queues[0].size, 16);

        let (mut fresh, device) = transport();
        fresh.restore_state(&saved).unwrap();
        assert!(fresh.is_active());
        assert_eq!(
            device.activations(),
            1,
            "the restored device was not started"
        );
        assert_eq!(fresh.save_state(), saved);
        assert_eq!(read32(&mut fresh, reg::STATUS), saved.status);
    }

    #[test]
    fn the_state_survives_its_protobuf_encoding() {
        let (mut t, _) = transport();
        bring_up(&mut t, 1);
        let saved = t.save_state();
        let back = TransportState::decode(saved.encode_to_vec().as_slice()).unwrap();
        assert_eq!(back, saved);
    }

    #[test]
    fn the_wire_format_is_the_one_snapshot_files_hold() {
        // Written by hand from the field tags and types: a change to either breaks every
        // existing snapshot, and this test.
        let queue = [
            0x08, 0x80, 0x02, // 1: max_size 256
            0x10, 0x07, // 2: next_avail 7
            0x18, 0x07, // 3: next_used 7
            0x20, 0x01, // 4: event_idx
            0x28, 0x80, 0x02, // 5: size 256
            0x30, 0x01, // 6: ready
            0x38, 0x80, 0x20, // 7: desc_table 0x1000
            0x40, 0x80, 0x40, // 8: avail_ring 0x2000
            0x48, 0x80, 0x60, // 9: used_ring 0x3000
        ];
        let mut bytes = vec![0x0a, queue.len() as u8]; // 1: queues
        bytes.extend(queue);
        bytes.extend([0x10, 0x01]); // 2: queue_select 1
        bytes.extend([0x28, 0x80, 0x80, 0x80, 0x80, 0x10]); // 5: acked_features 1 << 32
        bytes.extend([0x30, 0x0f]); // 6: status 15
        bytes.extend([0x40, 0x01]); // 8: lifecycle active
        bytes.extend([0x48, 0x01]); // 9: interrupt_status 1
        let state = TransportState {
            queues: vec![QueueState {
                max_size: 256,
                next_avail: 7,
                next_used: 7,
                event_idx: true,
                size: 256,
                ready: true,
                desc_table: 0x1000,
                avail_ring: 0x2000,
                used_ring: 0x3000,
            }],
            queue_select: 1,
            acked_features: 1 << 32,
            status: 15,
            lifecycle: Lifecycle::Active.into(),
            interrupt_status: 1,
            ..Default::default()
        };
        assert_eq!(state.encode_to_vec(), bytes);
        assert_eq!(TransportState::decode(bytes.as_slice()).unwrap(), state);
    }

    #[test]
    fn lifecycles_have_fixed_numbers_and_unknown_ones_are_refused() {
        // The numbers are in snapshot files: they may never change.
        for (l, n) in [
            (Lifecycle::Setup, 0),
            (Lifecycle::Active, 1),
            (Lifecycle::NeedsReset, 2),
        ] {
            assert_eq!(u32::from(l), n);
            assert_eq!(Lifecycle::try_from(n).ok(), Some(l));
        }
        assert!(matches!(
            Lifecycle::try_from(3),
            Err(TransportStateError::Lifecycle(3))
        ));
    }

    #[test]
    fn saved_states_that_do_not_fit_are_refused() {
        let (mut t, _) = transport();
        bring_up(&mut t, 1);
        let mut saved = t.save_state();
        saved.lifecycle = 9;
        assert!(transport().0.restore_state(&saved).is_err());
        let mut saved = t.save_state();
        saved.queues.push(saved.queues[0].clone());
        assert!(transport().0.restore_state(&saved).is_err());
        let mut saved = t.save_state();
        saved.queues[0].size = 1000; // larger than the device's maximum
        assert!(transport().0.restore_state(&saved).is_err());
        for field in 0..4 {
            let mut saved = t.save_state();
            let q = &mut saved.queues[0];
            *[
                &mut q.max_size,
                &mut q.next_avail,
                &mut q.next_used,
                &mut q.size,
            ][field] = 70_000;
            assert!(matches!(
                transport().0.restore_state(&saved),
                Err(TransportStateError::QueueField { value: 70_000, .. })
            ));
        }
    }

    #[test]
    fn a_refused_state_leaves_the_transport_as_it_was() {
        let (mut t, _) = transport();
        bring_up(&mut t, 1);
        let mut saved = t.save_state();
        saved.queues[0].next_used = 70_000;
        let (mut fresh, device) = transport();
        let before = fresh.save_state();
        assert!(fresh.restore_state(&saved).is_err());
        assert_eq!(fresh.save_state(), before);
        assert_eq!(device.activations(), 0);
    }
}
