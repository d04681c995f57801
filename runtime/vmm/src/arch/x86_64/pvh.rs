//! PVH boot: the `hvm_start_info` structure, the module list (initramfs) and the memory map.
//!
//! Layout: xen/include/public/arch-x86/hvm/start_info.h (version 1, with memmap).

use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info, XEN_HVM_START_MAGIC_VALUE,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{
    E820Entry, PVH_INFO_START, PVH_MEMMAP_MAX_ENTRIES, PVH_MEMMAP_START, PVH_MODLIST_START,
};

/// Errors while writing the PVH start info.
#[derive(Debug, thiserror::Error)]
pub enum PvhError {
    /// The memory map does not fit where the layout puts it.
    #[error("memory map has {0} entries, at most {PVH_MEMMAP_MAX_ENTRIES} fit")]
    TooManyMemmapEntries(usize),
    /// Writing into guest memory failed.
    #[error("cannot write the PVH start info into guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
}

/// The start info for a boot with `cmdline_addr`, an optional initramfs and `memmap`.
pub fn build_start_info(
    cmdline_addr: u64,
    initrd: Option<(u64, u64)>,
    memmap_entries: usize,
) -> hvm_start_info {
    hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        flags: 0,
        nr_modules: u32::from(initrd.is_some()),
        modlist_paddr: if initrd.is_some() {
            PVH_MODLIST_START
        } else {
            0
        },
        cmdline_paddr: cmdline_addr,
        rsdp_paddr: 0,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap_entries as u32,
        reserved: 0,
    }
}

/// Writes start info, module list and memory map; returns the start info address (for `ebx`).
pub fn write_start_info(
    mem: &GuestMemoryMmap,
    cmdline_addr: u64,
    initrd: Option<(u64, u64)>,
    memmap: &[E820Entry],
) -> Result<u64, PvhError> {
    if memmap.len() > PVH_MEMMAP_MAX_ENTRIES {
        return Err(PvhError::TooManyMemmapEntries(memmap.len()));
    }
    let start_info = build_start_info(cmdline_addr, initrd, memmap.len());
    mem.write_obj(start_info, GuestAddress(PVH_INFO_START))
        .map_err(PvhError::GuestMemory)?;
    if let Some((paddr, size)) = initrd {
        let module = hvm_modlist_entry {
            paddr,
            size,
            cmdline_paddr: 0,
            reserved: 0,
        };
        mem.write_obj(module, GuestAddress(PVH_MODLIST_START))
            .map_err(PvhError::GuestMemory)?;
    }
    let entry_size = std::mem::size_of::<hvm_memmap_table_entry>() as u64;
    for (i, e) in memmap.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        };
        mem.write_obj(
            entry,
            GuestAddress(PVH_MEMMAP_START + i as u64 * entry_size),
        )
        .map_err(PvhError::GuestMemory)?;
    }
    Ok(PVH_INFO_START)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::{e820_map, GIB};

    #[test]
    fn writes_start_info_module_and_memmap() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let map = e820_map(4 * GIB);
        let addr = write_start_info(&mem, 0x20000, Some((0x1000_0000, 4096)), &map).unwrap();
        let si: hvm_start_info = mem.read_obj(GuestAddress(addr)).unwrap();
        assert_eq!(si.magic, 0x336e_c578);
        assert_eq!(
            (si.version, si.nr_modules, si.cmdline_paddr),
            (1, 1, 0x20000)
        );
        assert_eq!(si.memmap_entries as usize, map.len());
        let m: hvm_modlist_entry = mem.read_obj(GuestAddress(si.modlist_paddr)).unwrap();
        assert_eq!((m.paddr, m.size), (0x1000_0000, 4096));
        let last: hvm_memmap_table_entry = mem
            .read_obj(GuestAddress(si.memmap_paddr + 24 * (map.len() as u64 - 1)))
            .unwrap();
        assert_eq!((last.addr, last.size, last.type_), (1 << 32, GIB, 1));
        assert_eq!(std::mem::size_of::<hvm_start_info>(), 56);
    }

    #[test]
    fn no_initrd_means_no_modules() {
        let si = build_start_info(0x20000, None, 3);
        assert_eq!((si.nr_modules, si.modlist_paddr), (0, 0));
    }
}
