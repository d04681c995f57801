//! The guest-physical memory map of a husk micro-VM on x86-64, and the RAM ranges and e820 map
//! derived from the configured memory size.
//!
//! ```text
//! 0x0000_0500  boot GDT            0x0000_6000  PVH start_info, modlist, memmap
//! 0x0000_7000  zero page           0x0000_8ff0  boot stack (grows down)
//! 0x0000_9000  PML4, PDPT, 4 PDs   0x0002_0000  kernel command line
//! 0x0009_fc00  MP table (EBDA)     0x0010_0000  high memory: bzImage, then RAM
//! 0xc000_0000  32-bit MMIO gap ... 0x1_0000_0000 (no RAM; RAM above the gap continues at 4 GiB)
//!   0xd000_0000 + 256 MiB  window reserved for virtio-mmio devices
//!   0xfec0_0000 IOAPIC, 0xfee0_0000 LAPIC, 0xfffb_c000 KVM identity map + TSS pages
//! ```

/// One mebibyte.
pub const MIB: u64 = 1 << 20;
/// One gibibyte.
pub const GIB: u64 = 1 << 30;

/// Boot GDT (4 entries).
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT: one null entry; the kernel installs its own before enabling interrupts.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initramfs).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map, up to the zero page.
pub const PVH_MEMMAP_START: u64 = 0x6080;
/// Most PVH memmap entries that fit between `PVH_MEMMAP_START` and the zero page (24 bytes each).
pub const PVH_MEMMAP_MAX_ENTRIES: usize = ((ZERO_PAGE_START - PVH_MEMMAP_START) / 24) as usize;
/// Linux boot protocol `boot_params` ("zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU for the 64-bit boot protocol.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables: PML4, one PDPT, then four page directories (2 MiB pages, 4 GiB).
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// First of the four page directories.
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// x86 COMMAND_LINE_SIZE is 2048 bytes including the terminating NUL.
pub const CMDLINE_MAX_LEN: usize = 2047;
/// Start of the extended BIOS data area; Linux scans the last KiB of base memory
/// (639 KiB .. 640 KiB) for the MP floating pointer, so the MP table lives here.
pub const EBDA_START: u64 = 0x9fc00;
/// Bytes available to the MP table (the KiB below 640 KiB).
pub const MPTABLE_MAX_SIZE: usize = 0x400;
/// Start of "high" memory: the bzImage protected-mode kernel is loaded here.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO gap: no RAM between here and 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap (4 GiB), where RAM above the gap resumes.
pub const MMIO_GAP_END: u64 = 1 << 32;
/// Window inside the gap reserved for virtio-mmio devices (nothing is mapped there yet).
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of the virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 256 * MIB;
/// IOAPIC base (the in-kernel irqchip's default).
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Local APIC base (architectural default).
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// KVM_SET_IDENTITY_MAP_ADDR: one page, inside the gap so it never overlaps RAM.
pub const KVM_IDENTITY_MAP_START: u64 = 0xfffb_c000;
/// KVM_SET_TSS_ADDR: three pages right after the identity map page.
pub const KVM_TSS_START: u64 = 0xfffb_d000;

/// Smallest supported guest memory.
pub const MIN_MEM_MIB: u64 = 64;
/// Largest supported guest memory (256 GiB; memory is MAP_NORESERVE, so only touched pages cost).
pub const MAX_MEM_MIB: u64 = 256 * 1024;

/// Kind of an e820 entry (the values are the BIOS e820 types, shared by PVH's memmap).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum E820Kind {
    /// Usable RAM.
    Ram = 1,
    /// Reserved, not usable by the OS.
    Reserved = 2,
}

/// One entry of the guest's physical memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// What the range is.
    pub kind: E820Kind,
}

/// The RAM ranges `(start, size)` backing `mem_size` bytes of guest memory: everything below the
/// MMIO gap first, the rest above 4 GiB. One KVM memory slot is created per range.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_size - MMIO_GAP_START),
        ]
    }
}

/// End of the RAM below the MMIO gap (exclusive).
pub fn low_ram_end(mem_size: u64) -> u64 {
    mem_size.min(MMIO_GAP_START)
}

/// The e820 map for `mem_size` bytes of RAM laid out by [`ram_ranges`]. The legacy hole from the
/// EBDA to 1 MiB (MP table, where a PC has VGA and BIOS ROMs) is reported reserved.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820Kind::Ram,
        },
        E820Entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: E820Kind::Reserved,
        },
    ];
    let low_end = low_ram_end(mem_size);
    if low_end > HIMEM_START {
        map.push(E820Entry {
            addr: HIMEM_START,
            size: low_end - HIMEM_START,
            kind: E820Kind::Ram,
        });
    }
    if mem_size > MMIO_GAP_START {
        map.push(E820Entry {
            addr: MMIO_GAP_END,
            size: mem_size - MMIO_GAP_START,
            kind: E820Kind::Ram,
        });
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram_bytes(map: &[E820Entry]) -> u64 {
        map.iter()
            .filter(|e| e.kind == E820Kind::Ram)
            .map(|e| e.size)
            .sum()
    }

    /// Every e820 entry (RAM or reserved) must lie inside a memory slot.
    fn assert_backed(map: &[E820Entry], ranges: &[(u64, u64)]) {
        for e in map {
            assert!(
                ranges
                    .iter()
                    .any(|&(s, l)| e.addr >= s && e.addr + e.size <= s + l),
                "{e:?} not inside {ranges:x?}"
            );
        }
    }

    #[test]
    fn small_memory_has_one_range_and_no_high_ram() {
        let mem = 64 * MIB;
        assert_eq!(ram_ranges(mem), vec![(0, mem)]);
        let map = e820_map(mem);
        assert_eq!(map.len(), 3);
        assert_eq!(map[2].addr, HIMEM_START);
        assert_eq!(map[2].size, mem - HIMEM_START);
        assert_eq!(ram_bytes(&map), mem - (HIMEM_START - EBDA_START));
        assert_backed(&map, &ram_ranges(mem));
    }

    #[test]
    fn memory_ending_exactly_at_the_gap_stays_below_it() {
        let mem = 3 * GIB;
        assert_eq!(ram_ranges(mem), vec![(0, 3 * GIB)]);
        let map = e820_map(mem);
        assert_eq!(map.last().map(|e| e.addr + e.size), Some(MMIO_GAP_START));
        assert!(map.iter().all(|e| e.addr + e.size <= MMIO_GAP_START));
        assert_backed(&map, &ram_ranges(mem));
    }

    #[test]
    fn large_memory_splits_around_the_gap() {
        let mem = 16 * GIB;
        let ranges = ram_ranges(mem);
        assert_eq!(ranges, vec![(0, MMIO_GAP_START), (1 << 32, 13 * GIB)]);
        assert_eq!(ranges.iter().map(|r| r.1).sum::<u64>(), mem);
        let map = e820_map(mem);
        let high = map.last().copied().unwrap_or(map[0]);
        assert_eq!((high.addr, high.size), (1 << 32, 13 * GIB));
        // Nothing in the gap, and the virtio-mmio window, LAPIC and TSS are inside it.
        for e in &map {
            assert!(e.addr + e.size <= MMIO_GAP_START || e.addr >= MMIO_GAP_END);
        }
        for addr in [
            VIRTIO_MMIO_START,
            VIRTIO_MMIO_START + VIRTIO_MMIO_SIZE - 1,
            u64::from(IOAPIC_ADDR),
            u64::from(LAPIC_ADDR),
            KVM_IDENTITY_MAP_START,
            KVM_TSS_START + 3 * 4096 - 1,
        ] {
            assert!((MMIO_GAP_START..MMIO_GAP_END).contains(&addr), "{addr:#x}");
        }
        assert_backed(&map, &ranges);
    }

    #[test]
    fn fixed_boot_structures_do_not_overlap() {
        let mut areas = [
            (BOOT_GDT_START, 4 * 8),
            (BOOT_IDT_START, 8),
            (PVH_INFO_START, 0x40),
            (PVH_MODLIST_START, 0x40),
            (PVH_MEMMAP_START, PVH_MEMMAP_MAX_ENTRIES as u64 * 24),
            (ZERO_PAGE_START, 0x1000),
            (PML4_START, 6 * 0x1000),
            (CMDLINE_START, CMDLINE_MAX_LEN as u64 + 1),
            (EBDA_START, MPTABLE_MAX_SIZE as u64),
        ];
        areas.sort();
        for w in areas.windows(2) {
            assert!(
                w[0].0 + w[0].1 <= w[1].0,
                "{:x?} overlaps {:x?}",
                w[0],
                w[1]
            );
        }
        const {
            assert!(
                BOOT_STACK_POINTER < PML4_START && BOOT_STACK_POINTER > ZERO_PAGE_START + 0x1000
            )
        };
    }
}
