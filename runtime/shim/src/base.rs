//! Shared, read-only base images: one ext4 image per OCI image, built once and used by every
//! container of that image through its own copy-on-write overlay (huskd's
//! `VmSpec.rootfs_copy_on_write`: a qcow2 overlay in the VM's directory, removed with the VM).
//!
//! **Which rootfs can share a base.** containerd's overlayfs snapshotter (its default, and what
//! Kubernetes nodes use) gives CreateTask one `overlay` mount whose `lowerdir=A:B:C` are the
//! image's committed layers (immutable while a snapshot references them) and whose `upperdir=`
//! is the container's own writable layer, empty at create. Such a rootfs is the lowerdirs
//! alone, so its base is built from them and keyed on them. Anything else (the native
//! snapshotter's bind mount, a bundle `rootfs/` directory, several mounts, an upper layer that
//! already holds files) gets the per-container copy of [`crate::rootfs::build`].
//!
//! **The key** is the sha256 of a format version, the overlay options that change how the layers
//! read (e.g. `userxattr`), and for each lowerdir in order its path and identity (device,
//! inode, change time). The identity matters: snapshot paths are numbered
//! (`.../snapshots/12/fs`), and a containerd whose root was wiped numbers them from 1 again, so
//! the path alone could name another image's layer; a recreated directory has another inode or
//! change time, hence another key.
//!
//! **The cache** is `<state dir>/_bases/` (beside the per-container images, under the same
//! root that huskd's `--allow-path` must allow; `_bases` cannot be a containerd namespace, so no
//! container's directory can collide with it): `<key>.ext4` (the base, mode 0444) and
//! `<key>.lock` and `<key>.build` (empty lock files).
//!
//! **Locks** (flock): a container holds `<key>.lock` shared for as long as its VM may use the
//! base (from before the build or CreateVm until the VM is deleted); a builder also holds
//! `<key>.build` exclusively, so two shims that need the same missing base build it once (the
//! second waits, then finds it). [`prune`] removes only bases whose `<key>.lock` it gets
//! exclusively at once, i.e. that no live container (shim) holds and no one is building. A base is built into `<key>.ext4.tmp` and
//! appears by an atomic no-replace rename only when complete, and is never replaced or
//! modified afterwards (the overlays refer to it by path). A failed build leaves nothing.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use containerd_shim_protos::api::Mount;
use rustix::fs::{FlockOperation, Mode, OFlags};
use sha2::{Digest, Sha256};

/// Changes when the way a base is built changes (mkfs options, headroom): old bases are then
/// simply not found again (and can be pruned).
pub const FORMAT: &str = "husk-shim-base-v1";

/// The cache directory's name under the shim's state directory.
pub const DIR_NAME: &str = "_bases";

/// The cache directory: `<state dir>/_bases`.
pub fn cache_dir(state_dir: &Path) -> PathBuf {
    state_dir.join(DIR_NAME)
}

/// A container rootfs that is an image's layers and nothing more: an overlay's lowerdirs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layers {
    /// Top first, as overlayfs lists them.
    pub lowerdirs: Vec<PathBuf>,
    /// Options other than the directories and the writable-layer ones, kept for the read-only
    /// mount of the layers (e.g. `userxattr` changes how whiteouts are stored).
    pub options: Vec<String>,
}

/// How a container's rootfs becomes its VM's disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// A shared base built from the layers, cached under `key`.
    Shared { key: String, layers: Layers },
    /// A per-container copy (today's way); `why` says why not a shared base.
    Copy { why: String },
}

/// Decides how the rootfs given in CreateTask (`mounts`) reaches the VM.
pub fn plan(mounts: &[Mount]) -> Plan {
    let copy = |why: String| Plan::Copy { why };
    let m = match mounts {
        [] => return copy("no rootfs mounts (a bundle rootfs directory)".into()),
        [m] => m,
        _ => return copy(format!("{} rootfs mounts, not one overlay", mounts.len())),
    };
    if m.type_ != "overlay" {
        return copy(format!("the rootfs mount is {:?}, not an overlay", m.type_));
    }
    let (mut lowerdirs, mut upperdir, mut options) = (Vec::new(), None, Vec::new());
    for o in &m.options {
        if let Some(v) = o.strip_prefix("lowerdir=") {
            lowerdirs = v
                .split(':')
                .filter(|d| !d.is_empty())
                .map(PathBuf::from)
                .collect();
        } else if let Some(v) = o.strip_prefix("upperdir=") {
            upperdir = Some(PathBuf::from(v));
        } else if o.starts_with("workdir=") || matches!(o.as_str(), "rw" | "ro" | "volatile") {
            // Only mean something with an upper layer.
        } else {
            options.push(o.clone());
        }
    }
    if lowerdirs.is_empty() {
        return copy("the overlay mount has no lowerdir".into());
    }
    if lowerdirs.iter().any(|d| !d.is_absolute()) {
        return copy("a lowerdir is not an absolute path".into());
    }
    if let Some(upper) = upperdir {
        match std::fs::read_dir(&upper) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return copy(format!(
                        "the container's upper layer {} is not empty",
                        upper.display()
                    ));
                }
            }
            Err(e) => {
                return copy(format!(
                    "cannot read the upper layer {}: {e}",
                    upper.display()
                ))
            }
        }
    }
    let layers = Layers { lowerdirs, options };
    match key(&layers) {
        Ok(key) => Plan::Shared { key, layers },
        Err(e) => copy(format!("cannot identify the layers: {e}")),
    }
}

/// The cache key of `layers`: 64 hex digits of sha256 (see the module's documentation).
pub fn key(layers: &Layers) -> std::io::Result<String> {
    let mut h = Sha256::new();
    let mut field = |b: &[u8]| {
        // Length-prefixed: no two different inputs hash the same bytes.
        h.update((b.len() as u64).to_le_bytes());
        h.update(b);
    };
    field(FORMAT.as_bytes());
    field(&(layers.options.len() as u64).to_le_bytes());
    for o in &layers.options {
        field(o.as_bytes());
    }
    field(&(layers.lowerdirs.len() as u64).to_le_bytes());
    for d in &layers.lowerdirs {
        let m = std::fs::metadata(d)?;
        if !m.is_dir() {
            return Err(std::io::Error::other(format!(
                "{} is not a directory",
                d.display()
            )));
        }
        field(d.as_os_str().as_bytes());
        let identity = format!(
            "{}:{}:{}.{:09}",
            m.dev(),
            m.ino(),
            m.ctime(),
            m.ctime_nsec()
        );
        field(identity.as_bytes());
    }
    Ok(h.finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>())
}

#[derive(Debug, thiserror::Error)]
pub enum BaseError {
    #[error("base image cache {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("building the base image {path}: {source}")]
    Build {
        path: String,
        source: crate::rootfs::RootfsError,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BaseError + '_ {
    move |source| BaseError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// A base in use: the shared lock that keeps [`prune`] away, for as long as it lives.
#[derive(Debug)]
pub struct Lease {
    pub path: PathBuf,
    /// This lease's taker built the base: what the build copied and took.
    pub built: Option<(u64, Duration)>,
    _lock: OwnedFd,
}

fn paths(cache: &Path, key: &str) -> (PathBuf, PathBuf, PathBuf) {
    (
        cache.join(format!("{key}.ext4")),
        cache.join(format!("{key}.lock")),
        cache.join(format!("{key}.ext4.tmp")),
    )
}

/// Opens (creating) `path` and flocks it with `op`; the lock is only returned while `path`
/// still names the locked file (a [`prune`] may have removed the file in between: then again).
/// `Ok(None)`: a non-blocking `op` found the lock taken.
fn lock(path: &Path, op: FlockOperation) -> std::io::Result<Option<OwnedFd>> {
    loop {
        let fd = rustix::fs::open(
            path,
            OFlags::RDWR | OFlags::CREATE | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )?;
        match rustix::fs::flock(&fd, op) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let held = rustix::fs::fstat(&fd)?;
        match rustix::fs::stat(path) {
            Ok(now) if now.st_dev == held.st_dev && now.st_ino == held.st_ino => {
                return Ok(Some(fd))
            }
            Ok(_) => {}
            Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

fn lock_blocking(path: &Path, op: FlockOperation) -> Result<OwnedFd, BaseError> {
    lock(path, op)
        .map_err(io_err(path))?
        .ok_or_else(|| BaseError::Io {
            path: path.display().to_string(),
            source: std::io::Error::other("a blocking lock was refused"),
        })
}

/// The base of `key` in `cache`, built with `build` (given the temporary file to fill) when it
/// is not there yet, and leased: while the returned [`Lease`] lives, [`prune`] leaves it.
/// Concurrent callers for one key build it once.
pub fn acquire(
    cache: &Path,
    key: &str,
    build: impl Fn(&Path) -> Result<u64, crate::rootfs::RootfsError>,
) -> Result<Lease, BaseError> {
    let (base, lock_path, tmp) = paths(cache, key);
    let build_lock = cache.join(format!("{key}.build"));
    std::fs::create_dir_all(cache).map_err(io_err(cache))?;
    // Held from here on: prune leaves this key alone (also while it is being built).
    let shared = lock_blocking(&lock_path, FlockOperation::LockShared)?;
    let mut built = None;
    if !base.exists() {
        // Builders queue on a lock of their own: one that waited finds the base built. (Not
        // on the lease lock: an exclusive waiter there would wait for every container's end.)
        let _building = lock_blocking(&build_lock, FlockOperation::LockExclusive)?;
        if !base.exists() {
            // Ours alone: a leftover temporary file is a crashed builder's.
            let _ = std::fs::remove_file(&tmp);
            let start = Instant::now();
            let bytes = match build(&tmp) {
                Ok(b) => b,
                Err(source) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(BaseError::Build {
                        path: base.display().to_string(),
                        source,
                    });
                }
            };
            publish(&tmp, &base).inspect_err(|_| {
                let _ = std::fs::remove_file(&tmp);
            })?;
            built = Some((bytes, start.elapsed()));
        }
    }
    Ok(Lease {
        path: base,
        built,
        _lock: shared,
    })
}

/// Makes the complete `tmp` the base: on disk, read-only, then renamed without replacing
/// anything (an existing base is never swapped under the overlays that refer to it).
fn publish(tmp: &Path, base: &Path) -> Result<(), BaseError> {
    let f = File::open(tmp).map_err(io_err(tmp))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o444))
        .map_err(io_err(tmp))?;
    f.sync_all().map_err(io_err(tmp))?;
    drop(f);
    let cwd = rustix::fs::CWD;
    match rustix::fs::renameat_with(cwd, tmp, cwd, base, rustix::fs::RenameFlags::NOREPLACE) {
        Ok(()) => {}
        Err(rustix::io::Errno::EXIST) => {
            let _ = std::fs::remove_file(tmp);
        }
        // A filesystem without renameat2 flags: link(2) does not replace either.
        Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => {
            match std::fs::hard_link(tmp, base) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err(base)(e)),
            }
            let _ = std::fs::remove_file(tmp);
        }
        Err(e) => return Err(io_err(base)(e.into())),
    }
    if let Some(dir) = base.parent() {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Removes every base in `cache` that no live container holds and no one is building (their
/// locks are free right now), with its lock file; returns the removed bases. Safe while shims
/// run: a base in use is skipped, and a shim that wants a removed base builds it again.
pub fn prune(cache: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut keys: Vec<String> = Vec::new();
    let entries = match std::fs::read_dir(cache) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        let key = name.split('.').next().unwrap_or_default();
        if key.len() == 64 && key.bytes().all(|b| b.is_ascii_hexdigit()) {
            keys.push(key.to_string());
        }
    }
    keys.sort();
    keys.dedup();
    let mut removed = Vec::new();
    for key in keys {
        let (base, lock_path, tmp) = paths(cache, &key);
        let Some(_held) = lock(&lock_path, FlockOperation::NonBlockingLockExclusive)? else {
            continue;
        };
        match std::fs::remove_file(&base) {
            Ok(()) => removed.push(base),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let _ = std::fs::remove_file(&tmp);
        // No builder waits on it: builders hold the lease lock (shared) first.
        let _ = std::fs::remove_file(cache.join(format!("{key}.build")));
        // Still held: a shim waiting on this file finds it gone and opens a new one.
        let _ = std::fs::remove_file(&lock_path);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Barrier};

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("husk-shim-base-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn overlay(lower: &[&Path], upper: Option<&Path>) -> Mount {
        let lowers: Vec<String> = lower.iter().map(|p| p.display().to_string()).collect();
        let mut options = vec!["index=off".to_string()];
        if let Some(u) = upper {
            options.push(format!("workdir={}", u.with_extension("work").display()));
            options.push(format!("upperdir={}", u.display()));
        }
        options.push(format!("lowerdir={}", lowers.join(":")));
        Mount {
            type_: "overlay".into(),
            source: "overlay".into(),
            options,
            ..Default::default()
        }
    }

    fn key_of(p: Plan) -> String {
        match p {
            Plan::Shared { key, .. } => key,
            Plan::Copy { why } => panic!("not shared: {why}"),
        }
    }

    #[test]
    fn the_key_follows_the_ordered_layers_and_their_identity() {
        let dir = scratch("key");
        let (a, b, up) = (dir.join("a"), dir.join("b"), dir.join("up"));
        for d in [&a, &b, &up] {
            std::fs::create_dir_all(d).unwrap();
        }
        let k1 = key_of(plan(&[overlay(&[&a, &b], Some(&up))]));
        assert_eq!(k1.len(), 64);
        // Same layers, another container's (empty) upper layer: the same base.
        let up2 = dir.join("up2");
        std::fs::create_dir_all(&up2).unwrap();
        assert_eq!(k1, key_of(plan(&[overlay(&[&a, &b], Some(&up2))])));
        // Read-only view (no upper) of the same layers: the same base too.
        assert_eq!(k1, key_of(plan(&[overlay(&[&a, &b], None)])));
        // Order matters: another stacking is another filesystem.
        assert_ne!(k1, key_of(plan(&[overlay(&[&b, &a], Some(&up))])));
        assert_ne!(k1, key_of(plan(&[overlay(&[&a], Some(&up))])));
        // An option that changes how layers read is part of the key.
        let mut m = overlay(&[&a, &b], Some(&up));
        m.options.push("userxattr".into());
        assert_ne!(k1, key_of(plan(&[m])));
        // A layer directory recreated at the same path (a wiped containerd reusing snapshot
        // numbers) is another layer.
        std::fs::remove_dir(&b).unwrap();
        std::thread::sleep(Duration::from_millis(10));
        std::fs::create_dir_all(&b).unwrap();
        assert_ne!(k1, key_of(plan(&[overlay(&[&a, &b], Some(&up))])));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn anything_but_clean_layers_falls_back_to_a_copy() {
        let dir = scratch("fallback");
        let (a, up) = (dir.join("a"), dir.join("up"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&up).unwrap();
        let is_copy = |mounts: &[Mount], why_has: &str| match plan(mounts) {
            Plan::Copy { why } => assert!(why.contains(why_has), "{why}"),
            Plan::Shared { .. } => panic!("shared for {mounts:?}"),
        };
        is_copy(&[], "bundle rootfs");
        let bind = Mount {
            type_: "bind".into(),
            source: a.display().to_string(),
            options: vec!["rbind".into(), "rw".into()],
            ..Default::default()
        };
        is_copy(std::slice::from_ref(&bind), "not an overlay");
        let ov = overlay(&[&a], Some(&up));
        is_copy(&[ov.clone(), ov.clone()], "2 rootfs mounts");
        is_copy(
            &[Mount {
                options: vec!["index=off".into()],
                ..ov.clone()
            }],
            "no lowerdir",
        );
        is_copy(&[overlay(&[&dir.join("missing")], Some(&up))], "identify");
        // The container's own layer already has files: they would be lost.
        std::fs::write(up.join("x"), b"x").unwrap();
        is_copy(&[ov], "not empty");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn concurrent_builders_build_one_base_and_share_it() {
        let dir = scratch("concurrent");
        let cache = cache_dir(&dir);
        let builds = Arc::new(AtomicUsize::new(0));
        let barrier = Arc::new(Barrier::new(4));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (cache, builds, barrier) =
                    (cache.clone(), Arc::clone(&builds), Arc::clone(&barrier));
                std::thread::spawn(move || {
                    barrier.wait();
                    acquire(&cache, &"ab".repeat(32), |tmp| {
                        builds.fetch_add(1, Ordering::SeqCst);
                        // Slow enough that the others wait on the lock.
                        std::thread::sleep(Duration::from_millis(200));
                        std::fs::write(tmp, b"base").unwrap();
                        Ok(4)
                    })
                    .unwrap()
                })
            })
            .collect();
        let leases: Vec<Lease> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(builds.load(Ordering::SeqCst), 1);
        assert_eq!(leases.iter().filter(|l| l.built.is_some()).count(), 1);
        let base = cache.join(format!("{}.ext4", "ab".repeat(32)));
        assert!(leases.iter().all(|l| l.path == base));
        assert_eq!(std::fs::read(&base).unwrap(), b"base");
        let mode = std::fs::metadata(&base).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o444);
        assert!(!base.with_extension("ext4.tmp").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_build_leaves_nothing_and_the_next_one_retries() {
        let dir = scratch("failed");
        let cache = cache_dir(&dir);
        let key = "cd".repeat(32);
        let err = acquire(&cache, &key, |tmp| {
            std::fs::write(tmp, b"half").unwrap();
            Err(crate::rootfs::RootfsError::Mkfs("disk full".into()))
        })
        .unwrap_err();
        assert!(err.to_string().contains("disk full"), "{err}");
        let left: Vec<_> = std::fs::read_dir(&cache)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with(".lock") && !n.ends_with(".build"))
            .collect();
        assert_eq!(left, Vec::<String>::new());
        let lease = acquire(&cache, &key, |tmp| {
            std::fs::write(tmp, b"ok").unwrap();
            Ok(2)
        })
        .unwrap();
        assert_eq!(lease.built.map(|b| b.0), Some(2));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn prune_removes_only_bases_that_no_container_holds() {
        let dir = scratch("prune");
        let cache = cache_dir(&dir);
        assert_eq!(prune(&cache).unwrap(), Vec::<PathBuf>::new());
        let make = |tmp: &Path| {
            std::fs::write(tmp, b"b").unwrap();
            Ok(1)
        };
        let (held, free) = ("01".repeat(32), "02".repeat(32));
        let lease = acquire(&cache, &held, make).unwrap();
        drop(acquire(&cache, &free, make).unwrap());
        // Not ours: left alone.
        std::fs::write(cache.join("notes.txt"), b"x").unwrap();
        let removed = prune(&cache).unwrap();
        assert_eq!(removed, vec![cache.join(format!("{free}.ext4"))]);
        assert!(lease.path.exists());
        assert!(!cache.join(format!("{free}.lock")).exists());
        assert!(cache.join("notes.txt").exists());
        // Released: the next prune takes it. A later container builds it again.
        drop(lease);
        assert_eq!(
            prune(&cache).unwrap(),
            vec![cache.join(format!("{held}.ext4"))]
        );
        let again = acquire(&cache, &held, make).unwrap();
        assert!(again.built.is_some() && again.path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
