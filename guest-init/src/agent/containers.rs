//! The containers of a pod inside one VM (`add_container`, `remove_container`, and `exec` with
//! a `container`).
//!
//! A pod's VM boots with its sandbox's root (husk.root); every later container of the pod gets
//! its own ext4 root on a disk the host attached at run time, which the agent finds by its
//! virtio serial and mounts at `/run/husk-containers/<id>` with its own /proc, /sys, /dev, /tmp
//! and /run. Its processes run chrooted there. All containers share the VM's network (the
//! pod's: localhost is shared, as Kubernetes wants) and its PID namespace (as with a pod's
//! `shareProcessNamespace`); the isolation boundary is the VM around the pod, not the chroot.
//!
//! Pod volumes (emptyDir) live in the guest's memory at `/run/husk-pod-volumes/<name>` and are
//! bind-mounted into each container that names them, so the pod's containers share them.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use husk_proto::agent::{AddContainer, PodVolume};
use rustix::mount::{MountFlags, UnmountFlags};

use crate::rootfs;

/// Where container roots are mounted.
pub const CONTAINERS_DIR: &str = "/run/husk-containers";
/// Where pod volumes live.
pub const VOLUMES_DIR: &str = "/run/husk-pod-volumes";
/// Longest container id (containerd's are 64 hex digits).
const MAX_ID: usize = 128;
/// Longest volume name (a Kubernetes volume name is a DNS label, at most 63).
const MAX_VOLUME_NAME: usize = 63;
/// How long add waits for an attached disk's capacity to reach the guest (the config-change
/// interrupt is handled asynchronously by the virtio-blk driver).
const DISK_WAIT: Duration = Duration::from_secs(5);
/// How long remove waits for a container's killed processes to go away.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// `[A-Za-z0-9_.-]{1,max}`, and not `.` or `..`: safe as one path component.
fn valid_name(name: &str, max: usize) -> bool {
    !name.is_empty()
        && name.len() <= max
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

fn check_id(id: &str) -> Result<(), String> {
    if valid_name(id, MAX_ID) {
        Ok(())
    } else {
        Err(format!(
            "container id {id:?}: use 1..={MAX_ID} of A-Z a-z 0-9 _ . -"
        ))
    }
}

/// Where container `id`'s root is mounted.
pub fn root_dir(id: &str) -> PathBuf {
    Path::new(CONTAINERS_DIR).join(id)
}

/// The root an exec in container `id` is chrooted into; an error when there is no such
/// container.
pub fn root_of(id: &str) -> Result<Vec<u8>, String> {
    check_id(id).map_err(|e| format!("exec: {e}"))?;
    let root = root_dir(id);
    if !is_mount_point(&root) {
        return Err(format!("exec: no container {id} in this VM"));
    }
    Ok(root.as_os_str().as_bytes().to_vec())
}

/// Whether `path` is the root of a mount (its device differs from its parent's).
fn is_mount_point(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(me), Some(Ok(parent))) = (
        std::fs::symlink_metadata(path),
        path.parent().map(std::fs::symlink_metadata),
    ) else {
        return false;
    };
    me.is_dir() && me.dev() != parent.dev()
}

/// A volume request checked: its directory in the guest and its target inside the root.
#[derive(Debug, PartialEq, Eq)]
struct Volume {
    source: PathBuf,
    target: PathBuf,
    read_only: bool,
}

fn check_volume(root: &Path, v: &PodVolume) -> Result<Volume, String> {
    if !valid_name(&v.name, MAX_VOLUME_NAME) {
        return Err(format!(
            "volume name {:?}: use 1..={MAX_VOLUME_NAME} of A-Z a-z 0-9 _ . -",
            v.name
        ));
    }
    let path = Path::new(&v.path);
    // By the text, not Path::components (which drops `.`): every element a plain name.
    let plain = v
        .path
        .split('/')
        .skip(1)
        .all(|c| !c.is_empty() && c != "." && c != "..");
    if !v.path.starts_with('/') || !plain || v.path.contains('\0') {
        return Err(format!(
            "volume {}: path {:?} must be absolute, below /, without . or ..",
            v.name, v.path
        ));
    }
    Ok(Volume {
        source: Path::new(VOLUMES_DIR).join(&v.name),
        target: root.join(path.strip_prefix("/").unwrap_or(path)),
        read_only: v.read_only,
    })
}

/// The block device (`/dev/vdX`) whose virtio serial is `serial`, once it has a capacity.
fn device_with_serial(serial: &str) -> Result<String, String> {
    let deadline = Instant::now() + DISK_WAIT;
    loop {
        let mut found = None;
        for entry in std::fs::read_dir("/sys/block").map_err(|e| format!("/sys/block: {e}"))? {
            let Ok(entry) = entry else { continue };
            let dir = entry.path();
            let matches = std::fs::read_to_string(dir.join("serial"))
                .is_ok_and(|s| s.trim_end_matches(['\n', '\0']) == serial);
            if matches {
                let size = std::fs::read_to_string(dir.join("size"))
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .unwrap_or(0);
                found = Some((entry.file_name(), size));
                break;
            }
        }
        match found {
            Some((name, size)) if size > 0 => {
                return Ok(format!("/dev/{}", name.to_string_lossy()));
            }
            Some((name, _)) if Instant::now() >= deadline => {
                return Err(format!(
                    "disk {serial} ({}) has no medium: was it attached?",
                    name.to_string_lossy()
                ));
            }
            None if Instant::now() >= deadline => {
                return Err(format!("no disk with serial {serial}"));
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// `add_container`: mounts the container's root disk and its volumes.
pub fn add(request: &AddContainer) -> Result<(), String> {
    check_id(&request.id)?;
    let root = root_dir(&request.id);
    let volumes = request
        .volumes
        .iter()
        .map(|v| check_volume(&root, v))
        .collect::<Result<Vec<_>, _>>()?;
    if is_mount_point(&root) {
        return Err(format!("container {} exists already", request.id));
    }
    let device = device_with_serial(&request.disk_serial)?;
    let target = root.to_string_lossy().into_owned();
    rootfs::mount_root_at(&device, &target).map_err(|e| {
        let _ = unmount(&root);
        error_chain(&e)
    })?;
    for v in &volumes {
        if let Err(e) = mount_volume(v) {
            let _ = unmount(&root);
            return Err(format!("volume {}: {e}", v.source.display()));
        }
    }
    Ok(())
}

/// An error and its causes on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Bind-mounts a pod volume (created on first use) into a container's root. The target is
/// created inside the container's root; the guest as a whole is the pod's isolation boundary,
/// so a link planted by the image can only point at the pod's own guest.
fn mount_volume(v: &Volume) -> io::Result<()> {
    std::fs::create_dir_all(&v.source)?;
    std::fs::create_dir_all(&v.target)?;
    let (source, target) = (v.source.to_string_lossy(), v.target.to_string_lossy());
    rootfs::mount(&source, &target, "", MountFlags::BIND)?;
    if v.read_only {
        rustix::mount::mount_remount(
            &*target,
            MountFlags::BIND | MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV,
            "",
        )?;
    }
    Ok(())
}

/// `remove_container`: kills what runs in the container, unmounts its root (lazily, after a
/// sync, so that nothing holds the disk the host is about to take away). No such container is
/// not an error.
pub fn remove(id: &str) -> Result<(), String> {
    check_id(id)?;
    let root = root_dir(id);
    if !root.exists() {
        return Ok(());
    }
    let deadline = Instant::now() + KILL_WAIT;
    loop {
        let pids = processes_in(&root);
        if pids.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "container {id}: processes {pids:?} did not end after SIGKILL"
            ));
        }
        for pid in pids {
            if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    unmount(&root).map_err(|e| format!("container {id}: unmounting {}: {e}", root.display()))?;
    let _ = std::fs::remove_dir(&root);
    Ok(())
}

fn unmount(root: &Path) -> io::Result<()> {
    if !is_mount_point(root) {
        return Ok(());
    }
    if let Ok(dir) = std::fs::File::open(root) {
        let _ = rustix::fs::syncfs(&dir);
    }
    // MNT_DETACH takes the root's submounts (/proc, /sys, volumes...) with it.
    rustix::mount::unmount(root, UnmountFlags::DETACH)?;
    Ok(())
}

/// PIDs of the processes whose root directory is `root` or below it.
fn processes_in(root: &Path) -> Vec<i32> {
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if let Ok(link) = std::fs::read_link(entry.path().join("root")) {
            if is_inside(&link, root) {
                pids.push(pid);
            }
        }
    }
    pids
}

/// Whether `path` is `root` or below it (by components, so /a/bc is not below /a/b).
fn is_inside(path: &Path, root: &Path) -> bool {
    path.starts_with(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_names_are_single_safe_path_components() {
        assert!(valid_name("3f2a9c_web-1.0", MAX_ID));
        for bad in ["", ".", "..", "a/b", "a b", "x\0", &"a".repeat(MAX_ID + 1)] {
            assert!(!valid_name(bad, MAX_ID), "{bad:?}");
        }
        assert!(check_id("../../etc").is_err());
    }

    #[test]
    fn volume_paths_stay_inside_the_root() {
        let root = Path::new("/run/husk-containers/c1");
        let v = |name: &str, path: &str| PodVolume {
            name: name.into(),
            path: path.into(),
            read_only: false,
        };
        assert_eq!(
            check_volume(root, &v("shared", "/data/shared")).unwrap(),
            Volume {
                source: PathBuf::from("/run/husk-pod-volumes/shared"),
                target: PathBuf::from("/run/husk-containers/c1/data/shared"),
                read_only: false,
            }
        );
        for path in ["relative", "/", "/a/../../etc", "/a/./b"] {
            assert!(check_volume(root, &v("x", path)).is_err(), "{path}");
        }
        assert!(check_volume(root, &v("../x", "/data")).is_err());
    }

    #[test]
    fn a_process_is_inside_a_root_by_whole_components() {
        let root = Path::new("/run/husk-containers/ab");
        assert!(is_inside(Path::new("/run/husk-containers/ab"), root));
        assert!(is_inside(Path::new("/run/husk-containers/ab/x"), root));
        assert!(!is_inside(Path::new("/run/husk-containers/abc"), root));
        assert!(!is_inside(Path::new("/"), root));
    }

    #[test]
    fn exec_in_a_missing_container_is_refused_clearly() {
        let e = root_of("no-such-container").unwrap_err();
        assert!(e.contains("no container no-such-container"), "{e}");
        assert!(root_of("../x").is_err());
    }
}
