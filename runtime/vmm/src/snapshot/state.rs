//! The snapshot payload: protobuf messages (prost, derived here rather than generated: this
//! schema is private to husk-vmm) that hold no fds and no pointers.
//!
//! KVM's own state structs (`kvm_regs`, `kvm_sregs`, `kvm_lapic_state`, ...) are stored as their
//! raw bytes: they are part of the stable KVM ABI (linux/kvm.h), so their layout cannot change
//! under a snapshot, and every field is kept without a hand-written mirror that could drop one.
//! [`Pod`] limits this to those types, and decoding checks the exact size.

use prost::Message;

// A device's state is defined beside the device, with its save and restore; the snapshot embeds
// it as is.
pub use crate::devices::legacy::serial::persist::SerialState;
pub use husk_devices::virtio::mmio::persist::{QueueState, TransportState};

/// Why a payload could not be turned back into state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Not a valid protobuf `SnapshotState`.
    #[error("the snapshot state does not decode")]
    Decode(#[source] prost::DecodeError),
    /// A KVM struct has the wrong size (a different KVM ABI, or a damaged file).
    #[error("snapshot field {what} is {actual} bytes, expected {expected}")]
    Size {
        /// Which field.
        what: &'static str,
        /// Its size in the file.
        actual: usize,
        /// The size of the struct.
        expected: usize,
    },
    /// A required part is absent.
    #[error("the snapshot has no {0}")]
    Missing(&'static str),
    /// More of something than husk ever writes (checked before decoding).
    #[error(transparent)]
    Bounds(#[from] super::bounds::BoundsError),
}

/// Plain KVM ABI structs: integers and arrays of integers only, for which every bit pattern is a
/// valid value.
///
/// # Safety
/// Implement only for `#[repr(C)]` types made of integers (and unions/arrays of them), with
/// no pointers and nothing to drop (a zero-length trailing array, as in `kvm_xsave`, is fine).
pub unsafe trait Pod: Default {}

// SAFETY: each is a bindgen #[repr(C)] struct of integer fields, arrays and unions of integers
// (linux/kvm.h), so any byte pattern is a valid value.
unsafe impl Pod for kvm_bindings::kvm_regs {}
// SAFETY: see above.
unsafe impl Pod for kvm_bindings::kvm_sregs {}
// SAFETY: see above.
unsafe impl Pod for kvm_bindings::kvm_fpu {}
// SAFETY: see above.
unsafe impl Pod for kvm_bindings::kvm_xsave {}
// SAFETY: see above.
unsafe impl Pod for kvm_bindings::kvm_xcrs {}
// SAFETY: see above.
unsafe impl Pod for kvm_bindings::kvm_lapic_state {}
// SAFETY: see above.
unsafe impl Pod for kvm_bindings::kvm_debugregs {}
// SAFETY: see above.
unsafe impl Pod for kvm_bindings::kvm_vcpu_events {}
// SAFETY: see above.
unsafe impl Pod for kvm_bindings::kvm_irqchip {}
// SAFETY: see above.
unsafe impl Pod for kvm_bindings::kvm_pit_state2 {}
// SAFETY: see above.
unsafe impl Pod for kvm_bindings::kvm_cpuid_entry2 {}

/// The bytes of `v`.
pub fn pod_bytes<T: Pod>(v: &T) -> Vec<u8> {
    // SAFETY: T is Pod (plain integers, see the trait); the slice covers exactly `*v`, which is
    // borrowed for the copy. Values handed here come from zero-initialised structs that KVM
    // filled, so padding bytes are initialised too.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
        .to_vec()
}

/// A `T` from exactly `size_of::<T>()` bytes.
pub fn pod_from<T: Pod>(what: &'static str, bytes: &[u8]) -> Result<T, StateError> {
    let expected = std::mem::size_of::<T>();
    if bytes.len() != expected {
        return Err(StateError::Size {
            what,
            actual: bytes.len(),
            expected,
        });
    }
    let mut v = T::default();
    // SAFETY: `bytes` holds exactly size_of::<T>() bytes and T is Pod, so every byte pattern is
    // a valid T; source and destination do not overlap.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), (&mut v as *mut T).cast::<u8>(), expected)
    };
    Ok(v)
}

/// Everything needed to rebuild a paused VM, except guest memory (its own file).
#[derive(Clone, PartialEq, Message)]
pub struct SnapshotState {
    /// Shape of the machine.
    #[prost(message, optional, tag = "1")]
    pub machine: Option<MachineState>,
    /// One per vCPU, in index order.
    #[prost(message, repeated, tag = "2")]
    pub vcpus: Vec<VcpuState>,
    /// In-kernel irqchip, PIT and clock.
    #[prost(message, optional, tag = "3")]
    pub vm: Option<VmState>,
    /// The memory file that goes with this state.
    #[prost(message, optional, tag = "4")]
    pub memory: Option<MemoryState>,
    /// The UART.
    #[prost(message, optional, tag = "5")]
    pub serial: Option<SerialState>,
    /// Virtio devices in MMIO slot order.
    #[prost(message, repeated, tag = "6")]
    pub devices: Vec<DeviceState>,
}

/// One virtio device: what it is backed by and where its transport stands.
#[derive(Clone, PartialEq, Message)]
pub struct DeviceState {
    /// Name (`block0`, `net0`, `vsock0`, `rng0`).
    #[prost(string, tag = "1")]
    pub name: String,
    /// The backend, which a restore may override.
    #[prost(message, optional, tag = "2")]
    pub backend: Option<DeviceBackend>,
    /// The virtio-mmio transport.
    #[prost(message, optional, tag = "3")]
    pub transport: Option<TransportState>,
}

/// What a virtio device is backed by (its identity on the host).
#[derive(Clone, PartialEq, Message)]
pub struct DeviceBackend {
    /// The kind and its parameters.
    #[prost(oneof = "Backend", tags = "1, 2, 3, 4, 5, 6")]
    pub backend: Option<Backend>,
}

/// The kinds of backend.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Backend {
    /// A disk image.
    #[prost(message, tag = "1")]
    Disk(DiskBackend),
    /// A tap device.
    #[prost(message, tag = "2")]
    Net(NetBackend),
    /// vsock over a host Unix socket.
    #[prost(message, tag = "3")]
    Vsock(VsockBackend),
    /// The host's random source.
    #[prost(message, tag = "4")]
    Rng(RngBackend),
    /// An empty disk slot (`--disk-slots`); a snapshot is refused while a slot holds a disk.
    #[prost(message, tag = "5")]
    DiskSlot(DiskSlotBackend),
    /// The balloon and what it offered the guest (its target and size are the device's own
    /// state, in its transport's `device_state`).
    #[prost(message, tag = "6")]
    Balloon(BalloonBackend),
}

/// virtio-blk backend.
#[derive(Clone, PartialEq, Message)]
pub struct DiskBackend {
    /// Image path.
    #[prost(string, tag = "1")]
    pub path: String,
    /// Read-only.
    #[prost(bool, tag = "2")]
    pub read_only: bool,
    /// "raw" or "qcow2" (empty in older snapshots: raw).
    #[prost(string, tag = "3")]
    pub format: String,
    /// The backing chain from the top down, each "FORMAT:PATH".
    #[prost(string, repeated, tag = "4")]
    pub backing: Vec<String>,
}

/// virtio-net backend.
#[derive(Clone, PartialEq, Message)]
pub struct NetBackend {
    /// Tap interface name.
    #[prost(string, tag = "1")]
    pub tap: String,
    /// MAC address (6 bytes).
    #[prost(bytes = "vec", tag = "2")]
    pub mac: Vec<u8>,
    /// The MTU announced to the guest; 0: none (older snapshots have none).
    #[prost(uint32, tag = "3")]
    pub mtu: u32,
}

/// virtio-vsock backend.
#[derive(Clone, PartialEq, Message)]
pub struct VsockBackend {
    /// Guest CID.
    #[prost(uint64, tag = "1")]
    pub cid: u64,
    /// Host Unix socket path.
    #[prost(string, tag = "2")]
    pub uds_path: String,
}

/// virtio-rng backend (nothing to record).
#[derive(Clone, PartialEq, Message)]
pub struct RngBackend {}

/// virtio-balloon: the features offered (the guest negotiated from these).
#[derive(Clone, PartialEq, Message)]
pub struct BalloonBackend {
    #[prost(bool, tag = "1")]
    pub stats: bool,
    #[prost(bool, tag = "2")]
    pub reporting: bool,
    #[prost(bool, tag = "3")]
    pub deflate_on_oom: bool,
}

/// An empty disk slot (nothing to record: it comes back empty).
#[derive(Clone, PartialEq, Message)]
pub struct DiskSlotBackend {}

/// Size of the machine.
#[derive(Clone, PartialEq, Message)]
pub struct MachineState {
    /// Guest RAM in bytes (as given at boot; the MMIO gap is laid out from it).
    #[prost(uint64, tag = "1")]
    pub mem_size: u64,
    /// Number of vCPUs.
    #[prost(uint32, tag = "2")]
    pub vcpus: u32,
}

/// One vCPU, as KVM reports it while the vCPU is outside KVM_RUN.
#[derive(Clone, PartialEq, Message)]
pub struct VcpuState {
    /// vCPU index (= APIC id).
    #[prost(uint32, tag = "1")]
    pub index: u32,
    /// The CPUID the vCPU ran with: raw `kvm_cpuid_entry2` records, concatenated.
    #[prost(bytes = "vec", tag = "2")]
    pub cpuid: Vec<u8>,
    /// `kvm_regs`.
    #[prost(bytes = "vec", tag = "3")]
    pub regs: Vec<u8>,
    /// `kvm_sregs`.
    #[prost(bytes = "vec", tag = "4")]
    pub sregs: Vec<u8>,
    /// `kvm_xsave` (legacy 4 KiB area; husk enables no dynamic XSAVE features such as AMX).
    #[prost(bytes = "vec", tag = "5")]
    pub xsave: Vec<u8>,
    /// `kvm_xcrs`.
    #[prost(bytes = "vec", tag = "6")]
    pub xcrs: Vec<u8>,
    /// MSR indices (those of KVM_GET_MSR_INDEX_LIST that this vCPU could read).
    #[prost(uint32, repeated, tag = "7")]
    pub msr_indices: Vec<u32>,
    /// MSR values, in the order of `msr_indices`.
    #[prost(uint64, repeated, tag = "8")]
    pub msr_values: Vec<u64>,
    /// `kvm_lapic_state`.
    #[prost(bytes = "vec", tag = "9")]
    pub lapic: Vec<u8>,
    /// `kvm_debugregs`.
    #[prost(bytes = "vec", tag = "10")]
    pub debug_regs: Vec<u8>,
    /// `kvm_vcpu_events` (pending exceptions, interrupts, NMIs, SMM).
    #[prost(bytes = "vec", tag = "11")]
    pub vcpu_events: Vec<u8>,
    /// `kvm_mp_state.mp_state`.
    #[prost(uint32, tag = "12")]
    pub mp_state: u32,
    /// Guest TSC frequency in kHz (0: KVM could not tell).
    #[prost(uint32, tag = "13")]
    pub tsc_khz: u32,
    /// `kvm_fpu` (redundant with XSAVE where KVM has it; restored first, XSAVE wins).
    #[prost(bytes = "vec", tag = "14")]
    pub fpu: Vec<u8>,
}

/// VM-wide in-kernel devices and the clock.
#[derive(Clone, PartialEq, Message)]
pub struct VmState {
    /// `kvm_irqchip` of the master PIC (chip 0).
    #[prost(bytes = "vec", tag = "1")]
    pub pic_master: Vec<u8>,
    /// `kvm_irqchip` of the slave PIC (chip 1).
    #[prost(bytes = "vec", tag = "2")]
    pub pic_slave: Vec<u8>,
    /// `kvm_irqchip` of the IOAPIC (chip 2).
    #[prost(bytes = "vec", tag = "3")]
    pub ioapic: Vec<u8>,
    /// `kvm_pit_state2`.
    #[prost(bytes = "vec", tag = "4")]
    pub pit: Vec<u8>,
    /// kvmclock nanoseconds (`kvm_clock_data.clock`).
    #[prost(uint64, tag = "5")]
    pub clock_ns: u64,
}

/// Which memory file goes with the state, and how guest RAM lies in it.
#[derive(Clone, PartialEq, Message)]
pub struct MemoryState {
    /// Random id written into the memory file's header too: a state file is never paired with
    /// another snapshot's memory.
    #[prost(bytes = "vec", tag = "1")]
    pub id: Vec<u8>,
    /// RAM regions in guest-physical order, each at its offset in the file.
    #[prost(message, repeated, tag = "2")]
    pub regions: Vec<MemoryRegionState>,
    /// Bytes of page data the memory file holds (all-zero pages are holes).
    #[prost(uint64, tag = "3")]
    pub bytes_written: u64,
    /// For a diff snapshot: the full memory file the diff applies to (absolute path).
    #[prost(string, tag = "4")]
    pub base_path: String,
    /// That file's snapshot id.
    #[prost(bytes = "vec", tag = "5")]
    pub base_id: Vec<u8>,
    /// For a diff snapshot: one bit per page of guest RAM (regions in order, bit i of byte
    /// i / 8 = page i), set for the pages the diff file holds.
    #[prost(bytes = "vec", tag = "6")]
    pub changed_pages: Vec<u8>,
}

/// One RAM region.
#[derive(Clone, PartialEq, Message)]
pub struct MemoryRegionState {
    /// Guest-physical start.
    #[prost(uint64, tag = "1")]
    pub guest_addr: u64,
    /// Length in bytes.
    #[prost(uint64, tag = "2")]
    pub len: u64,
    /// Offset in the memory file (page aligned).
    #[prost(uint64, tag = "3")]
    pub file_offset: u64,
}

impl SnapshotState {
    /// The protobuf bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.encode_to_vec()
    }

    /// Decodes and checks that every required part is present. The raw bytes are checked
    /// against [`super::bounds`] first, so a crafted payload cannot make decoding allocate
    /// more than a few times its own size.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StateError> {
        super::bounds::check(bytes)?;
        let s = SnapshotState::decode(bytes).map_err(StateError::Decode)?;
        let machine = s.machine.as_ref().ok_or(StateError::Missing("machine"))?;
        s.vm.as_ref().ok_or(StateError::Missing("VM state"))?;
        s.memory.as_ref().ok_or(StateError::Missing("memory map"))?;
        if s.vcpus.is_empty() || s.vcpus.len() != machine.vcpus as usize {
            return Err(StateError::Missing("state for every vCPU"));
        }
        Ok(s)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use husk_devices::virtio::mmio::Lifecycle;
    use kvm_bindings::{kvm_irqchip, kvm_regs, kvm_sregs};

    /// A state with every field set to something recognisable.
    pub(crate) fn sample() -> SnapshotState {
        let regs = kvm_regs {
            rip: 0x1234,
            rax: 7,
            rflags: 2,
            ..Default::default()
        };
        let sregs = kvm_sregs {
            cr0: 0x8000_0011,
            efer: 0x500,
            ..Default::default()
        };
        let pic = kvm_irqchip {
            chip_id: 1,
            ..Default::default()
        };
        let vcpu = |index| VcpuState {
            index,
            cpuid: vec![1; 40],
            regs: pod_bytes(&regs),
            sregs: pod_bytes(&sregs),
            xsave: vec![3; 4096],
            xcrs: vec![4; 8],
            msr_indices: vec![0x10, 0xc000_0100],
            msr_values: vec![123_456, 0xdead],
            lapic: vec![5; 1024],
            debug_regs: vec![6; 8],
            vcpu_events: vec![7; 8],
            mp_state: 3,
            tsc_khz: 2_100_000,
            fpu: vec![8; 16],
        };
        SnapshotState {
            machine: Some(MachineState {
                mem_size: 128 << 20,
                vcpus: 2,
            }),
            vcpus: vec![vcpu(0), vcpu(1)],
            vm: Some(VmState {
                pic_master: pod_bytes(&kvm_irqchip::default()),
                pic_slave: pod_bytes(&pic),
                ioapic: vec![9; 16],
                pit: vec![10; 16],
                clock_ns: 99,
            }),
            memory: Some(MemoryState {
                id: vec![0xab; 16],
                regions: vec![MemoryRegionState {
                    guest_addr: 0,
                    len: 128 << 20,
                    file_offset: 4096,
                }],
                bytes_written: 8192,
                ..Default::default()
            }),
            serial: Some(SerialState {
                line_control: 3,
                in_buffer: b"typed".to_vec(),
                ..Default::default()
            }),
            devices: vec![DeviceState {
                name: "vsock0".into(),
                backend: Some(DeviceBackend {
                    backend: Some(Backend::Vsock(VsockBackend {
                        cid: 3,
                        uds_path: "/run/v.sock".into(),
                    })),
                }),
                transport: Some(TransportState {
                    queues: vec![QueueState {
                        max_size: 256,
                        next_avail: 7,
                        next_used: 7,
                        event_idx: true,
                        size: 256,
                        ready: true,
                        desc_table: 0x1000,
                        avail_ring: 0x2000,
                        used_ring: 0x3000,
                    }],
                    status: 15,
                    lifecycle: Lifecycle::Active.into(),
                    acked_features: 1 << 32,
                    ..Default::default()
                }),
            }],
        }
    }

    #[test]
    fn the_whole_state_round_trips() {
        let s = sample();
        assert_eq!(SnapshotState::from_bytes(&s.to_bytes()).unwrap(), s);
    }

    #[test]
    fn kvm_structs_round_trip_through_their_bytes() {
        let s = sample();
        let regs: kvm_regs = pod_from("regs", &s.vcpus[0].regs).unwrap();
        assert_eq!((regs.rip, regs.rax, regs.rflags), (0x1234, 7, 2));
        let sregs: kvm_sregs = pod_from("sregs", &s.vcpus[0].sregs).unwrap();
        assert_eq!((sregs.cr0, sregs.efer), (0x8000_0011, 0x500));
        let pic: kvm_irqchip = pod_from("pic", &s.vm.unwrap().pic_slave).unwrap();
        assert_eq!(pic.chip_id, 1);
    }

    #[test]
    fn wrong_sizes_and_missing_parts_are_refused() {
        let e = pod_from::<kvm_regs>("regs", &[0; 10]).unwrap_err();
        assert!(e.to_string().contains("regs is 10 bytes"), "{e}");
        let mut s = sample();
        s.vcpus.pop();
        assert!(SnapshotState::from_bytes(&s.to_bytes()).is_err());
        let mut s = sample();
        s.memory = None;
        assert!(SnapshotState::from_bytes(&s.to_bytes()).is_err());
        assert!(SnapshotState::from_bytes(&[0xff, 0xff, 0xff]).is_err());
    }
}
