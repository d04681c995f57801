//! The jail's file tree: a small tmpfs, mounted inside the jail's own mount namespace on
//! `<base>/<id>/root`, holding only what the VMM needs, then made the root with pivot_root.
//!
//! - the VMM binary at `/husk-vmm` and the libraries it links (read-only bind mounts);
//! - every `--file` (kernel, initrd) read-only and every `--dir` (the VM's state directory)
//!   read-write, each at its host path, so the VMM's arguments need no rewriting;
//! - `/dev/kvm`, `/dev/net/tun`, `/dev/urandom`: device nodes owned by the jailed user.
//!
//! Bind mounts, not hard links: they work across filesystems and for directories, need no
//! write access to where the originals live, and never change an original's owner or link
//! count. Because every mount is made in the jail's private mount namespace, none is visible on
//! the host and all of them vanish with the namespace when the VMM ends, even after kill -9:
//! on the host the jail is just an empty directory for `--cleanup` to remove.

use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{FileType, Gid, Mode, Uid, CWD};
use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};

/// Devices the VMM opens, created in the jail with the host's numbers.
pub const DEVICES: &[&str] = &["/dev/kvm", "/dev/net/tun", "/dev/urandom"];

/// Where the VMM binary appears in the jail.
pub const VMM_IN_JAIL: &str = "/husk-vmm";

/// A step of building the tree that failed: what was done to which path.
#[derive(Debug, thiserror::Error)]
#[error("{op} {}", path.display())]
pub struct TreeError {
    op: &'static str,
    path: PathBuf,
    #[source]
    source: io::Error,
}

/// Names the operation and path of a failed call.
trait Context<T> {
    fn context(self, op: &'static str, path: &Path) -> Result<T, TreeError>;
}

impl<T, E: Into<io::Error>> Context<T> for Result<T, E> {
    fn context(self, op: &'static str, path: &Path) -> Result<T, TreeError> {
        self.map_err(|e| TreeError {
            op,
            path: path.to_path_buf(),
            source: e.into(),
        })
    }
}

/// Makes every mount below `/` private: nothing mounted from here on propagates to the host.
pub fn make_mounts_private() -> Result<(), TreeError> {
    let root = Path::new("/");
    rustix::mount::mount_change(
        root,
        MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
    )
    .context("mount", root)
}

/// Mounts the jail's own tmpfs on `root`.
pub fn mount_tmpfs(root: &Path, data: &std::ffi::CStr) -> Result<(), TreeError> {
    rustix::mount::mount("tmpfs", root, "tmpfs", MountFlags::NOSUID, data).context("mount", root)
}

/// Remounts the bind mount (or root) at `target` with `flags` (MS_REMOUNT | MS_BIND | flags).
pub fn remount_bind(target: &Path, flags: MountFlags) -> Result<(), TreeError> {
    // The kernel ignores the data of a bind remount; rustix passes an empty string.
    rustix::mount::mount_remount(target, MountFlags::BIND | flags, c"").context("mount", target)
}

/// `host` seen from inside the jail root `root`.
pub fn in_root(root: &Path, host: &Path) -> PathBuf {
    root.join(host.strip_prefix("/").unwrap_or(host))
}

/// Bind-mounts `host` onto the same path under `root`: read-only, or read-write without
/// exec/suid/devices.
pub fn bind(root: &Path, host: &Path, target: &Path, writable: bool) -> Result<(), TreeError> {
    let meta = std::fs::metadata(host).context("stat", host)?;
    let dst = in_root(root, target);
    let parent = dst.parent().unwrap_or(root);
    std::fs::create_dir_all(parent).context("mkdir", parent)?;
    if meta.is_dir() {
        std::fs::create_dir_all(&dst)
    } else {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o444)
            .open(&dst)
            .map(drop)
    }
    .context("creating", &dst)?;
    rustix::mount::mount_bind(host, &dst).context("mount", &dst)?;
    let flags = if writable {
        MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC
    } else {
        MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV
    };
    remount_bind(&dst, flags)
}

/// Creates `device` under `root` as a node with the host's numbers, owned by uid:gid, 0600.
pub fn device_node(root: &Path, device: &Path, uid: u32, gid: u32) -> Result<(), TreeError> {
    let meta = std::fs::metadata(device).context("stat", device)?;
    let dst = in_root(root, device);
    if let Some(parent) = dst.parent() {
        std::fs::create_dir_all(parent).context("mkdir", parent)?;
    }
    rustix::fs::mknodat(
        CWD,
        &dst,
        FileType::CharacterDevice,
        Mode::from_raw_mode(0o600),
        meta.rdev(),
    )
    .context("mknod", &dst)?;
    rustix::fs::chown(&dst, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
        .context("chown", &dst)
}

/// Makes `root` the root directory of this mount namespace; the old root is detached.
pub fn pivot_into(root: &Path) -> Result<(), TreeError> {
    std::env::set_current_dir(root).context("chdir", root)?;
    let dot = Path::new(".");
    // pivot_root(".", ".") stacks the old root on top of the new one (pivot_root(2), "new_root
    // and put_old may be the same directory").
    rustix::process::pivot_root(dot, dot).context("pivot_root", root)?;
    // Detaches the old root, now mounted on ".".
    rustix::mount::unmount(dot, UnmountFlags::DETACH).context("detaching the old root", dot)?;
    let slash = Path::new("/");
    std::env::set_current_dir(slash).context("chdir", slash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_paths_are_mirrored_under_the_root() {
        let root = Path::new("/run/husk/jail/vm1/root");
        assert_eq!(
            in_root(root, Path::new("/home/u/vmlinux")),
            PathBuf::from("/run/husk/jail/vm1/root/home/u/vmlinux")
        );
        assert_eq!(in_root(root, Path::new(VMM_IN_JAIL)), root.join("husk-vmm"));
    }
}
