//! Runs the application as PID 1's child: forwards signals to it, reaps every zombie (PID 1
//! inherits all orphans; the statuses of processes the guest agent started go to the agent, see
//! [`crate::children`]), and returns the application's exit status. In sandbox mode there is no
//! application: PID 1 only reaps until it is told to end.

use std::io;
use std::process::Command;

use husk_init::spec::BootSpec;
use rustix::process::Signal;

use crate::children::{Children, ExitStatus};
use crate::launch::{Launch, DEFAULT_PATH};
use crate::signals;

/// Signals PID 1 passes on to the application (the rest keep their PID-1 meaning or are ignored).
const FORWARDED: &[i32] = &[
    Signal::TERM.as_raw(),
    Signal::INT.as_raw(),
    Signal::HUP.as_raw(),
    Signal::QUIT.as_raw(),
    Signal::USR1.as_raw(),
    Signal::USR2.as_raw(),
    Signal::WINCH.as_raw(),
    Signal::CONT.as_raw(),
];
const SIGCHLD: i32 = Signal::CHILD.as_raw();
const SIGTERM: i32 = Signal::TERM.as_raw();
const SIGINT: i32 = Signal::INT.as_raw();

/// How the application ended, in shell terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppExit {
    /// exit(code)
    Exited(u8),
    /// Killed by this signal.
    Signaled(i32),
    /// It could not be started: 127 when not found, 126 otherwise (as shells do).
    NotStarted(u8),
}

impl AppExit {
    /// The exit code the host sees: the code, or 128 + signal, as shells report it.
    pub fn code(self) -> u8 {
        match self {
            Self::Exited(c) | Self::NotStarted(c) => c,
            Self::Signaled(s) => 128u8.wrapping_add(s as u8),
        }
    }
}

impl From<ExitStatus> for AppExit {
    fn from(status: ExitStatus) -> Self {
        match status {
            ExitStatus::Exited(c) => Self::Exited(c as u8),
            ExitStatus::Signaled(s) => Self::Signaled(s),
        }
    }
}

/// Blocks every signal in PID 1; they are then taken synchronously by [`run`].
pub fn block_all_signals() {
    signals::block_all();
}

/// Starts the application (chrooted into `root` when given) and supervises it until it exits.
pub fn run(spec: &BootSpec, root: Option<&str>, children: &Children) -> AppExit {
    let spawned = match app_command(spec, root).and_then(|mut cmd| children.spawn_app(&mut cmd)) {
        Ok(spawned) => spawned,
        Err(e) => {
            let name = String::from_utf8_lossy(spec.argv.first().map_or(&[][..], |a| a));
            eprintln!("husk-init: cannot run {name}: {e}");
            let code = if e.kind() == io::ErrorKind::NotFound {
                127
            } else {
                126
            };
            return AppExit::NotStarted(code);
        }
    };
    loop {
        match signals::wait() {
            SIGCHLD => {
                children.reap_any();
                if let Ok(status) = spawned.exit.try_recv() {
                    return status.into();
                }
            }
            sig if FORWARDED.contains(&sig) => {
                children.signal_app(sig);
            }
            _ => {}
        }
    }
}

/// Sandbox mode: no application; reaps (the guest agent's processes, orphans) until PID 1 gets
/// SIGTERM or SIGINT, which is how the agent's `shutdown` request ends the VM (see
/// [`request_sandbox_end`]). The VM then ends with exit code 0.
pub fn run_sandbox(children: &Children) -> AppExit {
    loop {
        match signals::wait() {
            SIGCHLD => children.reap_any(),
            SIGTERM | SIGINT => return AppExit::Exited(0),
            _ => {}
        }
    }
}

/// Ends [`run_sandbox`] from another thread of PID 1.
pub fn request_sandbox_end() {
    // A signal to our own process: every thread blocks it, so it stays pending until the main
    // thread's sigwaitinfo takes it.
    let _ = rustix::process::kill_process(rustix::process::getpid(), Signal::TERM);
}

fn app_command(spec: &BootSpec, root: Option<&str>) -> io::Result<Command> {
    let mut env = vec![
        (b"PATH".to_vec(), DEFAULT_PATH.as_bytes().to_vec()),
        (b"HOME".to_vec(), b"/root".to_vec()),
        (b"TERM".to_vec(), b"linux".to_vec()),
    ];
    for entry in &spec.env {
        if let Some(eq) = entry.iter().position(|&b| b == b'=') {
            env.push((entry[..eq].to_vec(), entry[eq + 1..].to_vec()));
        }
    }
    Launch {
        argv: spec.argv.clone(),
        env,
        cwd: spec.cwd.clone().unwrap_or_else(|| b"/".to_vec()),
        root: root.map(|r| r.as_bytes().to_vec()),
        // Own session with the console as controlling terminal, so ^C typed on the console
        // reaches the application.
        controlling_tty: true,
        user: None,
    }
    .command()
}

/// Ends every process left in the guest: SIGTERM, a grace period, then SIGKILL.
pub fn stop_everything_else(grace: std::time::Duration, children: &Children) {
    // kill(-1) signals every process but PID 1.
    if signals::send(-1, SIGTERM).is_err() {
        return; // ESRCH: nothing else is running.
    }
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline {
        children.reap_any();
        // Not kill(-1, 0): it succeeds as long as kernel threads exist, that is always.
        if !user_processes_left() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let _ = signals::send(-1, Signal::KILL.as_raw());
    children.reap_any();
}

/// PF_KTHREAD (include/linux/sched.h): the task is a kernel thread.
const PF_KTHREAD: u64 = 0x0020_0000;

/// True while a process other than PID 1 and the kernel's threads exists.
fn user_processes_left() -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != 1)
        .any(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| is_user_process(&stat))
                .unwrap_or(false) // gone meanwhile
        })
}

/// From a /proc/PID/stat line: whether the task is a user process (not a kernel thread).
/// `None` if the line cannot be read that way.
fn is_user_process(stat: &str) -> Option<bool> {
    // "pid (comm) state ppid pgrp session tty_nr tpgid flags ..."; comm may hold spaces and
    // parentheses, so the fields are counted from the last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    let flags: u64 = rest.split_whitespace().nth(6)?.parse().ok()?;
    Some(flags & PF_KTHREAD == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_shell_conventions() {
        assert_eq!(AppExit::Exited(7).code(), 7);
        assert_eq!(AppExit::Signaled(Signal::KILL.as_raw()).code(), 137);
        assert_eq!(AppExit::Signaled(SIGTERM).code(), 143);
        assert_eq!(AppExit::NotStarted(127).code(), 127);
    }

    #[test]
    fn kernel_threads_are_told_apart_from_user_processes() {
        let kthread = "2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0 0 0 0 0 20 0 1 0 9 0 0";
        assert_eq!(is_user_process(kthread), Some(false));
        let tricky = "77 (a) b (c) S 1 77 77 0 -1 4194560 90 0 0 0 0 0 0 0 20 0 1 0 9 0 0";
        assert_eq!(is_user_process(tricky), Some(true));
        assert_eq!(is_user_process("garbage"), None);
        let own = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert_eq!(is_user_process(&own), Some(true));
    }
}
