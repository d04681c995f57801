//! Guest CPUID: KVM_GET_SUPPORTED_CPUID made consistent for one vCPU of a husk micro-VM.
//!
//! Topology presented: one socket, one core per vCPU, one thread per core, APIC id = vCPU index.
//! Leaf meanings: Intel SDM Vol. 2A "CPUID"; AMD APM Vol. 3, appendix E. Every tweak below says
//! why it is made.

use kvm_bindings::{kvm_cpuid_entry2, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// Which vCPU the CPUID is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuTopology {
    /// vCPU index, which is also its APIC id.
    pub apic_id: u8,
    /// Number of vCPUs in the VM.
    pub num_cpus: u8,
}

const LEAF1_ECX_VMX: u32 = 1 << 5;
const LEAF1_ECX_PDCM: u32 = 1 << 15;
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;
const EXT1_ECX_SVM: u32 = 1 << 2;
const EXT1_ECX_TOPOEXT: u32 = 1 << 22;
const EXT1_ECX_PERFCTR_CORE: u32 = 1 << 23;
const EXT1_ECX_PERFCTR_NB: u32 = 1 << 24;
const EXT1_ECX_PERFCTR_LLC: u32 = 1 << 28;
/// "KVMKVMKVM\0\0\0" in EBX, ECX, EDX.
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
/// Legacy FXSAVE area + XSAVE header: the XSAVE area size with only x87/SSE enabled.
const XSAVE_LEGACY_SIZE: u32 = 512 + 64;

fn bits_for(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> Option<&kvm_cpuid_entry2> {
    entries
        .iter()
        .find(|e| e.function == function && e.index == index)
}

fn is_amd(entries: &[kvm_cpuid_entry2]) -> bool {
    // "AuthenticAMD" / "HygonGenuine": AMD-style topology leaves.
    find(entries, 0, 0).is_some_and(|e| e.ebx == 0x6874_7541 || e.ebx == 0x6f67_7948)
}

fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax: regs[0],
        ebx: regs[1],
        ecx: regs[2],
        edx: regs[3],
        ..Default::default()
    }
}

/// Adds the TSC-deadline timer to leaf 1: KVM emulates it with the in-kernel LAPIC but reports
/// it through KVM_CAP_TSC_DEADLINE_TIMER instead of KVM_GET_SUPPORTED_CPUID. Without it Linux
/// calibrates the LAPIC timer against the PIT at boot, which costs about half a second of a
/// nested guest's boot (measured in the testbed), and reprograms the timer through more exits.
pub fn add_tsc_deadline_timer(entries: &mut [kvm_cpuid_entry2]) {
    for e in entries.iter_mut().filter(|e| e.function == 0x1) {
        e.ecx |= LEAF1_ECX_TSC_DEADLINE;
    }
}

/// Makes `entries` (as returned by KVM_GET_SUPPORTED_CPUID) the CPUID of vCPU `topo.apic_id`.
pub fn normalize(entries: &mut Vec<kvm_cpuid_entry2>, topo: CpuTopology) {
    let num_cpus = u32::from(topo.num_cpus.max(1));
    let apic_id = u32::from(topo.apic_id);
    let amd = is_amd(entries);
    let max_basic = find(entries, 0, 0).map_or(0, |e| e.eax);
    let had_leaf_1f = find(entries, 0x1f, 0).is_some();
    let core_bits = bits_for(num_cpus);

    for e in entries.iter_mut() {
        match e.function {
            0x1 => {
                // Initial APIC id and the logical processor count must match the MP table.
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | ((num_cpus & 0xff) << 16);
                // Tell the guest it runs on a hypervisor (enables kvmclock, PV features).
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                // No nested virtualisation and no perf capabilities MSR in a micro-VM.
                e.ecx &= !(LEAF1_ECX_VMX | LEAF1_ECX_PDCM);
                // OSXSAVE mirrors CR4.OSXSAVE, which is clear at reset; KVM keeps it updated.
                e.ecx &= !LEAF1_ECX_OSXSAVE;
                // HTT: "more than one logical processor per package" (legacy multi-core flag).
                if num_cpus > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            0x4 => {
                // Cores per package and threads sharing each cache must match our topology:
                // L1/L2 private to a core, L3 shared by the whole socket.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { num_cpus - 1 } else { 0 };
                e.eax &= 0x0000_3fff;
                e.eax |= ((num_cpus - 1).min(63) << 26) | (sharing.min(0xfff) << 14);
            }
            0xa => {
                // No virtual PMU: the guest's perf driver would probe counters we do not offer.
                (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0);
            }
            0x4000_0000 => {
                // The KVM signature (guest kvm_para detection) with the feature leaf present.
                e.eax = e.eax.max(KVM_CPUID_FEATURES);
                [e.ebx, e.ecx, e.edx] = KVM_SIGNATURE;
            }
            0x8000_0001 => {
                // No nested SVM; no AMD core/NB/LLC perf counters (no vPMU); no TOPOEXT: its
                // leaves 0x8000_001d/1e would need the same rework as leaf 4, and Linux falls
                // back to 0x8000_0008 and 0xb, which we set.
                e.ecx &= !(EXT1_ECX_SVM
                    | EXT1_ECX_TOPOEXT
                    | EXT1_ECX_PERFCTR_CORE
                    | EXT1_ECX_PERFCTR_NB
                    | EXT1_ECX_PERFCTR_LLC);
            }
            0x8000_0008 if amd => {
                // AMD core count (NC) and APIC-id core-id width, per our topology.
                e.ecx = ((num_cpus - 1) & 0xff) | (core_bits << 12);
            }
            _ => {}
        }
    }

    // Leaves that only make sense with features we removed.
    entries.retain(|e| {
        !matches!(
            e.function,
            0xb | 0x1f | 0x8000_001d | 0x8000_001e | 0x8000_0022
        )
    });
    // Extended topology (0xb, and 0x1f where the host has it): SMT level with one thread,
    // core level with every vCPU, then the terminating invalid level. EDX = x2APIC id.
    for (leaf, present) in [
        (0xb, max_basic >= 0xb),
        (0x1f, had_leaf_1f && max_basic >= 0x1f),
    ] {
        if present {
            entries.push(entry(leaf, 0, [0, 1, 1 << 8, apic_id]));
            entries.push(entry(leaf, 1, [core_bits, num_cpus, (2 << 8) | 1, apic_id]));
            entries.push(entry(leaf, 2, [0, 0, 2, apic_id]));
        }
    }
    normalize_xsave(entries);
}

/// XCR0 components Linux (6.x) enables for user space and sizes statically: x87, SSE, AVX,
/// AVX-512 (opmask, ZMM_Hi256, Hi16_ZMM), PKRU. MPX (bits 3-4) is gone from Linux, AMX (17-18)
/// needs a per-process permission dance in KVM: advertising either only invites size mismatches.
pub const GUEST_XCR0_COMPONENTS: u64 = 0x2e7;

/// Leaf 0xd: advertise only state components Linux sizes statically and whose size/offset
/// subleaf exists, and make the sizes in subleaf 0 agree with them. Linux cross-checks these at
/// boot ("XSAVE consistency problem") and complains on any mismatch.
fn normalize_xsave(entries: &mut Vec<kvm_cpuid_entry2>) {
    let Some(leaf0) = find(entries, 0xd, 0).copied() else {
        return;
    };
    let xss_mask = find(entries, 0xd, 1).map_or(0, |e| u64::from(e.ecx) | u64::from(e.edx) << 32);
    let mut xcr0_mask = (u64::from(leaf0.eax) | u64::from(leaf0.edx) << 32) & GUEST_XCR0_COMPONENTS;
    let mut max_size = XSAVE_LEGACY_SIZE;
    for bit in 2..64u32 {
        if xcr0_mask & (1 << bit) == 0 {
            continue;
        }
        match find(entries, 0xd, bit) {
            Some(c) if c.eax != 0 => max_size = max_size.max(c.ebx.saturating_add(c.eax)),
            _ => xcr0_mask &= !(1 << bit),
        }
    }
    let keep = xcr0_mask | xss_mask;
    entries.retain(|e| {
        e.function != 0xd || e.index < 2 || (e.index < 64 && keep & (1 << e.index) != 0)
    });
    if let Some(e) = entries
        .iter_mut()
        .find(|e| e.function == 0xd && e.index == 0)
    {
        e.eax = xcr0_mask as u32;
        e.edx = (xcr0_mask >> 32) as u32;
        // ECX: size needed if every advertised component is enabled. EBX: size for the XCR0 in
        // effect. KVM recomputes EBX when the guest's XSETBV exits, but a nested hypervisor may
        // not forward that exit (QEMU TCG's SVM does not), so EBX is set for the XCR0 Linux will
        // choose, and the VMM loads that XCR0 with KVM_SET_XCRS (see `guest_xcr0`).
        e.ecx = max_size;
        e.ebx = max_size;
    }
}

/// The XCR0 to preload into a vCPU with this CPUID (all advertised components), if the CPU has
/// XSAVE at all.
pub fn guest_xcr0(entries: &[kvm_cpuid_entry2]) -> Option<u64> {
    const LEAF1_ECX_XSAVE: u32 = 1 << 26;
    let has_xsave = find(entries, 1, 0).is_some_and(|e| e.ecx & LEAF1_ECX_XSAVE != 0);
    let leaf = find(entries, 0xd, 0).filter(|_| has_xsave)?;
    Some(u64::from(leaf.eax) | u64::from(leaf.edx) << 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            flags: 0,
            ..entry(function, index, regs)
        }
    }

    /// A trimmed-down KVM_GET_SUPPORTED_CPUID of an Intel host with AVX, AVX-512 without its
    /// size leaves (an inconsistency to repair), an old 0xb and a PMU.
    fn intel_like() -> Vec<kvm_cpuid_entry2> {
        vec![
            plain(0, 0, [0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]),
            plain(
                1,
                0,
                [
                    0x806f8,
                    0xff10_0800,
                    LEAF1_ECX_VMX | LEAF1_ECX_PDCM | (1 << 26) | 1,
                    0,
                ],
            ),
            plain(4, 0, [0xfc00_4121, 0, 0, 0]),
            plain(4, 3, [0xfc1f_c163, 0, 0, 0]),
            plain(0xa, 0, [0x0804_0104, 0, 0, 0]),
            plain(0xb, 0, [1, 2, 0x100, 7]),
            plain(0xb, 1, [7, 56, 0x201, 7]),
            plain(0xd, 0, [0x2ff, 0xa88, 0x2b00, 0]),
            plain(0xd, 3, [0x40, 0x3c0, 0, 0]),
            plain(0xd, 1, [0xf, 0, 0, 0]),
            plain(0xd, 2, [0x100, 0x240, 0, 0]),
            plain(0x1f, 0, [1, 2, 0x100, 7]),
            plain(0x4000_0000, 0, [0x4000_0001, 0, 0, 0]),
            plain(0x8000_0001, 0, [0, 0, 0x121, 0]),
        ]
    }

    fn get(entries: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *find(entries, f, i).unwrap_or_else(|| panic!("leaf {f:#x}.{i} missing"))
    }

    #[test]
    fn the_tsc_deadline_timer_is_added_to_leaf_1_only() {
        let mut entries = vec![entry(0, 0, [1, 0, 0, 0]), entry(1, 0, [0; 4])];
        add_tsc_deadline_timer(&mut entries);
        assert_eq!(entries[1].ecx, LEAF1_ECX_TSC_DEADLINE);
        assert_eq!(entries[0].ecx, 0);
    }

    #[test]
    fn leaf1_carries_apic_id_count_and_hypervisor_bit() {
        let mut e = intel_like();
        normalize(
            &mut e,
            CpuTopology {
                apic_id: 3,
                num_cpus: 4,
            },
        );
        let l1 = get(&e, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!(l1.ecx & (LEAF1_ECX_VMX | LEAF1_ECX_PDCM), 0);
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
        let mut single = intel_like();
        normalize(
            &mut single,
            CpuTopology {
                apic_id: 0,
                num_cpus: 1,
            },
        );
        assert_eq!(get(&single, 1, 0).edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn topology_leaves_describe_one_core_per_vcpu() {
        let mut e = intel_like();
        normalize(
            &mut e,
            CpuTopology {
                apic_id: 5,
                num_cpus: 6,
            },
        );
        for leaf in [0xb, 0x1f] {
            let smt = get(&e, leaf, 0);
            assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 5));
            let core = get(&e, leaf, 1);
            assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (3, 6, 0x201, 5));
            let end = get(&e, leaf, 2);
            assert_eq!((end.ebx, end.ecx >> 8, end.edx), (0, 0, 5));
            assert_eq!(e.iter().filter(|x| x.function == leaf).count(), 3);
        }
        assert_eq!(get(&e, 4, 0).eax >> 26, 5);
        assert_eq!((get(&e, 4, 0).eax >> 14) & 0xfff, 0, "L1 is per core");
        assert_eq!((get(&e, 4, 3).eax >> 14) & 0xfff, 5, "L3 is shared by all");
        assert_eq!(get(&e, 4, 3).eax & 0x3fff, 0xc163 & 0x3fff);
    }

    #[test]
    fn pmu_and_nested_virtualisation_are_hidden_and_kvm_signed() {
        let mut e = intel_like();
        normalize(
            &mut e,
            CpuTopology {
                apic_id: 0,
                num_cpus: 1,
            },
        );
        let a = get(&e, 0xa, 0);
        assert_eq!((a.eax, a.ebx, a.ecx, a.edx), (0, 0, 0, 0));
        let sig = get(&e, 0x4000_0000, 0);
        let mut s = Vec::new();
        for r in [sig.ebx, sig.ecx, sig.edx] {
            s.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&s, b"KVMKVMKVM\0\0\0");
        assert_eq!(get(&e, 0x8000_0001, 0).ecx & EXT1_ECX_SVM, 0);
    }

    #[test]
    fn xsave_leaf_only_advertises_components_it_describes() {
        let mut e = intel_like();
        normalize(
            &mut e,
            CpuTopology {
                apic_id: 0,
                num_cpus: 1,
            },
        );
        let d0 = get(&e, 0xd, 0);
        // 0x2ff = x87|SSE|AVX|MPX|AVX-512|PKRU; MPX is dropped, and only AVX has a size leaf.
        assert_eq!((d0.eax, d0.edx), (0x7, 0));
        assert_eq!(d0.ecx, 0x240 + 0x100);
        assert_eq!(d0.ebx, d0.ecx, "sized for the XCR0 the guest will set");
        assert_eq!(guest_xcr0(&e), Some(0x7));
        assert!(find(&e, 0xd, 2).is_some());
        assert!(find(&e, 0xd, 5).is_none());
        assert!(
            find(&e, 0xd, 3).is_none(),
            "MPX size leaf dropped with the component"
        );
    }

    #[test]
    fn amd_core_count_goes_to_leaf_8000_0008() {
        let mut e = vec![
            plain(0, 0, [0xd, 0x6874_7541, 0x444d_4163, 0x6974_6e65]),
            plain(1, 0, [0, 0, 0, 0]),
            plain(
                0x8000_0001,
                0,
                [0, 0, EXT1_ECX_TOPOEXT | EXT1_ECX_SVM | 1, 0],
            ),
            plain(0x8000_0008, 0, [0x3030, 0, 0x3007, 0]),
            plain(0x8000_001e, 0, [1, 2, 3, 0]),
        ];
        normalize(
            &mut e,
            CpuTopology {
                apic_id: 2,
                num_cpus: 4,
            },
        );
        assert_eq!(get(&e, 0x8000_0008, 0).ecx, 3 | (2 << 12));
        assert_eq!(get(&e, 0x8000_0001, 0).ecx, 1);
        assert!(find(&e, 0x8000_001e, 0).is_none());
        assert_eq!(get(&e, 0xb, 1).ebx, 4);
        assert!(
            find(&e, 0x1f, 0).is_none(),
            "no 0x1f invented when the host lacks it"
        );
    }
}
