//! Background loops (consumers, pollers) and how they stop.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::message::Message;
use crate::transport::{Delivery, Subscription, Transport};

/// Handle to the background tasks of a component (orchestrator, participant,
/// consumer, relay).
#[derive(Debug)]
pub struct Worker {
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Worker {
    pub(crate) fn new() -> (Self, watch::Receiver<bool>) {
        let (shutdown, receiver) = watch::channel(false);
        (
            Self {
                shutdown,
                tasks: Vec::new(),
            },
            receiver,
        )
    }

    /// Adds a task that stops when the worker is shut down.
    pub fn spawn<F>(&mut self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tasks.push(tokio::spawn(task));
    }

    /// A receiver that turns `true` when shutdown starts (for tasks added with [`spawn`](Self::spawn)).
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// A worker with no task yet, and its shutdown signal (for crates that add their own loops).
    pub fn empty() -> (Self, watch::Receiver<bool>) {
        Self::new()
    }

    /// Asks every task to finish the message in hand and stop, and waits for them.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }

    /// Stops every task at once, wherever it is, as a crash would: open
    /// transactions roll back and unsettled deliveries are redelivered.
    pub async fn abort(self) {
        for task in &self.tasks {
            task.abort();
        }
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Whether shutdown was asked for.
pub(crate) fn stopping(signal: &watch::Receiver<bool>) -> bool {
    *signal.borrow()
}

/// Waits for `duration`, or less if shutdown starts.
pub(crate) async fn pause(signal: &mut watch::Receiver<bool>, duration: Duration) {
    tokio::select! {
        _ = signal.wait_for(|stop| *stop) => {}
        () = tokio::time::sleep(duration) => {}
    }
}

/// Settles a delivery by the handler's result: ack on success, nack (redeliver
/// later) on a retryable error, dead letter on a permanent one.
pub(crate) async fn settle(delivery: Delivery, result: Result<()>) {
    let id = delivery.message.id;
    let settled = match result {
        Ok(()) => delivery.ack().await,
        Err(error) if error.is_retryable() => {
            tracing::warn!(message = %id, %error, "handling failed; the message will be redelivered");
            delivery.nack(&error.to_string()).await
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
/// new worker; returns it with its shutdown signal, for more tasks.
pub(crate) async fn spawn_consumer<F, Fut>(
    transport: &dyn Transport,
    group: &str,
    channels: &[String],
    handle: F,
) -> Result<(Worker, watch::Receiver<bool>)>
where
    F: Fn(Message) -> Fut + Send + 'static,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    let subscription = transport.subscribe(group, channels).await?;
    let (mut worker, signal) = Worker::new();
    worker.spawn(consume(subscription, signal.clone(), handle));
    Ok((worker, signal))
}

/// Runs `handle` on every delivery until shutdown; the message in hand is finished first.
pub(crate) async fn consume<F, Fut>(
    mut subscription: Box<dyn Subscription>,
    mut signal: watch::Receiver<bool>,
    handle: F,
) where
    F: Fn(Message) -> Fut + Send,
    Fut: Future<Output = Result<()>> + Send,
{
    let mut failures = 0u32;
    loop {
        let next = tokio::select! {
            biased;
            _ = signal.wait_for(|stop| *stop) => return,
            next = subscription.next() => next,
        };
        match next {
            Ok(delivery) => {
                failures = 0;
                let result = handle(delivery.message.clone()).await;
                settle(delivery, result).await;
            }
            Err(Error::Closed(_)) => return,
            Err(error) => {
                failures = failures.saturating_add(1);
                tracing::warn!(%error, "receiving failed; trying again");
                let wait = Duration::from_millis(50 * u64::from(failures.min(100)));
                pause(&mut signal, wait).await;
            }
        }
    }
}
