//! Starting husk-vmm through husk-jailer, as `husk run` and huskd do when they run as root,
//! and cleaning up after it.
//!
//! The VMM's command line stays as it is: the jail mirrors every path the VMM needs at its host
//! path (`--file` for the kernel and initrd, read-only; `--dir` for the directory of its
//! sockets, console and exit report, read-write). Disks are the exception: the launcher opens
//! them (and their backing chains, see `disk_image`) with its own rights and passes the fds
//! (`/proc/self/fd/N`, see `husk_devices::host_files`), so the jailed user needs no access to
//! the image files.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::paths::{sibling_binary, LookupError};
use crate::process::inherit_fd;
use crate::vmm_args::VmmArgs;

/// Why a jail could not be set up or cleaned up.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error(transparent)]
    Jailer(#[from] LookupError),
    #[error("{name}={value}: expected a non-zero number")]
    Id { name: String, value: String },
    #[error("cannot run {}: {cause}", .jailer.display())]
    Run { jailer: PathBuf, cause: io::Error },
    /// husk-jailer --cleanup failed; its own message.
    #[error("{0}")]
    Cleanup(String),
}

/// The uid and gid a jailed VMM runs as unless `HUSK_JAIL_UID`/`HUSK_JAIL_GID` say otherwise.
pub const DEFAULT_JAIL_ID: u32 = 65534;

/// How to jail VMMs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailConfig {
    /// The husk-jailer binary.
    pub jailer: PathBuf,
    /// Who the VMM runs as.
    pub uid: u32,
    pub gid: u32,
}

/// husk-jailer: `$HUSK_JAILER`, else next to this executable, else on `PATH`.
pub fn jailer_binary() -> Result<PathBuf, LookupError> {
    sibling_binary("husk-jailer", "HUSK_JAILER")
}

fn env_id(name: &str) -> Result<u32, JailError> {
    match std::env::var(name) {
        Err(_) => Ok(DEFAULT_JAIL_ID),
        Ok(v) => v.parse().ok().filter(|n| *n != 0).ok_or(JailError::Id {
            name: name.into(),
            value: v,
        }),
    }
}

/// The jail to use: none when `no_jail` or when not running as root (the jailer needs root).
pub fn config(no_jail: bool) -> Result<Option<JailConfig>, JailError> {
    if no_jail || !rustix::process::geteuid().is_root() {
        return Ok(None);
    }
    Ok(Some(JailConfig {
        jailer: jailer_binary()?,
        uid: env_id("HUSK_JAIL_UID")?,
        gid: env_id("HUSK_JAIL_GID")?,
    }))
}

/// `path` with `.` and `..` resolved lexically (the jailer refuses `..`: the jail mirrors a
/// path as it is written, so the VMM and the jail must both get this form).
pub fn normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// What goes into one jail besides the VMM's own arguments.
#[derive(Debug, Default)]
pub struct JailSpec<'a> {
    pub id: &'a str,
    pub uid: u32,
    pub gid: u32,
    /// Read-only at the same path (kernel, initrd).
    pub files: Vec<PathBuf>,
    /// Read-write at the same path (the VM's state directory).
    pub dirs: Vec<PathBuf>,
    /// Fds the VMM inherits (tap, disks).
    pub fds: Vec<i32>,
    /// `--cgroup FILE=VALUE` limits.
    pub cgroup: Vec<String>,
    /// `--rlimit NAME=N` limits.
    pub rlimits: Vec<String>,
}

/// The jailer command that runs the husk-vmm binary `vmm` with `args` in `spec`'s jail.
/// HUSK_LOG is passed on; nothing else of the environment is.
pub fn wrap(jailer: &Path, vmm: &Path, args: &VmmArgs, spec: &JailSpec<'_>) -> Command {
    let mut cmd = Command::new(jailer);
    cmd.arg("--id").arg(spec.id);
    let exec = vmm;
    cmd.arg("--exec-file")
        .arg(std::fs::canonicalize(exec).unwrap_or_else(|_| normalize(exec)));
    cmd.arg("--uid").arg(spec.uid.to_string());
    cmd.arg("--gid").arg(spec.gid.to_string());
    for f in &spec.files {
        cmd.arg("--file").arg(f);
    }
    for d in &spec.dirs {
        cmd.arg("--dir").arg(d);
    }
    for c in &spec.cgroup {
        cmd.arg("--cgroup").arg(c);
    }
    for r in &spec.rlimits {
        cmd.arg("--rlimit").arg(r);
    }
    for fd in &spec.fds {
        cmd.arg("--keep-fd").arg(fd.to_string());
        inherit_fd(&mut cmd, *fd);
    }
    if let Ok(level) = std::env::var("HUSK_LOG") {
        cmd.arg("--env").arg(format!("HUSK_LOG={level}"));
    }
    cmd.arg("--");
    cmd.args(args.to_args());
    cmd
}

/// Removes what the jail `id` left (its cgroup, killing anything still in it, and directory).
pub fn cleanup(jailer: &Path, id: &str) -> Result<(), JailError> {
    let out = Command::new(jailer)
        .args(["--cleanup", "--id", id])
        .output()
        .map_err(|cause| JailError::Run {
            jailer: jailer.into(),
            cause,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        let message = String::from_utf8_lossy(&out.stderr).trim().to_string();
        Err(JailError::Cleanup(message))
    }
}

/// The cgroup v2 controllers this host offers to husk's cgroups (those of the cgroup2 root,
/// from /proc/self/mountinfo): a hybrid host that binds cpu, memory or pids to cgroup v1 offers
/// none of them, and a limit through a missing controller would make every jail fail.
pub fn cgroup_controllers() -> Vec<String> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mount = info.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split(' ').next()? != "cgroup2" {
            return None;
        }
        Some(PathBuf::from(left.split(' ').nth(4)?))
    });
    mount
        .and_then(|m| std::fs::read_to_string(m.join("cgroup.controllers")).ok())
        .map(|text| text.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Where husk-jailer builds jails unless told otherwise (its `--chroot-base` default).
pub const JAIL_BASE: &str = "/run/husk/jail";

/// The jail id of the `husk run` with process id `pid`.
pub fn run_jail_id(pid: u32) -> String {
    format!("run-{pid}")
}

/// Removes the jails of `husk run` processes that no longer exist: a `husk run` killed with
/// SIGKILL takes its VMM along (parent-death signal) but cannot clean its jail up itself. Its
/// directory is empty and its cgroup holds nothing by then. Best effort: errors are ignored.
pub fn sweep_dead_runs(jailer: &Path) {
    let Ok(entries) = std::fs::read_dir(JAIL_BASE) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("run-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = cleanup(jailer, &run_jail_id(pid));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_jailer_command_carries_the_jail_and_then_the_vmm_arguments() {
        let vmm = VmmArgs {
            kernel: Some("/k".into()),
            api_sock: Some("/s/api.sock".into()),
            ..Default::default()
        };
        let spec = JailSpec {
            id: "vm1",
            uid: 1000,
            gid: 1001,
            files: vec!["/k".into()],
            dirs: vec!["/s".into()],
            fds: vec![],
            cgroup: vec!["memory.max=1G".into()],
            rlimits: vec!["nofile=64".into()],
        };
        let cmd = wrap(
            Path::new("/opt/husk/husk-jailer"),
            Path::new("/opt/husk/husk-vmm"),
            &vmm,
            &spec,
        );
        let args: Vec<_> = cmd.get_args().map(|a| a.to_str().unwrap()).collect();
        let dash = args.iter().position(|a| *a == "--").unwrap();
        assert_eq!(
            &args[dash..],
            ["--", "--kernel", "/k", "--api-sock", "/s/api.sock"]
        );
        let jail = args[..dash].join(" ");
        assert!(jail.starts_with("--id vm1 --exec-file /opt/husk/husk-vmm --uid 1000 --gid 1001"));
        assert!(
            jail.contains("--file /k --dir /s --cgroup memory.max=1G --rlimit nofile=64"),
            "{jail}"
        );
    }

    #[test]
    fn paths_are_normalized_lexically() {
        assert_eq!(
            normalize(Path::new("/a/b/../c/./d")),
            PathBuf::from("/a/c/d")
        );
        assert_eq!(normalize(Path::new("/../x")), PathBuf::from("/x"));
    }
}
