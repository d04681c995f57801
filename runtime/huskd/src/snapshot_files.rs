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

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use husk_host::confined::{chown_fd, Dir};
use rustix::fs::{OFlags, SeekFrom};

use crate::store;

/// Where a VMM writes its snapshot, inside the VM's `vmm/` directory.
pub const STAGING_DIR: &str = "snapshot";

/// Creates the (empty) staging directory in the VM's `vmm/`, owned by the VMM's uid: whatever
/// stood at that name (the VMM's user may have planted a link) is removed, never followed.
pub fn prepare_staging(vm_dir: &Path, vmm_uid: u32) -> io::Result<()> {
    let vmm = Dir::open(vm_dir)?.subdir(store::VMM_DIR)?;
    let staging = vmm.create_subdir(STAGING_DIR, store::DIR_MODE, true)?;
    chown_fd(staging.fd(), vmm_uid, vmm_uid)
}

/// Removes the staging directory (best effort: it is made anew before every snapshot).
pub fn remove_staging(vm_dir: &Path) {
    if let Ok(vmm) = Dir::open(vm_dir).and_then(|d| d.subdir(store::VMM_DIR)) {
        let _ = vmm.remove_tree(STAGING_DIR);
    }
}

/// Moves `names` from the staging directory into `to`, each a regular file with one link that
/// the VMM's uid owns (anything else is refused): a rename where both lie on one filesystem,
/// else a copy of the file huskd holds open. The results are huskd's, mode 0600.
pub fn move_out(vm_dir: &Path, to: &Dir, vmm_uid: u32, names: &[&str]) -> io::Result<()> {
    let staging = Dir::open(vm_dir)?
        .subdir(store::VMM_DIR)?
        .subdir(STAGING_DIR)?;
    for name in names {
        match staging.move_file_to(name, to, vmm_uid, store::FILE_MODE) {
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::XDEV.raw_os_error()) => {
                let (src, _) = staging.open_owned_file(name, vmm_uid)?;
                copy_sparse(&src, to, name)?;
                staging.remove_file(name)?;
            }
            Err(e) => return Err(io::Error::new(e.kind(), format!("{name}: {e}"))),
            Ok(_) => {}
        }
    }
    Ok(())
}

/// Gives the files an unjailed VMM wrote into `dir` mode 0600, through fds opened without
/// following links.
pub fn seal(dir: &Dir, names: &[&str]) -> io::Result<()> {
    for name in names {
        let file = dir.open_file(name, OFlags::RDONLY, 0)?;
        rustix::fs::fchmod(&file, rustix::fs::Mode::from_raw_mode(store::FILE_MODE))?;
    }
    Ok(())
}

/// Copies `input` into `to/name` through `name.tmp` (created exclusively, 0600), data extents
/// only (holes stay holes), synced, then renamed into place without replacing anything.
fn copy_sparse(input: &File, to: &Dir, name: &str) -> io::Result<()> {
    let len = input.metadata()?.len();
    let tmp = format!("{name}.tmp");
    let output = to.open_file(
        &tmp,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL,
        store::FILE_MODE,
    )?;
    let copied = (|| {
        output.set_len(len)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut offset = 0u64;
        while offset < len {
            let Some(data) = seek(input, SeekFrom::Data(offset))? else {
                break;
            };
            let end = seek(input, SeekFrom::Hole(data))?.unwrap_or(len).min(len);
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
        output.sync_all()?;
        rustix::fs::renameat_with(
            to.fd(),
            tmp.as_str(),
            to.fd(),
            name,
            rustix::fs::RenameFlags::NOREPLACE,
        )?;
        Ok(())
    })();
    if copied.is_err() {
        let _ = to.remove_file(&tmp);
    }
    copied
}

/// lseek(2) with SEEK_DATA/SEEK_HOLE; None where no data follows (ENXIO).
fn seek(file: &File, whence: SeekFrom) -> io::Result<Option<u64>> {
    match rustix::fs::seek(file, whence) {
        Ok(at) => Ok(Some(at)),
        Err(rustix::io::Errno::NXIO) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("huskd-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_sparse_copy_keeps_data_and_holes() {
        let dir = scratch("sparse");
        let src = dir.join("src");
        let file = File::create(&src).unwrap();
        file.set_len(64 << 20).unwrap();
        file.write_all_at(b"first", 4096).unwrap();
        file.write_all_at(b"last", (64 << 20) - 4).unwrap();
        drop(file);
        std::fs::create_dir(dir.join("to")).unwrap();
        let to = Dir::open(&dir.join("to")).unwrap();
        copy_sparse(&File::open(&src).unwrap(), &to, "dst").unwrap();
        let dst = dir.join("to/dst");
        let out = std::fs::read(&dst).unwrap();
        assert_eq!(out.len(), 64 << 20);
        assert_eq!(&out[4096..4101], b"first");
        assert_eq!(&out[(64 << 20) - 4..], b"last");
        assert!(out[..4096].iter().all(|b| *b == 0));
        // Holes stayed holes: far fewer blocks than the length.
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(&dst).unwrap().blocks() * 512 < 8 << 20);
        assert!(
            copy_sparse(&File::open(&src).unwrap(), &to, "dst").is_err(),
            "an existing file is never replaced"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn staging_refuses_planted_links_and_moving_empties_it() {
        let dir = scratch("move");
        let me = rustix::process::geteuid().as_raw();
        std::fs::create_dir_all(dir.join("vm/vmm")).unwrap();
        std::fs::create_dir_all(dir.join("to")).unwrap();
        std::fs::create_dir_all(dir.join("elsewhere")).unwrap();
        // The VMM's user planted a link where the staging directory goes.
        std::os::unix::fs::symlink(dir.join("elsewhere"), dir.join("vm/vmm/snapshot")).unwrap();
        prepare_staging(&dir.join("vm"), me).unwrap();
        assert!(std::fs::symlink_metadata(dir.join("vm/vmm/snapshot"))
            .unwrap()
            .is_dir());
        std::fs::write(dir.join("vm/vmm/snapshot/a"), b"A").unwrap();
        std::fs::write(dir.join("secret"), b"S").unwrap();
        std::os::unix::fs::symlink(dir.join("secret"), dir.join("vm/vmm/snapshot/b")).unwrap();
        let to = Dir::open(&dir.join("to")).unwrap();
        move_out(&dir.join("vm"), &to, me, &["a"]).unwrap();
        assert_eq!(std::fs::read(dir.join("to/a")).unwrap(), b"A");
        assert!(move_out(&dir.join("vm"), &to, me, &["b"]).is_err());
        assert!(!dir.join("to/b").exists());
        remove_staging(&dir.join("vm"));
        assert!(!dir.join("vm/vmm/snapshot").exists());
        assert_eq!(std::fs::read(dir.join("secret")).unwrap(), b"S");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
