//! The guest agent: husk.agent.v1 (proto/husk/agent/v1/agent.proto) on vsock port
//! [`AGENT_PORT`], served by threads of PID 1.
//!
//! One connection carries one request. `hello`, `shutdown`, `set_time`, `set_network` (see
//! [`net_config`]) and `reidentify` (see [`reidentify`]) are answered at once; `exec` starts a process and streams it (see [`exec`]).
//! A connection thread is started per connection, up to [`MAX_CONNECTIONS`]; beyond that a
//! connection gets an `error` frame and is closed. Malformed input gets an `error` frame and
//! the connection is closed; nothing the host sends can panic or block PID 1 itself.

mod containers;
mod exec;
mod fd;
mod input;
mod net_config;
mod reidentify;
mod sink;
mod stdio;

use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use husk_proto::agent::{
    guest_message::Msg as Reply, host_message::Msg as Request, GuestMessage, Hello, HostMessage,
    AGENT_PORT, PROTOCOL_VERSION,
};
use husk_proto::frame;

use crate::children::Children;
use crate::vsock;

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a new connection may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// After the `ack` of a shutdown, how long the host has to close the connection (which tells us
/// the ack arrived) before the shutdown goes ahead anyway.
const ACK_LINGER: Duration = Duration::from_secs(2);
/// Stack of every agent thread: they hold little (buffers are on the heap).
const STACK_SIZE: usize = 256 * 1024;
/// Highest signal number (SIGRTMAX on Linux).
const MAX_SIGNAL: i32 = 64;

/// What the agent acts on.
pub struct Agent {
    /// PID 1's registry: exec'd processes are spawned and reaped through it.
    pub children: Arc<Children>,
    /// The application's root (husk.root), where exec'd processes run too; `None`: initramfs.
    pub root: Option<Vec<u8>>,
    /// Carries out a `shutdown` request with this signal (already acknowledged).
    pub shutdown: Box<dyn Fn(i32) + Send + Sync>,
    active: AtomicUsize,
}

impl Agent {
    pub fn new(
        children: Arc<Children>,
        root: Option<Vec<u8>>,
        shutdown: Box<dyn Fn(i32) + Send + Sync>,
    ) -> Self {
        Self {
            children,
            root,
            shutdown,
            active: AtomicUsize::new(0),
        }
    }
}

/// Why the agent is not running.
#[derive(Debug)]
pub enum AgentOff {
    /// The guest has no vsock device: the agent is simply not available.
    NoDevice,
    /// There is a device, but listening failed.
    Failed(io::Error),
}

impl std::fmt::Display for AgentOff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoDevice => write!(f, "the guest has no vsock device"),
            Self::Failed(e) => write!(f, "cannot listen on vsock port {AGENT_PORT}: {e}"),
        }
    }
}

/// Starts listening on [`AGENT_PORT`] now (so a host that connects right after boot finds the
/// agent) and serves connections from a thread.
pub fn start(agent: Arc<Agent>) -> Result<(), AgentOff> {
    if vsock::local_cid().is_none() {
        return Err(AgentOff::NoDevice);
    }
    let listener = vsock::listen(AGENT_PORT, MAX_CONNECTIONS as i32).map_err(AgentOff::Failed)?;
    spawn_thread("husk-agent", move || accept_loop(&listener, &agent)).map_err(AgentOff::Failed)?;
    Ok(())
}

/// A named thread with a small stack; an error instead of std::thread::spawn's panic.
fn spawn_thread<F>(name: &str, body: F) -> io::Result<JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    std::thread::Builder::new()
        .name(name.into())
        .stack_size(STACK_SIZE)
        .spawn(body)
}

fn accept_loop(listener: &OwnedFd, agent: &Arc<Agent>) {
    loop {
        match vsock::accept(listener) {
            Ok(conn) => admit(File::from(conn), agent),
            // Out of fds or memory: let the running sessions finish some work.
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Releases a connection slot when the connection's thread ends.
struct Slot(Arc<Agent>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

fn admit(conn: File, agent: &Arc<Agent>) {
    if agent.active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
        agent.active.fetch_sub(1, Ordering::SeqCst);
        refuse(
            conn,
            &format!("too many connections (at most {MAX_CONNECTIONS})"),
        );
        return;
    }
    let slot = Slot(Arc::clone(agent));
    // If the thread cannot start, the closure (connection and slot) is dropped with the error.
    if let Err(e) = spawn_thread("husk-agent-conn", move || serve(conn, &slot.0)) {
        eprintln!("husk-init: agent: cannot start a connection thread: {e}");
    }
}

/// Sends one `error` frame without waiting long for a host that does not read.
fn refuse(conn: File, message: &str) {
    let _ = fd::set_write_timeout(&conn, Some(Duration::from_secs(1)));
    let mut conn = conn;
    reply(&mut conn, Reply::Error(sink::shorten(message)));
}

fn reply(conn: &mut File, msg: Reply) {
    // The host may be gone already; there is nobody left to tell.
    let _ = frame::write(conn, &GuestMessage { msg: Some(msg) });
}

/// The name of a host message, for error texts.
fn request_name(msg: &Request) -> &'static str {
    match msg {
        Request::Hello(_) => "hello",
        Request::Exec(_) => "exec",
        Request::Stdin(_) => "stdin",
        Request::CloseStdin(_) => "close_stdin",
        Request::Resize(_) => "resize",
        Request::Signal(_) => "signal",
        Request::Shutdown(_) => "shutdown",
        Request::SetTime(_) => "set_time",
        Request::SetNetwork(_) => "set_network",
        Request::AddContainer(_) => "add_container",
        Request::RemoveContainer(_) => "remove_container",
        Request::ContainerStats(_) => "container_stats",
        Request::Reidentify(_) => "reidentify",
    }
}

/// Serves one connection: reads its request and answers it.
pub fn serve(mut conn: File, agent: &Agent) {
    let _ = fd::set_read_timeout(&conn, Some(REQUEST_TIMEOUT));
    let request = match frame::read::<HostMessage, _>(&mut conn) {
        Ok(Some(HostMessage { msg: Some(request) })) => request,
        Ok(Some(HostMessage { msg: None })) => {
            return reply(&mut conn, Reply::Error("empty request".into()))
        }
        Ok(None) => return,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            return reply(
                &mut conn,
                Reply::Error(format!("no request within {REQUEST_TIMEOUT:?}")),
            )
        }
        Err(e) => return reply(&mut conn, Reply::Error(format!("bad request: {e}"))),
    };
    if fd::set_read_timeout(&conn, None).is_err() {
        return reply(
            &mut conn,
            Reply::Error("cannot configure the connection".into()),
        );
    }
    match request {
        Request::Hello(_) => reply(
            &mut conn,
            Reply::Hello(Hello {
                version: PROTOCOL_VERSION,
                uptime_ms: uptime_ms(),
            }),
        ),
        Request::Exec(exec) => exec::serve(conn, &exec, agent),
        Request::Shutdown(shutdown) => {
            let sig = if shutdown.signal == 0 {
                rustix::process::Signal::TERM.as_raw()
            } else {
                shutdown.signal
            };
            if !(1..=MAX_SIGNAL).contains(&sig) {
                return reply(
                    &mut conn,
                    Reply::Error(format!("shutdown: {sig} is not a signal number")),
                );
            }
            reply(&mut conn, Reply::Ack(true));
            wait_for_close(&mut conn);
            (agent.shutdown)(sig);
        }
        Request::SetTime(time) => reply(
            &mut conn,
            match set_time(time.unix_ns) {
                Ok(()) => Reply::Ack(true),
                Err(e) => Reply::Error(format!("set_time: {e}")),
            },
        ),
        Request::SetNetwork(net) => reply(
            &mut conn,
            match net_config::NetConfig::parse(&net)
                .and_then(|config| net_config::apply(&config).map_err(|e| e.to_string()))
            {
                Ok(()) => Reply::Ack(true),
                Err(e) => Reply::Error(format!("set_network: {e}")),
            },
        ),
        Request::Reidentify(request) => reply(
            &mut conn,
            match reidentify::Identity::parse(&request).and_then(|id| id.apply()) {
                Ok(()) => Reply::Ack(true),
                Err(e) => Reply::Error(format!("reidentify: {e}")),
            },
        ),
        Request::AddContainer(add) => reply(
            &mut conn,
            match containers::add(
                &add,
                std::path::Path::new(std::ffi::OsStr::from_bytes(
                    agent.root.as_deref().unwrap_or(b"/"),
                )),
            ) {
                Ok(()) => Reply::Ack(true),
                Err(e) => Reply::Error(format!("add_container: {e}")),
            },
        ),
        Request::RemoveContainer(remove) => reply(
            &mut conn,
            match containers::remove(&remove.id) {
                Ok(()) => Reply::Ack(true),
                Err(e) => Reply::Error(format!("remove_container: {e}")),
            },
        ),
        Request::ContainerStats(request) => reply(
            &mut conn,
            match containers::stats(&request.id) {
                Ok(stats) => Reply::ContainerStats(stats),
                Err(e) => Reply::Error(format!("container_stats: {e}")),
            },
        ),
        other => reply(
            &mut conn,
            Reply::Error(format!(
                "expected a request (hello, exec, shutdown, set_time, set_network, \
                 reidentify, add_container, remove_container or container_stats), got {}",
                request_name(&other)
            )),
        ),
    }
}

/// Gives the last frame time to reach the host before the VM goes away: waits (bounded) until
/// the host closes its side, which it does once it has read the frame.
fn wait_for_close(conn: &mut File) {
    use std::io::Read;
    if fd::set_read_timeout(conn, Some(ACK_LINGER)).is_err() {
        return;
    }
    let mut buf = [0u8; 256];
    let deadline = std::time::Instant::now() + ACK_LINGER;
    while std::time::Instant::now() < deadline {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {} // nothing more is expected; ignore it
        }
    }
}

/// Milliseconds since the guest kernel booted (CLOCK_BOOTTIME counts suspended time too).
fn uptime_ms() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    (ts.tv_sec as u64)
        .saturating_mul(1000)
        .saturating_add(ts.tv_nsec as u64 / 1_000_000)
}

/// `unix_ns` as a timespec; the nanoseconds stay in 0..1e9 for instants before 1970 too.
fn timespec_of(unix_ns: i64) -> rustix::time::Timespec {
    rustix::time::Timespec {
        tv_sec: unix_ns.div_euclid(1_000_000_000) as _,
        tv_nsec: unix_ns.rem_euclid(1_000_000_000) as _,
    }
}

/// Sets the wall clock to `unix_ns` nanoseconds since the epoch.
fn set_time(unix_ns: i64) -> io::Result<()> {
    let ts = timespec_of(unix_ns);
    Ok(rustix::time::clock_settime(
        rustix::time::ClockId::Realtime,
        ts,
    )?)
}

#[cfg(test)]
mod tests;
