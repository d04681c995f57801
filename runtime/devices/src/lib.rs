//! husk's device models. They see guest memory and their backends, nothing else: the VMM wires
//! them to its MMIO bus, to KVM interrupts and to its event loop.
pub mod host_files;
pub mod rate_limiter;
pub mod ratelimit;
pub mod virtio;

/// The guest memory type every device works on (one place to change when dirty tracking of
/// device writes arrives with diff snapshots).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;
