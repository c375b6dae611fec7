//! Background loops (consumers, pollers) and how they stop.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::message::Message;
use crate::retry::RetryPolicy;
use crate::transport::{Delivery, Subscription, Transport};

/// Handle to the background tasks of a component (orchestrator, participant,
/// consumer, relay, retention).
///
/// # Stopping
/// - [`shutdown`](Self::shutdown): every task finishes the message or batch
///   in hand, releases what it holds, and ends; waits for them.
/// - [`abort`](Self::abort): every task stops where it is, as a crash would.
/// - **Dropping the handle** stops the tasks as `shutdown` does, without
///   waiting for them: an early `?` or a panic that drops it leaves nothing
///   running behind. Keep the handle for as long as the component should run.
/// - [`detach`](Self::detach): the tasks run until the process ends, as
///   dropping a tokio `JoinHandle` would let them.
#[derive(Debug)]
#[must_use = "dropping a Worker stops its tasks: keep it while they should run, or call detach()"]
pub struct Worker {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    detached: bool,
}

impl Worker {
    /// A worker with no task yet, and the stop signal its tasks watch (for
    /// crates that add their own loops with [`spawn`](Self::spawn)).
    pub fn empty() -> (Self, StopSignal) {
        let (stop, receiver) = watch::channel(false);
        (
            Self {
                stop,
                tasks: Vec::new(),
                detached: false,
            },
            StopSignal(receiver),
        )
    }

    /// Adds a task. It must end soon after [`StopSignal::is_stopping`]
    /// turns true (see [`shutdown_signal`](Self::shutdown_signal)).
    pub fn spawn<F>(&mut self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tasks.push(tokio::spawn(task));
    }

    /// The signal the tasks watch (for tasks added with [`spawn`](Self::spawn)).
    pub fn shutdown_signal(&self) -> StopSignal {
        StopSignal(self.stop.subscribe())
    }

    /// Asks every task to finish the message in hand and stop, and waits for them.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
    }

    /// Stops every task at once, wherever it is, as a crash would: open
    /// transactions roll back and unsettled deliveries are redelivered.
    pub async fn abort(mut self) {
        let tasks = std::mem::take(&mut self.tasks);
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            let _ = task.await;
        }
    }

    /// Lets the tasks run until the process ends, with no handle to stop them.
    pub fn detach(mut self) {
        self.detached = true;
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if !self.detached {
            let _ = self.stop.send(true);
        }
    }
}

/// What a worker's tasks watch to know when to stop.
///
/// A stop is asked by [`Worker::shutdown`] or by dropping the [`Worker`];
/// a detached worker's signal never fires.
#[derive(Clone, Debug)]
pub struct StopSignal(watch::Receiver<bool>);

impl StopSignal {
    /// Whether a stop was asked.
    pub fn is_stopping(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once a stop is asked (never, for a detached worker).
    pub async fn stopped(&self) {
        let mut receiver = self.0.clone();
        if receiver.wait_for(|stop| *stop).await.is_err() {
            // The worker was detached: nobody can ask for a stop any more.
            std::future::pending::<()>().await;
        }
    }

    /// Waits for `duration`, or less if a stop is asked.
    pub async fn sleep(&self, duration: Duration) {
        tokio::select! {
            () = self.stopped() => {}
            () = tokio::time::sleep(duration) => {}
        }
    }
}

/// Settles a delivery by the handler's result: ack on success, dead letter
/// on a permanent error or on a retryable one that used up its retries.
async fn settle(delivery: Delivery, result: Result<()>, attempts: u32) {
    let id = delivery.message.id;
    let settled = match result {
        Ok(()) => delivery.ack().await,
        Err(error) if error.is_retryable() => {
            tracing::error!(message = %id, %error, attempts, "handling failed on every attempt; dead-lettering the message");
            delivery
                .dead_letter(&format!("failed {attempts} times; last error: {error}"))
                .await
        }
        Err(error) => {
            tracing::error!(message = %id, %error, "handling failed for good; dead-lettering the message");
            delivery.dead_letter(&error.to_string()).await
        }
    };
    if let Err(error) = settled {
        tracing::warn!(message = %id, %error, "settling the delivery failed; the broker will redeliver it");
    }
}

/// Subscribes `group` to `channels` and runs `handle` on every delivery in a
/// new worker, retrying retryable failures by `retry`; returns the worker
/// with its stop signal, for more tasks.
pub(crate) async fn spawn_consumer<F, Fut>(
    transport: &dyn Transport,
    group: &str,
    channels: &[String],
    retry: RetryPolicy,
    handle: F,
) -> Result<(Worker, StopSignal)>
where
    F: Fn(Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    let subscription = transport.subscribe(group, channels).await?;
    let (mut worker, signal) = Worker::empty();
    worker.spawn(consume(subscription, signal.clone(), retry, handle));
    Ok((worker, signal))
}

/// Runs `handle` on every delivery until shutdown; the message in hand is finished first.
async fn consume<F, Fut>(
    mut subscription: Box<dyn Subscription>,
    signal: StopSignal,
    retry: RetryPolicy,
    handle: F,
) where
    F: Fn(Message) -> Fut + Send + Sync,
    Fut: Future<Output = Result<()>> + Send,
{
    let mut failures = 0u32;
    loop {
        let next = tokio::select! {
            biased;
            () = signal.stopped() => return,
            next = subscription.next() => next,
        };
        match next {
            Ok(delivery) => {
                failures = 0;
                handle_with_retries(delivery, &signal, &retry, &handle).await;
            }
            Err(Error::Closed(_)) => return,
            Err(error) => {
                failures = failures.saturating_add(1);
                tracing::warn!(%error, "receiving failed; trying again");
                let wait = Duration::from_millis(50 * u64::from(failures.min(100)));
                signal.sleep(wait).await;
            }
        }
    }
}

/// Handles one delivery, retrying a retryable failure in place: the member
/// keeps the delivery (the broker's lease extended where it has one) and
/// calls the handler again after the policy's backoff, so the key's later
/// messages never overtake it. A stop asked while waiting hands the
/// delivery back to the broker.
async fn handle_with_retries<F, Fut>(
    mut delivery: Delivery,
    signal: &StopSignal,
    retry: &RetryPolicy,
    handle: &F,
) where
    F: Fn(Message) -> Fut + Send + Sync,
    Fut: Future<Output = Result<()>> + Send,
{
    let mut attempt = 1u32;
    loop {
        let result = handle(delivery.message.clone()).await;
        match result {
            Err(error) if error.is_retryable() && retry.allows_retry_after(attempt) => {
                let wait = retry.backoff(attempt);
                tracing::warn!(
                    message = %delivery.message.id,
                    %error,
                    attempt,
                    retry_in_ms = wait.as_millis() as u64,
                    "handling failed; retrying"
                );
                signal.sleep(wait).await;
                if signal.is_stopping() {
                    let id = delivery.message.id;
                    if let Err(error) = delivery.nack(&error.to_string()).await {
                        tracing::warn!(message = %id, %error, "handing the delivery back failed; the broker will redeliver it");
                    }
                    return;
                }
                if let Err(error) = delivery.keep().await {
                    tracing::warn!(message = %delivery.message.id, %error, "extending the delivery's lease failed; another member may take it");
                }
                attempt = attempt.saturating_add(1);
            }
            result => return settle(delivery, result, attempt).await,
        }
    }
}
