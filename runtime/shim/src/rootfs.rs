//! The container's root filesystem as a block device for its VM: the rootfs that containerd
//! prepared (snapshot mounts, or the bundle's `rootfs/` directory) is copied into a fresh,
//! sparse ext4 image with `mkfs.ext4 -d`, which needs no loop device and no mount of the image.
//!
//! Why a copy and not a shared filesystem: the guest kernel has virtio-blk but no virtio-fs or
//! 9p, and husk's VMM emulates no vhost-user device. For image-sized rootfs (busybox: ~1 MB,
//! Debian slim: ~80 MB) mkfs is fast (numbers in docs/containerd.md); the cost is that writes
//! in the container land in the image, not in containerd's snapshot.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use containerd_shim_protos::api::Mount;

/// Free space the container gets on top of its files (the image is sparse: unused space costs
/// nothing on the host).
const HEADROOM_BYTES: u64 = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("mounting the container rootfs ({kind} from {source_path}) failed: {message}")]
    Mount {
        kind: String,
        source_path: String,
        message: String,
    },
    #[error("the rootfs {0} is not a directory")]
    NotADirectory(String),
    #[error("reading the rootfs: {0}")]
    Walk(std::io::Error),
    #[error("creating the image {path}: {source}")]
    Create {
        path: String,
        source: std::io::Error,
    },
    #[error("mkfs.ext4 -d failed: {0}")]
    Mkfs(String),
}

/// A built image and what it took.
#[derive(Debug)]
pub struct Built {
    pub image: PathBuf,
    pub bytes_copied: u64,
    pub took: Duration,
}

/// Builds `image` from the container's rootfs: `mounts` (from CreateTask) mounted on
/// `bundle/rootfs` for the time of the copy, or, with no mounts, the bundle's root directory.
pub fn build(
    bundle: &Path,
    mounts: &[Mount],
    root_path: &str,
    image: &Path,
) -> Result<Built, RootfsError> {
    let start = Instant::now();
    let root = if root_path.is_empty() {
        bundle.join("rootfs")
    } else {
        bundle.join(root_path)
    };
    // A single bind mount (the native snapshotter) is copied from its source directly.
    let (source, mounted) = match mounts {
        [] => (root.clone(), false),
        [m] if m.type_ == "bind" || m.options.iter().any(|o| o == "bind" || o == "rbind") => {
            (PathBuf::from(&m.source), false)
        }
        _ => {
            std::fs::create_dir_all(&root).map_err(RootfsError::Walk)?;
            for m in mounts {
                if let Err(e) = mount(m, &root) {
                    // Undo the mounts made so far (stacked on the same target).
                    for _ in 0..mounts.len() {
                        unmount(&root);
                    }
                    return Err(e);
                }
            }
            (root.clone(), true)
        }
    };
    let result = make_image(&source, image);
    if mounted {
        unmount(&root);
    }
    let bytes_copied = result?;
    Ok(Built {
        image: image.to_path_buf(),
        bytes_copied,
        took: start.elapsed(),
    })
}

/// Unmounts whatever is still mounted on `bundle/rootfs` (after a crash) and removes `image`.
pub fn cleanup(bundle: &Path, image: &Path) {
    unmount(&bundle.join("rootfs"));
    let _ = std::fs::remove_file(image);
}

fn mount(m: &Mount, target: &Path) -> Result<(), RootfsError> {
    let mut cmd = Command::new("mount");
    if !m.type_.is_empty() {
        cmd.arg("-t").arg(&m.type_);
    }
    if !m.options.is_empty() {
        cmd.arg("-o").arg(m.options.join(","));
    }
    let out = cmd
        .arg(&m.source)
        .arg(target)
        .output()
        .map_err(|e| RootfsError::Mount {
            kind: m.type_.clone(),
            source_path: m.source.clone(),
            message: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(RootfsError::Mount {
            kind: m.type_.clone(),
            source_path: m.source.clone(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

fn unmount(target: &Path) {
    // Lazy: nothing in the shim keeps files open there, but a stray reader must not make the
    // cleanup fail.
    let _ = rustix::mount::unmount(target, rustix::mount::UnmountFlags::DETACH);
}

/// Bytes and inodes that a copy of `dir` needs.
fn measure(dir: &Path) -> Result<(u64, u64), RootfsError> {
    let (mut bytes, mut inodes) = (0u64, 1u64);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).map_err(RootfsError::Walk)? {
            let entry = entry.map_err(RootfsError::Walk)?;
            let meta = entry.metadata().map_err(RootfsError::Walk)?;
            inodes += 1;
            // Whole 4 KiB blocks, as ext4 stores them.
            bytes += meta.len().div_ceil(4096) * 4096 + 4096;
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok((bytes, inodes))
}

fn make_image(source: &Path, image: &Path) -> Result<u64, RootfsError> {
    if !source.is_dir() {
        return Err(RootfsError::NotADirectory(source.display().to_string()));
    }
    let (bytes, inodes) = measure(source)?;
    // ext4 metadata (inode tables, bitmaps) on top of the data, and the headroom.
    let size = (bytes + bytes / 8 + HEADROOM_BYTES).div_ceil(1 << 20) << 20;
    let create = |source| RootfsError::Create {
        path: image.display().to_string(),
        source,
    };
    if let Some(parent) = image.parent() {
        std::fs::create_dir_all(parent).map_err(create)?;
    }
    let file = std::fs::File::create(image).map_err(create)?;
    file.set_len(size).map_err(create)?;
    drop(file);
    let out = Command::new("mkfs.ext4")
        // No journal: the image lives as long as the container; nothing to recover after a
        // crash. Enough inodes for the files plus what the container creates.
        .args(["-q", "-F", "-O", "^has_journal", "-L", "husk-rootfs", "-N"])
        .arg((inodes * 2 + 4096).to_string())
        .arg("-d")
        .arg(source)
        .arg(image)
        .output()
        .map_err(|e| RootfsError::Mkfs(format!("cannot run mkfs.ext4: {e}")))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(image);
        return Err(RootfsError::Mkfs(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("husk-shim-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_bundle_rootfs_becomes_an_ext4_image_with_its_files() {
        let dir = scratch("image");
        let bundle = dir.join("bundle");
        std::fs::create_dir_all(bundle.join("rootfs/etc")).unwrap();
        std::fs::write(bundle.join("rootfs/etc/hello"), b"hello from the bundle\n").unwrap();
        let image = dir.join("img/rootfs.ext4");
        let built = build(&bundle, &[], "rootfs", &image).unwrap();
        assert!(built.bytes_copied > 0);
        let meta = std::fs::metadata(&image).unwrap();
        assert!(meta.len() >= HEADROOM_BYTES, "{}", meta.len());
        // debugfs reads the file back out of the image without mounting it.
        let out = Command::new("debugfs")
            .args(["-R", "cat /etc/hello"])
            .arg(&image)
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "hello from the bundle\n"
        );
        cleanup(&bundle, &image);
        assert!(!image.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_bind_mount_is_copied_from_its_source_and_a_missing_one_fails() {
        let dir = scratch("bind");
        std::fs::create_dir_all(dir.join("snap/bin")).unwrap();
        std::fs::write(dir.join("snap/bin/x"), b"x").unwrap();
        let m = Mount {
            type_: "bind".into(),
            source: dir.join("snap").display().to_string(),
            options: vec!["rbind".into(), "rw".into()],
            ..Default::default()
        };
        let image = dir.join("rootfs.ext4");
        build(&dir, std::slice::from_ref(&m), "rootfs", &image).unwrap();
        assert!(image.exists());
        let missing = Mount {
            source: dir.join("nope").display().to_string(),
            ..m
        };
        assert!(matches!(
            build(&dir, &[missing], "rootfs", &dir.join("other.ext4")),
            Err(RootfsError::NotADirectory(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_mount_that_fails_is_reported_and_nothing_stays_mounted() {
        let dir = scratch("badmount");
        let m = Mount {
            type_: "overlay".into(),
            source: "overlay".into(),
            options: vec![format!("lowerdir={}", dir.join("missing").display())],
            ..Default::default()
        };
        let err = build(&dir, &[m.clone(), m], "rootfs", &dir.join("x.ext4")).unwrap_err();
        assert!(matches!(err, RootfsError::Mount { .. }), "{err}");
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        assert!(!mounts.contains(&*dir.to_string_lossy()), "{mounts}");
        assert!(!dir.join("x.ext4").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
