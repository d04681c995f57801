//! The snapshot state file container: what makes a file trustworthy before a single byte of its
//! payload is interpreted.
//!
//! Layout (all integers little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `HUSKSNAP` |
//! | 8 | 4 | format version ([`FORMAT_VERSION`]) |
//! | 12 | 4 | flags (0; reserved) |
//! | 16 | 8 | payload length N |
//! | 24 | N | payload (a protobuf `SnapshotState`, see [`super::state`]) |
//! | 24+N | 4 | CRC-32 (IEEE 802.3, reflected, as in zlib) of bytes 0..24+N |
//!
//! Every check (magic, version, exact length, checksum) runs before decoding, so a truncated,
//! padded, corrupted or foreign file is refused with a precise error and never misread. Files
//! are written to `PATH.tmp` and renamed, so a reader never sees a half-written snapshot and a
//! failed write leaves an existing file untouched.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// First 8 bytes of every husk snapshot state file.
pub const MAGIC: [u8; 8] = *b"HUSKSNAP";
/// The payload schema this build reads and writes. Bump on any change an older reader would
/// misread (a new required meaning, a changed unit); additive protobuf fields do not need it.
pub const FORMAT_VERSION: u32 = 1;
const HEADER_LEN: usize = 24;
const TRAILER_LEN: usize = 4;
/// Largest payload read or written. The largest husk writes is about 9 MiB: the changed-page
/// bitmap of a diff of the largest guest (256 GiB / 4 KiB pages / 8 = 8 MiB) plus some 16 KiB
/// per vCPU. Anything longer is refused before a byte of it is read.
pub const MAX_PAYLOAD: u64 = 16 << 20;

/// Why a state file was refused or could not be written.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// Reading or writing failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// Not a husk snapshot at all.
    #[error("{0} is not a husk snapshot state file (bad magic)")]
    BadMagic(PathBuf),
    /// Written by an incompatible husk.
    #[error(
        "{path} has snapshot format version {found}; this husk reads version {FORMAT_VERSION} only"
    )]
    Version {
        /// The file.
        path: PathBuf,
        /// The version in the file.
        found: u32,
    },
    /// Shorter or longer than its header says.
    #[error("{path} is {actual} bytes but its header says {expected}: truncated or padded")]
    Length {
        /// The file.
        path: PathBuf,
        /// Length the header implies.
        expected: u64,
        /// Real length.
        actual: u64,
    },
    /// Larger than any state file husk writes.
    #[error("{path} is {size} bytes, over the {limit}-byte limit of a snapshot state file")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The limit (header, [`MAX_PAYLOAD`] and checksum).
        limit: u64,
    },
    /// The checksum does not match.
    #[error("{path} is corrupted (CRC-32 {stored:#010x} stored, {computed:#010x} computed)")]
    Checksum {
        /// The file.
        path: PathBuf,
        /// Checksum in the file.
        stored: u32,
        /// Checksum of its contents.
        computed: u32,
    },
}

/// CRC-32 (IEEE, reflected polynomial 0xEDB88320), the zlib/PNG/Ethernet checksum.
pub fn crc32(data: &[u8]) -> u32 {
    const fn table() -> [u32; 256] {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    }
    static TABLE: [u32; 256] = table();
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// The full file image for `payload`.
pub fn encode(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + TRAILER_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Checks a whole file image and returns its payload. `path` only names it in errors.
pub fn decode<'a>(path: &Path, bytes: &'a [u8]) -> Result<&'a [u8], FileError> {
    let p = || path.to_path_buf();
    if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
        return Err(FileError::BadMagic(p()));
    }
    if bytes.len() < HEADER_LEN + TRAILER_LEN {
        return Err(FileError::Length {
            path: p(),
            expected: (HEADER_LEN + TRAILER_LEN) as u64,
            actual: bytes.len() as u64,
        });
    }
    let u32_at =
        |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
    let version = u32_at(8);
    if version != FORMAT_VERSION {
        return Err(FileError::Version {
            path: p(),
            found: version,
        });
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[16..24]);
    let payload_len = u64::from_le_bytes(len);
    let expected = payload_len.saturating_add((HEADER_LEN + TRAILER_LEN) as u64);
    if payload_len > MAX_PAYLOAD || expected != bytes.len() as u64 {
        return Err(FileError::Length {
            path: p(),
            expected,
            actual: bytes.len() as u64,
        });
    }
    let body_end = bytes.len() - TRAILER_LEN;
    let stored = u32_at(body_end);
    let computed = crc32(&bytes[..body_end]);
    if stored != computed {
        return Err(FileError::Checksum {
            path: p(),
            stored,
            computed,
        });
    }
    Ok(&bytes[HEADER_LEN..body_end])
}

/// Writes `payload` as a state file at `path` (through `PATH.tmp` + fsync + rename).
pub fn write(path: &Path, payload: &[u8]) -> Result<(), FileError> {
    let tmp = tmp_path(path);
    fn io<'p>(op: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> FileError + 'p {
        move |source| FileError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
    let result = (|| {
        let mut f = File::create(&tmp).map_err(io("cannot create", &tmp))?;
        f.write_all(&encode(payload))
            .map_err(io("cannot write", &tmp))?;
        f.sync_all().map_err(io("cannot sync", &tmp))?;
        fs::rename(&tmp, path).map_err(io("cannot rename into place", path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Opens a snapshot file for reading: a path, or `/proc/self/fd/N` for an fd the launcher
/// opened (huskd passes a restore's files so; the jailed VMM's user could not open them, 0600
/// and root's, and no path of them is mirrored into its jail).
pub fn open_input(path: &Path) -> io::Result<File> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    husk_devices::host_files::open(path, &options, false)
}

/// Reads and checks the state file at `path`; returns its payload.
pub fn read(path: &Path) -> Result<Vec<u8>, FileError> {
    let io = |op| {
        move |source| FileError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    };
    let f = open_input(path).map_err(io("cannot open"))?;
    let size = f.metadata().map_err(io("cannot stat"))?.len();
    let limit = MAX_PAYLOAD + (HEADER_LEN + TRAILER_LEN) as u64;
    if size > limit {
        return Err(FileError::TooLarge {
            path: path.to_path_buf(),
            size,
            limit,
        });
    }
    // `take`: a file that is not what its size says (one still growing, a device, a FIFO)
    // cannot make this read more than the limit.
    let mut bytes = Vec::with_capacity(size as usize);
    f.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(io("cannot read"))?;
    decode(path, &bytes).map(<[u8]>::to_vec)
}

/// `PATH.tmp`, where a file is written before it is renamed into place.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("t.state")
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        // The check value of CRC-32/ISO-HDLC for "123456789".
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn a_file_round_trips() {
        let image = encode(b"payload bytes");
        assert_eq!(decode(p(), &image).unwrap(), b"payload bytes");
        assert_eq!(decode(p(), &encode(b"")).unwrap(), b"");
    }

    #[test]
    fn every_truncation_is_refused() {
        let image = encode(b"some payload");
        for len in 0..image.len() {
            assert!(decode(p(), &image[..len]).is_err(), "accepted {len} bytes");
        }
        let mut padded = image.clone();
        padded.push(0);
        assert!(matches!(
            decode(p(), &padded),
            Err(FileError::Length { .. })
        ));
    }

    #[test]
    fn every_flipped_bit_is_refused() {
        let image = encode(b"some payload");
        for byte in 0..image.len() {
            for bit in 0..8 {
                let mut bad = image.clone();
                bad[byte] ^= 1 << bit;
                assert!(decode(p(), &bad).is_err(), "accepted flip {byte}.{bit}");
            }
        }
    }

    #[test]
    fn wrong_magic_and_version_say_so() {
        let mut image = encode(b"x");
        image[0] = b'X';
        assert!(matches!(decode(p(), &image), Err(FileError::BadMagic(_))));
        let mut image = encode(b"x");
        image[8..12].copy_from_slice(&2u32.to_le_bytes());
        let e = decode(p(), &image).unwrap_err();
        assert!(matches!(e, FileError::Version { found: 2, .. }), "{e}");
        assert!(e.to_string().contains("version 2"), "{e}");
    }

    #[test]
    fn huge_length_fields_are_refused_without_allocating() {
        let mut image = encode(b"x");
        image[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(decode(p(), &image), Err(FileError::Length { .. })));
    }

    #[test]
    fn a_file_larger_than_its_size_says_is_read_only_up_to_the_limit() {
        // /dev/zero has size 0 and never ends.
        let e = read(Path::new("/dev/zero")).unwrap_err();
        assert!(matches!(e, FileError::BadMagic(_)), "{e}");
    }

    #[test]
    fn a_state_file_over_the_size_limit_is_refused_before_it_is_read() {
        let dir = crate::test_utils::ScratchDir::new("snapbig");
        let path = dir.path().join("vm.state");
        let f = File::create(&path).unwrap();
        f.set_len(MAX_PAYLOAD + 29).unwrap();
        let e = read(&path).unwrap_err();
        assert!(matches!(e, FileError::TooLarge { .. }), "{e}");
    }

    #[test]
    fn write_then_read_and_a_failed_write_leaves_the_old_file() {
        let dir = crate::test_utils::ScratchDir::new("snapfile");
        let path = dir.path().join("vm.state");
        write(&path, b"first").unwrap();
        assert_eq!(read(&path).unwrap(), b"first");
        assert!(!tmp_path(&path).exists());
        // A directory in the way of the temporary file makes the write fail.
        fs::create_dir(tmp_path(&path)).unwrap();
        assert!(write(&path, b"second").is_err());
        assert_eq!(read(&path).unwrap(), b"first");
    }
}
