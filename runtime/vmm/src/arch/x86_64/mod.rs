//! x86-64 specifics: memory layout, boot structures, CPU state.

pub mod boot_params;
pub mod cpuid;
pub mod gdt;
pub mod lapic;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod pvh;
pub mod regs;
