//! An `exec` connection: checks the request, starts the process on pipes or a pty, then streams
//! its output to the host and the host's input to it, and ends with its exit status.
//!
//! Threads of one session: this one (start, then wait for the end), one pump per output stream,
//! and the input loop. The `exit` frame goes out only after both pumps reached EOF and the
//! reaper delivered the status, so it is always the last frame and no output is lost.

use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;

use husk_proto::agent::{guest_message::Msg, Exec, Exit};

use super::input::{self, InputEnd, Process};
use super::sink::Sink;
use super::{stdio, Agent};
use crate::children::{Children, Spawned};
use crate::launch::{Launch, User, DEFAULT_PATH};

/// Why an exec request was refused (the text goes to the host in an `error` frame).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("exec: argv is empty")]
    EmptyArgv,
    #[error("exec: an argument contains a NUL byte")]
    NulArgument,
    #[error("exec: environment entry {0:?} is not KEY=VALUE")]
    BadEnv(String),
    #[error("exec: workdir {0:?} is not an absolute path")]
    RelativeWorkdir(String),
    #[error("exec: no such directory: {0}")]
    NoWorkdir(String),
}

/// Checks an exec request and turns it into a launch in `root`.
pub fn plan(request: &Exec, root: Option<&[u8]>) -> Result<Launch, PlanError> {
    if request.argv.first().is_none_or(String::is_empty) {
        return Err(PlanError::EmptyArgv);
    }
    if request.argv.iter().any(|a| a.contains('\0')) {
        return Err(PlanError::NulArgument);
    }
    let mut env = vec![
        (b"PATH".to_vec(), DEFAULT_PATH.as_bytes().to_vec()),
        (b"HOME".to_vec(), b"/".to_vec()),
    ];
    if request.tty {
        env.push((b"TERM".to_vec(), b"xterm".to_vec()));
    }
    for entry in &request.env {
        match entry.split_once('=') {
            Some((key, value)) if !key.is_empty() && !entry.contains('\0') => {
                env.push((key.as_bytes().to_vec(), value.as_bytes().to_vec()));
            }
            _ => return Err(PlanError::BadEnv(entry.clone())),
        }
    }
    let workdir = if request.workdir.is_empty() {
        "/"
    } else {
        request.workdir.as_str()
    };
    if !workdir.starts_with('/') || workdir.contains('\0') {
        return Err(PlanError::RelativeWorkdir(workdir.to_string()));
    }
    // Checked here, where the reason can be told apart from a missing program.
    let inside = [root.unwrap_or_default(), workdir.as_bytes()].concat();
    if !Path::new(std::ffi::OsStr::from_bytes(&inside)).is_dir() {
        return Err(PlanError::NoWorkdir(workdir.to_string()));
    }
    Ok(Launch {
        argv: request.argv.iter().map(|a| a.as_bytes().to_vec()).collect(),
        env,
        cwd: workdir.as_bytes().to_vec(),
        root: root.map(<[u8]>::to_vec),
        controlling_tty: request.tty,
        user: request.user.as_ref().map(|u| User {
            uid: u.uid,
            gid: u.gid,
            groups: u.additional_gids.clone(),
        }),
    })
}

/// The host-facing message for a process that could not be started.
fn spawn_error(program: &str, e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::NotFound => format!("exec: no such file: {program}"),
        io::ErrorKind::PermissionDenied => format!("exec: permission denied: {program}"),
        _ => format!("exec: cannot run {program}: {e}"),
    }
}

/// Signals go to the registered process only while it is unreaped.
struct Target {
    children: Arc<Children>,
    pid: rustix::process::RawPid,
}

impl Process for Target {
    fn signal(&self, sig: i32) {
        self.children.signal(self.pid, sig, false);
    }
}

impl Target {
    /// The host is gone or broke the protocol: the process and its process group die, so
    /// nothing is left running for nobody.
    fn kill(&self) {
        self.children
            .signal(self.pid, rustix::process::Signal::KILL.as_raw(), true);
    }
}

/// Serves one exec connection to its end.
pub fn serve(conn: File, request: &Exec, agent: &Agent) {
    let mut reader = match conn.try_clone() {
        Ok(reader) => reader,
        Err(e) => {
            Sink::new(conn).fail(&format!("exec: cannot share the connection: {e}"));
            return;
        }
    };
    let sink = Arc::new(Sink::new(conn));
    let container_root = if request.container.is_empty() {
        None
    } else {
        match super::containers::root_of(&request.container) {
            Ok(root) => Some(root),
            Err(e) => return sink.fail(&e),
        }
    };
    let root = container_root.as_deref().or(agent.root.as_deref());
    let launch = match plan(request, root) {
        Ok(launch) => launch,
        Err(e) => return sink.fail(&e.to_string()),
    };
    let streams = if request.tty {
        stdio::pty(request.window)
    } else {
        stdio::pipes()
    };
    let (parent, child) = match streams {
        Ok(streams) => streams,
        Err(e) => return sink.fail(&format!("exec: cannot set up the process's streams: {e}")),
    };
    let spawned = match start(&launch, child, &agent.children) {
        Ok(spawned) => spawned,
        Err(e) => return sink.fail(&spawn_error(&request.argv[0], &e)),
    };
    let target = Target {
        children: Arc::clone(&agent.children),
        pid: spawned.pid,
    };
    sink.send(Msg::StartedPid(spawned.pid.unsigned_abs()));

    let mut pumps = Vec::new();
    for (stream, source) in parent.outputs {
        let pump_sink = Arc::clone(&sink);
        match super::spawn_thread("husk-agent-out", move || {
            stdio::pump(source, stream, &pump_sink)
        }) {
            Ok(pump) => pumps.push(pump),
            Err(e) => {
                // The stream's fd went with the failed closure: the process must not run on.
                sink.fail(&format!("exec: cannot start an output thread: {e}"));
                target.kill();
            }
        }
    }
    let input_sink = Arc::clone(&sink);
    let input_target = Target {
        children: Arc::clone(&agent.children),
        pid: spawned.pid,
    };
    let (stdin, terminal) = (parent.stdin, parent.terminal);
    let input = super::spawn_thread("husk-agent-in", move || {
        match input::run(&mut reader, stdin, terminal, &input_target) {
            InputEnd::HostGone => input_target.kill(),
            InputEnd::Malformed(message) => {
                input_sink.fail(&message);
                input_target.kill();
            }
        }
    });
    if let Err(e) = &input {
        sink.fail(&format!("exec: cannot start the input thread: {e}"));
        target.kill();
    }

    for pump in pumps {
        let _ = pump.join();
    }
    match spawned.exit.recv() {
        Ok(status) => {
            sink.send(Msg::Exit(Exit {
                code: status.code(),
                signal: status.signal(),
            }));
        }
        Err(_) => sink.fail("exec: the exit status was lost"),
    }
    sink.close();
    // Wakes the input loop, which then ends (its kill finds the process already reaped).
    sink.shutdown();
    if let Ok(input) = input {
        let _ = input.join();
    }
}

/// Spawns the launch on the child's side of the streams; the child's copies are closed here
/// once it runs, so the pumps see EOF when the process (and its children) close theirs.
fn start(launch: &Launch, child: stdio::ChildSide, children: &Children) -> io::Result<Spawned> {
    let mut cmd = launch.command()?;
    cmd.stdin(Stdio::from(child.stdin))
        .stdout(Stdio::from(child.stdout))
        .stderr(Stdio::from(child.stderr));
    children.spawn(&mut cmd)
}
