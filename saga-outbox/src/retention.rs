//! Retention: deletes published messages and expired inbox records, in
//! bounded batches, so the tables stay small.

use std::time::Duration;

use saga_core::{IdempotencyStore, OutboxStore, Result, Worker, clock};

/// How long records are kept, and how the clean-up runs.
#[derive(Clone, Debug, PartialEq)]
pub struct RetentionPolicy {
    /// Published messages older than this are deleted; `None` keeps them.
    pub published: Option<Duration>,
    /// Inbox and step-mark records older than this are deleted; `None` keeps
    /// them. A redelivery older than this is processed again, so keep it
    /// longer than any broker's redelivery window.
    pub processed: Option<Duration>,
    /// Rows deleted per statement.
    pub batch_size: usize,
    /// Time between two clean-ups.
    pub interval: Duration,
}

impl Default for RetentionPolicy {
    /// Published messages: 1 day; inbox records: 7 days; 1000 rows per statement; every minute.
    fn default() -> Self {
        Self {
            published: Some(Duration::from_secs(24 * 3600)),
            processed: Some(Duration::from_secs(7 * 24 * 3600)),
            batch_size: 1000,
            interval: Duration::from_secs(60),
        }
    }
}

/// What one clean-up deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Purged {
    /// Published messages deleted.
    pub published: u64,
    /// Inbox and step-mark records deleted.
    pub processed: u64,
}

/// Runs the [`RetentionPolicy`] on a store.
#[derive(Debug)]
pub struct Retention<S> {
    store: S,
    policy: RetentionPolicy,
}

impl<S: OutboxStore + IdempotencyStore + Clone> Retention<S> {
    /// Retention of `store` under `policy`.
    pub fn new(store: S, policy: RetentionPolicy) -> Self {
        Self { store, policy }
    }

    /// Deletes everything past retention now, one bounded batch at a time.
    pub async fn run_once(&self) -> Result<Purged> {
        let now = clock::now();
        let batch = self.policy.batch_size.max(1);
        let mut purged = Purged::default();
        if let Some(keep) = self.policy.published {
            let before = now - clock::to_chrono(keep);
            loop {
                let deleted = self.store.purge_published(before, batch).await?;
                purged.published += deleted;
                if deleted < batch as u64 {
                    break;
                }
            }
        }
        if let Some(keep) = self.policy.processed {
            let before = now - clock::to_chrono(keep);
            loop {
                let deleted = self.store.purge_expired(before, batch).await?;
                purged.processed += deleted;
                if deleted < batch as u64 {
                    break;
                }
            }
        }
        Ok(purged)
    }

    /// Runs [`run_once`](Self::run_once) every `interval` until shutdown.
    pub fn spawn(self) -> Worker {
        let (mut worker, signal) = Worker::empty();
        worker.spawn(async move {
            while !signal.is_stopping() {
                match self.run_once().await {
                    Ok(purged) => tracing::debug!(?purged, "retention clean-up"),
                    Err(error) => tracing::warn!(%error, "retention clean-up failed; trying again next interval"),
                }
                signal.sleep(self.policy.interval).await;
            }
        });
        worker
    }
}
