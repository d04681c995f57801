//! A small blocking client of the guest agent (husk.agent.v1) through the VMM's vsock socket:
//! connect to the Unix socket, `CONNECT 1024`, then one request per connection.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use husk_proto::agent::{
    guest_message::Msg as Reply, host_message::Msg as Request, Exec, GuestMessage, Hello,
    HostMessage, SetTime, Shutdown, WindowSize, AGENT_PORT,
};
use husk_proto::frame;

/// How long one connection attempt waits for the device's `OK` line.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection waits for any frame (the testbed is slow, but not that slow).
const FRAME_TIMEOUT: Duration = Duration::from_secs(120);

/// The agent of one VM, reached through the host side of its vsock device.
#[derive(Debug, Clone)]
pub struct AgentClient {
    socket: PathBuf,
}

/// What an exec connection brought back.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub pid: Option<u32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Exit code (128 + signal when signalled); `None` without an `exit` frame.
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// The `error` frame, if the request failed.
    pub error: Option<String>,
}

impl ExecOutput {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// An exec request in progress: send input, then [`ExecSession::finish`].
#[derive(Debug)]
pub struct ExecSession {
    conn: UnixStream,
    pub pid: u32,
}

fn protocol_error(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

fn send(conn: &mut UnixStream, msg: Request) -> io::Result<()> {
    frame::write(conn, &HostMessage { msg: Some(msg) })
}

fn recv(conn: &mut UnixStream) -> io::Result<Option<Reply>> {
    Ok(frame::read::<GuestMessage, _>(conn)?.and_then(|m| m.msg))
}

/// Builds an exec request from argv.
pub fn exec_request(argv: &[&str]) -> Exec {
    Exec {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Exec::default()
    }
}

impl AgentClient {
    /// The agent behind the VMM's vsock socket `socket` (`--vsock` of husk run / husk-vmm).
    pub fn new(socket: impl AsRef<Path>) -> Self {
        Self {
            socket: socket.as_ref().to_path_buf(),
        }
    }

    /// One connection to the agent, or an error if the socket or the guest refused.
    fn connect_once(&self) -> io::Result<UnixStream> {
        let mut conn = UnixStream::connect(&self.socket)?;
        conn.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
        conn.write_all(format!("CONNECT {AGENT_PORT}\n").as_bytes())?;
        // Byte by byte: what follows the line belongs to the agent.
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while line.last() != Some(&b'\n') {
            if conn.read(&mut byte)? == 0 || line.len() > 64 {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!(
                        "vsock handshake ended after {:?}",
                        String::from_utf8_lossy(&line)
                    ),
                ));
            }
            line.push(byte[0]);
        }
        if !line.starts_with(b"OK ") {
            return Err(protocol_error(format!(
                "vsock handshake answered {:?}",
                String::from_utf8_lossy(&line)
            )));
        }
        conn.set_read_timeout(Some(FRAME_TIMEOUT))?;
        Ok(conn)
    }

    /// A connection to the agent, retried until `within` has passed (the guest may still be
    /// booting: the socket does not exist yet, or nothing listens on the port yet).
    pub fn connect(&self, within: Duration) -> io::Result<UnixStream> {
        let deadline = Instant::now() + within;
        loop {
            match self.connect_once() {
                Ok(conn) => return Ok(conn),
                Err(e) if Instant::now() >= deadline => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!(
                            "no guest agent at {} within {within:?}: {e}",
                            self.socket.display()
                        ),
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// `hello`, retried until the agent answers or `within` has passed.
    pub fn wait_ready(&self, within: Duration) -> io::Result<Hello> {
        let mut conn = self.connect(within)?;
        send(&mut conn, Request::Hello(Hello::default()))?;
        match recv(&mut conn)? {
            Some(Reply::Hello(hello)) => Ok(hello),
            other => Err(protocol_error(format!("hello answered {other:?}"))),
        }
    }

    /// Starts `request`; `Err` carries the agent's `error` frame as InvalidInput.
    pub fn start(&self, request: Exec) -> io::Result<ExecSession> {
        let mut conn = self.connect(Duration::ZERO)?;
        send(&mut conn, Request::Exec(request))?;
        match recv(&mut conn)? {
            Some(Reply::StartedPid(pid)) => Ok(ExecSession { conn, pid }),
            Some(Reply::Error(e)) => Err(io::Error::new(io::ErrorKind::InvalidInput, e)),
            other => Err(protocol_error(format!("exec answered {other:?}"))),
        }
    }

    /// Runs `request` to its end: output, exit status, or the error.
    pub fn exec(&self, request: Exec) -> io::Result<ExecOutput> {
        match self.start(request) {
            Ok(session) => session.finish(),
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => Ok(ExecOutput {
                error: Some(e.to_string()),
                ..ExecOutput::default()
            }),
            Err(e) => Err(e),
        }
    }

    /// `set_time`: the guest's wall clock becomes `unix_ns` nanoseconds since the epoch.
    pub fn set_time(&self, unix_ns: i64) -> io::Result<()> {
        let mut conn = self.connect(Duration::ZERO)?;
        send(&mut conn, Request::SetTime(SetTime { unix_ns }))?;
        match recv(&mut conn)? {
            Some(Reply::Ack(true)) => Ok(()),
            other => Err(protocol_error(format!("set_time answered {other:?}"))),
        }
    }

    /// `shutdown` with `signal` (0: SIGTERM); returns once it is acknowledged.
    pub fn shutdown(&self, signal: i32) -> io::Result<()> {
        let mut conn = self.connect(Duration::ZERO)?;
        send(&mut conn, Request::Shutdown(Shutdown { signal }))?;
        match recv(&mut conn)? {
            // Closing tells the agent the ack arrived.
            Some(Reply::Ack(true)) => Ok(()),
            other => Err(protocol_error(format!("shutdown answered {other:?}"))),
        }
    }
}

impl ExecSession {
    pub fn stdin(&mut self, bytes: &[u8]) -> io::Result<()> {
        send(&mut self.conn, Request::Stdin(bytes.to_vec()))
    }

    pub fn close_stdin(&mut self) -> io::Result<()> {
        send(&mut self.conn, Request::CloseStdin(true))
    }

    pub fn resize(&mut self, rows: u32, cols: u32) -> io::Result<()> {
        send(&mut self.conn, Request::Resize(WindowSize { rows, cols }))
    }

    pub fn signal(&mut self, sig: i32) -> io::Result<()> {
        send(&mut self.conn, Request::Signal(sig))
    }

    /// Output until stdout contains `text` (or the session ends); returns what was read.
    pub fn read_until(&mut self, text: &str) -> io::Result<ExecOutput> {
        let mut out = ExecOutput {
            pid: Some(self.pid),
            ..ExecOutput::default()
        };
        while !out.stdout_text().contains(text) {
            if !self.take(&mut out)? {
                break;
            }
        }
        Ok(out)
    }

    /// Reads one frame into `out`; false when the connection ended.
    fn take(&mut self, out: &mut ExecOutput) -> io::Result<bool> {
        match recv(&mut self.conn)? {
            None => return Ok(false),
            Some(Reply::Stdout(b)) => out.stdout.extend(b),
            Some(Reply::Stderr(b)) => out.stderr.extend(b),
            Some(Reply::Exit(e)) => {
                out.code = Some(e.code);
                out.signal = Some(e.signal);
            }
            Some(Reply::Error(e)) => out.error = Some(e),
            Some(other) => return Err(protocol_error(format!("unexpected frame {other:?}"))),
        }
        Ok(true)
    }

    /// Everything until the connection ends.
    pub fn finish(mut self) -> io::Result<ExecOutput> {
        let mut out = ExecOutput {
            pid: Some(self.pid),
            ..ExecOutput::default()
        };
        while self.take(&mut out)? {
            if out.code.is_some() || out.error.is_some() {
                // The last frame; anything after it would be a protocol error.
                if self.take(&mut out)? {
                    return Err(protocol_error(format!(
                        "a frame after the last one: {out:?}"
                    )));
                }
                break;
            }
        }
        Ok(out)
    }
}
