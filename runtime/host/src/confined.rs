//! File operations for a root process working in directories that a less privileged user can
//! write to (a jailed VMM's directory) or that a caller named (a snapshot directory).
//!
//! The rule: root never follows a path that someone else can change. Everything here works
//! relative to an open directory fd, opens final components with `O_NOFOLLOW`, checks what it
//! opened with `fstat` (a regular file, owned by whom it should be), changes owner and mode
//! through the fd it holds (never by path), and reads with a bound. A symlink or a FIFO planted
//! where huskd expects its own file makes the call fail; it is never followed.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path};

use rustix::fs::{self as rfs, AtFlags, Mode, OFlags, RenameFlags, ResolveFlags};

/// How deep [`Dir::remove_tree`] goes: a VMM's directory holds sockets and one staging
/// directory, so anything deeper was made to hurt.
pub const MAX_TREE_DEPTH: usize = 16;

/// An open directory: every operation is relative to it.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
}

/// What an opened file turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub dev: u64,
    pub ino: u64,
    pub uid: u32,
    pub nlink: u64,
    pub len: u64,
}

impl Identity {
    /// The identity of an open file.
    pub fn of(fd: BorrowedFd<'_>) -> io::Result<Self> {
        let st = rfs::fstat(fd)?;
        Ok(Self {
            dev: st.st_dev,
            ino: st.st_ino,
            uid: st.st_uid,
            nlink: st.st_nlink,
            len: u64::try_from(st.st_size).unwrap_or(0),
        })
    }
}

fn not_a(kind: &str, name: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{} is not a {kind}", name.display()),
    )
}

/// A single path component (no `/`, `.` or `..`): the only names the `*_entry` calls accept.
fn entry(name: &str) -> io::Result<&Path> {
    let path = Path::new(name);
    let mut parts = path.components();
    match (parts.next(), parts.next()) {
        (Some(Component::Normal(_)), None) => Ok(path),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a plain file name"),
        )),
    }
}

/// Whether an error means "a symlink was in the way": O_NOFOLLOW's ELOOP, or RESOLVE_BENEATH's
/// EXDEV for a path that would leave its directory.
pub fn is_symlink_refusal(e: &io::Error) -> bool {
    use rustix::io::Errno;
    let errno = e.raw_os_error().map(Errno::from_raw_os_error);
    errno == Some(Errno::LOOP) || errno == Some(Errno::XDEV)
}

impl Dir {
    /// Opens a directory huskd trusts the path of (its own state directory, an allowed root):
    /// only the last component is refused when it is a symlink.
    pub fn open(path: &Path) -> io::Result<Self> {
        let fd = rfs::open(
            path,
            OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Self { fd })
    }

    /// The directory's fd (to pass to `*at` calls elsewhere).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The identity (owner, inode) of the directory itself.
    pub fn identity(&self) -> io::Result<Identity> {
        Identity::of(self.fd.as_fd())
    }

    /// Opens `rel` below this directory; symlinks are followed only while they stay below it
    /// (openat2 RESOLVE_BENEATH), `..` cannot climb out, and /proc magic links are refused.
    pub fn open_beneath(&self, rel: &Path, flags: OFlags, mode: Mode) -> io::Result<OwnedFd> {
        Ok(rfs::openat2(
            &self.fd,
            rel,
            flags | OFlags::CLOEXEC,
            mode,
            ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
        )?)
    }

    /// Opens the directory `rel` below this one (see [`open_beneath`](Self::open_beneath)).
    pub fn dir_beneath(&self, rel: &Path) -> io::Result<Self> {
        let fd = self.open_beneath(rel, OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty())?;
        Ok(Self { fd })
    }

    /// Opens the entry `name` of this directory as a directory, refusing a symlink.
    pub fn subdir(&self, name: &str) -> io::Result<Self> {
        let fd = rfs::openat(
            &self.fd,
            entry(name)?,
            OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Self { fd })
    }

    /// Creates the directory `name` (mode `mode`, which the umask cannot widen) and opens it.
    /// With `fresh`, an existing entry of that name is removed first (recursively, without
    /// following symlinks).
    pub fn create_subdir(&self, name: &str, mode: u32, fresh: bool) -> io::Result<Self> {
        let name_path = entry(name)?;
        if fresh {
            self.remove_tree(name)?;
        }
        match rfs::mkdirat(&self.fd, name_path, Mode::from_raw_mode(mode)) {
            Ok(()) => {}
            Err(e) if e == rustix::io::Errno::EXIST && !fresh => {}
            Err(e) => return Err(e.into()),
        }
        let dir = self.subdir(name)?;
        rfs::fchmod(&dir.fd, Mode::from_raw_mode(mode))?;
        Ok(dir)
    }

    /// Opens the regular file `name` of this directory without following a symlink; anything
    /// that is not a regular file is refused.
    pub fn open_file(&self, name: &str, flags: OFlags, mode: u32) -> io::Result<File> {
        let name_path = entry(name)?;
        let fd = rfs::openat(
            &self.fd,
            name_path,
            flags | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
            Mode::from_raw_mode(mode),
        )?;
        let st = rfs::fstat(&fd)?;
        if rfs::FileType::from_raw_mode(st.st_mode) != rfs::FileType::RegularFile {
            return Err(not_a("regular file", name_path));
        }
        // O_NONBLOCK only kept a planted FIFO from blocking the open; regular files ignore it,
        // but clear it so the file behaves normally for its user.
        let flags = rfs::fcntl_getfl(&fd)?;
        rfs::fcntl_setfl(&fd, flags - OFlags::NONBLOCK)?;
        Ok(File::from(fd))
    }

    /// Creates `name` anew (truncating a regular file of that name, refusing anything else),
    /// mode `mode` and owned by `owner` when given, set through the open fd.
    pub fn create_file(
        &self,
        name: &str,
        mode: u32,
        append: bool,
        owner: Option<(u32, u32)>,
    ) -> io::Result<File> {
        let mut flags = OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC;
        if append {
            flags |= OFlags::APPEND;
        }
        let file = self.open_file(name, flags, mode)?;
        rfs::fchmod(&file, Mode::from_raw_mode(mode))?;
        if let Some((uid, gid)) = owner {
            chown_fd(file.as_fd(), uid, gid)?;
        }
        Ok(file)
    }

    /// Reads the regular file `name` whole, refusing one longer than `limit` bytes. `Ok(None)`
    /// when there is no such file.
    pub fn read_bounded(&self, name: &str, limit: u64) -> io::Result<Option<Vec<u8>>> {
        let file = match self.open_file(name, OFlags::RDONLY, 0) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        read_limited(file, limit).map(Some)
    }

    /// Reads at most the last `limit` bytes of the regular file `name` (empty without it).
    pub fn read_tail(&self, name: &str, limit: u64) -> io::Result<Vec<u8>> {
        use std::io::{Seek, SeekFrom};
        let mut file = match self.open_file(name, OFlags::RDONLY, 0) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(limit)))?;
        read_limited(file, limit)
    }

    /// Writes `name` with `bytes` so that a reader sees the old or the new file, never half:
    /// a fresh `name.tmp` (created exclusively, never through a symlink), synced, renamed.
    pub fn write_atomic(&self, name: &str, bytes: &[u8], mode: u32) -> io::Result<()> {
        entry(name)?;
        let tmp = format!("{name}.tmp");
        self.remove_file(&tmp)?;
        let mut file =
            self.open_file(&tmp, OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL, mode)?;
        let written = file
            .write_all(bytes)
            .and_then(|()| rfs::fchmod(&file, Mode::from_raw_mode(mode)).map_err(Into::into))
            .and_then(|()| file.sync_data())
            .and_then(|()| Ok(rfs::renameat(&self.fd, &tmp, &self.fd, name)?));
        if written.is_err() {
            let _ = self.remove_file(&tmp);
        }
        written
    }

    /// Creates `name` exclusively (never replacing anything) with `bytes`.
    pub fn write_new(&self, name: &str, bytes: &[u8], mode: u32) -> io::Result<()> {
        let mut file =
            self.open_file(name, OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL, mode)?;
        rfs::fchmod(&file, Mode::from_raw_mode(mode))?;
        file.write_all(bytes)?;
        file.sync_data()
    }

    /// Removes the entry `name` if it is not a directory (a symlink is removed, not followed);
    /// a missing entry is fine.
    pub fn remove_file(&self, name: &str) -> io::Result<()> {
        match rfs::unlinkat(&self.fd, entry(name)?, AtFlags::empty()) {
            Ok(()) => Ok(()),
            Err(e) if e == rustix::io::Errno::NOENT => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes `name` whatever it is, a directory tree included, never following a symlink;
    /// a missing entry is fine. A tree deeper than [`MAX_TREE_DEPTH`] is refused: whoever made
    /// it (a VMM's user, in its own directory) does not get to exhaust huskd's stack or fds.
    pub fn remove_tree(&self, name: &str) -> io::Result<()> {
        self.remove_tree_at(name, 0)
    }

    fn remove_tree_at(&self, name: &str, depth: usize) -> io::Result<()> {
        let name_path = entry(name)?;
        match rfs::unlinkat(&self.fd, name_path, AtFlags::empty()) {
            Ok(()) => return Ok(()),
            Err(e) if e == rustix::io::Errno::NOENT => return Ok(()),
            Err(e) if e == rustix::io::Errno::ISDIR || e == rustix::io::Errno::PERM => {}
            Err(e) => return Err(e.into()),
        }
        if depth >= MAX_TREE_DEPTH {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name}: directories nested deeper than {MAX_TREE_DEPTH}: not removed"),
            ));
        }
        let sub = self.subdir(name)?;
        for child in sub.entries()? {
            sub.remove_tree_at(&child, depth + 1)?;
        }
        drop(sub);
        match rfs::unlinkat(&self.fd, name_path, AtFlags::REMOVEDIR) {
            Err(e) if e != rustix::io::Errno::NOENT => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// The names in this directory (without `.` and `..`).
    pub fn entries(&self) -> io::Result<Vec<String>> {
        let dup = self.fd.try_clone()?;
        let mut names = Vec::new();
        let mut dir = rfs::Dir::new(dup)?;
        dir.rewind();
        for item in dir {
            let item = item?;
            let name = item.file_name().to_string_lossy().into_owned();
            if name != "." && name != ".." {
                names.push(name);
            }
        }
        Ok(names)
    }

    /// Opens the regular file `name` for reading, refusing it unless `owner` owns it and it
    /// has exactly one link (a hard link to someone else's file is not the VMM's to hand over).
    pub fn open_owned_file(&self, name: &str, owner: u32) -> io::Result<(File, Identity)> {
        let src = self.open_file(name, OFlags::RDONLY, 0)?;
        let seen = Identity::of(src.as_fd())?;
        if seen.uid != owner || seen.nlink != 1 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{name}: owned by uid {} with {} links, expected uid {owner} and one link",
                    seen.uid, seen.nlink
                ),
            ));
        }
        Ok((src, seen))
    }

    /// Moves the regular file `name` from this directory into `to` (which must not hold it),
    /// refusing anything but a regular file with one link owned by `owner`; the moved file is
    /// checked to be the one inspected (a swap in between is caught) and gets `mode` and
    /// huskd's ownership through its fd.
    pub fn move_file_to(&self, name: &str, to: &Dir, owner: u32, mode: u32) -> io::Result<File> {
        let (src, seen) = self.open_owned_file(name, owner)?;
        let name_path = entry(name)?;
        rfs::renameat_with(
            &self.fd,
            name_path,
            &to.fd,
            name_path,
            RenameFlags::NOREPLACE,
        )?;
        let moved = to.open_file(name, OFlags::RDONLY, 0);
        let same = moved
            .as_ref()
            .ok()
            .and_then(|f| Identity::of(f.as_fd()).ok())
            .is_some_and(|id| id.dev == seen.dev && id.ino == seen.ino);
        if !same {
            let _ = to.remove_file(name);
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{name} was replaced while it was being moved"),
            ));
        }
        rfs::fchmod(&src, Mode::from_raw_mode(mode))?;
        let (uid, gid) = (rustix::process::geteuid(), rustix::process::getegid());
        rfs::fchown(&src, Some(uid), Some(gid))?;
        Ok(src)
    }
}

/// Changes the owner of an open file.
pub fn chown_fd(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> io::Result<()> {
    rfs::fchown(
        fd,
        Some(rustix::fs::Uid::from_raw(uid)),
        Some(rustix::fs::Gid::from_raw(gid)),
    )?;
    Ok(())
}

/// Reads `file` to its end, failing when it holds more than `limit` bytes.
pub fn read_limited(file: impl Read, limit: u64) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    file.take(limit.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("longer than its limit of {limit} bytes"),
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

    fn scratch(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("husk-confined-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_planted_symlink_is_never_followed_by_create_read_or_write() {
        let base = scratch("symlink");
        let victim = base.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let dir = Dir::open(&base).unwrap();
        for name in ["log", "report", "record", "record.tmp"] {
            symlink(&victim, base.join(name)).unwrap();
        }
        assert!(dir.create_file("log", 0o600, true, None).is_err());
        assert!(dir.read_bounded("report", 1 << 20).is_err());
        assert!(dir.read_tail("report", 10).is_err());
        // write_atomic removes a planted tmp link and never writes through it.
        dir.write_atomic("record", b"new", 0o600).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(std::fs::read(base.join("record")).unwrap(), b"new");
        let meta = std::fs::symlink_metadata(base.join("record")).unwrap();
        assert!(meta.is_file());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert!(dir.subdir("log").is_err(), "a symlink is not a directory");
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let base = scratch("fifo");
        let fifo = base.join("exit.pb");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rfs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let dir = Dir::open(&base).unwrap();
        let err = dir.read_bounded("exit.pb", 1024).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn reads_are_bounded_and_tails_are_the_last_bytes() {
        let base = scratch("bounded");
        std::fs::write(base.join("big"), vec![b'x'; 5000]).unwrap();
        std::fs::write(base.join("log"), b"one\ntwo\nthree\n").unwrap();
        let dir = Dir::open(&base).unwrap();
        assert!(dir.read_bounded("big", 4096).is_err());
        assert_eq!(dir.read_bounded("big", 5000).unwrap().unwrap().len(), 5000);
        assert_eq!(dir.read_bounded("missing", 10).unwrap(), None);
        assert_eq!(dir.read_tail("log", 6).unwrap(), b"three\n");
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn trees_are_removed_without_following_links_out_of_them() {
        let base = scratch("tree");
        let outside = base.join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("keep"), b"k").unwrap();
        std::fs::create_dir_all(base.join("t/a/b")).unwrap();
        std::fs::write(base.join("t/a/b/f"), b"f").unwrap();
        symlink(&outside, base.join("t/a/link")).unwrap();
        let dir = Dir::open(&base).unwrap();
        dir.remove_tree("t").unwrap();
        assert!(!base.join("t").exists());
        assert!(outside.join("keep").exists());
        dir.remove_tree("t").unwrap();
        assert!(dir.remove_tree("../x").is_err(), "only plain names");
        let deep: std::path::PathBuf = (0..MAX_TREE_DEPTH + 2).map(|_| "d").collect();
        std::fs::create_dir_all(base.join("deep").join(&deep)).unwrap();
        assert!(
            dir.remove_tree("deep").is_err(),
            "too deep is refused, not recursed into"
        );
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn beneath_refuses_symlinks_and_dotdot_that_leave_the_directory() {
        let base = scratch("beneath");
        std::fs::create_dir_all(base.join("root/sub")).unwrap();
        std::fs::write(base.join("root/sub/file"), b"in").unwrap();
        std::fs::write(base.join("secret"), b"out").unwrap();
        symlink("sub/file", base.join("root/inside")).unwrap();
        symlink(base.join("secret"), base.join("root/escape")).unwrap();
        let root = Dir::open(&base.join("root")).unwrap();
        let open = |rel: &str| root.open_beneath(Path::new(rel), OFlags::RDONLY, Mode::empty());
        assert!(open("sub/file").is_ok());
        assert!(open("inside").is_ok(), "a link that stays below is fine");
        assert!(open("escape").is_err());
        assert!(open("../secret").is_err());
        assert!(open("sub/../../secret").is_err());
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn moving_checks_owner_links_and_identity_and_sets_the_mode() {
        let base = scratch("move");
        std::fs::create_dir_all(base.join("from")).unwrap();
        std::fs::create_dir_all(base.join("to")).unwrap();
        std::fs::write(base.join("from/vm.mem"), b"mem").unwrap();
        std::fs::write(base.join("victim"), b"v").unwrap();
        symlink(base.join("victim"), base.join("from/vm.state")).unwrap();
        let me = rustix::process::geteuid().as_raw();
        let (from, to) = (
            Dir::open(&base.join("from")).unwrap(),
            Dir::open(&base.join("to")).unwrap(),
        );
        let moved = from.move_file_to("vm.mem", &to, me, 0o600).unwrap();
        assert_eq!(moved.metadata().unwrap().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read(base.join("to/vm.mem")).unwrap(), b"mem");
        assert!(from.move_file_to("vm.state", &to, me, 0o600).is_err());
        assert!(!base.join("to/vm.state").exists());
        std::fs::write(base.join("from/x"), b"x").unwrap();
        assert!(
            from.move_file_to("x", &to, me + 1, 0o600).is_err(),
            "another owner's file is refused"
        );
        std::fs::write(base.join("from/vm.mem"), b"again").unwrap();
        assert!(
            from.move_file_to("vm.mem", &to, me, 0o600).is_err(),
            "an existing target is never replaced"
        );
        std::fs::remove_dir_all(&base).unwrap();
    }
}
