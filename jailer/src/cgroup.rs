//! The VM's cgroup v2: `<cgroup2 mount>/husk/<id>`, limits written into it, the jailer (and so
//! the VMM it execs) moved into it; and its removal, killing whatever is left in it first.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};

/// Controllers the per-VM cgroups may use (enabled where the host has them).
const CONTROLLERS: &[&str] = &["cpu", "memory", "pids", "io"];

/// A cgroup operation that failed: what was being done, and the system's reason.
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub struct CgroupError {
    what: String,
    #[source]
    source: io::Error,
}

impl CgroupError {
    fn new(what: String, source: io::Error) -> Self {
        Self { what, source }
    }
}

/// Where cgroup2 is mounted (from /proc/self/mountinfo), if it is.
pub fn mount_point() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        // "... mountpoint opts ... - fstype source superopts"
        let (left, right) = line.split_once(" - ")?;
        if right.split(' ').next()? != "cgroup2" {
            return None;
        }
        Some(PathBuf::from(left.split(' ').nth(4)?))
    })
}

/// The VM's cgroup directory.
pub fn vm_cgroup(mount: &Path, id: &str) -> PathBuf {
    mount.join("husk").join(id)
}

/// Enables in `dir`'s children every controller of [`CONTROLLERS`] that `dir` offers.
fn enable_controllers(dir: &Path) -> io::Result<()> {
    let offered = std::fs::read_to_string(dir.join("cgroup.controllers"))?;
    let wanted: Vec<String> = CONTROLLERS
        .iter()
        .filter(|c| offered.split_whitespace().any(|o| o == **c))
        .map(|c| format!("+{c}"))
        .collect();
    if wanted.is_empty() {
        return Ok(());
    }
    std::fs::write(dir.join("cgroup.subtree_control"), wanted.join(" "))
}

/// This process's cgroup v2 path (from /proc/self/cgroup's `0::PATH` line).
pub fn current() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| PathBuf::from(p.trim_start_matches('/')))
}

/// Moves this process into `relative` under `mount` (back where it came from, so that removing
/// the VM's cgroup after a failed start does not kill the jailer itself).
pub fn move_to(mount: &Path, relative: &Path) -> Result<(), CgroupError> {
    let procs = mount.join(relative).join("cgroup.procs");
    std::fs::write(&procs, std::process::id().to_string())
        .map_err(|e| CgroupError::new(procs.display().to_string(), e))
}

/// Creates the VM's cgroup, writes `limits` into it and moves this process there.
pub fn enter(mount: &Path, id: &str, limits: &[(String, String)]) -> Result<PathBuf, CgroupError> {
    let parent = mount.join("husk");
    std::fs::create_dir_all(&parent)
        .map_err(|e| CgroupError::new(format!("mkdir {}", parent.display()), e))?;
    enable_controllers(mount)
        .and_then(|()| enable_controllers(&parent))
        .map_err(|e| {
            CgroupError::new(
                format!("enabling controllers under {}", parent.display()),
                e,
            )
        })?;
    let dir = vm_cgroup(mount, id);
    std::fs::create_dir(&dir)
        .map_err(|e| CgroupError::new(format!("mkdir {}", dir.display()), e))?;
    let result = (|| {
        for (file, value) in limits {
            std::fs::write(dir.join(file), value)
                .map_err(|e| CgroupError::new(format!("{file}={value} in {}", dir.display()), e))?;
        }
        std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
            .map_err(|e| CgroupError::new(format!("joining {}", dir.display()), e))
    })();
    match result {
        Ok(()) => Ok(dir),
        Err(e) => {
            let _ = std::fs::remove_dir(&dir);
            Err(e)
        }
    }
}

fn procs(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Kills every process in the VM's cgroup and removes it; Ok if there is none.
pub fn remove(mount: &Path, id: &str) -> Result<(), CgroupError> {
    let dir = vm_cgroup(mount, id);
    if !dir.exists() {
        return Ok(());
    }
    // cgroup.kill (Linux 5.14+) kills the whole cgroup at once, also processes forking meanwhile;
    // older kernels get SIGKILL per listed process.
    if std::fs::write(dir.join("cgroup.kill"), "1").is_err() {
        for pid in procs(&dir).into_iter().filter_map(Pid::from_raw) {
            // A pid read from the VM's own cgroup; one that is gone already is fine.
            let _ = rustix::process::kill_process(pid, Signal::KILL);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match std::fs::remove_dir(&dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            // EBUSY until the killed processes are gone.
            Err(e) if Instant::now() >= deadline => {
                return Err(CgroupError::new(
                    format!(
                        "rmdir {} (processes left: {:?})",
                        dir.display(),
                        procs(&dir)
                    ),
                    e,
                ))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_is_found_when_there_is_one() {
        // Every Linux host this runs on has a cgroup2 mount (unified or hybrid).
        if let Some(m) = mount_point() {
            assert!(m.join("cgroup.procs").exists(), "{}", m.display());
            assert_eq!(
                vm_cgroup(&m, "vm1"),
                m.join("husk/vm1"),
                "the VM's cgroup lives under husk/"
            );
        }
    }
}
