//! How any thread asks the VM to stop, and how the VMM thread waits for that.
//!
//! Devices (i8042 reset), vCPU threads (shutdown, errors), signal handlers and the control socket
//! all end up here.
//! The first request wins; later ones are ignored. The waiting thread sleeps on an EventFd, which
//! an async-signal handler may also write to.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why the VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The guest reset the machine (i8042 reset line, KVM system event reset).
    GuestReset,
    /// The guest shut down: triple fault (KVM_EXIT_SHUTDOWN) or a shutdown system event.
    GuestShutdown,
    /// The guest crashed (KVM system event "crash").
    GuestCrash,
    /// Every vCPU halted with interrupts off (only possible without an in-kernel irqchip).
    AllVcpusHalted,
    /// The VMM received this signal (SIGINT, SIGTERM).
    Signal(i32),
    /// A client of the control socket asked for it (`stop`).
    Requested,
    /// A VMM-side failure, described.
    Error(String),
}

/// Errors of the stop machinery.
#[derive(Debug, thiserror::Error)]
pub enum StopError {
    /// The wake-up EventFd could not be created.
    #[error("cannot create the stop event")]
    EventFd(#[source] std::io::Error),
}

/// Shared stop state of one VM.
pub struct StopState {
    reason: Mutex<Option<StopReason>>,
    stopping: AtomicBool,
    wake: EventFd,
}

impl StopState {
    /// A VM that has not been asked to stop.
    pub fn new() -> Result<Self, StopError> {
        Ok(StopState {
            reason: Mutex::new(None),
            stopping: AtomicBool::new(false),
            wake: EventFd::new(EFD_NONBLOCK).map_err(StopError::EventFd)?,
        })
    }

    /// Asks the VM to stop for `reason` (ignored if a reason is already recorded).
    pub fn request(&self, reason: StopReason) {
        {
            let mut r = self.reason.lock().unwrap_or_else(PoisonError::into_inner);
            if r.is_none() {
                *r = Some(reason);
            }
        }
        self.stopping.store(true, Ordering::SeqCst);
        // A full counter only means a wake-up is already pending.
        let _ = self.wake.write(1);
    }

    /// Whether a stop was requested (vCPU threads check this before every KVM_RUN).
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<StopReason> {
        self.reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The EventFd that wakes the waiting thread (signal handlers write to its raw fd).
    pub fn wake_fd(&self) -> &EventFd {
        &self.wake
    }

    /// Blocks until a stop is requested; `poll` runs after every wake-up (and may request one).
    pub fn wait(&self, mut poll: impl FnMut(&StopState)) -> StopReason {
        loop {
            poll(self);
            if let Some(r) = self.reason() {
                return r;
            }
            let mut pfd = libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&self.wake),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: `pfd` is a valid pollfd for the duration of the call; nfds is 1.
            unsafe { libc::poll(&mut pfd, 1, 1000) };
            let _ = self.wake.read();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn first_request_wins_and_wakes_the_waiter() {
        let s = Arc::new(StopState::new().unwrap());
        let s2 = s.clone();
        let t = std::thread::spawn(move || s2.wait(|_| {}));
        std::thread::sleep(std::time::Duration::from_millis(20));
        s.request(StopReason::GuestReset);
        s.request(StopReason::Signal(15));
        assert_eq!(t.join().unwrap(), StopReason::GuestReset);
        assert!(s.is_stopping());
    }
}
