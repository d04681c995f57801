//! The image store of `husk image`, `$HUSK_HOME/disk-images/`: what a name means, image sizes,
//! what an image is (format, sizes, backing file, backing chain) and removal with its
//! refusals. Everything here is local: no daemon.
//!
//! An image's format comes from its name (`.qcow2` is qcow2, anything else raw) or from the
//! user, never from its contents (see `husk_devices::virtio::block::format`); the contents are
//! only looked at to warn about a mismatch.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use husk_devices::virtio::block::format::{DiskFormat, MAX_CHAIN};
use husk_devices::virtio::block::qcow2;
use serde::Serialize;

/// A failure of `husk image`, as one line naming the path.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ImageError(pub String);

impl ImageError {
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }

    /// `PATH: cause`.
    pub fn io(path: &Path, cause: impl std::fmt::Display) -> Self {
        Self(format!("{}: {cause}", path.display()))
    }
}

/// The directory of the store.
pub const STORE_DIR: &str = "disk-images";

/// A size option: bytes, or a number with K, M, G or T (powers of 1024; KiB, MiB... too), a
/// non-zero multiple of 512 bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(end);
    let bad = || format!("{text:?} is not a size (e.g. 512M, 10G, 1T)");
    let n: u64 = number.parse().map_err(|_| bad())?;
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KIB" => 10,
        "M" | "MIB" => 20,
        "G" | "GIB" => 30,
        "T" | "TIB" => 40,
        _ => return Err(bad()),
    };
    let bytes = n
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))?;
    if bytes == 0 {
        return Err("a size must be more than 0".into());
    }
    if bytes % 512 != 0 {
        return Err(format!("{text:?} is not a multiple of 512 bytes"));
    }
    Ok(bytes)
}

/// A size for people: whole units where exact, else one decimal.
pub fn human_size(n: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        let u = 1u64 << shift;
        if n >= u {
            return if n % u == 0 {
                format!("{} {unit}", n >> shift)
            } else {
                format!("{:.1} {unit}", n as f64 / u as f64)
            };
        }
    }
    format!("{n} B")
}

/// What `husk image ls` and `info` say about one image.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ImageDesc {
    /// The file name.
    pub name: String,
    pub path: String,
    pub format: String,
    /// The size the guest sees.
    pub virtual_size: Option<u64>,
    /// Bytes the file takes on the host (allocated blocks).
    pub used_bytes: u64,
    /// qcow2 only.
    pub cluster_size: Option<u64>,
    /// The backing file as the image names it (relative names: to the image's directory).
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    /// Why the image cannot be read (listed anyway).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A raw-named image that starts with the qcow2 magic, and the like.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// Describes the image at `path`, of format `format`. A qcow2 image whose header cannot be read
/// is an error.
pub fn describe(path: &Path, format: DiskFormat) -> Result<ImageDesc, ImageError> {
    let file = File::open(path).map_err(|e| ImageError::io(path, e))?;
    let meta = file.metadata().map_err(|e| ImageError::io(path, e))?;
    if !meta.is_file() {
        return Err(ImageError::io(path, "not a regular file"));
    }
    let mut desc = ImageDesc {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        path: path.display().to_string(),
        format: format.to_string(),
        virtual_size: None,
        used_bytes: meta.blocks() * 512,
        cluster_size: None,
        backing_file: None,
        backing_format: None,
        error: None,
        warning: None,
    };
    match format {
        DiskFormat::Raw => {
            desc.virtual_size = Some(meta.len());
            if qcow2::has_magic(&file) {
                desc.warning = Some(format!(
                    "{} starts with the qcow2 magic but is used as raw (its name does not end \
                     in .qcow2); pass the format qcow2 if it is one",
                    path.display()
                ));
            }
        }
        DiskFormat::Qcow2 => {
            let info = qcow2::info(&file).map_err(|e| ImageError::io(path, e))?;
            desc.virtual_size = Some(info.virtual_size);
            desc.cluster_size = Some(info.cluster_size);
            if let Some(b) = info.backing {
                let format = b
                    .format
                    .unwrap_or_else(|| DiskFormat::by_name(Path::new(&b.name)));
                desc.backing_format = Some(format.to_string());
                desc.backing_file = Some(b.name);
            }
        }
    }
    Ok(desc)
}

/// Where the backing file `name` of the image at `image` is: relative names are relative to
/// the image's directory.
pub fn backing_path(image: &Path, name: &str) -> PathBuf {
    let name = Path::new(name);
    if name.is_absolute() {
        name.to_path_buf()
    } else {
        image.parent().unwrap_or(Path::new(".")).join(name)
    }
}

/// The backing chain below `top`, from its backing file down (at most `MAX_CHAIN` images in
/// all, `top` included: deeper chains, and loops, are an error).
pub fn backing_chain(top: &ImageDesc) -> Result<Vec<ImageDesc>, ImageError> {
    let mut chain: Vec<ImageDesc> = Vec::new();
    let mut current = top.clone();
    while let (Some(name), Some(format)) = (&current.backing_file, &current.backing_format) {
        if chain.len() + 1 >= MAX_CHAIN {
            return Err(ImageError::new(format!(
                "{}: the backing chain is deeper than {MAX_CHAIN} images (or loops)",
                top.path
            )));
        }
        let path = backing_path(Path::new(&current.path), name);
        let format: DiskFormat = format.parse().map_err(|e| ImageError::io(&path, e))?;
        let next = describe(&path, format)
            .map_err(|e| ImageError::new(format!("the backing file of {}: {e}", current.path)))?;
        chain.push(next.clone());
        current = next;
    }
    Ok(chain)
}

/// The store: a directory of images (hidden names are import temporaries).
#[derive(Debug, Clone)]
pub struct Store {
    pub dir: PathBuf,
}

/// A bare name (no `/`) names an image in the store.
pub fn is_bare(name_or_path: &str) -> bool {
    !name_or_path.contains('/')
}

fn check_name(name: &str) -> Result<(), ImageError> {
    if name.is_empty() || name.starts_with('.') || name.contains('\0') {
        return Err(ImageError::new(format!(
            "{name:?} is not an image name (names must not be empty or start with '.')"
        )));
    }
    Ok(())
}

impl Store {
    /// `$HUSK_HOME/disk-images`.
    pub fn from_env() -> Result<Self, ImageError> {
        let home = husk_host::paths::husk_home().map_err(|e| ImageError::new(e.to_string()))?;
        Ok(Self {
            dir: home.join(STORE_DIR),
        })
    }

    /// Where a new image named `name_or_path` goes: a bare NAME in the store, with `.ext`
    /// added when it has no extension; a path as given.
    pub fn new_image_path(&self, name_or_path: &str, ext: &str) -> Result<PathBuf, ImageError> {
        if !is_bare(name_or_path) {
            return Ok(PathBuf::from(name_or_path));
        }
        check_name(name_or_path)?;
        if Path::new(name_or_path).extension().is_some() {
            Ok(self.dir.join(name_or_path))
        } else {
            Ok(self.dir.join(format!("{name_or_path}.{ext}")))
        }
    }

    /// An existing image: a bare NAME in the store (NAME.qcow2 where NAME has no extension and
    /// is not there itself), a path as given.
    pub fn existing_image_path(&self, name_or_path: &str) -> Result<PathBuf, ImageError> {
        if !is_bare(name_or_path) {
            return Ok(PathBuf::from(name_or_path));
        }
        check_name(name_or_path)?;
        let plain = self.dir.join(name_or_path);
        if Path::new(name_or_path).extension().is_none() && fs::symlink_metadata(&plain).is_err() {
            return Ok(self.dir.join(format!("{name_or_path}.qcow2")));
        }
        Ok(plain)
    }

    /// Creates the store directory.
    pub fn ensure_dir(&self) -> Result<(), ImageError> {
        fs::create_dir_all(&self.dir).map_err(|e| ImageError::io(&self.dir, e))
    }

    /// The image files in the store, by name (none when the store does not exist yet).
    pub fn files(&self) -> Result<Vec<PathBuf>, ImageError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(ImageError::io(&self.dir, e)),
        };
        let mut files = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| ImageError::io(&self.dir, e))?;
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let path = entry.path();
            if fs::metadata(&path).is_ok_and(|m| m.is_file()) {
                files.push(path);
            }
        }
        files.sort();
        Ok(files)
    }

    /// Every image of the store, described (an unreadable one with its error).
    pub fn list(&self) -> Result<Vec<ImageDesc>, ImageError> {
        Ok(self
            .files()?
            .into_iter()
            .map(|path| {
                let format = DiskFormat::by_name(&path);
                describe(&path, format).unwrap_or_else(|e| ImageDesc {
                    name: path
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    path: path.display().to_string(),
                    format: format.to_string(),
                    virtual_size: None,
                    used_bytes: fs::metadata(&path).map_or(0, |m| m.blocks() * 512),
                    cluster_size: None,
                    backing_file: None,
                    backing_format: None,
                    error: Some(e.to_string()),
                    warning: None,
                })
            })
            .collect())
    }

    /// Whether `path` is an entry of the store directory itself.
    pub fn contains(&self, path: &Path) -> bool {
        let Some(name) = path.file_name() else {
            return false;
        };
        if name == "." || name == ".." {
            return false;
        }
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        match (fs::canonicalize(parent), fs::canonicalize(&self.dir)) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        }
    }

    /// The store images whose backing file is `target` (a canonical path), by name.
    pub fn users_of(&self, target: &Path) -> Result<Vec<String>, ImageError> {
        let mut users = Vec::new();
        for path in self.files()? {
            if DiskFormat::by_name(&path) != DiskFormat::Qcow2 {
                continue;
            }
            let Ok(file) = File::open(&path) else {
                continue;
            };
            let Ok(info) = qcow2::info(&file) else {
                continue;
            };
            let Some(backing) = info.backing else {
                continue;
            };
            if fs::canonicalize(backing_path(&path, &backing.name)).is_ok_and(|b| b == target) {
                users.push(
                    path.file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                );
            }
        }
        Ok(users)
    }

    /// Removes the images named by `targets` (names or paths inside the store), each with its
    /// outcome: refused outside the store, while another store image uses it as its backing
    /// file (unless that image goes too, in any order), or while a VM holds its lock.
    pub fn remove(&self, targets: &[String]) -> Vec<(String, Result<PathBuf, ImageError>)> {
        let mut done = Vec::new();
        // (argument, path, canonical path) of the images that may go.
        let mut pending = Vec::new();
        for arg in targets {
            match self.removable(arg) {
                Ok((path, canonical)) => pending.push((arg.clone(), path, canonical)),
                Err(e) => done.push((arg.clone(), Err(e))),
            }
        }
        // Overlays before their bases: each round removes what nothing uses any more.
        loop {
            let mut progress = false;
            let mut i = 0;
            while i < pending.len() {
                let users = match self.users_of(&pending[i].2) {
                    Ok(u) => u,
                    Err(e) => {
                        let (arg, _, _) = pending.remove(i);
                        done.push((arg, Err(e)));
                        continue;
                    }
                };
                if users.is_empty() {
                    let (arg, path, _) = pending.remove(i);
                    let outcome = remove_unlocked(&path).map(|()| path);
                    done.push((arg, outcome));
                    progress = true;
                } else {
                    i += 1;
                }
            }
            if !progress {
                break;
            }
        }
        for (arg, path, canonical) in pending {
            let users = self.users_of(&canonical).unwrap_or_default();
            done.push((
                arg,
                Err(ImageError::new(format!(
                    "{} is the backing file of {}: remove {} first",
                    path.display(),
                    users.join(", "),
                    if users.len() == 1 { "it" } else { "them" }
                ))),
            ));
        }
        done
    }

    /// The path of an image `rm` may consider, and its canonical path.
    fn removable(&self, arg: &str) -> Result<(PathBuf, PathBuf), ImageError> {
        let path = self.existing_image_path(arg)?;
        let meta = fs::metadata(&path).map_err(|e| ImageError::io(&path, e))?;
        if !meta.is_file() {
            return Err(ImageError::io(&path, "not an image file"));
        }
        if !self.contains(&path) {
            return Err(ImageError::new(format!(
                "{} is not in the image store {}: husk image rm only removes store images \
                 (use rm for other files)",
                path.display(),
                self.dir.display()
            )));
        }
        let canonical = fs::canonicalize(&path).map_err(|e| ImageError::io(&path, e))?;
        Ok((path, canonical))
    }
}

/// Removes `path` unless a VM holds its lock: VMs hold a flock on their images (exclusive for
/// a writable disk, shared for a read-only one or a backing file), so an exclusive one is only
/// granted when no VM uses the image.
pub fn remove_unlocked(path: &Path) -> Result<(), ImageError> {
    let file = File::open(path).map_err(|e| ImageError::io(path, e))?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(rustix::io::Errno::WOULDBLOCK) => {
            return Err(ImageError::new(format!(
                "{} is in use by a running VM (it holds the image's lock)",
                path.display()
            )))
        }
        Err(e) => return Err(ImageError::io(path, io::Error::from(e))),
    }
    fs::remove_file(path).map_err(|e| ImageError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let home = tempfile::tempdir().unwrap();
        let store = Store {
            dir: home.path().join(STORE_DIR),
        };
        store.ensure_dir().unwrap();
        (home, store)
    }

    fn new_qcow2(path: &Path, size: u64, backing: Option<(&str, DiskFormat)>) {
        let f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .unwrap();
        qcow2::create(&f, size, backing).unwrap();
    }

    #[test]
    fn sizes_take_binary_suffixes_and_refuse_odd_values() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("64m"), Ok(64 << 20));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        for bad in [
            "",
            "G",
            "1.5G",
            "-1G",
            "10X",
            "100",
            "0",
            "0G",
            "99999999999T",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert!(parse_size("1000").unwrap_err().contains("512"));
        assert_eq!(human_size(10 << 30), "10 GiB");
        assert_eq!(human_size(1536 << 10), "1.5 MiB");
        assert_eq!(human_size(100), "100 B");
    }

    #[test]
    fn bare_names_live_in_the_store_and_get_qcow2_added() {
        let store = Store {
            dir: PathBuf::from("/h/disk-images"),
        };
        let new = |n| store.new_image_path(n, "qcow2").unwrap();
        assert_eq!(new("dev"), Path::new("/h/disk-images/dev.qcow2"));
        assert_eq!(new("dev.qcow2"), Path::new("/h/disk-images/dev.qcow2"));
        assert_eq!(new("base.raw"), Path::new("/h/disk-images/base.raw"));
        assert_eq!(new("./dev"), Path::new("./dev"));
        assert_eq!(new("/tmp/x.qcow2"), Path::new("/tmp/x.qcow2"));
        assert_eq!(
            store.new_image_path("dev", "raw").unwrap(),
            Path::new("/h/disk-images/dev.raw")
        );
        assert!(store.new_image_path(".hidden", "qcow2").is_err());
        assert!(store.new_image_path("..", "qcow2").is_err());
        assert!(store.new_image_path("", "qcow2").is_err());
        // An existing NAME without extension is NAME itself if there, else NAME.qcow2.
        assert_eq!(
            store.existing_image_path("dev").unwrap(),
            Path::new("/h/disk-images/dev.qcow2")
        );
        assert_eq!(store.existing_image_path("a/b").unwrap(), Path::new("a/b"));
        let (_home, real) = store_with_plain_file();
        assert_eq!(
            real.existing_image_path("plain").unwrap(),
            real.dir.join("plain")
        );
    }

    fn store_with_plain_file() -> (tempfile::TempDir, Store) {
        let (home, store) = store();
        fs::write(store.dir.join("plain"), [0u8; 512]).unwrap();
        (home, store)
    }

    #[test]
    fn list_describes_raw_qcow2_and_overlays() {
        let (_home, store) = store();
        let base = store.dir.join("base.raw");
        fs::write(&base, vec![7u8; 1 << 20]).unwrap();
        new_qcow2(&store.dir.join("empty.qcow2"), 64 << 20, None);
        new_qcow2(
            &store.dir.join("top.qcow2"),
            1 << 20,
            Some((base.to_str().unwrap(), DiskFormat::Raw)),
        );
        fs::write(store.dir.join(".x.import-1.tmp"), b"temp").unwrap();
        let list = store.list().unwrap();
        let names: Vec<_> = list.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["base.raw", "empty.qcow2", "top.qcow2"]);
        assert_eq!(list[0].format, "raw");
        assert_eq!(list[0].virtual_size, Some(1 << 20));
        assert!(list[0].used_bytes > 0);
        assert_eq!(list[1].virtual_size, Some(64 << 20));
        assert_eq!(list[1].cluster_size, Some(65536));
        assert_eq!(list[2].backing_file.as_deref(), base.to_str());
        assert_eq!(list[2].backing_format.as_deref(), Some("raw"));
        let chain = backing_chain(&list[2]).unwrap();
        assert_eq!(chain.len(), 1);
        assert_eq!(chain[0].path, base.display().to_string());
        // A chain that loops is cut at the limit.
        new_qcow2(
            &store.dir.join("loop.qcow2"),
            1 << 20,
            Some(("loop.qcow2", DiskFormat::Qcow2)),
        );
        let looped = describe(&store.dir.join("loop.qcow2"), DiskFormat::Qcow2).unwrap();
        let e = backing_chain(&looped).unwrap_err();
        assert!(e.to_string().contains("deeper than 16"), "{e}");
        // A broken qcow2 is listed with its error; a raw-named qcow2 with a warning.
        fs::write(store.dir.join("broken.qcow2"), [0u8; 4096]).unwrap();
        new_qcow2(&store.dir.join("named-raw.img"), 1 << 20, None);
        let list = store.list().unwrap();
        let broken = list.iter().find(|d| d.name == "broken.qcow2").unwrap();
        assert!(broken.error.as_deref().unwrap().contains("broken.qcow2"));
        let named = list.iter().find(|d| d.name == "named-raw.img").unwrap();
        assert!(named.warning.as_deref().unwrap().contains("qcow2 magic"));
    }

    #[test]
    fn rm_refuses_outside_paths_bases_in_use_and_locked_images() {
        let (home, store) = store();
        // Outside the store.
        let outside = home.path().join("outside.qcow2");
        new_qcow2(&outside, 1 << 20, None);
        let out = store.remove(&[outside.display().to_string()]);
        let e = out[0].1.as_ref().unwrap_err().to_string();
        assert!(e.contains("not in the image store"), "{e}");
        assert!(outside.exists());
        // A missing image names its path.
        let out = store.remove(&["nope".into()]);
        let e = out[0].1.as_ref().unwrap_err().to_string();
        assert!(e.contains("nope.qcow2"), "{e}");

        // A base with an overlay (named relatively, as qemu-img may write it).
        let base = store.dir.join("base.qcow2");
        new_qcow2(&base, 1 << 20, None);
        new_qcow2(
            &store.dir.join("top.qcow2"),
            1 << 20,
            Some(("base.qcow2", DiskFormat::Qcow2)),
        );
        let out = store.remove(&["base".into()]);
        let e = out[0].1.as_ref().unwrap_err().to_string();
        assert!(e.contains("backing file of top.qcow2"), "{e}");
        assert!(base.exists());

        // In use: a VM's lock (shared, as for a backing file) refuses the removal.
        let held = File::open(store.dir.join("top.qcow2")).unwrap();
        rustix::fs::flock(&held, rustix::fs::FlockOperation::NonBlockingLockShared).unwrap();
        let out = store.remove(&["top.qcow2".into()]);
        let e = out[0].1.as_ref().unwrap_err().to_string();
        assert!(e.contains("in use by a running VM"), "{e}");
        assert!(store.dir.join("top.qcow2").exists());
        drop(held);

        // Both together, base first: the overlay goes first, then its base.
        let out = store.remove(&["base.qcow2".into(), "top".into()]);
        assert!(out.iter().all(|(_, r)| r.is_ok()), "{out:?}");
        assert!(store.files().unwrap().is_empty());
    }
}
