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
//! Pod volumes are bind-mounted into each container that names them, so the pod's containers
//! share them: a named volume (emptyDir without a pod share) lives in the guest's memory at
//! `/run/husk-pod-volumes/<name>`; a `pod_path` is below the VM's pod share (the pod's kubelet
//! directory, shared by virtio-fs at boot, mounted at [`POD_SHARE`] in the VM's root). Small
//! files (/etc/hosts, /etc/resolv.conf) come as contents, kept in
//! `/run/husk-pod-files/<id>/` and bind-mounted over their path.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use husk_init::pod::{
    valid_container_path, valid_name, valid_relative_path, MAX_CONTAINER_ID, MAX_FILES,
    MAX_FILE_BYTES, MAX_VOLUME_NAME, POD_SHARE,
};
use husk_proto::agent::{AddContainer, PodFile, PodVolume};
use rustix::mount::{MountFlags, UnmountFlags};

use crate::rootfs;

/// Where container roots are mounted.
pub const CONTAINERS_DIR: &str = "/run/husk-containers";
/// Where named pod volumes live.
pub const VOLUMES_DIR: &str = "/run/husk-pod-volumes";
/// Where the copied files of each container live.
pub const FILES_DIR: &str = "/run/husk-pod-files";
/// How long add waits for an attached disk's capacity to reach the guest (the config-change
/// interrupt is handled asynchronously by the virtio-blk driver).
const DISK_WAIT: Duration = Duration::from_secs(5);
/// How long remove waits for a container's killed processes to go away.
const KILL_WAIT: Duration = Duration::from_secs(5);

fn check_id(id: &str) -> Result<(), String> {
    if valid_name(id, MAX_CONTAINER_ID) {
        Ok(())
    } else {
        Err(format!(
            "container id {id:?}: use 1..={MAX_CONTAINER_ID} of A-Z a-z 0-9 _ . -"
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

/// A volume request checked: its source in the guest and its target inside the root.
#[derive(Debug, PartialEq, Eq)]
struct Volume {
    /// A named volume, made on first use (a pod-share path must exist).
    created: bool,
    source: PathBuf,
    target: PathBuf,
    read_only: bool,
}

/// Checks a volume: a named one or one below the pod share (`vm_root`: the VM's own root,
/// where the share is mounted).
fn check_volume(root: &Path, vm_root: &Path, v: &PodVolume) -> Result<Volume, String> {
    if !valid_container_path(&v.path) {
        return Err(format!(
            "volume {:?}: path {:?} must be absolute, below /, without . or ..",
            v.name, v.path
        ));
    }
    let source = match (v.name.is_empty(), v.pod_path.is_empty()) {
        (false, true) if valid_name(&v.name, MAX_VOLUME_NAME) => {
            Path::new(VOLUMES_DIR).join(&v.name)
        }
        (true, false) if valid_relative_path(&v.pod_path) => vm_root
            .join(POD_SHARE.trim_start_matches('/'))
            .join(&v.pod_path),
        _ => {
            return Err(format!(
                "volume for {}: give either a name (1..={MAX_VOLUME_NAME} of A-Z a-z 0-9 _ . -) \
                 or a pod_path (relative, without . or ..), not {:?} and {:?}",
                v.path, v.name, v.pod_path
            ))
        }
    };
    Ok(Volume {
        created: !v.name.is_empty(),
        source,
        target: root.join(&v.path[1..]),
        read_only: v.read_only,
    })
}

fn check_file(root: &Path, f: &PodFile) -> Result<PathBuf, String> {
    if !valid_container_path(&f.path) {
        return Err(format!(
            "file {:?}: must be absolute, below /, without . or ..",
            f.path
        ));
    }
    if f.content.len() > MAX_FILE_BYTES {
        return Err(format!(
            "file {}: {} bytes, at most {MAX_FILE_BYTES}",
            f.path,
            f.content.len()
        ));
    }
    Ok(root.join(&f.path[1..]))
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

/// `add_container`: mounts the container's root disk, its volumes and its files. `vm_root` is
/// the VM's own root (husk.root's mount, or `/`), where the pod share is.
pub fn add(request: &AddContainer, vm_root: &Path) -> Result<(), String> {
    check_id(&request.id)?;
    let root = root_dir(&request.id);
    let volumes = request
        .volumes
        .iter()
        .map(|v| check_volume(&root, vm_root, v))
        .collect::<Result<Vec<_>, _>>()?;
    if request.files.len() > MAX_FILES {
        return Err(format!(
            "{} files, at most {MAX_FILES}",
            request.files.len()
        ));
    }
    let files = request
        .files
        .iter()
        .map(|f| check_file(&root, f).map(|target| (f, target)))
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
    let copies = Path::new(FILES_DIR).join(&request.id);
    for (i, (file, target)) in files.iter().enumerate() {
        if let Err(e) = mount_file(&copies.join(i.to_string()), file, target) {
            let _ = unmount(&root);
            let _ = std::fs::remove_dir_all(&copies);
            return Err(format!("file {}: {e}", file.path));
        }
    }
    Ok(())
}

/// Writes `file`'s contents to `copy` and bind-mounts it over `target` (made if missing).
fn mount_file(copy: &Path, file: &PodFile, target: &Path) -> io::Result<()> {
    if let Some(dir) = copy.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(copy, &file.content)?;
    bind(copy, target, file.read_only, false)
}

/// Bind-mounts `source` at `target`, made first as a file or a directory like the source
/// (`dir`, when the source does not say: it does not exist yet).
fn bind(source: &Path, target: &Path, read_only: bool, dir: bool) -> io::Result<()> {
    let is_dir = std::fs::metadata(source).map(|m| m.is_dir()).unwrap_or(dir);
    if is_dir {
        std::fs::create_dir_all(target)?;
    } else {
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        if std::fs::symlink_metadata(target).is_err() {
            std::fs::write(target, b"")?;
        }
    }
    let (s, t) = (source.to_string_lossy(), target.to_string_lossy());
    rustix::mount::mount_bind(&*s, &*t)?;
    if read_only {
        rustix::mount::mount_remount(
            &*t,
            MountFlags::BIND | MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV,
            "",
        )?;
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
    if v.created {
        std::fs::create_dir_all(&v.source)?;
    } else if std::fs::symlink_metadata(&v.source).is_err() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "not in the pod share (was the VM created with the pod's directory?)",
        ));
    }
    bind(&v.source, &v.target, v.read_only, true)
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
    let _ = std::fs::remove_dir_all(Path::new(FILES_DIR).join(id));
    Ok(())
}

/// `container_stats`: CPU time, resident memory and count of the container's processes.
pub fn stats(id: &str) -> Result<husk_proto::agent::ContainerStats, String> {
    use husk_init::procfs::{cpu_ticks, rss_bytes, ticks_to_ns};
    check_id(id)?;
    let root = root_dir(id);
    if !is_mount_point(&root) {
        return Err(format!("no container {id} in this VM"));
    }
    let ticks = rustix::param::clock_ticks_per_second().max(1);
    let mut stats = husk_proto::agent::ContainerStats::default();
    for pid in processes_in(&root) {
        let (Ok(stat), Ok(status)) = (
            std::fs::read_to_string(format!("/proc/{pid}/stat")),
            std::fs::read_to_string(format!("/proc/{pid}/status")),
        ) else {
            continue; // it ended meanwhile
        };
        let (user, system) = cpu_ticks(&stat).unwrap_or_default();
        stats.cpu_user_ns += ticks_to_ns(user, ticks);
        stats.cpu_system_ns += ticks_to_ns(system, ticks);
        stats.memory_rss_bytes += rss_bytes(&status).unwrap_or(0);
        stats.processes += 1;
    }
    Ok(stats)
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
    fn ids_are_single_safe_path_components() {
        assert!(check_id("3f2a9c_web-1.0").is_ok());
        assert!(check_id("../../etc").is_err());
    }

    fn volume(name: &str, pod_path: &str, path: &str) -> PodVolume {
        PodVolume {
            name: name.into(),
            path: path.into(),
            read_only: false,
            pod_path: pod_path.into(),
        }
    }

    #[test]
    fn volumes_come_from_the_pod_or_its_share_and_stay_inside_the_root() {
        let root = Path::new("/run/husk-containers/c1");
        let vm_root = Path::new("/run/husk-root");
        assert_eq!(
            check_volume(root, vm_root, &volume("shared", "", "/data/shared")).unwrap(),
            Volume {
                created: true,
                source: PathBuf::from("/run/husk-pod-volumes/shared"),
                target: PathBuf::from("/run/husk-containers/c1/data/shared"),
                read_only: false,
            }
        );
        let cfg = "volumes/kubernetes.io~configmap/cfg";
        assert_eq!(
            check_volume(root, vm_root, &volume("", cfg, "/etc/cfg")).unwrap(),
            Volume {
                created: false,
                source: PathBuf::from(format!("/run/husk-root/run/husk-pod/{cfg}")),
                target: PathBuf::from("/run/husk-containers/c1/etc/cfg"),
                read_only: false,
            }
        );
        for path in ["relative", "/", "/a/../../etc", "/a/./b"] {
            assert!(
                check_volume(root, vm_root, &volume("x", "", path)).is_err(),
                "{path}"
            );
        }
        for (name, pod_path) in [
            ("../x", ""),
            ("", "../x"),
            ("", "/abs"),
            ("a", "b"),
            ("", ""),
        ] {
            assert!(
                check_volume(root, vm_root, &volume(name, pod_path, "/d")).is_err(),
                "{name:?} {pod_path:?}"
            );
        }
    }

    #[test]
    fn files_are_bounded_and_stay_inside_the_root() {
        let root = Path::new("/run/husk-containers/c1");
        let file = |path: &str, len: usize| PodFile {
            path: path.into(),
            content: vec![b'x'; len],
            read_only: true,
        };
        assert_eq!(
            check_file(root, &file("/etc/hosts", 10)).unwrap(),
            PathBuf::from("/run/husk-containers/c1/etc/hosts")
        );
        assert!(check_file(root, &file("/etc/hosts", MAX_FILE_BYTES + 1)).is_err());
        assert!(check_file(root, &file("/../etc/passwd", 1)).is_err());
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
