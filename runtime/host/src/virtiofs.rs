//! Shared host directories (volumes, `husk run -v HOST:GUEST[:ro]`): one virtiofsd per shared
//! directory, the vhost-user-fs backend of one husk-vmm virtio-fs device (`--fs tag=TAG,fd=N`).
//!
//! The backend is Debian's C virtiofsd ([`VIRTIOFSD`], package `qemu-system-common`; another
//! binary through `$HUSK_VIRTIOFSD`). husk binds a listening Unix socket in a private directory,
//! connects the VMM's end to it before virtiofsd even runs (the connection waits in the
//! backlog), and hands the listener to virtiofsd (`--fd`), which accepts that one connection and
//! serves it. virtiofsd sandboxes itself (`-o sandbox=namespace`: new mount, pid and net
//! namespaces, `pivot_root` into the shared directory, a seccomp filter), which needs root.
//!
//! Read-only shares: virtiofsd has no read-only mode, so husk enforces it on the host. virtiofsd
//! starts in its own mount namespace where the shared directory is a read-only bind mount of
//! itself ([`ReadOnlyView`]); its sandbox then pivots into that mount, and every write the guest
//! asks for fails with EROFS, whatever the guest does with its own mount flags.
//!
//! Lifetime: virtiofsd runs in the foreground as the launcher's child, in its own process group,
//! with a parent-death signal (SIGKILL; note that Linux sends it when the *thread* that spawned
//! it exits, so spawn from a long-lived thread). It exits by itself when the VMM's end of the
//! connection closes. [`Virtiofsd::stop`] (and `Drop`) kills its process group (virtiofsd forks
//! its sandboxed server), reaps it and removes the private directory.

use std::ffi::{CString, OsString};
use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::io::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use husk_init::shares::{valid_guest_path, ShareError, SharedMount};

use crate::vmm_args::{valid_fs_tag, FsConfig};

/// Where Debian installs virtiofsd (package `qemu-system-common`).
pub const VIRTIOFSD: &str = "/usr/lib/qemu/virtiofsd";
/// Environment variable naming another virtiofsd binary.
pub const VIRTIOFSD_ENV: &str = "HUSK_VIRTIOFSD";
/// How long virtiofsd may take to sandbox itself before the launcher gives up.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Prefix of the private directories under /tmp.
const DIR_PREFIX: &str = "husk-virtiofsd-";

/// The virtiofsd binary: `$HUSK_VIRTIOFSD` when set (and not empty), else [`VIRTIOFSD`].
pub fn virtiofsd_binary() -> PathBuf {
    match std::env::var_os(VIRTIOFSD_ENV) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(VIRTIOFSD),
    }
}

/// The virtio-fs tag of the `index`th shared directory of a VM: `husk-fs{index}`.
pub fn tag_for(index: usize) -> String {
    format!("husk-fs{index}")
}

/// A shared directory as given on the command line: `HOST:GUEST[:ro|:rw]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedDir {
    /// The host directory (as given; [`SharedDir::resolved`] makes it canonical).
    pub host: PathBuf,
    /// Where the guest mounts it (absolute; see `husk_init::shares::valid_guest_path`).
    pub guest: String,
    /// The guest may not write (enforced on the host too).
    pub read_only: bool,
}

/// Why a `-v` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SharedDirError {
    #[error("{0:?}: expected HOST:GUEST, HOST:GUEST:ro or HOST:GUEST:rw")]
    Form(String),
    #[error(
        "guest path {0:?}: must be absolute, at most 256 bytes, without whitespace, ':' or \
         '.'/'..' parts, and not /"
    )]
    GuestPath(String),
}

impl FromStr for SharedDir {
    type Err = SharedDirError;

    /// `HOST:GUEST`, `HOST:GUEST:ro` or `HOST:GUEST:rw`. GUEST has no `:`, so HOST may.
    fn from_str(value: &str) -> Result<Self, SharedDirError> {
        let (rest, read_only) = if let Some(rest) = value.strip_suffix(":ro") {
            (rest, true)
        } else if let Some(rest) = value.strip_suffix(":rw") {
            (rest, false)
        } else {
            (value, false)
        };
        let Some((host, guest)) = rest.rsplit_once(':') else {
            return Err(SharedDirError::Form(value.into()));
        };
        if host.is_empty() || guest.is_empty() {
            return Err(SharedDirError::Form(value.into()));
        }
        if !valid_guest_path(guest) {
            return Err(SharedDirError::GuestPath(guest.into()));
        }
        Ok(Self {
            host: PathBuf::from(host),
            guest: guest.into(),
            read_only,
        })
    }
}

impl fmt::Display for SharedDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ro = if self.read_only { ":ro" } else { "" };
        write!(f, "{}:{}{ro}", self.host.display(), self.guest)
    }
}

impl SharedDir {
    /// The same share with its host directory canonical (relative to the current directory,
    /// symbolic links resolved), checked to exist and to be a directory.
    pub fn resolved(&self) -> Result<SharedDir, VirtiofsError> {
        let host = canonical_dir(&self.host)?;
        Ok(SharedDir {
            host,
            guest: self.guest.clone(),
            read_only: self.read_only,
        })
    }

    /// How the guest mounts it when its device is tagged `tag`.
    pub fn mount(&self, tag: &str) -> Result<SharedMount, ShareError> {
        SharedMount::new(tag, &self.guest, self.read_only)
    }

    /// The guest kernel's `husk.fs=TAG:GUEST[:ro]` parameter for this share tagged `tag`.
    pub fn kernel_param(&self, tag: &str) -> Result<String, ShareError> {
        self.mount(tag).map(|m| m.to_param())
    }
}

/// The `husk.fs=` kernel parameters of `shares`, each with its tag, in order.
pub fn kernel_params(shares: &[(SharedDir, String)]) -> Result<Vec<String>, ShareError> {
    shares
        .iter()
        .map(|(share, tag)| share.kernel_param(tag))
        .collect()
}

/// Why a shared directory's backend could not be started.
#[derive(Debug, thiserror::Error)]
pub enum VirtiofsError {
    #[error("{}: no such directory", .0.display())]
    NoSuchDir(PathBuf),
    #[error("{}: not a directory", .0.display())]
    NotADir(PathBuf),
    #[error("{}: {cause}", .path.display())]
    Host { path: PathBuf, cause: io::Error },
    #[error(
        "shared directories need virtiofsd: {} is missing (install the Debian package \
         qemu-system-common, or set {VIRTIOFSD_ENV})",
        .0.display()
    )]
    Missing(PathBuf),
    #[error(
        "shared directories need root: virtiofsd's sandbox (mount, pid and net namespaces) \
         needs CAP_SYS_ADMIN"
    )]
    NotRoot,
    #[error("virtio-fs tag {0:?}: use 1 to 36 of A-Z a-z 0-9 - _")]
    Tag(String),
    #[error("virtiofsd: {0}: {1}")]
    Io(&'static str, io::Error),
    #[error("virtiofsd for {}: {reason}", .host.display())]
    Failed { host: PathBuf, reason: String },
    #[error("virtiofsd for {} was not ready within {timeout:?}", .host.display())]
    NotReady { host: PathBuf, timeout: Duration },
}

/// `path` made canonical, if it is a directory.
fn canonical_dir(path: &Path) -> Result<PathBuf, VirtiofsError> {
    let canonical = std::fs::canonicalize(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => VirtiofsError::NoSuchDir(path.into()),
        io::ErrorKind::NotADirectory => VirtiofsError::NotADir(path.into()),
        _ => VirtiofsError::Host {
            path: path.into(),
            cause: e,
        },
    })?;
    let meta = std::fs::metadata(&canonical).map_err(|cause| VirtiofsError::Host {
        path: path.into(),
        cause,
    })?;
    if !meta.is_dir() {
        return Err(VirtiofsError::NotADir(path.into()));
    }
    Ok(canonical)
}

/// virtiofsd's `-o source=` value: libfuse splits `-o` values on commas, so `,` and `\` are
/// escaped with a backslash.
fn source_option(dir: &Path) -> OsString {
    let mut v = b"source=".to_vec();
    for &b in dir.as_os_str().as_bytes() {
        if b == b',' || b == b'\\' {
            v.push(b'\\');
        }
        v.push(b);
    }
    OsString::from_vec(v)
}

/// virtiofsd's command line (without the program): the listening socket `fd`, the canonical
/// shared directory `source`.
pub fn virtiofsd_args(fd: RawFd, source: &Path) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec![format!("--fd={fd}").into(), "-o".into()];
    a.push(source_option(source));
    for s in [
        "-o",
        "cache=auto",
        "-o",
        "sandbox=namespace",
        "-o",
        "log_level=warn",
        // In the foreground (its default too): it must stay husk's child.
        "-f",
    ] {
        a.push(s.into());
    }
    a
}

/// A read-only view of a directory, set up in a child between fork and exec: a private mount
/// namespace where the directory is a read-only (recursive) bind mount of itself.
///
/// Everything is prepared before the fork; [`ReadOnlyView::enter`] only makes system calls.
pub struct ReadOnlyView {
    /// What is bound (the directory itself, or `/proc/self/fd/N` of an opened directory).
    from: CString,
    /// Where (the directory itself, or a mount point in the private directory).
    path: CString,
    /// Whether the bind mount is made read-only (an fd view is bound read-write too).
    read_only: bool,
    /// For a view of an opened directory: a detached copy of its mount tree (open_tree clone,
    /// made read-only already where asked), attached at `path` in the child's namespace. A
    /// plain bind of `/proc/self/fd/N` would fail there (EINVAL: the source mount belongs to
    /// the namespace the child just left).
    tree: Option<OwnedFd>,
    /// The mount flags to keep when the read-only remount fallback (no `mount_setattr`) resets
    /// them.
    keep: rustix::mount::MountFlags,
}

impl ReadOnlyView {
    /// A view of `dir` (absolute and canonical: it is used as is in the child).
    pub fn new(dir: &Path) -> io::Result<Self> {
        let path = CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in the path"))?;
        let flags = rustix::fs::statvfs(path.as_c_str())?.f_flag;
        Ok(Self {
            from: path.clone(),
            path,
            read_only: true,
            tree: None,
            keep: keep_flags(flags),
        })
    }

    /// A view of the directory open at `dir` (an fd that stays open in the child), bound at
    /// `at` (an empty directory only this process can reach), read-only or not: the child
    /// never resolves the directory's own path, which a less privileged user may control.
    pub fn of_fd(dir: &OwnedFd, at: &Path, read_only: bool) -> io::Result<Self> {
        let nul = |e| io::Error::new(io::ErrorKind::InvalidInput, e);
        let from = CString::new(format!("/proc/self/fd/{}", dir.as_raw_fd()))
            .map_err(|_| nul("a NUL in the path"))?;
        let path = CString::new(at.as_os_str().as_bytes()).map_err(|_| nul("a NUL in the path"))?;
        let flags = rustix::fs::fstatvfs(dir)?.f_flag;
        use rustix::mount::OpenTreeFlags as T;
        let tree = rustix::mount::open_tree(
            dir,
            c"",
            T::OPEN_TREE_CLONE | T::OPEN_TREE_CLOEXEC | T::AT_EMPTY_PATH | T::AT_RECURSIVE,
        )?;
        if read_only {
            set_read_only(tree.as_raw_fd(), c"", libc::AT_EMPTY_PATH)?;
        }
        Ok(Self {
            from,
            path,
            read_only,
            tree: Some(tree),
            keep: keep_flags(flags),
        })
    }
}

/// mount_setattr(2) MOUNT_ATTR_RDONLY, recursively, on `dirfd`/`path` (with `flags`).
/// Async-signal-safe: one system call on caller-owned data.
fn set_read_only(dirfd: RawFd, path: &std::ffi::CStr, flags: libc::c_int) -> io::Result<()> {
    let attr = libc::mount_attr {
        attr_set: libc::MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: mount_setattr(2) reads `size_of::<mount_attr>()` bytes at `&attr`, a live local,
    // and the NUL-terminated path; it allocates nothing in this process.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            dirfd,
            path.as_ptr(),
            (flags | libc::AT_RECURSIVE) as libc::c_uint,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The flags of a mount that a bind remount (the pre-5.12 read-only fallback) must restate.
fn keep_flags(flags: rustix::fs::StatVfsMountFlags) -> rustix::mount::MountFlags {
    use rustix::fs::StatVfsMountFlags as V;
    use rustix::mount::MountFlags as M;
    let mut keep = M::empty();
    for (v, m) in [
        (V::NOSUID, M::NOSUID),
        (V::NODEV, M::NODEV),
        (V::NOEXEC, M::NOEXEC),
        (V::NOATIME, M::NOATIME),
        (V::NODIRATIME, M::NODIRATIME),
        (V::RELATIME, M::RELATIME),
    ] {
        if flags.contains(v) {
            keep |= m;
        }
    }
    keep
}

impl ReadOnlyView {
    /// Enters a new mount namespace where the directory is read-only. Async-signal-safe and
    /// allocation-free (for `pre_exec`): system calls only, on data prepared by `new`.
    pub fn enter(&self) -> io::Result<()> {
        use rustix::mount::{MountFlags, MountPropagationFlags};
        let path = self.path.as_c_str();
        // SAFETY: CLONE_NEWNS only (no CLONE_FILES, the unsafe case): the calling process
        // gets its own copy of the mount table, nothing else changes.
        unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNS)? };
        // Nothing done here may propagate back to the host's namespace.
        rustix::mount::mount_change(
            c"/",
            MountPropagationFlags::REC | MountPropagationFlags::PRIVATE,
        )?;
        if let Some(tree) = &self.tree {
            rustix::mount::move_mount(
                tree,
                c"",
                rustix::fs::CWD,
                path,
                rustix::mount::MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
            )?;
            return Ok(());
        }
        rustix::mount::mount_bind_recursive(self.from.as_c_str(), path)?;
        if !self.read_only {
            return Ok(());
        }
        let e = match set_read_only(libc::AT_FDCWD, path, 0) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if !matches!(e.raw_os_error(), Some(libc::ENOSYS) | Some(libc::EINVAL)) {
            return Err(e);
        }
        // Before Linux 5.12: the top mount only (MS_REC is ignored with MS_REMOUNT), keeping
        // its other flags, which a bind remount would otherwise reset.
        rustix::mount::mount_remount(path, MountFlags::BIND | MountFlags::RDONLY | self.keep, c"")?;
        Ok(())
    }
}

/// Where the served directory comes from.
enum Source {
    /// A canonical path (the launcher's own user named it: `husk run -v`).
    Path(PathBuf),
    /// A directory opened under a daemon's policy, with its path for messages.
    Dir(OwnedFd, PathBuf),
}

/// A running virtiofsd serving one shared directory, and the VMM's end of its connection.
pub struct Virtiofsd {
    child: Option<Child>,
    /// husk-vmm's end of the vhost-user connection, until the VMM holds it
    /// ([`Virtiofsd::close_vmm_end`]).
    vmm_end: Option<OwnedFd>,
    dir: PathBuf,
    tag: String,
    source: PathBuf,
    read_only: bool,
}

impl Virtiofsd {
    /// Starts virtiofsd ([`virtiofsd_binary`]) for `share` under the virtio-fs tag `tag`, and
    /// waits until it has sandboxed itself: a clear error if the directory is missing, virtiofsd
    /// is not installed, husk is not root, or virtiofsd quits.
    pub fn start(share: &SharedDir, tag: &str) -> Result<Self, VirtiofsError> {
        Self::start_program(&virtiofsd_binary(), share, tag)
    }

    /// [`Virtiofsd::start`] with another virtiofsd binary (tests).
    pub fn start_program(
        program: &Path,
        share: &SharedDir,
        tag: &str,
    ) -> Result<Self, VirtiofsError> {
        let source = canonical_dir(&share.host)?;
        Self::launch(program, Source::Path(source), share.read_only, tag, true)
    }

    /// Starts virtiofsd for the directory open at `dir` (opened by the caller under its
    /// policy; `shown` is its path for messages): virtiofsd serves a bind mount of that very
    /// directory, so nothing resolves its path again. No parent-death signal: for a daemon,
    /// whose VMs outlive its threads; virtiofsd still quits when the VMM's end closes.
    pub fn start_dir(
        dir: OwnedFd,
        shown: &Path,
        read_only: bool,
        tag: &str,
    ) -> Result<Self, VirtiofsError> {
        let stat = rustix::fs::fstat(&dir).map_err(|e| VirtiofsError::Host {
            path: shown.into(),
            cause: e.into(),
        })?;
        if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::Directory {
            return Err(VirtiofsError::NotADir(shown.into()));
        }
        Self::launch(
            &virtiofsd_binary(),
            Source::Dir(dir, shown.into()),
            read_only,
            tag,
            false,
        )
    }

    fn launch(
        program: &Path,
        source: Source,
        read_only: bool,
        tag: &str,
        die_with_parent: bool,
    ) -> Result<Self, VirtiofsError> {
        if !valid_fs_tag(tag) {
            return Err(VirtiofsError::Tag(tag.into()));
        }
        if !program.exists() {
            return Err(VirtiofsError::Missing(program.into()));
        }
        if !rustix::process::geteuid().is_root() {
            return Err(VirtiofsError::NotRoot);
        }
        let dir = private_dir().map_err(|e| VirtiofsError::Io("private directory", e))?;
        // What virtiofsd serves: the directory itself, or a bind mount of the opened directory
        // at `root` in the private directory (made in its mount namespace only).
        let (shown, served, view, _open_dir) = match source {
            Source::Path(path) => {
                let view = read_only.then(|| ReadOnlyView::new(&path)).transpose();
                (path.clone(), path, view, None)
            }
            Source::Dir(fd, shown) => {
                let root = dir.join("root");
                let view = std::fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&root)
                    .and_then(|()| ReadOnlyView::of_fd(&fd, &root, read_only))
                    .map(Some);
                (shown, root, view, Some(fd))
            }
        };
        let mut fsd = Virtiofsd {
            child: None,
            vmm_end: None,
            dir,
            tag: tag.into(),
            source: shown,
            read_only,
        };
        let view = view.map_err(|cause| VirtiofsError::Host {
            path: fsd.source.clone(),
            cause,
        })?;
        let socket = fsd.dir.join("vhost.sock");
        let listener =
            UnixListener::bind(&socket).map_err(|e| VirtiofsError::Io("vhost-user socket", e))?;
        // The VMM's end: connected now, accepted by virtiofsd once it runs (close-on-exec, like
        // every socket std makes).
        let vmm_end = UnixStream::connect(&socket)
            .map_err(|e| VirtiofsError::Io("connecting the vhost-user socket", e))?;
        fsd.vmm_end = Some(OwnedFd::from(vmm_end));
        // Nobody else may connect: the listener lives on, its name goes.
        let _ = std::fs::remove_file(&socket);
        let stderr = File::create(fsd.dir.join("stderr"))
            .map_err(|e| VirtiofsError::Io("virtiofsd's stderr file", e))?;
        let mut cmd = Command::new(program);
        cmd.args(virtiofsd_args(listener.as_raw_fd(), &served))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        crate::process::inherit_fd(&mut cmd, listener.as_raw_fd());
        // Its own process group: Ctrl-C on the terminal stops the VM, not its file system; and
        // stop() kills the group, virtiofsd's sandboxed server included.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        // SAFETY: runs in the child between fork and exec; prctl, unshare, mount and
        // mount_setattr are system calls, async-signal-safe, and nothing here allocates (the
        // view's path was made before the fork).
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || {
                if die_with_parent {
                    let kill = rustix::process::Signal::KILL;
                    rustix::process::set_parent_process_death_signal(Some(kill))?;
                }
                if let Some(view) = &view {
                    view.enter()?;
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| VirtiofsError::Io("cannot start virtiofsd", e))?;
        fsd.child = Some(child);
        // Only virtiofsd holds the listener now.
        drop(listener);
        fsd.wait_ready()?;
        Ok(fsd)
    }

    /// Waits until virtiofsd's sandboxed server (its child) runs under its seccomp filter, the
    /// last step before it serves; or, where /proc lists no children, until it is started.
    fn wait_ready(&mut self) -> Result<(), VirtiofsError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            self.check()?;
            let pid = self.pid().unwrap_or(0);
            match server_pid(pid) {
                Err(_) => return Ok(()),
                Ok(Some(server)) if seccomp_filtered(server) => return Ok(()),
                Ok(_) => {}
            }
            if Instant::now() > deadline {
                return Err(VirtiofsError::NotReady {
                    host: self.source.clone(),
                    timeout: READY_TIMEOUT,
                });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Whether virtiofsd still runs: an error with its last message if it quit.
    pub fn check(&mut self) -> Result<(), VirtiofsError> {
        let Some(child) = self.child.as_mut() else {
            return Err(VirtiofsError::Failed {
                host: self.source.clone(),
                reason: "not running".into(),
            });
        };
        match child
            .try_wait()
            .map_err(|e| VirtiofsError::Io("waiting for virtiofsd", e))?
        {
            None => Ok(()),
            Some(status) => {
                self.child = None;
                Err(VirtiofsError::Failed {
                    host: self.source.clone(),
                    reason: format!("{} ({status})", self.failure_reason()),
                })
            }
        }
    }

    /// virtiofsd's last message on stderr.
    fn failure_reason(&self) -> String {
        let text = read_bounded(&self.dir.join("stderr"), 64 * 1024).unwrap_or_default();
        text.lines()
            .map(str::trim)
            .rfind(|l| !l.is_empty())
            .unwrap_or("it exited without a message")
            .to_string()
    }

    /// The VMM's end of the connection (to inherit at the same number).
    pub fn vmm_fd(&self) -> Option<RawFd> {
        self.vmm_end.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// husk-vmm's `--fs tag=TAG,fd=N`, while this process holds the VMM's end.
    pub fn fs_config(&self) -> Option<FsConfig> {
        self.vmm_fd().map(|fd| FsConfig {
            tag: self.tag.clone(),
            fd,
        })
    }

    /// Closes this process's copy of the VMM's end, once the VMM holds its own: then virtiofsd
    /// quits when the VMM goes.
    pub fn close_vmm_end(&mut self) {
        self.vmm_end = None;
    }

    /// Takes the VMM's end (for a caller that hands it on itself, or plays the VMM in tests).
    pub fn take_vmm_end(&mut self) -> Option<OwnedFd> {
        self.vmm_end.take()
    }

    /// The virtio-fs tag.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The canonical host directory served.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Whether the host enforces read-only access.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// virtiofsd's pid (its sandboxed server is its child), while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Ends virtiofsd (SIGKILL to its process group if it has not quit by itself), reaps it and
    /// removes its private directory.
    pub fn stop(&mut self) {
        self.vmm_end = None;
        if let Some(mut child) = self.child.take() {
            if matches!(child.try_wait(), Ok(None)) {
                // Not reaped yet, so the group id is still this child's: the server goes too.
                if let Some(group) = i32::try_from(child.id())
                    .ok()
                    .and_then(rustix::process::Pid::from_raw)
                {
                    let _ =
                        rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
                }
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl fmt::Debug for Virtiofsd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Virtiofsd")
            .field("tag", &self.tag)
            .field("source", &self.source)
            .field("read_only", &self.read_only)
            .field("pid", &self.pid())
            .finish()
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The first child of `pid` (virtiofsd forks its sandboxed server); an error when /proc does
/// not list children (a kernel without CONFIG_PROC_CHILDREN).
fn server_pid(pid: u32) -> io::Result<Option<u32>> {
    let text = read_bounded(Path::new(&format!("/proc/{pid}/task/{pid}/children")), 4096)?;
    Ok(text.split_whitespace().next().and_then(|p| p.parse().ok()))
}

/// Whether process `pid` runs under a seccomp filter.
fn seccomp_filtered(pid: u32) -> bool {
    read_bounded(Path::new(&format!("/proc/{pid}/status")), 64 * 1024).is_ok_and(|s| {
        s.lines()
            .any(|l| l.strip_prefix("Seccomp:").map(str::trim) == Some("2"))
    })
}

use crate::run_dirs::read_bounded;

/// A new 0700 directory under /tmp for virtiofsd's socket and stderr.
fn private_dir() -> io::Result<PathBuf> {
    crate::run_dirs::private_dir(DIR_PREFIX, 0o700)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    fn share(host: &Path, read_only: bool) -> SharedDir {
        SharedDir {
            host: host.into(),
            guest: "/data".into(),
            read_only,
        }
    }

    /// Whether the tests that start virtiofsd can run here (root, virtiofsd installed).
    fn can_run_virtiofsd() -> bool {
        if !rustix::process::geteuid().is_root() {
            eprintln!("!!! SKIPPED: virtiofsd tests need root !!!");
            return false;
        }
        if !virtiofsd_binary().exists() {
            eprintln!(
                "!!! SKIPPED: {} is missing (qemu-system-common) !!!",
                virtiofsd_binary().display()
            );
            return false;
        }
        true
    }

    /// Whether `pid` is gone (or a zombie nobody reaped yet).
    fn gone(pid: u32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        }
    }

    fn wait_gone(pid: u32) -> bool {
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if gone(pid) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    #[test]
    fn volumes_parse_with_their_mode_and_keep_colons_in_the_host_path() {
        let v: SharedDir = "/srv/a:/data".parse().unwrap();
        assert_eq!(v, share(Path::new("/srv/a"), false));
        let v: SharedDir = "rel/dir:/data:ro".parse().unwrap();
        assert_eq!((v.host, v.read_only), (PathBuf::from("rel/dir"), true));
        let v: SharedDir = "/a:b:/x/y:rw".parse().unwrap();
        assert_eq!(
            (v.host, v.guest.as_str(), v.read_only),
            (PathBuf::from("/a:b"), "/x/y", false)
        );
        assert_eq!(
            "/h:/g:ro".parse::<SharedDir>().unwrap().to_string(),
            "/h:/g:ro"
        );
        for bad in ["/a", "/a:ro", ":/data", "/a:", "/a:/b:ro:x"] {
            assert!(bad.parse::<SharedDir>().is_err(), "{bad}");
        }
        assert_eq!(
            "/a:data".parse::<SharedDir>(),
            Err(SharedDirError::GuestPath("data".into()))
        );
        for bad in ["/a:/", "/a:/x/../y", "/a:/x y"] {
            assert!(
                matches!(
                    bad.parse::<SharedDir>(),
                    Err(SharedDirError::GuestPath(_) | SharedDirError::Form(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn kernel_params_name_the_tag_and_the_mode() {
        let shares = vec![
            (share(Path::new("/a"), false), tag_for(0)),
            (share(Path::new("/b"), true), tag_for(1)),
        ];
        assert_eq!(
            kernel_params(&shares).unwrap(),
            ["husk.fs=husk-fs0:/data", "husk.fs=husk-fs1:/data:ro"]
        );
        let params = kernel_params(&shares).unwrap().join(" ");
        let back = SharedMount::all_from_cmdline(&params).unwrap();
        assert_eq!(back[1].tag, "husk-fs1");
        assert!(back[1].read_only && !back[0].read_only);
    }

    #[test]
    fn the_command_line_passes_the_listener_and_escapes_the_source() {
        let a: Vec<String> = virtiofsd_args(5, Path::new("/srv/a,b\\c"))
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        assert_eq!(
            a.join(" "),
            "--fd=5 -o source=/srv/a\\,b\\\\c -o cache=auto -o sandbox=namespace \
             -o log_level=warn -f"
        );
    }

    #[test]
    fn a_missing_directory_or_binary_is_named() {
        let e = Virtiofsd::start(&share(Path::new("/nonexistent/nope"), false), "t")
            .err()
            .unwrap();
        assert_eq!(e.to_string(), "/nonexistent/nope: no such directory");
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("f");
        std::fs::write(&file, "").unwrap();
        let e = Virtiofsd::start(&share(&file, false), "t").err().unwrap();
        assert!(e.to_string().ends_with("/f: not a directory"), "{e}");
        let e = Virtiofsd::start_program(
            Path::new("/nonexistent/virtiofsd"),
            &share(tmp.path(), false),
            "t",
        )
        .err()
        .unwrap();
        assert!(
            e.to_string().contains(
                "/nonexistent/virtiofsd is missing (install the Debian package qemu-system-common"
            ),
            "{e}"
        );
        let e = Virtiofsd::start(&share(tmp.path(), false), "bad tag")
            .err()
            .unwrap();
        assert!(matches!(e, VirtiofsError::Tag(_)), "{e}");
    }

    #[test]
    fn a_backend_that_quits_at_once_is_reported_with_its_message() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("!!! SKIPPED: needs root !!!");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let e = Virtiofsd::start_program(Path::new("/bin/false"), &share(tmp.path(), false), "t")
            .err()
            .unwrap();
        assert!(
            e.to_string().contains(": it exited without a message"),
            "{e}"
        );
    }

    #[test]
    fn virtiofsd_runs_sandboxed_and_quits_when_the_vmm_end_closes() {
        if !can_run_virtiofsd() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        // A comma in the name: the escaped source option must reach virtiofsd intact.
        let host = tmp.path().join("a,b");
        std::fs::create_dir(&host).unwrap();
        let started = Instant::now();
        let mut fsd = Virtiofsd::start(&share(&host, false), "husk-fs0").unwrap();
        eprintln!("virtiofsd ready in {:?}", started.elapsed());
        let pid = fsd.pid().unwrap();
        let server = server_pid(pid).unwrap().unwrap();
        assert!(seccomp_filtered(server));
        let fs = fsd.fs_config().unwrap();
        assert_eq!(fs.tag, "husk-fs0");
        assert_eq!(Some(fs.fd), fsd.vmm_fd());
        assert!(
            !fsd.dir.join("vhost.sock").exists(),
            "the socket's name stays"
        );
        std::thread::sleep(Duration::from_millis(200));
        fsd.check().unwrap();
        // Without a VMM (before any vhost-user message) the closed connection ends it.
        drop(fsd.take_vmm_end());
        assert!(wait_gone(pid), "virtiofsd {pid} still runs");
        assert!(wait_gone(server), "its server {server} still runs");
        assert!(fsd.check().is_err());
        let dir = fsd.dir.clone();
        drop(fsd);
        assert!(!dir.exists());
    }

    #[test]
    fn drop_kills_virtiofsd_and_its_server_and_removes_its_directory() {
        if !can_run_virtiofsd() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let fsd = Virtiofsd::start(&share(tmp.path(), true), &tag_for(3)).unwrap();
        let pid = fsd.pid().unwrap();
        let server = server_pid(pid).unwrap().unwrap();
        let dir = fsd.dir.clone();
        assert!(dir.join("stderr").exists());
        // The VMM's end is still open here: only the kill can end it.
        drop(fsd);
        assert!(wait_gone(pid), "virtiofsd {pid} still runs");
        assert!(wait_gone(server), "its server {server} still runs");
        assert!(!dir.exists(), "{} left", dir.display());
    }

    /// The server's mount table: the mount at its "/" (the shared directory) and its options.
    fn root_mount_options(pid: u32) -> String {
        let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
        info.lines()
            .map(|l| l.split(' ').collect::<Vec<_>>())
            .filter(|f| f.len() > 5 && f[4] == "/")
            .map(|f| f[5].to_string())
            .next_back()
            .unwrap()
    }

    #[test]
    fn a_read_only_share_is_read_only_for_virtiofsd_and_writable_on_the_host() {
        if !can_run_virtiofsd() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let ro = Virtiofsd::start(&share(tmp.path(), true), "ro").unwrap();
        let rw = Virtiofsd::start(&share(tmp.path(), false), "rw").unwrap();
        let ro_server = server_pid(ro.pid().unwrap()).unwrap().unwrap();
        let rw_server = server_pid(rw.pid().unwrap()).unwrap().unwrap();
        let ro_opts = root_mount_options(ro_server);
        let rw_opts = root_mount_options(rw_server);
        assert!(ro_opts.split(',').any(|o| o == "ro"), "{ro_opts}");
        assert!(rw_opts.split(',').any(|o| o == "rw"), "{rw_opts}");
        assert!(ro.read_only() && !rw.read_only());
        // The host's own view is untouched.
        std::fs::write(tmp.path().join("host-file"), "x").unwrap();
    }

    #[test]
    fn the_read_only_view_refuses_writes_in_its_namespace_only() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("!!! SKIPPED: needs root !!!");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().canonicalize().unwrap();
        std::fs::create_dir(dir.join("sub")).unwrap();
        let view = ReadOnlyView::new(&dir).unwrap();
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(r#"touch "$1/x" 2>&1; echo "rc=$?"; touch "$1/sub/y" 2>&1; echo "rc=$?""#)
            .arg("sh")
            .arg(&dir);
        // SAFETY: `enter` only makes system calls on data prepared before the fork.
        unsafe {
            cmd.pre_exec(move || view.enter());
        }
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Read-only file system"), "{text}");
        assert!(!text.contains("rc=0"), "a write went through: {text}");
        assert!(!dir.join("x").exists() && !dir.join("sub/y").exists());
        // The host's view stays writable.
        std::fs::write(dir.join("x"), "x").unwrap();
        std::fs::write(dir.join("sub/y"), "y").unwrap();
    }

    #[test]
    fn a_view_of_an_opened_directory_serves_that_directory_even_after_its_path_moves() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("!!! SKIPPED: needs root !!!");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let shared = tmp.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::write(shared.join("real"), "").unwrap();
        let at = tmp.path().join("at");
        std::fs::create_dir(&at).unwrap();
        let opened = OwnedFd::from(File::open(&shared).unwrap());
        // The caller's path is swapped for another directory after the open: the view must
        // still be the directory that was opened.
        std::fs::rename(&shared, tmp.path().join("moved")).unwrap();
        std::fs::create_dir(&shared).unwrap();
        std::fs::write(shared.join("decoy"), "").unwrap();
        for read_only in [false, true] {
            let view = ReadOnlyView::of_fd(&opened, &at, read_only).unwrap();
            let mut cmd = Command::new("/bin/sh");
            cmd.arg("-c")
                .arg(r#"ls "$1"; touch "$1/new" 2>&1; echo "rc=$?""#)
                .arg("sh")
                .arg(&at);
            // SAFETY: `enter` only makes system calls on data prepared before the fork.
            unsafe {
                cmd.pre_exec(move || view.enter());
            }
            let out = cmd.output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(text.contains("real") && !text.contains("decoy"), "{text}");
            assert_eq!(
                text.contains("rc=0"),
                !read_only,
                "read_only={read_only}: {text}"
            );
        }
        // The writable view wrote into the opened directory; the host saw no mount at `at`.
        assert!(tmp.path().join("moved/new").exists());
        assert!(std::fs::read_dir(&at).unwrap().next().is_none());
    }
}
