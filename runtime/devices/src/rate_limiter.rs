//! I/O rate limiters for virtio queues: token buckets for bytes and operations, each with a
//! rate per second and a burst (the bucket's size). Time is always passed in, so the buckets
//! are tested with a made-up clock; the devices pass `Instant::now()`.
//!
//! A request larger than the burst is not refused forever: it is admitted once the bucket is
//! full and leaves it in debt, which later refills pay first. Long-run throughput therefore
//! stays at the rate whatever the request sizes.

use std::time::{Duration, Instant};

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// A rate and a burst, as configured (the value every front end carries).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BucketConfig {
    /// Tokens added per second (must be above zero).
    pub rate: u64,
    /// The bucket's size; 0 means one second's worth (`rate`).
    pub burst: u64,
}

impl BucketConfig {
    /// The bucket's size.
    pub fn capacity(&self) -> u64 {
        if self.burst == 0 {
            self.rate
        } else {
            self.burst
        }
    }
}

/// Limits of one queue: either bucket may be absent (unlimited in that dimension).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimitConfig {
    pub bandwidth: Option<BucketConfig>,
    pub ops: Option<BucketConfig>,
}

impl RateLimitConfig {
    /// Whether nothing is limited.
    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }
}

/// One token bucket. Tokens are kept in billionths so that refills of a few nanoseconds are
/// not rounded away; the balance may go below zero (see the module documentation).
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u64,
    capacity: u64,
    /// Tokens times 10^9.
    balance: i128,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket. A zero rate is taken as 1 token per second (the front ends refuse it).
    pub fn new(config: BucketConfig, now: Instant) -> Self {
        let rate = config.rate.max(1);
        let capacity = config.capacity().max(1);
        Self {
            rate,
            capacity,
            balance: scaled(capacity),
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_nanos();
        self.last = self.last.max(now);
        let added = elapsed.saturating_mul(u128::from(self.rate));
        let added = i128::try_from(added).unwrap_or(i128::MAX);
        self.balance = self
            .balance
            .saturating_add(added)
            .min(scaled(self.capacity));
    }

    /// What must be in the bucket before `cost` is admitted (at most a full bucket).
    fn threshold(&self, cost: u64) -> i128 {
        scaled(cost.min(self.capacity))
    }

    /// How long until `cost` could be admitted (zero if it can be now).
    fn wait_for(&mut self, cost: u64, now: Instant) -> Duration {
        self.refill(now);
        let missing = self.threshold(cost).saturating_sub(self.balance);
        if missing <= 0 {
            return Duration::ZERO;
        }
        // Round up: waking a nanosecond early would only re-arm the timer.
        let nanos = (missing as u128).div_ceil(u128::from(self.rate));
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    fn take(&mut self, cost: u64) {
        self.balance = self.balance.saturating_sub(scaled(cost));
    }

    /// Whole tokens in the bucket now (negative while in debt).
    pub fn tokens(&mut self, now: Instant) -> i64 {
        self.refill(now);
        i64::try_from(self.balance / scaled(1)).unwrap_or(i64::MIN)
    }
}

fn scaled(tokens: u64) -> i128 {
    i128::from(tokens) * NANOS_PER_SEC as i128
}

/// The bytes and ops buckets of one queue.
#[derive(Debug, Clone, Default)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
}

impl RateLimiter {
    /// Full buckets for `config`.
    pub fn new(config: RateLimitConfig, now: Instant) -> Self {
        Self {
            bandwidth: config.bandwidth.map(|c| TokenBucket::new(c, now)),
            ops: config.ops.map(|c| TokenBucket::new(c, now)),
        }
    }

    /// Whether neither bucket is set: callers skip the limiter entirely.
    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }

    /// Admits one operation of `bytes` and takes its tokens, or takes nothing and says how long
    /// to wait before asking again. Both buckets must agree, so a refused request costs
    /// nothing.
    pub fn consume(&mut self, bytes: u64, now: Instant) -> Result<(), Duration> {
        let wait_bytes = self
            .bandwidth
            .as_mut()
            .map_or(Duration::ZERO, |b| b.wait_for(bytes, now));
        let wait_ops = self
            .ops
            .as_mut()
            .map_or(Duration::ZERO, |b| b.wait_for(1, now));
        let wait = wait_bytes.max(wait_ops);
        if !wait.is_zero() {
            return Err(wait);
        }
        if let Some(b) = &mut self.bandwidth {
            b.take(bytes);
        }
        if let Some(b) = &mut self.ops {
            b.take(1);
        }
        Ok(())
    }

    /// Takes tokens for an operation already done (net rx: the frame's size is known only
    /// once it was read); the debt delays what comes next.
    pub fn charge(&mut self, bytes: u64, now: Instant) {
        if let Some(b) = &mut self.bandwidth {
            b.refill(now);
            b.take(bytes);
        }
        if let Some(b) = &mut self.ops {
            b.refill(now);
            b.take(1);
        }
    }

    /// How long until one more operation of `bytes` could pass (zero: now).
    pub fn wait_for(&mut self, bytes: u64, now: Instant) -> Duration {
        let wait_bytes = self
            .bandwidth
            .as_mut()
            .map_or(Duration::ZERO, |b| b.wait_for(bytes, now));
        let wait_ops = self
            .ops
            .as_mut()
            .map_or(Duration::ZERO, |b| b.wait_for(1, now));
        wait_bytes.max(wait_ops)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn bw(rate: u64, burst: u64) -> RateLimitConfig {
        RateLimitConfig {
            bandwidth: Some(BucketConfig { rate, burst }),
            ops: None,
        }
    }

    #[test]
    fn a_full_bucket_admits_its_burst_then_refuses_with_the_time_to_refill() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(bw(1000, 500), t0);
        assert_eq!(l.consume(500, t0), Ok(()));
        assert_eq!(l.consume(100, t0), Err(Duration::from_millis(100)));
        assert_eq!(l.consume(100, t0 + Duration::from_millis(100)), Ok(()));
    }

    #[test]
    fn refills_never_exceed_the_burst() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(bw(1000, 200), t0);
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(l.consume(200, later), Ok(()));
        assert!(l.consume(1, later).is_err());
    }

    #[test]
    fn a_zero_burst_means_one_second_of_tokens() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(bw(1000, 0), t0);
        assert_eq!(l.consume(1000, t0), Ok(()));
        assert!(l.consume(1, t0).is_err());
    }

    #[test]
    fn small_refills_accumulate_without_rounding_loss() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(bw(1000, 1000), t0);
        l.consume(1000, t0).unwrap();
        // 1000 steps of 1 µs each add 1 token in total (1 ms at 1000/s).
        let mut now = t0;
        for _ in 0..1000 {
            now += Duration::from_micros(1);
            let _ = l.wait_for(1, now);
        }
        assert_eq!(l.consume(1, now), Ok(()));
    }

    #[test]
    fn a_request_larger_than_the_bucket_passes_when_full_and_leaves_a_debt() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(bw(1000, 100), t0);
        assert_eq!(l.consume(1000, t0), Ok(()), "a full bucket admits it");
        // 900 tokens of debt and 100 to refill: one second before anything passes again.
        assert_eq!(l.consume(1, t0), Err(Duration::from_millis(901)));
        let mut bucket = l.bandwidth.clone().unwrap();
        assert_eq!(bucket.tokens(t0), -900);
        assert_eq!(l.consume(1, t0 + Duration::from_millis(901)), Ok(()));
    }

    #[test]
    fn large_requests_still_average_out_at_the_rate() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(bw(1_000_000, 4096), t0);
        let mut now = t0;
        let mut sent = 0u64;
        while sent < 10_000_000 {
            match l.consume(65536, now) {
                Ok(()) => sent += 65536,
                Err(wait) => now += wait,
            }
        }
        let secs = now.duration_since(t0).as_secs_f64();
        assert!((9.9..10.1).contains(&secs), "took {secs} s");
    }

    #[test]
    fn ops_and_bytes_both_gate_and_a_refusal_takes_no_tokens() {
        let t0 = Instant::now();
        let config = RateLimitConfig {
            bandwidth: Some(BucketConfig {
                rate: 1000,
                burst: 1000,
            }),
            ops: Some(BucketConfig { rate: 2, burst: 2 }),
        };
        let mut l = RateLimiter::new(config, t0);
        assert_eq!(l.consume(600, t0), Ok(()));
        assert_eq!(l.consume(300, t0), Ok(()));
        // Out of ops though bytes remain: half a second for the next op.
        assert_eq!(l.consume(10, t0), Err(Duration::from_millis(500)));
        // Short of bytes (600 of 800) though an op is back: the ops bucket keeps its token.
        let later = t0 + Duration::from_millis(500);
        assert_eq!(l.consume(800, later), Err(Duration::from_millis(200)));
        assert_eq!(l.consume(10, later), Ok(()));
    }

    #[test]
    fn charging_after_the_fact_delays_the_next_operation() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(bw(1000, 1000), t0);
        l.charge(1500, t0);
        assert_eq!(l.wait_for(1, t0), Duration::from_millis(501));
    }

    #[test]
    fn an_unlimited_limiter_admits_everything_at_once() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(RateLimitConfig::default(), t0);
        assert!(l.is_unlimited());
        assert_eq!(l.consume(u64::MAX, t0), Ok(()));
        assert_eq!(l.wait_for(u64::MAX, t0), Duration::ZERO);
    }

    #[test]
    fn a_clock_going_backwards_neither_panics_nor_adds_tokens() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut l = RateLimiter::new(bw(1000, 1000), t0);
        l.consume(1000, t0).unwrap();
        assert!(l.consume(1, t0 - Duration::from_secs(5)).is_err());
    }
}
