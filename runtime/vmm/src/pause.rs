//! Pausing a running VM: the threads that touch guest memory (every vCPU and the device event
//! loop, the gate's *members*) park here until the VM resumes or stops.
//!
//! The requester sets the pause flag, wakes every member (vCPUs are kicked out of KVM_RUN, the
//! event loop gets an event) and waits until all of them are parked. Members look at the flag
//! between two units of work (a KVM exit, a batch of device events), so a parked VM has no guest
//! memory writer left: that is what a snapshot needs. Stopping closes the gate for good, which
//! releases every parked member.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// How often the requester wakes members again while it waits for them to park.
const REWAKE_INTERVAL: Duration = Duration::from_millis(5);

/// Why a pause or resume was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PauseError {
    /// `pause` while already paused.
    #[error("the VM is already paused")]
    AlreadyPaused,
    /// `resume` while running.
    #[error("the VM is not paused")]
    NotPaused,
    /// The VM is stopping: it can be neither paused nor resumed.
    #[error("the VM is stopping")]
    Stopping,
    /// Some member did not park in time (blocked in a device, e.g. on a console nobody reads);
    /// the VM was left running.
    #[error("{parked} of {members} VM threads paused within {timeout:?}; the VM keeps running")]
    Timeout {
        /// Members parked when the requester gave up.
        parked: usize,
        /// Members in all.
        members: usize,
        /// How long the requester waited.
        timeout: Duration,
    },
}

#[derive(Debug)]
struct GateState {
    paused: bool,
    closed: bool,
    members: usize,
    parked: usize,
    /// Bumped by [`PauseGate::poke`]: parked members look for work (snapshot requests).
    pokes: u64,
}

/// The pause state of one VM, shared by its members and the control thread.
#[derive(Debug)]
pub struct PauseGate {
    state: Mutex<GateState>,
    changed: Condvar,
    /// Mirrors `state.paused` so members can check it without taking the lock.
    requested: AtomicBool,
}

impl PauseGate {
    /// A running VM with `members` threads that will [`park`](Self::park) when asked.
    pub fn new(members: usize) -> Self {
        PauseGate {
            state: Mutex::new(GateState {
                paused: false,
                closed: false,
                members,
                parked: 0,
                pokes: 0,
            }),
            changed: Condvar::new(),
            requested: AtomicBool::new(false),
        }
    }

    /// A VM with `members` threads that starts paused: each member parks before its first unit
    /// of work (a VM restored from a snapshot with "stay paused").
    pub fn new_paused(members: usize) -> Self {
        let gate = PauseGate::new(members);
        gate.lock().paused = true;
        gate.requested.store(true, Ordering::SeqCst);
        gate
    }

    /// Waits until every member is parked (after [`new_paused`](Self::new_paused), members park
    /// on their own schedule). False if the VM is not paused, is stopping, or `timeout` passed.
    pub fn wait_parked(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        loop {
            if !s.paused || s.closed {
                return false;
            }
            if s.parked >= s.members {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            s = self
                .changed
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Wakes parked members so that they run their `serve` callback (see
    /// [`park_serving`](Self::park_serving)); they stay parked.
    pub fn poke(&self) {
        let mut s = self.lock();
        s.pokes = s.pokes.wrapping_add(1);
        self.changed.notify_all();
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether members should park now (cheap: checked before every KVM_RUN).
    pub fn pause_requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Whether the VM is paused (or being paused).
    pub fn is_paused(&self) -> bool {
        self.lock().paused
    }

    /// A member parks until the VM resumes or the gate closes; returns at once otherwise.
    pub fn park(&self) {
        self.park_serving(|| {});
    }

    /// [`park`](Self::park), running `serve` (without the gate's lock) once on parking and
    /// again after every [`poke`](Self::poke): a parked vCPU thread answers state requests this
    /// way. The member counts as parked throughout, so the VM stays paused.
    pub fn park_serving(&self, mut serve: impl FnMut()) {
        let mut s = self.lock();
        if !s.paused || s.closed {
            return;
        }
        s.parked += 1;
        self.changed.notify_all();
        let mut seen = s.pokes;
        drop(s);
        serve();
        s = self.lock();
        while s.paused && !s.closed {
            if s.pokes != seen {
                seen = s.pokes;
                drop(s);
                serve();
                s = self.lock();
                continue;
            }
            s = self.changed.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
        s.parked -= 1;
        self.changed.notify_all();
    }

    /// A member leaves for good (its thread ends); a pause no longer waits for it.
    pub fn leave(&self) {
        let mut s = self.lock();
        s.members = s.members.saturating_sub(1);
        self.changed.notify_all();
    }

    /// The VM is stopping: releases parked members; later pause and resume fail.
    pub fn close(&self) {
        let mut s = self.lock();
        s.closed = true;
        self.requested.store(false, Ordering::SeqCst);
        self.changed.notify_all();
    }

    /// Pauses the VM: returns once every member is parked. `wake` gets members to look at the
    /// flag; it runs at once and again every few milliseconds while some are still running. After
    /// `timeout` the pause is undone and refused.
    pub fn pause(&self, timeout: Duration, mut wake: impl FnMut()) -> Result<(), PauseError> {
        {
            let mut s = self.lock();
            if s.closed {
                return Err(PauseError::Stopping);
            }
            if s.paused {
                return Err(PauseError::AlreadyPaused);
            }
            s.paused = true;
            // Set before any wake-up, so a member that wakes always sees it.
            self.requested.store(true, Ordering::SeqCst);
        }
        let deadline = Instant::now() + timeout;
        wake();
        let mut s = self.lock();
        loop {
            if s.closed {
                return Err(PauseError::Stopping);
            }
            if s.parked >= s.members {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                s.paused = false;
                self.requested.store(false, Ordering::SeqCst);
                self.changed.notify_all();
                return Err(PauseError::Timeout {
                    parked: s.parked,
                    members: s.members,
                    timeout,
                });
            }
            let wait = REWAKE_INTERVAL.min(deadline - now);
            let (guard, result) = self
                .changed
                .wait_timeout(s, wait)
                .unwrap_or_else(PoisonError::into_inner);
            s = guard;
            if result.timed_out() {
                drop(s);
                wake();
                s = self.lock();
            }
        }
    }

    /// Resumes a paused VM: releases every parked member. It does not wait for them to be
    /// scheduled: on a busy host that wait would only measure the requester's own wake-up.
    pub fn resume(&self) -> Result<(), PauseError> {
        let mut s = self.lock();
        if s.closed {
            return Err(PauseError::Stopping);
        }
        if !s.paused {
            return Err(PauseError::NotPaused);
        }
        s.paused = false;
        self.requested.store(false, Ordering::SeqCst);
        self.changed.notify_all();
        Ok(())
    }
}

/// Membership of one thread: leaves the gate when dropped (also when the thread panics), so a
/// pause never waits for a thread that is gone.
pub struct GateMember<'a>(pub &'a PauseGate);

impl Drop for GateMember<'_> {
    fn drop(&mut self) {
        self.0.leave();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;
    use std::thread::JoinHandle;

    const LONG: Duration = Duration::from_secs(10);

    /// Members that count their work units and park between them, as vCPUs do.
    fn spawn_workers(gate: &Arc<PauseGate>, n: usize) -> (Vec<JoinHandle<()>>, Arc<AtomicU64>) {
        let work = Arc::new(AtomicU64::new(0));
        let threads = (0..n)
            .map(|_| {
                let (gate, work) = (gate.clone(), work.clone());
                std::thread::spawn(move || {
                    let _member = GateMember(&gate);
                    loop {
                        if gate.pause_requested() {
                            gate.park();
                            continue;
                        }
                        if gate.lock().closed {
                            return;
                        }
                        work.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_micros(200));
                    }
                })
            })
            .collect();
        (threads, work)
    }

    #[test]
    fn pause_parks_every_member_and_resume_lets_them_run() {
        let gate = Arc::new(PauseGate::new(3));
        let (threads, work) = spawn_workers(&gate, 3);
        let mut wakes = 0;
        gate.pause(LONG, || wakes += 1).unwrap();
        assert!(wakes >= 1);
        assert!(gate.is_paused());
        assert_eq!(gate.lock().parked, 3);
        let frozen = work.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(
            work.load(Ordering::SeqCst),
            frozen,
            "a member worked while paused"
        );

        gate.resume().unwrap();
        assert!(!gate.is_paused());
        let deadline = Instant::now() + LONG;
        while work.load(Ordering::SeqCst) == frozen {
            assert!(Instant::now() < deadline, "members did not resume");
            std::thread::sleep(Duration::from_millis(1));
        }
        gate.close();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(gate.lock().members, 0);
    }

    #[test]
    fn wrong_state_requests_are_refused() {
        let gate = Arc::new(PauseGate::new(1));
        let (threads, _) = spawn_workers(&gate, 1);
        assert_eq!(gate.resume(), Err(PauseError::NotPaused));
        gate.pause(LONG, || {}).unwrap();
        assert_eq!(gate.pause(LONG, || {}), Err(PauseError::AlreadyPaused));
        gate.resume().unwrap();
        gate.close();
        assert_eq!(gate.pause(LONG, || {}), Err(PauseError::Stopping));
        assert_eq!(gate.resume(), Err(PauseError::Stopping));
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn closing_releases_parked_members() {
        let gate = Arc::new(PauseGate::new(2));
        let (threads, _) = spawn_workers(&gate, 2);
        gate.pause(LONG, || {}).unwrap();
        gate.close();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(gate.lock().parked, 0);
    }

    #[test]
    fn a_member_that_never_parks_times_out_and_the_vm_keeps_running() {
        let gate = PauseGate::new(1);
        let mut wakes = 0;
        let err = gate
            .pause(Duration::from_millis(30), || wakes += 1)
            .unwrap_err();
        assert!(matches!(
            err,
            PauseError::Timeout {
                parked: 0,
                members: 1,
                ..
            }
        ));
        assert!(wakes > 1, "the requester did not wake members again");
        assert!(!gate.is_paused() && !gate.pause_requested());
    }

    #[test]
    fn parked_members_serve_pokes_and_a_gate_can_start_paused() {
        let gate = Arc::new(PauseGate::new_paused(1));
        assert!(gate.is_paused() && gate.pause_requested());
        let served = Arc::new(AtomicU64::new(0));
        let (g, n) = (gate.clone(), served.clone());
        let t = std::thread::spawn(move || {
            let _member = GateMember(&g);
            g.park_serving(|| {
                n.fetch_add(1, Ordering::SeqCst);
            });
        });
        assert!(gate.wait_parked(LONG));
        // Once on parking, once per poke; the member stays parked.
        let deadline = Instant::now() + LONG;
        while served.load(Ordering::SeqCst) < 1 {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(1));
        }
        gate.poke();
        while served.load(Ordering::SeqCst) < 2 {
            assert!(Instant::now() < deadline, "a poke was not served");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(gate.wait_parked(LONG));
        gate.resume().unwrap();
        t.join().unwrap();
        assert!(!gate.wait_parked(Duration::from_millis(1)));
    }

    #[test]
    fn members_that_left_are_not_waited_for() {
        let gate = PauseGate::new(2);
        gate.leave();
        gate.leave();
        gate.pause(LONG, || {}).unwrap();
        assert!(gate.is_paused());
    }
}
