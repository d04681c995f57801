//! Signals: SIGINT/SIGTERM stop the VM; a real-time "kick" signal gets a vCPU thread out of
//! KVM_RUN.
//!
//! The kick handler sets `immediate_exit` in the interrupted thread's `kvm_run` page, so a kick
//! that lands just before KVM_RUN is not lost: KVM then returns EINTR at once.

use std::cell::Cell;
use std::os::raw::{c_int, c_void};
use std::ptr;
use std::sync::atomic::{AtomicI32, Ordering};

use kvm_bindings::kvm_run;

thread_local! {
    /// The calling vCPU thread's kvm_run page, or null.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(ptr::null_mut()) };
}

/// Raw fd of the EventFd that wakes the VMM thread; -1 before a VM runs.
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);
/// The last stop signal received (0: none).
static PENDING_STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

/// Errors installing handlers.
#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    /// sigaction failed.
    #[error("cannot install a handler for signal {0}")]
    Install(c_int, #[source] std::io::Error),
}

/// The signal used to kick vCPU threads.
pub fn kick_signal() -> c_int {
    libc::SIGRTMIN()
}

extern "C" fn kick_handler(_: c_int, _: *mut libc::siginfo_t, _: *mut c_void) {
    let _ = KVM_RUN.try_with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: a non-null pointer is this thread's mapped kvm_run page, published by
            // `set_current_kvm_run` and cleared before the VcpuFd (and its mapping) is dropped.
            unsafe { ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
    });
}

extern "C" fn stop_handler(sig: c_int, _: *mut libc::siginfo_t, _: *mut c_void) {
    PENDING_STOP_SIGNAL.store(sig, Ordering::SeqCst);
    let fd = WAKE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; `one` is a valid 8-byte buffer.
        unsafe { libc::write(fd, ptr::addr_of!(one).cast(), 8) };
    }
}

fn install(
    sig: c_int,
    handler: extern "C" fn(c_int, *mut libc::siginfo_t, *mut c_void),
) -> Result<(), SignalError> {
    // SAFETY: a zeroed sigaction is a valid starting point; we set the handler and flags, and
    // sigemptyset initialises the mask in place.
    let ret = unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = handler as usize;
        act.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut act.sa_mask);
        libc::sigaction(sig, &act, ptr::null_mut())
    };
    if ret != 0 {
        return Err(SignalError::Install(sig, std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Installs the kick handler (idempotent). No SA_RESTART: KVM_RUN must return EINTR.
pub fn install_kick_handler() -> Result<(), SignalError> {
    install(kick_signal(), kick_handler)
}

/// Makes SIGINT and SIGTERM request a stop by waking `wake_fd` (an EventFd that outlives the
/// handlers: the VMM's stop event).
pub fn install_stop_handlers(wake_fd: c_int) -> Result<(), SignalError> {
    WAKE_FD.store(wake_fd, Ordering::SeqCst);
    install(libc::SIGINT, stop_handler)?;
    install(libc::SIGTERM, stop_handler)
}

/// The stop signal received since the last call, if any.
pub fn take_pending_stop_signal() -> Option<c_int> {
    Some(PENDING_STOP_SIGNAL.swap(0, Ordering::SeqCst)).filter(|s| *s != 0)
}

/// Publishes the calling vCPU thread's kvm_run page to the kick handler.
pub fn set_current_kvm_run(run: *mut kvm_run) {
    KVM_RUN.with(|p| p.set(run));
}

/// Withdraws the page published by [`set_current_kvm_run`].
pub fn clear_current_kvm_run() {
    KVM_RUN.with(|p| p.set(ptr::null_mut()));
}

/// Sends the kick signal to `thread`, which must not have been joined yet (callers keep its
/// JoinHandle alive, or, for the control socket, are shut down before the join).
pub fn kick(thread: libc::pthread_t) {
    // SAFETY: per this function's contract `thread` has not been joined, so the id is valid;
    // pthread_kill only delivers a signal.
    unsafe { libc::pthread_kill(thread, kick_signal()) };
}
