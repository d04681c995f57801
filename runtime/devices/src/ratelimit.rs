//! Rate limiting for diagnostics a guest can trigger: a guest that hammers a bad register or
//! floods malformed packets must not flood the VMM's stderr (and whatever collects it). Each
//! call site of [`warn_limited!`] / [`debug_limited!`] gets its own [`RateLimiter`]: at most
//! [`LINES_PER_WINDOW`] lines per [`WINDOW`], then silence, and the next line that gets through
//! is preceded by `N similar messages suppressed`.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Lines each call site may log per window.
pub const LINES_PER_WINDOW: u32 = 10;
/// The window.
pub const WINDOW: Duration = Duration::from_secs(1);

/// What the caller of [`RateLimiter::check`] should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Log the line, after a summary line when `suppressed` is not zero.
    Emit { suppressed: u64 },
    /// Drop the line (it is counted).
    Suppress,
}

#[derive(Debug)]
struct Window {
    start: Option<Instant>,
    lines: u32,
    suppressed: u64,
}

/// A fixed-window limiter, usable as a `static` (const constructor).
#[derive(Debug)]
pub struct RateLimiter {
    max_lines: u32,
    window: Duration,
    state: Mutex<Window>,
}

impl RateLimiter {
    pub const fn new(max_lines: u32, window: Duration) -> Self {
        Self {
            max_lines,
            window,
            state: Mutex::new(Window {
                start: None,
                lines: 0,
                suppressed: 0,
            }),
        }
    }

    /// Whether a line may be logged now.
    pub fn check(&self) -> Verdict {
        self.check_at(Instant::now())
    }

    /// [`RateLimiter::check`] at a given time (tests).
    pub fn check_at(&self, now: Instant) -> Verdict {
        let mut w = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let expired = w
            .start
            .is_none_or(|start| now.saturating_duration_since(start) >= self.window);
        if expired {
            w.start = Some(now);
            w.lines = 0;
        }
        if w.lines >= self.max_lines {
            w.suppressed = w.suppressed.saturating_add(1);
            return Verdict::Suppress;
        }
        w.lines += 1;
        Verdict::Emit {
            suppressed: std::mem::take(&mut w.suppressed),
        }
    }
}

/// Logs at `level` through `limiter`, with the suppressed-lines summary when due.
#[doc(hidden)]
pub fn log_limited(limiter: &RateLimiter, level: log::Level, args: std::fmt::Arguments<'_>) {
    if !log::log_enabled!(level) {
        return;
    }
    if let Verdict::Emit { suppressed } = limiter.check() {
        if suppressed > 0 {
            log::log!(level, "{suppressed} similar messages suppressed");
        }
        log::log!(level, "{args}");
    }
}

/// `log::warn!` limited per call site (see the module documentation).
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => {{
        static LIMITER: $crate::ratelimit::RateLimiter = $crate::ratelimit::RateLimiter::new(
            $crate::ratelimit::LINES_PER_WINDOW,
            $crate::ratelimit::WINDOW,
        );
        $crate::ratelimit::log_limited(&LIMITER, ::log::Level::Warn, format_args!($($arg)+));
    }};
}

/// `log::debug!` limited per call site (see the module documentation).
#[macro_export]
macro_rules! debug_limited {
    ($($arg:tt)+) => {{
        static LIMITER: $crate::ratelimit::RateLimiter = $crate::ratelimit::RateLimiter::new(
            $crate::ratelimit::LINES_PER_WINDOW,
            $crate::ratelimit::WINDOW,
        );
        $crate::ratelimit::log_limited(&LIMITER, ::log::Level::Debug, format_args!($($arg)+));
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_cut_at_the_limit_and_the_rest_is_counted() {
        let limiter = RateLimiter::new(10, Duration::from_secs(1));
        let t0 = Instant::now();
        let emitted = (0..100)
            .filter(|_| matches!(limiter.check_at(t0), Verdict::Emit { .. }))
            .count();
        assert_eq!(emitted, 10);
    }

    #[test]
    fn the_next_window_reports_how_many_lines_were_suppressed() {
        let limiter = RateLimiter::new(2, Duration::from_secs(1));
        let t0 = Instant::now();
        for _ in 0..5 {
            limiter.check_at(t0);
        }
        let later = t0 + Duration::from_millis(1500);
        assert_eq!(limiter.check_at(later), Verdict::Emit { suppressed: 3 });
        assert_eq!(limiter.check_at(later), Verdict::Emit { suppressed: 0 });
        assert_eq!(limiter.check_at(later), Verdict::Suppress);
    }

    #[test]
    fn lines_within_the_limit_pass_without_a_summary() {
        let limiter = RateLimiter::new(3, Duration::from_secs(1));
        let t0 = Instant::now();
        for i in 0..3 {
            let at = t0 + Duration::from_millis(i * 10);
            assert_eq!(limiter.check_at(at), Verdict::Emit { suppressed: 0 });
        }
    }

    #[test]
    fn the_macros_compile_at_any_call_site_and_never_panic() {
        for i in 0..50 {
            crate::warn_limited!("test line {i}");
            crate::debug_limited!("test line {}", i);
        }
    }
}
