//! PID 1's signals: all of them blocked and taken synchronously, sent by number, and the clean
//! signal state every started process expects.
//!
//! Signals are sent by raw number because the host may name any of 1..=64, real-time ones
//! included, and `kill(-1)` reaches every process; neither rustix's nor nix's signal types
//! cover those, so [`send`] is the one place that calls the C library for it.

use std::io;

use nix::sys::signal::{sigprocmask, SigSet, SigmaskHow};
use rustix::process::Signal;

/// Blocks every signal in this process; they are then taken by [`wait`].
pub fn block_all() {
    // SIG_BLOCK with a full set cannot fail; there would be nothing to do about it anyway.
    let _ = sigprocmask(SigmaskHow::SIG_BLOCK, Some(&SigSet::all()), None);
}

/// Waits for the next blocked signal and returns its number.
pub fn wait() -> i32 {
    let all = SigSet::all();
    loop {
        // SAFETY: `all` is an initialised sigset_t that outlives the call; a null siginfo
        // pointer is allowed. (nix's SigSet::wait panics on a real-time signal.)
        let sig = unsafe { libc::sigwaitinfo(all.as_ref(), std::ptr::null_mut()) };
        if sig > 0 {
            return sig;
        }
    }
}

/// kill(2): `sig` to `pid` (a negative pid: that process group; -1: every process but PID 1).
pub fn send(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: kill only takes integers and touches no memory of this process.
    if unsafe { libc::kill(pid, sig) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Gives a new process what it expects from its parent: default dispositions and an empty mask
/// (PID 1 blocks every signal and std ignores SIGPIPE; both would be inherited).
///
/// # Safety
/// Only for the child between fork and exec: it changes the whole process's signal state.
pub unsafe fn reset_for_child() {
    for sig in 1..libc::SIGRTMIN() {
        if sig != Signal::KILL.as_raw() && sig != Signal::STOP.as_raw() {
            // SAFETY: installing SIG_DFL runs no code; signal() is async-signal-safe.
            unsafe { libc::signal(sig, libc::SIG_DFL) };
        }
    }
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signal_to_a_missing_process_is_an_error() {
        // Far above pid_max: no such process.
        let e = send(i32::MAX, 0).unwrap_err();
        assert_eq!(
            e.raw_os_error(),
            Some(rustix::io::Errno::SRCH.raw_os_error())
        );
        assert!(send(std::process::id() as i32, 0).is_ok());
    }
}
