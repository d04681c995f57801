//! Runs the application as PID 1's child: forwards signals to it, reaps every zombie (PID 1
//! inherits all orphans), and returns the application's exit status.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

use husk_init::spec::BootSpec;

/// Signals PID 1 passes on to the application (the rest keep their PID-1 meaning or are ignored).
const FORWARDED: &[libc::c_int] = &[
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGWINCH,
    libc::SIGCONT,
];

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

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

/// Blocks every signal in PID 1; they are then taken synchronously by [`run`].
pub fn block_all_signals() {
    // SAFETY: sigset_t is plain data initialised by sigfillset; sigprocmask only changes our mask.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::sigprocmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
    }
}

/// Starts the application (chrooted into `root` when given) and supervises it until it exits.
pub fn run(spec: &BootSpec, root: Option<&str>) -> AppExit {
    let child = match spawn(spec, root) {
        Ok(pid) => pid,
        Err(e) => {
            let name = String::from_utf8_lossy(&spec.argv[0]);
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
        match wait_signal() {
            libc::SIGCHLD => {
                if let Some(exit) = reap(Some(child)) {
                    return exit;
                }
            }
            sig if FORWARDED.contains(&sig) => {
                // SAFETY: sending a signal to our own child has no memory effects.
                unsafe { libc::kill(child, sig) };
            }
            _ => {}
        }
    }
}

fn spawn(spec: &BootSpec, root: Option<&str>) -> io::Result<libc::pid_t> {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;

    let os = |b: &[u8]| OsStr::from_bytes(b).to_owned();
    let mut cmd = Command::new(os(&spec.argv[0]));
    cmd.args(spec.argv[1..].iter().map(|a| os(a)));
    cmd.env_clear()
        .env("PATH", DEFAULT_PATH)
        .env("HOME", "/root")
        .env("TERM", "linux");
    for entry in &spec.env {
        if let Some(eq) = entry.iter().position(|&b| b == b'=') {
            cmd.env(os(&entry[..eq]), os(&entry[eq + 1..]));
        }
    }
    let cwd = std::ffi::CString::new(spec.cwd.clone().unwrap_or_else(|| b"/".to_vec()))
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let root = root
        .map(std::ffi::CString::new)
        .transpose()
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe
    // system calls on data prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            // chroot (for husk.root) and the working directory here, not with current_dir: it
            // must be resolved inside the new root.
            if let Some(root) = &root {
                if libc::chroot(root.as_ptr()) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if libc::chdir(cwd.as_ptr()) != 0 {
                return Err(io::Error::last_os_error());
            }
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            // Own session with the console as controlling terminal, so ^C typed on the console
            // reaches the application. Failure (no tty) is harmless.
            libc::setsid();
            libc::ioctl(0, libc::TIOCSCTTY as _, 0);
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    let pid =
        libc::pid_t::try_from(child.id()).map_err(|_| io::Error::other("pid out of range"))?;
    // The Child handle is dropped without waiting: PID 1 reaps with waitpid(-1) itself.
    Ok(pid)
}

/// Waits for the next blocked signal and returns its number.
fn wait_signal() -> libc::c_int {
    loop {
        // SAFETY: sigset_t is initialised by sigfillset; a null siginfo pointer is allowed.
        let sig = unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::sigwaitinfo(&all, std::ptr::null_mut())
        };
        if sig > 0 {
            return sig;
        }
    }
}

/// Reaps every exited child. Returns the exit of `watched` if it was among them.
pub fn reap(watched: Option<libc::pid_t>) -> Option<AppExit> {
    let mut result = None;
    loop {
        let mut status = 0;
        // SAFETY: status is a valid out-pointer; WNOHANG never blocks.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return result;
        }
        if Some(pid) == watched {
            result = Some(if libc::WIFSIGNALED(status) {
                AppExit::Signaled(libc::WTERMSIG(status))
            } else {
                AppExit::Exited(libc::WEXITSTATUS(status) as u8)
            });
        }
    }
}

/// Ends every process left in the guest: SIGTERM, a grace period, then SIGKILL.
pub fn stop_everything_else(grace: std::time::Duration) {
    // SAFETY: kill(-1) signals every process but PID 1; no memory effects here.
    if unsafe { libc::kill(-1, libc::SIGTERM) } != 0 {
        return; // ESRCH: nothing else is running.
    }
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline {
        reap(None);
        // SAFETY: signal 0 only checks whether any process is left.
        if unsafe { libc::kill(-1, 0) } != 0 {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // SAFETY: as above.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    reap(None);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_shell_conventions() {
        assert_eq!(AppExit::Exited(7).code(), 7);
        assert_eq!(AppExit::Signaled(libc::SIGKILL).code(), 137);
        assert_eq!(AppExit::Signaled(libc::SIGTERM).code(), 143);
        assert_eq!(AppExit::NotStarted(127).code(), 127);
    }
}
