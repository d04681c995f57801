//! The disks of `husk run`, opened here and handed to husk-vmm by fd (jailed or not): the root
//! disk first, then `--disk`s, each with its backing chain resolved by husk with the caller's
//! rights (see `husk_host::disk_image`).
//!
//! The root filesystem is copy-on-write by default: the image given with `--rootfs` is opened
//! read-only and the VM writes to a qcow2 overlay. That overlay is an anonymous file (O_TMPFILE
//! in `$HUSK_OVERLAY_DIR`, else /var/tmp), so nothing is left behind however husk ends, and many
//! `husk run`s can share one image. `--overlay PATH` keeps the overlay (created on first use,
//! reused after); `--write-rootfs` writes the image itself.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use husk_host::disk_image::{self, ChainError, FormatSource, OpenedDisk};
use husk_host::paths::require_file;
use husk_host::vmm_args::{DiskConfig, DiskFormat};
use rustix::fs::{Mode, OFlags};

use crate::quick_launch::RunError;
use crate::run_args::RunArgs;

/// Why a disk of `husk run` could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("{}: {cause}", .path.display())]
    Open { path: PathBuf, cause: io::Error },
    #[error(transparent)]
    Chain(#[from] ChainError<DiskOpenError>),
    #[error("the overlay {}: {cause}", .path.display())]
    Overlay { path: PathBuf, cause: String },
}

/// One backing file that would not open.
#[derive(Debug, thiserror::Error)]
#[error("backing file {}: {cause}", .path.display())]
pub struct DiskOpenError {
    path: PathBuf,
    cause: io::Error,
}

fn open_backing(path: &Path) -> Result<File, DiskOpenError> {
    File::open(path).map_err(|cause| DiskOpenError {
        path: path.into(),
        cause,
    })
}

fn open_file(path: &Path, write: bool) -> Result<File, DiskError> {
    File::options()
        .read(true)
        .write(write)
        .open(path)
        .map_err(|cause| DiskError::Open {
            path: path.into(),
            cause,
        })
}

/// Every disk of the run, opened: the root disk first.
pub fn open_all(args: &RunArgs) -> Result<Vec<OpenedDisk>, RunError> {
    let mut disks = Vec::new();
    if let Some(rootfs) = &args.rootfs {
        require_file(
            rootfs,
            "rootfs",
            "build one with scripts/build-image default, or pass --rootfs",
        )?;
        disks.push(open_rootfs(args, rootfs)?);
    }
    for value in &args.disks {
        let disk: DiskConfig = value.parse().map_err(|reason| RunError::Disk {
            value: value.clone(),
            reason,
        })?;
        require_file(
            &disk.path,
            "disk",
            "make one with mkfs.ext4, or check --disk",
        )?;
        let top = open_file(&disk.path, !disk.read_only)?;
        let format = if disk.format == DiskFormat::Raw && disk.backing.is_empty() {
            FormatSource::ByName
        } else {
            FormatSource::Stated(disk.format)
        };
        disks.push(
            disk_image::open_chain(
                &absolute(&disk.path)?,
                top,
                format,
                disk.read_only,
                open_backing,
            )
            .map_err(DiskError::from)?,
        );
    }
    Ok(disks)
}

fn absolute(path: &Path) -> Result<PathBuf, DiskError> {
    std::path::absolute(path)
        .map(|p| husk_host::jail::normalize(&p))
        .map_err(|cause| DiskError::Open {
            path: path.into(),
            cause,
        })
}

fn open_rootfs(args: &RunArgs, rootfs: &Path) -> Result<OpenedDisk, DiskError> {
    let base_path = absolute(rootfs)?;
    let format = args
        .rootfs_format
        .map_or(FormatSource::ByName, FormatSource::Stated);
    if args.write_rootfs {
        let top = open_file(&base_path, true)?;
        return Ok(disk_image::open_chain(
            &base_path,
            top,
            format,
            false,
            open_backing,
        )?);
    }
    let base_format = format.resolve(&base_path);
    let overlay_err = |path: &Path, cause: String| DiskError::Overlay {
        path: path.into(),
        cause,
    };
    let (overlay, overlay_path) = match &args.overlay {
        Some(path) => {
            let path = absolute(path)?;
            match File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(file) => {
                    let base = open_file(&base_path, false)?;
                    if let Err(e) =
                        disk_image::create_overlay(&file, &base_path, &base, base_format, None)
                    {
                        let _ = std::fs::remove_file(&path);
                        return Err(overlay_err(&path, e.to_string()));
                    }
                    (file, path)
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    (open_file(&path, true)?, path)
                }
                Err(cause) => return Err(DiskError::Open { path, cause }),
            }
        }
        None => {
            let dir = std::env::var_os("HUSK_OVERLAY_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/var/tmp"));
            let file = anonymous_file(&dir).map_err(|e| {
                overlay_err(&dir, format!("cannot make an anonymous file there: {e}"))
            })?;
            let base = open_file(&base_path, false)?;
            disk_image::create_overlay(&file, &base_path, &base, base_format, None)
                .map_err(|e| overlay_err(&dir, e.to_string()))?;
            (file, dir.join("(anonymous overlay)"))
        }
    };
    let opened = disk_image::open_chain(
        &overlay_path,
        overlay,
        FormatSource::Stated(DiskFormat::Qcow2),
        false,
        open_backing,
    )?;
    // A kept overlay must sit on this --rootfs, not on some other image.
    if args.overlay.is_some() {
        let base = open_file(&base_path, false)?;
        let same = |a: &File, b: &File| {
            use std::os::unix::fs::MetadataExt;
            match (a.metadata(), b.metadata()) {
                (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
                _ => false,
            }
        };
        if opened.files.get(1).is_none_or(|f| !same(f, &base)) {
            return Err(overlay_err(
                &overlay_path,
                format!("its backing file is not {}", base_path.display()),
            ));
        }
    }
    Ok(opened)
}

/// A file with no name in `dir`: O_TMPFILE, or where the file system lacks it, a new file
/// unlinked at once.
fn anonymous_file(dir: &Path) -> io::Result<File> {
    let mode = Mode::from_raw_mode(0o600);
    match rustix::fs::open(dir, OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC, mode) {
        Ok(fd) => return Ok(File::from(fd)),
        Err(e) if e != rustix::io::Errno::OPNOTSUPP && e != rustix::io::Errno::ISDIR => {
            return Err(e.into())
        }
        Err(_) => {}
    }
    let mut random = [0u8; 8];
    rustix::rand::getrandom(&mut random, rustix::rand::GetRandomFlags::empty())?;
    let name = dir.join(format!(".husk-overlay-{:016x}", u64::from_ne_bytes(random)));
    let fd = rustix::fs::open(
        &name,
        OFlags::CREATE | OFlags::EXCL | OFlags::RDWR | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        mode,
    )?;
    rustix::fs::unlink(&name)?;
    Ok(File::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anonymous_files_leave_no_name_behind() {
        let dir = std::env::temp_dir().join(format!("husk-anon-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = anonymous_file(&dir).unwrap();
        f.set_len(4096).unwrap();
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        std::fs::remove_dir(&dir).unwrap();
    }
}
