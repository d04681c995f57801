//! The KVM VM: guest memory and its slots, in-kernel irqchip and PIT, interrupt EventFds.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::{ram_ranges, KVM_IDENTITY_MAP_START, KVM_TSS_START};

/// Errors while creating the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// Guest memory could not be mapped.
    #[error("cannot map {0} MiB of guest memory")]
    Memory(u64, #[source] vm_memory::mmap::FromRangesError),
    /// A VM-level KVM ioctl failed.
    #[error("cannot {0}")]
    Ioctl(&'static str, #[source] kvm_ioctls::Error),
    /// The shared memory file for guest RAM could not be created.
    #[error("cannot create {0} MiB of shared guest memory (memfd)")]
    SharedMemory(u64, #[source] std::io::Error),
    /// A memory region has no host mapping (cannot happen with mmap-backed memory).
    #[error("guest memory region at {0:#x} has no host address")]
    HostAddress(u64),
}

/// Maps guest memory (anonymous, private, MAP_NORESERVE: only touched pages use host memory)
/// laid out by [`ram_ranges`].
pub fn create_guest_memory(mem_size: u64) -> Result<GuestMemoryMmap, VmError> {
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(mem_size)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| VmError::Memory(mem_size >> 20, e))
}

/// Maps guest memory laid out by [`ram_ranges`] from one memfd, shared (MAP_SHARED,
/// MAP_NORESERVE): what a vhost-user backend (virtiofsd) needs to map the same RAM. Pages are
/// still allocated only when touched. Used only for VMs with vhost-user devices: private
/// anonymous memory stays the default (snapshots and restores map memory privately).
pub fn create_shared_guest_memory(mem_size: u64) -> Result<GuestMemoryMmap, VmError> {
    use std::sync::Arc;
    use vm_memory::FileOffset;
    let fd = rustix::fs::memfd_create("husk-guest-ram", rustix::fs::MemfdFlags::CLOEXEC)
        .map_err(|e| VmError::SharedMemory(mem_size >> 20, e.into()))?;
    rustix::fs::ftruncate(&fd, mem_size)
        .map_err(|e| VmError::SharedMemory(mem_size >> 20, e.into()))?;
    let file = Arc::new(std::fs::File::from(fd));
    let mut offset = 0u64;
    let ranges: Vec<(GuestAddress, usize, Option<FileOffset>)> = ram_ranges(mem_size)
        .into_iter()
        .map(|(start, len)| {
            let range = (
                GuestAddress(start),
                len as usize,
                Some(FileOffset::from_arc(file.clone(), offset)),
            );
            offset += len;
            range
        })
        .collect();
    GuestMemoryMmap::from_ranges_with_files(&ranges).map_err(|e| VmError::Memory(mem_size >> 20, e))
}

/// A created VM with its memory registered.
pub struct Vm {
    fd: VmFd,
    memory: GuestMemoryMmap,
}

impl Vm {
    /// Creates the VM: identity-map and TSS addresses, in-kernel irqchip (PIC, IOAPIC, LAPICs),
    /// PIT, and one memory slot per RAM range. Must precede vCPU creation.
    pub fn new(kvm: &Kvm, memory: GuestMemoryMmap) -> Result<Self, VmError> {
        let fd = kvm
            .create_vm()
            .map_err(|e| VmError::Ioctl("create the VM", e))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_START)
            .map_err(|e| VmError::Ioctl("set the identity map address", e))?;
        fd.set_tss_address(KVM_TSS_START as usize)
            .map_err(|e| VmError::Ioctl("set the TSS address", e))?;
        fd.create_irq_chip()
            .map_err(|e| VmError::Ioctl("create the in-kernel irqchip", e))?;
        // The dummy speaker makes KVM also own port 0x61 (PIT channel 2 gate, used by Linux's
        // PIT-based TSC calibration).
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit)
            .map_err(|e| VmError::Ioctl("create the in-kernel PIT", e))?;
        for (slot, region) in memory.iter().enumerate() {
            let start = region.start_addr();
            let host = memory
                .get_host_address(start)
                .map_err(|_| VmError::HostAddress(start.raw_value()))?;
            let desc = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: start.raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: `host` is the start of a live mapping of `region.len()` bytes owned by
            // `memory`, which this Vm keeps alive (and mapped) at least as long as the VM fd.
            unsafe { fd.set_user_memory_region(desc) }
                .map_err(|e| VmError::Ioctl("register guest memory", e))?;
        }
        Ok(Vm { fd, memory })
    }

    /// The KVM VM fd.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Routes writes to `evt` into interrupt line `gsi`.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|e| VmError::Ioctl("register an irqfd", e))
    }
}
