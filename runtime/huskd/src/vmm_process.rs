//! Starting one husk-vmm process for a VM, and watching it end.
//!
//! The VMM runs in its own session (setsid), so that it outlives huskd: a restarted huskd finds
//! it again through the pid file and watches it with a pidfd, which works for processes that
//! are not its children.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use husk_host::jail::{self, JailConfig, JailSpec};
use husk_host::net::VmLink;
use husk_init::spec::{BootSpec, PARAM};
use husk_proto::v1::VmSpec;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::store;

/// Everything that goes into one VMM command line.
pub struct Launch<'a> {
    /// Jailed (through husk-jailer, with the VM id as jail id) or not.
    pub jail: Option<&'a JailConfig>,
    pub id: &'a str,
    pub vmm: &'a Path,
    pub dir: &'a Path,
    pub spec: &'a VmSpec,
    pub vsock_cid: u32,
    pub link: Option<&'a VmLink>,
    /// Restore from this snapshot directory (and keep the VM paused) instead of booting.
    pub restore: Option<(&'a Path, bool)>,
}

impl Launch<'_> {
    /// The guest kernel command line: quiet, the root disk, the network, the user's extra
    /// parameters, then the boot spec (application, environment, working directory).
    pub fn kernel_cmdline(&self) -> Result<String, String> {
        let spec = self.spec;
        let mut env: Vec<Vec<u8>> = spec
            .env
            .iter()
            .map(|(k, v)| format!("{k}={v}").into_bytes())
            .collect();
        env.sort();
        let mut parts = vec![String::from("quiet")];
        if !spec.rootfs.is_empty() {
            parts.push("husk.root=/dev/vda".into());
        }
        if let Some(link) = self.link {
            parts.push(link.kernel_param());
            env.push(format!("HUSK_HOST_IP={}", link.host_ip).into_bytes());
            env.push(format!("HUSK_GUEST_IP={}", link.guest_ip).into_bytes());
        }
        if !spec.extra_cmdline.is_empty() {
            parts.push(spec.extra_cmdline.clone());
        }
        // A sandbox (no command) has no application to hand environment or a directory to.
        let boot = if spec.command.is_empty() {
            BootSpec::sandbox()
        } else {
            BootSpec {
                argv: spec.command.iter().map(|a| a.as_bytes().to_vec()).collect(),
                env,
                cwd: (!spec.workdir.is_empty()).then(|| spec.workdir.as_bytes().to_vec()),
            }
        };
        parts.push(format!(
            "{PARAM}{}",
            boot.encode().map_err(|e| e.to_string())?
        ));
        Ok(parts.join(" "))
    }

    /// The husk-vmm command.
    pub fn command(&self) -> Result<Command, String> {
        let spec = self.spec;
        let dir = self.dir;
        let mut cmd = Command::new(self.vmm);
        match self.restore {
            // The machine comes from the snapshot; devices below replace its backends.
            Some((snapshot, start_paused)) => {
                cmd.arg("--restore-state").arg(snapshot.join("vm.state"));
                cmd.arg("--restore-mem").arg(snapshot.join("vm.mem"));
                if start_paused {
                    cmd.arg("--start-paused");
                }
            }
            None => {
                cmd.arg("--kernel").arg(&spec.kernel);
                cmd.arg("--initrd").arg(&spec.initrd);
                cmd.arg("--cpus").arg(spec.vcpus.to_string());
                cmd.arg("--memory").arg(spec.memory_mib.to_string());
            }
        }
        if !spec.rootfs.is_empty() {
            cmd.arg("--disk").arg(&spec.rootfs);
        }
        for disk in &spec.disks {
            let ro = if disk.read_only { ":ro" } else { "" };
            cmd.arg("--disk").arg(format!("{}{ro}", disk.path));
        }
        if let Some(link) = self.link {
            cmd.arg("--net").arg(link.vmm_arg());
            husk_host::process::inherit_fd(&mut cmd, link.raw_fd());
        }
        cmd.arg("--vsock").arg(format!(
            "cid={},path={}",
            self.vsock_cid,
            dir.join(store::VSOCK_SOCK).display()
        ));
        cmd.arg("--console")
            .arg(format!("file:{}", dir.join(store::CONSOLE_LOG).display()));
        cmd.arg("--api-sock").arg(dir.join(store::API_SOCK));
        cmd.arg("--exit-report").arg(dir.join(store::EXIT_REPORT));
        if self.restore.is_none() {
            cmd.arg("--cmdline").arg(self.kernel_cmdline()?);
        }
        Ok(cmd)
    }

    /// The jailer command around [`command`](Self::command): kernel and initrd mirrored
    /// read-only, the `vmm/` directory read-write, disks opened here and passed as fds (kept
    /// open in `disks` until the spawn).
    fn jailed(&self, jail: &JailConfig, disks: &mut Vec<File>) -> Result<Command, String> {
        use std::os::fd::AsRawFd;
        let direct = self.command()?;
        let mut vmm = Command::new(direct.get_program());
        let mut args = direct.get_args();
        let mut files = Vec::new();
        while let Some(arg) = args.next() {
            vmm.arg(arg);
            if arg == "--kernel" || arg == "--initrd" {
                // Mirrored into the jail at the path the VMM is given.
                let path = jail::normalize(Path::new(args.next().unwrap_or_default()));
                vmm.arg(&path);
                files.push(path);
            } else if arg == "--disk" {
                let spec = args.next().and_then(|a| a.to_str()).unwrap_or_default();
                let (file, fd_arg) = jail::open_disk(spec)?;
                disks.push(file);
                vmm.arg(fd_arg);
            }
        }
        let mut fds: Vec<i32> = disks.iter().map(|f| f.as_raw_fd()).collect();
        fds.extend(self.link.map(|l| l.raw_fd()));
        let files = match self.restore {
            // The snapshot's files, and a diff's base (named in vm.base), read-only.
            Some((snapshot, _)) => {
                let mut files = vec![snapshot.join("vm.state"), snapshot.join("vm.mem")];
                if let Ok(base) = std::fs::read_to_string(snapshot.join("vm.base")) {
                    files.push(PathBuf::from(base.trim_end()));
                }
                files
            }
            None => vec![
                self.spec.kernel.clone().into(),
                self.spec.initrd.clone().into(),
            ],
        };
        let spec = JailSpec {
            id: self.id,
            uid: jail.uid,
            gid: jail.gid,
            files,
            dirs: vec![self.dir.join(store::VMM_DIR)],
            fds,
            cgroup: Vec::new(),
        };
        Ok(jail::wrap(&jail.jailer, &vmm, &spec))
    }

    /// Starts the VMM in its own session, with its stdout and stderr in `vmm.log`.
    pub fn spawn(&self) -> Result<u32, String> {
        let mut disks = Vec::new();
        let mut cmd = match self.jail {
            Some(jail) => self.jailed(jail, &mut disks)?,
            None => self.command()?,
        };
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(store::VMM_LOG))
            .map_err(|e| format!("cannot open vmm.log: {e}"))?;
        let log2 = log
            .try_clone()
            .map_err(|e| format!("cannot open vmm.log: {e}"))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        // SAFETY: runs in the child between fork and exec; setsid is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.vmm.display()))?;
        // The Child is dropped without waiting: the monitor reaps it with waitpid.
        Ok(child.id())
    }
}

/// A handle on a process that becomes readable when it exits (pidfd_open(2)).
pub struct ProcessHandle {
    pid: u32,
    fd: AsyncFd<OwnedFd>,
}

impl ProcessHandle {
    /// Opens a pidfd for `pid`; `Ok(None)` when no such process exists any more.
    pub fn open(pid: u32) -> io::Result<Option<Self>> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is
        // passed.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if raw < 0 {
            let err = io::Error::last_os_error();
            return if err.raw_os_error() == Some(libc::ESRCH) {
                Ok(None)
            } else {
                Err(err)
            };
        }
        // SAFETY: raw is a fresh fd owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw as RawFd) };
        // SAFETY: the OwnedFd moves into the AsyncFd and stays open, the same pidfd, until the
        // AsyncFd drops it.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Some(Self { pid, fd }))
    }

    /// Waits until the process has exited. For a child of huskd, also reaps it and returns its
    /// wait status; for a process huskd adopted after a restart, returns None.
    pub async fn exited(self) -> Option<i32> {
        loop {
            match self.fd.readable().await {
                Ok(mut guard) => {
                    guard.retain_ready();
                    break;
                }
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    if !alive(self.pid) {
                        break;
                    }
                }
            }
        }
        let mut status = 0;
        // SAFETY: waitpid writes the status into a local; WNOHANG never blocks. ECHILD (not
        // our child) leaves it unused.
        let reaped = unsafe { libc::waitpid(self.pid as libc::pid_t, &mut status, libc::WNOHANG) };
        (reaped == self.pid as libc::pid_t).then_some(status)
    }
}

/// Whether a process with this pid exists (it may be a zombie).
pub fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 checks existence and permission only.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

/// Sends `signal` to `pid`, ignoring a process that is already gone.
pub fn signal(pid: u32, signal: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid as libc::pid_t, signal) };
}

/// Describes a wait status for humans: "exited with status 3", "killed by signal 9".
pub fn describe_wait_status(status: i32) -> String {
    if libc::WIFEXITED(status) {
        format!("exited with status {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("killed by signal {}", libc::WTERMSIG(status))
    } else {
        format!("ended with wait status {status:#x}")
    }
}

/// Creates the `vmm/` directory (owned by `owner`, the jailed uid and gid, when given; mode
/// 0700) and opens (and truncates) the console log of a new run in it.
pub fn reset_console_log(dir: &Path, owner: Option<(u32, u32)>) -> io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let vmm_dir = dir.join(store::VMM_DIR);
    std::fs::create_dir_all(&vmm_dir)?;
    std::fs::set_permissions(&vmm_dir, std::fs::Permissions::from_mode(0o700))?;
    let path = dir.join(store::CONSOLE_LOG);
    File::create(&path)?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&vmm_dir, Some(uid), Some(gid))?;
        std::os::unix::fs::chown(&path, Some(uid), Some(gid))?;
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use husk_proto::v1::Disk;

    #[test]
    fn command_line_carries_every_part_of_the_spec() {
        let spec = VmSpec {
            kernel: "/k".into(),
            initrd: "/i".into(),
            rootfs: "/root.ext4".into(),
            disks: vec![Disk {
                path: "/data.img".into(),
                read_only: true,
            }],
            vcpus: 2,
            memory_mib: 512,
            command: vec!["sh".into(), "-c".into(), "echo hi".into()],
            env: [("A".to_string(), "1".to_string())].into(),
            workdir: "/srv".into(),
            extra_cmdline: "loglevel=3".into(),
            ..Default::default()
        };
        let launch = Launch {
            jail: None,
            id: "vm1",
            vmm: Path::new("/bin/husk-vmm"),
            dir: Path::new("/run/husk/vms/abc"),
            spec: &spec,
            vsock_cid: 7,
            link: None,
            restore: None,
        };
        let cmd = launch.command().unwrap();
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        for part in [
            "--kernel /k",
            "--initrd /i",
            "--cpus 2",
            "--memory 512",
            "--disk /root.ext4 --disk /data.img:ro",
            "--vsock cid=7,path=/run/husk/vms/abc/vmm/vsock.sock",
            "--console file:/run/husk/vms/abc/vmm/console.log",
            "--api-sock /run/husk/vms/abc/vmm/api.sock",
            "--exit-report /run/husk/vms/abc/vmm/exit.pb",
        ] {
            assert!(joined.contains(part), "{part} missing from {joined}");
        }
        let cmdline = args.last().unwrap();
        assert!(
            cmdline.starts_with("quiet husk.root=/dev/vda loglevel=3 husk.spec="),
            "{cmdline}"
        );
        let decoded = BootSpec::from_cmdline(cmdline).unwrap().unwrap();
        assert_eq!(
            decoded.argv,
            vec![b"sh".to_vec(), b"-c".to_vec(), b"echo hi".to_vec()]
        );
        assert_eq!(decoded.env, vec![b"A=1".to_vec()]);
        assert_eq!(decoded.cwd, Some(b"/srv".to_vec()));
    }

    #[test]
    fn no_command_boots_a_sandbox_without_application_settings() {
        let spec = VmSpec {
            env: [("A".to_string(), "1".to_string())].into(),
            workdir: "/srv".into(),
            ..Default::default()
        };
        let launch = Launch {
            jail: None,
            id: "vm1",
            vmm: Path::new("/bin/husk-vmm"),
            dir: Path::new("/run/husk/vms/abc"),
            spec: &spec,
            vsock_cid: 3,
            link: None,
            restore: None,
        };
        let cmdline = launch.kernel_cmdline().unwrap();
        let decoded = BootSpec::from_cmdline(&cmdline).unwrap().unwrap();
        assert!(decoded.is_sandbox(), "{decoded:?}");
    }

    #[tokio::test]
    #[allow(clippy::zombie_processes)] // reaped by ProcessHandle::exited, which is under test
    async fn a_child_is_reaped_with_its_status_and_a_gone_pid_has_no_handle() {
        let child = Command::new("sh").args(["-c", "exit 3"]).spawn().unwrap();
        let pid = child.id();
        let handle = ProcessHandle::open(pid).unwrap().unwrap();
        let status = handle.exited().await.unwrap();
        assert_eq!(describe_wait_status(status), "exited with status 3");
        assert!(ProcessHandle::open(pid).unwrap().is_none());
        assert!(!alive(pid));
    }
}
