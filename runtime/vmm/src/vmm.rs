//! A built VM and its run: one thread per vCPU, the device event loop, optionally the control
//! socket thread; the calling thread waits for a stop request, kicks every vCPU out of KVM_RUN,
//! joins them, and reports how the VM ended.

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_ioctls::Kvm;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::api::server::{ApiServer, ApiServerError, Limits};
use crate::api::socket::ApiSocket;
use crate::api::vm_handle::{SnapshotParts, VmHandle};
use crate::devices::bus::Bus;
use crate::devices::legacy::control_port::ControlState;
use crate::devices::legacy::serial::SerialDevice;
use crate::devices::virtio::VirtioSlot;
use crate::event_loop::{EventLoop, EventLoopError};
use crate::pause::PauseGate;
use crate::seccomp::{Filters, SeccompError, ThreadKind};
use crate::signals;
use crate::stop::{StopReason, StopState};
use crate::vstate::vcpu::{run_vcpu, Vcpu, VcpuContext};
use crate::vstate::vm::Vm;

/// Exit status when the VMM failed or the guest reported no exit code.
pub const EXIT_VMM_ERROR: i32 = 125;
/// How often stragglers are kicked again while joining.
const KICK_INTERVAL: Duration = Duration::from_millis(5);

/// Errors while starting the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// A vCPU thread could not be spawned.
    #[error("cannot start the thread of vCPU {0}")]
    Spawn(u8, #[source] std::io::Error),
    /// The kick signal handler could not be installed.
    #[error(transparent)]
    Signal(#[from] signals::SignalError),
    /// The device event loop could not start.
    #[error(transparent)]
    EventLoop(#[from] EventLoopError),
    /// The control socket thread could not start.
    #[error(transparent)]
    Api(#[from] ApiServerError),
    /// The event loop's pause event could not be shared with the control socket.
    #[error("cannot share the event loop's pause event")]
    PauseWaker(#[source] std::io::Error),
    /// The main thread's seccomp filter could not be installed.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
}

/// How a VM run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmOutcome {
    /// Why it stopped.
    pub reason: StopReason,
    /// Last exit code the guest reported on port 0x601.
    pub exit_code: Option<u8>,
    /// Microseconds from VMM start to "guest init started", if reported.
    pub init_time_us: Option<u64>,
    /// Port-I/O accesses nobody handled (reads, writes).
    pub unhandled_pio: (u64, u64),
    /// MMIO accesses nobody handled (reads, writes).
    pub unhandled_mmio: (u64, u64),
    /// Each virtio device's name and counters when the VM stopped.
    pub device_counters: Vec<(String, husk_devices::virtio::CounterSnapshot)>,
}

impl VmOutcome {
    /// The process exit status this outcome maps to: 128+signal for SIGINT/SIGTERM, 143 for a
    /// stop requested on the control socket, 125 for VMM errors and for a guest that stopped
    /// without reporting, otherwise the guest's exit code.
    pub fn exit_status(&self) -> i32 {
        match &self.reason {
            StopReason::Signal(sig) => 128 + sig,
            // Ended from outside, like SIGTERM: a supervisor tells it apart from a failure (125).
            StopReason::Requested => 128 + libc::SIGTERM,
            StopReason::Error(_) => EXIT_VMM_ERROR,
            _ => self.exit_code.map_or(EXIT_VMM_ERROR, i32::from),
        }
    }
}

/// A VM ready to run.
pub struct Vmm {
    // Field order is drop order: vCPUs, then the VM (fd before memory), then KVM.
    vcpus: Vec<Vcpu>,
    io_bus: Bus,
    mmio_bus: Bus,
    serial: Arc<Mutex<SerialDevice>>,
    control: Arc<ControlState>,
    stop: Arc<StopState>,
    devices: Vec<VirtioSlot>,
    /// Each thread installs its own filter from these (see [`crate::seccomp`]).
    seccomp: Arc<Filters>,
    /// Guest memory as configured (recorded in snapshots).
    mem_size: u64,
    /// Start with every vCPU parked (a restored VM kept paused).
    start_paused: bool,
    /// Backend identity of each virtio device, in slot order (recorded in snapshots).
    device_backends: Vec<crate::snapshot::state::DeviceBackend>,
    /// The full memory file guest memory maps (restored VMs), a base for diff snapshots.
    memory_base: Option<crate::snapshot::diff::BaseRef>,
    vm: Vm,
    _kvm: Kvm,
}

fn counts(bus: &Bus) -> (u64, u64) {
    let u = bus.unhandled();
    (
        u.reads.load(Ordering::Relaxed),
        u.writes.load(Ordering::Relaxed),
    )
}

impl Vmm {
    /// Assembles a VMM from its parts (see the builder).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        kvm: Kvm,
        vm: Vm,
        vcpus: Vec<Vcpu>,
        io_bus: Bus,
        mmio_bus: Bus,
        serial: Arc<Mutex<SerialDevice>>,
        control: Arc<ControlState>,
        stop: Arc<StopState>,
    ) -> Self {
        Vmm {
            vcpus,
            io_bus,
            mmio_bus,
            serial,
            control,
            stop,
            devices: Vec::new(),
            seccomp: Arc::new(Filters::off()),
            mem_size: 0,
            start_paused: false,
            device_backends: Vec::new(),
            memory_base: None,
            vm,
            _kvm: kvm,
        }
    }

    /// Records the configured guest memory size (see the builder).
    pub(crate) fn set_mem_size(&mut self, bytes: u64) {
        self.mem_size = bytes;
    }

    /// Records the memory file guest memory maps (see the builder).
    pub(crate) fn set_memory_base(&mut self, base: Option<crate::snapshot::diff::BaseRef>) {
        self.memory_base = base;
    }

    /// Records the virtio devices' backends (see the builder).
    pub(crate) fn set_device_backends(
        &mut self,
        backends: Vec<crate::snapshot::state::DeviceBackend>,
    ) {
        self.device_backends = backends;
    }

    /// Whether [`run`](Self::run) starts the VM paused (resumed later on the control socket).
    pub fn set_start_paused(&mut self, paused: bool) {
        self.start_paused = paused;
    }

    /// The VM and its MMIO bus, to attach devices before the VM runs.
    pub(crate) fn vm_and_mmio_bus(&mut self) -> (&Vm, &mut Bus) {
        (&self.vm, &mut self.mmio_bus)
    }

    /// Installs the virtio devices (see the builder).
    pub(crate) fn set_devices(&mut self, devices: Vec<VirtioSlot>) {
        self.devices = devices;
    }

    /// Sets the devices' rate limits (the command line's, before the VM runs; at run time the
    /// control socket does the same).
    pub fn set_rate_limits(
        &self,
        limits: &crate::devices::rate_limits::RateLimits,
    ) -> Result<(), crate::devices::rate_limits::RateLimitError> {
        crate::devices::rate_limits::apply(&self.devices, limits)
    }

    /// Signals every virtio queue once, so that the event loop walks each when it starts. After
    /// a restore: a queue that was parked by its rate limiter (or cut short at its budget) when
    /// the snapshot was taken has guest notifications off and nothing else would resume it.
    pub fn notify_all_queues(&self) {
        for slot in &self.devices {
            for evt in &slot.queue_events {
                let _ = evt.write(1);
            }
        }
    }

    /// The seccomp filters the VM's threads install when it runs (none by default).
    pub fn set_seccomp(&mut self, filters: Filters) {
        self.seccomp = Arc::new(filters);
    }

    /// The VM (memory, fd).
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// The vCPUs.
    pub fn vcpus(&self) -> &[Vcpu] {
        &self.vcpus
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> u8 {
        self.vcpus.len() as u8
    }

    /// The port-I/O bus, for adding devices before the VM runs.
    pub fn io_bus_mut(&mut self) -> &mut Bus {
        &mut self.io_bus
    }

    /// The MMIO bus, for adding devices before the VM runs.
    pub fn mmio_bus_mut(&mut self) -> &mut Bus {
        &mut self.mmio_bus
    }

    /// The stop state (for signal handlers and tests).
    pub fn stop_state(&self) -> Arc<StopState> {
        self.stop.clone()
    }

    /// Runs the VM until it stops.
    pub fn run(self) -> Result<VmOutcome, VmmError> {
        self.run_with_api(None)
    }

    /// Runs the VM until it stops, serving the control socket `api` (if any) meanwhile. The
    /// socket path is removed before this returns.
    pub fn run_with_api(self, api: Option<ApiSocket>) -> Result<VmOutcome, VmmError> {
        signals::install_kick_handler()?;
        let memory_mib = guest_memory_mib(&self.vm);
        let Vmm {
            vcpus,
            io_bus,
            mmio_bus,
            serial,
            control,
            stop,
            devices,
            seccomp,
            mem_size,
            start_paused,
            device_backends,
            memory_base,
            vm,
            _kvm,
        } = self;
        let vm = Arc::new(vm);
        let devices = Arc::new(devices);
        // Members: every vCPU thread and the event loop.
        let members = vcpus.len() + 1;
        let gate = Arc::new(if start_paused {
            PauseGate::new_paused(members)
        } else {
            PauseGate::new(members)
        });
        let event_loop = EventLoop::start(devices.clone(), gate.clone(), seccomp.clone())?;
        let ctx = VcpuContext {
            io_bus: Arc::new(io_bus),
            mmio_bus: Arc::new(mmio_bus),
            stop: stop.clone(),
            pause: gate.clone(),
            halted: Arc::new(AtomicUsize::new(0)),
            num_cpus: vcpus.len(),
        };
        let vcpu_count = vcpus.len();
        let mut threads: Vec<JoinHandle<()>> = Vec::with_capacity(vcpu_count);
        let mut vcpu_requests = Vec::with_capacity(vcpu_count);
        let mut start_error = None;
        for vcpu in vcpus {
            let index = vcpu.index;
            let ctx = ctx.clone();
            let (requests, inbox) = mpsc::channel();
            vcpu_requests.push(requests);
            let seccomp = seccomp.clone();
            match std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || match seccomp.install(ThreadKind::Vcpu) {
                    Ok(()) => run_vcpu(vcpu, ctx, inbox),
                    Err(e) => {
                        ctx.pause.leave();
                        ctx.stop
                            .request(StopReason::Error(format!("vcpu{index}: {e}")));
                    }
                }) {
                Ok(t) => threads.push(t),
                Err(e) => {
                    start_error = Some(VmmError::Spawn(index, e));
                    stop.request(StopReason::Error(String::from("vCPU thread start failed")));
                    break;
                }
            }
        }
        for _ in threads.len()..vcpu_count {
            gate.leave();
        }

        let api_server = match api {
            Some(socket) if start_error.is_none() => {
                let handle = event_loop.pause_waker().map_err(VmmError::PauseWaker).map(
                    |event_loop_waker| VmHandle {
                        gate: gate.clone(),
                        stop: stop.clone(),
                        vcpu_threads: threads.iter().map(|t| t.as_pthread_t()).collect(),
                        event_loop_waker,
                        devices: devices.clone(),
                        control: control.clone(),
                        vcpus: vcpu_count as u32,
                        memory_mib,
                        snapshot: SnapshotParts {
                            vm: vm.clone(),
                            vcpu_requests: std::mem::take(&mut vcpu_requests),
                            msr_list: Arc::new(saveable_msr_list(&_kvm)),
                            serial: serial.clone(),
                            mem_size,
                            device_backends: device_backends.clone(),
                            memory_base: Mutex::new(memory_base.clone()),
                        },
                    },
                );
                match handle.and_then(|h| {
                    ApiServer::start(socket, Box::new(h), Limits::default(), seccomp.clone())
                        .map_err(Into::into)
                }) {
                    Ok(server) => Some(server),
                    Err(e) => {
                        stop.request(StopReason::Error(String::from(
                            "control socket start failed",
                        )));
                        start_error = Some(e);
                        None
                    }
                }
            }
            _ => None,
        };

        // Every thread runs now: the main thread's own filter goes on before it waits.
        if start_error.is_none() {
            if let Err(e) = seccomp.install(ThreadKind::Main) {
                stop.request(StopReason::Error(String::from("seccomp failed")));
                start_error = Some(e.into());
            }
        }
        let reason = stop.wait(|s| {
            if let Some(sig) = signals::take_pending_stop_signal() {
                s.request(StopReason::Signal(sig));
            }
        });
        // Parked threads go on (and see the stop); no pause can start any more.
        gate.close();
        // Before the vCPU threads are joined: the control socket kicks them by id.
        if let Some(server) = api_server {
            server.shutdown();
        }
        // Every thread gets kicked until it has left KVM_RUN and returned.
        while threads.iter().any(|t| !t.is_finished()) {
            for t in threads.iter().filter(|t| !t.is_finished()) {
                signals::kick(t.as_pthread_t());
            }
            std::thread::sleep(KICK_INTERVAL);
        }
        for t in threads {
            if t.join().is_err() {
                log::error!("a vCPU thread panicked");
            }
        }
        event_loop.stop();
        // Disks last: nothing touches them any more (a qcow2 image writes back its tables and
        // returns the clusters it reserved).
        for d in devices.iter() {
            if let Err(e) = d.sync_backend(true) {
                log::warn!("{}: closing the backend: {e}", d.name);
            }
        }
        serial
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .flush();
        let device_counters = devices
            .iter()
            .map(|d| (d.name.clone(), d.counters()))
            .collect();
        drop(vm);
        if let Some(e) = start_error {
            return Err(e);
        }
        Ok(VmOutcome {
            reason,
            exit_code: control.exit_code(),
            init_time_us: control.init_time_us(),
            unhandled_pio: counts(&ctx.io_bus),
            unhandled_mmio: counts(&ctx.mmio_bus),
            device_counters,
        })
    }
}

/// The MSRs a snapshot tries to save: KVM's list for this host (empty if KVM cannot say, which
/// a snapshot then reports as missing MSR state only through the restored guest's behaviour;
/// KVM always answers on supported hosts).
fn saveable_msr_list(kvm: &Kvm) -> Vec<u32> {
    match kvm.get_msr_index_list() {
        Ok(list) => list.as_slice().to_vec(),
        Err(e) => {
            log::warn!("cannot read KVM's MSR index list ({e}); snapshots will lack MSRs");
            Vec::new()
        }
    }
}

/// Guest RAM in MiB (the MMIO gap is not RAM).
fn guest_memory_mib(vm: &Vm) -> u32 {
    let bytes: u64 = vm.memory().iter().map(|region| region.len()).sum();
    u32::try_from(bytes >> 20).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_utils::outcome;

    #[test]
    fn exit_status_follows_the_contract() {
        assert_eq!(outcome(StopReason::GuestReset, Some(42)).exit_status(), 42);
        assert_eq!(outcome(StopReason::GuestShutdown, Some(0)).exit_status(), 0);
        assert_eq!(outcome(StopReason::GuestReset, None).exit_status(), 125);
        assert_eq!(
            outcome(StopReason::Signal(libc::SIGINT), Some(3)).exit_status(),
            130
        );
        assert_eq!(
            outcome(StopReason::Signal(libc::SIGTERM), None).exit_status(),
            143
        );
        assert_eq!(
            outcome(StopReason::Error("x".into()), Some(0)).exit_status(),
            125
        );
    }
}
