//! One vCPU's state: read while the vCPU is parked (on its own thread, which serves a
//! `crate::vstate::vcpu::VcpuRequest` by calling [`save`]) and written into a fresh vCPU before
//! it first runs. This module works on a vCPU fd only; the vCPU thread and its run loop depend
//! on it, never the other way round.
//!
//! Restore order matters to KVM: CPUID first (it decides which MSRs and XSAVE features exist),
//! then the TSC frequency, general and special registers (EFER, APIC base), FPU/XSAVE and XCRs,
//! the LAPIC (after the APIC base in sregs), MSRs (after EFER and the TSC frequency), debug
//! registers, pending events, and the MP state last (it may make the vCPU runnable).

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::VcpuFd;

use super::state::{pod_bytes, pod_from, StateError, VcpuState};

/// Errors reading or writing one vCPU's state.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    /// A vCPU ioctl failed.
    #[error("vCPU {index}: cannot {op}")]
    Ioctl {
        /// The vCPU.
        index: u32,
        /// What was being done (e.g. "get sregs").
        op: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The state in the file does not fit this KVM.
    #[error("vCPU {0}")]
    State(u32, #[source] StateError),
    /// KVM took fewer MSRs than the snapshot holds.
    #[error("vCPU {index}: KVM refused MSR {msr:#x} ({set} of {total} set)")]
    Msr {
        /// The vCPU.
        index: u32,
        /// The first MSR KVM refused.
        msr: u32,
        /// How many were set before it.
        set: usize,
        /// How many there are.
        total: usize,
    },
    /// The MSR or CPUID list could not be built.
    #[error("vCPU {0}: cannot build an MSR or CPUID list")]
    Fam(u32, #[source] vmm_sys_util::fam::Error),
    /// The vCPU thread is gone or did not answer.
    #[error("vCPU {0} did not answer the state request (its thread has ended)")]
    NoAnswer(u32),
}

fn ioctl(index: u32, op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError::Ioctl { index, op, source }
}

/// Reads the MSRs of `candidates` that this vCPU has: KVM_GET_MSRS stops at the first MSR it
/// cannot read, which is dropped before trying the rest again.
fn save_msrs(
    fd: &VcpuFd,
    index: u32,
    candidates: &[u32],
) -> Result<Vec<kvm_msr_entry>, VcpuStateError> {
    let mut saved = Vec::with_capacity(candidates.len());
    let mut rest = candidates;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&i| kvm_msr_entry {
                index: i,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| VcpuStateError::Fam(index, e))?;
        let n = fd.get_msrs(&mut msrs).map_err(ioctl(index, "get MSRs"))?;
        saved.extend_from_slice(&msrs.as_slice()[..n.min(rest.len())]);
        if n < rest.len() {
            log::debug!(
                "vcpu{index}: MSR {:#x} is not saved (KVM cannot read it)",
                rest[n]
            );
        }
        rest = rest.get(n + 1..).unwrap_or(&[]);
    }
    Ok(saved)
}

/// Reads every piece of state of vCPU `index` (its fd `fd`), which is outside KVM_RUN. The
/// CPUID recorded is `cpuid`, the one the VMM set: KVM_GET_CPUID2 need not return it verbatim.
pub fn save(
    fd: &VcpuFd,
    index: u32,
    cpuid: &[kvm_cpuid_entry2],
    msr_list: &[u32],
) -> Result<VcpuState, VcpuStateError> {
    let cpuid_bytes = cpuid.iter().flat_map(pod_bytes).collect();
    let mp_state = fd.get_mp_state().map_err(ioctl(index, "get MP state"))?;
    // Not every host can tell (no constant TSC); 0 means "leave KVM's default" on restore.
    let tsc_khz = fd.get_tsc_khz().unwrap_or(0);
    let msrs = save_msrs(fd, index, msr_list)?;
    Ok(VcpuState {
        index,
        cpuid: cpuid_bytes,
        regs: pod_bytes(&fd.get_regs().map_err(ioctl(index, "get regs"))?),
        sregs: pod_bytes(&fd.get_sregs().map_err(ioctl(index, "get sregs"))?),
        fpu: pod_bytes(&fd.get_fpu().map_err(ioctl(index, "get FPU"))?),
        xsave: pod_bytes(&fd.get_xsave().map_err(ioctl(index, "get XSAVE"))?),
        xcrs: pod_bytes(&fd.get_xcrs().map_err(ioctl(index, "get XCRs"))?),
        msr_indices: msrs.iter().map(|m| m.index).collect(),
        msr_values: msrs.iter().map(|m| m.data).collect(),
        lapic: pod_bytes(&fd.get_lapic().map_err(ioctl(index, "get LAPIC"))?),
        debug_regs: pod_bytes(
            &fd.get_debug_regs()
                .map_err(ioctl(index, "get debug regs"))?,
        ),
        vcpu_events: pod_bytes(
            &fd.get_vcpu_events()
                .map_err(ioctl(index, "get vCPU events"))?,
        ),
        mp_state: mp_state.mp_state,
        tsc_khz,
    })
}

/// The CPUID entries of a saved vCPU.
pub fn cpuid_entries(state: &VcpuState) -> Result<Vec<kvm_cpuid_entry2>, StateError> {
    let size = std::mem::size_of::<kvm_cpuid_entry2>();
    if state.cpuid.is_empty() || state.cpuid.len() % size != 0 {
        return Err(StateError::Size {
            what: "cpuid",
            actual: state.cpuid.len(),
            expected: size,
        });
    }
    state
        .cpuid
        .chunks(size)
        .map(|c| pod_from("cpuid entry", c))
        .collect()
}

/// Everything of `state` decoded and size-checked, before any of it reaches KVM.
struct Decoded {
    cpuid: CpuId,
    regs: kvm_regs,
    sregs: kvm_sregs,
    fpu: kvm_fpu,
    xsave: kvm_xsave,
    xcrs: kvm_xcrs,
    lapic: kvm_lapic_state,
    debug_regs: kvm_debugregs,
    events: kvm_vcpu_events,
    msrs: Msrs,
}

fn decode(state: &VcpuState) -> Result<Decoded, VcpuStateError> {
    let i = state.index;
    let st = |e| VcpuStateError::State(i, e);
    if state.msr_indices.len() != state.msr_values.len() {
        return Err(st(StateError::Size {
            what: "msr_values",
            actual: state.msr_values.len(),
            expected: state.msr_indices.len(),
        }));
    }
    let entries: Vec<kvm_msr_entry> = state
        .msr_indices
        .iter()
        .zip(&state.msr_values)
        .map(|(&index, &data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    Ok(Decoded {
        cpuid: CpuId::from_entries(&cpuid_entries(state).map_err(st)?)
            .map_err(|e| VcpuStateError::Fam(i, e))?,
        regs: pod_from("regs", &state.regs).map_err(st)?,
        sregs: pod_from("sregs", &state.sregs).map_err(st)?,
        fpu: pod_from("fpu", &state.fpu).map_err(st)?,
        xsave: pod_from("xsave", &state.xsave).map_err(st)?,
        xcrs: pod_from("xcrs", &state.xcrs).map_err(st)?,
        lapic: pod_from("lapic", &state.lapic).map_err(st)?,
        debug_regs: pod_from("debug_regs", &state.debug_regs).map_err(st)?,
        events: pod_from("vcpu_events", &state.vcpu_events).map_err(st)?,
        msrs: Msrs::from_entries(&entries).map_err(|e| VcpuStateError::Fam(i, e))?,
    })
}

/// Writes `state` into a freshly created vCPU that has not run; returns the CPUID it set.
pub fn restore(fd: &VcpuFd, state: &VcpuState) -> Result<Vec<kvm_cpuid_entry2>, VcpuStateError> {
    let i = state.index;
    let d = decode(state)?;
    fd.set_cpuid2(&d.cpuid).map_err(ioctl(i, "set CPUID"))?;
    if state.tsc_khz != 0 {
        if let Err(e) = fd.set_tsc_khz(state.tsc_khz) {
            // Without TSC scaling the guest sees the host's rate; kvmclock still keeps time.
            log::warn!("vcpu{i}: cannot set the TSC to {} kHz: {e}", state.tsc_khz);
        }
    }
    fd.set_regs(&d.regs).map_err(ioctl(i, "set regs"))?;
    fd.set_sregs(&d.sregs).map_err(ioctl(i, "set sregs"))?;
    fd.set_fpu(&d.fpu).map_err(ioctl(i, "set FPU"))?;
    // SAFETY: `d.xsave` is a whole kvm_xsave (4 KiB). KVM copies the guest FPU's uabi size,
    // which exceeds 4 KiB only for dynamically enabled features (AMX) that husk never asks for
    // (no ARCH_REQ_XCOMP_GUEST_PERM), so KVM reads nothing past the struct.
    unsafe { fd.set_xsave(&d.xsave) }.map_err(ioctl(i, "set XSAVE"))?;
    fd.set_xcrs(&d.xcrs).map_err(ioctl(i, "set XCRs"))?;
    fd.set_lapic(&d.lapic).map_err(ioctl(i, "set LAPIC"))?;
    let total = d.msrs.as_slice().len();
    let set = fd.set_msrs(&d.msrs).map_err(ioctl(i, "set MSRs"))?;
    if set < total {
        return Err(VcpuStateError::Msr {
            index: i,
            msr: d.msrs.as_slice()[set].index,
            set,
            total,
        });
    }
    fd.set_debug_regs(&d.debug_regs)
        .map_err(ioctl(i, "set debug regs"))?;
    fd.set_vcpu_events(&d.events)
        .map_err(ioctl(i, "set vCPU events"))?;
    fd.set_mp_state(kvm_mp_state {
        mp_state: state.mp_state,
    })
    .map_err(ioctl(i, "set MP state"))?;
    Ok(d.cpuid.as_slice().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::state::tests::sample;

    #[test]
    fn decoding_checks_every_size_before_touching_kvm() {
        // The sample's blobs are placeholders of the wrong sizes: decoding must refuse them.
        let s = sample();
        assert!(matches!(
            decode(&s.vcpus[0]),
            Err(VcpuStateError::State(0, _))
        ));
        let mut v = s.vcpus[0].clone();
        v.msr_values.pop();
        assert!(decode(&v).is_err());
    }

    #[test]
    fn cpuid_blobs_must_be_whole_entries() {
        let mut v = sample().vcpus[0].clone();
        let entry = kvm_cpuid_entry2 {
            function: 7,
            ebx: 0x1234,
            ..Default::default()
        };
        v.cpuid = [pod_bytes(&entry), pod_bytes(&entry)].concat();
        let entries = cpuid_entries(&v).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!((entries[1].function, entries[1].ebx), (7, 0x1234));
        v.cpuid.pop();
        assert!(cpuid_entries(&v).is_err());
        v.cpuid.clear();
        assert!(cpuid_entries(&v).is_err());
    }
}
