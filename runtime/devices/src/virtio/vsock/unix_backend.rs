//! The host side of vsock: Unix sockets, multiplexed on one epoll fd that the VMM's event loop
//! watches (the Firecracker-style protocol).
//!
//! - Host-initiated: a client connects to the listening socket at `uds_path` and writes
//!   `CONNECT <port>\n`; the device then asks the guest for `<port>`. The line is read here,
//!   one byte at a time so that nothing after it is consumed.
//! - Guest-initiated: a guest connection to host port P is a connection to `<uds_path>_P`,
//!   made non-blocking so a full backlog refuses instead of stalling the event loop.
//!
//! Every socket is registered edge-triggered with a token that is never reused, so an event
//! cannot reach the wrong socket after an fd number is recycled.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{self, ErrorKind, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// Token of the listening socket; connection tokens start after it.
const LISTENER_TOKEN: u64 = 0;
/// Size of `sockaddr_un.sun_path` (108 on Linux).
const SUN_PATH_LEN: usize =
    std::mem::size_of::<libc::sockaddr_un>() - std::mem::offset_of!(libc::sockaddr_un, sun_path);
/// Clients that connected but have not finished their `CONNECT` line; beyond this the oldest
/// is dropped, so idle clients cannot pin memory or fds.
pub const MAX_HANDSHAKES: usize = 64;
/// `CONNECT 4294967295\n` is 19 bytes; a longer line is refused.
const MAX_LINE: usize = 32;
/// Events taken per epoll_wait.
const EVENT_BATCH: usize = 64;
/// Clients accepted per listener event: a client flood cannot hold the event loop.
const ACCEPT_BUDGET: usize = 64;

/// Why the Unix backend could not start.
#[derive(Debug, thiserror::Error)]
pub enum UnixBackendError {
    #[error("cannot create the vsock epoll fd")]
    Epoll(#[source] io::Error),
    #[error("cannot listen on vsock socket {0}")]
    Bind(PathBuf, #[source] io::Error),
}

/// Every socket is watched edge-triggered for these.
const SOCKET_EVENTS: EventSet = EventSet::IN
    .union(EventSet::OUT)
    .union(EventSet::READ_HANG_UP)
    .union(EventSet::EDGE_TRIGGERED);

/// Readiness of one registered socket.
#[derive(Debug, Clone, Copy)]
pub struct Ready {
    pub token: u64,
    /// Readable (writability needs no flag: every event retries pending writes).
    pub readable: bool,
    /// Hang-up or error: the peer is gone.
    pub hup: bool,
}

/// What servicing a readiness event came to.
pub enum Serviced {
    /// The token is not the backend's: it belongs to a connection.
    NotMine,
    /// Handled (accepted clients, read part of a line, dropped a client).
    Done,
    /// A client finished its handshake and asks for guest port `port`; its socket stays
    /// registered under `token`.
    Connect {
        stream: UnixStream,
        token: u64,
        port: u32,
    },
}

struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
}

/// The listener, the clients in handshake, and the epoll fd every host socket is on.
pub struct UnixBackend {
    epoll: Epoll,
    listener: UnixListener,
    path: PathBuf,
    handshakes: BTreeMap<u64, Handshake>,
    next_token: u64,
}

impl UnixBackend {
    /// Listens on `path` (which must not exist yet).
    pub fn new(path: &Path) -> Result<Self, UnixBackendError> {
        let epoll = Epoll::new().map_err(UnixBackendError::Epoll)?;
        let bind_err = |e| UnixBackendError::Bind(path.to_owned(), e);
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        let backend = Self {
            epoll,
            listener,
            path: path.to_owned(),
            handshakes: BTreeMap::new(),
            next_token: LISTENER_TOKEN + 1,
        };
        backend.listener.set_nonblocking(true).map_err(bind_err)?;
        backend
            .add(backend.listener.as_raw_fd(), LISTENER_TOKEN)
            .map_err(bind_err)?;
        Ok(backend)
    }

    /// The epoll fd the VMM watches.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(SOCKET_EVENTS, token),
        )
    }

    /// Re-arms the edge-triggered listener: EPOLL_CTL_MOD reports it again if clients are still
    /// queued, so clients left by [`ACCEPT_BUDGET`] get their turn on the next call.
    fn rearm_listener(&self) {
        let event = EpollEvent::new(SOCKET_EVENTS, LISTENER_TOKEN);
        let fd = self.listener.as_raw_fd();
        if let Err(e) = self.epoll.ctl(ControlOperation::Modify, fd, event) {
            crate::warn_limited!("vsock: cannot re-arm the listener: {e}");
        }
    }

    /// Registers a connection's socket and returns its token.
    pub fn register(&mut self, stream: &UnixStream) -> io::Result<u64> {
        let token = self.next_token;
        self.next_token += 1;
        self.add(stream.as_raw_fd(), token)?;
        Ok(token)
    }

    /// Takes a socket off the epoll fd before it is closed.
    pub fn deregister(&self, stream: &UnixStream) {
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            stream.as_raw_fd(),
            EpollEvent::default(),
        );
    }

    /// Ready sockets, without blocking.
    pub fn poll(&self) -> io::Result<Vec<Ready>> {
        let mut events = vec![EpollEvent::default(); EVENT_BATCH];
        let n = loop {
            match self.epoll.wait(0, &mut events) {
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                other => break other?,
            }
        };
        Ok(events[..n]
            .iter()
            .map(|e| {
                let set = e.event_set();
                Ready {
                    token: e.data(),
                    readable: set.contains(EventSet::IN),
                    hup: set.intersects(EventSet::HANG_UP | EventSet::ERROR),
                }
            })
            .collect())
    }

    /// Services one ready socket if it is the backend's (the listener or a client in
    /// handshake).
    pub fn service(&mut self, ready: &Ready, accepting: bool) -> Serviced {
        if ready.token == LISTENER_TOKEN {
            self.accept_all(accepting);
            return Serviced::Done;
        }
        let Some(mut hs) = self.handshakes.remove(&ready.token) else {
            return Serviced::NotMine;
        };
        match read_line(&mut hs) {
            LineState::Partial if !ready.hup => {
                self.handshakes.insert(ready.token, hs);
            }
            LineState::Done(line) => match parse_connect(&line) {
                Some(port) => {
                    return Serviced::Connect {
                        stream: hs.stream,
                        token: ready.token,
                        port,
                    }
                }
                None => {
                    crate::warn_limited!("vsock: host client sent a bad handshake line");
                    self.deregister(&hs.stream);
                }
            },
            LineState::Partial | LineState::Failed => self.deregister(&hs.stream),
        }
        Serviced::Done
    }

    /// Accepts pending clients (edge-triggered: until EAGAIN, or [`ACCEPT_BUDGET`] and a
    /// re-arm). While the device is not active, clients are closed at once: there is no guest
    /// to connect them to.
    fn accept_all(&mut self, accepting: bool) {
        let mut accepted = 0;
        loop {
            if accepted >= ACCEPT_BUDGET {
                return self.rearm_listener();
            }
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    // EMFILE and friends: the client stays queued until the next edge.
                    crate::warn_limited!("vsock: cannot accept a host client: {e}");
                    return;
                }
            };
            accepted += 1;
            if !accepting || stream.set_nonblocking(true).is_err() {
                continue;
            }
            if self.handshakes.len() >= MAX_HANDSHAKES {
                if let Some((_, oldest)) = self.handshakes.pop_first() {
                    self.deregister(&oldest.stream);
                }
            }
            match self.register(&stream) {
                Ok(token) => {
                    let hs = Handshake {
                        stream,
                        line: Vec::new(),
                    };
                    self.handshakes.insert(token, hs);
                }
                Err(e) => crate::warn_limited!("vsock: cannot watch a host client: {e}"),
            }
        }
    }

    /// Closes every client still in handshake.
    pub fn clear_handshakes(&mut self) {
        for (_, hs) in std::mem::take(&mut self.handshakes) {
            self.deregister(&hs.stream);
        }
    }

    /// Clients in handshake (tests, metrics).
    pub fn handshake_count(&self) -> usize {
        self.handshakes.len()
    }

    /// Connects to the host service behind guest-visible host port `port`: `<uds_path>_<port>`.
    pub fn connect_port(&self, port: u32) -> io::Result<UnixStream> {
        let mut path = OsString::from(self.path.as_os_str());
        path.push(format!("_{port}"));
        connect_nonblocking(Path::new(&path))
    }
}

impl Drop for UnixBackend {
    fn drop(&mut self) {
        // The device created the socket file; leave no stale one for the next VMM.
        let _ = std::fs::remove_file(&self.path);
    }
}

enum LineState {
    Partial,
    Done(Vec<u8>),
    Failed,
}

fn read_line(hs: &mut Handshake) -> LineState {
    let mut byte = [0u8; 1];
    loop {
        match hs.stream.read(&mut byte) {
            Ok(0) => return LineState::Failed,
            Ok(_) if byte[0] == b'\n' => return LineState::Done(std::mem::take(&mut hs.line)),
            Ok(_) if hs.line.len() >= MAX_LINE => return LineState::Failed,
            Ok(_) => hs.line.push(byte[0]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return LineState::Partial,
            Err(_) => return LineState::Failed,
        }
    }
}

/// `CONNECT <port>` with a decimal port; nothing else is accepted.
fn parse_connect(line: &[u8]) -> Option<u32> {
    let digits = line.strip_prefix(b"CONNECT ")?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// connect(2) on a non-blocking Unix stream socket: it completes at once or fails (EAGAIN when
/// the listener's backlog is full), never blocks.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    // Keep a terminating NUL (sun_path is 108 bytes).
    if path.as_os_str().as_bytes().len() >= SUN_PATH_LEN {
        return Err(io::Error::new(
            ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    let addr = SocketAddrUnix::new(path)?;
    // The same socket(2) arguments the event loop's seccomp filter allows.
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::net::connect(&fd, &addr)?;
    Ok(UnixStream::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines_are_parsed_strictly() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295"), Some(u32::MAX));
        assert_eq!(parse_connect(b"CONNECT 4294967296"), None);
        assert_eq!(parse_connect(b"CONNECT "), None);
        assert_eq!(parse_connect(b"CONNECT -1"), None);
        assert_eq!(parse_connect(b"CONNECT +1"), None);
        assert_eq!(parse_connect(b"connect 1"), None);
        assert_eq!(parse_connect(b"CONNECT 1 "), None);
    }
}
