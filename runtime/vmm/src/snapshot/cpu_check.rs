//! Refusing a restore on a host whose CPU lacks features the snapshotted guest was given: the
//! guest kernel chose code paths (AVX-512, XSAVES, RDPID...) at boot and would fault on the
//! first instruction the new host cannot run.

use kvm_bindings::kvm_cpuid_entry2;

/// (leaf, subleaf, register name, mask) of the CPUID words that hold feature flags. Bits that
/// reflect guest-controlled state rather than hardware (OSXSAVE = leaf 1 ECX bit 27, OSPKE =
/// leaf 7 ECX bit 4) are masked out: KVM updates them from the guest's CR4.
const FEATURE_WORDS: &[(u32, u32, Reg, u32)] = &[
    (1, 0, Reg::Ecx, !(1 << 27)),
    (1, 0, Reg::Edx, !0),
    (7, 0, Reg::Ebx, !0),
    (7, 0, Reg::Ecx, !(1 << 4)),
    (7, 0, Reg::Edx, !0),
    (0xd, 1, Reg::Eax, !0),
    (0x8000_0001, 0, Reg::Ecx, !0),
    (0x8000_0001, 0, Reg::Edx, !0),
];

#[derive(Clone, Copy, Debug)]
enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// The snapshot used CPU features this host's KVM cannot give.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("this host's CPU (as KVM reports it) lacks features the snapshot's guest uses: {0}")]
pub struct MissingFeatures(pub String);

fn word(entries: &[kvm_cpuid_entry2], leaf: u32, subleaf: u32, reg: Reg) -> u32 {
    entries
        .iter()
        .find(|e| e.function == leaf && e.index == subleaf)
        .map_or(0, |e| match reg {
            Reg::Eax => e.eax,
            Reg::Ebx => e.ebx,
            Reg::Ecx => e.ecx,
            Reg::Edx => e.edx,
        })
}

/// Checks that every feature bit set in `saved` (a vCPU's CPUID) is set in `host` (the host's
/// KVM_GET_SUPPORTED_CPUID, normalised the way a fresh boot would).
pub fn check(saved: &[kvm_cpuid_entry2], host: &[kvm_cpuid_entry2]) -> Result<(), MissingFeatures> {
    let missing: Vec<String> = FEATURE_WORDS
        .iter()
        .filter_map(|&(leaf, sub, reg, mask)| {
            let lacking = word(saved, leaf, sub, reg) & mask & !word(host, leaf, sub, reg);
            (lacking != 0).then(|| format!("leaf {leaf:#x}.{sub} {reg:?} bits {lacking:#010x}"))
        })
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(MissingFeatures(missing.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, ebx: u32, ecx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx,
            ecx,
            ..Default::default()
        }
    }

    #[test]
    fn a_subset_passes_and_a_missing_bit_is_named() {
        let host = vec![entry(1, 0, 0, 0b1111), entry(7, 0, 0xff, 0)];
        assert_eq!(check(&[entry(1, 0, 0, 0b0101)], &host), Ok(()));
        let e = check(&[entry(7, 0, 0x100, 0)], &host).unwrap_err();
        assert!(e.0.contains("leaf 0x7.0 Ebx bits 0x00000100"), "{e}");
    }

    #[test]
    fn guest_controlled_bits_are_ignored() {
        // OSXSAVE set by the guest's CR4 on the source host is no hardware feature.
        assert_eq!(
            check(&[entry(1, 0, 0, 1 << 27)], &[entry(1, 0, 0, 0)]),
            Ok(())
        );
        // A non-feature leaf never matters.
        assert_eq!(check(&[entry(0xb, 0, 7, 7)], &[]), Ok(()));
    }
}
