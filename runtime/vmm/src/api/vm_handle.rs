//! The running VM as the control socket sees it: its description (state, size, boot time,
//! device counters) and the pause, resume and stop operations.

use std::path::Path;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use husk_devices::virtio::device_id;
use husk_proto::vmm::{
    AttachDisk, DetachDisk, DeviceCounters, Info, SetBalloon, Snapshot, SnapshotDone,
};
use vmm_sys_util::eventfd::EventFd;

use super::{state, ControlError, VmControl};
use crate::devices::legacy::control_port::ControlState;
use crate::devices::legacy::serial::SerialDevice;
use crate::devices::virtio::VirtioSlot;
use crate::pause::PauseGate;
use crate::signals;
use crate::snapshot::{self, SaveSource};
use crate::stop::{StopReason, StopState};
use crate::vstate::vcpu::VcpuRequest;
use crate::vstate::vm::Vm;

/// Longest wait for every vCPU and the event loop to park.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Handle on a running VM for the control socket.
///
/// It kicks vCPU threads by id: [`crate::vmm::Vmm::run`] shuts the control socket down before it
/// joins those threads, so the ids stay valid for the handle's whole life.
pub struct VmHandle {
    /// The VM's pause gate (vCPUs and event loop are its members).
    pub gate: Arc<PauseGate>,
    /// Where a stop request goes.
    pub stop: Arc<StopState>,
    /// The vCPU threads, to kick them out of KVM_RUN.
    pub vcpu_threads: Vec<libc::pthread_t>,
    /// Wakes the event loop so that it looks at the gate.
    pub event_loop_waker: EventFd,
    /// The virtio devices, in slot order.
    pub devices: Arc<Vec<VirtioSlot>>,
    /// What the guest init reported.
    pub control: Arc<ControlState>,
    /// vCPU count.
    pub vcpus: u32,
    /// Guest memory size.
    pub memory_mib: u32,
    /// What a snapshot reads.
    pub snapshot: SnapshotParts,
}

/// The parts of a running VM a snapshot reads (see [`crate::snapshot::save`]).
pub struct SnapshotParts {
    /// The VM (fd and guest memory).
    pub vm: Arc<Vm>,
    /// One request channel per vCPU thread, in index order.
    pub vcpu_requests: Vec<Sender<VcpuRequest>>,
    /// MSRs to save.
    pub msr_list: Arc<Vec<u32>>,
    /// The UART.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// Configured guest memory size.
    pub mem_size: u64,
    /// Each virtio device's backend, in slot order.
    pub device_backends: Vec<crate::snapshot::state::DeviceBackend>,
    /// The base of diff snapshots: the memory file guest RAM maps, or the last full snapshot.
    pub memory_base: Mutex<Option<crate::snapshot::diff::BaseRef>>,
}

/// The `kind` the control protocol uses for a virtio device type.
pub fn device_kind(device_type: u32) -> &'static str {
    match device_type {
        device_id::BLOCK => "block",
        device_id::NET => "net",
        device_id::VSOCK => "vsock",
        device_id::RNG => "rng",
        device_id::FS => "fs",
        device_id::BALLOON => "balloon",
        _ => "unknown",
    }
}

impl VmHandle {
    fn wake_members(&self) {
        for &thread in &self.vcpu_threads {
            signals::kick(thread);
        }
        // A full counter only means a wake-up is pending already.
        let _ = self.event_loop_waker.write(1);
    }

    fn stopping_error(&self) -> Result<(), ControlError> {
        if self.stop.is_stopping() {
            return Err(ControlError::Stopping);
        }
        Ok(())
    }
}

impl VmControl for VmHandle {
    fn describe(&self) -> Info {
        let devices = self
            .devices
            .iter()
            .enumerate()
            .map(|(slot, device)| {
                let c = device.counters();
                DeviceCounters {
                    kind: device_kind(device.device_type()).into(),
                    slot: slot as u32,
                    requests: c.requests,
                    // The protocol counts from the backend's side: bytes read from the backend
                    // are the ones the device wrote into guest buffers, and the other way round.
                    bytes_read: c.bytes_written,
                    bytes_written: c.bytes_read,
                    errors: c.errors,
                    connections: device.open_connections().unwrap_or(0),
                }
            })
            .collect();
        Info {
            state: state(self.gate.is_paused(), self.stop.is_stopping()) as i32,
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            boot_to_init_us: self.control.init_time_us().unwrap_or(0),
            devices,
            balloon: super::balloon::describe(&self.devices),
        }
    }

    fn pause(&self) -> Result<Info, ControlError> {
        self.stopping_error()?;
        let started = Instant::now();
        self.gate.pause(PAUSE_TIMEOUT, || self.wake_members())?;
        log::info!("VM paused in {} us", started.elapsed().as_micros());
        Ok(self.describe())
    }

    fn resume(&self) -> Result<Info, ControlError> {
        self.stopping_error()?;
        self.gate.resume()?;
        log::info!("VM resumed");
        Ok(self.describe())
    }

    fn stop(&self) -> Info {
        self.stop.request(StopReason::Requested);
        self.describe()
    }

    fn set_rate_limits(
        &self,
        request: &husk_proto::vmm::SetRateLimits,
    ) -> Result<Info, ControlError> {
        self.stopping_error()?;
        let limits = crate::devices::rate_limits::RateLimits::from_request(request)?;
        crate::devices::rate_limits::apply(&self.devices, &limits)?;
        Ok(self.describe())
    }

    fn attach_disk(
        &self,
        request: &AttachDisk,
        disk: Vec<std::os::fd::OwnedFd>,
    ) -> Result<Info, ControlError> {
        self.stopping_error()?;
        super::disk_slots::attach(&self.devices, request, disk)?;
        Ok(self.describe())
    }

    fn detach_disk(&self, request: &DetachDisk) -> Result<Info, ControlError> {
        self.stopping_error()?;
        super::disk_slots::detach(&self.devices, request.slot)?;
        Ok(self.describe())
    }

    fn set_balloon(&self, request: &SetBalloon) -> Result<Info, ControlError> {
        self.stopping_error()?;
        let memory_mib = u64::from(self.memory_mib);
        super::balloon::set_target(&self.devices, request.target_mib, memory_mib)?;
        log::info!("balloon target {} MiB", request.target_mib);
        Ok(self.describe())
    }

    fn snapshot(&self, request: &Snapshot) -> Result<SnapshotDone, ControlError> {
        self.stopping_error()?;
        if request.state_path.is_empty() || request.mem_path.is_empty() {
            return Err(ControlError::SnapshotPaths);
        }
        // A snapshot records each device's backend by identity; an attached disk has none (its
        // fd came over the socket), and restoring it empty would lose the guest's disk.
        if let Some(slot) = super::disk_slots::first_filled(&self.devices) {
            return Err(ControlError::DiskAttached(slot));
        }
        // The disks as the paused guest left them: a qcow2 overlay's tables written back, so
        // that its file (which huskd copies beside a snapshot) holds everything.
        for d in self.devices.iter() {
            d.sync_backend(false)
                .map_err(|cause| ControlError::DiskFlush {
                    device: d.name.clone(),
                    cause,
                })?;
        }
        let parts = &self.snapshot;
        let mut base = parts
            .memory_base
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let source = SaveSource {
            base: base.as_ref(),
            vm: &parts.vm,
            gate: &self.gate,
            vcpus: &parts.vcpu_requests,
            msr_list: parts.msr_list.clone(),
            serial: &parts.serial,
            devices: &self.devices,
            device_backends: &parts.device_backends,
            mem_size: parts.mem_size,
        };
        let base_path = match (request.diff, base.as_ref()) {
            (true, Some(b)) => b.path.display().to_string(),
            _ => String::new(),
        };
        let report = snapshot::save(
            &source,
            Path::new(&request.state_path),
            Path::new(&request.mem_path),
            request.diff,
            &mut |_, _| {},
        )?;
        // A VM whose RAM maps a file keeps diffing against it (pagemap finds its changes);
        // otherwise the newest full snapshot becomes the base.
        if !base.as_ref().is_some_and(|b| b.mapped) {
            if let Some(new_base) = report.new_base.clone() {
                *base = Some(new_base);
            }
        }
        log::info!("snapshot taken: {report:?}");
        Ok(SnapshotDone {
            state_bytes: report.state_bytes,
            memory_bytes: report.memory_bytes,
            memory_written: report.memory_written,
            state_us: report.state_us,
            memory_us: report.memory_us,
            total_us: report.total_us,
            base_path,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_kinds_follow_the_protocol() {
        assert_eq!(device_kind(device_id::BLOCK), "block");
        assert_eq!(device_kind(device_id::NET), "net");
        assert_eq!(device_kind(device_id::VSOCK), "vsock");
        assert_eq!(device_kind(device_id::FS), "fs");
        assert_eq!(device_kind(device_id::RNG), "rng");
        assert_eq!(device_kind(device_id::BALLOON), "balloon");
        assert_eq!(device_kind(99), "unknown");
    }
}
