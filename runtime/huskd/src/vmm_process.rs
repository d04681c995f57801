//! Starting one husk-vmm process for a VM, and watching it end.
//!
//! The VMM runs in its own session (setsid), so that it outlives huskd: a restarted huskd finds
//! it again through the pid file and watches it with a pidfd, which works for processes that
//! are not its children.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use husk_host::disk_image::OpenedDisk;
use husk_host::jail::{self, JailConfig, JailSpec};
use husk_host::net::VmLink;
use husk_host::vmm_args::{fd_path, ConsoleConfig, RestoreArgs, VmmArgs, VsockConfig};
use husk_init::spec::{BootSpec, SpecError, PARAM};
use husk_proto::v1::{Limits, VmSpec};
use rustix::process::{Pid, PidfdFlags, WaitOptions};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::store;

/// The files huskd opened for one VMM run. Each reaches the VMM as an inherited fd
/// (`/proc/self/fd/N`, see husk_devices::host_files), jailed or not: the VMM opens nothing by a
/// path that a caller named or that another user could change.
#[derive(Debug)]
pub struct RunFiles {
    /// Kernel and initramfs, opened under the path policy (None for a restore).
    pub kernel: Option<File>,
    pub initrd: Option<File>,
    /// The rootfs (first) and the disks, each with every image of its backing chain open.
    pub disks: Vec<OpenedDisk>,
    /// `console.log` and `exit.pb` in huskd's own VM directory.
    pub console: File,
    pub exit_report: File,
    /// `vmm.log`: the VMM's stdout and stderr.
    pub log: File,
    /// One running virtiofsd per shared directory (VmSpec.mounts, in order; boot only).
    pub shares: Vec<husk_host::virtiofs::Virtiofsd>,
}

/// A restore instead of a boot: the snapshot's files, opened by huskd (the directory under the
/// path policy, its files never through a link) and passed as fds like everything else.
#[derive(Debug)]
pub struct Restore {
    pub state: File,
    pub mem: File,
    /// The memory file's host path: the base the restored VM's later diffs record.
    pub mem_name: PathBuf,
    /// A diff's base memory file.
    pub base: Option<File>,
    pub start_paused: bool,
}

/// Everything that goes into one VMM process.
pub struct Launch<'a> {
    /// Jailed (through husk-jailer, with the VM id as jail id) or not.
    pub jail: Option<&'a JailConfig>,
    /// The cgroup v2 controllers the host offers (see `husk_host::jail::cgroup_controllers`).
    pub controllers: &'a [String],
    /// Who the jailed VMM runs as (the VM's own uid and gid).
    pub uid: u32,
    pub id: &'a str,
    pub vmm: &'a Path,
    pub dir: &'a Path,
    pub spec: &'a VmSpec,
    pub limits: Limits,
    pub vsock_cid: u32,
    pub link: Option<&'a VmLink>,
    /// With a link: the guest's DNS goes through the host (`husk.dns=`, its host end).
    pub dns: bool,
    pub restore: Option<Restore>,
    pub files: RunFiles,
}

/// Why a VMM could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error(transparent)]
    BootSpec(#[from] SpecError),
    #[error("shared directory: {0}")]
    Share(husk_init::shares::ShareError),
    #[error("cannot pass the guest command line: {0}")]
    CmdlinePipe(io::Error),
    #[error("cannot open vmm.log: {0}")]
    Log(io::Error),
    #[error("cannot start {}: {cause}", .vmm.display())]
    Spawn { vmm: PathBuf, cause: io::Error },
}

/// The default limits of a VM of `spec`, with the spec's own where it sets them (see
/// `Limits` in husk.proto).
pub fn effective_limits(spec: &VmSpec) -> Limits {
    let given = spec.limits.unwrap_or_default();
    let or = |v: u32, default: u32| if v == 0 { default } else { v };
    Limits {
        cpu_millis: or(
            given.cpu_millis,
            spec.vcpus.saturating_mul(1000).saturating_add(500),
        ),
        memory_max_mib: or(
            given.memory_max_mib,
            spec.memory_mib
                .saturating_add(64)
                .saturating_add(spec.memory_mib / 16),
        ),
        pids_max: or(given.pids_max, spec.vcpus.saturating_add(16)),
        open_files: or(given.open_files, 4096),
    }
}

/// The cgroup v2 settings and rlimits for `limits`, as husk-jailer takes them; a limit whose
/// controller the host does not offer (`controllers`) is left out (huskd says so at start-up).
pub fn jail_limits(limits: &Limits, controllers: &[String]) -> (Vec<String>, Vec<String>) {
    const PERIOD_US: u64 = 100_000;
    let quota = u64::from(limits.cpu_millis) * PERIOD_US / 1000;
    let wanted = [
        ("cpu", format!("cpu.max={quota} {PERIOD_US}")),
        (
            "memory",
            format!("memory.max={}", u64::from(limits.memory_max_mib) << 20),
        ),
        ("pids", format!("pids.max={}", limits.pids_max)),
    ];
    let cgroup = wanted
        .into_iter()
        .filter(|(controller, _)| controllers.iter().any(|c| c == controller))
        .map(|(_, setting)| setting)
        .collect();
    let rlimits = vec![format!("nofile={}", limits.open_files)];
    (cgroup, rlimits)
}

/// The controllers whose limits huskd sets on every VM.
pub const LIMIT_CONTROLLERS: &[&str] = &["cpu", "memory", "pids"];

impl Launch<'_> {
    /// The guest kernel command line: quiet, the root disk, the network, the user's extra
    /// parameters, then the boot spec (application, environment, working directory).
    pub fn kernel_cmdline(&self) -> Result<String, LaunchError> {
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
            if self.dns {
                parts.push(husk_host::firewall::dns_kernel_param(link.host_ip));
            }
            env.push(format!("HUSK_HOST_IP={}", link.host_ip).into_bytes());
            env.push(format!("HUSK_GUEST_IP={}", link.guest_ip).into_bytes());
        }
        for (share, mount) in self.files.shares.iter().zip(&spec.mounts) {
            let param = husk_init::shares::SharedMount::new(
                share.tag(),
                &mount.guest_path,
                mount.read_only,
            )
            .map_err(LaunchError::Share)?
            .to_param();
            parts.push(param);
        }
        if !spec.hostname.is_empty() {
            parts.push(husk_init::hostname::to_param(&spec.hostname));
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
        parts.push(format!("{PARAM}{}", boot.encode()?));
        Ok(parts.join(" "))
    }

    /// Every fd the VMM inherits.
    fn fds(&self, cmdline: Option<&OwnedFd>) -> Vec<RawFd> {
        let f = &self.files;
        let mut fds: Vec<RawFd> = [&f.kernel, &f.initrd]
            .into_iter()
            .flatten()
            .map(|file| file.as_raw_fd())
            .collect();
        fds.extend(f.disks.iter().flat_map(OpenedDisk::fds));
        fds.extend([f.console.as_raw_fd(), f.exit_report.as_raw_fd()]);
        if let Some(r) = &self.restore {
            fds.extend([r.state.as_raw_fd(), r.mem.as_raw_fd()]);
            fds.extend(r.base.as_ref().map(|b| b.as_raw_fd()));
        }
        fds.extend(cmdline.map(|fd| fd.as_raw_fd()));
        fds.extend(self.link.map(|l| l.raw_fd()));
        fds.extend(f.shares.iter().filter_map(|s| s.vmm_fd()));
        fds
    }

    /// The husk-vmm invocation; `cmdline` is the pipe the guest command line is read from.
    /// Every file is an inherited fd; only the sockets, in the VM's own `vmm/`, go by path.
    pub fn vmm_args(&self, cmdline: Option<&OwnedFd>) -> VmmArgs {
        let spec = self.spec;
        let files = &self.files;
        let by_fd = |file: &File| fd_path(file.as_raw_fd());
        let mut args = VmmArgs {
            disks: files.disks.iter().map(|disk| disk.config.clone()).collect(),
            net: self.link.map(VmLink::net_config),
            vsock: Some(VsockConfig {
                cid: u64::from(self.vsock_cid),
                uds_path: self.dir.join(store::VSOCK_SOCK),
            }),
            console: Some(ConsoleConfig::File(by_fd(&files.console))),
            api_sock: Some(self.dir.join(store::API_SOCK)),
            exit_report: Some(by_fd(&files.exit_report)),
            cmdline_file: cmdline.map(|fd| fd_path(fd.as_raw_fd())),
            ..VmmArgs::default()
        };
        // Limits hold for a boot and a restore alike (a restore's spec is the snapshot's).
        args.disk_limits = crate::rate_limits::disk_limits(spec);
        if self.link.is_some() {
            let network = spec.network.as_ref();
            let limit = |l: Option<&husk_proto::v1::RateLimit>| l.map(crate::rate_limits::to_arg);
            args.net_rx_limit = limit(network.and_then(|n| n.rx_rate_limit.as_ref()));
            args.net_tx_limit = limit(network.and_then(|n| n.tx_rate_limit.as_ref()));
        }
        match &self.restore {
            // The machine comes from the snapshot; the devices above replace its backends.
            Some(restore) => {
                args.restore = Some(RestoreArgs {
                    state: by_fd(&restore.state),
                    mem: by_fd(&restore.mem),
                    mem_name: Some(restore.mem_name.clone()),
                    base: restore.base.as_ref().map(by_fd),
                    start_paused: restore.start_paused,
                });
            }
            None => {
                args.disk_slots = spec.disk_slots;
                args.fs = files.shares.iter().filter_map(|s| s.fs_config()).collect();
                args.kernel = files.kernel.as_ref().map(by_fd);
                args.initrd = files.initrd.as_ref().map(by_fd);
                args.cpus = Some(u64::from(spec.vcpus));
                args.memory = Some(u64::from(spec.memory_mib));
                let balloon = spec.balloon.unwrap_or_default();
                if balloon.disabled {
                    args.no_balloon = true;
                } else if balloon.no_free_page_reporting {
                    args.balloon = Some(husk_host::vmm_args::BalloonConfig {
                        reporting: false,
                        ..Default::default()
                    });
                }
            }
        }
        args
    }

    /// The full command: husk-vmm, wrapped in husk-jailer when jailed (only the `vmm/`
    /// directory is mirrored, read-write; every file comes as an fd).
    pub fn command(&self, cmdline: Option<&OwnedFd>) -> Command {
        let args = self.vmm_args(cmdline);
        let fds = self.fds(cmdline);
        let Some(jail) = self.jail else {
            let mut cmd = args.to_command(self.vmm);
            for fd in fds {
                husk_host::process::inherit_fd(&mut cmd, fd);
            }
            return cmd;
        };
        let (cgroup, rlimits) = jail_limits(&self.limits, self.controllers);
        let spec = JailSpec {
            id: self.id,
            uid: self.uid,
            gid: self.uid,
            files: Vec::new(),
            dirs: vec![self.dir.join(store::VMM_DIR)],
            fds,
            cgroup,
            rlimits,
        };
        jail::wrap(&jail.jailer, self.vmm, &args, &spec)
    }

    /// Starts the VMM in its own session, with its stdout and stderr in `vmm.log`. The guest
    /// command line (with the application's argv and environment) goes through a pipe, never
    /// onto a process command line where any local user could read it.
    pub fn spawn(&self) -> Result<u32, LaunchError> {
        let cmdline = match self.restore {
            Some(_) => None,
            None => Some(
                husk_host::process::cmdline_pipe(&self.kernel_cmdline()?)
                    .map_err(LaunchError::CmdlinePipe)?,
            ),
        };
        let mut cmd = self.command(cmdline.as_ref());
        let log = &self.files.log;
        let log2 = log.try_clone().map_err(LaunchError::Log)?;
        let log1 = log.try_clone().map_err(LaunchError::Log)?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log1))
            .stderr(Stdio::from(log2));
        // SAFETY: runs in the child between fork and exec; setsid is async-signal-safe and
        // nothing here allocates.
        unsafe {
            cmd.pre_exec(|| {
                rustix::process::setsid()?;
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|cause| LaunchError::Spawn {
            vmm: self.vmm.to_path_buf(),
            cause,
        })?;
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
        let Some(target) = to_pid(pid) else {
            return Ok(None);
        };
        let fd = match rustix::process::pidfd_open(target, PidfdFlags::empty()) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::SRCH) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
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
        // WNOHANG never blocks; ECHILD (not our child) is an adopted VMM's None.
        let target = to_pid(self.pid)?;
        match rustix::process::waitpid(Some(target), WaitOptions::NOHANG) {
            Ok(Some((reaped, status))) if reaped == target => Some(status.as_raw()),
            _ => None,
        }
    }
}

/// A pid as the kernel takes it; None for 0 and for numbers past `pid_t`, which name no
/// single process.
fn to_pid(pid: u32) -> Option<Pid> {
    Pid::from_raw(i32::try_from(pid).ok()?)
}

/// Whether a process with this pid exists (it may be a zombie).
pub fn alive(pid: u32) -> bool {
    // Signal 0 checks existence and permission only.
    to_pid(pid).is_some_and(|pid| rustix::process::test_kill_process(pid).is_ok())
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

#[cfg(test)]
mod tests {
    use super::*;
    use husk_host::vmm_args::DiskConfig;
    use husk_host::vmm_args::Invocation;
    use husk_proto::v1::Disk;

    /// Run files over scratch files (their content does not matter to the command line).
    fn run_files(tag: &str, disks: usize, boot: bool) -> (RunFiles, PathBuf) {
        let dir = std::env::temp_dir().join(format!("huskd-launch-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = |name: &str| File::create(dir.join(name)).unwrap();
        let files = RunFiles {
            kernel: boot.then(|| file("k")),
            initrd: boot.then(|| file("i")),
            disks: (0..disks)
                .map(|n| {
                    let f = file(&format!("d{n}"));
                    OpenedDisk {
                        config: DiskConfig::raw(fd_path(f.as_raw_fd()), n > 0),
                        files: vec![f],
                    }
                })
                .collect(),
            console: file("console.log"),
            exit_report: file("exit.pb"),
            shares: Vec::new(),
            log: file("vmm.log"),
        };
        (files, dir)
    }

    fn args(cmd: &Command) -> String {
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        args.join(" ")
    }

    #[test]
    fn every_file_reaches_the_vmm_as_an_fd_and_the_spec_only_through_the_pipe() {
        let spec = VmSpec {
            kernel: "/k".into(),
            initrd: "/i".into(),
            rootfs: "/root.ext4".into(),
            disks: vec![Disk {
                path: "/data.img".into(),
                read_only: true,
                rate_limit: None,
                ..Default::default()
            }],
            vcpus: 2,
            memory_mib: 512,
            command: vec!["sh".into(), "-c".into(), "echo secret-arg".into()],
            env: [("TOKEN".to_string(), "secret-env".to_string())].into(),
            workdir: "/srv".into(),
            extra_cmdline: "loglevel=3".into(),
            ..Default::default()
        };
        let (files, scratch) = run_files("fds", 2, true);
        let fd = |f: &File| f.as_raw_fd();
        let (k, i, d0, d1) = (
            fd(files.kernel.as_ref().unwrap()),
            fd(files.initrd.as_ref().unwrap()),
            fd(&files.disks[0].files[0]),
            fd(&files.disks[1].files[0]),
        );
        let (console, exit) = (fd(&files.console), fd(&files.exit_report));
        let launch = Launch {
            jail: None,
            controllers: &[],
            uid: 0,
            id: "vm1",
            vmm: Path::new("/bin/husk-vmm"),
            dir: Path::new("/run/husk/vms/abc"),
            spec: &spec,
            limits: effective_limits(&spec),
            vsock_cid: 7,
            link: None,
            dns: false,
            restore: None,
            files,
        };
        let cmdline = husk_host::process::cmdline_pipe(&launch.kernel_cmdline().unwrap()).unwrap();
        let typed = launch.vmm_args(Some(&cmdline));
        assert_eq!(
            VmmArgs::parse(typed.to_args()),
            Ok(Invocation::Run(Box::new(typed.clone())))
        );
        let joined = args(&launch.command(Some(&cmdline)));
        for part in [
            format!("--kernel /proc/self/fd/{k}"),
            format!("--initrd /proc/self/fd/{i}"),
            "--cpus 2".into(),
            "--memory 512".into(),
            format!("--disk /proc/self/fd/{d0} --disk /proc/self/fd/{d1}:ro"),
            "--vsock cid=7,path=/run/husk/vms/abc/vmm/vsock.sock".into(),
            format!("--console file:/proc/self/fd/{console}"),
            "--api-sock /run/husk/vms/abc/vmm/api.sock".into(),
            format!("--exit-report /proc/self/fd/{exit}"),
            format!("--cmdline-file /proc/self/fd/{}", cmdline.as_raw_fd()),
        ] {
            assert!(joined.contains(&part), "{part} missing from {joined}");
        }
        for secret in ["secret-arg", "secret-env", "/root.ext4", "/data.img", "/k "] {
            assert!(
                !joined.contains(secret),
                "{secret} on the command line: {joined}"
            );
        }
        // What the VMM reads from the pipe is the whole guest command line.
        let mut text = String::new();
        std::io::Read::read_to_string(&mut File::from(cmdline), &mut text).unwrap();
        assert!(
            text.starts_with("quiet husk.root=/dev/vda loglevel=3 husk.spec="),
            "{text}"
        );
        let decoded = BootSpec::from_cmdline(text.trim_end()).unwrap().unwrap();
        assert_eq!(
            decoded.argv,
            vec![b"sh".to_vec(), b"-c".to_vec(), b"echo secret-arg".to_vec()]
        );
        assert_eq!(decoded.env, vec![b"TOKEN=secret-env".to_vec()]);
        assert_eq!(decoded.cwd, Some(b"/srv".to_vec()));
        std::fs::remove_dir_all(scratch).unwrap();
    }

    #[test]
    fn disk_rate_limits_reach_the_vmm_numbered_after_the_rootfs() {
        use husk_proto::v1::{RateLimit, TokenBucket};
        let limit = RateLimit {
            bandwidth: Some(TokenBucket {
                rate: 1 << 20,
                burst: 0,
            }),
            ops: None,
        };
        let spec = VmSpec {
            kernel: "/k".into(),
            initrd: "/i".into(),
            rootfs: "/root.ext4".into(),
            disks: vec![Disk {
                path: "/data.img".into(),
                read_only: false,
                rate_limit: Some(limit),
                ..Default::default()
            }],
            ..Default::default()
        };
        let (files, _scratch) = run_files("limits", 2, true);
        let launch = Launch {
            jail: None,
            controllers: &[],
            uid: 0,
            id: "vm1",
            vmm: Path::new("/bin/husk-vmm"),
            dir: Path::new("/run/husk/vms/abc"),
            spec: &spec,
            limits: effective_limits(&spec),
            vsock_cid: 7,
            link: None,
            dns: false,
            restore: None,
            files,
        };
        let typed = launch.vmm_args(None);
        assert_eq!(typed.disk_limits.len(), 1);
        assert_eq!(typed.disk_limits[0].to_string(), "1:bw=1048576");
        assert_eq!(typed.net_rx_limit, None, "no link, no net limits");
        assert!(args(&launch.command(None)).contains("--disk-limit 1:bw=1048576"));
    }

    #[test]
    fn a_jailed_launch_carries_the_vms_uid_limits_and_only_its_vmm_directory() {
        let spec = VmSpec {
            vcpus: 2,
            memory_mib: 1024,
            ..Default::default()
        };
        let (files, scratch) = run_files("jail", 0, false);
        let file = |name: &str| File::create(scratch.join(name)).unwrap();
        let jail = JailConfig {
            jailer: "/bin/husk-jailer".into(),
            uid: 65534,
            gid: 65534,
        };
        let controllers: Vec<String> = ["cpu", "memory", "pids", "io"].map(String::from).into();
        let launch = Launch {
            jail: Some(&jail),
            controllers: &controllers,
            uid: 100_007,
            id: "vm1",
            vmm: Path::new("/bin/husk-vmm"),
            dir: Path::new("/run/husk/vms/abc"),
            spec: &spec,
            limits: effective_limits(&spec),
            vsock_cid: 3,
            link: None,
            dns: false,
            restore: Some(Restore {
                state: file("vm.state"),
                mem: file("vm.mem"),
                mem_name: "/snap/vm.mem".into(),
                base: Some(file("base.mem")),
                start_paused: true,
            }),
            files,
        };
        let typed = launch.vmm_args(None);
        assert_eq!(
            VmmArgs::parse(typed.to_args()),
            Ok(Invocation::Run(Box::new(typed.clone())))
        );
        let joined = args(&launch.command(None));
        let dash = joined
            .find(" -- ")
            .expect("the jailer's -- before the VMM's arguments");
        let vmm_part: Vec<String> = typed
            .to_args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(&joined[dash + 4..], vmm_part.join(" "));
        for part in [
            "--uid 100007 --gid 100007",
            "--gid 100007 --dir /run/husk/vms/abc/vmm --cgroup cpu.max=250000 100000",
            "--cgroup memory.max=1207959552 --cgroup pids.max=18",
            "--rlimit nofile=4096",
            "--restore-mem-name /snap/vm.mem --restore-base /proc/self/fd/",
            "--start-paused",
        ] {
            assert!(joined.contains(part), "{part} missing from {joined}");
        }
        assert!(!joined.contains("--kernel"), "{joined}");
        assert!(
            !joined.contains("--file"),
            "nothing mirrored by path: {joined}"
        );
        let r = launch.restore.as_ref().unwrap();
        for fd in [r.state.as_raw_fd(), r.mem.as_raw_fd()] {
            assert!(joined.contains(&format!("--keep-fd {fd}")), "{joined}");
        }
        std::fs::remove_dir_all(scratch).unwrap();
    }

    #[test]
    fn limits_through_controllers_the_host_lacks_are_left_out() {
        let limits = effective_limits(&VmSpec {
            vcpus: 1,
            memory_mib: 256,
            ..Default::default()
        });
        let (cgroup, rlimits) = jail_limits(&limits, &["memory".to_string()]);
        assert_eq!(
            cgroup,
            vec![format!("memory.max={}", (256 + 64 + 16) << 20)]
        );
        assert_eq!(rlimits, vec!["nofile=4096".to_string()]);
        assert!(jail_limits(&limits, &[]).0.is_empty());
    }

    #[test]
    fn limits_come_from_the_shape_unless_the_spec_sets_them() {
        let spec = VmSpec {
            vcpus: 4,
            memory_mib: 2048,
            limits: Some(Limits {
                pids_max: 100,
                ..Default::default()
            }),
            ..Default::default()
        };
        let limits = effective_limits(&spec);
        assert_eq!(limits.cpu_millis, 4500);
        assert_eq!(limits.memory_max_mib, 2048 + 64 + 128);
        assert_eq!(limits.pids_max, 100);
        assert_eq!(limits.open_files, 4096);
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
