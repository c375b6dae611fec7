//! The engine's clock.
//!
//! [`now`] is the wall time read once per process plus the monotonic time that
//! tokio has seen pass since. In production that is the wall clock without its
//! jumps; in a test that pauses tokio's clock (`start_paused = true`), deadlines,
//! leases and backoffs advance with the paused clock, so such tests run fast and
//! the same way every time. Stores never read a clock: every operation that
//! depends on time takes `now` as an argument.

use std::sync::OnceLock;
use std::time::Duration;

use chrono::{DateTime, Utc};

static BASE: OnceLock<(DateTime<Utc>, std::time::Instant)> = OnceLock::new();

/// The current time as the engine sees it.
pub fn now() -> DateTime<Utc> {
    let (wall, base) = *BASE.get_or_init(|| (Utc::now(), std::time::Instant::now()));
    let elapsed = tokio::time::Instant::now()
        .into_std()
        .saturating_duration_since(base);
    wall + to_chrono(elapsed)
}

/// Converts a std duration to chrono's, saturating at chrono's limit.
pub fn to_chrono(duration: Duration) -> chrono::Duration {
    chrono::Duration::from_std(duration).unwrap_or(chrono::Duration::MAX)
}
