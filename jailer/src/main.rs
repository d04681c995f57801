//! husk-jailer: puts one husk-vmm in its own jail and execs it; `--cleanup` removes what a jail
//! leaves behind (its directory and cgroup), also after the VMM was killed with SIGKILL.
//!
//! The steps, in order (each error names its step): check arguments; close inherited fds (all
//! but 0-2 and `--keep-fd`); create `<base>/<id>/root`; create and enter the cgroup
//! `<cgroup2>/husk/<id>` with the `--cgroup` limits; unshare mount, IPC and UTS namespaces (and
//! PID with `--new-pid-ns`), join `--netns`; build the jail tree on a tmpfs and pivot_root into
//! it (see [`tree`]); make the root read-only; set rlimits; set no_new_privs; drop supplementary
//! groups, then gid, then uid; exec `/husk-vmm` with an environment of only the `--env` pairs.
//!
//! Exit status: the VMM's (it replaces the jailer, or with `--new-pid-ns` the jailer passes it
//! on); 125 when a jailer step failed.

mod args;
mod cgroup;
mod elf;
mod tree;

use std::ffi::{CString, OsString};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

use args::{Command, Jail, Rlimit};

/// Exit status when the jailer itself failed.
const EXIT_JAILER_ERROR: i32 = 125;

/// A failed step: what the jailer was doing, and why it failed.
#[derive(Debug, thiserror::Error)]
#[error("{step}: {detail}")]
struct StepError {
    step: &'static str,
    detail: String,
}

trait Step<T> {
    fn step(self, step: &'static str) -> Result<T, StepError>;
}

impl<T, E: std::fmt::Display> Step<T> for Result<T, E> {
    fn step(self, step: &'static str) -> Result<T, StepError> {
        self.map_err(|e| StepError {
            step,
            detail: e.to_string(),
        })
    }
}

fn errno(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn main() {
    let command = match args::parse(std::env::args_os().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("husk-jailer: error: arguments: {e}");
            std::process::exit(EXIT_JAILER_ERROR);
        }
    };
    let result = match command {
        Command::Help => {
            println!("{}", args::USAGE);
            Ok(())
        }
        Command::Cleanup { id, base } => cleanup(&id, &base),
        Command::Run(jail) => run(&jail),
    };
    if let Err(e) = result {
        eprintln!("husk-jailer: error: {e}");
        std::process::exit(EXIT_JAILER_ERROR);
    }
}

/// `<base>/<id>` and `<base>/<id>/root`.
fn jail_dirs(base: &Path, id: &str) -> (PathBuf, PathBuf) {
    let dir = base.join(id);
    let root = dir.join("root");
    (dir, root)
}

/// Removes the VM's cgroup (killing what is left in it) and its jail directory.
fn cleanup(id: &str, base: &Path) -> Result<(), StepError> {
    if let Some(mount) = cgroup::mount_point() {
        cgroup::remove(&mount, id).step("removing the cgroup")?;
    }
    let (dir, root) = jail_dirs(base, id);
    // Mounts live in the jail's own namespace; a jail root mounted on the host (an older or
    // foreign layout) is detached first. rmdir, never a recursive delete: a directory that is
    // not empty may still have a VM's state bind-mounted into it.
    if let Ok(path) = CString::new(root.as_os_str().as_bytes()) {
        // SAFETY: umount2 on a NUL-terminated path; failure (not mounted) is fine.
        unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
    }
    for d in [&root, &dir] {
        match std::fs::remove_dir(d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", d.display())).step("removing the jail"),
        }
    }
    Ok(())
}

/// Closes every fd above 2 except `keep`, and lets `keep` survive the exec.
fn close_inherited_fds(keep: &[RawFd]) -> Result<(), String> {
    let open: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
        .map_err(|e| format!("/proc/self/fd: {e}"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    for fd in open.into_iter().filter(|fd| *fd > 2) {
        if keep.contains(&fd) {
            // SAFETY: fcntl on an fd number; no memory involved.
            if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } != 0 {
                return Err(errno(&format!("--keep-fd {fd}")));
            }
        } else {
            // SAFETY: closes an inherited fd this process does not use (the directory
            // iterator's own fd is closed already; closing it again is a harmless EBADF).
            unsafe { libc::close(fd) };
        }
    }
    for fd in keep {
        // SAFETY: as above.
        if unsafe { libc::fcntl(*fd, libc::F_GETFD) } < 0 {
            return Err(format!("--keep-fd {fd} is not open"));
        }
    }
    Ok(())
}

fn set_rlimit(limit: Rlimit) -> Result<(), String> {
    let (resource, n, name) = match limit {
        Rlimit::NoFile(n) => (libc::RLIMIT_NOFILE, n, "nofile"),
        Rlimit::FileSize(n) => (libc::RLIMIT_FSIZE, n, "fsize"),
    };
    let value = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: setrlimit reads a valid rlimit struct.
    if unsafe { libc::setrlimit(resource, &value) } != 0 {
        return Err(errno(name));
    }
    Ok(())
}

fn drop_privileges(uid: u32, gid: u32) -> Result<(), String> {
    // SAFETY: plain syscalls with integer arguments (setgroups with an empty list).
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(errno("setgroups"));
        }
        if libc::setresgid(gid, gid, gid) != 0 {
            return Err(errno("setresgid"));
        }
        if libc::setresuid(uid, uid, uid) != 0 {
            return Err(errno("setresuid"));
        }
        // A process that could become root again would make the rest pointless.
        if libc::setuid(0) == 0 {
            return Err("still able to become root".into());
        }
    }
    Ok(())
}

/// The PID of the VMM when the jailer stays as its parent (`--new-pid-ns`).
static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

/// With a new PID namespace: forks the VMM (pid 1 there) and, in the parent, passes on stop
/// signals and exits with its status. Returns in the child only.
fn fork_into_pid_ns() -> Result<(), String> {
    // SAFETY: the jailer is single-threaded, so the child may run arbitrary code after fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(errno("fork"));
    }
    if pid == 0 {
        // Pid 1 ignores signals it has no handler for; husk-vmm installs SIGTERM/SIGINT
        // handlers, and SIGKILL from outside the namespace always works.
        return Ok(());
    }
    CHILD.store(pid, Ordering::SeqCst);
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: installs a handler that only calls kill(2).
        unsafe { libc::signal(sig, forward as *const () as libc::sighandler_t) };
    }
    let mut status = 0;
    loop {
        // SAFETY: waits for our own child; `status` is a valid int.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            std::process::exit(EXIT_JAILER_ERROR);
        }
    }
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    };
    std::process::exit(code)
}

fn c_string(s: impl AsRef<std::ffi::OsStr>) -> Result<CString, String> {
    CString::new(s.as_ref().as_bytes()).map_err(|_| String::from("argument contains NUL"))
}

/// The parent-death signal the caller asked for (`husk run` sets SIGKILL: a killed husk run
/// must not leave its VM running). The kernel clears it when credentials change, so the jailer
/// sets it again after dropping privileges, and exits if the parent is already gone.
struct ParentDeath {
    signal: libc::c_int,
    parent: libc::pid_t,
}

impl ParentDeath {
    fn record() -> Result<Self, String> {
        let mut signal: libc::c_int = 0;
        // SAFETY: PR_GET_PDEATHSIG writes one int through the pointer, which is live.
        if unsafe { libc::prctl(libc::PR_GET_PDEATHSIG, &mut signal as *mut libc::c_int) } != 0 {
            return Err(errno("prctl(PR_GET_PDEATHSIG)"));
        }
        // SAFETY: getppid has no arguments.
        let parent = unsafe { libc::getppid() };
        Ok(Self { signal, parent })
    }

    /// `forked`: this is the child in a new PID namespace, whose parent is the jailer itself.
    fn rearm(&self, forked: bool) -> Result<(), String> {
        if self.signal == 0 {
            return Ok(());
        }
        // SAFETY: prctl with integer arguments.
        if unsafe {
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                self.signal as libc::c_ulong,
                0,
                0,
                0,
            )
        } != 0
        {
            return Err(errno("prctl(PR_SET_PDEATHSIG)"));
        }
        // SAFETY: getppid has no arguments.
        if !forked && unsafe { libc::getppid() } != self.parent {
            return Err("the parent exited while the jail was being built".into());
        }
        Ok(())
    }
}

fn run(j: &Jail) -> Result<(), StepError> {
    // SAFETY: geteuid has no arguments; umask takes a mode.
    if unsafe { libc::geteuid() } != 0 {
        return Err("husk-jailer must run as root").step("checking privileges");
    }
    // SAFETY: as above.
    unsafe { libc::umask(0o022) };
    let death_signal = ParentDeath::record().step("reading the parent-death signal")?;
    close_inherited_fds(&j.keep_fds).step("closing inherited fds")?;
    if !j.exec_file.is_file() {
        return Err(format!("{} is not a file", j.exec_file.display()))
            .step("checking --exec-file");
    }
    let libs = elf::runtime_files(&j.exec_file).step("finding the VMM's libraries")?;
    let netns = j
        .netns
        .as_ref()
        .map(|p| std::fs::File::open(p).map_err(|e| format!("{}: {e}", p.display())))
        .transpose()
        .step("opening --netns")?;
    let argv: Vec<CString> = std::iter::once(OsString::from("husk-vmm"))
        .chain(j.vmm_args.iter().cloned())
        .map(c_string)
        .collect::<Result<_, _>>()
        .step("checking VMM arguments")?;
    let envp: Vec<CString> = j
        .env
        .iter()
        .map(|(k, v)| c_string(format!("{k}={v}")))
        .collect::<Result<_, _>>()
        .step("checking --env")?;

    let (dir, root) = jail_dirs(&j.base, &j.id);
    std::fs::create_dir_all(&j.base)
        .map_err(|e| format!("{}: {e}", j.base.display()))
        .step("creating the jail directory")?;
    match std::fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(format!(
                "{} exists: a VM with this id runs, or run husk-jailer --cleanup --id {}",
                dir.display(),
                j.id
            ))
            .step("creating the jail directory")
        }
        Err(e) => {
            return Err(format!("{}: {e}", dir.display())).step("creating the jail directory")
        }
    }
    let origin = cgroup::current();
    let result = std::fs::create_dir(&root)
        .map_err(|e| format!("{}: {e}", root.display()))
        .step("creating the jail directory")
        .and_then(|()| enter_cgroup(j))
        .and_then(|()| jail_and_exec(j, &root, &libs, netns.as_ref(), &argv, &envp, &death_signal));
    // Only reached on failure: undo what this run created, after leaving the VM's cgroup (its
    // removal kills what is in it). After a pivot_root the host's paths are gone: the
    // launcher's `--cleanup` removes the rest then.
    if let (Some(mount), Some(origin)) = (cgroup::mount_point(), origin) {
        let _ = cgroup::move_to(&mount, &origin);
    }
    let _ = cleanup(&j.id, &j.base);
    result
}

fn enter_cgroup(j: &Jail) -> Result<(), StepError> {
    match cgroup::mount_point() {
        Some(mount) => cgroup::enter(&mount, &j.id, &j.cgroup)
            .map(drop)
            .step("setting up the cgroup"),
        None if j.cgroup.is_empty() => Ok(()),
        None => Err("no cgroup2 filesystem is mounted").step("setting up the cgroup"),
    }
}

fn jail_and_exec(
    j: &Jail,
    root: &Path,
    libs: &[PathBuf],
    netns: Option<&std::fs::File>,
    argv: &[CString],
    envp: &[CString],
    death_signal: &ParentDeath,
) -> Result<(), StepError> {
    let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    if j.new_pid_ns {
        flags |= libc::CLONE_NEWPID;
    }
    // SAFETY: unshare/setns with flags and an open namespace fd.
    unsafe {
        if libc::unshare(flags) != 0 {
            return Err(errno("unshare")).step("creating namespaces");
        }
        if let Some(ns) = netns {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(errno("setns")).step("joining --netns");
            }
        }
    }
    // Nothing mounted from here on propagates to the host.
    tree::mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )
    .step("making mounts private")?;
    tree::mount(
        Some(Path::new("tmpfs")),
        root,
        Some("tmpfs"),
        libc::MS_NOSUID,
        Some("size=1m,nr_inodes=512,mode=0755"),
    )
    .step("mounting the jail root")?;
    for lib in libs {
        tree::bind(root, lib, lib, false).step("binding the VMM's libraries")?;
    }
    tree::bind(root, &j.exec_file, Path::new(tree::VMM_IN_JAIL), false)
        .step("binding the VMM binary")?;
    for file in &j.files {
        tree::bind(root, file, file, false).step("binding --file")?;
    }
    for dir in &j.dirs {
        tree::bind(root, dir, dir, true).step("binding --dir")?;
    }
    for dev in tree::DEVICES {
        tree::device_node(root, Path::new(dev), j.uid, j.gid).step("creating device nodes")?;
    }
    tree::pivot_into(root).step("pivot_root")?;
    tree::mount(
        None,
        Path::new("/"),
        None,
        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID,
        None,
    )
    .step("making the jail root read-only")?;
    let hostname = format!("husk-{}", j.id);
    // SAFETY: sethostname reads `len` bytes from a live string (in the jail's UTS namespace).
    if unsafe { libc::sethostname(hostname.as_ptr().cast(), hostname.len()) } != 0 {
        return Err(errno("sethostname")).step("setting the hostname");
    }
    for limit in &j.rlimits {
        set_rlimit(*limit).step("setting rlimits")?;
    }
    if j.new_pid_ns {
        fork_into_pid_ns().step("starting the PID namespace")?;
    }
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(errno("prctl")).step("setting no_new_privs");
    }
    drop_privileges(j.uid, j.gid).step("dropping privileges")?;
    death_signal
        .rearm(j.new_pid_ns)
        .step("re-arming the parent-death signal")?;
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut envp_ptrs: Vec<*const libc::c_char> = envp.iter().map(|e| e.as_ptr()).collect();
    envp_ptrs.push(std::ptr::null());
    let path = c_string(tree::VMM_IN_JAIL).step("exec")?;
    // SAFETY: NULL-terminated arrays of pointers to NUL-terminated strings, all alive here.
    unsafe { libc::execve(path.as_ptr(), argv_ptrs.as_ptr(), envp_ptrs.as_ptr()) };
    Err(errno(tree::VMM_IN_JAIL)).step("exec")
}
