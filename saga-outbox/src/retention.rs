//! Retention: deletes published messages, expired inbox records, finished
//! sagas and old choreography log entries, in bounded batches, so the tables
//! stay small. It never deletes a saga that is still running or
//! compensating, nor a FAILED one (an operator decides about those).

use std::time::Duration;

use chrono::{DateTime, Utc};
use saga_core::{Result, Store, Worker, clock};

/// How long records are kept, and how the clean-up runs.
#[derive(Clone, Debug, PartialEq)]
pub struct RetentionPolicy {
    /// Published messages older than this are deleted; `None` keeps them.
    pub published: Option<Duration>,
    /// Inbox and step-mark records older than this are deleted; `None` keeps
    /// them. A redelivery older than this is processed again, so keep it
    /// longer than any broker's redelivery window.
    pub processed: Option<Duration>,
    /// Sagas that ended COMPLETED or COMPENSATED longer ago than this are
    /// deleted, history included; `None` keeps them.
    pub finished_sagas: Option<Duration>,
    /// Choreography log entries older than this are deleted; `None` keeps
    /// them.
    pub saga_log: Option<Duration>,
    /// Rows deleted per statement.
    pub batch_size: usize,
    /// Time between two clean-ups.
    pub interval: Duration,
}

impl Default for RetentionPolicy {
    /// Published messages: 1 day; inbox records: 7 days; finished sagas and
    /// the choreography log: 30 days; 1000 rows per statement; every minute.
    fn default() -> Self {
        Self {
            published: Some(Duration::from_secs(24 * 3600)),
            processed: Some(Duration::from_secs(7 * 24 * 3600)),
            finished_sagas: Some(Duration::from_secs(30 * 24 * 3600)),
            saga_log: Some(Duration::from_secs(30 * 24 * 3600)),
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
    /// Finished sagas deleted.
    pub finished_sagas: u64,
    /// Choreography log entries deleted.
    pub saga_log: u64,
}

/// Runs the [`RetentionPolicy`] on a store.
#[derive(Debug)]
pub struct Retention<S> {
    store: S,
    policy: RetentionPolicy,
}

/// What one purge statement deletes from.
#[derive(Clone, Copy)]
enum Kind {
    Published,
    Processed,
    FinishedSagas,
    SagaLog,
}

impl<S: Store + Clone> Retention<S> {
    /// Retention of `store` under `policy`.
    pub fn new(store: S, policy: RetentionPolicy) -> Self {
        Self { store, policy }
    }

    /// Deletes everything past retention now, one bounded batch at a time.
    pub async fn run_once(&self) -> Result<Purged> {
        let now = self.store.now().await;
        let policy = &self.policy;
        let mut purged = Purged::default();
        for (kind, keep, count) in [
            (Kind::Published, policy.published, &mut purged.published),
            (Kind::Processed, policy.processed, &mut purged.processed),
            (
                Kind::FinishedSagas,
                policy.finished_sagas,
                &mut purged.finished_sagas,
            ),
            (Kind::SagaLog, policy.saga_log, &mut purged.saga_log),
        ] {
            if let Some(keep) = keep {
                *count = self.drain(kind, now - clock::to_chrono(keep)).await?;
            }
        }
        Ok(purged)
    }

    /// Purges `kind` before `before`, one batch after the other, until a
    /// batch comes back short; returns how many rows went.
    async fn drain(&self, kind: Kind, before: DateTime<Utc>) -> Result<u64> {
        let batch = self.policy.batch_size.max(1);
        let mut total = 0;
        loop {
            let store = &self.store;
            let deleted = match kind {
                Kind::Published => store.purge_published(before, batch).await?,
                Kind::Processed => store.purge_expired(before, batch).await?,
                Kind::FinishedSagas => store.purge_finished(before, batch).await?,
                Kind::SagaLog => store.purge_log(before, batch).await?,
            };
            total += deleted;
            if deleted < batch as u64 {
                return Ok(total);
            }
        }
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
