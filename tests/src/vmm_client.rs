//! A small blocking client of husk-vmm's control socket (`--api-sock`, protocol husk.vmm.v1):
//! one framed request, one framed response.

use std::fmt;
use std::io;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use husk_proto::frame;
use husk_proto::vmm::{
    vmm_request, vmm_response, Describe, Info, Pause, Resume, Snapshot, SnapshotDone, Stop,
    VmmRequest, VmmResponse,
};

/// How long a request may take before the client gives up.
const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a request failed.
#[derive(Debug)]
pub enum ClientError {
    /// The socket failed, or the VMM closed it.
    Io(io::Error),
    /// The VMM answered with an `error` response.
    Vmm(String),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Io(e) => write!(f, "control socket: {e}"),
            ClientError::Vmm(message) => write!(f, "husk-vmm refused: {message}"),
        }
    }
}

impl std::error::Error for ClientError {}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> Self {
        ClientError::Io(e)
    }
}

/// A connection to one husk-vmm.
#[derive(Debug)]
pub struct VmmClient {
    stream: UnixStream,
}

impl VmmClient {
    /// Connects to the socket at `path`.
    pub fn connect(path: &Path) -> io::Result<Self> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(VmmClient { stream })
    }

    /// Connects once husk-vmm has created the socket (it does just before the VM runs), trying
    /// until `timeout`.
    pub fn connect_when_ready(path: &Path, timeout: Duration) -> io::Result<Self> {
        let deadline = Instant::now() + timeout;
        loop {
            match Self::connect(path) {
                Ok(client) => return Ok(client),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Sends one request and reads its response.
    pub fn call(&mut self, msg: vmm_request::Msg) -> Result<Info, ClientError> {
        frame::write(&mut self.stream, &VmmRequest { msg: Some(msg) })?;
        let response: VmmResponse = frame::read(&mut self.stream)?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "husk-vmm closed the connection without answering",
            )
        })?;
        match response.msg {
            Some(vmm_response::Msg::Info(info)) => Ok(info),
            Some(vmm_response::Msg::Error(message)) => Err(ClientError::Vmm(message)),
            Some(vmm_response::Msg::Snapshot(_)) | None => {
                Err(ClientError::Vmm(String::from("unexpected response")))
            }
        }
    }

    /// Writes a snapshot of the paused VM to `state` and `mem` (paths as husk-vmm sees them);
    /// with `diff`, only the pages that differ from the VM's base.
    pub fn snapshot(
        &mut self,
        state: &Path,
        mem: &Path,
        diff: bool,
    ) -> Result<SnapshotDone, ClientError> {
        let msg = vmm_request::Msg::Snapshot(Snapshot {
            state_path: state.display().to_string(),
            mem_path: mem.display().to_string(),
            diff,
        });
        frame::write(&mut self.stream, &VmmRequest { msg: Some(msg) })?;
        let response: VmmResponse = frame::read(&mut self.stream)?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "husk-vmm closed the connection",
            )
        })?;
        match response.msg {
            Some(vmm_response::Msg::Snapshot(done)) => Ok(done),
            Some(vmm_response::Msg::Error(message)) => Err(ClientError::Vmm(message)),
            _ => Err(ClientError::Vmm(String::from("unexpected response"))),
        }
    }

    /// The VM's state, size, boot time and device counters.
    pub fn describe(&mut self) -> Result<Info, ClientError> {
        self.call(vmm_request::Msg::Describe(Describe {}))
    }

    /// Pauses the VM; returns once every vCPU and the device loop are parked.
    pub fn pause(&mut self) -> Result<Info, ClientError> {
        self.call(vmm_request::Msg::Pause(Pause {}))
    }

    /// Resumes a paused VM.
    pub fn resume(&mut self) -> Result<Info, ClientError> {
        self.call(vmm_request::Msg::Resume(Resume {}))
    }

    /// Stops the VM; husk-vmm exits (status 143) right after answering.
    pub fn stop(&mut self) -> Result<Info, ClientError> {
        self.call(vmm_request::Msg::Stop(Stop {}))
    }
}
