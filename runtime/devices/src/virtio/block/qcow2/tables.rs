//! The qcow2 tables: L1 (in memory), L2 (a small write-back cache), refcounts (for writing) and
//! the set of metadata clusters a data write must never touch.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;

use super::header::{in_file, Header, OFFSET_MASK};
use super::Qcow2Error;

const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
const ZERO: u64 = 1;
/// Bits of a standard L2 entry that must be zero besides the offset and flags.
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// L2 tables kept in memory (each one cluster; at 64 KiB clusters 2 MiB cover 32 GiB of disk).
const L2_CACHE: usize = 32;
/// Bytes reserved at the end of the file at a time; one fdatasync makes their refcounts durable.
const RESERVE_BYTES: u64 = 8 << 20;

/// What an L2 entry says about one guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// Not in this image: the backing disk's bytes, or zeros.
    Unallocated,
    /// Reads as zeros; `host` is space kept for it, if any.
    Zero {
        host: Option<u64>,
    },
    /// At `host` in the file; `copied`: referenced once (writable in place).
    Data {
        host: u64,
        copied: bool,
    },
    Compressed,
}

struct CachedL2 {
    offset: u64,
    entries: Vec<u64>,
    dirty: bool,
    used: u64,
}

/// Refcounts, loaded only for a writable image (16-bit: enforced at open).
struct Refcounts {
    table_offset: u64,
    table: Vec<u64>,
    blocks: HashMap<usize, Vec<u16>>,
    /// Clusters (indices) reserved and counted, not yet used.
    reserved: Range<u64>,
}

pub struct Tables {
    cluster_bits: u32,
    version: u32,
    l1_offset: u64,
    l1: Vec<u64>,
    l1_dirty: bool,
    l2: Vec<CachedL2>,
    tick: u64,
    /// End of the file in bytes, cluster-aligned: new clusters come from here.
    file_end: u64,
    refs: Option<Refcounts>,
    /// Offsets of the clusters that hold metadata (writable images only).
    metadata: BTreeSet<u64>,
}

fn corrupt(m: String) -> io::Error {
    Qcow2Error::Corrupt(m).into()
}

fn read_be64s(file: &File, offset: u64, count: usize) -> io::Result<Vec<u64>> {
    let mut raw = vec![0u8; count * 8];
    file.read_exact_at(&mut raw, offset)?;
    Ok(raw
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
        .collect())
}

fn be64s(values: &[u64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_be_bytes()).collect()
}

impl Tables {
    pub fn load(
        file: &File,
        header: &Header,
        file_len: u64,
        read_only: bool,
    ) -> Result<Self, Qcow2Error> {
        let cs = header.cluster_size();
        let l1 = read_be64s(file, header.l1_offset, header.l1_size as usize)?;
        let mut tables = Self {
            cluster_bits: header.cluster_bits,
            version: header.version,
            l1_offset: header.l1_offset,
            l1,
            l1_dirty: false,
            l2: Vec::new(),
            tick: 0,
            file_end: file_len.div_ceil(cs) * cs,
            refs: None,
            metadata: BTreeSet::new(),
        };
        if !read_only {
            let rt_len = u64::from(header.refcount_table_clusters) * cs;
            let table = read_be64s(file, header.refcount_table_offset, (rt_len / 8) as usize)?;
            tables.refs = Some(Refcounts {
                table_offset: header.refcount_table_offset,
                table,
                blocks: HashMap::new(),
                reserved: 0..0,
            });
            tables.map_metadata(header, file_len)?;
        }
        Ok(tables)
    }

    /// Records every metadata cluster, checking that no two tables share a cluster and that
    /// none lies on the header, so that neither a table write nor a data write can land on
    /// other metadata.
    fn map_metadata(&mut self, header: &Header, file_len: u64) -> Result<(), Qcow2Error> {
        let cs = header.cluster_size();
        let add_range = |set: &mut BTreeSet<u64>, what: &str, off: u64, len: u64| {
            in_file(what, off, len, cs, file_len)?;
            for c in (off..off + len).step_by(cs as usize) {
                if !set.insert(c) {
                    return Err(Qcow2Error::Corrupt(format!(
                        "the {what} at {off:#x} overlaps other metadata"
                    )));
                }
            }
            Ok(())
        };
        let mut set = BTreeSet::new();
        set.insert(0);
        add_range(
            &mut set,
            "L1 table",
            header.l1_offset,
            self.l1.len() as u64 * 8,
        )?;
        add_range(
            &mut set,
            "refcount table",
            header.refcount_table_offset,
            u64::from(header.refcount_table_clusters) * cs,
        )?;
        for e in &self.l1 {
            let off = e & OFFSET_MASK;
            if off != 0 {
                add_range(&mut set, "L2 table", off, cs)?;
            }
        }
        if let Some(refs) = &self.refs {
            for e in &refs.table {
                let off = e & OFFSET_MASK;
                if off != 0 {
                    add_range(&mut set, "refcount block", off, cs)?;
                }
            }
        }
        self.metadata = set;
        Ok(())
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    fn l2_bits(&self) -> u32 {
        self.cluster_bits - 3
    }

    fn indices(&self, guest: u64) -> (usize, usize) {
        let l1 = (guest >> (self.cluster_bits + self.l2_bits())) as usize;
        let l2 = ((guest >> self.cluster_bits) & ((1 << self.l2_bits()) - 1)) as usize;
        (l1, l2)
    }

    /// The cached L2 table at `offset`, read in when missing.
    fn l2_table(&mut self, file: &File, offset: u64) -> io::Result<usize> {
        self.tick += 1;
        if let Some(i) = self.l2.iter().position(|t| t.offset == offset) {
            self.l2[i].used = self.tick;
            return Ok(i);
        }
        let cs = self.cluster_size();
        if offset % cs != 0 || offset == 0 || offset + cs > self.file_end {
            return Err(corrupt(format!(
                "an L2 table offset {offset:#x} is invalid"
            )));
        }
        let entries = read_be64s(file, offset, (cs / 8) as usize)?;
        self.make_room(file)?;
        self.l2.push(CachedL2 {
            offset,
            entries,
            dirty: false,
            used: self.tick,
        });
        Ok(self.l2.len() - 1)
    }

    /// Evicts the least recently used clean table when the cache is full (writing the dirty
    /// ones back first when none is clean).
    fn make_room(&mut self, file: &File) -> io::Result<()> {
        if self.l2.len() >= L2_CACHE {
            if self.l2.iter().all(|t| t.dirty) {
                // The data these tables point at goes first (see the module's ordering).
                file.sync_data()?;
                self.write_back(file)?;
            }
            if let Some((victim, _)) = self
                .l2
                .iter()
                .enumerate()
                .filter(|(_, t)| !t.dirty)
                .min_by_key(|(_, t)| t.used)
            {
                self.l2.swap_remove(victim);
            }
        }
        Ok(())
    }

    /// What the image says about the guest cluster at `guest` (a cluster-aligned offset below
    /// the virtual size).
    pub fn lookup(&mut self, file: &File, guest: u64) -> io::Result<Entry> {
        let (l1i, l2i) = self.indices(guest);
        let l1e = *self
            .l1
            .get(l1i)
            .ok_or_else(|| corrupt("the L1 table does not cover the disk".into()))?;
        let l2_offset = l1e & OFFSET_MASK;
        if l2_offset == 0 {
            return Ok(Entry::Unallocated);
        }
        let t = self.l2_table(file, l2_offset)?;
        let raw = self.l2[t].entries.get(l2i).copied().unwrap_or(0);
        self.decode(raw)
    }

    fn decode(&self, raw: u64) -> io::Result<Entry> {
        if raw & COMPRESSED != 0 {
            return Ok(Entry::Compressed);
        }
        if raw & L2_RESERVED != 0 {
            return Err(corrupt(format!(
                "an L2 entry {raw:#x} has reserved bits set"
            )));
        }
        let host = raw & OFFSET_MASK;
        let cs = self.cluster_size();
        if host % cs != 0 {
            return Err(corrupt(format!(
                "an L2 entry {raw:#x} is not cluster-aligned"
            )));
        }
        if self.version >= 3 && raw & ZERO != 0 {
            return Ok(Entry::Zero {
                host: (host != 0).then_some(host),
            });
        }
        if raw & ZERO != 0 {
            return Err(corrupt(format!(
                "a version 2 L2 entry {raw:#x} has bit 0 set"
            )));
        }
        if host == 0 {
            return Ok(Entry::Unallocated);
        }
        if host + cs > self.file_end {
            return Err(corrupt(format!(
                "a data cluster at {host:#x} lies past the end of the file"
            )));
        }
        Ok(Entry::Data {
            host,
            copied: raw & COPIED != 0,
        })
    }

    /// A data write may go to `host`: a whole cluster inside the file that holds no metadata.
    pub fn check_data_cluster(&self, host: u64) -> io::Result<()> {
        let cs = self.cluster_size();
        if host % cs != 0 || host == 0 || host + cs > self.file_end || self.metadata.contains(&host)
        {
            return Err(corrupt(format!(
                "a data cluster at {host:#x} overlaps metadata or lies outside the file"
            )));
        }
        Ok(())
    }

    /// Points the guest cluster at `guest` to `entry`, creating its L2 table when needed. The
    /// change is written back on the next flush.
    pub fn set_entry(&mut self, file: &File, guest: u64, entry: Entry) -> io::Result<()> {
        let (l1i, l2i) = self.indices(guest);
        let l1e = *self
            .l1
            .get(l1i)
            .ok_or_else(|| corrupt("the L1 table does not cover the disk".into()))?;
        let mut l2_offset = l1e & OFFSET_MASK;
        if l2_offset != 0 && l1e & COPIED == 0 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "an L2 table shared with an internal snapshot",
            ));
        }
        let t = if l2_offset == 0 {
            l2_offset = self.allocate(file)?;
            self.metadata.insert(l2_offset);
            self.make_room(file)?;
            // A new table starts empty; the reservation already made its cluster zeros on disk.
            self.l2.push(CachedL2 {
                offset: l2_offset,
                entries: vec![0; (self.cluster_size() / 8) as usize],
                dirty: true,
                used: self.tick,
            });
            self.l1[l1i] = l2_offset | COPIED;
            self.l1_dirty = true;
            self.l2.len() - 1
        } else {
            self.l2_table(file, l2_offset)?
        };
        let raw = match entry {
            Entry::Unallocated => 0,
            Entry::Zero { host: None } => ZERO,
            Entry::Zero { host: Some(h) } => h | ZERO | COPIED,
            Entry::Data { host, copied } => host | if copied { COPIED } else { 0 },
            Entry::Compressed => return Err(io::ErrorKind::InvalidInput.into()),
        };
        let table = &mut self.l2[t];
        if let Some(slot) = table.entries.get_mut(l2i) {
            *slot = raw;
            table.dirty = true;
        }
        Ok(())
    }

    /// Writes dirty L2 tables, then the L1 table; true if anything was written. The caller
    /// orders this after the data it points at is durable.
    pub fn write_back(&mut self, file: &File) -> io::Result<bool> {
        let mut wrote = false;
        for t in self.l2.iter_mut().filter(|t| t.dirty) {
            file.write_all_at(&be64s(&t.entries), t.offset)?;
            t.dirty = false;
            wrote = true;
        }
        if self.l1_dirty {
            file.write_all_at(&be64s(&self.l1), self.l1_offset)?;
            self.l1_dirty = false;
            wrote = true;
        }
        Ok(wrote)
    }

    /// A free cluster, counted: from the reservation, which is renewed when empty.
    pub fn allocate(&mut self, file: &File) -> io::Result<u64> {
        let cs = self.cluster_size();
        let empty = self.refs.as_ref().is_none_or(|r| r.reserved.is_empty());
        if empty {
            self.reserve(file)?;
        }
        let refs = self
            .refs
            .as_mut()
            .ok_or_else(|| io::Error::from(io::ErrorKind::PermissionDenied))?;
        let c = refs.reserved.start;
        refs.reserved.start += 1;
        Ok(c * cs)
    }

    fn refcount_entries(&self) -> u64 {
        self.cluster_size() / 2
    }

    fn block<'a>(
        refs: &'a mut Refcounts,
        file: &File,
        index: usize,
        per_block: u64,
    ) -> io::Result<&'a mut Vec<u16>> {
        if !refs.blocks.contains_key(&index) {
            let off = refs.table.get(index).copied().unwrap_or(0) & OFFSET_MASK;
            let values = if off == 0 {
                vec![0; per_block as usize]
            } else {
                let mut raw = vec![0u8; (per_block * 2) as usize];
                file.read_exact_at(&mut raw, off)?;
                raw.chunks_exact(2)
                    .map(|c| u16::from_be_bytes([c[0], c[1]]))
                    .collect()
            };
            refs.blocks.insert(index, values);
        }
        refs.blocks
            .get_mut(&index)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }

    /// Reserves clusters at the end of the file: new refcount blocks first (where the range
    /// needs them), then the clusters to hand out; all counted, the file extended to cover
    /// them, everything durable before one of them is used.
    fn reserve(&mut self, file: &File) -> io::Result<()> {
        let cs = self.cluster_size();
        let per_block = self.refcount_entries();
        let start = self.file_end / cs;
        let batch = (RESERVE_BYTES / cs).max(4);
        let Some(refs) = self.refs.as_mut() else {
            return Err(io::ErrorKind::PermissionDenied.into());
        };
        let missing = |refs: &Refcounts, total: u64| -> Vec<usize> {
            let first = (start / per_block) as usize;
            let last = ((start + total - 1) / per_block) as usize;
            (first..=last)
                .filter(|i| refs.table.get(*i).copied().unwrap_or(0) & OFFSET_MASK == 0)
                .collect()
        };
        let mut total = batch;
        let mut new_blocks = missing(refs, total);
        while batch + new_blocks.len() as u64 != total {
            total = batch + new_blocks.len() as u64;
            new_blocks = missing(refs, total);
        }
        if new_blocks.iter().any(|i| *i >= refs.table.len()) {
            return Err(io::Error::other(
                "the image's refcount table is full (qemu-img convert it to grow the table)",
            ));
        }
        let mut touched = BTreeSet::new();
        for (k, index) in new_blocks.iter().enumerate() {
            let off = (start + k as u64) * cs;
            refs.blocks.insert(*index, vec![0; per_block as usize]);
            refs.table[*index] = off;
            self.metadata.insert(off);
        }
        for c in start..start + total {
            let index = (c / per_block) as usize;
            let block = Self::block(refs, file, index, per_block)?;
            let slot = &mut block[(c % per_block) as usize];
            if *slot != 0 {
                return Err(corrupt(format!(
                    "cluster {c} past the end of the file has a refcount of {slot}"
                )));
            }
            *slot = 1;
            touched.insert(index);
        }
        let end = (start + total) * cs;
        file.set_len(end)?;
        for index in &touched {
            Self::write_block(refs, file, *index)?;
        }
        for index in &new_blocks {
            file.write_all_at(
                &refs.table[*index].to_be_bytes(),
                refs.table_offset + *index as u64 * 8,
            )?;
        }
        file.sync_data()?;
        refs.reserved = start + new_blocks.len() as u64..start + total;
        self.file_end = end;
        Ok(())
    }

    fn write_block(refs: &Refcounts, file: &File, index: usize) -> io::Result<()> {
        let off = refs.table.get(index).copied().unwrap_or(0) & OFFSET_MASK;
        let Some(values) = refs.blocks.get(&index) else {
            return Ok(());
        };
        if off == 0 {
            return Err(corrupt("a refcount block without a table entry".into()));
        }
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_be_bytes()).collect();
        file.write_all_at(&raw, off)
    }

    /// Gives back the reserved clusters not used (refcounts to zero, file truncated), for a
    /// clean close.
    pub fn release_reservation(&mut self, file: &File) -> io::Result<()> {
        let cs = self.cluster_size();
        let per_block = self.refcount_entries();
        let Some(refs) = self.refs.as_mut() else {
            return Ok(());
        };
        if refs.reserved.is_empty() {
            return Ok(());
        }
        let mut touched = BTreeSet::new();
        for c in refs.reserved.clone() {
            let index = (c / per_block) as usize;
            let block = Self::block(refs, file, index, per_block)?;
            block[(c % per_block) as usize] = 0;
            touched.insert(index);
        }
        for index in &touched {
            Self::write_block(refs, file, *index)?;
        }
        file.sync_data()?;
        if refs.reserved.end * cs == self.file_end {
            self.file_end = refs.reserved.start * cs;
            file.set_len(self.file_end)?;
        }
        refs.reserved = 0..0;
        Ok(())
    }
}
