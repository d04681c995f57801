//! Disk image formats and opening a disk with its backing chain.
//!
//! The format of an image is always stated (by the user, by the file name, or by the image
//! above it in a chain), never guessed from the contents: a guest can write any bytes into a raw
//! disk, including a qcow2 header naming a host file as its backing file.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::backend::{open_locked, DiskBackend, RawFile};
use super::qcow2::Qcow2;

/// How many images a chain may have (the top and its backing files).
pub const MAX_CHAIN: usize = 16;

/// The on-disk format of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DiskFormat {
    #[default]
    Raw,
    Qcow2,
}

impl DiskFormat {
    /// The format a file name implies: `.qcow2` is qcow2, anything else raw.
    pub fn by_name(path: &Path) -> Self {
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("qcow2") => Self::Qcow2,
            _ => Self::Raw,
        }
    }
}

/// An unknown format name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown disk format {0:?} (use raw or qcow2)")]
pub struct UnknownFormat(pub String);

impl FromStr for DiskFormat {
    type Err = UnknownFormat;
    fn from_str(s: &str) -> Result<Self, UnknownFormat> {
        match s {
            "raw" => Ok(Self::Raw),
            "qcow2" => Ok(Self::Qcow2),
            other => Err(UnknownFormat(other.into())),
        }
    }
}

impl fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Raw => "raw",
            Self::Qcow2 => "qcow2",
        })
    }
}

/// Opens the image at `top` (read-write unless `read_only`) over `backing`, its backing chain
/// from the top down, each opened read-only with a shared lock. Each path may name an inherited
/// fd (`/proc/self/fd/N`). The chain was resolved and checked by the launcher; the names inside
/// the images are not followed here.
pub fn open_disk(
    top: &Path,
    format: DiskFormat,
    read_only: bool,
    backing: &[(PathBuf, DiskFormat)],
) -> io::Result<Box<dyn DiskBackend>> {
    if backing.len() >= MAX_CHAIN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a backing chain deeper than {MAX_CHAIN} images"),
        ));
    }
    let mut below: Option<Box<dyn DiskBackend>> = None;
    for (path, fmt) in backing.iter().rev() {
        below = Some(open_one(path, *fmt, true, below.take())?);
    }
    open_one(top, format, read_only, below)
}

fn open_one(
    path: &Path,
    format: DiskFormat,
    read_only: bool,
    backing: Option<Box<dyn DiskBackend>>,
) -> io::Result<Box<dyn DiskBackend>> {
    let file = open_locked(path, read_only)?;
    let with_path = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    match format {
        DiskFormat::Raw => {
            if backing.is_some() {
                return Err(with_path(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a raw image has no backing file",
                )));
            }
            Ok(Box::new(RawFile::from_file(file)?))
        }
        DiskFormat::Qcow2 => Ok(Box::new(
            Qcow2::open(file, read_only, backing).map_err(|e| with_path(e.into()))?,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_come_from_names_not_contents() {
        assert_eq!(
            DiskFormat::by_name(Path::new("/a/b.qcow2")),
            DiskFormat::Qcow2
        );
        assert_eq!(
            DiskFormat::by_name(Path::new("/a/b.QCOW2")),
            DiskFormat::Qcow2
        );
        assert_eq!(DiskFormat::by_name(Path::new("/a/b.img")), DiskFormat::Raw);
        assert_eq!(DiskFormat::by_name(Path::new("/a/qcow2")), DiskFormat::Raw);
        assert_eq!("qcow2".parse(), Ok(DiskFormat::Qcow2));
        assert!("vmdk".parse::<DiskFormat>().is_err());
        assert_eq!(DiskFormat::Qcow2.to_string(), "qcow2");
    }
}
