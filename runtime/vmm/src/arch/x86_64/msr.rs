//! Model-specific registers every vCPU starts with.
//!
//! MSR numbers: Intel SDM Vol. 4. KVM resets most MSRs itself; these are the ones whose reset
//! value is not what a booting Linux expects from a BIOS.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// MISC_ENABLE bit 0: fast string operations, which every BIOS enables.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRdefType: MTRRs enabled (bit 11), default memory type write-back (6).
const MTRR_DEF_TYPE_ENABLED_WB: u64 = (1 << 11) | 6;

/// Errors while setting MSRs.
#[derive(Debug, thiserror::Error)]
pub enum MsrError {
    /// The MSR list could not be built.
    #[error("cannot build the MSR list")]
    Fam(#[source] vmm_sys_util::fam::Error),
    /// KVM_SET_MSRS failed.
    #[error("cannot set the boot MSRs")]
    Set(#[source] kvm_ioctls::Error),
}

/// The boot MSR list.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_DEF_TYPE_ENABLED_WB),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// Sets the boot MSRs. KVM stops at the first MSR it refuses; the rest are optional niceties, so
/// that is logged, not fatal (PVM, for one, refuses some of them).
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), MsrError> {
    let entries = boot_msr_entries();
    let msrs = Msrs::from_entries(&entries).map_err(MsrError::Fam)?;
    let set = vcpu.set_msrs(&msrs).map_err(MsrError::Set)?;
    if set < entries.len() {
        log::warn!(
            "KVM accepted {set} of {} boot MSRs; first refused: {:#x}",
            entries.len(),
            entries[set].index
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_msrs_enable_fast_strings_and_write_back_mtrrs() {
        let e = boot_msr_entries();
        let get = |i| e.iter().find(|m| m.index == i).map(|m| m.data);
        assert_eq!(get(MSR_IA32_MISC_ENABLE), Some(1));
        assert_eq!(get(MSR_MTRR_DEF_TYPE), Some(0x806));
        assert_eq!(get(MSR_LSTAR), Some(0));
    }
}
