//! The outbox relay: moves messages from any [`OutboxStore`] to any
//! [`Transport`].
//!
//! A [`Relay`] waits for a wake-up from the store (or its poll interval),
//! claims a batch under a lease, publishes it and marks each message published
//! only after the broker confirmed it. Messages of one ordering key go out one
//! at a time, in order: message k+1 is published only after message k was
//! confirmed, and when k fails, k+1 waits behind it (other keys keep
//! flowing). A publish that fails retryably is retried with exponential
//! backoff, by default for as long as it takes (a broker outage never turns
//! a message into a dead letter); a permanent error dead-letters the message
//! at once with its error. Several relays can share one store: the
//! claim's lease keeps them from publishing the same message while all are
//! alive, and a relay that dies leaves leases that expire, so another relay
//! publishes its messages (at-least-once; consumers deduplicate). A relay
//! that only stalled past its lease (a long pause, a hung broker call) is
//! fenced: once another relay took its messages over, the store refuses its
//! marks, failures and dead letters, so a message is never both published
//! and dead, and no message of a key overtakes one the new owner holds.
//!
//! Each batch runs in a `relay_batch` tracing span; counts and lag go to the
//! `metrics` facade under the names in [`metrics_names`]. [`Retention`]
//! deletes published messages, expired inbox records, finished sagas and old
//! choreography log entries in bounded batches.
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//! use saga_core::memory::{MemoryStore, MemoryTransport};
//! use saga_outbox::{Relay, RelayConfig};
//!
//! # async fn run() -> saga_core::Result<()> {
//! let store = MemoryStore::new();
//! let transport = Arc::new(MemoryTransport::default());
//! let relay = Relay::new(store.clone(), transport, RelayConfig::default()).spawn();
//! // ... services write into `store`'s outbox in their transactions ...
//! saga_outbox::wait_until_delivered(&store, Duration::from_secs(5)).await?;
//! relay.shutdown().await;
//! # Ok(()) }
//! ```

mod retention;

pub use retention::{Purged, Retention, RetentionPolicy};

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use saga_core::clock;
use saga_core::store::{ClaimRequest, OutboxRecord};
use saga_core::{
    Error, MessageId, OutboxEntry, OutboxStore, Result, RetryPolicy, Transport, Worker,
};
use tracing::Instrument;

/// How a relay runs.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// This relay's name in leases; unique per running relay.
    pub owner: String,
    /// Messages claimed per batch.
    pub batch_size: usize,
    /// Longest wait between two looks at the store when no wake-up comes.
    pub poll_interval: Duration,
    /// How long claimed messages are protected from other relays.
    pub lease: Duration,
    /// Attempts and backoff of publishes that fail retryably (broker
    /// unreachable, a publish refused for now). The default retries forever,
    /// backing off up to 30 s: a broker outage never dead-letters a message,
    /// which waits in the outbox (see the lag gauge) and holds back its key.
    /// A permanent error (a message the broker can never take) dead-letters
    /// at once, whatever this says.
    pub retry: RetryPolicy,
    /// How often the lag gauges are refreshed (each refresh counts the pending messages).
    pub lag_interval: Duration,
}

impl Default for RelayConfig {
    /// A unique owner, batches of 100, polling every 250 ms, 30 s leases,
    /// retryable failures retried forever, backing off from 100 ms to 30 s.
    fn default() -> Self {
        Self {
            owner: format!("relay-{}", MessageId::new()),
            batch_size: 100,
            poll_interval: Duration::from_millis(250),
            lease: Duration::from_secs(30),
            retry: RetryPolicy::forever()
                .with_backoff(Duration::from_millis(100), Duration::from_secs(30)),
            lag_interval: Duration::from_secs(5),
        }
    }
}

impl RelayConfig {
    /// Sets the owner name.
    #[must_use]
    pub fn owner(mut self, owner: impl Into<String>) -> Self {
        self.owner = owner.into();
        self
    }

    /// Sets the batch size.
    #[must_use]
    pub fn batch_size(mut self, size: usize) -> Self {
        self.batch_size = size.max(1);
        self
    }

    /// Sets the poll interval.
    #[must_use]
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// Sets the lease.
    #[must_use]
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Sets how often the lag gauges are refreshed.
    #[must_use]
    pub fn lag_interval(mut self, interval: Duration) -> Self {
        self.lag_interval = interval;
        self
    }

    /// Sets the retry policy of failing publishes.
    #[must_use]
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }
}

/// What one batch did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchReport {
    /// Messages claimed.
    pub claimed: usize,
    /// Messages the broker confirmed.
    pub published: usize,
    /// Messages whose publish failed and that wait for a retry.
    pub failed: usize,
    /// Messages moved to the dead-letter list.
    pub dead_lettered: usize,
    /// Messages given back unpublished because an earlier message of their key failed.
    pub released: usize,
}

/// Publishes what an outbox holds: see the [crate documentation](crate).
pub struct Relay<S: OutboxStore> {
    store: S,
    transport: Arc<dyn Transport>,
    config: RelayConfig,
}

impl<S: OutboxStore> std::fmt::Debug for Relay<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<S: OutboxStore> Relay<S> {
    /// A relay from `store` to `transport`.
    pub fn new(store: S, transport: Arc<dyn Transport>, config: RelayConfig) -> Self {
        Self {
            store,
            transport,
            config,
        }
    }

    /// Claims and publishes one batch.
    pub async fn run_once(&self) -> Result<BatchReport> {
        let now = self.store.now().await;
        let records = self
            .store
            .claim(&ClaimRequest {
                owner: self.config.owner.clone(),
                limit: self.config.batch_size,
                now,
                lease: self.config.lease,
            })
            .await?;
        if records.is_empty() {
            return Ok(BatchReport::default());
        }
        let span = tracing::debug_span!("relay_batch", owner = %self.config.owner, claimed = records.len());
        self.publish(records).instrument(span).await
    }

    async fn publish(&self, records: Vec<OutboxRecord>) -> Result<BatchReport> {
        let mut report = BatchReport {
            claimed: records.len(),
            ..BatchReport::default()
        };
        let mut lines = key_lines(records);
        let mut published = Vec::new();
        while !lines.is_empty() {
            // One wave: the head of every key's line, published together.
            // Every line is non-empty here, so wave index = line index.
            let wave: Vec<OutboxRecord> =
                lines.iter_mut().filter_map(VecDeque::pop_front).collect();
            let entries: Vec<OutboxEntry> = wave.iter().map(|r| r.entry.clone()).collect();
            let results = self.transport.publish_batch(&entries).await;
            let results = results
                .into_iter()
                .map(Some)
                .chain(std::iter::repeat_with(|| None));
            let mut failed_lines = HashSet::new();
            for (index, (record, result)) in wave.iter().zip(results).enumerate() {
                let result = result.unwrap_or_else(|| {
                    Err(Error::Unavailable(
                        "the transport returned no result for this message".into(),
                    ))
                });
                match result {
                    Ok(()) => published.push(record.seq),
                    Err(error) => {
                        failed_lines.insert(index);
                        self.failed(record, &error, &mut report).await?;
                    }
                }
            }
            // A failed head holds back the rest of its key's line, unpublished.
            let mut index = 0;
            lines.retain(|line| {
                let failed = failed_lines.contains(&index);
                index += 1;
                if failed {
                    report.released += line.len();
                }
                !failed && !line.is_empty()
            });
        }
        if !published.is_empty() {
            let marked = self
                .store
                .mark_published(&self.config.owner, &published, self.store.now().await)
                .await?;
            let lost = published.len() - usize::try_from(marked).unwrap_or(published.len());
            if lost > 0 {
                tracing::warn!(
                    owner = %self.config.owner,
                    lost,
                    "published messages whose lease another relay took over; it publishes them again"
                );
            }
        }
        report.published = published.len();
        metrics::counter!(metrics_names::PUBLISHED).increment(report.published as u64);
        metrics::counter!(metrics_names::FAILED).increment(report.failed as u64);
        metrics::counter!(metrics_names::DEAD_LETTERED).increment(report.dead_lettered as u64);
        if report.released > 0 {
            self.store.release(&self.config.owner, &[]).await?;
        }
        Ok(report)
    }

    /// Sets the pending, dead and lag gauges from the store's counts.
    async fn report_lag(&self) {
        match self.store.stats().await {
            Ok(stats) => {
                let now = self.store.now().await;
                let lag = stats.oldest_pending.map_or(0.0, |oldest| {
                    (now - oldest).to_std().unwrap_or_default().as_secs_f64()
                });
                metrics::gauge!(metrics_names::LAG_SECONDS).set(lag);
                metrics::gauge!(metrics_names::PENDING).set(stats.pending as f64);
                metrics::gauge!(metrics_names::DEAD).set(stats.dead as f64);
            }
            Err(error) => tracing::warn!(%error, "reading outbox stats for the lag gauges failed"),
        }
    }

    async fn failed(
        &self,
        record: &OutboxRecord,
        error: &Error,
        report: &mut BatchReport,
    ) -> Result<()> {
        let attempt = record.attempts + 1;
        let message = error.to_string();
        if error.is_retryable() && self.config.retry.allows_retry_after(attempt) {
            let retry_at =
                self.store.now().await + clock::to_chrono(self.config.retry.backoff(attempt));
            tracing::warn!(seq = record.seq, attempt, %error, "publish failed; will retry");
            if self
                .store
                .record_failure(&self.config.owner, record.seq, &message, retry_at)
                .await?
            {
                report.failed += 1;
            }
        } else if self
            .store
            .dead_letter(
                &self.config.owner,
                record.seq,
                &message,
                self.store.now().await,
            )
            .await?
        {
            tracing::error!(seq = record.seq, attempt, %error, "publish failed for good; dead-lettered");
            report.dead_lettered += 1;
        } else {
            tracing::warn!(
                seq = record.seq,
                %error,
                "publish failed for good, but another relay took the message over after this one's lease expired; it decides"
            );
        }
        Ok(())
    }

    /// Runs the relay in the background until [`Worker::shutdown`], which
    /// finishes the batch in hand and releases what it still holds.
    pub fn spawn(self) -> Worker
    where
        S: Clone,
    {
        let (mut worker, signal) = Worker::empty();
        worker.spawn(async move {
            let mut failures = 0u32;
            let mut lag_refreshed: Option<tokio::time::Instant> = None;
            while !signal.is_stopping() {
                if lag_refreshed.is_none_or(|at| at.elapsed() >= self.config.lag_interval) {
                    self.report_lag().await;
                    lag_refreshed = Some(tokio::time::Instant::now());
                }
                match self.run_once().await {
                    Ok(report) if report.claimed > 0 => failures = 0,
                    Ok(_) => {
                        failures = 0;
                        tokio::select! {
                            () = signal.stopped() => {}
                            () = self.store.wait_for_messages(self.config.poll_interval) => {}
                        }
                    }
                    Err(error) => {
                        failures = failures.saturating_add(1);
                        tracing::warn!(%error, "relay batch failed");
                        let wait = self.config.poll_interval * failures.min(20);
                        signal.sleep(wait).await;
                    }
                }
            }
            if let Err(error) = self.store.release(&self.config.owner, &[]).await {
                tracing::warn!(%error, "releasing claimed messages at shutdown failed; their leases will expire");
            }
        });
        worker
    }
}

/// Names of the metrics the relay reports through the `metrics` facade.
pub mod metrics_names {
    /// Counter: messages the broker confirmed.
    pub const PUBLISHED: &str = "saga_outbox_published_total";
    /// Counter: failed publishes that will be retried.
    pub const FAILED: &str = "saga_outbox_failed_total";
    /// Counter: messages moved to the dead-letter list.
    pub const DEAD_LETTERED: &str = "saga_outbox_dead_lettered_total";
    /// Gauge: age in seconds of the oldest pending message (0 when none).
    pub const LAG_SECONDS: &str = "saga_outbox_lag_seconds";
    /// Gauge: pending messages.
    pub const PENDING: &str = "saga_outbox_pending";
    /// Gauge: dead letters.
    pub const DEAD: &str = "saga_outbox_dead";
}

/// The claimed records as one line per ordering key (records without a key
/// each form their own), in claim order.
fn key_lines(records: Vec<OutboxRecord>) -> Vec<VecDeque<OutboxRecord>> {
    let mut lines: Vec<VecDeque<OutboxRecord>> = Vec::new();
    let mut index_of: HashMap<String, usize> = HashMap::new();
    for record in records {
        match record.entry.message.ordering_key.clone() {
            Some(key) => {
                let index = *index_of.entry(key).or_insert_with(|| {
                    lines.push(VecDeque::new());
                    lines.len() - 1
                });
                lines[index].push_back(record);
            }
            None => lines.push(VecDeque::from([record])),
        }
    }
    lines
}

/// Waits until the store holds no pending message (all published or
/// dead-lettered), checking every 10 ms; [`Error::Timeout`] after `timeout`.
pub async fn wait_until_delivered<S: OutboxStore>(store: &S, timeout: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let stats = store.stats().await?;
        if stats.pending == 0 {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::Timeout(format!(
                "{} message(s) still pending in the outbox after {timeout:?}",
                stats.pending
            )));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
