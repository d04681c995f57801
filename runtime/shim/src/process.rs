//! One process of a container (its init process or an exec'd one): its OCI spec, its stdio
//! FIFOs from containerd, and its run as one huskd Exec stream.
//!
//! The stream carries everything: stdin, resizes and signals go in, output and the exit come
//! back. When the stream fails (the VMM died, huskd went away), the process is recorded as
//! exited with status 255 and the reason is logged, so containerd never waits forever.

use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use husk_proto::v1::husk_client::HuskClient;
use husk_proto::v1::{exec_request, exec_response, ExecRequest, ExecStart, ExecUser, WindowSize};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use crate::oci;

/// Exit status recorded when the process's end could not be observed (VM gone).
pub const LOST_EXIT_STATUS: u32 = 255;

/// How often the stdin thread looks whether the exec stream is still there.
const STDIN_POLL: rustix::time::Timespec = rustix::time::Timespec {
    tv_sec: 0,
    tv_nsec: 200_000_000,
};

/// Where a process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running { pid: u32 },
    Exited { status: u32, at: SystemTime },
}

/// containerd's stdio FIFO paths (empty: none).
#[derive(Debug, Clone, Default)]
pub struct Stdio {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("process already started")]
    AlreadyStarted,
    #[error("process already finished")]
    Finished,
    #[error("process not started")]
    NotStarted,
    #[error("{0}")]
    Exec(tonic::Status),
    #[error("huskd ended the exec stream before the process started")]
    NoStart,
}

/// A process: spec, stdio and state, shared by the ttrpc handlers and its pump task.
#[derive(Debug)]
pub struct Process {
    pub exec_id: String,
    /// The pod container it runs in (huskd AddContainer); empty: the VM's own root.
    pub container: String,
    pub spec: oci::Process,
    pub stdio: Stdio,
    status: watch::Sender<Status>,
    control: Mutex<Option<mpsc::Sender<ExecRequest>>>,
    /// The stdin FIFO, opened when the process was defined; taken by the start.
    stdin: Mutex<Option<OwnedFd>>,
}

/// What the pump reports once the process ended.
#[derive(Debug, Clone)]
pub struct Ended {
    /// The process's guest PID.
    pub pid: u32,
    pub status: u32,
    pub at: SystemTime,
    /// Why the end was not observed (stream error), if so.
    pub lost: Option<String>,
}

impl Process {
    pub fn new(exec_id: &str, container: &str, spec: oci::Process, stdio: Stdio) -> Arc<Self> {
        Arc::new(Self {
            exec_id: exec_id.to_string(),
            container: container.to_string(),
            spec,
            status: watch::channel(Status::Created).0,
            control: Mutex::new(None),
            stdin: Mutex::new(open_stdin(&stdio.stdin)),
            stdio,
        })
    }

    pub fn status(&self) -> Status {
        *self.status.borrow()
    }

    /// Waits until the process has exited; returns (status, time).
    pub async fn wait(&self) -> (u32, SystemTime) {
        let mut rx = self.status.subscribe();
        loop {
            if let Status::Exited { status, at } = *rx.borrow_and_update() {
                return (status, at);
            }
            if rx.changed().await.is_err() {
                return (LOST_EXIT_STATUS, SystemTime::now());
            }
        }
    }

    /// Records an exit that did not come from the guest (a kill before start, a lost VM).
    /// Returns false when an exit was already recorded.
    pub fn mark_exited(&self, status: u32) -> bool {
        let mut changed = false;
        self.status.send_if_modified(|s| {
            if matches!(s, Status::Exited { .. }) {
                return false;
            }
            *s = Status::Exited {
                status,
                at: SystemTime::now(),
            };
            changed = true;
            true
        });
        if changed {
            self.control_lock().take();
        }
        changed
    }

    fn control_lock(&self) -> std::sync::MutexGuard<'_, Option<mpsc::Sender<ExecRequest>>> {
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, msg: exec_request::Msg) -> Result<(), ProcessError> {
        match self.status() {
            Status::Created => return Err(ProcessError::NotStarted),
            Status::Exited { .. } => return Err(ProcessError::Finished),
            Status::Running { .. } => {}
        }
        let tx = self.control_lock().clone().ok_or(ProcessError::Finished)?;
        // try_send: a handler never waits on a stalled stream; 64 queued controls is plenty.
        tx.try_send(ExecRequest { msg: Some(msg) })
            .map_err(|_| ProcessError::Finished)
    }

    pub fn signal(&self, signal: u32) -> Result<(), ProcessError> {
        self.send(exec_request::Msg::Signal(signal as i32))
    }

    pub fn resize(&self, cols: u32, rows: u32) -> Result<(), ProcessError> {
        self.send(exec_request::Msg::Resize(WindowSize { rows, cols }))
    }

    pub fn close_stdin(&self) -> Result<(), ProcessError> {
        self.send(exec_request::Msg::CloseStdin(true))
    }

    /// Starts the process in VM `vm` and returns its guest PID; a task then pumps its stdio
    /// and calls `on_exit` once it ended.
    pub async fn start<F>(
        self: &Arc<Self>,
        client: &mut HuskClient<Channel>,
        vm: &str,
        on_exit: F,
    ) -> Result<u32, ProcessError>
    where
        F: FnOnce(Ended) + Send + 'static,
    {
        if self.status() != Status::Created {
            return Err(ProcessError::AlreadyStarted);
        }
        let (tx, rx) = mpsc::channel::<ExecRequest>(64);
        let start = ExecStart {
            vm: vm.to_string(),
            command: self.spec.args.clone(),
            env: self
                .spec
                .env
                .iter()
                .filter_map(|e| e.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            workdir: self.spec.cwd.clone(),
            tty: self.stdio.terminal,
            window: self
                .stdio
                .terminal
                .then_some(WindowSize { rows: 24, cols: 80 }),
            user: Some(ExecUser {
                uid: self.spec.user.uid,
                gid: self.spec.user.gid,
                additional_gids: self.spec.user.additional_gids.clone(),
            }),
            container: self.container.clone(),
        };
        let _ = tx
            .send(ExecRequest {
                msg: Some(exec_request::Msg::Start(start)),
            })
            .await;
        let mut responses = client
            .exec(ReceiverStream::new(rx))
            .await
            .map_err(ProcessError::Exec)?
            .into_inner();
        let pid = match responses.next().await {
            Some(Ok(r)) => match r.msg {
                Some(exec_response::Msg::StartedPid(pid)) => pid,
                _ => return Err(ProcessError::NoStart),
            },
            Some(Err(status)) => return Err(ProcessError::Exec(status)),
            None => return Err(ProcessError::NoStart),
        };
        *self.control_lock() = Some(tx.clone());
        self.status.send_replace(Status::Running { pid });
        let fifo = self.stdin.lock().unwrap_or_else(|p| p.into_inner()).take();
        start_stdin(fifo, tx);
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let ended = this.pump(pid, responses).await;
            let recorded = this.mark_exited(ended.status);
            if recorded {
                on_exit(ended);
            }
        });
        Ok(pid)
    }

    /// Copies output to the FIFOs until the exit (or the stream's failure).
    async fn pump(
        &self,
        pid: u32,
        mut responses: tonic::Streaming<husk_proto::v1::ExecResponse>,
    ) -> Ended {
        let mut stdout = open_output(&self.stdio.stdout);
        let mut stderr = open_output(&self.stdio.stderr);
        loop {
            match responses.next().await {
                Some(Ok(r)) => match r.msg {
                    Some(exec_response::Msg::Stdout(d)) => write_out(&mut stdout, &d).await,
                    Some(exec_response::Msg::Stderr(d)) => write_out(&mut stderr, &d).await,
                    Some(exec_response::Msg::Exit(exit)) => {
                        return Ended {
                            pid,
                            status: exit.code as u32,
                            at: SystemTime::now(),
                            lost: None,
                        }
                    }
                    _ => {}
                },
                Some(Err(status)) => {
                    return Ended {
                        pid,
                        status: LOST_EXIT_STATUS,
                        at: SystemTime::now(),
                        lost: Some(status.message().to_string()),
                    }
                }
                None => {
                    return Ended {
                        pid,
                        status: LOST_EXIT_STATUS,
                        at: SystemTime::now(),
                        lost: Some("the exec stream ended without an exit".into()),
                    }
                }
            }
        }
    }
}

/// Opens an output FIFO for writing. Read-write, so the open never blocks and never fails for
/// want of a reader (Linux allows it on FIFOs).
fn open_output(path: &str) -> Option<tokio::net::unix::pipe::Sender> {
    if path.is_empty() {
        return None;
    }
    match tokio::net::unix::pipe::OpenOptions::new()
        .read_write(true)
        .open_sender(path)
    {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!("cannot open output FIFO {path}: {e}");
            None
        }
    }
}

async fn write_out(out: &mut Option<tokio::net::unix::pipe::Sender>, data: &[u8]) {
    if let Some(w) = out {
        if w.write_all(data).await.is_err() {
            *out = None;
        }
    }
}

/// Opens the stdin FIFO for reading at once (Create/Exec time), without blocking: from then on
/// a reader exists, so what containerd writes before the process starts waits in the pipe
/// instead of being lost when its writer closes early.
fn open_stdin(path: &str) -> Option<OwnedFd> {
    if path.is_empty() {
        return None;
    }
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)
    {
        Ok(f) => Some(OwnedFd::from(f)),
        Err(e) => {
            tracing::warn!("cannot open stdin FIFO {path}: {e}");
            None
        }
    }
}

/// Feeds the stdin FIFO into the stream on a thread; the writer's close becomes the
/// process's end of file. No FIFO: stdin is closed at once, as with /dev/null.
///
/// The FIFO was opened before any writer existed, so Linux reports it readable (POLLIN or
/// POLLHUP) only once there is data or a writer came and went: a read of 0 after such a
/// wake-up is the real end. The thread gives up once the exec stream is gone.
fn start_stdin(fd: Option<OwnedFd>, tx: mpsc::Sender<ExecRequest>) {
    use rustix::event::{poll, PollFd, PollFlags};
    use rustix::io::Errno;
    let msg = |m| ExecRequest { msg: Some(m) };
    let Some(fd) = fd else {
        let _ = tx.try_send(msg(exec_request::Msg::CloseStdin(true)));
        return;
    };
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            if tx.is_closed() {
                return;
            }
            let mut fds = [PollFd::new(&fd, PollFlags::IN)];
            let ready = poll(&mut fds, Some(&STDIN_POLL));
            if !ready.is_ok_and(|n| n > 0) {
                continue; // timeout or EINTR: look at the stream again
            }
            match rustix::io::read(&fd, &mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let chunk = buf[..n].to_vec();
                    if tx
                        .blocking_send(msg(exec_request::Msg::Stdin(chunk)))
                        .is_err()
                    {
                        return;
                    }
                }
                Err(Errno::AGAIN | Errno::INTR) => {}
                Err(_) => break,
            }
        }
        let _ = tx.blocking_send(msg(exec_request::Msg::CloseStdin(true)));
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proc() -> Arc<Process> {
        Process::new("", "", oci::Process::default(), Stdio::default())
    }

    #[tokio::test]
    async fn controls_before_start_and_after_exit_are_refused() {
        let p = proc();
        assert!(matches!(p.signal(9), Err(ProcessError::NotStarted)));
        assert!(p.mark_exited(137));
        assert!(!p.mark_exited(1), "the first exit wins");
        assert!(matches!(p.signal(9), Err(ProcessError::Finished)));
        assert!(matches!(p.status(), Status::Exited { status: 137, .. }));
        assert_eq!(p.wait().await.0, 137);
    }

    #[tokio::test]
    async fn wait_returns_when_the_exit_is_recorded_later() {
        let p = proc();
        let waiter = {
            let p = Arc::clone(&p);
            tokio::spawn(async move { p.wait().await.0 })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        p.mark_exited(3);
        assert_eq!(waiter.await.unwrap(), 3);
    }

    fn fifo(tag: &str) -> String {
        let path =
            std::env::temp_dir().join(format!("husk-shim-fifo-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &path,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        path.display().to_string()
    }

    #[tokio::test]
    async fn stdin_written_and_closed_before_the_start_is_delivered_then_eof() {
        let path = fifo("early");
        let reader = open_stdin(&path);
        assert!(reader.is_some());
        // containerd writes and closes before the process starts.
        let mut w = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        std::io::Write::write_all(&mut w, b"abc\n").unwrap();
        drop(w);
        let (tx, mut rx) = mpsc::channel(8);
        start_stdin(reader, tx);
        let first = rx.recv().await.unwrap().msg;
        assert_eq!(first, Some(exec_request::Msg::Stdin(b"abc\n".to_vec())));
        let second = rx.recv().await.unwrap().msg;
        assert_eq!(second, Some(exec_request::Msg::CloseStdin(true)));
        std::fs::remove_file(&path).unwrap();
    }

    #[tokio::test]
    async fn no_writer_yet_is_not_an_eof_and_no_fifo_is_one() {
        let path = fifo("late");
        let (tx, mut rx) = mpsc::channel(8);
        start_stdin(open_stdin(&path), tx);
        let quiet = tokio::time::timeout(std::time::Duration::from_millis(500), rx.recv()).await;
        assert!(quiet.is_err(), "EOF before any writer: {quiet:?}");
        drop(rx); // the stream ends: the thread gives up
        let (tx, mut rx) = mpsc::channel(8);
        start_stdin(None, tx);
        assert_eq!(
            rx.recv().await.unwrap().msg,
            Some(exec_request::Msg::CloseStdin(true))
        );
        std::fs::remove_file(&path).unwrap();
    }
}
