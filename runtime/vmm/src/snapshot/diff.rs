//! Diff snapshots: a memory file with only the pages that differ from one full memory file (the
//! *base*), and restore that maps the base copy-on-write and lays the diff's pages over it.
//!
//! Which pages differ, without dirty tracking inside the VMM's device code (devices write guest
//! memory through vm-memory, which KVM's dirty log does not see):
//! - a VM restored from the base has its RAM mapped MAP_PRIVATE from the base file, so every
//!   page written since (by a vCPU, by KVM, by a device) has become a private anonymous copy:
//!   /proc/self/pagemap tells them apart from untouched file pages (bit 61 "file page" clear
//!   while present, or bit 62 "swapped"). Exact, and costs 8 bytes of pagemap per page;
//! - a VM whose base is a full snapshot it wrote itself (its RAM is anonymous) is compared with
//!   the base file page by page: exact, at the cost of reading both.
//!
//! Diffs do not chain: each holds every page that differs from its base, so a restore reads at
//! most the base and one diff. The page bitmap lives in the state file; the diff file has the
//! full-file layout (header kind [`KIND_DIFF`]) with only the changed pages filled in.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::file::tmp_path;
use super::memory::{
    create_memory_file, io_err, write_pages, MemoryFileError, HEADER_SIZE, KIND_DIFF, KIND_FULL,
    MEM_MAGIC, MEM_VERSION, PAGE,
};
use super::state::{MemoryRegionState, MemoryState};

/// The full memory file a diff is taken against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseRef {
    /// Absolute path: the name a diff records (and a restore of the diff opens).
    pub path: PathBuf,
    /// The file itself, already open, when the VMM cannot open `path` (a jailed VMM restored
    /// from fds): diffs read the base through it.
    pub handle: Option<BaseHandle>,
    /// Its snapshot id.
    pub id: Vec<u8>,
    /// Guest RAM is a MAP_PRIVATE mapping of this file (a restored VM): pagemap finds changes.
    pub mapped: bool,
}

/// An open base memory file, shared by the restored VM's later diffs.
#[derive(Clone, Debug)]
pub struct BaseHandle(std::sync::Arc<File>);

impl BaseHandle {
    pub fn new(file: File) -> Self {
        Self(std::sync::Arc::new(file))
    }

    /// The open file (read it with preads only: the fd is shared).
    fn file(&self) -> &File {
        &self.0
    }
}

impl PartialEq for BaseHandle {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for BaseHandle {}

/// Checks the header of `file` at `path`: magic, version, `kind`, `id` and RAM size `total`.
fn check_header(
    file: &File,
    path: &Path,
    kind: u8,
    id: &[u8],
    total: u64,
) -> Result<(), MemoryFileError> {
    // pread, not read: a shared base file's offset is never moved.
    let mut h = [0u8; 40];
    file.read_exact_at(&mut h, 0)
        .map_err(|_| MemoryFileError::BadHeader(path.to_path_buf()))?;
    if h[..8] != MEM_MAGIC || h[8..12] != MEM_VERSION.to_le_bytes() || h[12] != kind {
        return Err(MemoryFileError::BadHeader(path.to_path_buf()));
    }
    if h[16..32] != *id || h[32..40] != total.to_le_bytes() {
        return Err(MemoryFileError::WrongSnapshot(path.to_path_buf()));
    }
    Ok(())
}

/// Marks in `changed` (bit per page from `first`) the pages of the `len` bytes at `host` that
/// are private copies rather than pages of the mapped file.
fn changed_by_pagemap(
    pagemap: &File,
    host: *const u8,
    len: usize,
    first: usize,
    changed: &mut [u8],
) -> io::Result<()> {
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    const FILE_PAGE: u64 = 1 << 61;
    let pages = len / PAGE;
    let start = (host as usize / PAGE) as u64 * 8;
    let mut buf = vec![0u8; 8 * 4096];
    let mut done = 0;
    while done < pages {
        let n = (pages - done).min(4096);
        pagemap.read_exact_at(&mut buf[..n * 8], start + done as u64 * 8)?;
        for (i, entry) in buf[..n * 8].chunks_exact(8).enumerate() {
            let mut e = [0u8; 8];
            e.copy_from_slice(entry);
            let e = u64::from_le_bytes(e);
            if (e & PRESENT != 0 && e & FILE_PAGE == 0) || e & SWAPPED != 0 {
                let page = first + done + i;
                changed[page / 8] |= 1 << (page % 8);
            }
        }
        done += n;
    }
    Ok(())
}

/// Writes a diff of guest memory against `base` to `path` (through `PATH.tmp` + fsync + rename).
/// The VM must be paused (nothing writes guest memory meanwhile).
pub fn write_diff_file(
    path: &Path,
    mem: &GuestMemoryMmap,
    id: &[u8; 16],
    base: &BaseRef,
) -> Result<MemoryState, MemoryFileError> {
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    let pages = (total / PAGE as u64) as usize;
    // The restored VM's own open base when it has one (no dup: the vmm-api thread's seccomp
    // list has no fcntl(F_DUPFD); reads are preads), else the file at its path.
    let opened;
    let base_file = match &base.handle {
        Some(handle) => handle.file(),
        None => {
            opened = File::open(&base.path).map_err(|source| MemoryFileError::BaseUnavailable {
                path: base.path.clone(),
                source,
            })?;
            &opened
        }
    };
    check_header(base_file, &base.path, KIND_FULL, &base.id, total)?;
    // Without /proc (a jail may lack it) a mapped base is compared page by page instead: the
    // same result, at the cost of reading both.
    let pagemap = if base.mapped {
        File::open("/proc/self/pagemap").ok()
    } else {
        None
    };
    let tmp = tmp_path(path);
    let result = (|| {
        let file = create_memory_file(&tmp, id, total, KIND_DIFF)?;
        let mut changed = vec![0u8; pages.div_ceil(8)];
        let (mut regions, mut offset, mut first, mut written) =
            (Vec::new(), HEADER_SIZE, 0usize, 0u64);
        let mut base_page = vec![0u8; PAGE];
        for region in mem.iter() {
            let start = region.start_addr();
            let len = region.len() as usize;
            let host = mem
                .get_host_address(start)
                .map_err(|_| MemoryFileError::Assemble)?;
            // SAFETY: `host` maps `len` bytes of this region while `mem` lives; the VM is paused,
            // so nothing writes them while they are read (the caller's guarantee).
            let data = unsafe { std::slice::from_raw_parts(host.cast_const(), len) };
            if let Some(pagemap) = &pagemap {
                changed_by_pagemap(pagemap, data.as_ptr(), len, first, &mut changed)
                    .map_err(io_err("cannot read", Path::new("/proc/self/pagemap")))?;
            }
            let region_offset = offset;
            let mut failed = None;
            written += write_pages(&file, data, region_offset, |i, page| {
                let bit = first + i;
                if pagemap.is_none() {
                    let at = region_offset + (i * PAGE) as u64;
                    if let Err(e) = base_file.read_exact_at(&mut base_page[..page.len()], at) {
                        failed = Some(e);
                        return false;
                    }
                    if base_page[..page.len()] != *page {
                        changed[bit / 8] |= 1 << (bit % 8);
                    }
                }
                changed[bit / 8] & (1 << (bit % 8)) != 0
            })
            .map_err(io_err("cannot write", &tmp))?;
            if let Some(e) = failed {
                return Err(io_err("cannot read", &base.path)(e));
            }
            regions.push(MemoryRegionState {
                guest_addr: start.raw_value(),
                len: len as u64,
                file_offset: offset,
            });
            offset += len as u64;
            first += len / PAGE;
        }
        file.sync_all().map_err(io_err("cannot sync", &tmp))?;
        fs::rename(&tmp, path).map_err(io_err("cannot rename into place", path))?;
        Ok(MemoryState {
            id: id.to_vec(),
            regions,
            bytes_written: written,
            base_path: base.path.display().to_string(),
            base_id: base.id.clone(),
            changed_pages: changed,
        })
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Lays the pages of the diff file at `path` (described by `state`) over `mem`, which maps the
/// diff's base. Reads only the changed pages.
pub fn apply_diff(
    mem: &GuestMemoryMmap,
    path: &Path,
    state: &MemoryState,
) -> Result<(), MemoryFileError> {
    let total: u64 = state.regions.iter().map(|r| r.len).sum();
    let pages = (total / PAGE as u64) as usize;
    if state.changed_pages.len() != pages.div_ceil(8) {
        return Err(MemoryFileError::Layout(format!(
            "the page bitmap has {} bytes for {pages} pages",
            state.changed_pages.len()
        )));
    }
    let file = super::file::open_input(path).map_err(io_err("cannot open", path))?;
    check_header(&file, path, KIND_DIFF, &state.id, total)?;
    let actual = file.metadata().map_err(io_err("cannot stat", path))?.len();
    if actual != HEADER_SIZE + total {
        return Err(MemoryFileError::Length {
            path: path.to_path_buf(),
            actual,
            expected: HEADER_SIZE + total,
        });
    }
    let mut first = 0usize;
    for r in &state.regions {
        let host = mem
            .get_host_address(vm_memory::GuestAddress(r.guest_addr))
            .map_err(|_| MemoryFileError::Assemble)?;
        let n = (r.len / PAGE as u64) as usize;
        let mut page = 0;
        while page < n {
            let set =
                |p: usize| state.changed_pages[(first + p) / 8] & (1 << ((first + p) % 8)) != 0;
            if !set(page) {
                page += 1;
                continue;
            }
            let run_start = page;
            while page < n && set(page) {
                page += 1;
            }
            let bytes = (page - run_start) * PAGE;
            // SAFETY: the run lies inside this region's live mapping (page < n pages of r.len
            // bytes); the VM has not started, so nothing else touches this memory.
            let dest = unsafe { std::slice::from_raw_parts_mut(host.add(run_start * PAGE), bytes) };
            file.read_exact_at(dest, r.file_offset + (run_start * PAGE) as u64)
                .map_err(io_err("cannot read", path))?;
        }
        first += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::memory::{map_memory_file, new_id, write_memory_file};
    use crate::test_utils::ScratchDir;
    use vm_memory::{Bytes, GuestAddress};

    fn guest() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap()
    }

    #[test]
    fn a_diff_holds_the_changed_pages_even_zeroed_ones_and_layers_over_its_base() {
        let dir = ScratchDir::new("diff");
        let (base_path, diff_path) = (dir.path().join("base"), dir.path().join("diff"));
        let mem = guest();
        mem.write_obj(1u64, GuestAddress(0x1000)).unwrap();
        mem.write_obj(2u64, GuestAddress(0x5000)).unwrap();
        let base_state = write_memory_file(&base_path, &mem, &new_id(), &mut |_, _| {}).unwrap();
        let base = BaseRef {
            handle: None,
            path: base_path.clone(),
            id: base_state.id.clone(),
            mapped: false,
        };
        // One page changed, one zeroed, one newly touched.
        mem.write_obj(10u64, GuestAddress(0x1000)).unwrap();
        mem.write_obj(0u64, GuestAddress(0x5000)).unwrap();
        mem.write_obj(3u64, GuestAddress(0x7f_f000)).unwrap();
        let diff = write_diff_file(&diff_path, &mem, &new_id(), &base).unwrap();
        assert_eq!(diff.bytes_written, 3 * PAGE as u64);
        assert_eq!(diff.base_id, base_state.id);

        let restored = map_memory_file(&base_path, &base_state).unwrap();
        apply_diff(&restored, &diff_path, &diff).unwrap();
        for addr in [0x1000u64, 0x5000, 0x7f_f000, 0x9000] {
            assert_eq!(
                restored.read_obj::<u64>(GuestAddress(addr)).unwrap(),
                mem.read_obj::<u64>(GuestAddress(addr)).unwrap(),
                "page {addr:#x}"
            );
        }
        // The base file is unchanged by the layering.
        let again = map_memory_file(&base_path, &base_state).unwrap();
        assert_eq!(again.read_obj::<u64>(GuestAddress(0x1000)).unwrap(), 1);
    }

    #[test]
    fn damaged_or_misused_diffs_are_refused() {
        let dir = ScratchDir::new("diff-bad");
        let (base_path, diff_path) = (dir.path().join("base"), dir.path().join("diff"));
        let mem = guest();
        let base_state = write_memory_file(&base_path, &mem, &new_id(), &mut |_, _| {}).unwrap();
        let base = BaseRef {
            handle: None,
            path: base_path.clone(),
            id: base_state.id.clone(),
            mapped: false,
        };
        let diff = write_diff_file(&diff_path, &mem, &new_id(), &base).unwrap();
        let restored = map_memory_file(&base_path, &base_state).unwrap();

        // A diff is never a full memory file.
        let as_full = MemoryState {
            id: diff.id.clone(),
            regions: diff.regions.clone(),
            ..Default::default()
        };
        assert!(matches!(
            map_memory_file(&diff_path, &as_full),
            Err(MemoryFileError::BadHeader(_))
        ));
        let mut short_bitmap = diff.clone();
        short_bitmap.changed_pages.pop();
        assert!(apply_diff(&restored, &diff_path, &short_bitmap).is_err());
        let mut other = diff.clone();
        other.id = new_id().to_vec();
        assert!(matches!(
            apply_diff(&restored, &diff_path, &other),
            Err(MemoryFileError::WrongSnapshot(_))
        ));
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&diff_path)
            .unwrap();
        f.set_len(HEADER_SIZE).unwrap();
        assert!(matches!(
            apply_diff(&restored, &diff_path, &diff),
            Err(MemoryFileError::Length { .. })
        ));
        // A base that is not the one recorded.
        let wrong_base = BaseRef {
            id: new_id().to_vec(),
            ..base
        };
        assert!(write_diff_file(&dir.path().join("d2"), &mem, &new_id(), &wrong_base).is_err());
    }
}
