//! A directory tree made into an ext4 image (`mkfs.ext4 -d`, no loop device, no mount of the
//! image), and image layers stacked by a read-only overlay mount for the time of that copy.
//! The containerd shim (container rootfs and shared bases) and `husk run --image` (OCI image
//! bases) build their images here.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Free space in every image built here, beyond its files: it costs nothing until used (the
/// file is sparse) and gives the container room to write.
pub const HEADROOM_BYTES: u64 = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("{0} is not a directory")]
    NotADirectory(String),
    #[error("cannot read the tree: {0}")]
    Walk(#[source] std::io::Error),
    #[error("cannot create {path}: {source}")]
    Create {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("mkfs.ext4 failed: {0}")]
    Mkfs(String),
    #[error("mounting {kind} from {source_path} failed: {message}")]
    Mount {
        kind: String,
        source_path: String,
        message: String,
    },
}

/// Bytes and inodes that a copy of `dir` needs.
pub fn measure(dir: &Path) -> Result<(u64, u64), TreeError> {
    let (mut bytes, mut inodes) = (0u64, 1u64);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).map_err(TreeError::Walk)? {
            let entry = entry.map_err(TreeError::Walk)?;
            let meta = entry.metadata().map_err(TreeError::Walk)?;
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

/// Copies the tree at `source` into a new ext4 image at `image` (created or replaced), sized
/// for its files plus [`HEADROOM_BYTES`]. Returns the bytes of files copied.
pub fn make_image(source: &Path, image: &Path) -> Result<u64, TreeError> {
    if !source.is_dir() {
        return Err(TreeError::NotADirectory(source.display().to_string()));
    }
    let (bytes, inodes) = measure(source)?;
    // ext4 metadata (inode tables, bitmaps) on top of the data, and the headroom.
    let size = (bytes + bytes / 8 + HEADROOM_BYTES).div_ceil(1 << 20) << 20;
    let create = |source| TreeError::Create {
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
        .map_err(|e| TreeError::Mkfs(format!("cannot run mkfs.ext4: {e}")))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(image);
        return Err(TreeError::Mkfs(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(bytes)
}

/// Builds an image at `image` from `layers` (top first, overlayfs' lowerdir order, each in
/// overlayfs' whiteout format): one layer is read in place; several are stacked by a read-only
/// overlay mount on the empty directory `at` for the time of the copy (`options`: extra overlay
/// options, e.g. `userxattr`). Returns the bytes of files copied.
pub fn make_image_from_layers(
    layers: &[PathBuf],
    options: &[String],
    at: &Path,
    image: &Path,
) -> Result<u64, TreeError> {
    if let [only] = layers {
        return make_image(only, image);
    }
    std::fs::create_dir_all(at).map_err(TreeError::Walk)?;
    let with = |lowers: Vec<String>| {
        let mut all = vec!["ro".to_string()];
        all.extend(options.iter().cloned());
        all.push(format!("lowerdir={}", lowers.join(":")));
        all
    };
    let absolute = with(layers.iter().map(|d| d.display().to_string()).collect());
    // The kernel takes at most a page of mount options: a long list of layers is given
    // relative to their common directory, with `mount` run there (as containerd does).
    let (options, cwd) = match common_dir(layers) {
        Some(common) if absolute.join(",").len() >= 4000 => {
            let relative = layers
                .iter()
                .filter_map(|d| d.strip_prefix(&common).ok())
                .map(|d| d.display().to_string())
                .collect();
            (with(relative), Some(common))
        }
        _ => (absolute, None),
    };
    mount_in("overlay", "overlay", &options, at, cwd.as_deref())?;
    let result = make_image(at, image);
    unmount(at);
    result
}

/// The deepest directory that holds all of `dirs` (none of them itself), if any but `/`.
pub fn common_dir(dirs: &[PathBuf]) -> Option<PathBuf> {
    let mut common = dirs.first()?.parent()?.to_path_buf();
    for d in dirs {
        while !d.starts_with(&common) || d == &common {
            common = common.parent()?.to_path_buf();
        }
    }
    (common.parent().is_some()).then_some(common)
}

/// `mount -t KIND -o OPTIONS SOURCE TARGET`, run in `cwd` (relative directories in the options
/// are resolved there).
pub fn mount_in(
    kind: &str,
    source: &str,
    options: &[String],
    target: &Path,
    cwd: Option<&Path>,
) -> Result<(), TreeError> {
    let mut cmd = Command::new("mount");
    if let Some(cwd) = cwd {
        cmd.current_dir(cwd);
    }
    if !kind.is_empty() {
        cmd.arg("-t").arg(kind);
    }
    if !options.is_empty() {
        cmd.arg("-o").arg(options.join(","));
    }
    let failed = |message: String| TreeError::Mount {
        kind: kind.to_string(),
        source_path: source.to_string(),
        message,
    };
    let out = cmd
        .arg(source)
        .arg(target)
        .output()
        .map_err(|e| failed(e.to_string()))?;
    if !out.status.success() {
        return Err(failed(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(())
}

/// Detaches whatever is mounted at `target` (lazily: a stray reader must not make a cleanup
/// fail).
pub fn unmount(target: &Path) {
    let _ = rustix::mount::unmount(target, rustix::mount::UnmountFlags::DETACH);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_common_directory_of_layers() {
        let p = |s: &str| PathBuf::from(s);
        assert_eq!(
            common_dir(&[p("/s/snapshots/1/fs"), p("/s/snapshots/22/fs")]),
            Some(p("/s/snapshots"))
        );
        assert_eq!(common_dir(&[p("/s/a/fs")]), Some(p("/s/a")));
        assert_eq!(common_dir(&[p("/s/a"), p("/s/a/b")]), Some(p("/s")));
        assert_eq!(common_dir(&[p("/a/x"), p("/b/y")]), None);
    }
}
