//! What a rate-limited device needs besides its buckets: a timer the VMM's event loop watches
//! (a timerfd), the queues parked until it fires, and the clock (injectable for tests).
//!
//! A queue whose bucket is empty is parked: the device stops taking its chains (or, for net
//! rx, stops reading the tap) and arms the timer for when tokens return. When the timer fires
//! the parked queues are reported as unfinished work, so the event loop runs them again the
//! usual way. Nothing here runs for a device without limits.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::time::{
    timerfd_create, timerfd_settime, Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags,
    Timespec,
};

use super::QueueSet;
use crate::rate_limiter::{RateLimitConfig, RateLimiter};

/// Where a device reads the time (tests pass a clock they move by hand).
pub type Clock = Arc<dyn Fn() -> Instant + Send + Sync>;

/// The timer and the parked queues of one device.
pub struct Throttle {
    timer: OwnedFd,
    clock: Clock,
    /// When the armed timer fires (`None`: disarmed).
    deadline: Option<Instant>,
    parked: QueueSet,
}

impl Throttle {
    /// A disarmed timer on the system's monotonic clock.
    pub fn new() -> std::io::Result<Self> {
        let timer = timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )?;
        Ok(Self {
            timer,
            clock: Arc::new(Instant::now),
            deadline: None,
            parked: QueueSet::default(),
        })
    }

    /// Replaces the clock (tests).
    pub fn set_clock(&mut self, clock: Clock) {
        self.clock = clock;
    }

    pub fn now(&self) -> Instant {
        (self.clock)()
    }

    /// The timerfd the event loop watches (level-triggered: readable once expired).
    pub fn fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }

    /// Parks `queue` until `wait` has passed, arming the timer unless it fires sooner already.
    pub fn park(&mut self, queue: usize, wait: Duration) {
        self.parked.insert(queue);
        let wait = wait.max(Duration::from_micros(1));
        let deadline = self.now() + wait;
        if self.deadline.is_some_and(|d| d <= deadline) {
            return;
        }
        let spec = Itimerspec {
            it_interval: Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: Timespec {
                tv_sec: i64::try_from(wait.as_secs()).unwrap_or(i64::MAX),
                tv_nsec: i64::from(wait.subsec_nanos()),
            },
        };
        match timerfd_settime(&self.timer, TimerfdTimerFlags::empty(), &spec) {
            Ok(_) => self.deadline = Some(deadline),
            // Without a timer the queue would stall for good: it stays parked and is resumed
            // by the next guest notification or backend event instead.
            Err(e) => crate::warn_limited!("cannot arm a rate limiter timer: {e}"),
        }
    }

    /// Whether `queue` waits for the timer.
    pub fn is_parked(&self, queue: usize) -> bool {
        self.parked.contains(queue)
    }

    /// Whether the timer is armed.
    pub fn is_armed(&self) -> bool {
        self.deadline.is_some()
    }

    /// The timer fired (or was woken): clears it and returns the queues to run again.
    pub fn expired(&mut self) -> QueueSet {
        let mut buf = [0u8; 8];
        // Nonblocking: a spurious wake-up reads nothing.
        let _ = rustix::io::read(&self.timer, &mut buf);
        self.deadline = None;
        std::mem::take(&mut self.parked)
    }

    /// Forgets parked queues (device reset); a timer still armed fires into an empty set.
    pub fn clear(&mut self) {
        self.parked = QueueSet::default();
    }
}

/// The timer of a device that may be rate limited; without one, limits are refused.
pub(crate) fn new_throttle() -> Option<Throttle> {
    Throttle::new()
        .map_err(|e| log::warn!("no rate limiter timer, limits will be refused: {e}"))
        .ok()
}

/// A queue's limiter: `None` when unlimited, so the hot path is one `Option` check.
pub fn limiter_for(config: RateLimitConfig, now: Instant) -> Option<RateLimiter> {
    (!config.is_unlimited()).then(|| RateLimiter::new(config, now))
}

/// A clock tests move by hand.
#[cfg(test)]
#[derive(Clone)]
pub(crate) struct ManualClock(Arc<std::sync::Mutex<Instant>>);

#[cfg(test)]
impl ManualClock {
    pub(crate) fn new() -> Self {
        Self(Arc::new(std::sync::Mutex::new(Instant::now())))
    }
    pub(crate) fn advance(&self, by: Duration) {
        let mut now = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *now += by;
    }
    pub(crate) fn clock(&self) -> Clock {
        let me = self.0.clone();
        Arc::new(move || *me.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parking_arms_the_timer_once_for_the_earliest_deadline_and_expiry_resumes_the_queues() {
        let mut t = Throttle::new().unwrap();
        assert!(!t.is_armed());
        t.park(0, Duration::from_millis(1));
        t.park(1, Duration::from_secs(10));
        assert!(t.is_armed() && t.is_parked(0) && t.is_parked(1));
        // The timer fires after about 1 ms, not 10 s.
        let mut fds = [rustix::event::PollFd::new(
            &t.timer,
            rustix::event::PollFlags::IN,
        )];
        let timeout = rustix::event::Timespec {
            tv_sec: 5,
            tv_nsec: 0,
        };
        assert_eq!(rustix::event::poll(&mut fds, Some(&timeout)).unwrap(), 1);
        let resumed = t.expired();
        assert_eq!(resumed.iter().collect::<Vec<_>>(), [0, 1]);
        assert!(!t.is_armed() && !t.is_parked(0));
    }
}
