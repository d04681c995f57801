//! Moving a jailed VMM's snapshot out of its jail.
//!
//! A jailed husk-vmm sees only its jail: the VM's `vmm/` directory (read-write) and the files
//! mirrored into it. It cannot write into the directory a SnapshotVm caller names, so it writes
//! into `vmm/snapshot/` and huskd moves the files from there: a rename where both lie on one
//! filesystem, else a copy that keeps the memory file's holes (only its data extents are
//! copied, found with SEEK_DATA/SEEK_HOLE), synced before it is renamed into place.
//!
//! Why not pass huskd-opened fds over the control socket instead: the VMM records paths in the
//! state file (a diff names its base), and a restore mirrors those paths into the new jail; a
//! staged write keeps one code path in the VMM for jailed and unjailed runs.

use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Where a jailed VMM writes its snapshot, inside the VM's `vmm/` directory.
pub const STAGING_DIR: &str = "snapshot";

/// Creates the (empty) staging directory, owned by the jailed user.
pub fn prepare_staging(vmm_dir: &Path, owner: (u32, u32)) -> io::Result<PathBuf> {
    let staging = vmm_dir.join(STAGING_DIR);
    if staging.exists() {
        fs::remove_dir_all(&staging)?;
    }
    fs::create_dir(&staging)?;
    std::os::unix::fs::chown(&staging, Some(owner.0), Some(owner.1))?;
    Ok(staging)
}

/// Moves `names` from `from` into `to` (which must not hold them), then removes `from`.
pub fn move_files(from: &Path, to: &Path, names: &[&str]) -> io::Result<()> {
    for name in names {
        let (src, dst) = (from.join(name), to.join(name));
        move_file(&src, &dst)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dst.display())))?;
        // The files were written by the jailed user; the snapshot now belongs to huskd's.
        // SAFETY: geteuid/getegid only read the process's credentials.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        std::os::unix::fs::chown(&dst, Some(uid), Some(gid))?;
    }
    fs::remove_dir_all(from)
}

fn move_file(src: &Path, dst: &Path) -> io::Result<()> {
    match fs::rename(src, dst) {
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            copy_sparse(src, dst)?;
            fs::remove_file(src)
        }
        other => other,
    }
}

/// Copies `src` to `dst` through `dst.tmp`, data extents only (holes stay holes).
fn copy_sparse(src: &Path, dst: &Path) -> io::Result<()> {
    let input = File::open(src)?;
    let len = input.metadata()?.len();
    let mut tmp_name = dst.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let output = File::create(&tmp)?;
    let copied = (|| {
        output.set_len(len)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut offset = 0u64;
        while offset < len {
            let Some(data) = seek(&input, offset, libc::SEEK_DATA)? else {
                break;
            };
            let end = seek(&input, data, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
            let mut at = data;
            while at < end {
                let want = usize::try_from(end - at)
                    .unwrap_or(usize::MAX)
                    .min(buf.len());
                let n = input.read_at(&mut buf[..want], at)?;
                if n == 0 {
                    return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
                }
                output.write_all_at(&buf[..n], at)?;
                at += n as u64;
            }
            offset = end;
        }
        output.sync_all()
    })();
    match copied.and_then(|()| fs::rename(&tmp, dst)) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// lseek(2) with SEEK_DATA/SEEK_HOLE; None where no data follows (ENXIO).
fn seek(file: &File, offset: u64, whence: i32) -> io::Result<Option<u64>> {
    let offset = i64::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek on an fd this File owns; it moves only that description's offset.
    let at = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if at < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(Some(at as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("huskd-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_sparse_copy_keeps_data_and_holes() {
        let dir = scratch("sparse");
        let (src, dst) = (dir.join("src"), dir.join("dst"));
        let file = File::create(&src).unwrap();
        file.set_len(64 << 20).unwrap();
        file.write_all_at(b"first", 4096).unwrap();
        file.write_all_at(b"last", (64 << 20) - 4).unwrap();
        drop(file);
        copy_sparse(&src, &dst).unwrap();
        let out = fs::read(&dst).unwrap();
        assert_eq!(out.len(), 64 << 20);
        assert_eq!(&out[4096..4101], b"first");
        assert_eq!(&out[(64 << 20) - 4..], b"last");
        assert!(out[..4096].iter().all(|b| *b == 0));
        // Holes stayed holes: far fewer blocks than the length.
        use std::os::unix::fs::MetadataExt;
        assert!(fs::metadata(&dst).unwrap().blocks() * 512 < 8 << 20);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn moving_empties_the_staging_directory() {
        let dir = scratch("move");
        let (from, to) = (dir.join("from"), dir.join("to"));
        fs::create_dir_all(&from).unwrap();
        fs::create_dir_all(&to).unwrap();
        fs::write(from.join("a"), b"A").unwrap();
        move_files(&from, &to, &["a"]).unwrap();
        assert_eq!(fs::read(to.join("a")).unwrap(), b"A");
        assert!(!from.exists());
        assert!(move_files(&from, &to, &["a"]).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
