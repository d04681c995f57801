//! Snapshot state files: the container (magic, version, length, CRC-32), the bounds walked
//! before decoding, the protobuf payload, every KVM struct and transport state in it, and the
//! restore of each saved transport onto a live virtio-rng device. A state file is attacker
//! input when snapshots are shared between hosts: nothing in it may panic or allocate without
//! bound, and whatever decodes re-encodes to the same state.

#![no_main]

use std::path::Path;

use husk_vmm::snapshot::{file, state, vcpu_state};
use kvm_bindings::{kvm_lapic_state, kvm_regs, kvm_sregs, kvm_xsave};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.state");
    // The raw input as a whole file (only CRC-correct ones pass), then as a payload that the
    // container accepts, since the fuzzer cannot forge CRCs.
    let payload = match file::decode(path, data) {
        Ok(payload) => payload,
        Err(_) => data,
    };
    let image = file::encode(payload);
    assert_eq!(file::decode(path, &image).ok(), Some(payload));

    let bounded = state::SnapshotState::from_bytes(payload);
    if husk_vmm::snapshot::bounds::check(payload).is_err() {
        assert!(bounded.is_err());
    }
    let Ok(s) = bounded else {
        return;
    };
    // What decodes, re-encodes to the same state (unknown fields are dropped, nothing else).
    let again = state::SnapshotState::from_bytes(&s.to_bytes()).ok();
    assert_eq!(again.as_ref(), Some(&s));
    assert!(s.encoded_len() <= payload.len());

    for vcpu in &s.vcpus {
        let _ = vcpu_state::cpuid_entries(vcpu);
        let _ = state::pod_from::<kvm_regs>("regs", &vcpu.regs);
        let _ = state::pod_from::<kvm_sregs>("sregs", &vcpu.sregs);
        let _ = state::pod_from::<kvm_xsave>("xsave", &vcpu.xsave);
        let _ = state::pod_from::<kvm_lapic_state>("lapic", &vcpu.lapic);
    }
    let mem = husk_fuzz::guest_memory();
    for device in &s.devices {
        let Some(saved) = &device.transport else {
            continue;
        };
        let mut t = husk_fuzz::transport(husk_fuzz::Kind::Rng.device(Default::default()), &mem);
        if t.restore_state(saved).is_ok() {
            // A restored queue is processed as soon as the guest notifies it.
            t.notify(0);
            t.save_state();
        }
    }
});
