//! Byte ranges of an iovec list: a qcow2 request is split at cluster boundaries, and each part
//! goes to a different place (the image, the backing disk, zeros).
//!
//! The iovecs handed to a backend point into guest memory (or, for husk's own zero writes, into
//! a host buffer) that stays mapped for the whole request: the contract of
//! `DiskBackend::read_vectored_at`.

/// The iovecs covering bytes `start..start + len` of the concatenation of `iovecs`; shorter when
/// the list ends first.
pub fn slice(iovecs: &[libc::iovec], start: usize, len: usize) -> Vec<libc::iovec> {
    let mut out = Vec::new();
    let (mut skip, mut want) = (start, len);
    for v in iovecs {
        if want == 0 {
            break;
        }
        if skip >= v.iov_len {
            skip -= v.iov_len;
            continue;
        }
        let n = (v.iov_len - skip).min(want);
        out.push(libc::iovec {
            // Only the address is computed here (wrapping_add, no dereference): it stays inside
            // the buffer because skip < iov_len.
            iov_base: v.iov_base.cast::<u8>().wrapping_add(skip).cast(),
            iov_len: n,
        });
        want -= n;
        skip = 0;
    }
    out
}

/// Fills the buffers with zeros.
pub fn zero(iovecs: &[libc::iovec]) {
    for v in iovecs {
        // SAFETY: by the backend contract each iovec points to iov_len writable bytes of a live
        // mapping that nothing else in this process reads or writes during the request.
        unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iovs(bufs: &mut [Vec<u8>]) -> Vec<libc::iovec> {
        bufs.iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect()
    }

    #[test]
    fn slices_cross_buffer_boundaries() {
        let mut bufs = vec![vec![0u8; 3], vec![0u8; 5], vec![0u8; 2]];
        let all = iovs(&mut bufs);
        let s = slice(&all, 2, 5);
        assert_eq!(s.iter().map(|v| v.iov_len).collect::<Vec<_>>(), vec![1, 4]);
        assert_eq!(s[0].iov_base as usize, all[0].iov_base as usize + 2);
        assert_eq!(s[1].iov_base, all[1].iov_base);
        zero(&s);
        let s = slice(&all, 8, 100);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].iov_len, 2);
        assert!(slice(&all, 10, 4).is_empty());
    }

    #[test]
    fn zero_clears_exactly_the_slice() {
        let mut bufs = vec![vec![7u8; 4], vec![7u8; 4]];
        let all = iovs(&mut bufs);
        zero(&slice(&all, 3, 2));
        assert_eq!(bufs[0], vec![7, 7, 7, 0]);
        assert_eq!(bufs[1], vec![0, 7, 7, 7]);
    }
}
