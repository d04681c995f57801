//! Where a virtio-blk disk's bytes live: the backend trait, and raw image files (qcow2 images
//! are in `qcow2`).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use rustix::fs::{FallocateFlags, FlockOperation};

/// Storage behind a block device. Offsets and lengths are in bytes and already range-checked.
pub trait DiskBackend: Send {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Fills the buffers `iovecs` point to from `offset` on (preadv).
    fn read_vectored_at(&self, iovecs: &mut [libc::iovec], offset: u64) -> io::Result<()>;
    /// Writes what `iovecs` point to at `offset` (pwritev).
    fn write_vectored_at(&self, iovecs: &mut [libc::iovec], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable (fsync).
    fn flush(&self) -> io::Result<()>;
    /// Deallocates a range; reads of it return zeros. `Unsupported` when the file cannot.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Zeroes a range, deallocating it when `unmap` allows and the file can.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()>;
    /// Makes the file a complete, self-contained image as it stands (for a copy taken while
    /// the VM is paused, e.g. beside a snapshot): a flush, and for formats with an allocator,
    /// what it reserved given back. Writes may follow.
    fn quiesce(&self) -> io::Result<()> {
        self.flush()
    }
    /// The last call before the backend is dropped: a flush, and for formats with an
    /// allocator, the release of what it reserved. Nothing may be written after it.
    fn close(&self) -> io::Result<()> {
        self.flush()
    }
}

/// Opens `path` (or the inherited fd it names) for the guest. A writable image takes an
/// exclusive lock and a read-only one a shared lock, so two VMs never write one image at the
/// same time, and nobody writes a base image while overlays read it.
pub fn open_locked(path: &Path, read_only: bool) -> io::Result<File> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true).write(!read_only);
    let file = crate::host_files::open(path, &options, !read_only)?;
    let lock = if read_only {
        FlockOperation::NonBlockingLockShared
    } else {
        FlockOperation::NonBlockingLockExclusive
    };
    if let Err(e) = rustix::fs::flock(&file, lock) {
        let e = io::Error::from(e);
        return Err(io::Error::new(
            e.kind(),
            format!("image is in use by another VM ({e})"),
        ));
    }
    Ok(file)
}

/// A raw disk image file.
pub struct RawFile {
    file: File,
    size: u64,
}

impl RawFile {
    /// Opens `path` for the guest (see [`open_locked`]).
    pub fn open(path: &Path, read_only: bool) -> io::Result<Self> {
        Self::from_file(open_locked(path, read_only)?)
    }

    /// A raw disk on an open (and locked, see [`open_locked`]) file.
    pub fn from_file(file: File) -> io::Result<Self> {
        let size = file.metadata()?.len();
        Ok(Self { file, size })
    }

    fn fallocate(&self, mode: FallocateFlags, offset: u64, len: u64) -> io::Result<()> {
        // The kernel takes signed offsets (off_t).
        if i64::try_from(offset).is_err() || i64::try_from(len).is_err() {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        match rustix::fs::fallocate(&self.file, mode, offset, len) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::OPNOTSUPP) => Err(io::ErrorKind::Unsupported.into()),
            Err(e) => Err(e.into()),
        }
    }
}

/// Which of preadv / pwritev.
#[derive(Clone, Copy)]
pub(super) enum Direction {
    Read,
    Write,
}

/// preadv/pwritev until every iovec is done, resuming after short transfers.
pub(super) fn transfer_all(
    fd: i32,
    iovecs: &mut [libc::iovec],
    mut offset: u64,
    dir: Direction,
) -> io::Result<()> {
    let mut first = 0;
    while first < iovecs.len() {
        let rest = &iovecs[first..];
        let count = rest.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: every iovec points into a live mapping (guest memory, see
        // GuestBuffers::iovecs) of at least iov_len bytes; the kernel only copies bytes.
        let n = unsafe {
            match dir {
                Direction::Read => libc::preadv(fd, rest.as_ptr(), count, off),
                Direction::Write => libc::pwritev(fd, rest.as_ptr(), count, off),
            }
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        offset += n as u64;
        let mut n = n as usize;
        while n > 0 {
            let iov = &mut iovecs[first];
            if n >= iov.iov_len {
                n -= iov.iov_len;
                first += 1;
            } else {
                // SAFETY: n < iov_len, so the advanced pointer stays inside the same buffer.
                iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(n) }.cast();
                iov.iov_len -= n;
                n = 0;
            }
        }
        while first < iovecs.len() && iovecs[first].iov_len == 0 {
            first += 1;
        }
    }
    Ok(())
}

impl DiskBackend for RawFile {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_vectored_at(&self, iovecs: &mut [libc::iovec], offset: u64) -> io::Result<()> {
        transfer_all(self.file.as_raw_fd(), iovecs, offset, Direction::Read)
    }
    fn write_vectored_at(&self, iovecs: &mut [libc::iovec], offset: u64) -> io::Result<()> {
        transfer_all(self.file.as_raw_fd(), iovecs, offset, Direction::Write)
    }
    fn flush(&self) -> io::Result<()> {
        self.file.sync_all()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate(
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        )
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let mode = if unmap {
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE
        } else {
            FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE
        };
        match self.fallocate(mode, offset, len) {
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                // The file system cannot: write the zeros.
                let zeros = vec![0u8; 64 * 1024];
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(zeros.len() as u64) as usize;
                    self.file.write_all_at(&zeros[..n], offset + done)?;
                    done += n as u64;
                }
                Ok(())
            }
            other => other,
        }
    }
}
