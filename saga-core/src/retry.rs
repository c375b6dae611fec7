//! Retry policy: how many attempts, and how long to wait between them.

use std::time::Duration;

/// Exponential backoff with jitter, bounded by a number of attempts.
///
/// Attempt numbers start at 1. After attempt `n` fails, the wait before
/// attempt `n + 1` is `initial * multiplier^(n-1)`, capped at `max_backoff`,
/// then reduced by a random share of at most `jitter` (so concurrent retries
/// spread out instead of arriving together).
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Total attempts, the first included. 1 means no retry.
    pub max_attempts: u32,
    /// Wait after the first failure.
    pub initial_backoff: Duration,
    /// Upper bound of any wait.
    pub max_backoff: Duration,
    /// Growth factor between waits.
    pub multiplier: f64,
    /// Share (0.0 to 1.0) of each wait that is randomized away.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    /// 5 attempts, 100 ms doubling up to 30 s, 20 % jitter.
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            multiplier: 2.0,
            jitter: 0.2,
        }
    }
}

impl RetryPolicy {
    /// No retry: the first failure is final.
    pub fn never() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// Retries for as long as it takes (`max_attempts` is `u32::MAX`), with
    /// the default backoff: for failures that pass, such as a broker outage.
    pub fn forever() -> Self {
        Self {
            max_attempts: u32::MAX,
            ..Self::default()
        }
    }

    /// The default policy with `max_attempts` attempts.
    pub fn attempts(max_attempts: u32) -> Self {
        Self {
            max_attempts: max_attempts.max(1),
            ..Self::default()
        }
    }

    /// Sets the first and the largest wait.
    #[must_use]
    pub fn with_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial;
        self.max_backoff = max.max(initial);
        self
    }

    /// Sets the jitter share (clamped to 0.0..=1.0).
    #[must_use]
    pub fn with_jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter.clamp(0.0, 1.0);
        self
    }

    /// Whether attempt `failed_attempt` may be followed by another.
    pub fn allows_retry_after(&self, failed_attempt: u32) -> bool {
        failed_attempt < self.max_attempts
    }

    /// The wait after attempt `failed_attempt` (1-based) failed.
    pub fn backoff(&self, failed_attempt: u32) -> Duration {
        let exponent = failed_attempt.saturating_sub(1).min(64) as i32;
        let base = self.initial_backoff.as_secs_f64() * self.multiplier.max(1.0).powi(exponent);
        let capped = base.min(self.max_backoff.as_secs_f64());
        let jitter = self.jitter.clamp(0.0, 1.0) * fastrand::f64();
        Duration::from_secs_f64(capped * (1.0 - jitter))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let policy = RetryPolicy::attempts(10)
            .with_backoff(Duration::from_millis(100), Duration::from_secs(1))
            .with_jitter(0.0);
        assert_eq!(policy.backoff(1), Duration::from_millis(100));
        assert_eq!(policy.backoff(2), Duration::from_millis(200));
        assert_eq!(policy.backoff(3), Duration::from_millis(400));
        assert_eq!(policy.backoff(9), Duration::from_secs(1));
        assert!(policy.allows_retry_after(9));
        assert!(!policy.allows_retry_after(10));
    }

    #[test]
    fn jitter_only_shortens_within_its_share() {
        let policy = RetryPolicy::attempts(3)
            .with_backoff(Duration::from_millis(100), Duration::from_secs(1))
            .with_jitter(0.5);
        for _ in 0..1000 {
            let wait = policy.backoff(1);
            assert!(wait <= Duration::from_millis(100));
            assert!(wait >= Duration::from_millis(50));
        }
    }

    #[test]
    fn forever_always_allows_another_attempt() {
        let policy = RetryPolicy::forever();
        assert!(policy.allows_retry_after(1));
        assert!(policy.allows_retry_after(1_000_000));
        assert!(policy.backoff(1_000_000) <= policy.max_backoff);
    }

    #[test]
    fn never_means_one_attempt() {
        assert!(!RetryPolicy::never().allows_retry_after(1));
    }
}
