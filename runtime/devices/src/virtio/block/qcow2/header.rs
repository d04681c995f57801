//! The qcow2 header (QEMU's docs/interop/qcow2.txt, versions 2 and 3): parsed from a bounded
//! read of the image's first cluster and checked completely before any table is trusted.
//! Everything husk does not implement is refused here with a message that says what and how to
//! convert the image, never misread.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::Qcow2Error;
use crate::virtio::block::format::DiskFormat;

pub const MAGIC: u32 = 0x5146_49fb; // "QFI\xfb"
/// Largest cluster husk accepts (2 MiB, as QEMU).
pub const MAX_CLUSTER_BITS: u32 = 21;
pub const MIN_CLUSTER_BITS: u32 = 9;
/// The longest backing file name (QEMU's limit).
pub const MAX_BACKING_NAME: usize = 1023;
/// Bounds on the in-memory tables (QEMU's limits): the L1 table and the refcount table.
pub const MAX_L1_BYTES: u64 = 32 << 20;
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Largest virtual disk (QEMU's QCOW_MAX_SIZE is 2^61; 64 TiB is plenty for a sandbox and keeps
/// every offset computation far from overflow).
pub const MAX_VIRTUAL_SIZE: u64 = 64 << 40;
/// Offsets in tables use bits 9..=55.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// Incompatible feature bits (v3).
pub mod incompat {
    pub const DIRTY: u64 = 1 << 0;
    pub const CORRUPT: u64 = 1 << 1;
    pub const EXTERNAL_DATA: u64 = 1 << 2;
    pub const COMPRESSION_TYPE: u64 = 1 << 3;
    pub const EXTENDED_L2: u64 = 1 << 4;
}

/// Header extension types.
mod ext {
    pub const END: u32 = 0;
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    #[allow(dead_code)] // named for the reader: skipped like any unknown extension
    pub const FEATURE_NAMES: u32 = 0x6803_f857;
    pub const BITMAPS: u32 = 0x2385_2875;
    pub const ENCRYPTION: u32 = 0x0537_be77;
    pub const EXTERNAL_DATA: u32 = 0x4441_5441;
}

/// Byte offsets of the header fields husk rewrites.
pub mod field {
    pub const AUTOCLEAR: u64 = 88;
}

/// The backing file an image names: a name as written in the image (relative names are relative
/// to the image's directory) and its format when the image says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingRef {
    pub name: String,
    pub format: Option<DiskFormat>,
}

/// A checked header.
#[derive(Debug, Clone)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub incompatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub backing: Option<BackingRef>,
    /// Persistent dirty bitmaps are described (husk cannot keep them in step when writing).
    pub has_bitmaps: bool,
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(x)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

/// Whether `file` starts with the qcow2 magic (for messages; formats are never guessed).
pub fn has_magic(file: &File) -> bool {
    let mut b = [0u8; 4];
    file.read_exact_at(&mut b, 0).is_ok() && u32::from_be_bytes(b) == MAGIC
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Reads and checks the header of `file` (`file_len` bytes long).
    pub fn read(file: &File, file_len: u64) -> Result<Self, Qcow2Error> {
        let corrupt = |m: String| Qcow2Error::Corrupt(m);
        let mut fixed = [0u8; 104];
        let n = fixed.len().min(file_len as usize);
        file.read_exact_at(&mut fixed[..n], 0)?;
        if n < 72 || be32(&fixed, 0) != MAGIC {
            return Err(Qcow2Error::NotQcow2);
        }
        let version = be32(&fixed, 4);
        if version != 2 && version != 3 {
            return Err(Qcow2Error::Unsupported(format!(
                "qcow2 version {version} (husk reads versions 2 and 3)"
            )));
        }
        let cluster_bits = be32(&fixed, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(corrupt(format!(
                "cluster_bits {cluster_bits} is out of range 9..=21"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;
        let (incompatible, autoclear, refcount_order, header_length) = if version == 3 {
            if n < 104 {
                return Err(corrupt("the version 3 header is cut short".into()));
            }
            (
                be64(&fixed, 72),
                be64(&fixed, 88),
                be32(&fixed, 96),
                be32(&fixed, 100),
            )
        } else {
            (0, 0, 4, 72)
        };
        let header_length = u64::from(header_length);
        if (version == 3 && (header_length < 104 || header_length % 8 != 0))
            || header_length > cluster_size
        {
            return Err(corrupt(format!("header_length {header_length} is invalid")));
        }
        if be32(&fixed, 32) != 0 {
            return Err(Qcow2Error::Unsupported(
                "encrypted images (convert with qemu-img convert -O qcow2 and --object secret)"
                    .into(),
            ));
        }
        let known = incompat::DIRTY | incompat::CORRUPT | incompat::COMPRESSION_TYPE;
        if incompatible & incompat::CORRUPT != 0 {
            return Err(Qcow2Error::Unsupported(
                "the image is marked corrupt (qemu-img check -r all)".into(),
            ));
        }
        if incompatible & incompat::EXTERNAL_DATA != 0 {
            return Err(Qcow2Error::Unsupported("an external data file".into()));
        }
        if incompatible & incompat::EXTENDED_L2 != 0 {
            return Err(Qcow2Error::Unsupported(
                "extended L2 entries (subclusters); qemu-img convert -O qcow2 without \
                 extended_l2"
                    .into(),
            ));
        }
        if incompatible & !known != 0 {
            return Err(Qcow2Error::Unsupported(format!(
                "incompatible features {:#x}",
                incompatible & !known
            )));
        }
        if refcount_order > 6 {
            return Err(corrupt(format!(
                "refcount_order {refcount_order} is above 6"
            )));
        }
        let size = be64(&fixed, 24);
        if size > MAX_VIRTUAL_SIZE {
            return Err(Qcow2Error::Unsupported(format!(
                "a virtual size of {size} bytes (husk's limit: {MAX_VIRTUAL_SIZE})"
            )));
        }
        let header = Self {
            version,
            cluster_bits,
            size,
            l1_size: be32(&fixed, 36),
            l1_offset: be64(&fixed, 40),
            refcount_table_offset: be64(&fixed, 48),
            refcount_table_clusters: be32(&fixed, 56),
            nb_snapshots: be32(&fixed, 60),
            incompatible,
            autoclear,
            refcount_order,
            backing: None,
            has_bitmaps: false,
        };
        header.check_tables(file_len)?;
        // The rest of the header (extensions, backing name) lies in the first cluster.
        let first_len = cluster_size.min(file_len) as usize;
        let mut first = vec![0u8; first_len];
        file.read_exact_at(&mut first, 0)?;
        let mut header = header;
        let backing_format = header.read_extensions(&first, header_length as usize)?;
        let backing_offset = be64(&fixed, 8);
        let backing_len = be32(&fixed, 16) as usize;
        if backing_offset != 0 {
            if backing_len == 0 || backing_len > MAX_BACKING_NAME {
                return Err(corrupt(format!("backing file name length {backing_len}")));
            }
            let start = usize::try_from(backing_offset)
                .ok()
                .filter(|s| s.saturating_add(backing_len) <= first.len())
                .ok_or_else(|| {
                    corrupt("the backing file name lies outside the first cluster".into())
                })?;
            let name = std::str::from_utf8(&first[start..start + backing_len])
                .map_err(|_| corrupt("the backing file name is not UTF-8".into()))?;
            if name.contains('\0') || name.contains("://") || name.starts_with("json:") {
                return Err(Qcow2Error::Unsupported(format!(
                    "backing file {name:?}: only plain file names"
                )));
            }
            header.backing = Some(BackingRef {
                name: name.to_string(),
                format: backing_format,
            });
        }
        Ok(header)
    }

    /// The L1 and refcount tables lie in the file, aligned and within QEMU's bounds, and the L1
    /// table covers the virtual size.
    fn check_tables(&self, file_len: u64) -> Result<(), Qcow2Error> {
        let corrupt = |m: String| Qcow2Error::Corrupt(m);
        let cs = self.cluster_size();
        let entries_per_l2 = cs / 8;
        let needed_l1 = self.size.div_ceil(cs * entries_per_l2);
        if u64::from(self.l1_size) < needed_l1 {
            return Err(corrupt(format!(
                "l1_size {} does not cover the virtual size ({needed_l1} needed)",
                self.l1_size
            )));
        }
        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(corrupt(format!("an L1 table of {l1_bytes} bytes")));
        }
        in_file("L1 table", self.l1_offset, l1_bytes, cs, file_len)?;
        let rt_bytes = u64::from(self.refcount_table_clusters) * cs;
        if rt_bytes == 0 || rt_bytes > MAX_REFTABLE_BYTES {
            return Err(corrupt(format!("a refcount table of {rt_bytes} bytes")));
        }
        in_file(
            "refcount table",
            self.refcount_table_offset,
            rt_bytes,
            cs,
            file_len,
        )?;
        Ok(())
    }

    /// Reads the header extensions from `first` (the first cluster), starting at `at`; returns the
    /// backing format when one is given.
    fn read_extensions(
        &mut self,
        first: &[u8],
        mut at: usize,
    ) -> Result<Option<DiskFormat>, Qcow2Error> {
        let corrupt = |m: &str| Qcow2Error::Corrupt(m.into());
        let mut backing_format = None;
        if self.version == 2 {
            // Version 2 images may still carry extensions after the 72-byte header.
            at = 72;
        }
        loop {
            if at + 8 > first.len() {
                // A header that ends with the file (tiny image): no more extensions.
                return Ok(backing_format);
            }
            let kind = be32(first, at);
            let len = be32(first, at + 4) as usize;
            let data_at = at + 8;
            let end = data_at
                .checked_add(len)
                .filter(|e| *e <= first.len())
                .ok_or_else(|| corrupt("a header extension runs past the first cluster"))?;
            let data = &first[data_at..end];
            match kind {
                ext::END => return Ok(backing_format),
                ext::BACKING_FORMAT => {
                    let name = std::str::from_utf8(data)
                        .map_err(|_| corrupt("the backing format is not UTF-8"))?;
                    backing_format = Some(name.parse().map_err(|_| {
                        Qcow2Error::Unsupported(format!(
                            "a backing file of format {name:?} (husk reads raw and qcow2)"
                        ))
                    })?);
                }
                ext::BITMAPS => self.has_bitmaps = true,
                ext::ENCRYPTION => return Err(Qcow2Error::Unsupported("encrypted images".into())),
                ext::EXTERNAL_DATA => {
                    return Err(Qcow2Error::Unsupported("an external data file".into()))
                }
                // The feature-name table (FEATURE_NAMES) is informational; unknown extensions are skipped,
                // as the specification says.
                _ => {}
            }
            at = data_at + len.div_ceil(8) * 8;
        }
    }
}

/// `len` bytes at `offset` are cluster-aligned and inside the file.
pub fn in_file(
    what: &str,
    offset: u64,
    len: u64,
    cluster_size: u64,
    file_len: u64,
) -> Result<(), Qcow2Error> {
    if offset == 0 || offset % cluster_size != 0 {
        return Err(Qcow2Error::Corrupt(format!(
            "the {what} offset {offset:#x} is not a cluster boundary"
        )));
    }
    match offset.checked_add(len) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(Qcow2Error::Corrupt(format!(
            "the {what} ({len} bytes at {offset:#x}) lies past the end of the file ({file_len} \
             bytes)"
        ))),
    }
}

/// Writes a new, empty version 3 image of `size` bytes into the empty `file`: 64 KiB clusters,
/// 16-bit refcounts, an L1 table that covers the size, a refcount table that covers the image at
/// its fullest, one refcount block. With `backing`, reads of clusters the image never wrote come
/// from that file.
pub fn create(
    file: &File,
    size: u64,
    backing: Option<(&str, DiskFormat)>,
) -> Result<(), Qcow2Error> {
    const CLUSTER_BITS: u32 = 16;
    let cs: u64 = 1 << CLUSTER_BITS;
    if size > MAX_VIRTUAL_SIZE {
        return Err(Qcow2Error::Unsupported(format!(
            "a virtual size of {size} bytes (husk's limit: {MAX_VIRTUAL_SIZE})"
        )));
    }
    let l1_size = size.div_ceil(cs * (cs / 8)).max(1);
    let l1_clusters = (l1_size * 8).div_ceil(cs);
    // At its fullest the image holds every data cluster, every L2 table and the metadata.
    let max_clusters = size.div_ceil(cs) + l1_size + l1_clusters + 64;
    let per_block = cs / 2; // 16-bit refcounts
    let rt_entries = max_clusters.div_ceil(per_block) * 2;
    let rt_clusters = (rt_entries * 8).div_ceil(cs);
    let l1_offset = cs;
    let rt_offset = l1_offset + l1_clusters * cs;
    let rb_offset = rt_offset + rt_clusters * cs;
    let end = rb_offset + cs;

    let mut head = vec![0u8; cs as usize];
    let put32 = |b: &mut [u8], at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    let put64 = |b: &mut [u8], at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    put32(&mut head, 0, MAGIC);
    put32(&mut head, 4, 3);
    put32(&mut head, 20, CLUSTER_BITS);
    put64(&mut head, 24, size);
    put32(&mut head, 36, l1_size as u32);
    put64(&mut head, 40, l1_offset);
    put64(&mut head, 48, rt_offset);
    put32(&mut head, 56, rt_clusters as u32);
    put32(&mut head, 96, 4); // refcount_order: 16-bit
    put32(&mut head, 100, 104); // header_length
    let mut at = 104;
    if let Some((name, format)) = backing {
        if name.is_empty() || name.len() > MAX_BACKING_NAME {
            return Err(Qcow2Error::Unsupported(format!(
                "a backing file name of {} bytes",
                name.len()
            )));
        }
        let fmt = format.to_string();
        put32(&mut head, at, ext::BACKING_FORMAT);
        put32(&mut head, at + 4, fmt.len() as u32);
        head[at + 8..at + 8 + fmt.len()].copy_from_slice(fmt.as_bytes());
        at += 8 + fmt.len().div_ceil(8) * 8;
        at += 8; // the end-of-extensions marker (zeros)
        put64(&mut head, 8, at as u64);
        put32(&mut head, 16, name.len() as u32);
        head[at..at + name.len()].copy_from_slice(name.as_bytes());
    }
    // Refcount table: one block; the block: one reference to every metadata cluster.
    let mut table = vec![0u8; 8];
    put64(&mut table, 0, rb_offset);
    let used = end / cs;
    let mut block = vec![0u8; (used * 2) as usize];
    for i in 0..used as usize {
        block[i * 2..i * 2 + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    file.set_len(end)?;
    file.write_all_at(&table, rt_offset)?;
    file.write_all_at(&block, rb_offset)?;
    file.write_all_at(&head, 0)?;
    file.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp() -> File {
        tempfile::tempfile().unwrap()
    }

    #[test]
    fn a_created_image_reads_back_with_its_backing_file() {
        let f = temp();
        create(&f, 10 << 30, Some(("/images/base.raw", DiskFormat::Raw))).unwrap();
        let h = Header::read(&f, f.metadata().unwrap().len()).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.size, 10 << 30);
        assert_eq!(h.cluster_bits, 16);
        assert_eq!(h.l1_size, 20);
        assert_eq!(
            h.backing,
            Some(BackingRef {
                name: "/images/base.raw".into(),
                format: Some(DiskFormat::Raw)
            })
        );
    }

    #[test]
    fn hostile_headers_are_refused_not_misread() {
        let f = temp();
        create(&f, 1 << 20, None).unwrap();
        let len = f.metadata().unwrap().len();
        let patch = |at: u64, bytes: &[u8]| {
            let g = temp();
            let mut all = vec![0u8; len as usize];
            f.read_exact_at(&mut all, 0).unwrap();
            all[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
            g.write_all_at(&all, 0).unwrap();
            Header::read(&g, len)
        };
        assert!(matches!(patch(0, b"QFI\0"), Err(Qcow2Error::NotQcow2)));
        assert!(matches!(
            patch(4, &4u32.to_be_bytes()),
            Err(Qcow2Error::Unsupported(_))
        ));
        assert!(matches!(
            patch(20, &30u32.to_be_bytes()),
            Err(Qcow2Error::Corrupt(_))
        ));
        assert!(matches!(
            patch(32, &1u32.to_be_bytes()),
            Err(Qcow2Error::Unsupported(_))
        ));
        // L1 table past the end of the file; unaligned; too small for the size.
        assert!(matches!(
            patch(40, &(1u64 << 40).to_be_bytes()),
            Err(Qcow2Error::Corrupt(_))
        ));
        assert!(matches!(
            patch(40, &0x10001u64.to_be_bytes()),
            Err(Qcow2Error::Corrupt(_))
        ));
        assert!(matches!(
            patch(24, &(1u64 << 40).to_be_bytes()),
            Err(Qcow2Error::Corrupt(_))
        ));
        assert!(matches!(
            patch(72, &2u64.to_be_bytes()),
            Err(Qcow2Error::Unsupported(_))
        ));
        assert!(matches!(
            patch(72, &(1u64 << 40).to_be_bytes()),
            Err(Qcow2Error::Unsupported(_))
        ));
        // A backing name outside the first cluster.
        let mut b = (1u64 << 16).to_be_bytes().to_vec();
        b.extend_from_slice(&8u32.to_be_bytes());
        assert!(matches!(patch(8, &b), Err(Qcow2Error::Corrupt(_))));
        // An extension longer than the cluster.
        let mut e = 0xe279_2acau32.to_be_bytes().to_vec();
        e.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(patch(104, &e), Err(Qcow2Error::Corrupt(_))));
    }

    #[test]
    fn every_prefix_of_an_image_is_refused_or_read_without_panic() {
        let f = temp();
        create(&f, 1 << 30, Some(("base.qcow2", DiskFormat::Qcow2))).unwrap();
        let len = f.metadata().unwrap().len();
        let mut all = vec![0u8; len as usize];
        f.read_exact_at(&mut all, 0).unwrap();
        for cut in [0usize, 3, 50, 71, 72, 103, 104, 200, 4096, 65536, 65544] {
            let g = temp();
            g.write_all_at(&all[..cut.min(all.len())], 0).unwrap();
            assert!(
                Header::read(&g, cut.min(all.len()) as u64).is_err(),
                "cut {cut}"
            );
        }
    }
}
