//! The launcher's side of disk images: resolving a disk's backing chain and opening every image
//! of it, and creating copy-on-write overlays.
//!
//! The chain is resolved here, by the launcher (`husk run`, huskd) with its own rights and under
//! its own policy, and handed to husk-vmm as open fds: the VMM never opens a file an image names.
//! Each backing name goes through the caller's `open` (huskd's path policy refuses what lies
//! outside the allowed directories), relative names resolve against the directory of the image
//! naming them, the depth is bounded and a loop is refused.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use husk_devices::virtio::block::qcow2::{self, Qcow2Error};

use crate::jail::normalize;
use crate::vmm_args::{fd_path, DiskConfig, DiskFormat, MAX_CHAIN};

/// Why a disk's chain could not be opened. `E` is the caller's error for opening one file.
#[derive(Debug, thiserror::Error)]
pub enum ChainError<E: std::error::Error + 'static> {
    #[error(transparent)]
    Open(E),
    #[error("{}: {cause}", .path.display())]
    Image { path: PathBuf, cause: Qcow2Error },
    #[error("{}: {cause}", .path.display())]
    Io { path: PathBuf, cause: io::Error },
    #[error("{}: the backing chain is deeper than {MAX_CHAIN} images", .path.display())]
    TooDeep { path: PathBuf },
    #[error("{}: the backing chain loops back to an image already in it", .path.display())]
    Loop { path: PathBuf },
    #[error(
        "{}: the file is a qcow2 image but its format was taken as raw from its name; name it \
         .qcow2 or state the format (format=qcow2)", .path.display()
    )]
    LooksLikeQcow2 { path: PathBuf },
}

/// A disk with every image of its chain open: keep `files` until the VMM has been spawned with
/// them inherited; `config` names them by fd.
#[derive(Debug)]
pub struct OpenedDisk {
    pub files: Vec<File>,
    pub config: DiskConfig,
}

impl OpenedDisk {
    pub fn fds(&self) -> impl Iterator<Item = i32> + '_ {
        self.files.iter().map(|f| f.as_raw_fd())
    }
}

/// How a disk's format was decided: stated by the user (or an image), or taken from its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormatSource {
    Stated(DiskFormat),
    ByName,
}

impl FormatSource {
    /// `""` is by name; anything else must be a format.
    pub fn parse(value: &str) -> Result<Self, crate::vmm_args::ValueError> {
        if value.is_empty() {
            return Ok(Self::ByName);
        }
        value
            .parse()
            .map(Self::Stated)
            .map_err(|_| crate::vmm_args::ValueError::Format(value.into()))
    }

    pub fn resolve(self, path: &Path) -> DiskFormat {
        match self {
            Self::Stated(f) => f,
            Self::ByName => DiskFormat::by_name(path),
        }
    }
}

/// Opens the chain under `top` (already opened by the caller from `top_path`, read-write
/// unless `read_only`): reads each qcow2 header, opens its backing file read-only with `open`,
/// down to an image without one.
pub fn open_chain<E, F>(
    top_path: &Path,
    top: File,
    format: FormatSource,
    read_only: bool,
    mut open: F,
) -> Result<OpenedDisk, ChainError<E>>
where
    E: std::error::Error + 'static,
    F: FnMut(&Path) -> Result<File, E>,
{
    let top_format = format.resolve(top_path);
    if format == FormatSource::ByName && top_format == DiskFormat::Raw && qcow2::has_magic(&top) {
        return Err(ChainError::LooksLikeQcow2 {
            path: top_path.into(),
        });
    }
    let mut seen = vec![identity(&top, top_path)?];
    let mut config = DiskConfig {
        path: fd_path(top.as_raw_fd()),
        read_only,
        format: top_format,
        backing: Vec::new(),
    };
    let mut files = vec![top];
    let (mut path, mut fmt) = (top_path.to_path_buf(), top_format);
    while fmt == DiskFormat::Qcow2 {
        let current = files
            .last()
            .ok_or_else(|| ChainError::TooDeep { path: path.clone() })?;
        let info = qcow2::info(current).map_err(|cause| ChainError::Image {
            path: path.clone(),
            cause,
        })?;
        let Some(backing) = info.backing else {
            break;
        };
        if files.len() >= MAX_CHAIN {
            return Err(ChainError::TooDeep { path });
        }
        let name = Path::new(&backing.name);
        let next = if name.is_absolute() {
            normalize(name)
        } else {
            normalize(&path.parent().unwrap_or(Path::new("/")).join(name))
        };
        let next_format = backing.format.unwrap_or_else(|| DiskFormat::by_name(&next));
        let file = open(&next).map_err(ChainError::Open)?;
        let id = identity(&file, &next)?;
        if seen.contains(&id) {
            return Err(ChainError::Loop { path: next });
        }
        seen.push(id);
        config
            .backing
            .push((fd_path(file.as_raw_fd()), next_format));
        files.push(file);
        (path, fmt) = (next, next_format);
    }
    Ok(OpenedDisk { files, config })
}

fn identity<E: std::error::Error + 'static>(
    file: &File,
    path: &Path,
) -> Result<(u64, u64), ChainError<E>> {
    let m = file.metadata().map_err(|cause| ChainError::Io {
        path: path.into(),
        cause,
    })?;
    Ok((m.dev(), m.ino()))
}

/// The size the guest sees of the image in `file` of format `format`.
pub fn virtual_size(file: &File, format: DiskFormat) -> Result<u64, Qcow2Error> {
    match format {
        DiskFormat::Raw => Ok(file.metadata()?.len()),
        DiskFormat::Qcow2 => Ok(qcow2::info(file)?.virtual_size),
    }
}

/// Writes a qcow2 overlay into the new, empty `overlay` over the image `base` (named by its
/// absolute path, with its format), as large as `size` or else the base.
pub fn create_overlay(
    overlay: &File,
    base_path: &Path,
    base: &File,
    base_format: DiskFormat,
    size: Option<u64>,
) -> Result<(), Qcow2Error> {
    let name = base_path.to_str().ok_or_else(|| {
        Qcow2Error::Unsupported(format!("a backing path that is not UTF-8: {base_path:?}"))
    })?;
    if !base_path.is_absolute() {
        return Err(Qcow2Error::Unsupported(format!(
            "a relative backing path {name:?}"
        )));
    }
    let size = match size {
        Some(s) => s,
        None => virtual_size(base, base_format)?,
    };
    qcow2::create(overlay, size, Some((name, base_format)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;

    fn plain_open(p: &Path) -> Result<File, io::Error> {
        File::open(p)
    }

    fn new_file(p: &Path) -> File {
        File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(p)
            .unwrap()
    }

    #[test]
    fn a_chain_resolves_relative_names_and_hands_out_fds() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![1u8; 1 << 20]).unwrap();
        let mid = dir.path().join("mid.qcow2");
        create_overlay(
            &new_file(&mid),
            &base,
            &File::open(&base).unwrap(),
            DiskFormat::Raw,
            None,
        )
        .unwrap();
        // The top names its backing file relatively.
        let top = dir.path().join("top.qcow2");
        qcow2::create(
            &new_file(&top),
            1 << 20,
            Some(("mid.qcow2", DiskFormat::Qcow2)),
        )
        .unwrap();
        let opened = open_chain(
            &top,
            File::open(&top).unwrap(),
            FormatSource::ByName,
            true,
            plain_open,
        )
        .unwrap();
        assert_eq!(opened.files.len(), 3);
        assert_eq!(opened.config.format, DiskFormat::Qcow2);
        let formats: Vec<_> = opened.config.backing.iter().map(|(_, f)| *f).collect();
        assert_eq!(formats, vec![DiskFormat::Qcow2, DiskFormat::Raw]);
        assert!(opened.config.path.starts_with("/proc/self/fd/"));
        assert_eq!(
            virtual_size(&opened.files[0], DiskFormat::Qcow2).unwrap(),
            1 << 20
        );
    }

    #[test]
    fn loops_depth_and_refused_names_stop_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.qcow2");
        qcow2::create(&new_file(&a), 1 << 20, Some(("a.qcow2", DiskFormat::Qcow2))).unwrap();
        let err = open_chain(
            &a,
            File::open(&a).unwrap(),
            FormatSource::ByName,
            true,
            plain_open,
        )
        .unwrap_err();
        assert!(matches!(err, ChainError::Loop { .. }), "{err}");
        // The opener decides: a policy that refuses everything stops at the first backing file.
        let b = dir.path().join("b.qcow2");
        qcow2::create(
            &new_file(&b),
            1 << 20,
            Some(("/etc/shadow", DiskFormat::Raw)),
        )
        .unwrap();
        let err = open_chain(
            &b,
            File::open(&b).unwrap(),
            FormatSource::ByName,
            true,
            |p| Err(io::Error::other(format!("{} is not allowed", p.display()))),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("/etc/shadow is not allowed"),
            "{err}"
        );
    }

    #[test]
    fn a_qcow2_file_named_as_raw_is_refused_unless_stated() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.img");
        qcow2::create(&new_file(&p), 1 << 20, None).unwrap();
        let open = |s| {
            open_chain::<Infallible, _>(&p, File::open(&p).unwrap(), s, true, |_| unreachable!())
        };
        assert!(matches!(
            open(FormatSource::ByName),
            Err(ChainError::LooksLikeQcow2 { .. })
        ));
        let raw = open(FormatSource::Stated(DiskFormat::Raw)).unwrap();
        assert_eq!(raw.config.format, DiskFormat::Raw);
        let q = open(FormatSource::Stated(DiskFormat::Qcow2)).unwrap();
        assert_eq!(q.config.format, DiskFormat::Qcow2);
    }
}
