//! GDT descriptors for the boot vCPU, and their translation into KVM segment registers.
//!
//! Descriptor layout: Intel SDM Vol. 3A, 3.4.5 "Segment Descriptors".

use kvm_bindings::kvm_segment;

/// Access byte + flags nibble of a 64-bit code segment (present, ring 0, exec/read, L, G).
pub const CODE64_FLAGS: u16 = 0xa09b;
/// 32-bit flat code segment (present, ring 0, exec/read, D/B, G): the PVH entry state.
pub const CODE32_FLAGS: u16 = 0xc09b;
/// Flat data segment (present, ring 0, read/write, D/B, G).
pub const DATA_FLAGS: u16 = 0xc093;
/// 32/64-bit busy TSS (present, type 0xb).
pub const TSS_FLAGS: u16 = 0x008b;

/// GDT index of the code segment (selector 0x08).
pub const CODE_INDEX: u16 = 1;
/// GDT index of the data segment (selector 0x10).
pub const DATA_INDEX: u16 = 2;
/// GDT index of the TSS (selector 0x18).
pub const TSS_INDEX: u16 = 3;

/// Encodes a segment descriptor. `flags` carries the access byte in bits 0..8 and the
/// G/DB/L/AVL nibble in bits 12..16 (bits 8..12 are ignored: they belong to the limit).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    ((base & 0xff00_0000) << (56 - 24))
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << (48 - 16))
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The boot GDT: null, code (64-bit, or 32-bit for PVH), data, TSS.
pub fn boot_gdt(long_mode: bool) -> [u64; 4] {
    let code = if long_mode {
        CODE64_FLAGS
    } else {
        CODE32_FLAGS
    };
    [
        0,
        gdt_entry(code, 0, 0xfffff),
        gdt_entry(DATA_FLAGS, 0, 0xfffff),
        gdt_entry(TSS_FLAGS, 0, 0xfffff),
    ]
}

/// The KVM segment register contents a CPU would load from `entry` at GDT index `index`.
pub fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        s: ((entry >> 44) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        present,
        avl: ((entry >> 52) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        db: ((entry >> 54) & 1) as u8,
        g,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_the_classic_flat_descriptors() {
        assert_eq!(gdt_entry(CODE64_FLAGS, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(CODE32_FLAGS, 0, 0xfffff), 0x00cf_9b00_0000_ffff);
        assert_eq!(gdt_entry(DATA_FLAGS, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(TSS_FLAGS, 0, 0xfffff), 0x000f_8b00_0000_ffff);
    }

    #[test]
    fn splits_base_and_limit_across_the_descriptor() {
        let e = gdt_entry(DATA_FLAGS, 0x1234_5678, 0xabcde);
        assert_eq!(e & 0xffff, 0xbcde);
        assert_eq!((e >> 48) & 0xf, 0xa);
        assert_eq!((e >> 16) & 0xff_ffff, 0x34_5678);
        assert_eq!(e >> 56, 0x12);
    }

    #[test]
    fn decodes_into_kvm_segments() {
        let gdt = boot_gdt(true);
        let cs = segment_from_gdt(gdt[1], CODE_INDEX);
        assert_eq!((cs.selector, cs.base, cs.limit), (0x08, 0, 0xffff_ffff));
        assert_eq!(
            (cs.type_, cs.s, cs.present, cs.l, cs.db, cs.g),
            (0xb, 1, 1, 1, 0, 1)
        );
        let ds = segment_from_gdt(gdt[2], DATA_INDEX);
        assert_eq!((ds.selector, ds.type_, ds.l, ds.db), (0x10, 0x3, 0, 1));
        let tr = segment_from_gdt(gdt[3], TSS_INDEX);
        assert_eq!(
            (tr.selector, tr.type_, tr.s, tr.g, tr.limit),
            (0x18, 0xb, 0, 0, 0xfffff)
        );
        let cs32 = segment_from_gdt(boot_gdt(false)[1], CODE_INDEX);
        assert_eq!((cs32.l, cs32.db), (0, 1));
        let null = segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
        let based = segment_from_gdt(gdt_entry(DATA_FLAGS, 0x1234_5678, 0xfffff), 2);
        assert_eq!(based.base, 0x1234_5678);
    }
}
