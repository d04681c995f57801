//! The "vmm-api" thread: one poll loop over the listening socket, a shutdown event and up to
//! [`Limits::max_connections`] clients. Each connection carries framed `VmmRequest`s answered one
//! at a time with framed `VmmResponse`s.
//!
//! Nothing a client does can stop the others being served or hang the VMM: sockets are
//! non-blocking; a frame that is not complete within [`Limits::request_timeout`] of its first
//! byte drops the connection; an oversized length gets an `error` response and the connection is
//! closed; a body that is not a `VmmRequest` gets an `error` response and the connection stays
//! usable; a client that does not read its responses is dropped; when all slots are taken, the
//! connection idle the longest is closed to make room. Idle connections stay open otherwise.
//!
//! System calls of this thread: poll, accept4, recvmsg (a request may carry one fd, see
//! [`super::fd_reader`]), write, close; futex, tgkill and getpid (pausing kicks vCPU
//! threads); the allocator's mmap/munmap/madvise/brk.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use husk_proto::frame;
use husk_proto::vmm::{VmmRequest, VmmResponse};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::fd_reader::{FdReader, ReceivedFds};
use super::frame_reader::{FrameReader, Progress};
use super::socket::ApiSocket;
use super::{error_response, handle_request, VmControl};
use crate::seccomp::{Filters, ThreadKind};

/// Bounds on what clients can make the server hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Longest time from a request's first byte to its last.
    pub request_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 16,
            request_timeout: Duration::from_secs(5),
        }
    }
}

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    /// The shutdown event could not be created.
    #[error("cannot create the control socket's shutdown event")]
    EventFd(#[source] io::Error),
    /// The thread could not be spawned.
    #[error("cannot start the control socket thread")]
    Spawn(#[source] io::Error),
}

/// The running "vmm-api" thread.
pub struct ApiServer {
    shutdown: EventFd,
    thread: JoinHandle<ApiSocket>,
}

impl ApiServer {
    /// Serves `socket` with requests against `vm` until [`shutdown`](Self::shutdown).
    pub fn start(
        socket: ApiSocket,
        vm: Box<dyn VmControl + Send>,
        limits: Limits,
        seccomp: Arc<Filters>,
    ) -> Result<Self, ApiServerError> {
        let shutdown = EventFd::new(EFD_NONBLOCK).map_err(ApiServerError::EventFd)?;
        let shutdown_copy = shutdown.try_clone().map_err(ApiServerError::EventFd)?;
        let thread = std::thread::Builder::new()
            .name("vmm-api".into())
            .spawn(move || {
                // Confined before the first request is read; unconfined, it serves nothing.
                match seccomp.install(ThreadKind::Api) {
                    Ok(()) => serve(&socket, &shutdown_copy, vm.as_ref(), limits),
                    Err(e) => log::error!("control socket: {e}; no request is served"),
                }
                socket
            })
            .map_err(ApiServerError::Spawn)?;
        Ok(ApiServer { shutdown, thread })
    }

    /// Stops the thread, closes every connection and removes the socket path (here, on the
    /// calling thread).
    pub fn shutdown(self) {
        let _ = self.shutdown.write(1);
        match self.thread.join() {
            Ok(socket) => drop(socket),
            Err(_) => log::error!("the control socket thread panicked"),
        }
    }
}

/// One client.
struct Connection {
    stream: UnixStream,
    frame: FrameReader,
    /// Descriptors received with the request being read.
    fds: ReceivedFds,
    last_active: Instant,
}

fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

fn serve(socket: &ApiSocket, shutdown: &EventFd, vm: &dyn VmControl, limits: Limits) {
    let mut conns: Vec<Connection> = Vec::new();
    loop {
        let mut fds = Vec::with_capacity(2 + conns.len());
        fds.push(pollfd(shutdown.as_raw_fd()));
        fds.push(pollfd(socket.listener().as_raw_fd()));
        fds.extend(conns.iter().map(|c| pollfd(c.stream.as_raw_fd())));
        let timeout = poll_timeout(&conns, limits.request_timeout, Instant::now());
        // SAFETY: `fds` is an array of `fds.len()` initialised pollfds, alive for the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            log::error!("control socket: poll failed: {e}; no more requests are served");
            return;
        }
        if fds[0].revents != 0 {
            return;
        }
        // Backwards, so that swap_remove only moves connections already looked at.
        for i in (0..conns.len()).rev() {
            if fds[2 + i].revents != 0 && !serve_ready(&mut conns[i], vm) {
                conns.swap_remove(i);
            }
        }
        let now = Instant::now();
        conns.retain(|c| {
            let late = c
                .frame
                .started()
                .is_some_and(|t| now.duration_since(t) >= limits.request_timeout);
            if late {
                log::debug!(
                    "control socket: dropping a client whose request did not arrive in time"
                );
            }
            !late
        });
        if fds[1].revents != 0 {
            accept_all(socket, &mut conns, limits.max_connections);
        }
    }
}

/// Milliseconds until the earliest request deadline, or -1 (none).
fn poll_timeout(conns: &[Connection], request_timeout: Duration, now: Instant) -> i32 {
    conns
        .iter()
        .filter_map(|c| c.frame.started())
        .map(|t| (t + request_timeout).saturating_duration_since(now))
        .min()
        .map_or(-1, |d| {
            i32::try_from(d.as_millis().saturating_add(1)).unwrap_or(i32::MAX)
        })
}

fn accept_all(socket: &ApiSocket, conns: &mut Vec<Connection>, max_connections: usize) {
    loop {
        // SAFETY: accept4 on the listening socket this thread owns; the peer address is not
        // wanted, so both address pointers are null.
        let fd = unsafe {
            libc::accept4(
                socket.listener().as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR | libc::ECONNABORTED) => continue,
                Some(libc::EAGAIN) => {}
                _ => log::warn!("control socket: accept failed: {e}"),
            }
            return;
        }
        // SAFETY: accept4 returned a new descriptor that nothing else owns.
        let stream = unsafe { UnixStream::from_raw_fd(fd) };
        if conns.len() >= max_connections {
            if let Some(idlest) = (0..conns.len()).min_by_key(|&i| conns[i].last_active) {
                log::debug!("control socket: too many clients, closing the idlest");
                conns.swap_remove(idlest);
            }
        }
        conns.push(Connection {
            stream,
            frame: FrameReader::default(),
            fds: ReceivedFds::default(),
            last_active: Instant::now(),
        });
    }
}

/// Reads from a ready connection and answers the request it completes, if any. Returns
/// whether to keep the connection.
fn serve_ready(conn: &mut Connection, vm: &dyn VmControl) -> bool {
    let now = Instant::now();
    conn.last_active = now;
    let mut reader = FdReader {
        stream: &conn.stream,
        fds: &mut conn.fds,
    };
    let body = match conn.frame.read_from(&mut reader, now) {
        Ok(Progress::Frame(body)) => body,
        Ok(Progress::Pending) => return true,
        Ok(Progress::Closed) => return false,
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            // An oversized length: the rest of the stream cannot be framed any more.
            let _ = send(&conn.stream, &error_response(e.to_string()));
            return false;
        }
        Err(e) => {
            log::debug!("control socket: dropping a client: {e}");
            return false;
        }
    };
    // Taken whatever the body holds: a descriptor never outlives its request.
    let fds = conn.fds.take();
    let response = match frame::decode::<VmmRequest>(&body) {
        Ok(request) => handle_request(&request, fds, vm),
        Err(e) => error_response(format!("malformed request: {e}")),
    };
    match send(&conn.stream, &response) {
        Ok(()) => true,
        Err(e) => {
            log::debug!("control socket: cannot answer a client: {e}");
            false
        }
    }
}

/// Writes one response; a client whose socket buffer is full (it does not read) is an error.
fn send(stream: &UnixStream, response: &VmmResponse) -> io::Result<()> {
    let bytes = frame::encode(response)?;
    let mut writer = stream;
    writer.write_all(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::tests::{request, FakeVm};
    use crate::test_utils::ScratchDir;
    use husk_proto::vmm::{info, vmm_request, vmm_response, Describe, Pause, Stop};
    use std::io::Read;
    use std::path::PathBuf;
    use std::sync::Arc;

    const TIMEOUT: Duration = Duration::from_secs(10);

    /// A FakeVm the test can also look at, behind the server.
    struct Shared(Arc<FakeVm>);

    impl VmControl for Shared {
        fn describe(&self) -> husk_proto::vmm::Info {
            self.0.describe()
        }
        fn pause(&self) -> Result<husk_proto::vmm::Info, crate::api::ControlError> {
            self.0.pause()
        }
        fn resume(&self) -> Result<husk_proto::vmm::Info, crate::api::ControlError> {
            self.0.resume()
        }
        fn stop(&self) -> husk_proto::vmm::Info {
            self.0.stop()
        }
    }

    struct Running {
        _dir: ScratchDir,
        path: PathBuf,
        vm: Arc<FakeVm>,
        server: ApiServer,
    }

    fn start(limits: Limits) -> Running {
        let dir = ScratchDir::new("api-server");
        let path = dir.path().join("api.sock");
        let vm = Arc::new(FakeVm::default());
        let socket = ApiSocket::bind(&path).unwrap();
        let server = ApiServer::start(
            socket,
            Box::new(Shared(vm.clone())),
            limits,
            Arc::new(Filters::off()),
        )
        .unwrap();
        Running {
            _dir: dir,
            path,
            vm,
            server,
        }
    }

    fn connect(path: &PathBuf) -> UnixStream {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s
    }

    fn call(stream: &mut UnixStream, msg: vmm_request::Msg) -> vmm_response::Msg {
        frame::write(stream, &request(msg)).unwrap();
        read_response(stream)
    }

    fn read_response(stream: &mut UnixStream) -> vmm_response::Msg {
        frame::read::<VmmResponse, _>(stream)
            .unwrap()
            .expect("a response")
            .msg
            .expect("a message")
    }

    fn state(msg: &vmm_response::Msg) -> info::State {
        match msg {
            vmm_response::Msg::Info(i) => i.state(),
            vmm_response::Msg::Error(e) => panic!("error response: {e}"),
            other => panic!("unexpected response {other:?}"),
        }
    }

    fn error(msg: vmm_response::Msg) -> String {
        match msg {
            vmm_response::Msg::Error(e) => e,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    fn describe() -> vmm_request::Msg {
        vmm_request::Msg::Describe(Describe {})
    }

    #[test]
    fn serves_requests_on_one_connection_and_on_later_ones() {
        let r = start(Limits::default());
        let mut c = connect(&r.path);
        assert_eq!(state(&call(&mut c, describe())), info::State::Running);
        assert_eq!(
            state(&call(&mut c, vmm_request::Msg::Pause(Pause {}))),
            info::State::Paused
        );
        let e = error(call(&mut c, vmm_request::Msg::Pause(Pause {})));
        assert!(e.contains("already paused"), "{e}");
        drop(c);
        let mut c = connect(&r.path);
        assert_eq!(state(&call(&mut c, describe())), info::State::Paused);
        assert_eq!(
            state(&call(&mut c, vmm_request::Msg::Stop(Stop {}))),
            info::State::Stopping
        );
        assert!(r.vm.state.lock().unwrap().1);
        r.server.shutdown();
        assert!(!r.path.exists(), "the socket was not removed");
    }

    #[test]
    fn an_idle_client_does_not_block_others() {
        let r = start(Limits::default());
        let _idle = connect(&r.path);
        let mut half = connect(&r.path);
        half.write_all(&[0, 0]).unwrap();
        let mut c = connect(&r.path);
        let started = Instant::now();
        assert_eq!(state(&call(&mut c, describe())), info::State::Running);
        assert!(started.elapsed() < Duration::from_secs(2));
        r.server.shutdown();
    }

    #[test]
    fn pipelined_requests_are_answered_in_order() {
        let r = start(Limits::default());
        let mut c = connect(&r.path);
        let mut wire = frame::encode(&request(describe())).unwrap();
        wire.extend(frame::encode(&request(vmm_request::Msg::Pause(Pause {}))).unwrap());
        wire.extend(frame::encode(&request(describe())).unwrap());
        c.write_all(&wire).unwrap();
        assert_eq!(state(&read_response(&mut c)), info::State::Running);
        assert_eq!(state(&read_response(&mut c)), info::State::Paused);
        assert_eq!(state(&read_response(&mut c)), info::State::Paused);
        r.server.shutdown();
    }

    #[test]
    fn malformed_and_oversized_frames_get_errors_not_a_crash() {
        let r = start(Limits::default());
        let mut c = connect(&r.path);
        c.write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff]).unwrap();
        let e = error(read_response(&mut c));
        assert!(e.contains("malformed request"), "{e}");
        // Still usable after a bad body.
        assert_eq!(state(&call(&mut c, describe())), info::State::Running);
        c.write_all(&[0, 0, 0, 0]).unwrap();
        let e = error(read_response(&mut c));
        assert!(e.contains("empty or unknown request"), "{e}");

        c.write_all(&[0xff, 0xff, 0xff, 0xff]).unwrap();
        let e = error(read_response(&mut c));
        assert!(e.contains("over the"), "{e}");
        let mut rest = Vec::new();
        assert_eq!(
            c.read_to_end(&mut rest).unwrap(),
            0,
            "connection not closed"
        );

        let mut c = connect(&r.path);
        assert_eq!(state(&call(&mut c, describe())), info::State::Running);
        r.server.shutdown();
    }

    #[test]
    fn a_request_that_never_completes_is_dropped_after_the_timeout() {
        let r = start(Limits {
            request_timeout: Duration::from_millis(100),
            ..Limits::default()
        });
        let mut slow = connect(&r.path);
        slow.write_all(&[0, 0, 0, 8, 1]).unwrap();
        let started = Instant::now();
        let mut rest = Vec::new();
        assert_eq!(slow.read_to_end(&mut rest).unwrap(), 0);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(90) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
        r.server.shutdown();
    }

    #[test]
    fn the_idlest_connection_makes_room_when_all_slots_are_taken() {
        let r = start(Limits {
            max_connections: 2,
            ..Limits::default()
        });
        let mut first = connect(&r.path);
        assert_eq!(state(&call(&mut first, describe())), info::State::Running);
        let mut second = connect(&r.path);
        assert_eq!(state(&call(&mut second, describe())), info::State::Running);
        assert_eq!(state(&call(&mut first, describe())), info::State::Running);
        let mut third = connect(&r.path);
        assert_eq!(state(&call(&mut third, describe())), info::State::Running);
        // `second` was idle the longest.
        let mut rest = Vec::new();
        assert_eq!(second.read_to_end(&mut rest).unwrap(), 0);
        assert_eq!(state(&call(&mut first, describe())), info::State::Running);
        r.server.shutdown();
    }

    #[test]
    fn shutdown_ends_the_thread_with_clients_connected() {
        let r = start(Limits::default());
        let mut c = connect(&r.path);
        assert_eq!(state(&call(&mut c, describe())), info::State::Running);
        r.server.shutdown();
        let mut rest = Vec::new();
        assert_eq!(c.read_to_end(&mut rest).unwrap(), 0);
        assert!(!r.path.exists());
    }
}
