//! The container's root filesystem as a block device for its VM: the rootfs that containerd
//! prepared (snapshot mounts, or the bundle's `rootfs/` directory) is copied into a fresh,
//! sparse ext4 image with `mkfs.ext4 -d`, which needs no loop device and no mount of the image.
//!
//! Why a copy and not a shared filesystem: the guest kernel has virtio-blk but no virtio-fs or
//! 9p, and husk's VMM emulates no vhost-user device. The cost is that writes in the container
//! land in the image, not in containerd's snapshot. An overlayfs-snapshotter rootfs is copied
//! once per OCI image into a shared read-only base ([`build_base`], [`crate::base`]) that each
//! container's VM uses through its own copy-on-write overlay; other rootfs (native snapshotter,
//! bundle directory) get a copy per container ([`build`]). Numbers in docs/containerd.md.

use std::path::{Path, PathBuf};

use std::time::{Duration, Instant};

use containerd_shim_protos::api::Mount;

/// Free space the container gets on top of its files (the image is sparse: unused space costs
/// nothing on the host).
// The image building itself is husk_host::ext4_tree's (shared with `husk run --image`).
pub use husk_host::ext4_tree::TreeError as RootfsError;
#[cfg(test)]
use husk_host::ext4_tree::HEADROOM_BYTES;
use husk_host::ext4_tree::{make_image, make_image_from_layers, unmount};

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

/// Builds a shared base image at `image` from an image's layers alone (see [`crate::base`]):
/// one layer is read in place; several are stacked by a read-only overlay mount (lowerdirs
/// only: whiteouts and opaque directories resolved as the container would see them) on
/// `bundle/rootfs` for the time of the copy. Returns the bytes of files copied.
pub fn build_base(
    bundle: &Path,
    layers: &crate::base::Layers,
    image: &Path,
) -> Result<u64, RootfsError> {
    make_image_from_layers(
        &layers.lowerdirs,
        &layers.options,
        &bundle.join("rootfs"),
        image,
    )
}

/// Unmounts whatever is still mounted on `bundle/rootfs` (after a crash) and removes `image`,
/// the container's own copy when it has one (a shared base is never removed here).
pub fn cleanup(bundle: &Path, image: Option<&Path>) {
    unmount(&bundle.join("rootfs"));
    if let Some(image) = image {
        let _ = std::fs::remove_file(image);
    }
}

fn mount(m: &Mount, target: &Path) -> Result<(), RootfsError> {
    mount_in(m, target, None)
}

/// `mount` run in `cwd` (relative directories in the options are resolved there).
fn mount_in(m: &Mount, target: &Path, cwd: Option<&Path>) -> Result<(), RootfsError> {
    husk_host::ext4_tree::mount_in(&m.type_, &m.source, &m.options, target, cwd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

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
        cleanup(&bundle, Some(&image));
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

    /// Reads `path` out of an ext4 image with debugfs (no mount); None when it is not there.
    fn cat(image: &Path, path: &str) -> Option<String> {
        let out = Command::new("debugfs")
            .args(["-R", &format!("cat {path}")])
            .arg(image)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        (!err.contains("File not found")).then(|| String::from_utf8_lossy(&out.stdout).into())
    }

    #[test]
    fn a_base_is_the_layers_merged_with_whiteouts_applied_and_nothing_stays_mounted() {
        let dir = scratch("base");
        let (top, bottom) = (dir.join("top"), dir.join("bottom"));
        std::fs::create_dir_all(top.join("etc")).unwrap();
        std::fs::create_dir_all(bottom.join("etc")).unwrap();
        std::fs::write(bottom.join("etc/b"), b"from the bottom\n").unwrap();
        std::fs::write(bottom.join("etc/shadowed"), b"old\n").unwrap();
        std::fs::write(bottom.join("etc/gone"), b"deleted above\n").unwrap();
        std::fs::write(top.join("etc/shadowed"), b"new\n").unwrap();
        // An overlayfs whiteout: a 0/0 character device.
        rustix::fs::mknodat(
            rustix::fs::CWD,
            top.join("etc/gone"),
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let layers = crate::base::Layers {
            lowerdirs: vec![top.clone(), bottom.clone()],
            options: vec!["index=off".into()],
        };
        let bundle = dir.join("bundle");
        let image = dir.join("base.ext4");
        let bytes = build_base(&bundle, &layers, &image).unwrap();
        assert!(bytes > 0);
        assert_eq!(cat(&image, "/etc/b").as_deref(), Some("from the bottom\n"));
        assert_eq!(cat(&image, "/etc/shadowed").as_deref(), Some("new\n"));
        assert_eq!(cat(&image, "/etc/gone"), None);
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        assert!(!mounts.contains(&*dir.to_string_lossy()), "{mounts}");
        // One layer is read in place (no mount).
        let single = crate::base::Layers {
            lowerdirs: vec![bottom],
            options: vec![],
        };
        let image2 = dir.join("single.ext4");
        build_base(&bundle, &single, &image2).unwrap();
        assert_eq!(
            cat(&image2, "/etc/gone").as_deref(),
            Some("deleted above\n")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn many_layers_with_long_paths_are_mounted_relative_to_their_common_directory() {
        let dir = scratch("manylayers");
        let snapshots = dir.join("io.containerd.snapshotter.v1.overlayfs-with-a-long-root-name");
        // 50 layers of ~100 bytes each: over a page of options with absolute paths.
        let lowerdirs: Vec<PathBuf> = (0..50)
            .map(|i| {
                let d = snapshots.join(format!("{i}")).join("fs");
                std::fs::create_dir_all(&d).unwrap();
                std::fs::write(d.join(format!("file{i}")), format!("{i}\n")).unwrap();
                d
            })
            .collect();
        let total: usize = lowerdirs.iter().map(|d| d.as_os_str().len() + 1).sum();
        assert!(total > 4096, "{total}");
        assert_eq!(
            husk_host::ext4_tree::common_dir(&lowerdirs).as_deref(),
            Some(snapshots.as_path())
        );
        let layers = crate::base::Layers {
            lowerdirs,
            options: vec![],
        };
        let image = dir.join("many.ext4");
        build_base(&dir.join("bundle"), &layers, &image).unwrap();
        assert_eq!(cat(&image, "/file0").as_deref(), Some("0\n"));
        assert_eq!(cat(&image, "/file49").as_deref(), Some("49\n"));
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
