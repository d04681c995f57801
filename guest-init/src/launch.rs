//! How PID 1 starts a process, the application or one the guest agent runs: a clean environment,
//! the application's root (chroot) and working directory, a clean signal state, its own session.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::process::Command;

use rustix::process::{Gid, Uid};

use crate::signals;

/// `PATH` of every process PID 1 starts.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What to start and where.
#[derive(Debug, Clone, Default)]
pub struct Launch {
    /// Program and arguments, at least one; the program is looked up in `PATH` inside `root`.
    pub argv: Vec<Vec<u8>>,
    /// The whole environment, `(KEY, VALUE)`; later entries override earlier ones.
    pub env: Vec<(Vec<u8>, Vec<u8>)>,
    /// Working directory, resolved inside `root`.
    pub cwd: Vec<u8>,
    /// The root to chroot into (husk.root); `None`: the initramfs.
    pub root: Option<Vec<u8>>,
    /// Make fd 0 the controlling terminal of the new session (failure is ignored: fd 0 may be
    /// no terminal).
    pub controlling_tty: bool,
    /// Identity to switch to after the chroot (`None`: stay root).
    pub user: Option<User>,
}

/// uid, primary gid and supplementary gids of a launched process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "argument or path contains a NUL byte",
        )
    })
}

impl Launch {
    /// A `Command` for this launch; the caller sets stdio and spawns it (through
    /// [`crate::children::Children`]).
    pub fn command(&self) -> io::Result<Command> {
        let (program, args) = self
            .argv
            .split_first()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty argv"))?;
        let os = |b: &[u8]| OsStr::from_bytes(b).to_owned();
        let mut cmd = Command::new(os(program));
        cmd.args(args.iter().map(|a| os(a)));
        cmd.env_clear();
        for (key, value) in &self.env {
            cmd.env(os(key), os(value));
        }
        let cwd = cstring(&self.cwd)?;
        let root = self.root.as_deref().map(cstring).transpose()?;
        let controlling_tty = self.controlling_tty;
        let user = self.user.clone();
        let groups: Vec<Gid> = user
            .as_ref()
            .map(|u| u.groups.iter().map(|&g| Gid::from_raw(g)).collect())
            .unwrap_or_default();
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe system calls on data prepared before the fork (rustix's calls are
        // system calls on the given C strings; nothing allocates).
        unsafe {
            cmd.pre_exec(move || {
                // chroot and the working directory here, not with current_dir: both must be
                // resolved inside the new root. std looks the program up in PATH after this, so
                // inside the root too.
                if let Some(root) = &root {
                    rustix::process::chroot(root.as_c_str())?;
                }
                rustix::process::chdir(cwd.as_c_str())?;
                // Groups first, then the gid, the uid last: each step needs the privilege
                // that the next one gives up. The child has one thread, so the per-thread
                // credential calls change the whole process.
                if let Some(user) = &user {
                    rustix::thread::set_thread_groups(&groups)?;
                    rustix::thread::set_thread_gid(Gid::from_raw(user.gid))?;
                    rustix::thread::set_thread_uid(Uid::from_raw(user.uid))?;
                }
                // The child between fork and exec, as reset_for_child requires.
                signals::reset_for_child();
                let _ = rustix::process::setsid();
                if controlling_tty {
                    let _ = rustix::process::ioctl_tiocsctty(rustix::stdio::stdin());
                }
                Ok(())
            });
        }
        Ok(cmd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_child_gets_exactly_the_given_environment_and_directory() {
        let launch = Launch {
            argv: vec![
                b"/bin/sh".to_vec(),
                b"-c".to_vec(),
                b"pwd; env | sort".to_vec(),
            ],
            env: vec![
                (b"PATH".to_vec(), DEFAULT_PATH.as_bytes().to_vec()),
                (b"A".to_vec(), b"1".to_vec()),
                (b"A".to_vec(), b"2".to_vec()),
            ],
            cwd: b"/tmp".to_vec(),
            ..Launch::default()
        };
        let out = launch.command().unwrap().output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("/tmp"));
        let env: Vec<&str> = lines.filter(|l| !l.starts_with("PWD=")).collect();
        assert!(env.contains(&"A=2"), "{env:?}");
        assert!(!env.contains(&"A=1"), "{env:?}");
        assert!(env.iter().any(|l| l.starts_with("PATH=/usr/local/sbin")));
        assert!(!env.iter().any(|l| l.starts_with("HOME=")), "{env:?}");
    }

    #[test]
    fn the_child_has_an_empty_signal_mask_and_its_own_session() {
        use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow, Signal};
        // Block a signal here, as PID 1 does for all: the child must not inherit it (changes
        // only this test thread's mask; restored below).
        let mut set = SigSet::empty();
        set.add(Signal::SIGUSR2);
        let mut old = SigSet::empty();
        pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), Some(&mut old)).unwrap();
        // The launched program reads its own mask: a shell reading its own would race with the
        // shell's fork of the next command (dash blocks every signal around fork).
        let mask = Launch {
            argv: vec![
                b"grep".to_vec(),
                b"-E".to_vec(),
                b"^SigBlk".to_vec(),
                b"/proc/self/status".to_vec(),
            ],
            env: vec![(b"PATH".to_vec(), b"/usr/bin:/bin".to_vec())],
            cwd: b"/".to_vec(),
            ..Launch::default()
        };
        let session = Launch {
            argv: vec![
                b"/bin/sh".to_vec(),
                b"-c".to_vec(),
                b"set -- $(cat /proc/$$/stat); echo pid=$1 sid=$6".to_vec(),
            ],
            cwd: b"/".to_vec(),
            ..Launch::default()
        };
        let mask_out = mask.command().unwrap().output();
        let session_out = session.command().unwrap().output();
        pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None).unwrap();
        let text = String::from_utf8_lossy(&mask_out.unwrap().stdout).into_owned();
        assert!(
            text.contains("SigBlk:\t0000000000000000"),
            "signal mask leaked into the child:\n{text}"
        );
        let text = String::from_utf8_lossy(&session_out.unwrap().stdout).into_owned();
        let ids = text.lines().find(|l| l.starts_with("pid=")).unwrap();
        let (pid, sid) = ids.split_once(' ').unwrap();
        assert_eq!(&pid[4..], &sid[4..], "the child leads no session: {ids}");
    }

    #[test]
    fn a_missing_working_directory_fails_the_spawn() {
        let launch = Launch {
            argv: vec![b"/bin/true".to_vec()],
            cwd: b"/nonexistent-husk-dir".to_vec(),
            ..Launch::default()
        };
        assert!(launch.command().unwrap().spawn().is_err());
        let empty = Launch::default();
        assert!(empty.command().is_err());
    }

    #[test]
    fn the_child_runs_as_the_given_user_and_groups() {
        if !rustix::process::geteuid().is_root() {
            return; // switching users needs root; the agent always is
        }
        let launch = Launch {
            argv: vec![
                b"/bin/sh".to_vec(),
                b"-c".to_vec(),
                b"id -u; id -g; id -G".to_vec(),
            ],
            cwd: b"/".to_vec(),
            user: Some(User {
                uid: 1234,
                gid: 2345,
                groups: vec![2345, 3456],
            }),
            ..Launch::default()
        };
        let out = launch.command().unwrap().output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines, ["1234", "2345", "2345 3456"], "{out:?}");
    }
}
