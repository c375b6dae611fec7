//! The engine's clock.
//!
//! [`now`] is the wall time read once per process plus the monotonic time that
//! tokio has seen pass since. In production that is the wall clock without its
//! jumps; in a test that pauses tokio's clock (`start_paused = true`), deadlines,
//! leases and backoffs advance with the paused clock, so such tests run fast and
//! the same way every time.
//!
//! Times that other processes compare (leases, wake-up times, deadlines,
//! retry times) come from the store's clock instead:
//! [`Transactional::now`](crate::Transactional::now). A store with a server
//! answers with the server's time, so hosts whose clocks disagree still agree
//! on when a lease ends; the default is this process clock. Store operations
//! that depend on time take `now` as an argument.

use std::sync::OnceLock;
use std::time::Duration;

use chrono::{DateTime, Utc};

static BASE: OnceLock<(DateTime<Utc>, std::time::Instant)> = OnceLock::new();

/// Microseconds added to [`now`]: a skewed host, for tests.
static SKEW_MICROS: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

/// The current time as this process sees it.
pub fn now() -> DateTime<Utc> {
    let (wall, base) = *BASE.get_or_init(|| (Utc::now(), std::time::Instant::now()));
    let elapsed = tokio::time::Instant::now()
        .into_std()
        .saturating_duration_since(base);
    let skew =
        chrono::Duration::microseconds(SKEW_MICROS.load(std::sync::atomic::Ordering::Relaxed));
    wall + to_chrono(elapsed) + skew
}

/// Makes this process's clock ([`now`]) wrong by `by`, as on a host whose
/// clock drifted: for tests that check that nothing compared across
/// processes depends on it.
#[cfg(feature = "testing")]
pub fn skew(by: chrono::Duration) {
    SKEW_MICROS.store(
        by.num_microseconds().unwrap_or(i64::MAX),
        std::sync::atomic::Ordering::Relaxed,
    );
}

/// Converts a std duration to chrono's, saturating at chrono's limit.
pub fn to_chrono(duration: Duration) -> chrono::Duration {
    chrono::Duration::from_std(duration).unwrap_or(chrono::Duration::MAX)
}
