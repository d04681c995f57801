//! Local APIC setup: LINT0 as ExtINT (the 8259 PIC's output, virtual wire mode) and LINT1 as NMI,
//! as a PC BIOS leaves them (MP spec 1.4, 3.6.2.2 "Virtual Wire Mode").

use kvm_bindings::kvm_lapic_state;
use kvm_ioctls::VcpuFd;

/// Register offsets in the APIC page (Intel SDM Vol. 3A, table 11-1).
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
/// Delivery mode field of an LVT entry (bits 8..11).
const DELIVERY_MODE_MASK: u32 = 0x700;
const DELIVERY_MODE_NMI: u32 = 0x4 << 8;
const DELIVERY_MODE_EXTINT: u32 = 0x7 << 8;

/// Errors while programming the local APIC.
#[derive(Debug, thiserror::Error)]
pub enum LapicError {
    /// KVM_GET_LAPIC failed.
    #[error("cannot read the local APIC")]
    Get(#[source] kvm_ioctls::Error),
    /// KVM_SET_LAPIC failed.
    #[error("cannot set the local APIC")]
    Set(#[source] kvm_ioctls::Error),
}

/// Reads the 32-bit APIC register at `offset`.
pub fn get_reg(state: &kvm_lapic_state, offset: usize) -> u32 {
    let mut b = [0u8; 4];
    for (i, byte) in b.iter_mut().enumerate() {
        *byte = state.regs[offset + i] as u8;
    }
    u32::from_le_bytes(b)
}

/// Writes the 32-bit APIC register at `offset`.
pub fn set_reg(state: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().iter().enumerate() {
        state.regs[offset + i] = *byte as _;
    }
}

/// Sets LINT0 to ExtINT and LINT1 to NMI in `state`, keeping the other LVT bits.
pub fn configure_lint(state: &mut kvm_lapic_state) {
    let lvt0 = get_reg(state, APIC_LVT0);
    set_reg(
        state,
        APIC_LVT0,
        (lvt0 & !DELIVERY_MODE_MASK) | DELIVERY_MODE_EXTINT,
    );
    let lvt1 = get_reg(state, APIC_LVT1);
    set_reg(
        state,
        APIC_LVT1,
        (lvt1 & !DELIVERY_MODE_MASK) | DELIVERY_MODE_NMI,
    );
}

/// Programs LINT0/LINT1 of `vcpu`'s in-kernel local APIC.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), LapicError> {
    let mut state = vcpu.get_lapic().map_err(LapicError::Get)?;
    configure_lint(&mut state);
    vcpu.set_lapic(&state).map_err(LapicError::Set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lint0_is_extint_and_lint1_is_nmi() {
        let mut s = kvm_lapic_state::default();
        set_reg(&mut s, APIC_LVT0, 0x0001_0000 | 0x500);
        set_reg(&mut s, APIC_LVT1, 0x0001_0000);
        configure_lint(&mut s);
        assert_eq!(get_reg(&s, APIC_LVT0), 0x0001_0700);
        assert_eq!(get_reg(&s, APIC_LVT1), 0x0001_0400);
    }
}
