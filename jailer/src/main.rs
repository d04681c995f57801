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
use std::io;
use std::os::fd::{AsFd, BorrowedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

use nix::sched::CloneFlags;
use nix::sys::signal::{SigHandler, Signal as NixSignal};
use nix::unistd::ForkResult;
use rustix::io::FdFlags;
use rustix::mount::MountFlags;
use rustix::process::{Gid, Pid, Resource, Signal, Uid, WaitOptions};

use args::{Command, Jail, Rlimit};

/// Exit status when the jailer itself failed.
const EXIT_JAILER_ERROR: i32 = 125;

/// Why a step failed.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Tree(#[from] tree::TreeError),
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    #[error(transparent)]
    Elf(#[from] elf::ElfError),
    /// A system call or file operation, named by `what`.
    #[error("{what}")]
    Sys {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("husk-jailer must run as root")]
    NotRoot,
    #[error("--keep-fd {0} is not open")]
    FdNotOpen(RawFd),
    #[error("{} is not a file", .0.display())]
    NotAFile(PathBuf),
    #[error("{} exists: a VM with this id runs, or run husk-jailer --cleanup --id {id}", dir.display())]
    JailExists { dir: PathBuf, id: String },
    #[error("no cgroup2 filesystem is mounted")]
    NoCgroup2,
    #[error("argument contains NUL")]
    Nul,
    #[error("still able to become root")]
    StillRoot,
    #[error("the parent exited while the jail was being built")]
    ParentGone,
}

/// `what` failed with `source` (an errno or an I/O error).
fn sys(what: impl Into<String>, source: impl Into<io::Error>) -> Failure {
    Failure::Sys {
        what: what.into(),
        source: source.into(),
    }
}

/// A failed step: what the jailer was doing, and why it failed.
#[derive(Debug, thiserror::Error)]
#[error("{step}")]
struct StepError {
    step: &'static str,
    #[source]
    failure: Failure,
}

trait Step<T> {
    fn step(self, step: &'static str) -> Result<T, StepError>;
}

impl<T, E: Into<Failure>> Step<T> for Result<T, E> {
    fn step(self, step: &'static str) -> Result<T, StepError> {
        self.map_err(|e| StepError {
            step,
            failure: e.into(),
        })
    }
}

/// `e` and its sources, "outer: inner: ...".
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

fn main() {
    let command = match args::parse(std::env::args_os().skip(1)) {
        Ok(c) => c,
        Err(args::ArgsError::Syntax(e)) if args::ArgsError::is_help_kind(e.kind()) => {
            print!("{}", e.render());
            return;
        }
        Err(e) => {
            eprintln!("husk-jailer: error: arguments: {e}");
            std::process::exit(EXIT_JAILER_ERROR);
        }
    };
    let result = match command {
        Command::Cleanup { id, base } => cleanup(&id, &base),
        Command::Run(jail) => run(&jail),
    };
    if let Err(e) = result {
        eprintln!("husk-jailer: error: {}", chain(&e));
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
    // foreign layout) is detached first (failure: it is not mounted, which is fine). rmdir,
    // never a recursive delete: a directory that is not empty may still have a VM's state
    // bind-mounted into it.
    let _ = rustix::mount::unmount(&root, rustix::mount::UnmountFlags::DETACH);
    for d in [&root, &dir] {
        match std::fs::remove_dir(d) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(sys(d.display().to_string(), e)).step("removing the jail"),
        }
    }
    Ok(())
}

/// Closes every fd above 2 except `keep`, and lets `keep` survive the exec.
fn close_inherited_fds(keep: &[RawFd]) -> Result<(), Failure> {
    let open: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
        .map_err(|e| sys("/proc/self/fd", e))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    for fd in open.into_iter().filter(|fd| *fd > 2) {
        // SAFETY: the fd number was listed as open just now and this single-threaded process
        // does not close it elsewhere; the borrow ends before the fd is closed below.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        if keep.contains(&fd) {
            rustix::io::fcntl_setfd(borrowed, FdFlags::empty())
                .map_err(|e| sys(format!("--keep-fd {fd}"), e))?;
        } else if rustix::io::fcntl_getfd(borrowed).is_ok() {
            // Still open (the directory iterator's own fd, also listed, is closed already).
            // SAFETY: an inherited fd that nothing in this process uses or closes again.
            unsafe { rustix::io::close(fd) };
        }
    }
    for &fd in keep {
        // SAFETY: as above; F_GETFD on a closed fd number fails with EBADF, nothing else.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        if rustix::io::fcntl_getfd(borrowed).is_err() {
            return Err(Failure::FdNotOpen(fd));
        }
    }
    Ok(())
}

fn set_rlimit(limit: Rlimit) -> Result<(), Failure> {
    let (resource, n, name) = match limit {
        Rlimit::NoFile(n) => (Resource::Nofile, n, "nofile"),
        Rlimit::FileSize(n) => (Resource::Fsize, n, "fsize"),
    };
    let value = rustix::process::Rlimit {
        current: Some(n),
        maximum: Some(n),
    };
    rustix::process::setrlimit(resource, value).map_err(|e| sys(name, e))
}

/// Drops supplementary groups, then the gid, the uid last. The jailer has one thread, so the
/// per-thread credential calls change the whole process.
fn drop_privileges(uid: u32, gid: u32) -> Result<(), Failure> {
    let (uid, gid) = (Uid::from_raw(uid), Gid::from_raw(gid));
    rustix::thread::set_thread_groups(&[]).map_err(|e| sys("setgroups", e))?;
    rustix::thread::set_thread_res_gid(gid, gid, gid).map_err(|e| sys("setresgid", e))?;
    rustix::thread::set_thread_res_uid(uid, uid, uid).map_err(|e| sys("setresuid", e))?;
    // A process that could become root again would make the rest pointless.
    if rustix::thread::set_thread_uid(Uid::ROOT).is_ok() {
        return Err(Failure::StillRoot);
    }
    Ok(())
}

/// The PID of the VMM when the jailer stays as its parent (`--new-pid-ns`).
static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: i32) {
    let pid = Pid::from_raw(CHILD.load(Ordering::SeqCst));
    if let (Some(pid), Some(sig)) = (pid, Signal::from_named_raw(sig)) {
        // kill(2) is async-signal-safe.
        let _ = rustix::process::kill_process(pid, sig);
    }
}

/// With a new PID namespace: forks the VMM (pid 1 there) and, in the parent, passes on stop
/// signals and exits with its status. Returns in the child only.
fn fork_into_pid_ns() -> Result<(), Failure> {
    // SAFETY: the jailer is single-threaded, so the child may run arbitrary code after fork.
    let child = match unsafe { nix::unistd::fork() } {
        Err(e) => return Err(sys("fork", e)),
        // Pid 1 ignores signals it has no handler for; husk-vmm installs SIGTERM/SIGINT
        // handlers, and SIGKILL from outside the namespace always works.
        Ok(ForkResult::Child) => return Ok(()),
        Ok(ForkResult::Parent { child }) => child.as_raw(),
    };
    CHILD.store(child, Ordering::SeqCst);
    for sig in [NixSignal::SIGTERM, NixSignal::SIGINT, NixSignal::SIGHUP] {
        // SAFETY: installs a handler that only makes the async-signal-safe kill(2) call.
        let _ = unsafe { nix::sys::signal::signal(sig, SigHandler::Handler(forward)) };
    }
    let pid = Pid::from_raw(child);
    let status = loop {
        match rustix::process::waitpid(pid, WaitOptions::empty()) {
            Ok(Some((_, status))) => break status,
            Err(rustix::io::Errno::INTR) => {}
            _ => std::process::exit(EXIT_JAILER_ERROR),
        }
    };
    let code = match (status.exit_status(), status.terminating_signal()) {
        (Some(code), _) => code,
        (None, Some(sig)) => 128 + sig,
        (None, None) => EXIT_JAILER_ERROR,
    };
    std::process::exit(code)
}

fn c_string(s: impl AsRef<std::ffi::OsStr>) -> Result<CString, Failure> {
    CString::new(s.as_ref().as_bytes()).map_err(|_| Failure::Nul)
}

/// The parent-death signal the caller asked for (`husk run` sets SIGKILL: a killed husk run
/// must not leave its VM running). The kernel clears it when credentials change, so the jailer
/// sets it again after dropping privileges, and exits if the parent is already gone.
struct ParentDeath {
    signal: Option<Signal>,
    parent: Option<Pid>,
}

impl ParentDeath {
    fn record() -> Result<Self, Failure> {
        let signal = rustix::process::parent_process_death_signal()
            .map_err(|e| sys("prctl(PR_GET_PDEATHSIG)", e))?;
        Ok(Self {
            signal,
            parent: rustix::process::getppid(),
        })
    }

    /// `forked`: this is the child in a new PID namespace, whose parent is the jailer itself.
    fn rearm(&self, forked: bool) -> Result<(), Failure> {
        if self.signal.is_none() {
            return Ok(());
        }
        rustix::process::set_parent_process_death_signal(self.signal)
            .map_err(|e| sys("prctl(PR_SET_PDEATHSIG)", e))?;
        if !forked && rustix::process::getppid() != self.parent {
            return Err(Failure::ParentGone);
        }
        Ok(())
    }
}

fn run(j: &Jail) -> Result<(), StepError> {
    if !rustix::process::geteuid().is_root() {
        return Err(Failure::NotRoot).step("checking privileges");
    }
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o022));
    let death_signal = ParentDeath::record().step("reading the parent-death signal")?;
    close_inherited_fds(&j.keep_fds).step("closing inherited fds")?;
    if !j.exec_file.is_file() {
        return Err(Failure::NotAFile(j.exec_file.clone())).step("checking --exec-file");
    }
    let libs = elf::runtime_files(&j.exec_file).step("finding the VMM's libraries")?;
    let netns = j
        .netns
        .as_ref()
        .map(|p| std::fs::File::open(p).map_err(|e| sys(p.display().to_string(), e)))
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
        .map_err(|e| sys(j.base.display().to_string(), e))
        .step("creating the jail directory")?;
    match std::fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(Failure::JailExists {
                dir: dir.clone(),
                id: j.id.clone(),
            })
            .step("creating the jail directory")
        }
        Err(e) => {
            return Err(sys(dir.display().to_string(), e)).step("creating the jail directory")
        }
    }
    let origin = cgroup::current();
    let result = std::fs::create_dir(&root)
        .map_err(|e| sys(root.display().to_string(), e))
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
        None => Err(Failure::NoCgroup2).step("setting up the cgroup"),
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
    let mut flags = CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS;
    if j.new_pid_ns {
        flags |= CloneFlags::CLONE_NEWPID;
    }
    nix::sched::unshare(flags)
        .map_err(|e| sys("unshare", e))
        .step("creating namespaces")?;
    if let Some(ns) = netns {
        rustix::thread::move_into_link_name_space(
            ns.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .map_err(|e| sys("setns", e))
        .step("joining --netns")?;
    }
    // Nothing mounted from here on propagates to the host.
    tree::make_mounts_private().step("making mounts private")?;
    tree::mount_tmpfs(root, c"size=1m,nr_inodes=512,mode=0755").step("mounting the jail root")?;
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
    tree::remount_bind(Path::new("/"), MountFlags::RDONLY | MountFlags::NOSUID)
        .step("making the jail root read-only")?;
    let hostname = format!("husk-{}", j.id);
    // In the jail's own UTS namespace.
    rustix::system::sethostname(hostname.as_bytes())
        .map_err(|e| sys("sethostname", e))
        .step("setting the hostname")?;
    for limit in &j.rlimits {
        set_rlimit(*limit).step("setting rlimits")?;
    }
    if j.new_pid_ns {
        fork_into_pid_ns().step("starting the PID namespace")?;
    }
    rustix::thread::set_no_new_privs(true)
        .map_err(|e| sys("prctl", e))
        .step("setting no_new_privs")?;
    drop_privileges(j.uid, j.gid).step("dropping privileges")?;
    death_signal
        .rearm(j.new_pid_ns)
        .step("re-arming the parent-death signal")?;
    let path = c_string(tree::VMM_IN_JAIL).step("exec")?;
    // execve returns only on failure.
    let Err(e) = nix::unistd::execve(&path, argv, envp);
    Err(sys(tree::VMM_IN_JAIL, e)).step("exec")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_step_reads_step_then_call_then_reason() {
        let e = Err::<(), _>(sys("unshare", io::Error::from_raw_os_error(1)))
            .step("creating namespaces")
            .unwrap_err();
        assert_eq!(
            chain(&e),
            "creating namespaces: unshare: Operation not permitted (os error 1)"
        );
        let e = Err::<(), _>(Failure::FdNotOpen(987))
            .step("closing inherited fds")
            .unwrap_err();
        assert_eq!(
            chain(&e),
            "closing inherited fds: --keep-fd 987 is not open"
        );
    }
}
