//! A request's guest buffers as ranges of guest memory, checked against guest memory once when
//! the request is parsed. Data then moves between the disk and these ranges with one
//! preadv/pwritev and no copy through the VMM; small parts (header, status byte, discard
//! segment) are read and written through guest-memory accessors.

use std::collections::VecDeque;

use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use crate::GuestMemoryMmap;

/// Bytes at guest addresses, in order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GuestBuffers {
    ranges: VecDeque<(GuestAddress, usize)>,
    len: usize,
}

impl GuestBuffers {
    /// Appends `len` bytes at `addr`; `None` if any of them is outside guest memory or the
    /// total would overflow.
    pub fn push(&mut self, mem: &GuestMemoryMmap, addr: GuestAddress, len: usize) -> Option<()> {
        if len == 0 {
            return Some(());
        }
        for slice in mem.get_slices(addr, len, Permissions::ReadWrite).ok()? {
            slice.ok()?;
        }
        self.len = self.len.checked_add(len)?;
        self.ranges.push_back((addr, len));
        Some(())
    }

    /// Total bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Removes and returns the first `n` bytes; `None` if there are fewer.
    pub fn split_front(&mut self, n: usize) -> Option<GuestBuffers> {
        if n > self.len {
            return None;
        }
        let mut front = GuestBuffers::default();
        let mut need = n;
        while need > 0 {
            let (addr, len) = self.ranges.pop_front()?;
            let take = len.min(need);
            front.ranges.push_back((addr, take));
            if take < len {
                self.ranges
                    .push_front((addr.checked_add(take as u64)?, len - take));
            }
            need -= take;
        }
        front.len = n;
        self.len -= n;
        Some(front)
    }

    /// Removes and returns the last `n` bytes; `None` if there are fewer.
    pub fn split_back(&mut self, n: usize) -> Option<GuestBuffers> {
        let keep = self.len.checked_sub(n)?;
        let front = self.split_front(keep)?;
        Some(std::mem::replace(self, front))
    }

    /// Copies the bytes into `buf` (exactly `buf.len()` of them from the front).
    pub fn read_into(&self, mem: &GuestMemoryMmap, buf: &mut [u8]) -> Option<()> {
        let mut done = 0;
        for &(addr, len) in &self.ranges {
            if done == buf.len() {
                break;
            }
            let n = len.min(buf.len() - done);
            mem.read_slice(&mut buf[done..done + n], addr).ok()?;
            done += n;
        }
        (done == buf.len()).then_some(())
    }

    /// Writes `data` at the front of the buffers.
    pub fn write_from(&self, mem: &GuestMemoryMmap, data: &[u8]) -> Option<()> {
        let mut done = 0;
        for &(addr, len) in &self.ranges {
            if done == data.len() {
                break;
            }
            let n = len.min(data.len() - done);
            mem.write_slice(&data[done..done + n], addr).ok()?;
            done += n;
        }
        (done == data.len()).then_some(())
    }

    /// The buffers as host iovecs, for preadv/pwritev straight into or out of guest memory.
    ///
    /// The pointers stay valid while `mem` (and the mapping it keeps alive) lives; the guest may
    /// change the bytes concurrently, which the kernel's copy tolerates and no Rust reference
    /// observes. (With dirty-page tracking of device writes, the caller must mark these ranges.)
    pub fn iovecs(&self, mem: &GuestMemoryMmap) -> Option<Vec<libc::iovec>> {
        let mut iovecs = Vec::with_capacity(self.ranges.len());
        for &(addr, len) in &self.ranges {
            for slice in mem.get_slices(addr, len, Permissions::ReadWrite).ok()? {
                let slice = slice.ok()?;
                iovecs.push(libc::iovec {
                    iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                    iov_len: slice.len(),
                });
            }
        }
        Some(iovecs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::guest_memory;

    fn buffers(mem: &GuestMemoryMmap, ranges: &[(u64, usize)]) -> GuestBuffers {
        let mut b = GuestBuffers::default();
        for &(a, l) in ranges {
            b.push(mem, GuestAddress(a), l).unwrap();
        }
        b
    }

    #[test]
    fn splits_across_range_boundaries() {
        let mem = guest_memory();
        let mut b = buffers(&mem, &[(0x1000, 10), (0x2000, 10), (0x3000, 10)]);
        let front = b.split_front(15).unwrap();
        assert_eq!(front, buffers(&mem, &[(0x1000, 10), (0x2000, 5)]));
        let back = b.split_back(12).unwrap();
        assert_eq!(back, buffers(&mem, &[(0x2008, 2), (0x3000, 10)]));
        assert_eq!(b, buffers(&mem, &[(0x2005, 3)]));
        assert!(b.split_front(4).is_none());
        assert!(b.split_back(4).is_none());
    }

    #[test]
    fn reads_and_writes_through_the_ranges() {
        let mem = guest_memory();
        let b = buffers(&mem, &[(0x1000, 3), (0x2000, 5)]);
        b.write_from(&mem, b"abcdefgh").unwrap();
        let mut out = [0u8; 8];
        b.read_into(&mem, &mut out).unwrap();
        assert_eq!(&out, b"abcdefgh");
        assert!(
            b.write_from(&mem, b"123456789").is_none(),
            "more than the buffers hold"
        );
        let iov = b.iovecs(&mem).unwrap();
        assert_eq!(
            iov.iter().map(|v| v.iov_len).collect::<Vec<_>>(),
            vec![3, 5]
        );
    }

    #[test]
    fn refuses_ranges_outside_guest_memory_or_overflowing() {
        let mem = guest_memory();
        let mut b = GuestBuffers::default();
        assert!(b.push(&mem, GuestAddress(0xf_ff00), 0x200).is_none());
        assert!(b.push(&mem, GuestAddress(u64::MAX - 4), 16).is_none());
        assert!(b.push(&mem, GuestAddress(0x1000), 0).is_some());
        assert!(b.is_empty());
    }
}
