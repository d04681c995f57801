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

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Devices the VMM opens, created in the jail with the host's numbers.
pub const DEVICES: &[&str] = &["/dev/kvm", "/dev/net/tun", "/dev/urandom"];

/// Where the VMM binary appears in the jail.
pub const VMM_IN_JAIL: &str = "/husk-vmm";

fn cstr(p: &Path) -> Result<CString, String> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| format!("{} contains NUL", p.display()))
}

fn check(rc: libc::c_int, what: impl FnOnce() -> String) -> Result<(), String> {
    if rc == 0 {
        Ok(())
    } else {
        Err(format!("{}: {}", what(), std::io::Error::last_os_error()))
    }
}

/// mount(2) with optional source, type and data.
pub fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), String> {
    let src = source.map(cstr).transpose()?;
    let dst = cstr(target)?;
    let fstype = fstype.map(|t| CString::new(t).unwrap_or_default());
    let data = data.map(|d| CString::new(d).unwrap_or_default());
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string alive for the call.
    let rc = unsafe {
        libc::mount(
            ptr(&src),
            dst.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    };
    check(rc, || format!("mount {}", target.display()))
}

/// `host` seen from inside the jail root `root`.
pub fn in_root(root: &Path, host: &Path) -> PathBuf {
    root.join(host.strip_prefix("/").unwrap_or(host))
}

/// Bind-mounts `host` onto the same path under `root`: read-only, or read-write without
/// exec/suid/devices.
pub fn bind(root: &Path, host: &Path, target: &Path, writable: bool) -> Result<(), String> {
    let meta = std::fs::metadata(host).map_err(|e| format!("{}: {e}", host.display()))?;
    let dst = in_root(root, target);
    let parent = dst.parent().unwrap_or(root);
    std::fs::create_dir_all(parent).map_err(|e| format!("mkdir {}: {e}", parent.display()))?;
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
    .map_err(|e| format!("creating {}: {e}", dst.display()))?;
    mount(Some(host), &dst, None, libc::MS_BIND, None)?;
    let flags = if writable {
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC
    } else {
        libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV
    };
    mount(
        None,
        &dst,
        None,
        libc::MS_BIND | libc::MS_REMOUNT | flags,
        None,
    )
}

/// Creates `device` under `root` as a node with the host's numbers, owned by uid:gid, 0600.
pub fn device_node(root: &Path, device: &Path, uid: u32, gid: u32) -> Result<(), String> {
    let meta = std::fs::metadata(device).map_err(|e| format!("{}: {e}", device.display()))?;
    let dst = in_root(root, device);
    if let Some(parent) = dst.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("mkdir {}: {e}", parent.display()))?;
    }
    let path = cstr(&dst)?;
    // SAFETY: mknod/chown on a NUL-terminated path alive for the calls.
    unsafe {
        check(
            libc::mknod(path.as_ptr(), libc::S_IFCHR | 0o600, meta.rdev()),
            || format!("mknod {}", dst.display()),
        )?;
        check(libc::chown(path.as_ptr(), uid, gid), || {
            format!("chown {}", dst.display())
        })
    }
}

/// Makes `root` the root directory of this mount namespace; the old root is detached.
pub fn pivot_into(root: &Path) -> Result<(), String> {
    std::env::set_current_dir(root).map_err(|e| format!("chdir {}: {e}", root.display()))?;
    let dot = c".";
    // SAFETY: pivot_root(".", ".") stacks the old root on top of the new one (pivot_root(2),
    // "new_root and put_old may be the same directory"); both strings are static.
    let rc = unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) } as i32;
    check(rc, || String::from("pivot_root"))?;
    // SAFETY: detaches the old root, now mounted on "."; a static string.
    let rc = unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) };
    check(rc, || String::from("detaching the old root"))?;
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))
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
