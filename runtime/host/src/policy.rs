//! Which host files a caller of huskd may name: kernels, initrds, root filesystems, disks and
//! snapshot directories are opened only below the directories the administrator allowed
//! (`huskd --allow-path DIR`), as regular files (block devices only where allowed one by one),
//! each opened once and then used by its fd, so nothing can be swapped between the check and
//! the use.
//!
//! Opening goes through openat2(RESOLVE_BENEATH) from the allowed root's fd: `..` and symlinks
//! may move around below the root but never out of it, and /proc magic links are refused. The
//! roots themselves are the administrator's: their own path is trusted (canonicalized once).

use std::fs::File;
use std::io;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{Mode, OFlags};

use crate::confined::Dir;

/// Why a path was refused.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{what}: {path} is not an absolute path")]
    NotAbsolute { what: String, path: String },
    #[error(
        "{what}: {path} is outside the directories huskd may open ({roots}); an administrator \
         can allow more with huskd --allow-path DIR"
    )]
    NotAllowed {
        what: String,
        path: String,
        roots: String,
    },
    #[error("{what}: {path}: {source}")]
    Io {
        what: String,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{what}: {path} is {kind}, not a regular file")]
    NotRegular {
        what: String,
        path: String,
        kind: &'static str,
    },
}

impl PolicyError {
    /// Whether the file is simply missing (the caller may say NOT_FOUND).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }

    /// Whether the request named something it may not (the caller may say PERMISSION_DENIED).
    pub fn is_denied(&self) -> bool {
        match self {
            Self::NotAllowed { .. } => true,
            Self::Io { source, .. } => crate::confined::is_symlink_refusal(source),
            _ => false,
        }
    }
}

/// The allowed roots.
#[derive(Debug, Clone, Default)]
pub struct PathPolicy {
    roots: Vec<PathBuf>,
    devices: Vec<PathBuf>,
}

/// A file opened under the policy, with the path it was asked for.
#[derive(Debug)]
pub struct OpenedFile {
    pub file: File,
    pub path: PathBuf,
}

impl PathPolicy {
    /// A policy over `roots` (directories; those that do not exist are left out, as they hold
    /// nothing to open) and the block devices `devices` allowed one by one.
    pub fn new(roots: &[PathBuf], devices: &[PathBuf]) -> Self {
        let mut canonical: Vec<PathBuf> = roots
            .iter()
            .filter_map(|r| std::fs::canonicalize(r).ok())
            .filter(|r| r.is_dir())
            .collect();
        canonical.sort();
        canonical.dedup();
        Self {
            roots: canonical,
            devices: devices.to_vec(),
        }
    }

    /// This policy with one more root, `root` (canonicalized; left out when it is not a
    /// directory): huskd's own directories that one VM may read from, such as the template
    /// build its disks go on from.
    pub fn with_root(&self, root: &Path) -> Self {
        let mut more = self.clone();
        if let Ok(root) = std::fs::canonicalize(root) {
            if root.is_dir() && !more.roots.contains(&root) {
                more.roots.push(root);
                more.roots.sort();
            }
        }
        more
    }

    /// The roots, for messages and docs.
    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    fn roots_text(&self) -> String {
        if self.roots.is_empty() {
            return "none".into();
        }
        self.roots
            .iter()
            .map(|r| r.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The allowed roots `path` lies under (lexically, after resolving `.` and `..` as written),
    /// with the rest of the path relative to each; the innermost root first.
    fn candidates(&self, what: &str, path: &Path) -> Result<Vec<(&Path, PathBuf)>, PolicyError> {
        if !path.is_absolute() {
            return Err(PolicyError::NotAbsolute {
                what: what.into(),
                path: path.display().to_string(),
            });
        }
        let lexical = crate::jail::normalize(path);
        let mut found: Vec<(&Path, PathBuf)> = self
            .roots
            .iter()
            .filter_map(|root| {
                let rel = lexical.strip_prefix(root).ok()?;
                Some((root.as_path(), rel.to_path_buf()))
            })
            .collect();
        found.sort_by_key(|(root, _)| std::cmp::Reverse(root.components().count()));
        if found.is_empty() {
            return Err(self.not_allowed(what, path));
        }
        Ok(found)
    }

    fn not_allowed(&self, what: &str, path: &Path) -> PolicyError {
        PolicyError::NotAllowed {
            what: what.into(),
            path: path.display().to_string(),
            roots: self.roots_text(),
        }
    }

    /// Opens the file `path` (read-only, or read-write with `write`) under the policy.
    pub fn open_file(
        &self,
        what: &str,
        path: &Path,
        write: bool,
    ) -> Result<OpenedFile, PolicyError> {
        let io_err = |source: io::Error| PolicyError::Io {
            what: what.into(),
            path: path.display().to_string(),
            source,
        };
        let access = if write { OFlags::RDWR } else { OFlags::RDONLY };
        if self.devices.iter().any(|d| d == path) {
            // Allowed one by one by the administrator: opened by that exact path.
            let fd = rustix::fs::open(path, access | OFlags::CLOEXEC, Mode::empty())
                .map_err(|e| io_err(e.into()))?;
            return Ok(OpenedFile {
                file: File::from(fd),
                path: path.to_path_buf(),
            });
        }
        let mut last = None;
        for (root, rel) in self.candidates(what, path)? {
            let opened = Dir::open(root).and_then(|dir| {
                dir.open_beneath(
                    &rel,
                    access | OFlags::NONBLOCK | OFlags::NOCTTY,
                    Mode::empty(),
                )
            });
            match opened {
                Ok(fd) => {
                    let file = File::from(fd);
                    let kind = file_kind(&file).map_err(io_err)?;
                    if kind != "a regular file" {
                        return Err(PolicyError::NotRegular {
                            what: what.into(),
                            path: path.display().to_string(),
                            kind,
                        });
                    }
                    let flags = rustix::fs::fcntl_getfl(&file).map_err(|e| io_err(e.into()))?;
                    rustix::fs::fcntl_setfl(&file, flags - OFlags::NONBLOCK)
                        .map_err(|e| io_err(e.into()))?;
                    return Ok(OpenedFile {
                        file,
                        path: path.to_path_buf(),
                    });
                }
                Err(e) => last = Some(e),
            }
        }
        let e = last.unwrap_or_else(|| io::Error::from(io::ErrorKind::NotFound));
        if crate::confined::is_symlink_refusal(&e) {
            return Err(self.not_allowed(what, path));
        }
        Err(io_err(e))
    }

    /// Checks that `path` would open (for early errors at create time); the file is closed.
    pub fn check_file(&self, what: &str, path: &Path, write: bool) -> Result<(), PolicyError> {
        self.open_file(what, path, write).map(drop)
    }

    /// Opens the existing directory `path` under the policy.
    pub fn open_dir(&self, what: &str, path: &Path) -> Result<Dir, PolicyError> {
        let mut last = None;
        for (root, rel) in self.candidates(what, path)? {
            let rel = if rel.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                rel
            };
            match Dir::open(root).and_then(|dir| dir.dir_beneath(&rel)) {
                Ok(dir) => return Ok(dir),
                Err(e) => last = Some(e),
            }
        }
        let e = last.unwrap_or_else(|| io::Error::from(io::ErrorKind::NotFound));
        if crate::confined::is_symlink_refusal(&e) {
            return Err(self.not_allowed(what, path));
        }
        Err(PolicyError::Io {
            what: what.into(),
            path: path.display().to_string(),
            source: e,
        })
    }

    /// Opens the directory `path` for a new snapshot: created here (mode 0700) when it does
    /// not exist, its parent existing under the policy; an existing one must be empty.
    pub fn create_dir(&self, what: &str, path: &Path) -> Result<Dir, PolicyError> {
        let io_err = |source: io::Error| PolicyError::Io {
            what: what.into(),
            path: path.display().to_string(),
            source,
        };
        let lexical = crate::jail::normalize(path);
        let name = match lexical.components().next_back() {
            Some(Component::Normal(name)) => name.to_string_lossy().into_owned(),
            _ => return Err(self.not_allowed(what, path)),
        };
        let parent = lexical.parent().unwrap_or(Path::new("/"));
        let dir = match self.open_dir(what, &lexical) {
            Ok(dir) => dir,
            Err(e) if e.is_not_found() => {
                // The parent is checked by its own path: the new directory is then made in it.
                self.candidates(what, &lexical)?;
                let parent = self.open_dir(what, parent)?;
                parent.create_subdir(&name, 0o700, false).map_err(io_err)?
            }
            Err(e) => return Err(e),
        };
        let entries = dir.entries().map_err(io_err)?;
        if !entries.is_empty() {
            return Err(io_err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "not empty: a snapshot goes into a new or empty directory",
            )));
        }
        Ok(dir)
    }
}

fn file_kind(file: &File) -> io::Result<&'static str> {
    use rustix::fs::FileType;
    let st = rustix::fs::fstat(file)?;
    Ok(match FileType::from_raw_mode(st.st_mode) {
        FileType::RegularFile => "a regular file",
        FileType::Directory => "a directory",
        FileType::BlockDevice => "a block device",
        FileType::CharacterDevice => "a character device",
        FileType::Fifo => "a FIFO",
        FileType::Socket => "a socket",
        _ => "a special file",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("husk-policy-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn only_regular_files_below_an_allowed_root_open() {
        let base = scratch("files");
        let root = base.join("images");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/disk.img"), b"disk").unwrap();
        std::fs::write(base.join("secret"), b"s").unwrap();
        symlink(base.join("secret"), root.join("escape")).unwrap();
        symlink("sub/disk.img", root.join("alias")).unwrap();
        let policy = PathPolicy::new(std::slice::from_ref(&root), &[]);
        assert!(policy
            .open_file("disk", &root.join("sub/disk.img"), true)
            .is_ok());
        assert!(policy.open_file("disk", &root.join("alias"), false).is_ok());
        let denied = |p: &Path| policy.open_file("disk", p, false).unwrap_err();
        assert!(denied(&root.join("escape")).is_denied());
        assert!(denied(&base.join("secret")).is_denied());
        assert!(denied(&root.join("../secret")).is_denied());
        assert!(denied(Path::new("/etc/shadow")).is_denied());
        assert!(denied(&root.join("missing")).is_not_found());
        let dir = denied(&root.join("sub"));
        assert!(
            dir.to_string().contains("a directory, not a regular file"),
            "{dir}"
        );
        assert!(matches!(
            policy.open_file("disk", Path::new("rel/disk"), false),
            Err(PolicyError::NotAbsolute { .. })
        ));
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn devices_open_only_when_allowed_one_by_one() {
        let none = PathPolicy::new(&[PathBuf::from("/dev")], &[]);
        let err = none
            .open_file("disk", Path::new("/dev/null"), false)
            .unwrap_err();
        assert!(err.to_string().contains("character device"), "{err}");
        let allowed = PathPolicy::new(&[], &[PathBuf::from("/dev/null")]);
        assert!(allowed
            .open_file("disk", Path::new("/dev/null"), false)
            .is_ok());
    }

    #[test]
    fn snapshot_directories_are_made_here_or_must_be_empty() {
        let base = scratch("dirs");
        let root = base.join("snaps");
        std::fs::create_dir_all(root.join("full")).unwrap();
        std::fs::write(root.join("full/x"), b"x").unwrap();
        std::fs::create_dir_all(base.join("elsewhere")).unwrap();
        symlink(base.join("elsewhere"), root.join("link")).unwrap();
        let policy = PathPolicy::new(std::slice::from_ref(&root), &[]);
        let made = policy.create_dir("dir", &root.join("new")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(root.join("new"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        drop(made);
        assert!(
            policy.create_dir("dir", &root.join("new")).is_ok(),
            "empty is fine"
        );
        assert!(policy.create_dir("dir", &root.join("full")).is_err());
        assert!(policy
            .create_dir("dir", &root.join("link"))
            .unwrap_err()
            .is_denied());
        assert!(policy.create_dir("dir", &root.join("link/sub")).is_err());
        assert!(policy
            .create_dir("dir", &base.join("out"))
            .unwrap_err()
            .is_denied());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
