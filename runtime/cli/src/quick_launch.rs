//! `husk run`: boot a micro-VM with husk-vmm directly (no daemon), run one command in it, and
//! exit with that command's exit code.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use husk_init::spec::{BootSpec, SpecError, PARAM};

use crate::run_args::{NetMode, RunArgs};
use husk_host::firewall::{self, FirewallError};
use husk_host::jail::{self, JailConfig, JailError, JailSpec};
use husk_host::net::{NetError, VmLink};
use husk_host::passt::{self, Passt, PasstConfig, PasstError};
use husk_host::paths::{husk_home, require_file, vmm_binary, FileError, LookupError};
use husk_host::process::inherit_fd;
use husk_host::virtiofs::{self, SharedDir, VirtiofsError, Virtiofsd};
use husk_host::vmm_args::{
    fd_path, DiskConfig, FsConfig, NetConfig, ValueError, VmmArgs, VsockConfig,
};

const BUILD_KERNEL_HINT: &str = "build the default one with scripts/build-kernel, or pass --kernel";
const BUILD_INITRD_HINT: &str =
    "build the default one with scripts/build-image default, or pass --initrd";

/// Exit code when husk itself (not the guest application) failed, as docker does.
pub const EXIT_HUSK_ERROR: i32 = 125;

/// Why `husk run` could not run the VM (each message is the whole story, on one line).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Lookup(#[from] LookupError),
    #[error("--image: {0}")]
    Image(#[from] husk_host::oci_image::OciError),
    #[error("--image: the image names no command (no Entrypoint or Cmd): give CMD")]
    ImageNoCommand,
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    Jail(#[from] JailError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Firewall(#[from] FirewallError),
    #[error(transparent)]
    Passt(#[from] PasstError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("-v {volume}: {cause}")]
    Volume {
        volume: SharedDir,
        cause: VirtiofsError,
    },
    #[error("-v {volume}: {cause}")]
    VolumeMount {
        volume: SharedDir,
        cause: husk_init::shares::ShareError,
    },
    #[error("--disk {value}: {reason}")]
    Disk { value: String, reason: ValueError },
    #[error(transparent)]
    DiskImage(#[from] crate::run_disks::DiskError),
    #[error("{}: {cause}", .path.display())]
    Absolute { path: PathBuf, cause: io::Error },
    #[error("--cgroup needs the jail: run husk as root, without --no-jail")]
    CgroupWithoutJail,
    #[error("--vsock {}: {cause}", .dir.display())]
    VsockDir { dir: PathBuf, cause: io::Error },
    #[error(
        "--vsock {}: the jailed VMM (uid {uid}) cannot create its socket in {}; make the \
         directory writable for it (e.g. chmod 1777), set HUSK_JAIL_UID/HUSK_JAIL_GID, or pass \
         --no-jail",
        .socket.display(),
        .dir.display()
    )]
    VsockNotWritable {
        socket: PathBuf,
        dir: PathBuf,
        uid: u32,
    },
    #[error("cannot pass the guest command line: {0}")]
    CmdlinePipe(io::Error),
    #[error("cannot start {}: {cause}", .vmm.display())]
    Spawn { vmm: PathBuf, cause: io::Error },
    #[error("waiting for {}: {cause}", .vmm.display())]
    Wait { vmm: PathBuf, cause: io::Error },
}

/// Runs the VM and returns the exit code to leave with.
pub fn run(args: &RunArgs) -> Result<i32, RunError> {
    let home = husk_home()?;
    let with_image;
    let args = match &args.image {
        Some(source) => {
            with_image = crate::run_image::apply(args, source, &home)?;
            &with_image
        }
        None => args,
    };
    let kernel = args
        .kernel
        .clone()
        .unwrap_or_else(|| husk_host::paths::default_kernel(&home));
    let initrd = args
        .initrd
        .clone()
        .unwrap_or_else(|| husk_host::paths::default_initrd(&home));
    let mut spec = BootSpec {
        argv: args.command.iter().map(|a| a.as_bytes().to_vec()).collect(),
        env: args.env.iter().map(|e| e.as_bytes().to_vec()).collect(),
        cwd: args.workdir.as_ref().map(|w| w.as_bytes().to_vec()),
    };
    // Everything that can be refused is checked before anything is created.
    spec.encode()?;
    require_file(&kernel, "kernel", BUILD_KERNEL_HINT)?;
    require_file(&initrd, "initrd", BUILD_INITRD_HINT)?;
    let opened_disks = crate::run_disks::open_all(args)?;
    let vmm = vmm_binary()?;
    let jail_config = jail::config(args.no_jail)?;
    // A jailed VMM sees host paths only where the jail mirrors them, and "/" is its cwd.
    let absolute = |p: &Path| {
        std::path::absolute(p)
            .map(|p| jail::normalize(&p))
            .map_err(|cause| RunError::Absolute {
                path: p.into(),
                cause,
            })
    };
    let (kernel, initrd) = (absolute(&kernel)?, absolute(&initrd)?);
    let vsock = args.vsock.as_deref().map(absolute).transpose()?;
    // Disks are opened here (with husk's rights, chains resolved) and handed over as fds.
    let disks: Vec<DiskConfig> = opened_disks.iter().map(|d| d.config.clone()).collect();
    let disk_files: Vec<std::fs::File> = opened_disks.into_iter().flat_map(|d| d.files).collect();
    if jail_config.is_none() && !args.cgroup.is_empty() {
        return Err(RunError::CgroupWithoutJail);
    }
    let vsock_dir = match (&jail_config, &vsock) {
        (Some(j), Some(path)) => Some(vsock_dir_for(j, path)?),
        _ => None,
    };
    // Shared directories: each resolved (relative to the current directory) and checked first,
    // then one virtiofsd per share, tagged husk-fs0, husk-fs1, ...
    let mut volumes = start_volumes(&args.volumes)?;

    let link = if args.net == Some(NetMode::Tap) {
        Some(VmLink::create()?)
    } else {
        None
    };
    // Rootless networking: passt, as the calling user (no tap, no firewall rules).
    let mut user_net = if args.net == Some(NetMode::User) {
        Some(start_passt(args, jail_config.as_ref())?)
    } else {
        None
    };
    // The link's firewall: NAT, DNS, published ports, egress policy (removed when the VM ends,
    // or by the next garbage collection when husk itself is killed).
    let dns = match &link {
        Some(link) => Some(install_firewall(args, link)?),
        None => None,
    };
    let mut cmdline = vec![String::from("quiet")];
    if args.rootfs.is_some() {
        cmdline.push("husk.root=/dev/vda".into());
    }
    if let Some(link) = &link {
        cmdline.push(link.kernel_param());
        if dns == Some(true) {
            cmdline.push(firewall::dns_kernel_param(link.host_ip));
        }
        spec.env
            .push(format!("HUSK_HOST_IP={}", link.host_ip).into_bytes());
        spec.env
            .push(format!("HUSK_GUEST_IP={}", link.guest_ip).into_bytes());
    }
    if let Some((_, dns)) = &user_net {
        cmdline.push(passt::kernel_param());
        if *dns {
            cmdline.push(firewall::dns_kernel_param(passt::DNS_IP));
        }
        spec.env
            .push(format!("HUSK_HOST_IP={}", passt::GATEWAY_IP).into_bytes());
        spec.env
            .push(format!("HUSK_GUEST_IP={}", passt::GUEST_IP).into_bytes());
    }
    for (_, param) in &volumes {
        cmdline.push(param.clone());
    }
    cmdline.extend(args.cmdline.clone());
    cmdline.push(format!("{PARAM}{}", spec.encode()?));

    // The application's argv and environment travel in the guest command line: through a
    // pipe, so that they never show on husk-vmm's own command line.
    let cmdline_fd =
        husk_host::process::cmdline_pipe(&cmdline.join(" ")).map_err(RunError::CmdlinePipe)?;
    let vmm_args = vmm_args(
        args,
        VmmFiles {
            kernel: kernel.clone(),
            initrd: initrd.clone(),
            disks,
            vsock,
            cmdline_fd: cmdline_fd.as_raw_fd(),
            fs: volumes
                .iter()
                .filter_map(|(fsd, _)| fsd.fs_config())
                .collect(),
        },
        link.as_ref()
            .map(VmLink::net_config)
            .or_else(|| user_net.as_ref().and_then(|(p, _)| p.net_config())),
    );
    // What the VMM inherits: the tap or passt's socket, the disks opened here, the
    // virtiofsd connections, the command-line pipe.
    let fds: Vec<RawFd> = link
        .iter()
        .map(|l| l.raw_fd())
        .chain(user_net.iter().filter_map(|(p, _)| p.vmm_fd()))
        .chain(disk_files.iter().map(|f| f.as_raw_fd()))
        .chain(volumes.iter().filter_map(|(fsd, _)| fsd.vmm_fd()))
        .chain([cmdline_fd.as_raw_fd()])
        .collect();
    let jail_id = jail::run_jail_id(std::process::id());
    let mut cmd = match &jail_config {
        None => {
            let mut cmd = vmm_args.to_command(&vmm);
            for fd in fds {
                inherit_fd(&mut cmd, fd);
            }
            cmd
        }
        Some(j) => {
            jail::sweep_dead_runs(&j.jailer);
            let spec = JailSpec {
                id: &jail_id,
                uid: j.uid,
                gid: j.gid,
                files: vec![kernel, initrd],
                dirs: vsock_dir.into_iter().collect(),
                fds,
                cgroup: args.cgroup.clone(),
                rlimits: Vec::new(),
            };
            jail::wrap(&j.jailer, &vmm, &vmm_args, &spec)
        }
    };
    // A killed husk run takes its VM with it (husk-jailer re-arms this after its uid drop).
    // SAFETY: runs in the child between fork and exec; prctl is async-signal-safe and nothing
    // here allocates.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            let kill = rustix::process::Signal::KILL;
            rustix::process::set_parent_process_death_signal(Some(kill))?;
            Ok(())
        });
    }
    let spawned = cmd.spawn().map_err(|cause| RunError::Spawn {
        vmm: vmm.clone(),
        cause,
    });
    // husk-vmm holds the tap and disks now; with husk's copies closed, they go with the VMM.
    drop(link);
    if let Some((passt, _)) = &mut user_net {
        // passt quits when the VMM's end closes, which is now the VMM's alone.
        passt.close_vmm_end();
    }
    for (fsd, _) in &mut volumes {
        // Likewise virtiofsd quits when the VMM's end of its connection closes.
        fsd.close_vmm_end();
    }
    drop(disk_files);
    drop(cmdline_fd);
    let result = spawned.and_then(|child| wait(child, &vmm));
    if let Some((passt, _)) = &mut user_net {
        passt.stop();
    }
    for (fsd, _) in &mut volumes {
        fsd.stop();
    }
    if dns.is_some() {
        // The tap went with the VMM: its rules are garbage now. Collected rather than removed
        // by name, since the name may already be a newer VM's.
        if let Err(e) = firewall::collect_garbage() {
            eprintln!("husk: warning: removing the VM's firewall rules: {e}");
        }
    }
    if let Some(j) = &jail_config {
        if let Err(e) = jail::cleanup(&j.jailer, &jail_id) {
            eprintln!("husk: warning: cleaning up jail {jail_id}: {e}");
        }
    }
    result
}

/// Applies the firewall of `link`; whether the guest gets DNS through the host.
fn install_firewall(args: &RunArgs, link: &VmLink) -> Result<bool, RunError> {
    let upstream = firewall::resolv::upstream();
    if upstream.is_none() {
        eprintln!(
            "husk: warning: the host has no usable IPv4 nameserver in {} or {} (only loopback \
             ones): the guest gets no DNS, addresses still work",
            firewall::resolv::RESOLV_CONF,
            firewall::resolv::RESOLVED_UPSTREAM
        );
    }
    let rules = firewall::VmRules::new(link, &args.network_policy(), upstream);
    firewall::apply(&rules)?;
    Ok(upstream.is_some())
}

/// Starts passt for `--net=user`; whether the guest gets DNS through it.
fn start_passt(args: &RunArgs, jail: Option<&JailConfig>) -> Result<(Passt, bool), RunError> {
    let dns = passt::host_has_ipv4_nameserver();
    if !dns {
        eprintln!(
            "husk: warning: the host has no IPv4 nameserver in /etc/resolv.conf: the guest gets \
             no DNS, addresses still work"
        );
    }
    // passt will not stay root: as root it runs as the jail's user (nobody by default).
    let runas = rustix::process::geteuid()
        .is_root()
        .then(|| jail.map_or((65534, 65534), |j| (j.uid, j.gid)));
    let config = PasstConfig {
        published: args.publish.clone(),
        host_access: args.host_access,
        dns,
        runas,
    };
    Ok((Passt::start(&config)?, dns))
}

/// Starts one virtiofsd per `-v` share (tags husk-fs0, husk-fs1, ...), each with the guest's
/// `husk.fs=` kernel parameter. Every share is resolved and checked before the first starts.
fn start_volumes(shares: &[SharedDir]) -> Result<Vec<(Virtiofsd, String)>, RunError> {
    let volume_error = |volume: &SharedDir| {
        let volume = volume.clone();
        move |cause| RunError::Volume { volume, cause }
    };
    let mut resolved = Vec::with_capacity(shares.len());
    for (index, share) in shares.iter().enumerate() {
        let tag = virtiofs::tag_for(index);
        let param = share
            .kernel_param(&tag)
            .map_err(|cause| RunError::VolumeMount {
                volume: share.clone(),
                cause,
            })?;
        resolved.push((share.resolved().map_err(volume_error(share))?, tag, param));
    }
    let mut started = Vec::with_capacity(resolved.len());
    for ((share, tag, param), given) in resolved.iter().zip(shares) {
        started.push((
            Virtiofsd::start(share, tag).map_err(volume_error(given))?,
            param.clone(),
        ));
    }
    Ok(started)
}

/// What `husk run` resolved or opened for husk-vmm.
struct VmmFiles {
    kernel: PathBuf,
    initrd: PathBuf,
    /// The root disk first; by fd when jailed.
    disks: Vec<DiskConfig>,
    vsock: Option<PathBuf>,
    /// The pipe holding the guest command line.
    cmdline_fd: RawFd,
    /// The shared directories' virtio-fs devices (connected virtiofsd sockets).
    fs: Vec<FsConfig>,
}

/// The husk-vmm invocation of `husk run`: the guest CID is always 3 (one VM per socket path).
fn vmm_args(args: &RunArgs, files: VmmFiles, net: Option<NetConfig>) -> VmmArgs {
    let has_net = net.is_some();
    VmmArgs {
        kernel: Some(files.kernel),
        initrd: Some(files.initrd),
        cmdline_file: Some(fd_path(files.cmdline_fd)),
        cpus: Some(u64::from(args.cpus)),
        memory: Some(args.memory_mib),
        disks: files.disks,
        net,
        vsock: files.vsock.map(|uds_path| VsockConfig { cid: 3, uds_path }),
        fs: files.fs,
        report_boot_time: args.report_boot_time,
        no_balloon: args.no_balloon,
        disk_limits: args.disk_limits.clone(),
        net_rx_limit: args.net_rx_limit.filter(|_| has_net),
        net_tx_limit: args.net_tx_limit.filter(|_| has_net),
        ..VmmArgs::default()
    }
}

/// The directory of the vsock socket, which the jailed VMM must be able to create it in.
fn vsock_dir_for(jail: &JailConfig, socket: &Path) -> Result<PathBuf, RunError> {
    use std::os::unix::fs::MetadataExt;
    let dir = socket.parent().unwrap_or(Path::new("/")).to_path_buf();
    let meta = std::fs::metadata(&dir).map_err(|cause| RunError::VsockDir {
        dir: dir.clone(),
        cause,
    })?;
    let need = if meta.uid() == jail.uid {
        0o300
    } else if meta.gid() == jail.gid {
        0o030
    } else {
        0o003
    };
    if meta.mode() & need != need {
        return Err(RunError::VsockNotWritable {
            socket: socket.into(),
            dir,
            uid: jail.uid,
        });
    }
    Ok(dir)
}

/// Waits for the VMM (or the jailer that became it) and returns the exit code to leave with.
fn wait(mut child: std::process::Child, vmm: &Path) -> Result<i32, RunError> {
    // Ctrl-C reaches husk-vmm through the terminal's process group; husk-vmm stops the VM and
    // exits 130. husk itself must outlive it to pass that code on. (Ignored only after the
    // spawn, so husk-vmm does not inherit the ignored disposition.)
    ignore_interactive_signals();
    let status = child.wait().map_err(|cause| RunError::Wait {
        vmm: vmm.into(),
        cause,
    })?;
    Ok(
        match (
            status.code(),
            std::os::unix::process::ExitStatusExt::signal(&status),
        ) {
            (Some(code), _) => code,
            (None, Some(sig)) => 128 + sig,
            (None, None) => EXIT_HUSK_ERROR,
        },
    )
}

fn ignore_interactive_signals() {
    for sig in [libc::SIGINT, libc::SIGQUIT] {
        // SAFETY: SIG_IGN installs no handler code, so nothing can run in signal context.
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use husk_host::vmm_args::{Invocation, TapSource};

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn run_args(argv: &[&str]) -> RunArgs {
        Cli::parse_from(std::iter::once("husk-run").chain(argv.iter().copied())).run
    }

    #[test]
    fn husk_runs_vmm_command_line_parses_back_to_what_it_built() {
        let args = run_args(&[
            "--cpus",
            "2",
            "--memory",
            "512",
            "--boot-time",
            "--",
            "true",
        ]);
        let tap = std::fs::File::open("/dev/null").unwrap();
        let link = VmLink {
            tap_fd: tap.into(),
            tap_name: "husk4".into(),
            host_ip: "169.254.128.17".parse().unwrap(),
            guest_ip: "169.254.128.18".parse().unwrap(),
            mac: [6, 0, 169, 254, 128, 18],
            prefix_len: husk_host::net::LINK_PREFIX_LEN,
            mtu: None,
            kind: husk_host::net::LinkKind::Tap,
        };
        let files = VmmFiles {
            kernel: "/k".into(),
            initrd: "/i".into(),
            disks: vec![DiskConfig::raw(fd_path(9), true)],
            vsock: Some("/run/user/v.sock".into()),
            cmdline_fd: 11,
            fs: vec![
                FsConfig {
                    tag: "husk-fs0".into(),
                    fd: 13,
                },
                FsConfig {
                    tag: "husk-fs1".into(),
                    fd: 14,
                },
            ],
        };
        let built = vmm_args(&args, files, Some(link.net_config()));
        assert_eq!(
            VmmArgs::parse(built.to_args()),
            Ok(Invocation::Run(Box::new(built.clone())))
        );
        assert_eq!((built.cpus, built.memory), (Some(2), Some(512)));
        assert!(built.report_boot_time && built.cmdline.is_none());
        assert_eq!(built.cmdline_file, Some("/proc/self/fd/11".into()));
        assert_eq!(
            built.net,
            Some(NetConfig {
                tap: TapSource::Fd(link.raw_fd(), "husk4".into()),
                mac: link.mac,
                mtu: None,
            })
        );
        assert_eq!(built.fs.len(), 2);
        let joined = built.to_args().join(std::ffi::OsStr::new(" "));
        assert!(
            joined
                .to_string_lossy()
                .contains("--fs tag=husk-fs0,fd=13 --fs tag=husk-fs1,fd=14"),
            "{joined:?}"
        );
        assert_eq!(built.vsock.map(|v| v.cid), Some(3));
    }

    #[test]
    fn a_missing_volume_is_refused_before_anything_starts() {
        let args = run_args(&["-v", "/nonexistent/nope:/data", "true"]);
        let e = start_volumes(&args.volumes).err().unwrap();
        assert_eq!(
            e.to_string(),
            "-v /nonexistent/nope:/data: /nonexistent/nope: no such directory"
        );
        assert!(start_volumes(&[]).unwrap().is_empty());
    }

    #[test]
    fn user_networking_hands_the_vmm_a_stream_with_the_rate_limits() {
        let args = run_args(&["--net=user", "--net-rx-limit", "bw=1M", "--", "true"]);
        let files = VmmFiles {
            kernel: "/k".into(),
            initrd: "/i".into(),
            disks: Vec::new(),
            vsock: None,
            cmdline_fd: 11,
            fs: Vec::new(),
        };
        let net = NetConfig {
            tap: TapSource::Stream(12),
            mac: passt::GUEST_MAC,
            mtu: None,
        };
        let built = vmm_args(&args, files, Some(net.clone()));
        assert_eq!(built.net, Some(net));
        assert_eq!(built.net_rx_limit, args.net_rx_limit);
        assert_eq!(
            VmmArgs::parse(built.to_args()),
            Ok(Invocation::Run(Box::new(built.clone())))
        );
        let joined = built.to_args().join(std::ffi::OsStr::new(" "));
        assert!(
            joined
                .to_string_lossy()
                .contains("--net stream=12,mac=06:00:0a:00:02:0f"),
            "{joined:?}"
        );
    }
}
