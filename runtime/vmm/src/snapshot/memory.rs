//! The guest memory file: written sparse (all-zero pages become holes, so a 4 GiB guest that
//! touched 200 MiB writes about 200 MiB), and mapped back MAP_PRIVATE on restore, so restore
//! costs the same for any guest size: pages are read from the file (page cache) on first touch
//! and copied only when the guest writes them. Clones of one snapshot share the file and its
//! page cache.
//!
//! Layout: one 4 KiB header page, then every RAM region in guest-physical order at the offset
//! the state file records. Header: magic `HUSKMEM1`, format version (u32 LE), 4 reserved bytes,
//! the 16-byte snapshot id (also in the state file, so a state file is never paired with another
//! snapshot's memory), total RAM bytes (u64 LE). The page data carries no checksum: checking it
//! would read the whole file and defeat lazy restore; the size, header and id are checked.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vm_memory::mmap::MmapRegion;
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

use super::file::tmp_path;
use super::state::{MemoryRegionState, MemoryState};

/// Memory file magic.
pub const MEM_MAGIC: [u8; 8] = *b"HUSKMEM1";
/// Memory file format version.
pub const MEM_VERSION: u32 = 1;
/// Size of the header page (RAM starts here, page aligned for mmap).
pub const HEADER_SIZE: u64 = 4096;
pub(crate) const PAGE: usize = 4096;
/// Pages are examined and written in runs of up to this many bytes.
const CHUNK: usize = 1 << 20;

/// Errors writing or mapping a memory file.
#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    /// Reading or writing failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A diff's base memory file cannot be opened (moved or removed since the full snapshot).
    #[error("cannot open the base memory file {path}")]
    BaseUnavailable {
        /// The base file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Not a husk memory file, or another version.
    #[error("{0} is not a husk memory file of version {MEM_VERSION}")]
    BadHeader(PathBuf),
    /// Belongs to another snapshot.
    #[error("{0} belongs to another snapshot than the state file (snapshot ids differ)")]
    WrongSnapshot(PathBuf),
    /// Shorter or longer than the state says.
    #[error("{path} is {actual} bytes, the snapshot needs {expected}: truncated or foreign")]
    Length {
        /// The file.
        path: PathBuf,
        /// Its size.
        actual: u64,
        /// The size the state implies.
        expected: u64,
    },
    /// The regions in the state do not fit together.
    #[error("the snapshot's memory map is invalid: {0}")]
    Layout(String),
    /// mmap failed.
    #[error("cannot map {path}")]
    Map {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// Guest memory has a region vm-memory cannot describe.
    #[error("cannot assemble guest memory from the snapshot")]
    Assemble,
}

/// A fresh random snapshot id.
pub fn new_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    let n = rustix::rand::getrandom(&mut id, rustix::rand::GetRandomFlags::empty());
    if n.ok() != Some(id.len()) {
        // Not cryptographic, only distinct: time and pid are enough to tell snapshots apart.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        id[..12].copy_from_slice(&t.to_le_bytes()[..12]);
        id[12..].copy_from_slice(&std::process::id().to_le_bytes());
    }
    id
}

/// Header byte 12: what the file holds.
pub const KIND_FULL: u8 = 0;
/// A diff: only the pages that differ from a full file (see [`super::diff`]).
pub const KIND_DIFF: u8 = 1;

pub(crate) fn header(id: &[u8; 16], total: u64, kind: u8) -> [u8; HEADER_SIZE as usize] {
    let mut h = [0u8; HEADER_SIZE as usize];
    h[..8].copy_from_slice(&MEM_MAGIC);
    h[8..12].copy_from_slice(&MEM_VERSION.to_le_bytes());
    h[12] = kind;
    h[16..32].copy_from_slice(id);
    h[32..40].copy_from_slice(&total.to_le_bytes());
    h
}

fn is_zero(bytes: &[u8]) -> bool {
    // Compared as u64 words: the compiler vectorises this, so scanning is memory-bandwidth bound.
    let (head, words, tail) = {
        // SAFETY: any byte pattern is a valid u64; align_to only reinterprets the aligned middle.
        unsafe { bytes.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Fills `present` with, for each page of `data` (anonymous memory), whether it was ever
/// touched (present or swapped; pagemap bits 63 and 62).
fn touched_pages(pagemap: &File, data: &[u8], present: &mut Vec<bool>) -> io::Result<()> {
    let pages = data.len().div_ceil(PAGE);
    let mut raw = vec![0u8; pages * 8];
    pagemap.read_exact_at(&mut raw, (data.as_ptr() as usize / PAGE) as u64 * 8)?;
    present.clear();
    present.extend(raw.chunks_exact(8).map(|e| {
        let mut b = [0u8; 8];
        b.copy_from_slice(e);
        u64::from_le_bytes(b) & (3 << 62) != 0
    }));
    Ok(())
}

/// Writes the pages of `data` that `keep(index, page)` selects at `offset` in `file`, in runs;
/// returns the bytes written.
pub(crate) fn write_pages(
    file: &File,
    data: &[u8],
    offset: u64,
    mut keep: impl FnMut(usize, &[u8]) -> bool,
) -> io::Result<u64> {
    let mut written = 0;
    let mut run: Option<usize> = None;
    let pages = data.len().div_ceil(PAGE);
    for page in 0..=pages {
        let start = page * PAGE;
        let nonzero = page < pages && keep(page, &data[start..(start + PAGE).min(data.len())]);
        match (run, nonzero) {
            (None, true) => run = Some(start),
            (Some(from), false) => {
                file.write_all_at(&data[from..start.min(data.len())], offset + from as u64)?;
                written += (start.min(data.len()) - from) as u64;
                run = None;
            }
            (Some(from), true) if start - from >= CHUNK => {
                file.write_all_at(&data[from..start], offset + from as u64)?;
                written += (start - from) as u64;
                run = Some(start);
            }
            _ => {}
        }
    }
    Ok(written)
}

/// Wraps an I/O error on `path` with what was being done.
pub(crate) fn io_err<'p>(
    op: &'static str,
    path: &'p Path,
) -> impl FnOnce(io::Error) -> MemoryFileError + 'p {
    move |source| MemoryFileError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Creates (or truncates) `tmp` at its full size, holes only, with the header of a memory
/// file of `kind` for `total` bytes of guest RAM: the holes are the zero pages.
pub(crate) fn create_memory_file(
    tmp: &Path,
    id: &[u8; 16],
    total: u64,
    kind: u8,
) -> Result<File, MemoryFileError> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(tmp)
        .map_err(io_err("cannot create", tmp))?;
    file.set_len(HEADER_SIZE + total)
        .map_err(io_err("cannot size", tmp))?;
    file.write_all_at(&header(id, total, kind), 0)
        .map_err(io_err("cannot write", tmp))?;
    Ok(file)
}

/// Writes guest memory to `path` (through `PATH.tmp` + fsync + rename). `progress` is called
/// with (bytes examined, total bytes). The caller guarantees nothing writes guest memory
/// meanwhile (the VM is paused).
pub fn write_memory_file(
    path: &Path,
    mem: &GuestMemoryMmap,
    id: &[u8; 16],
    progress: &mut dyn FnMut(u64, u64),
) -> Result<MemoryState, MemoryFileError> {
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    let tmp = tmp_path(path);
    let result = (|| {
        let file = create_memory_file(&tmp, id, total, KIND_FULL)?;
        let mut regions = Vec::new();
        let (mut offset, mut written, mut done) = (HEADER_SIZE, 0u64, 0u64);
        // Anonymous RAM that was never touched is zero: pagemap says so without faulting it in,
        // so a large guest that touched little is written in time proportional to what it
        // touched. (File-backed RAM of a restored VM is scanned: its absent pages are file data.)
        let pagemap = File::open("/proc/self/pagemap").ok();
        let mut present = Vec::new();
        for region in mem.iter() {
            let start = region.start_addr();
            let len = region.len() as usize;
            let host = mem
                .get_host_address(start)
                .map_err(|_| MemoryFileError::Assemble)?;
            let anonymous = region.file_offset().is_none();
            for chunk_start in (0..len).step_by(CHUNK * 16) {
                let chunk_len = (CHUNK * 16).min(len - chunk_start);
                // SAFETY: `host` maps `len` bytes of this region for as long as `mem` lives; the
                // VM is paused, so neither a vCPU nor a device writes these bytes while they are
                // read (the caller's guarantee).
                let data = unsafe { std::slice::from_raw_parts(host.add(chunk_start), chunk_len) };
                let known = match (&pagemap, anonymous) {
                    (Some(pm), true) => touched_pages(pm, data, &mut present).is_ok(),
                    _ => false,
                };
                written += write_pages(&file, data, offset + chunk_start as u64, |i, page| {
                    (!known || present[i]) && !is_zero(page)
                })
                .map_err(io_err("cannot write", &tmp))?;
                done += chunk_len as u64;
                progress(done, total);
            }
            regions.push(MemoryRegionState {
                guest_addr: start.raw_value(),
                len: len as u64,
                file_offset: offset,
            });
            offset += len as u64;
        }
        file.sync_all().map_err(io_err("cannot sync", &tmp))?;
        fs::rename(&tmp, path).map_err(io_err("cannot rename into place", path))?;
        Ok(MemoryState {
            id: id.to_vec(),
            regions,
            bytes_written: written,
            ..Default::default()
        })
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Checks `path` against `state` (header, id, exact size) and maps it MAP_PRIVATE as guest
/// memory: nothing is read now, every page comes from the file when the guest first touches it,
/// and guest writes never reach the file.
pub fn map_memory_file(
    path: &Path,
    state: &MemoryState,
) -> Result<GuestMemoryMmap, MemoryFileError> {
    let io = |op| {
        move |source| MemoryFileError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    };
    let mut expected = HEADER_SIZE;
    for r in &state.regions {
        let aligned = r.len % PAGE as u64 == 0 && r.guest_addr % PAGE as u64 == 0;
        if !aligned || r.len == 0 || r.file_offset != expected {
            return Err(MemoryFileError::Layout(format!(
                "region {:#x}+{:#x} at file offset {:#x}",
                r.guest_addr, r.len, r.file_offset
            )));
        }
        expected = expected
            .checked_add(r.len)
            .ok_or_else(|| MemoryFileError::Layout("regions overflow".into()))?;
    }
    let mut file = super::file::open_input(path).map_err(io("cannot open"))?;
    let mut h = [0u8; 40];
    file.read_exact(&mut h).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            MemoryFileError::BadHeader(path.to_path_buf())
        } else {
            io("cannot read")(e)
        }
    })?;
    if h[..8] != MEM_MAGIC || h[8..12] != MEM_VERSION.to_le_bytes() || h[12] != KIND_FULL {
        return Err(MemoryFileError::BadHeader(path.to_path_buf()));
    }
    if h[16..32] != state.id[..] {
        return Err(MemoryFileError::WrongSnapshot(path.to_path_buf()));
    }
    let total = expected - HEADER_SIZE;
    if h[32..40] != total.to_le_bytes() {
        return Err(MemoryFileError::WrongSnapshot(path.to_path_buf()));
    }
    let actual = file.metadata().map_err(io("cannot stat"))?.len();
    if actual != expected {
        return Err(MemoryFileError::Length {
            path: path.to_path_buf(),
            actual,
            expected,
        });
    }
    let mut regions = Vec::with_capacity(state.regions.len());
    for r in &state.regions {
        let f = file.try_clone().map_err(io("cannot duplicate the fd of"))?;
        let mapping = MmapRegion::build(
            Some(FileOffset::new(f, r.file_offset)),
            r.len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|source| MemoryFileError::Map {
            path: path.to_path_buf(),
            source,
        })?;
        regions.push(
            GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr))
                .ok_or(MemoryFileError::Assemble)?,
        );
    }
    GuestMemoryMmap::from_regions(regions).map_err(|_| MemoryFileError::Assemble)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::ScratchDir;
    use std::os::unix::fs::MetadataExt;
    use vm_memory::Bytes;

    fn guest(mib: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), mib << 20),
            (GuestAddress(0x1_0000_0000), 1 << 20),
        ])
        .unwrap()
    }

    #[test]
    fn only_touched_pages_are_written_and_read_back_privately() {
        let dir = ScratchDir::new("memfile");
        let path = dir.path().join("mem");
        let mem = guest(64);
        mem.write_obj(0x1122_3344_u32, GuestAddress(0x1000))
            .unwrap();
        mem.write_slice(&[7u8; 3 * PAGE], GuestAddress(0x20_0ff0))
            .unwrap();
        mem.write_obj(0x55_u8, GuestAddress(0x1_0000_0fff)).unwrap();
        let id = new_id();
        let mut calls = 0;
        let state = write_memory_file(&path, &mem, &id, &mut |_, _| calls += 1).unwrap();
        assert!(calls > 0);
        // Page 1, pages 0x200..=0x203 (the run straddles 4 pages), and one page of region 2.
        assert_eq!(state.bytes_written, 6 * PAGE as u64);
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), HEADER_SIZE + (65 << 20));
        assert!(meta.blocks() * 512 < 1 << 20, "file is not sparse");

        let restored = map_memory_file(&path, &state).unwrap();
        let v: u32 = restored.read_obj(GuestAddress(0x1000)).unwrap();
        assert_eq!(v, 0x1122_3344);
        let mut buf = [0u8; 3 * PAGE];
        restored
            .read_slice(&mut buf, GuestAddress(0x20_0ff0))
            .unwrap();
        assert!(buf.iter().all(|&b| b == 7));
        assert_eq!(
            restored
                .read_obj::<u8>(GuestAddress(0x1_0000_0fff))
                .unwrap(),
            0x55
        );
        // Private: writes stay in this mapping, the file (and other clones) never see them.
        restored
            .write_obj(0xffff_ffff_u32, GuestAddress(0x1000))
            .unwrap();
        let again = map_memory_file(&path, &state).unwrap();
        assert_eq!(
            again.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0x1122_3344
        );
    }

    #[test]
    fn foreign_truncated_and_mismatched_files_are_refused() {
        let dir = ScratchDir::new("memfile-bad");
        let path = dir.path().join("mem");
        let state = write_memory_file(&path, &guest(4), &new_id(), &mut |_, _| {}).unwrap();

        let mut other = state.clone();
        other.id = new_id().to_vec();
        assert!(matches!(
            map_memory_file(&path, &other),
            Err(MemoryFileError::WrongSnapshot(_))
        ));

        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(HEADER_SIZE + (4 << 20)).unwrap();
        assert!(matches!(
            map_memory_file(&path, &state),
            Err(MemoryFileError::Length { .. })
        ));
        f.write_all_at(b"NOTMEM!!", 0).unwrap();
        assert!(matches!(
            map_memory_file(&path, &state),
            Err(MemoryFileError::BadHeader(_))
        ));
        fs::write(&path, b"tiny").unwrap();
        assert!(matches!(
            map_memory_file(&path, &state),
            Err(MemoryFileError::BadHeader(_))
        ));
        let mut bad = state.clone();
        bad.regions[0].file_offset += 1;
        assert!(matches!(
            map_memory_file(&path, &bad),
            Err(MemoryFileError::Layout(_))
        ));
    }
}
