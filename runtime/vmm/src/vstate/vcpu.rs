//! vCPUs: creation, per-vCPU configuration (CPUID, MSRs, FPU, LAPIC) and the run loop that
//! turns KVM exits into bus accesses or stop requests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_xcr, kvm_xcrs, CpuId, KVM_EXIT_INTERNAL_ERROR, KVM_SYSTEM_EVENT_CRASH,
    KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::arch::x86_64::cpuid::{guest_xcr0, normalize, CpuTopology};
use crate::arch::x86_64::{lapic, msr, regs};
use crate::devices::bus::Bus;
use crate::pause::{GateMember, PauseGate};
use crate::signals;
use crate::snapshot::state::VcpuState;
use crate::snapshot::vcpu_state::{self, VcpuStateError};
use crate::stop::{StopReason, StopState};
use crate::vstate::vm::Vm;

/// Errors while creating or configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// KVM_CREATE_VCPU failed.
    #[error("cannot create vCPU {0}")]
    Create(u8, #[source] kvm_ioctls::Error),
    /// The CPUID list could not be built.
    #[error("cannot build the CPUID of vCPU {0}")]
    CpuidFam(u8, #[source] vmm_sys_util::fam::Error),
    /// KVM_SET_CPUID2 failed.
    #[error("cannot set the CPUID of vCPU {0}")]
    SetCpuid(u8, #[source] kvm_ioctls::Error),
    /// MSR setup failed.
    #[error("vCPU {0}")]
    Msr(u8, #[source] msr::MsrError),
    /// FPU or register setup failed.
    #[error("vCPU {0}")]
    Regs(u8, #[source] regs::RegsError),
    /// LAPIC setup failed.
    #[error("vCPU {0}")]
    Lapic(u8, #[source] lapic::LapicError),
}

/// One vCPU.
pub struct Vcpu {
    /// The KVM vCPU fd.
    pub fd: VcpuFd,
    /// Index, also the APIC id.
    pub index: u8,
    /// The CPUID the VMM gave this vCPU (what a snapshot records: KVM_GET_CPUID2 need not
    /// return it verbatim, e.g. under PVM).
    pub cpuid: Vec<kvm_cpuid_entry2>,
}

impl Vcpu {
    /// Creates vCPU `index` in `vm`.
    pub fn new(vm: &Vm, index: u8) -> Result<Self, VcpuError> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(index))
            .map_err(|e| VcpuError::Create(index, e))?;
        Ok(Vcpu {
            fd,
            index,
            cpuid: Vec::new(),
        })
    }

    /// Gives the vCPU its CPUID (from `supported`, normalised for this vCPU), boot MSRs, FPU
    /// state and LAPIC virtual-wire setup.
    pub fn configure(&mut self, supported: &CpuId, num_cpus: u8) -> Result<(), VcpuError> {
        let i = self.index;
        let mut entries = supported.as_slice().to_vec();
        normalize(
            &mut entries,
            CpuTopology {
                apic_id: i,
                num_cpus,
            },
        );
        let cpuid = CpuId::from_entries(&entries).map_err(|e| VcpuError::CpuidFam(i, e))?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(|e| VcpuError::SetCpuid(i, e))?;
        if let Some(xcr0) = guest_xcr0(&entries) {
            self.preload_xcr0(xcr0);
        }
        self.cpuid = entries;
        msr::setup_msrs(&self.fd).map_err(|e| VcpuError::Msr(i, e))?;
        regs::setup_fpu(&self.fd).map_err(|e| VcpuError::Regs(i, e))?;
        lapic::setup_lapic(&self.fd).map_err(|e| VcpuError::Lapic(i, e))
    }
}

impl Vcpu {
    /// Loads the XCR0 the guest kernel will set, so that KVM sizes CPUID 0xd.0 EBX for it even
    /// where the guest's XSETBV never reaches KVM (nested under QEMU TCG). Harmless elsewhere:
    /// XCR0 only takes effect once the guest sets CR4.OSXSAVE, and its own XSETBV wins.
    fn preload_xcr0(&self, xcr0: u64) {
        let mut xcrs = kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        };
        xcrs.xcrs[0] = kvm_xcr {
            xcr: 0,
            value: xcr0,
            ..Default::default()
        };
        if let Err(e) = self.fd.set_xcrs(&xcrs) {
            log::warn!("vcpu{}: cannot preload XCR0 {xcr0:#x}: {e}", self.index);
        }
    }
}

/// A request served by a parked vCPU thread (KVM expects vCPU ioctls from the thread that runs
/// the vCPU; reading there also needs no lock around the vCPU fd).
pub enum VcpuRequest {
    /// Read the vCPU's state; `msrs` is the MSR index list to try.
    Save {
        /// MSRs to save (KVM_GET_MSR_INDEX_LIST of the host).
        msrs: Arc<Vec<u32>>,
        /// Where the answer goes.
        reply: Sender<Result<VcpuState, VcpuStateError>>,
    },
}

impl VcpuRequest {
    /// Serves the request for `vcpu`.
    fn serve(self, vcpu: &Vcpu) {
        match self {
            VcpuRequest::Save { msrs, reply } => {
                let state = vcpu_state::save(&vcpu.fd, u32::from(vcpu.index), &vcpu.cpuid, &msrs);
                // The requester may have given up (timeout); nothing to do then.
                let _ = reply.send(state);
            }
        }
    }
}

/// What a vCPU thread shares with the rest of the VMM.
#[derive(Clone)]
pub struct VcpuContext {
    /// Port-I/O devices.
    pub io_bus: Arc<Bus>,
    /// MMIO devices.
    pub mmio_bus: Arc<Bus>,
    /// Where stop requests go.
    pub stop: Arc<StopState>,
    /// Where the vCPU parks while the VM is paused.
    pub pause: Arc<PauseGate>,
    /// vCPUs that stopped on HLT, and how many there are in all.
    pub halted: Arc<AtomicUsize>,
    /// Number of vCPUs in the VM.
    pub num_cpus: usize,
}

enum ExitAction {
    Continue,
    Halt,
    InternalError,
    Stop(StopReason),
}

fn handle_exit(exit: VcpuExit, ctx: &VcpuContext, index: u8) -> ExitAction {
    match exit {
        VcpuExit::IoIn(port, data) => {
            ctx.io_bus.read(u64::from(port), data);
            ExitAction::Continue
        }
        VcpuExit::IoOut(port, data) => {
            ctx.io_bus.write(u64::from(port), data);
            ExitAction::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            ctx.mmio_bus.read(addr, data);
            ExitAction::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            ctx.mmio_bus.write(addr, data);
            ExitAction::Continue
        }
        VcpuExit::Hlt => ExitAction::Halt,
        VcpuExit::Shutdown => ExitAction::Stop(StopReason::GuestShutdown),
        VcpuExit::SystemEvent(kind, _) => match kind {
            KVM_SYSTEM_EVENT_RESET => ExitAction::Stop(StopReason::GuestReset),
            KVM_SYSTEM_EVENT_SHUTDOWN => ExitAction::Stop(StopReason::GuestShutdown),
            KVM_SYSTEM_EVENT_CRASH => ExitAction::Stop(StopReason::GuestCrash),
            other => {
                husk_devices::warn_limited!("vcpu{index}: ignoring system event {other}");
                ExitAction::Continue
            }
        },
        VcpuExit::FailEntry(reason, cpu) => ExitAction::Stop(StopReason::Error(format!(
            "vcpu{index}: VM entry failed (hardware reason {reason:#x}, host cpu {cpu})"
        ))),
        VcpuExit::InternalError => ExitAction::InternalError,
        VcpuExit::Intr | VcpuExit::IrqWindowOpen => ExitAction::Continue,
        other => ExitAction::Stop(StopReason::Error(format!(
            "vcpu{index}: unexpected KVM exit {other:?}"
        ))),
    }
}

fn internal_error(vcpu: &mut Vcpu) -> StopReason {
    let run = vcpu.fd.get_kvm_run();
    let detail = if run.exit_reason == KVM_EXIT_INTERNAL_ERROR {
        // SAFETY: with exit_reason KVM_EXIT_INTERNAL_ERROR, KVM filled the `internal` member.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        format!(
            "suberror {} (1: emulation failure), data {:x?}",
            internal.suberror,
            &internal.data[..n]
        )
    } else {
        String::from("no details")
    };
    StopReason::Error(format!("vcpu{}: KVM internal error: {detail}", vcpu.index))
}

/// Runs `vcpu` until the VM stops, parking whenever the VM is paused; while parked it serves
/// `requests` (snapshot state reads). This is the body of thread `vcpu<N>`.
pub fn run_vcpu(mut vcpu: Vcpu, ctx: VcpuContext, requests: Receiver<VcpuRequest>) {
    let _member = GateMember(&ctx.pause);
    signals::set_current_kvm_run(vcpu.fd.get_kvm_run());
    let index = vcpu.index;
    while !ctx.stop.is_stopping() {
        if ctx.pause.pause_requested() {
            // Outside KVM_RUN with the exit fully handled: nothing of this vCPU is in flight.
            ctx.pause.park_serving(|| {
                while let Ok(request) = requests.try_recv() {
                    request.serve(&vcpu);
                }
            });
            continue;
        }
        let action = match vcpu.fd.run() {
            Ok(exit) => handle_exit(exit, &ctx, index),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => ExitAction::Continue,
            Err(e) => ExitAction::Stop(StopReason::Error(format!(
                "vcpu{index}: KVM_RUN failed: {e}"
            ))),
        };
        // A kick may have landed outside KVM_RUN; the stop and pause flags are checked next anyway
        // (both are set before any kick is sent).
        vcpu.fd.set_kvm_immediate_exit(0);
        match action {
            ExitAction::Continue => {}
            ExitAction::Halt => {
                // Only without an in-kernel irqchip: nothing can wake this vCPU any more.
                if ctx.halted.fetch_add(1, Ordering::SeqCst) + 1 == ctx.num_cpus {
                    ctx.stop.request(StopReason::AllVcpusHalted);
                }
                break;
            }
            ExitAction::InternalError => {
                ctx.stop.request(internal_error(&mut vcpu));
                break;
            }
            ExitAction::Stop(reason) => {
                ctx.stop.request(reason);
                break;
            }
        }
    }
    signals::clear_current_kvm_run();
}
