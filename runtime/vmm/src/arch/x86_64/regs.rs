//! Boot register state of the first vCPU: GDT, IDT and identity page tables in guest memory,
//! segment/control registers, general registers and the FPU.
//!
//! Two entry states are supported:
//! - 64-bit Linux boot protocol (Documentation/x86/boot.rst, "64-bit Boot Protocol"): long mode,
//!   paging on with an identity map, `rsi` = zero page.
//! - PVH (xen/include/public/arch-x86/hvm/start_info.h, Linux arch/x86/platform/pvh): 32-bit
//!   protected mode, paging off, flat segments, `ebx` = `hvm_start_info`.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::gdt::{boot_gdt, segment_from_gdt, CODE_INDEX, DATA_INDEX, TSS_INDEX};
use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
    ZERO_PAGE_START,
};

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// Bit 1 of RFLAGS is reserved and always set.
const RFLAGS_RESERVED: u64 = 1 << 1;
/// x87 control word after FNINIT: all exceptions masked, 64-bit precision, round to nearest.
pub const FPU_FCW: u16 = 0x37f;
/// MXCSR power-on value: all SIMD exceptions masked.
pub const FPU_MXCSR: u32 = 0x1f80;
/// Number of page directories; each maps 1 GiB with 2 MiB pages.
const IDENTITY_MAP_GIB: u64 = 4;

/// Errors while setting up boot registers.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// Writing GDT, IDT or page tables into guest memory failed.
    #[error("cannot write boot {0} into guest memory")]
    GuestMemory(&'static str, #[source] vm_memory::GuestMemoryError),
    /// A register ioctl failed.
    #[error("cannot {0}")]
    Ioctl(&'static str, #[source] kvm_ioctls::Error),
}

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootEntry {
    /// 64-bit Linux boot protocol at `rip`, zero page at [`ZERO_PAGE_START`].
    Linux64 {
        /// Kernel entry point (physical = virtual, identity mapped).
        rip: u64,
    },
    /// PVH entry at `rip` with `ebx` pointing to the start info.
    Pvh {
        /// The XEN_ELFNOTE_PHYS32_ENTRY address.
        rip: u64,
        /// Guest address of `hvm_start_info`.
        start_info: u64,
    },
}

impl BootEntry {
    fn long_mode(self) -> bool {
        matches!(self, BootEntry::Linux64 { .. })
    }
}

/// Writes the GDT, a null IDT and (for long mode) identity page tables for the first 4 GiB.
pub fn write_boot_tables(mem: &GuestMemoryMmap, entry: BootEntry) -> Result<(), RegsError> {
    let gdt = boot_gdt(entry.long_mode());
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(|e| RegsError::GuestMemory("GDT", e))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|e| RegsError::GuestMemory("IDT", e))?;
    if entry.long_mode() {
        write_identity_page_tables(mem)?;
    }
    Ok(())
}

fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    let pt_err = |e| RegsError::GuestMemory("page tables", e);
    // Present | writable.
    mem.write_obj(PDPTE_START | 0x3, GuestAddress(PML4_START))
        .map_err(pt_err)?;
    for gib in 0..IDENTITY_MAP_GIB {
        let pd = PDE_START + gib * 0x1000;
        mem.write_obj(pd | 0x3, GuestAddress(PDPTE_START + gib * 8))
            .map_err(pt_err)?;
        for i in 0..512u64 {
            let addr = (gib << 30) | (i << 21);
            // Present | writable | page size (2 MiB).
            mem.write_obj(addr | 0x83, GuestAddress(pd + i * 8))
                .map_err(pt_err)?;
        }
    }
    Ok(())
}

/// Special registers for `entry`, starting from the vCPU's current (reset) values so that
/// fields such as the APIC base keep KVM's defaults.
pub fn boot_sregs(mut sregs: kvm_sregs, entry: BootEntry) -> kvm_sregs {
    let gdt = boot_gdt(entry.long_mode());
    let code = segment_from_gdt(gdt[usize::from(CODE_INDEX)], CODE_INDEX);
    let data = segment_from_gdt(gdt[usize::from(DATA_INDEX)], DATA_INDEX);
    let tss = segment_from_gdt(gdt[usize::from(TSS_INDEX)], TSS_INDEX);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 = (sregs.cr0 | X86_CR0_PE | X86_CR0_ET) & !X86_CR0_PG;
    sregs.cr4 = 0;
    sregs.efer = 0;
    if entry.long_mode() {
        sregs.cr3 = PML4_START;
        sregs.cr4 |= X86_CR4_PAE;
        sregs.cr0 |= X86_CR0_PG;
        sregs.efer |= EFER_LME | EFER_LMA;
    }
    sregs
}

/// General registers for `entry`.
pub fn boot_regs(entry: BootEntry) -> kvm_regs {
    match entry {
        BootEntry::Linux64 { rip } => kvm_regs {
            rflags: RFLAGS_RESERVED,
            rip,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            ..Default::default()
        },
        BootEntry::Pvh { rip, start_info } => kvm_regs {
            rflags: RFLAGS_RESERVED,
            rip,
            rbx: start_info,
            ..Default::default()
        },
    }
}

/// The FPU state every vCPU starts with.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: FPU_FCW,
        mxcsr: FPU_MXCSR,
        ..Default::default()
    }
}

/// Loads the boot state for `entry` into `vcpu` (the tables must already be in guest memory).
pub fn setup_boot_vcpu(vcpu: &VcpuFd, entry: BootEntry) -> Result<(), RegsError> {
    let sregs = vcpu
        .get_sregs()
        .map_err(|e| RegsError::Ioctl("read special registers", e))?;
    vcpu.set_sregs(&boot_sregs(sregs, entry))
        .map_err(|e| RegsError::Ioctl("set special registers", e))?;
    vcpu.set_regs(&boot_regs(entry))
        .map_err(|e| RegsError::Ioctl("set general registers", e))
}

/// Loads the initial FPU state into `vcpu`.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    vcpu.set_fpu(&boot_fpu())
        .map_err(|e| RegsError::Ioctl("set FPU state", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn long_mode_state_enables_paging_and_points_at_the_zero_page() {
        let s = boot_sregs(kvm_sregs::default(), BootEntry::Linux64 { rip: 0x100_0000 });
        assert_eq!(s.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE | X86_CR0_PG);
        assert_eq!(s.cr4 & X86_CR4_PAE, X86_CR4_PAE);
        assert_eq!(s.efer, EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, PML4_START);
        assert_eq!((s.cs.selector, s.cs.l), (0x08, 1));
        let r = boot_regs(BootEntry::Linux64 { rip: 0x100_0000 });
        assert_eq!((r.rip, r.rsi, r.rflags), (0x100_0000, ZERO_PAGE_START, 2));
    }

    #[test]
    fn pvh_state_is_flat_protected_mode_without_paging() {
        let entry = BootEntry::Pvh {
            rip: 0x100_0123,
            start_info: 0x6000,
        };
        let s = boot_sregs(kvm_sregs::default(), entry);
        assert_eq!(s.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE);
        assert_eq!((s.cr4, s.efer), (0, 0));
        assert_eq!((s.cs.l, s.cs.db, s.cs.limit), (0, 1, 0xffff_ffff));
        assert_eq!(s.tr.type_, 0xb);
        let r = boot_regs(entry);
        assert_eq!((r.rip, r.rbx), (0x100_0123, 0x6000));
    }

    #[test]
    fn identity_tables_map_the_first_four_gib() {
        let m = mem();
        write_boot_tables(&m, BootEntry::Linux64 { rip: 0 }).unwrap();
        let pml4: u64 = m.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        let pdpte3: u64 = m.read_obj(GuestAddress(PDPTE_START + 3 * 8)).unwrap();
        assert_eq!(pdpte3, (PDE_START + 3 * 0x1000) | 3);
        let last: u64 = m
            .read_obj(GuestAddress(PDE_START + 3 * 0x1000 + 511 * 8))
            .unwrap();
        assert_eq!(last, ((4u64 << 30) - (2 << 20)) | 0x83);
        let gdt1: u64 = m.read_obj(GuestAddress(BOOT_GDT_START + 8)).unwrap();
        assert_eq!(gdt1, 0x00af_9b00_0000_ffff);
    }

    #[test]
    fn fpu_has_the_architectural_init_values() {
        let f = boot_fpu();
        assert_eq!((f.fcw, f.mxcsr), (0x37f, 0x1f80));
    }
}
