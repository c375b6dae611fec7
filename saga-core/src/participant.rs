//! The participant runtime: consumes saga commands and answers them.
//!
//! For each command, in one transaction of the participant's store: the inbox
//! record, the step mark, the handler's business writes and the reply in the
//! outbox. A duplicate command (same message id) gets the stored reply again
//! without running the handler.
//!
//! Step marks make a timed-out step safe to compensate. The orchestrator
//! compensates a step whose reply missed its deadline, and the compensation
//! may overtake the command. Per (saga, step) the runtime remembers whether
//! the action was applied or compensated:
//! - a compensation for an action that never ran here is answered as done
//!   without calling the handler, and the action, if it arrives later, is
//!   refused instead of applied; but when the saga is older than the step
//!   marks purged since ([`IdempotencyStore::marks_purged_before`]), a
//!   missing mark may be a purged one, and the handler runs: write
//!   compensations that undo only what they find;
//! - a retried command (new id) for an action already applied gets the first
//!   reply again instead of applying it twice.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::error::{Error, Result, StepError};
use crate::message::{Message, OutboxEntry};
use crate::reply::{self, Reply};
use crate::retry::RetryPolicy;
use crate::saga::Phase;
use crate::store::{
    IdempotencyStore, Inbox, OutboxStore, StepClaim, StepMark, Transactional, open_inbox,
};
use crate::transport::Transport;
use crate::wire::headers;
use crate::worker::{self, Worker};

/// Handles one type of command: the trait participants implement.
#[async_trait]
pub trait CommandHandler<Tx: Send + 'static>: Send + Sync + 'static {
    /// Applies the command through `tx` and says what to reply. An error rolls
    /// back `tx` and sends a failure reply ([`StepError::retryable`] lets the
    /// orchestrator retry the step).
    ///
    /// A refusal ([`StepError::rejected`]) of a saga step's action is the
    /// step's final answer: it is stored as the step's mark, and every other
    /// attempt of that step (an earlier one delayed on the way, a later
    /// retry) is answered with it without running the handler. Otherwise an
    /// earlier attempt arriving after the saga turned back could apply the
    /// step, and nothing would undo it. A retryable failure stores nothing:
    /// the next attempt runs the handler.
    ///
    /// A compensation handler may be called for an action that never ran
    /// here (a saga older than the step marks' retention whose action was
    /// lost on the way): it undoes only what it finds.
    async fn handle(&self, tx: &mut Tx, command: &Message) -> Result<Reply, StepError>;
}

/// A participant service: a consumer group on its command channel.
pub struct Participant<S: Transactional> {
    inner: Arc<Inner<S>>,
}

impl<S: Transactional> Clone for Participant<S> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<S: Transactional> fmt::Debug for Participant<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Participant")
            .field("name", &self.inner.name)
            .field("channel", &self.inner.channel)
            .field("commands", &self.inner.handlers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

struct Inner<S: Transactional> {
    name: String,
    channel: String,
    store: S,
    transport: Arc<dyn Transport>,
    handlers: HashMap<String, Arc<dyn CommandHandler<S::Tx>>>,
    retry: RetryPolicy,
}

impl<S: Transactional + Clone> Clone for Inner<S> {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            channel: self.channel.clone(),
            store: self.store.clone(),
            transport: Arc::clone(&self.transport),
            handlers: self.handlers.clone(),
            retry: self.retry.clone(),
        }
    }
}

/// The step a command belongs to, from its headers.
struct StepRef {
    saga_id: crate::SagaId,
    step: u32,
    phase: Phase,
}

impl<S: OutboxStore + IdempotencyStore + Clone> Participant<S> {
    /// A participant named `name` (its consumer group and inbox name) that
    /// consumes commands from `channel`.
    pub fn new(
        name: impl Into<String>,
        channel: impl Into<String>,
        store: S,
        transport: Arc<dyn Transport>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                name: name.into(),
                channel: channel.into(),
                store,
                transport,
                handlers: HashMap::new(),
                retry: RetryPolicy::forever(),
            }),
        }
    }

    /// Registers the handler of `command_type`. Register every handler before
    /// [`spawn`](Self::spawn): a clone made earlier, or a running worker,
    /// keeps the handlers it had.
    #[must_use]
    pub fn on(
        mut self,
        command_type: impl Into<String>,
        handler: impl CommandHandler<S::Tx>,
    ) -> Self {
        Arc::make_mut(&mut self.inner)
            .handlers
            .insert(command_type.into(), Arc::new(handler));
        self
    }

    /// How a command whose handling failed retryably (the store or the
    /// broker unreachable, a conflict) is tried again. The member keeps the
    /// delivery and calls the handler again after the policy's backoff, so
    /// later messages of its key never overtake it; once the policy's
    /// attempts are used up, the message is dead-lettered with the last
    /// error. The default, [`RetryPolicy::forever`] (100 ms doubling up to
    /// 30 s), never dead-letters what an outage caused: a failure that never
    /// passes shows as a warning per attempt and holds the member.
    #[must_use]
    pub fn handling_retry(mut self, policy: RetryPolicy) -> Self {
        Arc::make_mut(&mut self.inner).retry = policy;
        self
    }

    /// Consumes commands in the background.
    pub async fn spawn(&self) -> Result<Worker> {
        let this = self.clone();
        let inner = &self.inner;
        let (worker, _) = worker::spawn_consumer(
            &*inner.transport,
            &inner.name,
            std::slice::from_ref(&inner.channel),
            inner.retry.clone(),
            move |command| {
                let this = this.clone();
                async move { this.handle(&command).await }
            },
        )
        .await?;
        Ok(worker)
    }

    /// Handles one command (what the background consumer does for each).
    /// `Ok` means it may be acknowledged.
    pub async fn handle(&self, command: &Message) -> Result<()> {
        let inner = &self.inner;
        let step = step_ref(command)?;
        let now = inner.store.now().await;
        let mut tx = match open_inbox(&inner.store, &inner.name, command.id).await? {
            Inbox::Fresh(tx) => tx,
            Inbox::Duplicate(reply) => {
                // Processed before: answer as then.
                if let Some(reply) = reply {
                    self.answer_again(reply).await?;
                }
                return Ok(());
            }
        };
        let Some(handler) = inner.handlers.get(&command.message_type).cloned() else {
            let error = format!(
                "participant `{}` has no handler for command type `{}`",
                inner.name, command.message_type
            );
            if command.reply_to.is_none() {
                return Err(Error::InvalidMessage(error));
            }
            let reply = reply::failure(command, &inner.name, &StepError::rejected(error));
            return self.finish(tx, command, reply).await;
        };

        let reply = match &step {
            None => self.run(&mut tx, &*handler, command, None).await?,
            Some(step) => {
                let wanted = match step.phase {
                    Phase::Forward => StepMark::Applied,
                    Phase::Compensation => StepMark::Compensated,
                };
                let claim = inner
                    .store
                    .claim_step(&mut tx, &inner.name, step.saga_id, step.step, wanted, now)
                    .await?;
                match (step.phase, claim) {
                    // Fresh action, or compensation of an applied action: run the handler.
                    (Phase::Forward, StepClaim::Inserted)
                    | (
                        Phase::Compensation,
                        StepClaim::Existing {
                            mark: StepMark::Applied,
                            ..
                        },
                    ) => self.run(&mut tx, &*handler, command, Some(step)).await?,
                    // Another attempt was applied or refused: answer as then.
                    (
                        Phase::Forward,
                        StepClaim::Existing {
                            mark: StepMark::Applied | StepMark::Refused,
                            reply: Some(stored),
                        },
                    ) => Ok(Some(reply::readdress(&stored, command))),
                    (Phase::Forward, StepClaim::Existing { mark, .. }) => {
                        Err(StepError::rejected(format!(
                            "step {} of saga {} is already {}; the command is not applied",
                            step.step,
                            step.saga_id,
                            mark.as_str()
                        )))
                    }
                    // No mark, but the saga is older than the marks purged
                    // since: the action may have run and its mark be gone.
                    // Only the handler can tell: it runs.
                    (Phase::Compensation, StepClaim::Inserted)
                        if self.mark_may_be_purged(&mut tx, step).await? =>
                    {
                        self.run(&mut tx, &*handler, command, Some(step)).await?
                    }
                    // Compensation of an action that never ran here, or already compensated.
                    (Phase::Compensation, _) => Ok(reply::success(
                        command,
                        &inner.name,
                        Reply::empty(format!("{}.done", command.message_type)),
                    )),
                }
            }
        };
        match reply {
            Ok(entry) => self.finish(tx, command, entry).await,
            Err(error) => {
                // The handler's writes (and the step mark) roll back; record the failure alone.
                drop(tx);
                let Inbox::Fresh(mut tx) =
                    open_inbox(&inner.store, &inner.name, command.id).await?
                else {
                    return Ok(());
                };
                let mut reply = reply::failure(command, &inner.name, &error);
                if reply.is_none() {
                    tracing::warn!(command = %command.id, %error, "command failed and has no reply channel");
                }
                if let Some(step) = step.filter(|s| s.phase == Phase::Forward && !error.retryable) {
                    reply = self.refuse(&mut tx, &step, command, reply, now).await?;
                }
                self.finish(tx, command, reply).await
            }
        }
    }

    /// Makes `refusal` the step's final answer (its mark), unless another
    /// attempt of the step committed a mark since this one's claim rolled
    /// back: then the answer is that attempt's.
    async fn refuse(
        &self,
        tx: &mut S::Tx,
        step: &StepRef,
        command: &Message,
        refusal: Option<OutboxEntry>,
        now: DateTime<Utc>,
    ) -> Result<Option<OutboxEntry>> {
        let inner = &self.inner;
        let claim = inner
            .store
            .claim_step(
                tx,
                &inner.name,
                step.saga_id,
                step.step,
                StepMark::Refused,
                now,
            )
            .await?;
        Ok(match claim {
            StepClaim::Inserted => {
                inner
                    .store
                    .update_step(
                        tx,
                        &inner.name,
                        step.saga_id,
                        step.step,
                        StepMark::Refused,
                        refusal.as_ref(),
                    )
                    .await?;
                refusal
            }
            StepClaim::Existing {
                reply: Some(stored),
                ..
            } => Some(reply::readdress(&stored, command)),
            StepClaim::Existing { reply: None, .. } => refusal,
        })
    }

    /// Whether the step's mark may have been purged: the saga is older than
    /// the latest purge's cut-off (or its id carries no time).
    async fn mark_may_be_purged(&self, tx: &mut S::Tx, step: &StepRef) -> Result<bool> {
        let Some(purged) = self.inner.store.marks_purged_before(tx).await? else {
            return Ok(false);
        };
        Ok(step
            .saga_id
            .created_at()
            .is_none_or(|started| started < purged))
    }

    /// Runs the handler. `Ok(Ok(reply))` success (no reply without a reply
    /// channel), `Ok(Err(e))` the handler refused.
    async fn run(
        &self,
        tx: &mut S::Tx,
        handler: &dyn CommandHandler<S::Tx>,
        command: &Message,
        step: Option<&StepRef>,
    ) -> Result<Result<Option<OutboxEntry>, StepError>> {
        let inner = &self.inner;
        let answer = match handler.handle(tx, command).await {
            Ok(answer) => answer,
            Err(error) => return Ok(Err(error)),
        };
        let entry = reply::success(command, &inner.name, answer);
        if let Some(step) = step {
            let mark = match step.phase {
                Phase::Forward => StepMark::Applied,
                Phase::Compensation => StepMark::Compensated,
            };
            inner
                .store
                .update_step(
                    tx,
                    &inner.name,
                    step.saga_id,
                    step.step,
                    mark,
                    entry.as_ref(),
                )
                .await?;
        }
        Ok(Ok(entry))
    }

    /// Stores and enqueues the reply (if any) and commits.
    /// Sends a stored reply again, through the outbox so that it keeps its
    /// key's order: published straight to the broker, it would overtake
    /// what its key still has waiting there (the reply itself included).
    /// Nothing to do while the reply is still waiting there itself.
    async fn answer_again(&self, reply: OutboxEntry) -> Result<()> {
        let store = &self.inner.store;
        let mut tx = store.begin().await?;
        if !store.is_pending(&mut tx, reply.message.id).await? {
            store.enqueue(&mut tx, &[reply]).await?;
        }
        store.commit(tx).await
    }

    async fn finish(
        &self,
        mut tx: S::Tx,
        command: &Message,
        reply: Option<OutboxEntry>,
    ) -> Result<()> {
        let inner = &self.inner;
        if let Some(reply) = reply {
            inner
                .store
                .save_reply(&mut tx, &inner.name, command.id, &reply)
                .await?;
            inner
                .store
                .enqueue(&mut tx, std::slice::from_ref(&reply))
                .await?;
        }
        inner.store.commit(tx).await
    }
}

fn step_ref(command: &Message) -> Result<Option<StepRef>> {
    let Some(saga_id) = command.saga_id else {
        return Ok(None);
    };
    let (Some(step), Some(phase)) = (
        command.header(headers::SAGA_STEP),
        command.header(headers::SAGA_PHASE),
    ) else {
        return Ok(None);
    };
    let step = step.parse().map_err(|_| {
        Error::InvalidMessage(format!(
            "command {} has a `{}` header that is not a number: {step:?}",
            command.id,
            headers::SAGA_STEP
        ))
    })?;
    let phase = Phase::parse(phase).ok_or_else(|| {
        Error::InvalidMessage(format!(
            "command {} has a `{}` header that is neither forward nor compensation: {phase:?}",
            command.id,
            headers::SAGA_PHASE
        ))
    })?;
    Ok(Some(StepRef {
        saga_id,
        step,
        phase,
    }))
}
