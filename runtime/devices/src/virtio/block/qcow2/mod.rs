//! qcow2 images as virtio-blk backends: read, write, backing files, discard and write-zeroes,
//! written here (QEMU's docs/interop/qcow2.txt is the specification) rather than taken from a
//! crate: the maintained Rust crate (qcow2-rs) is async and built around io_uring, while the
//! VMM's block device is a synchronous, single-threaded queue worker under a seccomp filter.
//!
//! What husk writes keeps the image consistent at every point a VMM can be killed (or the host
//! can lose power after a guest flush):
//! - clusters are only ever appended at the end of the file, from a reservation whose
//!   refcounts (and the file length) are made durable before any cluster of it is used, so a
//!   table can never point at a cluster the refcounts call free; an interrupted VMM leaves at
//!   most leaked clusters (`qemu-img check` reports leaks, not corruption; `-r leaks` reclaims
//!   them). A clean close gives the unused reservation back and truncates the file.
//! - data and copy-on-write fills are written before the L2 entry that points at them, and L2
//!   and L1 updates are written back on guest FLUSH (fdatasync, tables, fdatasync), as QEMU's
//!   metadata cache does: the device offers a volatile write cache (VIRTIO_BLK_F_FLUSH), so
//!   writes the guest has not flushed may be lost but never seen half-applied.
//! - a data write never lands on a metadata cluster (header, L1, L2, refcount table or
//!   blocks), whatever a crafted image's tables say: the guest cannot rewrite the header (and
//!   with it the backing file name) through its data.
//!
//! Refused at open, with a reason: encryption, external data files, extended L2 entries,
//! images marked corrupt; for writing also internal snapshots, persistent bitmaps, refcounts
//! other than 16-bit and images left dirty by lazy refcounts. Compressed clusters read as an
//! I/O error (convert with `qemu-img convert -O qcow2`).

mod header;
mod iov;
mod tables;

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

use header::field;
pub use header::{create, has_magic, BackingRef, Header};
use tables::{Entry, Tables};

use super::backend::{transfer_all, Direction, DiskBackend};

/// Why an image cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    #[error("not a qcow2 image (no QFI magic)")]
    NotQcow2,
    #[error("corrupt qcow2 image: {0}")]
    Corrupt(String),
    #[error("unsupported qcow2 image: {0}")]
    Unsupported(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl From<Qcow2Error> for io::Error {
    fn from(e: Qcow2Error) -> Self {
        match e {
            Qcow2Error::Io(e) => e,
            other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
        }
    }
}

/// Summary of an image for `husk image` and the launchers (what the header says).
#[derive(Debug, Clone)]
pub struct Qcow2Info {
    pub virtual_size: u64,
    pub cluster_size: u64,
    pub backing: Option<BackingRef>,
}

/// Reads the header of `file` only.
pub fn info(file: &File) -> Result<Qcow2Info, Qcow2Error> {
    let len = file.metadata()?.len();
    let h = Header::read(file, len)?;
    Ok(Qcow2Info {
        virtual_size: h.size,
        cluster_size: h.cluster_size(),
        backing: h.backing.clone(),
    })
}

/// A qcow2 image over an optional backing disk.
pub struct Qcow2 {
    inner: Mutex<Inner>,
    size: u64,
}

struct Inner {
    file: File,
    tables: Tables,
    backing: Option<Box<dyn DiskBackend>>,
    read_only: bool,
    /// The header's autoclear bits are cleared before the first write (a writer that does not
    /// keep those features in step must say so, per the specification).
    autoclear_cleared: bool,
    /// Closed (see [`DiskBackend::close`]): everything is on disk and nothing more is written.
    closed: bool,
}

impl Qcow2 {
    /// Opens the image in `file` (opened read-write unless `read_only`) over `backing`, which
    /// the caller opened from the chain it resolved and checked (see `husk_host::disk_image`):
    /// the name in the header is never opened here.
    pub fn open(
        file: File,
        read_only: bool,
        backing: Option<Box<dyn DiskBackend>>,
    ) -> Result<Self, Qcow2Error> {
        let len = file.metadata()?.len();
        let header = Header::read(&file, len)?;
        if header.backing.is_some() != backing.is_some() {
            return Err(Qcow2Error::Unsupported(if backing.is_some() {
                "a backing disk was given for an image that names none".into()
            } else {
                format!(
                    "the image needs its backing file {:?}",
                    header
                        .backing
                        .as_ref()
                        .map(|b| b.name.as_str())
                        .unwrap_or("")
                )
            }));
        }
        if !read_only {
            let refuse = |what: &str| Err(Qcow2Error::Unsupported(format!("writing {what}")));
            if header.nb_snapshots != 0 {
                return refuse("an image with internal snapshots (qemu-img snapshot -d)");
            }
            if header.has_bitmaps {
                return refuse("an image with persistent bitmaps (qemu-img bitmap --remove)");
            }
            if header.refcount_order != 4 {
                return refuse(&format!(
                    "{}-bit refcounts (husk writes 16-bit ones: qemu-img amend -o \
                     refcount_bits=16)",
                    1u32 << header.refcount_order
                ));
            }
            if header.incompatible & header::incompat::DIRTY != 0 {
                return refuse("an image left dirty by lazy refcounts (qemu-img check -r all)");
            }
        }
        let size = header.size;
        let tables = Tables::load(&file, &header, len, read_only)?;
        Ok(Self {
            inner: Mutex::new(Inner {
                autoclear_cleared: header.autoclear == 0,
                file,
                tables,
                backing,
                read_only,
                closed: false,
            }),
            size,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the tables half-updated in a way that
        // matters more than the panic itself; go on with them.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Bytes `start..start + len` of a request that lie at `host..host + len` in the file.
#[derive(Default)]
struct HostRun {
    start: u64,
    host: u64,
    len: u64,
}

impl HostRun {
    fn new(start: u64, host: u64, len: u64) -> Self {
        Self { start, host, len }
    }

    /// Takes the next piece if it follows on in the request and in the file.
    fn extend(&mut self, start: u64, host: u64, len: u64) -> bool {
        if self.len == 0 {
            *self = Self::new(start, host, len);
            return true;
        }
        if self.start + self.len == start && self.host + self.len == host {
            self.len += len;
            return true;
        }
        false
    }

    fn read(&self, file: &File, iovecs: &[libc::iovec]) -> io::Result<()> {
        if self.len == 0 {
            return Ok(());
        }
        let mut part = iov::slice(iovecs, self.start as usize, self.len as usize);
        transfer_all(file.as_raw_fd(), &mut part, self.host, Direction::Read)
    }
}

/// One guest range inside one cluster.
struct Span {
    /// Guest offset of the cluster.
    cluster: u64,
    /// Offset inside the cluster.
    within: u64,
    len: u64,
}

fn spans(offset: u64, len: u64, cluster_size: u64) -> impl Iterator<Item = Span> {
    let end = offset + len;
    let mut at = offset;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let cluster = at - at % cluster_size;
        let within = at - cluster;
        let n = (cluster_size - within).min(end - at);
        at += n;
        Some(Span {
            cluster,
            within,
            len: n,
        })
    })
}

impl Inner {
    fn cluster_size(&self) -> u64 {
        self.tables.cluster_size()
    }

    /// Fills `buf` (host memory) with what the guest sees at `offset` when the cluster is not
    /// allocated in this image: the backing disk's bytes, zeros past its end.
    fn read_below(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        buf.fill(0);
        let Some(backing) = &self.backing else {
            return Ok(());
        };
        let size = backing.size();
        if offset >= size {
            return Ok(());
        }
        let n = ((size - offset) as usize).min(buf.len());
        let mut iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: n,
        }];
        backing.read_vectored_at(&mut iov, offset)
    }

    fn read(&mut self, iovecs: &[libc::iovec], offset: u64) -> io::Result<()> {
        let total: u64 = iovecs.iter().map(|v| v.iov_len as u64).sum();
        let mut done = 0u64;
        // Clusters that follow each other in the file too are read with one preadv.
        let mut run = HostRun::default();
        for span in spans(offset, total, self.cluster_size()) {
            let start = done;
            done += span.len;
            let entry = self.tables.lookup(&self.file, span.cluster)?;
            if let Entry::Data { host, .. } = entry {
                if !run.extend(start, host + span.within, span.len) {
                    run.read(&self.file, iovecs)?;
                    run = HostRun::new(start, host + span.within, span.len);
                }
                continue;
            }
            run.read(&self.file, iovecs)?;
            run = HostRun::default();
            let part = iov::slice(iovecs, start as usize, span.len as usize);
            match entry {
                Entry::Data { .. } => {} // taken into the run above
                Entry::Zero { .. } => iov::zero(&part),
                Entry::Unallocated => match &self.backing {
                    None => iov::zero(&part),
                    Some(backing) => {
                        let at = span.cluster + span.within;
                        let size = backing.size();
                        let inside = size.saturating_sub(at).min(span.len) as usize;
                        if inside > 0 {
                            let mut below = iov::slice(&part, 0, inside);
                            backing.read_vectored_at(&mut below, at)?;
                        }
                        if inside < span.len as usize {
                            iov::zero(&iov::slice(&part, inside, span.len as usize - inside));
                        }
                    }
                },
                Entry::Compressed => {
                    return Err(io::Error::new(
                        io::ErrorKind::Unsupported,
                        "a compressed cluster (convert the image with qemu-img convert)",
                    ))
                }
            }
        }
        run.read(&self.file, iovecs)
    }

    fn write(&mut self, iovecs: &[libc::iovec], offset: u64) -> io::Result<()> {
        if self.read_only || self.closed {
            return Err(io::ErrorKind::PermissionDenied.into());
        }
        self.clear_autoclear()?;
        let cs = self.cluster_size();
        let total: u64 = iovecs.iter().map(|v| v.iov_len as u64).sum();
        let mut done = 0u64;
        for span in spans(offset, total, cs) {
            let mut part = iov::slice(iovecs, done as usize, span.len as usize);
            done += span.len;
            let entry = self.tables.lookup(&self.file, span.cluster)?;
            let (host, fill_from_below) = match entry {
                Entry::Data { host, copied: true } => {
                    self.tables.check_data_cluster(host)?;
                    transfer_all(
                        self.file.as_raw_fd(),
                        &mut part,
                        host + span.within,
                        Direction::Write,
                    )?;
                    continue;
                }
                Entry::Data { copied: false, .. } => {
                    return Err(io::Error::new(
                        io::ErrorKind::Unsupported,
                        "a cluster shared with an internal snapshot",
                    ))
                }
                Entry::Compressed => {
                    return Err(io::Error::new(
                        io::ErrorKind::Unsupported,
                        "a compressed cluster",
                    ))
                }
                // A zero cluster with its space kept: rewritten in place over zeros.
                Entry::Zero { host: Some(host) } => (host, false),
                Entry::Zero { host: None } => (self.tables.allocate(&self.file)?, false),
                Entry::Unallocated => (self.tables.allocate(&self.file)?, true),
            };
            self.tables.check_data_cluster(host)?;
            // Whatever part of the cluster the guest does not write keeps what it read before:
            // the backing disk's bytes (copy-on-write) or zeros.
            if span.within > 0 || span.len < cs {
                let mut below = vec![0u8; cs as usize];
                if fill_from_below {
                    self.read_below(span.cluster, &mut below)?;
                }
                let head = &below[..span.within as usize];
                let tail = &below[(span.within + span.len) as usize..];
                self.file.write_all_at(head, host)?;
                self.file
                    .write_all_at(tail, host + span.within + span.len)?;
            }
            transfer_all(
                self.file.as_raw_fd(),
                &mut part,
                host + span.within,
                Direction::Write,
            )?;
            self.tables
                .set_entry(&self.file, span.cluster, Entry::Data { host, copied: true })?;
        }
        Ok(())
    }

    /// Whole clusters of `offset..offset+len` read as zeros from now on; with `unmap` their
    /// host space is given back to the file system (the cluster stays allocated in the image,
    /// so no refcount changes: qemu-img check stays clean). Parts of clusters at either end are
    /// written as zeros when `partial_zeroes`, else left (discard is a hint).
    fn zero_range(
        &mut self,
        offset: u64,
        len: u64,
        unmap: bool,
        partial_zeroes: bool,
    ) -> io::Result<()> {
        if self.read_only || self.closed {
            return Err(io::ErrorKind::PermissionDenied.into());
        }
        if self.tables.version() < 3 {
            // Version 2 has no zero flag: zeros must be written (or the hint ignored).
            if !partial_zeroes {
                return Err(io::ErrorKind::Unsupported.into());
            }
            return self.write_zero_bytes(offset, len);
        }
        self.clear_autoclear()?;
        let cs = self.cluster_size();
        for span in spans(offset, len, cs) {
            if span.len < cs {
                if partial_zeroes {
                    self.write_zero_bytes(span.cluster + span.within, span.len)?;
                }
                continue;
            }
            let entry = self.tables.lookup(&self.file, span.cluster)?;
            let new = match entry {
                Entry::Data { host, copied: true } => {
                    self.tables.check_data_cluster(host)?;
                    if unmap {
                        punch_hole(&self.file, host, cs);
                    }
                    Entry::Zero { host: Some(host) }
                }
                Entry::Zero { .. } => continue,
                Entry::Unallocated => Entry::Zero { host: None },
                Entry::Data { copied: false, .. } | Entry::Compressed => {
                    if partial_zeroes {
                        self.write_zero_bytes(span.cluster, cs)?;
                    }
                    continue;
                }
            };
            self.tables.set_entry(&self.file, span.cluster, new)?;
        }
        Ok(())
    }

    /// Tables written back, the unused reservation returned: the file alone is a clean image
    /// (`qemu-img check` finds no leak). The next allocation reserves anew.
    fn quiesce(&mut self) -> io::Result<()> {
        if self.read_only || self.closed {
            return Ok(());
        }
        self.flush()?;
        self.tables.release_reservation(&self.file)?;
        self.file.sync_data()
    }

    /// As [`Self::quiesce`]; later writes are refused.
    fn close(&mut self) -> io::Result<()> {
        self.quiesce()?;
        self.closed = true;
        Ok(())
    }

    fn write_zero_bytes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let zeros = vec![0u8; self.cluster_size().min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            let iov = [libc::iovec {
                iov_base: zeros.as_ptr() as *mut libc::c_void,
                iov_len: n,
            }];
            self.write(&iov, offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    fn clear_autoclear(&mut self) -> io::Result<()> {
        if self.autoclear_cleared {
            return Ok(());
        }
        self.file
            .write_all_at(&0u64.to_be_bytes(), field::AUTOCLEAR)?;
        self.file.sync_data()?;
        self.autoclear_cleared = true;
        Ok(())
    }

    /// Data first, then the tables that point at it, then those tables made durable.
    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()?;
        if self.tables.write_back(&self.file)? {
            self.file.sync_data()?;
        }
        Ok(())
    }
}

fn punch_hole(file: &File, offset: u64, len: u64) {
    use rustix::fs::FallocateFlags;
    // A hint: a file system that cannot punch keeps the bytes, which read as zeros anyway
    // because the entry says zero.
    let _ = rustix::fs::fallocate(
        file,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        offset,
        len,
    );
}

impl DiskBackend for Qcow2 {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_vectored_at(&self, iovecs: &mut [libc::iovec], offset: u64) -> io::Result<()> {
        self.lock().read(iovecs, offset)
    }
    fn write_vectored_at(&self, iovecs: &mut [libc::iovec], offset: u64) -> io::Result<()> {
        self.lock().write(iovecs, offset)
    }
    fn flush(&self) -> io::Result<()> {
        let mut inner = self.lock();
        if inner.read_only {
            return Ok(());
        }
        inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.lock().zero_range(offset, len, true, false)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.lock().zero_range(offset, len, unmap, true)
    }
    fn quiesce(&self) -> io::Result<()> {
        self.lock().quiesce()
    }
    fn close(&self) -> io::Result<()> {
        self.lock().close()
    }
}

impl Drop for Qcow2 {
    /// A clean close when nobody closed it (tests, set-up failures).
    fn drop(&mut self) {
        let inner = self.inner.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = inner.close() {
            log::warn!("qcow2: closing the image: {e} (qemu-img check -r leaks repairs leaks)");
        }
    }
}

#[cfg(test)]
mod tests;
