//! The ioctl request numbers the seccomp tables allow, computed as the kernel headers define
//! them (`_IO`/`_IOR`/`_IOW`/`_IOWR` of linux/kvm.h and linux/if_tun.h, with the size of the
//! kvm_bindings struct each one passes), never typed in by hand. The tests pin the results to the
//! numbers the x86-64 kernel uses, so a wrong direction, number or struct fails a unit test.

use std::mem::size_of;

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msrs,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, KVMIO,
};
use vmm_sys_util::ioctl::{ioctl_expr, _IOC_NONE, _IOC_READ, _IOC_WRITE};

/// `_IOC(dir, ty, nr, size_of::<T>())`; refuses (at build time) a struct too large for the
/// 14-bit size field or a number that does not fit the 32 bits seccomp compares.
const fn ioc<T>(dir: u32, ty: u32, nr: u32) -> u32 {
    let size = size_of::<T>();
    assert!(size < 1 << 14, "ioctl argument too large for _IOC");
    let request = ioctl_expr(dir, ty, nr, size as u32);
    assert!(request <= u32::MAX as std::os::raw::c_ulong);
    request as u32
}

/// `_IO(ty, nr)`.
const fn io(ty: u32, nr: u32) -> u32 {
    ioc::<()>(_IOC_NONE, ty, nr)
}

/// `_IOR(ty, nr, T)`.
const fn ior<T>(ty: u32, nr: u32) -> u32 {
    ioc::<T>(_IOC_READ, ty, nr)
}

/// `_IOW(ty, nr, T)`.
const fn iow<T>(ty: u32, nr: u32) -> u32 {
    ioc::<T>(_IOC_WRITE, ty, nr)
}

/// `_IOWR(ty, nr, T)`.
const fn iowr<T>(ty: u32, nr: u32) -> u32 {
    ioc::<T>(_IOC_READ | _IOC_WRITE, ty, nr)
}

/// `_IO(KVMIO, 0x80)`.
pub const KVM_RUN: u32 = io(KVMIO, 0x80);
/// `_IOW('T', 208, unsigned int)` (linux/if_tun.h).
pub const TUNSETOFFLOAD: u32 = iow::<std::os::raw::c_uint>(b'T' as u32, 208);
/// FIONBIO (asm-generic/ioctls.h, a legacy number without `_IOC` encoding): std's
/// `set_nonblocking` on sockets.
pub const FIONBIO: u32 = libc::FIONBIO as u32;

// The state reads of a snapshot. vCPU ioctls, made by each parked vCPU thread:
pub const KVM_GET_REGS: u32 = ior::<kvm_regs>(KVMIO, 0x81);
pub const KVM_GET_SREGS: u32 = ior::<kvm_sregs>(KVMIO, 0x83);
pub const KVM_GET_MSRS: u32 = iowr::<kvm_msrs>(KVMIO, 0x88);
pub const KVM_GET_FPU: u32 = ior::<kvm_fpu>(KVMIO, 0x8c);
pub const KVM_GET_LAPIC: u32 = ior::<kvm_lapic_state>(KVMIO, 0x8e);
pub const KVM_GET_MP_STATE: u32 = ior::<kvm_mp_state>(KVMIO, 0x98);
pub const KVM_GET_VCPU_EVENTS: u32 = ior::<kvm_vcpu_events>(KVMIO, 0x9f);
pub const KVM_GET_DEBUGREGS: u32 = ior::<kvm_debugregs>(KVMIO, 0xa1);
pub const KVM_GET_TSC_KHZ: u32 = io(KVMIO, 0xa3);
pub const KVM_GET_XSAVE: u32 = ior::<kvm_xsave>(KVMIO, 0xa4);
pub const KVM_GET_XCRS: u32 = ior::<kvm_xcrs>(KVMIO, 0xa6);
// VM ioctls, made by the control-socket thread:
pub const KVM_GET_CLOCK: u32 = ior::<kvm_clock_data>(KVMIO, 0x7c);
pub const KVM_GET_IRQCHIP: u32 = iowr::<kvm_irqchip>(KVMIO, 0x62);
pub const KVM_GET_PIT2: u32 = ior::<kvm_pit_state2>(KVMIO, 0x9f);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_numbers_are_those_of_the_x86_64_kernel() {
        // From linux/kvm.h and linux/if_tun.h as compiled for x86-64 (e.g. strace's tables).
        let expected = [
            (KVM_RUN, 0xae80, "KVM_RUN"),
            (TUNSETOFFLOAD, 0x4004_54d0, "TUNSETOFFLOAD"),
            (FIONBIO, 0x5421, "FIONBIO"),
            (KVM_GET_REGS, 0x8090_ae81, "KVM_GET_REGS"),
            (KVM_GET_SREGS, 0x8138_ae83, "KVM_GET_SREGS"),
            (KVM_GET_MSRS, 0xc008_ae88, "KVM_GET_MSRS"),
            (KVM_GET_FPU, 0x81a0_ae8c, "KVM_GET_FPU"),
            (KVM_GET_LAPIC, 0x8400_ae8e, "KVM_GET_LAPIC"),
            (KVM_GET_MP_STATE, 0x8004_ae98, "KVM_GET_MP_STATE"),
            (KVM_GET_VCPU_EVENTS, 0x8040_ae9f, "KVM_GET_VCPU_EVENTS"),
            (KVM_GET_DEBUGREGS, 0x8080_aea1, "KVM_GET_DEBUGREGS"),
            (KVM_GET_TSC_KHZ, 0xaea3, "KVM_GET_TSC_KHZ"),
            (KVM_GET_XSAVE, 0x9000_aea4, "KVM_GET_XSAVE"),
            (KVM_GET_XCRS, 0x8188_aea6, "KVM_GET_XCRS"),
            (KVM_GET_CLOCK, 0x8030_ae7c, "KVM_GET_CLOCK"),
            (KVM_GET_IRQCHIP, 0xc208_ae62, "KVM_GET_IRQCHIP"),
            (KVM_GET_PIT2, 0x8070_ae9f, "KVM_GET_PIT2"),
        ];
        for (computed, kernel, name) in expected {
            assert_eq!(computed, kernel, "{name}: {computed:#x} != {kernel:#x}");
        }
    }

    #[test]
    fn the_formula_is_the_kernels() {
        // _IOC: nr in bits 0..8, type 8..16, size 16..30, direction 30..32 (write 1, read 2).
        assert_eq!(io(0xae, 0x01), 0xae01);
        assert_eq!(ior::<u32>(0xae, 0x02), 2 << 30 | 4 << 16 | 0xae << 8 | 0x02);
        assert_eq!(iow::<u64>(0x54, 0x03), 1 << 30 | 8 << 16 | 0x54 << 8 | 0x03);
        assert_eq!(iowr::<[u8; 3]>(1, 4), 3 << 30 | 3 << 16 | 1 << 8 | 4);
    }
}
