//! The control socket's listening end: created with mode 0600 (only the VMM's user may connect),
//! replacing a stale socket a killed VMM left behind but nothing else, and removed again when
//! dropped (only if the path still names this socket).

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Errors creating the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ApiSocketError {
    /// Something other than a socket is in the way.
    #[error("--api-sock {0}: the path exists and is not a socket")]
    NotASocket(PathBuf),
    /// A live process (another VMM?) listens there.
    #[error("--api-sock {0}: another process is listening on this socket")]
    InUse(PathBuf),
    /// The existing path could not be checked or removed.
    #[error("--api-sock {0}: cannot replace the existing socket")]
    Stale(PathBuf, #[source] io::Error),
    /// bind/listen failed.
    #[error("--api-sock {0}: cannot listen")]
    Listen(PathBuf, #[source] io::Error),
}

/// A listening control socket; dropping it removes the path.
#[derive(Debug)]
pub struct ApiSocket {
    listener: UnixListener,
    path: PathBuf,
    /// (device, inode) of the socket file this VMM created.
    identity: (u64, u64),
}

impl ApiSocket {
    /// Listens on `path` (non-blocking), mode 0600.
    pub fn bind(path: &Path) -> Result<Self, ApiSocketError> {
        let failed = |e| ApiSocketError::Listen(path.into(), e);
        remove_stale(path)?;
        let listener = bind_private(path).map_err(failed)?;
        let identity = std::fs::symlink_metadata(path)
            .map(|m| (m.dev(), m.ino()))
            .and_then(|id| listener.set_nonblocking(true).map(|()| id));
        match identity {
            Ok(identity) => Ok(ApiSocket {
                listener,
                path: path.to_path_buf(),
                identity,
            }),
            Err(e) => {
                let _ = std::fs::remove_file(path);
                Err(failed(e))
            }
        }
    }

    /// Where it listens.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The listener (non-blocking).
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }
}

impl Drop for ApiSocket {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.file_type().is_socket() && (m.dev(), m.ino()) == self.identity);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Removes `path` if it is a socket nobody listens on; refuses anything else.
fn remove_stale(path: &Path) -> Result<(), ApiSocketError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(ApiSocketError::Stale(path.into(), e)),
    };
    if !meta.file_type().is_socket() {
        return Err(ApiSocketError::NotASocket(path.into()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ApiSocketError::InUse(path.into())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            std::fs::remove_file(path).map_err(|e| ApiSocketError::Stale(path.into(), e))
        }
        Err(e) => Err(ApiSocketError::Stale(path.into(), e)),
    }
}

/// Binds under umask 0177 so the socket never exists with looser permissions than 0600. The
/// umask is process-wide: the VMM binds before it starts any thread that creates files.
fn bind_private(path: &Path) -> io::Result<UnixListener> {
    // SAFETY: umask only swaps the process's file-creation mask; it cannot fail.
    let previous = unsafe { libc::umask(0o177) };
    let result = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(previous) };
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::ScratchDir;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn creates_a_private_socket_and_removes_it_when_dropped() {
        let dir = ScratchDir::new("api-socket");
        let path = dir.path().join("api.sock");
        let socket = ApiSocket::bind(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        UnixStream::connect(&path).unwrap();
        drop(socket);
        assert!(!path.exists());
    }

    #[test]
    fn replaces_a_stale_socket_but_not_a_live_one_or_a_file() {
        let dir = ScratchDir::new("api-socket-stale");
        let path = dir.path().join("api.sock");
        drop(UnixListener::bind(&path).unwrap()); // std leaves the file: a stale socket
        assert!(path.exists());
        let socket = ApiSocket::bind(&path).unwrap();
        assert!(matches!(
            ApiSocket::bind(&path),
            Err(ApiSocketError::InUse(_))
        ));
        drop(socket);

        let file = dir.path().join("plain");
        std::fs::write(&file, b"keep me").unwrap();
        let err = ApiSocket::bind(&file).unwrap_err();
        assert!(matches!(err, ApiSocketError::NotASocket(_)), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    }

    #[test]
    fn does_not_remove_a_socket_that_replaced_it() {
        let dir = ScratchDir::new("api-socket-replaced");
        let path = dir.path().join("api.sock");
        let socket = ApiSocket::bind(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let _other = UnixListener::bind(&path).unwrap();
        drop(socket);
        assert!(path.exists(), "another process's socket was removed");
    }
}
