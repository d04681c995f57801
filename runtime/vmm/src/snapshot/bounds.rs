//! Bounds on a snapshot payload, checked on the raw protobuf bytes before prost decodes them.
//!
//! Protobuf amplifies: an empty element of a repeated message field is 2 bytes on the wire but a
//! whole struct in memory (a `VcpuState` is about 300 bytes), so a 16 MiB payload of nothing but
//! empty `vcpus` entries would decode into gigabytes before any count could be checked. This
//! walker reads the wire format itself (varint keys, wire types, lengths), follows the
//! `SnapshotState` schema, counts every repeated field that allocates per element, and refuses
//! the payload as soon as one count passes its limit. It allocates nothing and its recursion is
//! bounded by the schema and by [`MAX_DEPTH`]. Unknown fields (a newer husk's additions) are
//! skipped, as prost skips them; groups (wire types 3 and 4, never written by proto3) are refused.

use crate::config::MAX_VCPUS;

/// Most vCPUs a snapshot can have: as many as a VM can (`--cpus`).
pub const MAX_SNAPSHOT_VCPUS: usize = MAX_VCPUS as usize;
/// Most virtio devices: the MMIO slots there are (see `crate::devices::virtio::slot_address`).
pub const MAX_SNAPSHOT_DEVICES: usize = 19;
/// Most queues per virtio device (husk's devices have at most 3).
pub const MAX_QUEUES_PER_DEVICE: usize = 16;
/// Most MSR indices (and as many values) per vCPU. KVM_GET_MSR_INDEX_LIST has a few hundred.
pub const MAX_MSRS_PER_VCPU: usize = 4096;
/// Most guest RAM regions (x86 has 2: below and above the MMIO gap).
pub const MAX_MEMORY_REGIONS: usize = 64;
/// Deepest message nesting walked (the schema's deepest is 4: state, device, transport, queue).
pub const MAX_DEPTH: usize = 8;

/// Why a payload was refused before decoding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BoundsError {
    /// A repeated field has more elements than husk ever writes.
    #[error("the snapshot state has more than {limit} {what}: refused before decoding")]
    TooMany {
        /// What was counted.
        what: &'static str,
        /// The limit.
        limit: usize,
    },
    /// Messages nested deeper than [`MAX_DEPTH`].
    #[error("the snapshot state nests messages deeper than {MAX_DEPTH}")]
    TooDeep,
    /// Not well-formed protobuf.
    #[error("the snapshot state is not well-formed protobuf: {0}")]
    Malformed(&'static str),
}

/// The messages whose fields allocate per element; everything else is walked as [`Kind::Leaf`]
/// (its fields are scalars, bytes or strings, which cannot amplify).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `SnapshotState`.
    Snapshot,
    /// `VcpuState`.
    Vcpu,
    /// `DeviceState`.
    Device,
    /// `TransportState`.
    Transport,
    /// `MemoryState`.
    Memory,
    /// Any other message: fields skipped, not counted.
    Leaf,
}

/// What a field of a message is, as far as counting goes.
enum Field {
    /// A sub-message of this kind; `Some(counter)` when it is one element of a repeated field.
    Message(Kind, Option<Counter>),
    /// A repeated varint scalar (packed or not), counted.
    Scalars(Counter),
    /// Anything that does not allocate per element.
    Skip,
}

/// The counters, each with its limit and its name in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Counter {
    Vcpus,
    Devices,
    Regions,
    Queues,
    MsrIndices,
    MsrValues,
}

impl Counter {
    fn limit(self) -> (usize, &'static str) {
        match self {
            Counter::Vcpus => (MAX_SNAPSHOT_VCPUS, "vCPUs"),
            Counter::Devices => (MAX_SNAPSHOT_DEVICES, "virtio devices"),
            Counter::Regions => (MAX_MEMORY_REGIONS, "memory regions"),
            Counter::Queues => (MAX_QUEUES_PER_DEVICE, "queues in one virtio device"),
            Counter::MsrIndices => (MAX_MSRS_PER_VCPU, "MSR indices in one vCPU"),
            Counter::MsrValues => (MAX_MSRS_PER_VCPU, "MSR values in one vCPU"),
        }
    }
}

/// The schema: what field `tag` of a `kind` message is (tags as in `super::state`).
fn field(kind: Kind, tag: u64) -> Field {
    match (kind, tag) {
        (Kind::Snapshot, 2) => Field::Message(Kind::Vcpu, Some(Counter::Vcpus)),
        (Kind::Snapshot, 4) => Field::Message(Kind::Memory, None),
        (Kind::Snapshot, 6) => Field::Message(Kind::Device, Some(Counter::Devices)),
        (Kind::Vcpu, 7) => Field::Scalars(Counter::MsrIndices),
        (Kind::Vcpu, 8) => Field::Scalars(Counter::MsrValues),
        (Kind::Device, 3) => Field::Message(Kind::Transport, None),
        (Kind::Transport, 1) => Field::Message(Kind::Leaf, Some(Counter::Queues)),
        (Kind::Memory, 2) => Field::Message(Kind::Leaf, Some(Counter::Regions)),
        _ => Field::Skip,
    }
}

/// Counts of one scope. prost merges every occurrence of a singular message field into one
/// value, so the counts inside one (`memory`, a device's `transport`) add up over its
/// occurrences: they are kept in the scope of the nearest repeated element (or the root).
#[derive(Default)]
struct Counts([usize; 6]);

impl Counts {
    fn add(&mut self, counter: Counter, n: usize) -> Result<(), BoundsError> {
        let slot = &mut self.0[counter as usize];
        *slot = slot.saturating_add(n);
        let (limit, what) = counter.limit();
        if *slot > limit {
            return Err(BoundsError::TooMany { what, limit });
        }
        Ok(())
    }
}

/// Checks that `payload`, a protobuf `SnapshotState`, stays within every limit above.
pub fn check(payload: &[u8]) -> Result<(), BoundsError> {
    walk(Kind::Snapshot, payload, 0, &mut Counts::default())
}

fn walk(
    kind: Kind,
    mut bytes: &[u8],
    depth: usize,
    counts: &mut Counts,
) -> Result<(), BoundsError> {
    if depth > MAX_DEPTH {
        return Err(BoundsError::TooDeep);
    }
    while !bytes.is_empty() {
        let key = varint(&mut bytes)?;
        let tag = key >> 3;
        if tag == 0 || tag > u64::from(u32::MAX >> 3) {
            return Err(BoundsError::Malformed("field number out of range"));
        }
        match key & 7 {
            0 => {
                varint(&mut bytes)?;
                if let Field::Scalars(counter) = field(kind, tag) {
                    counts.add(counter, 1)?;
                }
            }
            1 => take(&mut bytes, 8).map(drop)?,
            5 => take(&mut bytes, 4).map(drop)?,
            2 => {
                let len = usize::try_from(varint(&mut bytes)?)
                    .map_err(|_| BoundsError::Malformed("length out of range"))?;
                let body = take(&mut bytes, len)?;
                match field(kind, tag) {
                    Field::Message(child, None) => walk(child, body, depth + 1, counts)?,
                    Field::Message(child, Some(counter)) => {
                        counts.add(counter, 1)?;
                        walk(child, body, depth + 1, &mut Counts::default())?;
                    }
                    Field::Scalars(counter) => {
                        // Packed: one element per varint, each ends with a byte below 0x80.
                        counts.add(counter, body.iter().filter(|&&b| b < 0x80).count())?;
                    }
                    Field::Skip => {}
                }
            }
            3 | 4 => return Err(BoundsError::Malformed("groups are not used by husk")),
            _ => return Err(BoundsError::Malformed("invalid wire type")),
        }
    }
    Ok(())
}

/// Reads one varint (at most 10 bytes) off the front of `bytes`.
fn varint(bytes: &mut &[u8]) -> Result<u64, BoundsError> {
    let mut value = 0u64;
    for (i, &b) in bytes.iter().enumerate().take(10) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            *bytes = &bytes[i + 1..];
            return Ok(value);
        }
    }
    Err(BoundsError::Malformed("truncated or overlong varint"))
}

/// Splits `n` bytes off the front of `bytes`.
fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Result<&'a [u8], BoundsError> {
    if n > bytes.len() {
        return Err(BoundsError::Malformed(
            "a field runs past the end of its message",
        ));
    }
    let (head, rest) = bytes.split_at(n);
    *bytes = rest;
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::state::tests::sample;
    use crate::snapshot::state::{
        DeviceState, MemoryRegionState, MemoryState, QueueState, SnapshotState, TransportState,
        VcpuState,
    };
    use prost::Message;

    /// `n` copies of field `tag` as an empty sub-message: 2 bytes each on the wire.
    pub(crate) fn empty_messages(tag: u8, n: usize) -> Vec<u8> {
        [tag << 3 | 2, 0].repeat(n)
    }

    #[test]
    fn a_real_state_passes() {
        check(&sample().encode_to_vec()).unwrap();
        check(&[]).unwrap();
    }

    #[test]
    fn a_state_at_every_limit_passes_and_one_more_is_refused() {
        let mut s = sample();
        s.vcpus = vec![
            VcpuState {
                msr_indices: vec![u32::MAX; MAX_MSRS_PER_VCPU],
                msr_values: vec![u64::MAX; MAX_MSRS_PER_VCPU],
                ..Default::default()
            };
            MAX_SNAPSHOT_VCPUS
        ];
        s.devices = vec![
            DeviceState {
                transport: Some(TransportState {
                    queues: vec![QueueState::default(); MAX_QUEUES_PER_DEVICE],
                    ..Default::default()
                }),
                ..Default::default()
            };
            MAX_SNAPSHOT_DEVICES
        ];
        s.memory = Some(MemoryState {
            regions: vec![MemoryRegionState::default(); MAX_MEMORY_REGIONS],
            ..Default::default()
        });
        check(&s.encode_to_vec()).unwrap();

        let mut more = s.clone();
        more.vcpus.push(VcpuState::default());
        let e = check(&more.encode_to_vec()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the snapshot state has more than 32 vCPUs: refused before decoding"
        );
        let mut more = s.clone();
        more.devices.push(DeviceState::default());
        assert!(check(&more.encode_to_vec())
            .unwrap_err()
            .to_string()
            .contains("19 virtio devices"));
        let mut more = s.clone();
        more.vcpus[3].msr_values.push(1);
        assert!(check(&more.encode_to_vec())
            .unwrap_err()
            .to_string()
            .contains("MSR values"));
        let mut more = s.clone();
        more.devices[0]
            .transport
            .as_mut()
            .unwrap()
            .queues
            .push(QueueState::default());
        assert!(check(&more.encode_to_vec())
            .unwrap_err()
            .to_string()
            .contains("queues"));
        let mut more = s;
        more.memory
            .as_mut()
            .unwrap()
            .regions
            .push(MemoryRegionState::default());
        assert!(check(&more.encode_to_vec())
            .unwrap_err()
            .to_string()
            .contains("memory regions"));
    }

    #[test]
    fn the_device_limit_is_the_number_of_mmio_slots() {
        use crate::devices::virtio::slot_address;
        assert!(slot_address(MAX_SNAPSHOT_DEVICES - 1).is_ok());
        assert!(slot_address(MAX_SNAPSHOT_DEVICES).is_err());
    }

    #[test]
    fn repeated_empty_entries_are_refused_at_the_first_one_past_the_limit() {
        for tag in [2, 6] {
            let e = check(&empty_messages(tag, 1 << 20)).unwrap_err();
            assert!(matches!(e, BoundsError::TooMany { .. }), "{e}");
        }
    }

    #[test]
    fn counts_inside_a_singular_message_add_up_over_its_occurrences() {
        // prost merges every `memory` into one, so 64 + 1 regions in two halves are 65.
        let half = |n| MemoryState {
            regions: vec![MemoryRegionState::default(); n],
            ..Default::default()
        };
        let mut wire = SnapshotState {
            memory: Some(half(MAX_MEMORY_REGIONS)),
            ..Default::default()
        }
        .encode_to_vec();
        wire.extend(
            SnapshotState {
                memory: Some(half(1)),
                ..Default::default()
            }
            .encode_to_vec(),
        );
        assert_eq!(
            SnapshotState::decode(&wire[..])
                .unwrap()
                .memory
                .unwrap()
                .regions
                .len(),
            65
        );
        assert!(matches!(check(&wire), Err(BoundsError::TooMany { .. })));
    }

    #[test]
    fn packed_and_unpacked_msr_lists_are_both_counted() {
        // A vCPU (tag 2) holding MAX + 1 unpacked MSR indices (tag 7, varint 1).
        let body = [7 << 3, 1].repeat(MAX_MSRS_PER_VCPU + 1);
        let mut wire = vec![2 << 3 | 2];
        let mut len = body.len();
        while len >= 0x80 {
            wire.push((len as u8) | 0x80);
            len >>= 7;
        }
        wire.push(len as u8);
        wire.extend(body);
        assert!(matches!(check(&wire), Err(BoundsError::TooMany { .. })));
        let packed = VcpuState {
            msr_indices: vec![0x8000_0000; MAX_MSRS_PER_VCPU + 1],
            ..Default::default()
        };
        let wire = SnapshotState {
            vcpus: vec![packed],
            ..Default::default()
        }
        .encode_to_vec();
        assert!(matches!(check(&wire), Err(BoundsError::TooMany { .. })));
    }

    #[test]
    fn malformed_wire_data_is_refused_without_panicking() {
        for bad in [
            &[0x12, 0x05, 0x00][..], // length past the end
            &[0x10, 0xff][..],       // truncated varint
            &[0x08; 1][..],          // key without value
            &[0x13][..],             // group start
            &[0x0f][..],             // wire type 7
            &[0x00, 0x00][..],       // field number 0
            &[
                0x10, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ][..],
        ] {
            assert!(
                matches!(check(bad), Err(BoundsError::Malformed(_))),
                "{bad:x?}"
            );
        }
    }

    #[test]
    fn unknown_fields_are_skipped_like_prost_does() {
        let mut wire = sample().encode_to_vec();
        // Field 99, length-delimited, holding what would be far too many vCPUs if walked.
        let junk = empty_messages(2, 100);
        wire.extend([0x9a, 0x06, 200, 1]);
        wire.extend(&junk);
        check(&wire).unwrap();
        assert_eq!(SnapshotState::decode(&wire[..]).unwrap(), sample());
    }

    /// Peak resident memory of this process (VmHWM), in KiB.
    fn peak_rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// Reads crafted state files the way a restore does (file check, then bounds, then prost)
    /// and prints this process's peak RSS. Runs in a child process of the test below, so other
    /// tests cannot inflate the peak; `HUSK_CRAFTED_UNBOUNDED=MIB` instead decodes a crafted
    /// payload of that size with prost alone (the behaviour before the bounds, for docs/).
    #[test]
    #[ignore = "the child process of a_crafted_amplifying_state_file_is_refused_with_bounded_memory"]
    fn crafted_state_files_child() {
        use crate::snapshot::file;
        if let Ok(mib) = std::env::var("HUSK_CRAFTED_UNBOUNDED") {
            let payload = empty_messages(2, mib.parse::<usize>().unwrap() << 19);
            let started = std::time::Instant::now();
            let n = SnapshotState::decode(&payload[..]).map(|s| s.vcpus.len());
            println!("unbounded: {n:?} in {:?}", started.elapsed());
            println!("peak_kib={}", peak_rss_kib());
            return;
        }
        let Some(dir) = std::env::var_os("HUSK_CRAFTED_DIR") else {
            return;
        };
        let dir = std::path::PathBuf::from(dir);
        // 64 MiB (the old limit) and the limit: nothing but empty `vcpus` entries.
        let files = [("64m", 64 << 20), ("max", file::MAX_PAYLOAD as usize)];
        for (name, payload_len) in files {
            let image = file::encode(&empty_messages(2, payload_len / 2));
            std::fs::write(dir.join(name), image).unwrap();
        }
        // Writing "5" resets VmHWM: the peak below is the reading alone.
        std::fs::write("/proc/self/clear_refs", "5").unwrap();
        for (name, _) in files {
            let path = dir.join(name);
            let started = std::time::Instant::now();
            let e = match file::read(&path) {
                Err(e) => e.to_string(),
                Ok(payload) => SnapshotState::from_bytes(&payload).unwrap_err().to_string(),
            };
            println!("{name}: {e} in {:?}", started.elapsed());
            std::fs::remove_file(&path).unwrap();
        }
        println!("peak_kib={}", peak_rss_kib());
    }

    #[test]
    fn a_crafted_amplifying_state_file_is_refused_with_bounded_memory() {
        let dir = crate::test_utils::ScratchDir::new("crafted");
        let started = std::time::Instant::now();
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "snapshot::bounds::tests::crafted_state_files_child",
            ])
            .args(["--ignored", "--nocapture", "--test-threads=1"])
            .env("HUSK_CRAFTED_DIR", dir.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}");
        assert!(
            stdout.contains("64m: ") && stdout.contains("-byte limit of a snapshot"),
            "{stdout}"
        );
        assert!(
            stdout.contains("max: the snapshot state has more than 32 vCPUs"),
            "{stdout}"
        );
        let peak: u64 = stdout
            .lines()
            .find_map(|l| l.strip_prefix("peak_kib="))
            .unwrap()
            .parse()
            .unwrap();
        // The child reads at most one 16 MiB file at a time; decoding adds nothing.
        assert!(peak < 256 << 10, "peak RSS {peak} KiB\n{stdout}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "{stdout}"
        );
    }

    #[test]
    fn nesting_deeper_than_the_schema_is_cut_off() {
        assert_eq!(
            walk(Kind::Leaf, &[], MAX_DEPTH + 1, &mut Counts::default()),
            Err(BoundsError::TooDeep)
        );
    }
}
