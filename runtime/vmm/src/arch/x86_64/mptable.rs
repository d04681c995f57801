//! A hand-written Intel MultiProcessor Specification 1.4 table, so that a guest without ACPI
//! finds every vCPU, the IOAPIC and the ISA interrupt routing.
//!
//! Structures and checksums: MP spec 1.4, chapter 4 ("MP Configuration Table"). The floating
//! pointer goes to [`EBDA_START`] (Linux scans the last KiB of base memory), the configuration
//! table right after it.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{EBDA_START, IOAPIC_ADDR, LAPIC_ADDR, MPTABLE_MAX_SIZE};

/// Spec revision 1.4.
const MP_SPEC_REV: u8 = 4;
/// Local APIC version reported per processor (integrated APIC).
const APIC_VERSION: u8 = 0x14;
/// IOAPIC version (82093AA-compatible, 24 pins).
const IOAPIC_VERSION: u8 = 0x11;
/// ISA interrupt lines routed through the IOAPIC (pins 0..24 of KVM's in-kernel IOAPIC).
const IOAPIC_PINS: u8 = 24;
/// CPU signature (family 6) and feature flags (FPU | APIC): informational, Linux ignores them.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const CPU_FLAG_ENABLED: u8 = 1;
const CPU_FLAG_BSP: u8 = 2;
/// Destination "all local APICs" in local interrupt entries.
const ALL_LAPICS: u8 = 0xff;

/// Size of the floating pointer structure.
pub const MPF_SIZE: usize = 16;
/// Size of the configuration table header.
pub const HEADER_SIZE: usize = 44;

/// Errors while building the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// No vCPU, or more than the reserved area can describe.
    #[error("an MP table for {0} vCPUs does not fit in {MPTABLE_MAX_SIZE} bytes")]
    TooManyCpus(u8),
    /// Writing into guest memory failed.
    #[error("cannot write the MP table into guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
}

/// Two's complement checksum: the byte that makes `bytes` sum to zero (mod 256).
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |acc, b| acc.wrapping_add(*b))
        .wrapping_neg()
}

/// The IOAPIC's id: right after the last local APIC id.
pub fn ioapic_id(num_cpus: u8) -> u8 {
    num_cpus
}

/// Builds the MP table as it must appear at guest address `base`.
pub fn build_mptable(base: u64, num_cpus: u8) -> Result<Vec<u8>, MptableError> {
    if num_cpus == 0 {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let ioapic = ioapic_id(num_cpus);
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        let flags = CPU_FLAG_ENABLED | if cpu == 0 { CPU_FLAG_BSP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for pin in 0..IOAPIC_PINS {
        // Type, interrupt type, flags (u16: polarity/trigger "conforms to bus"), source bus,
        // source bus IRQ, destination IOAPIC, destination pin.
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT, 0, 0, 0, pin, ioapic, pin]);
        count += 1;
    }
    for (int_type, lint) in [(INT_TYPE_EXTINT, 0), (INT_TYPE_NMI, 1)] {
        entries.extend_from_slice(&[
            ENTRY_LOCAL_INTERRUPT,
            int_type,
            0,
            0,
            0,
            0,
            ALL_LAPICS,
            lint,
        ]);
        count += 1;
    }

    let table_len = HEADER_SIZE + entries.len();
    if MPF_SIZE + table_len > MPTABLE_MAX_SIZE {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let table_addr = (base + MPF_SIZE as u64) as u32;

    let mut mpf = Vec::with_capacity(MPF_SIZE);
    mpf.extend_from_slice(b"_MP_");
    mpf.extend_from_slice(&table_addr.to_le_bytes());
    // Length in 16-byte units, spec revision, checksum (patched below), feature bytes 1..5:
    // feature 1 = 0 (a configuration table is present), feature 2 bit 7 = 0 (virtual wire mode).
    mpf.extend_from_slice(&[1, MP_SPEC_REV, 0, 0, 0, 0, 0, 0]);
    mpf[10] = checksum(&mpf);

    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.extend_from_slice(&[MP_SPEC_REV, 0]);
    table.extend_from_slice(b"HUSK    ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.extend_from_slice(&[0, 0]); // extended checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    mpf.extend_from_slice(&table);
    Ok(mpf)
}

/// Writes the MP table for `num_cpus` vCPUs at [`EBDA_START`].
pub fn write_mptable(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), MptableError> {
    let bytes = build_mptable(EBDA_START, num_cpus)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(MptableError::GuestMemory)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes([b[off], b[off + 1]])
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
    }

    #[test]
    fn checksums_are_correct_for_every_cpu_count() {
        for n in 1..=32 {
            let t = build_mptable(EBDA_START, n).unwrap();
            assert_eq!(sum(&t[..MPF_SIZE]), 0, "floating pointer, {n} cpus");
            let len = usize::from(u16_at(&t, MPF_SIZE + 4));
            assert_eq!(MPF_SIZE + len, t.len());
            assert_eq!(sum(&t[MPF_SIZE..]), 0, "configuration table, {n} cpus");
            assert!(t.len() <= MPTABLE_MAX_SIZE);
        }
    }

    #[test]
    fn contents_describe_cpus_ioapic_and_routing() {
        let t = build_mptable(EBDA_START, 4).unwrap();
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(u32_at(&t, 4), (EBDA_START + 16) as u32);
        assert_eq!((t[8], t[9], t[11]), (1, 4, 0));
        let h = &t[MPF_SIZE..];
        assert_eq!(&h[0..4], b"PCMP");
        assert_eq!(u32_at(h, 36), LAPIC_ADDR);
        let count = u16_at(h, 34);
        // Walk the entries by their type-specific sizes.
        let mut off = HEADER_SIZE;
        let (mut cpus, mut bsps, mut ioapics, mut irqs, mut lints) = (vec![], 0, 0, 0, 0);
        for _ in 0..count {
            match h[off] {
                ENTRY_PROCESSOR => {
                    cpus.push(h[off + 1]);
                    assert_ne!(h[off + 3] & CPU_FLAG_ENABLED, 0);
                    bsps += usize::from(h[off + 3] & CPU_FLAG_BSP != 0);
                    off += 20;
                }
                ENTRY_BUS => {
                    assert_eq!(&h[off + 2..off + 8], b"ISA   ");
                    off += 8;
                }
                ENTRY_IOAPIC => {
                    assert_eq!(h[off + 1], 4);
                    assert_eq!(u32_at(h, off + 4), IOAPIC_ADDR);
                    ioapics += 1;
                    off += 8;
                }
                ENTRY_IO_INTERRUPT => {
                    assert_eq!(h[off + 5], h[off + 7], "ISA IRQ n goes to pin n");
                    assert_eq!(h[off + 6], 4);
                    irqs += 1;
                    off += 8;
                }
                ENTRY_LOCAL_INTERRUPT => {
                    let expect = if h[off + 7] == 0 {
                        INT_TYPE_EXTINT
                    } else {
                        INT_TYPE_NMI
                    };
                    assert_eq!(h[off + 1], expect);
                    lints += 1;
                    off += 8;
                }
                other => panic!("unknown entry type {other}"),
            }
        }
        assert_eq!(off, h.len());
        assert_eq!(cpus, vec![0, 1, 2, 3]);
        assert_eq!((bsps, ioapics, irqs, lints), (1, 1, 24, 2));
    }

    #[test]
    fn refuses_zero_cpus_and_counts_that_overflow_the_area() {
        assert!(build_mptable(EBDA_START, 0).is_err());
        assert!(build_mptable(EBDA_START, 40).is_err());
    }
}
