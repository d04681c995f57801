//! Snapshots of a paused VM and restore from them (see docs/snapshots.md).
//!
//! - [`file`]: the state file container (magic, version, length, CRC-32), refusing anything
//!   truncated, corrupted or foreign before decoding;
//! - [`state`]: the payload (protobuf, no fds): machine, vCPUs, VM, memory map, serial;
//! - [`bounds`]: limits on the payload's repeated fields, checked on the raw bytes before
//!   decoding, so a crafted state file cannot make decoding allocate gigabytes;
//! - [`vcpu_state`], [`vm_state`]: reading and writing KVM's vCPU and VM state;
//! - [`memory`]: the sparse memory file, mapped back MAP_PRIVATE (lazy, copy-on-write);
//! - [`diff`]: diff memory files (pages changed since a base) and layered restore;
//! - [`devices`]: virtio backends, with the overrides a restore applies (each device's own
//!   state is saved and restored beside it: `VirtioSlot::save_state`, `SerialDevice::save_state`);
//! - [`cpu_check`]: refusing a host that lacks CPU features the guest used.
//!
//! Taking a snapshot ([`save`]) needs a paused VM: every vCPU is parked outside KVM_RUN and the
//! device event loop is parked, so nothing writes guest memory or device state meanwhile. Each
//! vCPU's state is read on its own thread (a request served while parked). Restoring is in
//! [`crate::builder::restore_vm`], the one place besides the fresh boot that wires a VM.

pub mod bounds;
pub mod cpu_check;
pub mod devices;
pub mod diff;
pub mod file;
pub mod memory;
pub mod state;
pub mod vcpu_state;
pub mod vm_state;

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::devices::legacy::serial::SerialDevice;
use crate::devices::virtio::VirtioSlot;
use crate::pause::PauseGate;
use crate::vstate::vcpu::VcpuRequest;
use crate::vstate::vm::Vm;
use state::{MachineState, SnapshotState};
use vcpu_state::VcpuStateError;

/// Longest wait for a parked vCPU to hand over its state.
const VCPU_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a snapshot could not be taken or loaded.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Snapshots need a paused VM.
    #[error("the VM is not paused: pause it before taking a snapshot")]
    NotPaused,
    /// The VM has devices whose backends were not recorded (built outside the builder).
    #[error("cannot snapshot virtio devices ({0}) whose backends are unknown")]
    UnsupportedDevices(String),
    /// The VM has devices whose state lives outside the VMM (shared directories).
    #[error("cannot snapshot a VM that shares host directories ({0}): the files virtiofsd holds open for the guest and its FUSE session cannot be saved")]
    SharedDirectories(String),
    /// A diff needs a full snapshot to be relative to.
    #[error("a diff snapshot needs a base: take a full snapshot of this VM first, or restore it from one")]
    NoBase,
    /// Both files at one path.
    #[error("the state and memory files must be different paths")]
    SamePath,
    /// A vCPU's state.
    #[error(transparent)]
    Vcpu(#[from] VcpuStateError),
    /// VM state.
    #[error(transparent)]
    Vm(#[from] vm_state::VmStateError),
    /// The state file.
    #[error(transparent)]
    File(#[from] file::FileError),
    /// The payload.
    #[error("invalid snapshot state in {}", .0.display())]
    State(PathBuf, #[source] state::StateError),
    /// The memory file.
    #[error(transparent)]
    Memory(#[from] memory::MemoryFileError),
}

/// What [`save`] needs from a running (paused) VM.
pub struct SaveSource<'a> {
    /// The VM (fd for irqchip, PIT, clock; guest memory).
    pub vm: &'a Vm,
    /// The pause gate; the VM must be paused.
    pub gate: &'a PauseGate,
    /// One request channel per vCPU thread, in index order.
    pub vcpus: &'a [Sender<VcpuRequest>],
    /// The MSRs to try saving (KVM_GET_MSR_INDEX_LIST).
    pub msr_list: Arc<Vec<u32>>,
    /// The UART.
    pub serial: &'a Mutex<SerialDevice>,
    /// The VM's virtio devices, in slot order.
    pub devices: &'a [VirtioSlot],
    /// Their backends, in the same order.
    pub device_backends: &'a [state::DeviceBackend],
    /// Guest memory size as configured.
    pub mem_size: u64,
    /// The full memory file diffs are taken against, if any.
    pub base: Option<&'a diff::BaseRef>,
}

/// What a snapshot wrote and how long it took.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SaveReport {
    /// Size of the state file.
    pub state_bytes: u64,
    /// Guest RAM in bytes (the memory file's apparent size, less its header).
    pub memory_bytes: u64,
    /// Page data actually written (the rest are holes).
    pub memory_written: u64,
    /// Microseconds reading vCPU and VM state.
    pub state_us: u64,
    /// Microseconds writing the memory file (including fsync).
    pub memory_us: u64,
    /// Microseconds in all.
    pub total_us: u64,
    /// For a full snapshot: the memory file just written, as a base for later diffs.
    pub new_base: Option<diff::BaseRef>,
}

/// Reads every vCPU's state, each on its own (parked) thread.
fn save_vcpus(src: &SaveSource<'_>) -> Result<Vec<state::VcpuState>, SnapshotError> {
    let mut answers = Vec::with_capacity(src.vcpus.len());
    for (index, requests) in src.vcpus.iter().enumerate() {
        let (reply, answer) = mpsc::channel();
        requests
            .send(VcpuRequest::Save {
                msrs: src.msr_list.clone(),
                reply,
            })
            .map_err(|_| VcpuStateError::NoAnswer(index as u32))?;
        answers.push(answer);
    }
    src.gate.poke();
    let mut vcpus = Vec::with_capacity(answers.len());
    for (index, answer) in answers.into_iter().enumerate() {
        let state = answer
            .recv_timeout(VCPU_ANSWER_TIMEOUT)
            .map_err(|_| VcpuStateError::NoAnswer(index as u32))??;
        vcpus.push(state);
    }
    Ok(vcpus)
}

/// Takes a full snapshot of a paused VM into `state_path` and `mem_path`. `progress` sees
/// (bytes of guest memory examined, total). Both files are written through `PATH.tmp` and
/// renamed, so an existing snapshot at those paths survives a failure.
pub fn save(
    src: &SaveSource<'_>,
    state_path: &Path,
    mem_path: &Path,
    diff: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<SaveReport, SnapshotError> {
    let started = Instant::now();
    let base = match (diff, src.base) {
        (true, None) => return Err(SnapshotError::NoBase),
        (true, Some(base)) => Some(base),
        (false, _) => None,
    };
    if src.devices.len() != src.device_backends.len() {
        return Err(SnapshotError::UnsupportedDevices(
            src.devices
                .iter()
                .map(|d| d.name.clone())
                .collect::<Vec<_>>()
                .join(", "),
        ));
    }
    let unsaveable: Vec<&str> = src
        .devices
        .iter()
        .zip(src.device_backends)
        .filter(|(_, b)| b.backend.is_none())
        .map(|(d, _)| d.name.as_str())
        .collect();
    if !unsaveable.is_empty() {
        return Err(SnapshotError::SharedDirectories(unsaveable.join(", ")));
    }
    if state_path == mem_path {
        return Err(SnapshotError::SamePath);
    }
    if !src.gate.wait_parked(VCPU_ANSWER_TIMEOUT) {
        return Err(SnapshotError::NotPaused);
    }
    let vcpus = save_vcpus(src)?;
    let vm = vm_state::save(src.vm.fd())?;
    let serial = src
        .serial
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .save_state();
    // The event loop is parked: no queue is being processed, so the used rings in guest memory
    // say where every device stands.
    let devices = src
        .devices
        .iter()
        .zip(src.device_backends)
        .map(|(slot, backend)| state::DeviceState {
            name: slot.name.clone(),
            backend: Some(backend.clone()),
            transport: Some(slot.save_state()),
        })
        .collect();
    let state_us = started.elapsed().as_micros() as u64;

    let mem_started = Instant::now();
    let id = memory::new_id();
    let memory = match base {
        Some(base) => diff::write_diff_file(mem_path, src.vm.memory(), &id, base)?,
        None => memory::write_memory_file(mem_path, src.vm.memory(), &id, progress)?,
    };
    let memory_us = mem_started.elapsed().as_micros() as u64;
    let memory_written = memory.bytes_written;

    let snapshot = SnapshotState {
        machine: Some(MachineState {
            mem_size: src.mem_size,
            vcpus: vcpus.len() as u32,
        }),
        vcpus,
        vm: Some(vm),
        memory: Some(memory),
        serial: Some(serial),
        devices,
    };
    let payload = snapshot.to_bytes();
    file::write(state_path, &payload)?;
    let new_base = match base {
        Some(_) => None,
        None => std::fs::canonicalize(mem_path)
            .ok()
            .map(|path| diff::BaseRef {
                handle: None,
                path,
                id: id.to_vec(),
                mapped: false,
            }),
    };
    Ok(SaveReport {
        new_base,
        state_bytes: file::encode(&[]).len() as u64 + payload.len() as u64,
        memory_bytes: guest_ram_bytes(src.vm.memory()),
        memory_written,
        state_us,
        memory_us,
        total_us: started.elapsed().as_micros() as u64,
    })
}

/// Guest RAM in bytes.
pub fn guest_ram_bytes(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

/// A checked snapshot with its guest memory mapped (privately), ready to restore.
pub struct LoadedSnapshot {
    /// The decoded state.
    pub state: SnapshotState,
    /// Guest memory backed by the memory file, MAP_PRIVATE.
    pub memory: GuestMemoryMmap,
    /// The full memory file guest memory maps (a base for diffs of the restored VM).
    pub base: Option<diff::BaseRef>,
}

/// Where a restore's files are when the VMM is given fds (`/proc/self/fd/N`) rather than
/// paths it can open: the names to record, and the base to open instead of the one the state
/// names.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LoadNames {
    /// The memory file's host path, recorded as the base of the restored VM's later diffs
    /// (default: the memory file's own path, canonicalized).
    pub mem_name: Option<PathBuf>,
    /// For a diff: the base memory file to open (default: the path its state records).
    pub base: Option<PathBuf>,
}

/// Reads and checks the state file and maps the memory file that belongs to it. Neither file
/// is modified, whatever is wrong with them.
pub fn load(
    state_path: &Path,
    mem_path: &Path,
    names: &LoadNames,
) -> Result<LoadedSnapshot, SnapshotError> {
    let payload = file::read(state_path)?;
    let state = SnapshotState::from_bytes(&payload)
        .map_err(|e| SnapshotError::State(state_path.to_path_buf(), e))?;
    let mem_state = state.memory.as_ref().ok_or_else(|| {
        SnapshotError::State(
            state_path.to_path_buf(),
            state::StateError::Missing("memory"),
        )
    })?;
    let handle = |path: &Path| file::open_input(path).ok().map(diff::BaseHandle::new);
    if mem_state.base_path.is_empty() {
        let memory = memory::map_memory_file(mem_path, mem_state)?;
        let name = names
            .mem_name
            .clone()
            .or_else(|| std::fs::canonicalize(mem_path).ok());
        let base = name.map(|path| diff::BaseRef {
            handle: handle(mem_path),
            path,
            id: mem_state.id.clone(),
            mapped: true,
        });
        return Ok(LoadedSnapshot {
            state,
            memory,
            base,
        });
    }
    // A diff: its base copy-on-write, then the diff's pages over it.
    let base_path = PathBuf::from(&mem_state.base_path);
    let base_open = names.base.clone().unwrap_or_else(|| base_path.clone());
    let base_state = state::MemoryState {
        id: mem_state.base_id.clone(),
        regions: mem_state.regions.clone(),
        ..Default::default()
    };
    let memory = memory::map_memory_file(&base_open, &base_state)?;
    diff::apply_diff(&memory, mem_path, mem_state)?;
    Ok(LoadedSnapshot {
        base: Some(diff::BaseRef {
            handle: handle(&base_open),
            path: base_path,
            id: mem_state.base_id.clone(),
            mapped: true,
        }),
        state,
        memory,
    })
}

#[cfg(test)]
mod kvm_tests;
