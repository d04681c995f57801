//! The registry of PID 1's children whose exit somebody waits for (the application, processes
//! the guest agent started), and the one reaper that fills it.
//!
//! PID 1 reaps with `waitpid(-1)`: it inherits every orphan, and their statuses must be collected.
//! That same call also collects the processes the agent started, so the reaper hands each status
//! to whoever registered the pid, through a one-slot channel.
//!
//! One lock covers spawning, registering, reaping and signalling:
//! - a child that exits at once is reaped only after it is registered (the reaper waits for the
//!   lock), so no status is lost or given to the wrong owner;
//! - `Command::spawn` waits for a child whose exec failed with `waitpid(pid)`; a concurrent
//!   `waitpid(-1)` could take that child first and make it fail, so no reaping happens during a
//!   spawn;
//! - a pid is signalled only while it is registered and unreaped, so it cannot have been reused
//!   by another process.

use std::collections::HashMap;
use std::io;
use std::process::Command;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Mutex, MutexGuard};

use rustix::process::{wait, RawPid, WaitOptions, WaitStatus};

use crate::signals;

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// exit(code)
    Exited(i32),
    /// Killed by this signal.
    Signaled(i32),
}

impl ExitStatus {
    /// Decodes a `waitpid` status (only exits and deaths are ever asked for).
    pub fn from_wait(status: WaitStatus) -> Self {
        match status.terminating_signal() {
            Some(sig) => Self::Signaled(sig),
            // WEXITSTATUS.
            None => Self::Exited((status.as_raw() >> 8) & 0xff),
        }
    }

    /// The shell's view: the exit code, or 128 + signal.
    pub fn code(self) -> i32 {
        match self {
            Self::Exited(c) => c,
            Self::Signaled(s) => 128 + s,
        }
    }

    /// The signal that ended the process, 0 when it exited.
    pub fn signal(self) -> i32 {
        match self {
            Self::Exited(_) => 0,
            Self::Signaled(s) => s,
        }
    }
}

/// A registered child: its pid and where its exit status arrives.
#[derive(Debug)]
pub struct Spawned {
    pub pid: RawPid,
    pub exit: Receiver<ExitStatus>,
}

/// The application's lifecycle, as far as signalling it is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum App {
    /// Not started yet; a signal asked for meanwhile is delivered once it starts.
    NotYet {
        pending: Option<i32>,
    },
    Running(RawPid),
    Gone,
}

#[derive(Debug)]
struct State {
    waiting: HashMap<RawPid, SyncSender<ExitStatus>>,
    app: App,
}

/// What [`Children::signal_app`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppSignal {
    Sent,
    /// The application has not started yet; it gets the signal when it does.
    Deferred,
    /// The application already ended.
    Gone,
}

/// PID 1's registry of children; see the module comment.
#[derive(Debug)]
pub struct Children {
    state: Mutex<State>,
}

impl Default for Children {
    fn default() -> Self {
        Self::new()
    }
}

impl Children {
    pub fn new() -> Self {
        Self {
            state: Mutex::new(State {
                waiting: HashMap::new(),
                app: App::NotYet { pending: None },
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic aborts husk-init (panic = "abort"), so a poisoned lock cannot be observed in
        // the guest; in tests the state is still consistent (every update is one statement).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Spawns `cmd` and registers the child before any reaping can see it.
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<Spawned> {
        let mut state = self.lock();
        Self::spawn_locked(&mut state, cmd)
    }

    fn spawn_locked(state: &mut State, cmd: &mut Command) -> io::Result<Spawned> {
        let child = cmd.spawn()?;
        let pid = RawPid::try_from(child.id()).map_err(|_| io::Error::other("pid out of range"))?;
        // The Child handle is dropped without waiting: the registry's reaper collects it.
        drop(child);
        let (tx, exit) = sync_channel(1);
        state.waiting.insert(pid, tx);
        Ok(Spawned { pid, exit })
    }

    /// Spawns the application: like [`Self::spawn`], and it becomes the target of
    /// [`Self::signal_app`]. A signal requested before this is delivered now.
    pub fn spawn_app(&self, cmd: &mut Command) -> io::Result<Spawned> {
        let mut state = self.lock();
        let spawned = Self::spawn_locked(&mut state, cmd);
        let pending = match state.app {
            App::NotYet { pending } => pending,
            _ => None,
        };
        match &spawned {
            Ok(s) => {
                state.app = App::Running(s.pid);
                if let Some(sig) = pending {
                    // Our own registered, unreaped child.
                    let _ = signals::send(s.pid, sig);
                }
            }
            Err(_) => state.app = App::Gone,
        }
        spawned
    }

    /// Signals the application (see [`AppSignal`]).
    pub fn signal_app(&self, sig: i32) -> AppSignal {
        let mut state = self.lock();
        match state.app {
            App::NotYet { .. } => {
                state.app = App::NotYet { pending: Some(sig) };
                AppSignal::Deferred
            }
            App::Running(pid) => {
                // The app is registered and unreaped (the reaper marks it Gone under this
                // lock), so the pid is still the app's.
                let _ = signals::send(pid, sig);
                AppSignal::Sent
            }
            App::Gone => AppSignal::Gone,
        }
    }

    /// Sends `sig` to a registered child that has not been reaped yet; with `group`, to its
    /// process group too (the child leads one: it called setsid). False when it is gone.
    pub fn signal(&self, pid: RawPid, sig: i32, group: bool) -> bool {
        let state = self.lock();
        if !state.waiting.contains_key(&pid) {
            return false;
        }
        // The pid is registered and unreaped, so it (and the group it leads) is still ours.
        if group {
            let _ = signals::send(-pid, sig);
        }
        let _ = signals::send(pid, sig);
        true
    }

    /// Reaps every exited child of this process (`waitpid(-1)`: PID 1's duty) and delivers the
    /// statuses of registered ones; orphans' statuses are dropped.
    pub fn reap_any(&self) {
        let mut state = self.lock();
        // Nothing left to reap (None) or no children at all (ECHILD) ends the loop. `wait` is
        // waitpid(-1): any child. (rustix's `waitpid(None)` is waitpid(0), this process group
        // only, which misses every child here: each leads its own session.)
        while let Ok(Some((pid, status))) = wait(WaitOptions::NOHANG) {
            Self::deliver(&mut state, pid.as_raw_pid(), ExitStatus::from_wait(status));
        }
    }

    /// Reaps only the registered children. This is the reaper where the process is not PID 1
    /// (unit tests): `waitpid(-1)` there would steal other tests' children.
    #[cfg(test)]
    pub fn reap_registered(&self) {
        let mut state = self.lock();
        let pids: Vec<RawPid> = state.waiting.keys().copied().collect();
        for pid in pids {
            let Some(child) = rustix::process::Pid::from_raw(pid) else {
                continue;
            };
            if let Ok(Some((_, status))) =
                rustix::process::waitpid(Some(child), WaitOptions::NOHANG)
            {
                Self::deliver(&mut state, pid, ExitStatus::from_wait(status));
            }
        }
    }

    fn deliver(state: &mut State, pid: RawPid, status: ExitStatus) {
        if let Some(tx) = state.waiting.remove(&pid) {
            // The one slot is free (one status per pid); a receiver that went away is fine.
            let _ = tx.try_send(status);
        }
        if state.app == App::Running(pid) {
            state.app = App::Gone;
        }
    }

    /// Number of registered children not reaped yet.
    #[cfg(test)]
    pub fn registered(&self) -> usize {
        self.lock().waiting.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::process::Signal;
    use std::time::Duration;

    const SIGTERM: i32 = Signal::TERM.as_raw();

    fn sh(script: &str) -> Command {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", script]);
        cmd
    }

    fn wait(children: &Children, spawned: &Spawned) -> ExitStatus {
        for _ in 0..1000 {
            children.reap_registered();
            if let Ok(status) = spawned.exit.try_recv() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("child {} did not exit", spawned.pid);
    }

    #[test]
    fn exit_statuses_follow_shell_conventions() {
        assert_eq!(ExitStatus::Exited(7).code(), 7);
        assert_eq!(ExitStatus::Exited(7).signal(), 0);
        assert_eq!(ExitStatus::Signaled(SIGTERM).code(), 143);
        assert_eq!(
            ExitStatus::Signaled(Signal::KILL.as_raw()).signal(),
            Signal::KILL.as_raw()
        );
    }

    #[test]
    fn a_child_that_exits_at_once_still_reaches_its_owner() {
        let children = Children::new();
        let spawned = children.spawn(&mut sh("exit 3")).unwrap();
        // Let it become a zombie before anyone reaps.
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(wait(&children, &spawned), ExitStatus::Exited(3));
        assert_eq!(children.registered(), 0);
    }

    #[test]
    fn statuses_go_to_their_own_owners() {
        let children = Children::new();
        let a = children.spawn(&mut sh("exit 4")).unwrap();
        let b = children.spawn(&mut sh("exit 5")).unwrap();
        assert_eq!(wait(&children, &b), ExitStatus::Exited(5));
        assert_eq!(wait(&children, &a), ExitStatus::Exited(4));
    }

    #[test]
    fn signals_reach_live_children_only() {
        let children = Children::new();
        let spawned = children.spawn(&mut sh("sleep 30")).unwrap();
        assert!(children.signal(spawned.pid, SIGTERM, false));
        assert_eq!(wait(&children, &spawned), ExitStatus::Signaled(SIGTERM));
        assert!(
            !children.signal(spawned.pid, SIGTERM, false),
            "a reaped pid must not be signalled (it may be reused)"
        );
    }

    #[test]
    fn a_failed_spawn_reports_not_found_and_registers_nothing() {
        let children = Children::new();
        let err = children
            .spawn(&mut Command::new("/nonexistent/husk-test"))
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert_eq!(children.registered(), 0);
    }

    #[test]
    fn a_signal_for_the_app_before_it_starts_is_delivered_when_it_does() {
        let children = Children::new();
        assert_eq!(children.signal_app(SIGTERM), AppSignal::Deferred);
        let app = children.spawn_app(&mut sh("sleep 30")).unwrap();
        assert_eq!(wait(&children, &app), ExitStatus::Signaled(SIGTERM));
        assert_eq!(children.signal_app(SIGTERM), AppSignal::Gone);
    }

    #[test]
    fn a_running_app_is_signalled_directly() {
        let children = Children::new();
        let app = children.spawn_app(&mut sh("sleep 30")).unwrap();
        assert_eq!(children.signal_app(Signal::USR1.as_raw()), AppSignal::Sent);
        assert_eq!(
            wait(&children, &app),
            ExitStatus::Signaled(Signal::USR1.as_raw())
        );
    }
}
