//! Giving guest RAM back to the host: the pages the guest put in the balloon, or reported free.
//!
//! The host mapping decides how: private memory (anonymous, or a snapshot's memory file mapped
//! copy-on-write) drops its pages with `MADV_DONTNEED` (the guest then reads zeros, or the
//! snapshot's page, which it does not care about: the page was free); shared memory (the memfd
//! of a VM with vhost-user devices) must punch the pages out of the file with `MADV_REMOVE`,
//! since `MADV_DONTNEED` would only unmap them from this process and free nothing.

use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::GuestMemoryMmap;

/// The page size the balloon protocol counts in (`VIRTIO_BALLOON_PFN_SHIFT` is 12).
pub const PAGE_SIZE: u64 = 4096;

/// Why a range could not be discarded.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DiscardError {
    /// The range is not page aligned, is empty, or does not lie within one RAM region.
    #[error("guest range {addr:#x}+{len:#x} is not page-aligned RAM")]
    NotRam { addr: u64, len: u64 },
    /// The kernel refused the madvise.
    #[error("madvise of guest range {addr:#x}+{len:#x} failed: {errno}")]
    Madvise { addr: u64, len: u64, errno: i32 },
}

/// Returns guest pages to the host. A trait so that tests can record what a device discards.
pub trait PageDiscard: Send {
    /// Gives the host memory behind `[addr, addr + len)` back. The range must be page-aligned
    /// RAM within one region.
    fn discard(&mut self, mem: &GuestMemoryMmap, addr: u64, len: u64) -> Result<(), DiscardError>;
}

/// The real thing: madvise on the VMM's own mapping of guest RAM.
pub struct HostDiscard;

impl PageDiscard for HostDiscard {
    fn discard(&mut self, mem: &GuestMemoryMmap, addr: u64, len: u64) -> Result<(), DiscardError> {
        let not_ram = DiscardError::NotRam { addr, len };
        if len == 0 || addr % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
            return Err(not_ram);
        }
        let region = mem.find_region(GuestAddress(addr)).ok_or(not_ram.clone())?;
        let offset = addr - region.start_addr().raw_value();
        let fits = offset
            .checked_add(len)
            .is_some_and(|end| end <= region.len());
        if !fits {
            return Err(not_ram);
        }
        let shared = region.flags() & libc::MAP_SHARED != 0;
        let advice = if shared {
            rustix::mm::Advice::LinuxRemove
        } else {
            rustix::mm::Advice::LinuxDontNeed
        };
        // `offset + len` lies within the region (checked above), whose mapping is `region.len()`
        // bytes long from `as_ptr()`, so the pointer arithmetic stays inside it.
        let host = region.as_ptr().wrapping_add(offset as usize);
        // SAFETY: the range is page-aligned and inside guest RAM's mapping, which stays mapped
        // for the VM's life. No Rust reference points into guest RAM (it is only reached through
        // volatile accesses), and the guest gave these pages up: dropping their contents is
        // what the balloon protocol asks for. The mapping itself stays in place.
        unsafe { rustix::mm::madvise(host.cast(), len as usize, advice) }.map_err(|e| {
            DiscardError::Madvise {
                addr,
                len,
                errno: e.raw_os_error(),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use vm_memory::Bytes;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x1_0000_0000), 0x1_0000),
        ])
        .unwrap()
    }

    #[test]
    fn discarded_private_pages_read_back_as_zeros_and_the_rest_is_kept() {
        let mem = memory();
        mem.write_slice(&[0xaa; 3 * 4096], GuestAddress(0x2000))
            .unwrap();
        HostDiscard.discard(&mem, 0x3000, 4096).unwrap();
        let mut page = [0u8; 4096];
        mem.read_slice(&mut page, GuestAddress(0x3000)).unwrap();
        assert_eq!(page, [0; 4096]);
        mem.read_slice(&mut page, GuestAddress(0x2000)).unwrap();
        assert_eq!(page, [0xaa; 4096]);
        mem.read_slice(&mut page, GuestAddress(0x4000)).unwrap();
        assert_eq!(page, [0xaa; 4096]);
    }

    #[test]
    fn ranges_outside_ram_or_unaligned_are_refused() {
        let mem = memory();
        for (addr, len) in [
            (0x1001, 4096),
            (0x1000, 100),
            (0x1000, 0),
            (0x10_0000, 4096),
            (0xf_f000, 0x2000),
            (0x1_0000_f000, 0x2000),
            (u64::MAX - 4095, 4096),
            (0, u64::MAX - 4095),
        ] {
            assert_eq!(
                HostDiscard.discard(&mem, addr, len),
                Err(DiscardError::NotRam { addr, len }),
                "{addr:#x}+{len:#x}"
            );
        }
        HostDiscard.discard(&mem, 0x1_0000_f000, 4096).unwrap();
    }

    #[test]
    fn shared_memory_is_punched_out_of_its_file() {
        use std::sync::Arc;
        use vm_memory::FileOffset;
        let fd = rustix::fs::memfd_create("balloon-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, 0x10_0000).unwrap();
        let file = Arc::new(std::fs::File::from(fd));
        let mem = GuestMemoryMmap::from_ranges_with_files(&[(
            GuestAddress(0),
            0x10_0000,
            Some(FileOffset::from_arc(file.clone(), 0)),
        )])
        .unwrap();
        mem.write_slice(&[0x55; 0x10_0000], GuestAddress(0))
            .unwrap();
        let blocks = || rustix::fs::fstat(&*file).unwrap().st_blocks;
        let before = blocks();
        HostDiscard.discard(&mem, 0x8_0000, 0x8_0000).unwrap();
        assert!(
            blocks() <= before / 2 + 8,
            "the memfd still holds its pages: {before} -> {} blocks",
            blocks()
        );
        let mut page = [1u8; 16];
        mem.read_slice(&mut page, GuestAddress(0x8_0000)).unwrap();
        assert_eq!(page, [0; 16]);
    }
}
