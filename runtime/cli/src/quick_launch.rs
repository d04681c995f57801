//! `husk run`: boot a micro-VM with husk-vmm directly (no daemon), run one command in it, and
//! exit with that command's exit code.

use std::path::{Path, PathBuf};
use std::process::Command;

use husk_init::spec::{BootSpec, PARAM};

use crate::run_args::RunArgs;
use husk_host::jail::{self, JailConfig, JailSpec};
use husk_host::net::VmLink;
use husk_host::paths::{husk_home, require_file, vmm_binary};

const BUILD_KERNEL_HINT: &str = "build the default one with scripts/build-kernel, or pass --kernel";
const BUILD_INITRD_HINT: &str =
    "build the default one with scripts/build-image default, or pass --initrd";

/// Exit code when husk itself (not the guest application) failed, as docker does.
pub const EXIT_HUSK_ERROR: i32 = 125;

/// Runs the VM and returns the exit code to leave with.
pub fn run(args: &RunArgs) -> Result<i32, String> {
    let home = husk_home()?;
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
    spec.encode().map_err(|e| e.to_string())?;
    require_file(&kernel, "kernel", BUILD_KERNEL_HINT)?;
    require_file(&initrd, "initrd", BUILD_INITRD_HINT)?;
    let mut disks = disk_args(args)?;
    let vmm = vmm_binary()?;
    let jail_config = jail::config(args.no_jail)?;
    // A jailed VMM sees host paths only where the jail mirrors them, and "/" is its cwd.
    let absolute = |p: &Path| {
        std::path::absolute(p)
            .map(|p| jail::normalize(&p))
            .map_err(|e| format!("{}: {e}", p.display()))
    };
    let (kernel, initrd) = (absolute(&kernel)?, absolute(&initrd)?);
    let vsock = args.vsock.as_deref().map(absolute).transpose()?;
    // Jailed, disks are opened here (with husk's rights) and handed over as fds.
    let mut disk_files = Vec::new();
    if jail_config.is_some() {
        for disk in disks.iter_mut() {
            let (file, arg) = jail::open_disk(disk)?;
            disk_files.push(file);
            *disk = arg;
        }
    }
    if jail_config.is_none() && !args.cgroup.is_empty() {
        return Err("--cgroup needs the jail: run husk as root, without --no-jail".into());
    }
    let vsock_dir = match (&jail_config, &vsock) {
        (Some(j), Some(path)) => Some(vsock_dir_for(j, path)?),
        _ => None,
    };

    let link = if args.net {
        Some(VmLink::create()?)
    } else {
        None
    };
    let mut cmdline = vec![String::from("quiet")];
    if args.rootfs.is_some() {
        cmdline.push("husk.root=/dev/vda".into());
    }
    if let Some(link) = &link {
        cmdline.push(link.kernel_param());
        spec.env
            .push(format!("HUSK_HOST_IP={}", link.host_ip).into_bytes());
        spec.env
            .push(format!("HUSK_GUEST_IP={}", link.guest_ip).into_bytes());
    }
    cmdline.extend(args.cmdline.clone());
    cmdline.push(format!(
        "{PARAM}{}",
        spec.encode().map_err(|e| e.to_string())?
    ));

    let mut cmd = Command::new(&vmm);
    cmd.arg("--kernel")
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd);
    cmd.arg("--cpus").arg(args.cpus.to_string());
    cmd.arg("--memory").arg(args.memory_mib.to_string());
    for disk in &disks {
        cmd.arg("--disk").arg(disk);
    }
    if let Some(link) = &link {
        cmd.arg("--net").arg(link.vmm_arg());
        husk_host::process::inherit_fd(&mut cmd, link.raw_fd());
    }
    if let Some(path) = &vsock {
        cmd.arg("--vsock")
            .arg(format!("cid=3,path={}", path.display()));
    }
    // The application's argv and environment travel in the guest command line: through a
    // pipe, so that they never show on husk-vmm's own command line.
    let cmdline_fd = husk_host::process::cmdline_pipe(&cmdline.join(" "))
        .map_err(|e| format!("cannot pass the guest command line: {e}"))?;
    {
        use std::os::fd::AsRawFd;
        cmd.arg("--cmdline-file")
            .arg(format!("/proc/self/fd/{}", cmdline_fd.as_raw_fd()));
        husk_host::process::inherit_fd(&mut cmd, cmdline_fd.as_raw_fd());
    }
    if args.report_boot_time {
        cmd.arg("--report-boot-time");
    }
    let jail_id = jail::run_jail_id(std::process::id());
    if let Some(j) = &jail_config {
        jail::sweep_dead_runs(&j.jailer);
    }
    if let Some(j) = &jail_config {
        use std::os::fd::AsRawFd;
        let spec = JailSpec {
            id: &jail_id,
            uid: j.uid,
            gid: j.gid,
            files: vec![kernel.clone(), initrd.clone()],
            dirs: vsock_dir.into_iter().collect(),
            fds: link
                .iter()
                .map(|l| l.raw_fd())
                .chain(disk_files.iter().map(|f| f.as_raw_fd()))
                .chain([cmdline_fd.as_raw_fd()])
                .collect(),
            cgroup: args.cgroup.clone(),
            rlimits: Vec::new(),
        };
        cmd = jail::wrap(&j.jailer, &cmd, &spec);
    }
    // A killed husk run takes its VM with it (husk-jailer re-arms this after its uid drop).
    // SAFETY: runs in the child between fork and exec; prctl is async-signal-safe.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let spawned = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", vmm.display()));
    // husk-vmm holds the tap and disks now; with husk's copies closed, they go with the VMM.
    drop(link);
    drop(disk_files);
    drop(cmdline_fd);
    let result = spawned.and_then(|child| wait(child, &vmm));
    if let Some(j) = &jail_config {
        if let Err(e) = jail::cleanup(&j.jailer, &jail_id) {
            eprintln!("husk: warning: cleaning up jail {jail_id}: {e}");
        }
    }
    result
}

/// The directory of the vsock socket, which the jailed VMM must be able to create it in.
fn vsock_dir_for(jail: &JailConfig, socket: &Path) -> Result<PathBuf, String> {
    use std::os::unix::fs::MetadataExt;
    let dir = socket.parent().unwrap_or(Path::new("/")).to_path_buf();
    let meta = std::fs::metadata(&dir).map_err(|e| format!("--vsock {}: {e}", dir.display()))?;
    let need = if meta.uid() == jail.uid {
        0o300
    } else if meta.gid() == jail.gid {
        0o030
    } else {
        0o003
    };
    if meta.mode() & need != need {
        return Err(format!(
            "--vsock {}: the jailed VMM (uid {}) cannot create its socket in {}; make the \
             directory writable for it (e.g. chmod 1777), set HUSK_JAIL_UID/HUSK_JAIL_GID, \
             or pass --no-jail",
            socket.display(),
            jail.uid,
            dir.display()
        ));
    }
    Ok(dir)
}

/// Waits for the VMM (or the jailer that became it) and returns the exit code to leave with.
fn wait(mut child: std::process::Child, vmm: &Path) -> Result<i32, String> {
    // Ctrl-C reaches husk-vmm through the terminal's process group; husk-vmm stops the VM and
    // exits 130. husk itself must outlive it to pass that code on. (Ignored only after the
    // spawn, so husk-vmm does not inherit the ignored disposition.)
    ignore_interactive_signals();
    let status = child
        .wait()
        .map_err(|e| format!("waiting for {}: {e}", vmm.display()))?;
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

/// husk-vmm `--disk` values: the root disk first (it is vda), then the others in order.
fn disk_args(args: &RunArgs) -> Result<Vec<String>, String> {
    let mut disks = Vec::new();
    if let Some(rootfs) = &args.rootfs {
        require_file(
            rootfs,
            "rootfs",
            "build one with scripts/build-image default, or pass --rootfs",
        )?;
        disks.push(rootfs.display().to_string());
    }
    for disk in &args.disks {
        require_file(
            Path::new(disk.strip_suffix(":ro").unwrap_or(disk)),
            "disk",
            "make one with mkfs.ext4, or check --disk",
        )?;
        disks.push(disk.clone());
    }
    Ok(disks)
}

fn ignore_interactive_signals() {
    for sig in [libc::SIGINT, libc::SIGQUIT] {
        // SAFETY: SIG_IGN installs no handler code, so nothing can run in signal context.
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
}
