//! The orchestrator.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;

use crate::clock;
use crate::error::{Error, Result, StepError};
use crate::ids::{MessageId, SagaId};
use crate::message::Message;
use crate::reply;
use crate::retry::RetryPolicy;
use crate::saga::definition::{
    ErasedDefinition, SagaData, SagaDefinition, StepConfig, StepContext, StepOutcome,
};
use crate::saga::instance::{Phase, SagaInstance, SagaState, StepEvent, StepStatus};
use crate::store::{Inbox, SagaFilter, Store, open_inbox};
use crate::transport::Transport;
use crate::wire::headers;
use crate::worker::{self, StopSignal, Worker};

/// How an orchestrator runs.
#[derive(Clone, Debug)]
pub struct OrchestratorConfig {
    /// The service's name: consumer group for replies, message source, lease owner prefix.
    pub name: String,
    /// Where participants send replies.
    pub reply_channel: String,
    /// How often due sagas (retries, deadlines, recovery) are looked for.
    pub poll_interval: Duration,
    /// How long a claimed due saga is protected from other instances.
    pub lease: Duration,
    /// Due sagas claimed per poll.
    pub batch_size: usize,
    /// How often a transition is retried after losing a version race.
    pub conflict_retries: u32,
    /// How a reply whose handling failed retryably (the store or the
    /// broker unreachable, a conflict) is tried again. The member keeps the
    /// delivery and calls the handler again after the policy's backoff, so
    /// later messages of its key never overtake it; once the policy's
    /// attempts are used up, the message is dead-lettered with the last
    /// error. The default, [`RetryPolicy::forever`] (100 ms doubling up to
    /// 30 s), never dead-letters what an outage caused: a failure that never
    /// passes shows as a warning per attempt and holds the member.
    pub handling_retry: RetryPolicy,
}

impl OrchestratorConfig {
    /// Defaults for a service: replies on `<name>.replies`, polling every
    /// 200 ms, 30 s leases, 100 sagas per poll, 5 retries after a conflict,
    /// replies whose handling failed retryably tried again forever.
    pub fn new(name: impl Into<String>) -> Self {
        let name = name.into();
        Self {
            reply_channel: format!("{name}.replies"),
            name,
            poll_interval: Duration::from_millis(200),
            lease: Duration::from_secs(30),
            batch_size: 100,
            conflict_retries: 5,
            handling_retry: RetryPolicy::forever(),
        }
    }

    /// Sets the reply channel.
    #[must_use]
    pub fn reply_channel(mut self, channel: impl Into<String>) -> Self {
        self.reply_channel = channel.into();
        self
    }

    /// Sets the poll interval.
    #[must_use]
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// Sets how a reply whose handling failed retryably is tried again.
    #[must_use]
    pub fn handling_retry(mut self, policy: RetryPolicy) -> Self {
        self.handling_retry = policy;
        self
    }

    /// Sets the lease of claimed due sagas.
    #[must_use]
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }
}

/// How long the transport's last health-check answer stands.
const REACHABILITY_TTL: Duration = Duration::from_secs(1);

/// Options of [`Orchestrator::start_with`].
#[derive(Clone, Debug, Default)]
pub struct StartOptions {
    /// The saga's id (for example derived from the order id); a new UUIDv7 when `None`.
    pub id: Option<SagaId>,
    /// The correlation id of its messages; the saga id when `None`.
    pub correlation_id: Option<String>,
}

/// A saga as the query API shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct SagaView {
    /// The saga as stored.
    pub instance: SagaInstance,
    /// The name of the step being run or compensated; `None` once it ended.
    pub current_step: Option<String>,
}

impl SagaView {
    /// The saga's data as the definition's type.
    pub fn data<D: DeserializeOwned>(&self) -> Result<D> {
        Ok(D::deserialize(&self.instance.data)?)
    }
}

/// Builds an [`Orchestrator`].
pub struct OrchestratorBuilder<S: Store> {
    store: S,
    transport: Arc<dyn Transport>,
    config: OrchestratorConfig,
    definitions: HashMap<String, Arc<dyn ErasedDefinition<S::Tx>>>,
}

impl<S: Store + Clone> OrchestratorBuilder<S> {
    /// Registers a saga definition. A second definition with the same name replaces the first.
    #[must_use]
    pub fn saga<D: SagaData>(mut self, definition: SagaDefinition<D, S::Tx>) -> Self {
        self.definitions
            .insert(definition.name().to_owned(), Arc::new(definition));
        self
    }

    /// Finishes the orchestrator. Call [`Orchestrator::spawn`] to run it.
    pub fn build(self) -> Orchestrator<S> {
        let owner = format!("{}-{}", self.config.name, MessageId::new());
        Orchestrator {
            inner: Arc::new(Inner {
                store: self.store,
                transport: self.transport,
                config: self.config,
                owner,
                definitions: self.definitions,
                reachable: std::sync::Mutex::default(),
            }),
        }
    }
}

/// The orchestrator: starts sagas, advances them on replies and timers,
/// compensates, and recovers sagas left by a stopped instance.
///
/// Every transition is one transaction on the orchestrator's store: inbox
/// record of the reply that caused it, the saga's new state (optimistic version
/// check) and the next command in the outbox. A local step runs in a
/// transaction of its own, so its failure rolls back its writes and nothing
/// else. A saga that must be looked at again (now, at a retry time or at a
/// deadline) carries `wake_at`; every orchestrator instance polls for due
/// sagas and leases them, so an instance that crashed mid-way leaves nothing
/// behind that another instance does not pick up.
pub struct Orchestrator<S: Store> {
    inner: Arc<Inner<S>>,
}

impl<S: Store> Clone for Orchestrator<S> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<S: Store> fmt::Debug for Orchestrator<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Orchestrator")
            .field("name", &self.inner.config.name)
            .field("owner", &self.inner.owner)
            .field("sagas", &self.inner.definitions.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

struct Inner<S: Store> {
    store: S,
    transport: Arc<dyn Transport>,
    config: OrchestratorConfig,
    owner: String,
    definitions: HashMap<String, Arc<dyn ErasedDefinition<S::Tx>>>,
    /// What the transport's health checks said.
    reachable: std::sync::Mutex<Reachability>,
}

/// What the transport's health checks said.
#[derive(Default)]
struct Reachability {
    /// The last answer, and when it came.
    last: Option<(tokio::time::Instant, Result<(), String>)>,
    /// When (store clock) a check last failed.
    down_at: Option<DateTime<Utc>>,
}

/// Why running a step's code did not produce a transition.
enum Fault {
    /// The step said no.
    Step(StepError),
    /// The store failed; the transition is retried later as a whole.
    Store(Error),
}

impl<S: Store + Clone> Orchestrator<S> {
    /// Starts building an orchestrator on `store` (the service's own database) and `transport`.
    pub fn builder(
        store: S,
        transport: Arc<dyn Transport>,
        config: OrchestratorConfig,
    ) -> OrchestratorBuilder<S> {
        OrchestratorBuilder {
            store,
            transport,
            config,
            definitions: HashMap::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &OrchestratorConfig {
        &self.inner.config
    }

    /// Starts a saga of type `saga_type` inside the caller's transaction.
    ///
    /// Runs the saga's leading local steps and writes the first command into
    /// the outbox, all in `tx`: the business row, the saga and its first
    /// command commit together. If a step fails here, the error is returned
    /// ([`Error::StepFailed`]) and the caller should roll back.
    pub async fn start<D: SagaData>(
        &self,
        tx: &mut S::Tx,
        saga_type: &str,
        data: &D,
    ) -> Result<SagaId> {
        self.start_with(tx, saga_type, data, StartOptions::default())
            .await
    }

    /// [`start`](Self::start) with a chosen id or correlation id.
    pub async fn start_with<D: SagaData>(
        &self,
        tx: &mut S::Tx,
        saga_type: &str,
        data: &D,
        options: StartOptions,
    ) -> Result<SagaId> {
        let definition = self.definition(saga_type)?;
        let now = self.inner.store.now().await;
        let id = options.id.unwrap_or_default();
        let mut saga = SagaInstance {
            id,
            saga_type: saga_type.to_owned(),
            state: SagaState::Running,
            step: 0,
            attempt: 1,
            data: serde_json::to_value(data)?,
            awaiting: None,
            wake_at: Some(now),
            lease_owner: None,
            lease_until: None,
            error: None,
            correlation_id: options.correlation_id.unwrap_or_else(|| id.to_string()),
            history: Vec::new(),
            version: 0,
            created_at: now,
            updated_at: now,
        };
        if definition.len() == 0 {
            saga.state = SagaState::Completed;
            saga.wake_at = None;
        }
        while ready(&saga, now) {
            match self.run_position(tx, &mut saga, &*definition, now).await {
                Ok(()) => {}
                Err(Fault::Store(error)) => return Err(error),
                Err(Fault::Step(error)) => {
                    return Err(Error::StepFailed {
                        step: definition.step_name(saga.step).to_owned(),
                        error,
                    });
                }
            }
        }
        self.inner.store.create(tx, &saga).await?;
        Ok(id)
    }

    /// Starts a saga in a transaction of its own and commits it.
    pub async fn start_saga<D: SagaData>(&self, saga_type: &str, data: &D) -> Result<SagaId> {
        let mut tx = self.inner.store.begin().await?;
        let id = self.start(&mut tx, saga_type, data).await?;
        self.inner.store.commit(tx).await?;
        Ok(id)
    }

    /// Runs the orchestrator in the background: consumes replies and polls for
    /// due sagas (retries, deadlines, and sagas a stopped instance left).
    pub async fn spawn(&self) -> Result<Worker> {
        let this = self.clone();
        let config = &self.inner.config;
        let (mut worker, signal) = worker::spawn_consumer(
            &*self.inner.transport,
            &config.name,
            std::slice::from_ref(&config.reply_channel),
            config.handling_retry.clone(),
            move |reply| {
                let this = this.clone();
                async move { this.handle_reply(&reply).await }
            },
        )
        .await?;
        let this = self.clone();
        worker.spawn(async move { this.poll_due(signal).await });
        Ok(worker)
    }

    /// Handles one reply (what the background consumer does for each).
    pub async fn handle_reply(&self, reply: &Message) -> Result<()> {
        let saga_id = reply.saga_id.ok_or_else(|| {
            Error::InvalidMessage(format!("reply {} carries no saga id", reply.id))
        })?;
        let command_id = reply.causation_id.ok_or_else(|| {
            Error::InvalidMessage(format!("reply {} carries no causation id", reply.id))
        })?;
        let outcome = reply::outcome(reply)?;
        let mut conflicts = 0;
        loop {
            match self
                .apply_reply(saga_id, command_id, reply, outcome.clone())
                .await
            {
                Ok(drive_now) => {
                    if drive_now && let Err(error) = self.drive(saga_id).await {
                        tracing::warn!(saga = %saga_id, %error, "advancing after a reply failed; the poller takes over");
                    }
                    return Ok(());
                }
                Err(error @ Error::Conflict { .. })
                    if conflicts < self.inner.config.conflict_retries =>
                {
                    conflicts += 1;
                    tracing::debug!(saga = %saga_id, %error, "retrying the reply after a conflict");
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Advances one saga as far as it can go now (what the poller does for each due saga).
    pub async fn drive(&self, id: SagaId) -> Result<()> {
        let mut conflicts = 0;
        loop {
            match self.drive_once(id).await {
                Ok(true) => {}
                Ok(false) => return Ok(()),
                Err(error @ Error::Conflict { .. })
                    if conflicts < self.inner.config.conflict_retries =>
                {
                    conflicts += 1;
                    tracing::debug!(saga = %id, %error, "retrying a transition after a conflict");
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// A saga's state, current step, data and history.
    pub async fn saga(&self, id: SagaId) -> Result<Option<SagaView>> {
        Ok(self.inner.store.get(id).await?.map(|s| self.view(s)))
    }

    /// Sagas matching `filter` (for example every FAILED one), oldest first.
    pub async fn list(&self, filter: &SagaFilter) -> Result<Vec<SagaView>> {
        Ok(self
            .inner
            .store
            .list(filter)
            .await?
            .into_iter()
            .map(|s| self.view(s))
            .collect())
    }

    /// Sagas still RUNNING or COMPENSATING that started more than `age`
    /// ago, oldest first: the operator's query for sagas that take longer
    /// than they should. With the transport up, a saga under the default
    /// step settings ends within the bound the README's "What the defaults
    /// bound" table gives; one listed here well past it is waiting, and its
    /// history's last line says for what (a `Postponed` line names an
    /// unreachable transport or a command still waiting in the outbox).
    pub async fn overdue(&self, age: Duration) -> Result<Vec<SagaView>> {
        let started_before = self.inner.store.now().await - clock::to_chrono(age);
        let mut sagas = Vec::new();
        for state in [SagaState::Running, SagaState::Compensating] {
            let filter = SagaFilter {
                state: Some(state),
                started_before: Some(started_before),
                ..SagaFilter::default()
            };
            sagas.extend(self.inner.store.list(&filter).await?);
        }
        sagas.sort_by_key(|s| (s.created_at, s.id));
        Ok(sagas.into_iter().map(|s| self.view(s)).collect())
    }

    /// Operator action: compensates a FAILED saga again from the compensation
    /// that failed, with fresh attempts.
    pub async fn retry(&self, id: SagaId) -> Result<()> {
        let now = self.inner.store.now().await;
        let mut tx = self.inner.store.begin().await?;
        let mut saga = self
            .inner
            .store
            .load(&mut tx, id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("saga {id}")))?;
        if saga.state != SagaState::Failed {
            return Err(Error::InvalidState(format!(
                "saga {id} is {}; only a FAILED saga can be retried",
                saga.state.as_str()
            )));
        }
        let definition = self.definition(&saga.saga_type)?;
        saga.state = SagaState::Compensating;
        saga.attempt = 1;
        saga.wake_at = Some(now);
        record(
            &mut saga,
            &*definition,
            Phase::Compensation,
            StepStatus::RetryRequested,
            None,
            now,
        );
        saga.updated_at = now;
        self.inner.store.save(&mut tx, &saga).await?;
        self.inner.store.commit(tx).await?;
        self.drive(id).await
    }

    fn view(&self, instance: SagaInstance) -> SagaView {
        let current_step = (!instance.state.is_terminal())
            .then(|| self.inner.definitions.get(&instance.saga_type))
            .flatten()
            .map(|d| d.step_name(instance.step).to_owned());
        SagaView {
            instance,
            current_step,
        }
    }

    fn definition(&self, saga_type: &str) -> Result<Arc<dyn ErasedDefinition<S::Tx>>> {
        self.inner
            .definitions
            .get(saga_type)
            .cloned()
            .ok_or_else(|| {
                Error::Config(format!(
                    "no saga definition named `{saga_type}` is registered with orchestrator `{}`",
                    self.inner.config.name
                ))
            })
    }

    /// One transaction for one reply. Returns whether the saga can move on now.
    async fn apply_reply(
        &self,
        saga_id: SagaId,
        command_id: MessageId,
        reply: &Message,
        outcome: Result<(), StepError>,
    ) -> Result<bool> {
        let store = &self.inner.store;
        let now = store.now().await;
        let Inbox::Fresh(mut tx) = open_inbox(store, &self.inner.config.name, reply.id).await?
        else {
            return Ok(false);
        };
        let Some(mut saga) = store.load(&mut tx, saga_id).await? else {
            tracing::warn!(saga = %saga_id, reply = %reply.id, "reply for an unknown saga; ignoring it");
            store.commit(tx).await?;
            return Ok(false);
        };
        let definition = self.definition(&saga.saga_type)?;
        let phase = reply.header(headers::SAGA_PHASE).and_then(Phase::parse);
        let index = reply
            .header(headers::SAGA_STEP)
            .and_then(|s| s.parse::<u32>().ok());
        let awaited = saga.awaiting == Some(command_id);
        // The participant answers every attempt of a step alike, so its final
        // answer to an earlier attempt of the step the saga is on counts too
        // (it came late: a broker outage, a backlog), whether the saga waits
        // for a later attempt's reply or for its retry time. A final answer
        // is a success, or a forward step's refusal (stored as the step's
        // mark); a retryable failure is not: the next attempt runs again.
        let final_answer = match &outcome {
            Ok(()) => true,
            Err(error) => !error.retryable && phase == Some(Phase::Forward),
        };
        let earlier_final = final_answer
            && !saga.state.is_terminal()
            && index == Some(saga.step)
            && phase == Some(phase_of(saga.state));
        if saga.state.is_terminal() || !(awaited || earlier_final) {
            let note = format!(
                "reply {} to command {command_id} came when the saga no longer waited for it",
                reply.id
            );
            let index = index.unwrap_or(saga.step);
            saga.history.push(StepEvent {
                step: definition.step_name(index).to_owned(),
                index,
                phase: phase.unwrap_or(Phase::Forward),
                status: StepStatus::IgnoredReply,
                attempt: reply
                    .header(headers::SAGA_ATTEMPT)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0),
                at: now,
                error: Some(note),
            });
        } else {
            let phase = phase_of(saga.state);
            match outcome {
                Ok(()) if phase == Phase::Forward => {
                    match definition.on_reply(saga.step, &mut saga.data, reply).await {
                        Ok(()) => succeeded(&mut saga, &*definition, now),
                        // The participant applied the step: it is compensated too.
                        Err(error) => {
                            failed(&mut saga, &*definition, &error, Attempt::Applied, now);
                        }
                    }
                }
                Ok(()) => succeeded(&mut saga, &*definition, now),
                Err(error) => {
                    let attempt = if error.retryable {
                        Attempt::Busy
                    } else {
                        Attempt::Refused
                    };
                    failed(&mut saga, &*definition, &error, attempt, now);
                }
            }
        }
        saga.updated_at = now;
        store.save(&mut tx, &saga).await?;
        store.commit(tx).await?;
        Ok(ready(&saga, now))
    }

    /// One transition of a due saga. Returns whether it can move on again now.
    async fn drive_once(&self, id: SagaId) -> Result<bool> {
        let store = &self.inner.store;
        let now = store.now().await;
        let mut tx = store.begin().await?;
        let Some(mut saga) = store.load(&mut tx, id).await? else {
            return Ok(false);
        };
        if saga.state.is_terminal() || saga.wake_at.is_none_or(|at| at > now) {
            return Ok(false);
        }
        let definition = self.definition(&saga.saga_type)?;
        if let Some(command) = saga.awaiting {
            // Nobody could have answered a command that has not left the
            // outbox, nor while the transport is down: the deadline moves on.
            if store.is_pending(&mut tx, command).await? {
                let why = "the command has not left the outbox yet (its publish is retrying)";
                postponed(&mut saga, &*definition, why, now);
            } else if let Err(unreachable) = self.transport_reachable() {
                let why = format!("the transport is unreachable ({unreachable})");
                postponed(&mut saga, &*definition, &why, now);
            } else if let Some(down_at) = self.down_since(deadline_window(&saga, &*definition)) {
                // The reply may wait in the participant's outbox, whose
                // relay is still backing off: the window does not count.
                let why = format!(
                    "the transport was unreachable during the deadline (last at {})",
                    down_at.to_rfc3339()
                );
                postponed(&mut saga, &*definition, &why, now);
            } else {
                let error = StepError::retryable(format!(
                    "no reply within the deadline of step `{}`",
                    definition.step_name(saga.step)
                ));
                failed(&mut saga, &*definition, &error, Attempt::TimedOut, now);
            }
        } else {
            let read_version = saga.version;
            match self
                .run_position(&mut tx, &mut saga, &*definition, now)
                .await
            {
                Ok(()) => {}
                Err(Fault::Store(error)) => return Err(error),
                Err(Fault::Step(error)) => {
                    // Roll back whatever the step wrote, then record the failure alone.
                    drop(tx);
                    tx = store.begin().await?;
                    saga = store.load(&mut tx, id).await?.ok_or_else(|| {
                        Error::NotFound(format!("saga {id} vanished while it ran"))
                    })?;
                    if saga.version != read_version {
                        return Err(Error::Conflict {
                            saga_id: id,
                            expected: read_version,
                        });
                    }
                    failed(&mut saga, &*definition, &error, Attempt::Refused, now);
                }
            }
        }
        saga.updated_at = now;
        store.save(&mut tx, &saga).await?;
        store.commit(tx).await?;
        Ok(ready(&saga, now))
    }

    /// Runs the step at the saga's position in `tx` and applies its outcome.
    /// On a step error the saga is left as it was.
    async fn run_position(
        &self,
        tx: &mut S::Tx,
        saga: &mut SagaInstance,
        definition: &dyn ErasedDefinition<S::Tx>,
        now: DateTime<Utc>,
    ) -> Result<(), Fault> {
        let phase = phase_of(saga.state);
        let mut data = saga.data.clone();
        let outcome = {
            let mut ctx = StepContext {
                tx: &mut *tx,
                saga_id: saga.id,
                step: saga.step,
                attempt: saga.attempt,
                phase,
            };
            definition
                .run(&mut ctx, &mut data)
                .await
                .map_err(Fault::Step)?
        };
        saga.data = data;
        match outcome {
            StepOutcome::Done => succeeded(saga, definition, now),
            StepOutcome::Send(mut entry) => {
                self.address_command(saga, phase, &mut entry.message);
                let command_id = entry.message.id;
                self.inner
                    .store
                    .enqueue(tx, std::slice::from_ref(&entry))
                    .await
                    .map_err(Fault::Store)?;
                saga.awaiting = Some(command_id);
                saga.wake_at = definition
                    .config(saga.step)
                    .deadline
                    .map(|d| now + clock::to_chrono(d));
                record(saga, definition, phase, StepStatus::Sent, None, now);
            }
        }
        Ok(())
    }

    /// Asks the transport whether it answers ([`Transport::check`]), at
    /// most once a second: the poller calls it on every poll, due sagas or
    /// not (an outage nobody saw would not postpone the deadlines it
    /// spanned), and before driving any, so
    /// that a deadline never waits on the broker inside a transaction.
    async fn refresh_reachability(&self) {
        let fresh = self
            .reachability_cache()
            .is_some_and(|(at, _)| at.elapsed() < REACHABILITY_TTL);
        if fresh {
            return;
        }
        let answer = self
            .inner
            .transport
            .check()
            .await
            .map_err(|e| e.to_string());
        let down_at = match answer {
            Ok(()) => None,
            Err(_) => Some(self.inner.store.now().await),
        };
        let mut reachability = self.reachability();
        reachability.last = Some((tokio::time::Instant::now(), answer));
        if down_at.is_some() {
            reachability.down_at = down_at;
        }
    }

    /// The transport's last answer; reachable while it was never asked.
    fn transport_reachable(&self) -> Result<(), String> {
        self.reachability_cache()
            .map_or(Ok(()), |(_, answer)| answer)
    }

    /// When the transport was last seen unreachable, if that was at or
    /// after `since`.
    fn down_since(&self, since: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.reachability().down_at.filter(|at| *at >= since)
    }

    fn reachability_cache(&self) -> Option<(tokio::time::Instant, Result<(), String>)> {
        self.reachability().last.clone()
    }

    fn reachability(&self) -> std::sync::MutexGuard<'_, Reachability> {
        self.inner
            .reachable
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn address_command(&self, saga: &SagaInstance, phase: Phase, message: &mut Message) {
        let config = &self.inner.config;
        message.saga_id = Some(saga.id);
        message
            .correlation_id
            .get_or_insert_with(|| saga.correlation_id.clone());
        message.reply_to = Some(config.reply_channel.clone());
        message
            .ordering_key
            .get_or_insert_with(|| saga.id.to_string());
        if message.source.is_empty() {
            message.source.clone_from(&config.name);
        }
        message
            .headers
            .insert(headers::SAGA_STEP.to_owned(), saga.step.to_string());
        message
            .headers
            .insert(headers::SAGA_PHASE.to_owned(), phase.as_str().to_owned());
        message
            .headers
            .insert(headers::SAGA_ATTEMPT.to_owned(), saga.attempt.to_string());
    }

    async fn poll_due(self, signal: StopSignal) {
        let config = &self.inner.config;
        loop {
            if signal.is_stopping() {
                return;
            }
            // Asked whether or not a saga is due: an outage nobody saw
            // would not postpone the deadlines it spanned.
            self.refresh_reachability().await;
            let claimed = self
                .inner
                .store
                .claim_due(
                    &self.inner.owner,
                    self.inner.store.now().await,
                    config.lease,
                    config.batch_size,
                )
                .await;
            let full = match claimed {
                Ok(ids) => {
                    let full = ids.len() >= config.batch_size;
                    for id in ids {
                        if let Err(error) = self.drive(id).await {
                            tracing::warn!(saga = %id, %error, "advancing a due saga failed; it stays due");
                        }
                    }
                    full
                }
                Err(error) => {
                    tracing::warn!(%error, "looking for due sagas failed");
                    false
                }
            };
            if !full {
                signal.sleep(config.poll_interval).await;
            }
        }
    }
}

fn phase_of(state: SagaState) -> Phase {
    if state == SagaState::Compensating {
        Phase::Compensation
    } else {
        Phase::Forward
    }
}

/// Whether the saga has a step to run right now (not waiting for a reply or a time).
fn ready(saga: &SagaInstance, now: DateTime<Utc>) -> bool {
    !saga.state.is_terminal() && saga.awaiting.is_none() && saga.wake_at.is_some_and(|at| at <= now)
}

fn record<Tx: Send + 'static>(
    saga: &mut SagaInstance,
    definition: &dyn ErasedDefinition<Tx>,
    phase: Phase,
    status: StepStatus,
    error: Option<String>,
    now: DateTime<Utc>,
) {
    saga.history.push(StepEvent {
        step: definition.step_name(saga.step).to_owned(),
        index: saga.step,
        phase,
        status,
        attempt: saga.attempt,
        at: now,
        error,
    });
}

/// The step at the position succeeded: move to the next position.
fn succeeded<Tx: Send + 'static>(
    saga: &mut SagaInstance,
    definition: &dyn ErasedDefinition<Tx>,
    now: DateTime<Utc>,
) {
    let phase = phase_of(saga.state);
    record(saga, definition, phase, StepStatus::Succeeded, None, now);
    saga.awaiting = None;
    saga.attempt = 1;
    saga.wake_at = Some(now);
    match phase {
        Phase::Forward if saga.step + 1 >= definition.len() => {
            saga.state = SagaState::Completed;
            saga.wake_at = None;
        }
        Phase::Forward => saga.step += 1,
        Phase::Compensation if saga.step == 0 => {
            saga.state = SagaState::Compensated;
            saga.wake_at = None;
        }
        Phase::Compensation => saga.step -= 1,
    }
}

/// When the deadline that is due now started running.
fn deadline_window<Tx: Send + 'static>(
    saga: &SagaInstance,
    definition: &dyn ErasedDefinition<Tx>,
) -> DateTime<Utc> {
    let deadline = definition
        .config(saga.step)
        .deadline
        .unwrap_or(StepConfig::DEFAULT_DEADLINE);
    saga.wake_at.unwrap_or_default() - clock::to_chrono(deadline)
}

/// The deadline passed while nobody could have answered: it moves on by
/// its own length, and the history says why (one line per attempt, updated).
fn postponed<Tx: Send + 'static>(
    saga: &mut SagaInstance,
    definition: &dyn ErasedDefinition<Tx>,
    why: &str,
    now: DateTime<Utc>,
) {
    let deadline = definition
        .config(saga.step)
        .deadline
        .unwrap_or(StepConfig::DEFAULT_DEADLINE);
    saga.wake_at = Some(now + clock::to_chrono(deadline));
    let note = format!(
        "{why}; the deadline moved to {}",
        saga.wake_at.unwrap_or(now).to_rfc3339()
    );
    let phase = phase_of(saga.state);
    if let Some(last) = saga.history.last_mut()
        && last.status == StepStatus::Postponed
        && last.index == saga.step
        && last.attempt == saga.attempt
        && last.phase == phase
    {
        last.at = now;
        last.error = Some(note);
        return;
    }
    record(
        saga,
        definition,
        phase,
        StepStatus::Postponed,
        Some(note),
        now,
    );
}

/// How an attempt at a step failed, which says whether its action may have
/// been applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Attempt {
    /// The step refused for good (a failure reply that is not retryable,
    /// or a local step's error): nothing applied, and the participant
    /// answers every other attempt of the step with the same refusal.
    Refused,
    /// The participant failed this attempt for now (a retryable failure
    /// reply): nothing applied by it, but an earlier attempt may still be
    /// on its way and apply the step, so giving up compensates it too.
    Busy,
    /// No reply within the deadline: the participant may have applied it.
    TimedOut,
    /// The participant applied it, but its reply could not be read into the
    /// saga's data ([`SagaStep::on_reply`](crate::SagaStep::on_reply) failed).
    Applied,
}

/// The step at the position failed (or timed out): retry it, compensate, or give up.
fn failed<Tx: Send + 'static>(
    saga: &mut SagaInstance,
    definition: &dyn ErasedDefinition<Tx>,
    error: &StepError,
    attempt: Attempt,
    now: DateTime<Utc>,
) {
    let phase = phase_of(saga.state);
    let status = if attempt == Attempt::TimedOut {
        StepStatus::TimedOut
    } else {
        StepStatus::Failed
    };
    record(
        saga,
        definition,
        phase,
        status,
        Some(error.message.clone()),
        now,
    );
    saga.awaiting = None;
    let config = definition.config(saga.step);
    let policy = match phase {
        Phase::Forward => &config.retry,
        Phase::Compensation => &config.compensation_retry,
    };
    if error.retryable && policy.allows_retry_after(saga.attempt) {
        saga.wake_at = Some(now + clock::to_chrono(policy.backoff(saga.attempt)));
        saga.attempt += 1;
        return;
    }
    let step_name = definition.step_name(saga.step);
    saga.attempt = 1;
    match phase {
        Phase::Forward => {
            saga.error = Some(format!("step `{step_name}` failed: {}", error.message));
            saga.state = SagaState::Compensating;
            saga.wake_at = Some(now);
            // A timed-out command may have been applied, an earlier attempt
            // of a step that was busy may still arrive and apply it, and an
            // applied one whose reply could not be read was: compensate it
            // too (the participant runtime skips the compensation if the
            // action never ran, and then refuses any late attempt).
            if attempt == Attempt::Refused {
                if saga.step == 0 {
                    saga.state = SagaState::Compensated;
                    saga.wake_at = None;
                } else {
                    saga.step -= 1;
                }
            }
        }
        Phase::Compensation => {
            saga.error = Some(format!(
                "compensation of step `{step_name}` failed: {}",
                error.message
            ));
            saga.state = SagaState::Failed;
            saga.wake_at = None;
        }
    }
}
