//! What users implement ([`SagaStep`]) and how steps form a saga ([`SagaDefinition`]).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result, StepError};
use crate::ids::SagaId;
use crate::message::{Message, OutboxEntry};
use crate::retry::RetryPolicy;
use crate::saga::instance::Phase;

/// What a saga's data must be: stored as JSON between steps.
pub trait SagaData: Serialize + DeserializeOwned + Send + Sync + 'static {}

impl<T: Serialize + DeserializeOwned + Send + Sync + 'static> SagaData for T {}

/// What a step hands to its code: the orchestrator's transaction and where it stands.
pub struct StepContext<'a, Tx> {
    /// The orchestrator's own transaction: business writes of a local step
    /// commit together with the saga's state change, or not at all.
    pub tx: &'a mut Tx,
    /// The saga.
    pub saga_id: SagaId,
    /// The step's index.
    pub step: u32,
    /// The attempt (1-based).
    pub attempt: u32,
    /// Action or compensation.
    pub phase: Phase,
}

/// What a step's action or compensation did.
// Returned once per step run; boxing the command would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum StepOutcome {
    /// Finished here (a local step, or one that needs no compensation).
    Done,
    /// Send this command; the step finishes when its reply arrives.
    Send(OutboxEntry),
}

impl StepOutcome {
    /// Sends `payload` as JSON in a command of `message_type` to `channel`.
    pub fn send_json<T: Serialize + ?Sized>(
        channel: impl Into<String>,
        message_type: impl Into<String>,
        payload: &T,
    ) -> Result<Self, StepError> {
        Message::json(message_type, payload)
            .map(|m| Self::Send(OutboxEntry::new(channel, m)))
            .map_err(StepError::from)
    }
}

/// One step of a saga: the trait users implement.
///
/// A step is *local* when [`execute`](Self::execute) does its work through
/// `ctx.tx` and returns [`StepOutcome::Done`]: it runs inside the
/// orchestrator's transaction. It is *remote* when it returns
/// [`StepOutcome::Send`]: the command goes out through the outbox and the step
/// completes when the participant's reply arrives, which
/// [`on_reply`](Self::on_reply) may read into the saga's data.
///
/// Every step says how to undo it in [`compensate`](Self::compensate); a step
/// that needs no compensation returns [`StepOutcome::Done`] there without
/// doing anything. A remote step written generically over `Tx` runs on every
/// store.
#[async_trait]
pub trait SagaStep<D, Tx>: Send + Sync + 'static
where
    D: SagaData,
    Tx: Send + 'static,
{
    /// The step's name, shown in the history.
    fn name(&self) -> &str;

    /// Runs the step's action. An error ends this attempt; the step's retry
    /// policy decides what follows (see [`StepError`]).
    async fn execute(
        &self,
        ctx: &mut StepContext<'_, Tx>,
        data: &mut D,
    ) -> Result<StepOutcome, StepError>;

    /// Reads a successful reply into the saga's data. An error fails the
    /// step (a retryable one after the step's retries; each retry gets the
    /// participant's stored reply again). The participant applied the
    /// action, so the saga compensates this step too, then the earlier ones.
    async fn on_reply(&self, _data: &mut D, _reply: &Message) -> Result<(), StepError> {
        Ok(())
    }

    /// Undoes the action. Runs for steps that completed, in reverse order, and
    /// for a step whose reply missed its deadline (the participant runtime
    /// skips the compensation if the action never ran there).
    async fn compensate(
        &self,
        ctx: &mut StepContext<'_, Tx>,
        data: &mut D,
    ) -> Result<StepOutcome, StepError>;
}

/// Per-step policies.
#[derive(Clone, Debug)]
pub struct StepConfig {
    /// How often a failing action is tried before the saga compensates.
    pub retry: RetryPolicy,
    /// How often a failing compensation is tried before the saga is FAILED.
    pub compensation_retry: RetryPolicy,
    /// How long a remote step (or its compensation) waits for its reply,
    /// counted from the moment its command left the outbox and while the
    /// transport answers: when the deadline passes while the command still
    /// waits in the outbox (its publish retrying), while
    /// [`Transport::check`](crate::Transport::check) fails, or when the
    /// check failed at any time since the deadline started (the reply may
    /// still wait in the participant's outbox), nobody could have
    /// answered, and the deadline moves on by its own length instead of
    /// failing the attempt (the history shows it as
    /// [`StepStatus::Postponed`](crate::StepStatus::Postponed)). `None`
    /// waits forever: a lost command or reply then leaves the saga waiting.
    pub deadline: Option<Duration>,
}

impl Default for StepConfig {
    /// Actions: 3 attempts; compensations: 10 attempts; a 60 s deadline
    /// ([`StepConfig::DEFAULT_DEADLINE`]). With the transport up, a remote step therefore
    /// ends within 3 × 60 s plus backoff, and a compensation within
    /// 10 × 60 s plus backoff, whatever the participant does: a command or
    /// reply lost or dead-lettered on the way counts as a missing reply.
    fn default() -> Self {
        Self {
            retry: RetryPolicy::attempts(3),
            compensation_retry: RetryPolicy::attempts(10),
            deadline: Some(Self::DEFAULT_DEADLINE),
        }
    }
}

impl StepConfig {
    /// The deadline of [`StepConfig::default`]: 60 s.
    pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(60);

    /// Sets the action's retry policy.
    #[must_use]
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Sets the compensation's retry policy.
    #[must_use]
    pub fn compensation_retry(mut self, policy: RetryPolicy) -> Self {
        self.compensation_retry = policy;
        self
    }

    /// Sets the reply deadline of a remote step.
    #[must_use]
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Waits for replies forever: no deadline.
    #[must_use]
    pub fn no_deadline(mut self) -> Self {
        self.deadline = None;
        self
    }
}

/// A named, ordered list of steps with their policies.
pub struct SagaDefinition<D: SagaData, Tx: Send + 'static> {
    name: String,
    default_config: StepConfig,
    steps: Vec<(Arc<dyn SagaStep<D, Tx>>, StepConfig)>,
}

impl<D: SagaData, Tx: Send + 'static> fmt::Debug for SagaDefinition<D, Tx> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SagaDefinition")
            .field("name", &self.name)
            .field(
                "steps",
                &self.steps.iter().map(|(s, _)| s.name()).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl<D: SagaData, Tx: Send + 'static> SagaDefinition<D, Tx> {
    /// An empty saga named `name` (the name is stored with every instance).
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            default_config: StepConfig::default(),
            steps: Vec::new(),
        }
    }

    /// The policies of steps added after this call with [`step`](Self::step).
    #[must_use]
    pub fn default_config(mut self, config: StepConfig) -> Self {
        self.default_config = config;
        self
    }

    /// Appends a step with the default policies.
    #[must_use]
    pub fn step(self, step: impl SagaStep<D, Tx>) -> Self {
        let config = self.default_config.clone();
        self.step_with(step, config)
    }

    /// Appends a step with its own policies.
    #[must_use]
    pub fn step_with(mut self, step: impl SagaStep<D, Tx>, config: StepConfig) -> Self {
        self.steps.push((Arc::new(step), config));
        self
    }

    /// The saga's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The steps' names, in order.
    pub fn step_names(&self) -> Vec<&str> {
        self.steps.iter().map(|(s, _)| s.name()).collect()
    }
}

/// A definition with its data type erased to JSON, as the orchestrator keeps it.
#[async_trait]
pub(crate) trait ErasedDefinition<Tx: Send + 'static>: Send + Sync {
    fn len(&self) -> u32;
    fn step_name(&self, index: u32) -> &str;
    fn config(&self, index: u32) -> &StepConfig;
    async fn run(
        &self,
        ctx: &mut StepContext<'_, Tx>,
        data: &mut serde_json::Value,
    ) -> Result<StepOutcome, StepError>;
    async fn on_reply(
        &self,
        index: u32,
        data: &mut serde_json::Value,
        reply: &Message,
    ) -> Result<(), StepError>;
}

fn decode<D: SagaData>(data: &serde_json::Value) -> Result<D, StepError> {
    D::deserialize(data).map_err(|e| {
        StepError::rejected(format!(
            "saga data does not match the definition's type: {e}"
        ))
    })
}

fn encode<D: SagaData>(data: &D) -> Result<serde_json::Value, StepError> {
    serde_json::to_value(data).map_err(|e| StepError::from(Error::from(e)))
}

#[async_trait]
impl<D: SagaData, Tx: Send + 'static> ErasedDefinition<Tx> for SagaDefinition<D, Tx> {
    fn len(&self) -> u32 {
        self.steps.len() as u32
    }

    fn step_name(&self, index: u32) -> &str {
        self.steps
            .get(index as usize)
            .map_or("<unknown step>", |(s, _)| s.name())
    }

    fn config(&self, index: u32) -> &StepConfig {
        self.steps
            .get(index as usize)
            .map_or(&self.default_config, |(_, c)| c)
    }

    async fn run(
        &self,
        ctx: &mut StepContext<'_, Tx>,
        data: &mut serde_json::Value,
    ) -> Result<StepOutcome, StepError> {
        let Some((step, _)) = self.steps.get(ctx.step as usize) else {
            return Err(StepError::rejected(format!(
                "saga {} has no step {}",
                self.name, ctx.step
            )));
        };
        let mut typed: D = decode(data)?;
        let outcome = match ctx.phase {
            Phase::Forward => step.execute(ctx, &mut typed).await?,
            Phase::Compensation => step.compensate(ctx, &mut typed).await?,
        };
        *data = encode(&typed)?;
        Ok(outcome)
    }

    async fn on_reply(
        &self,
        index: u32,
        data: &mut serde_json::Value,
        reply: &Message,
    ) -> Result<(), StepError> {
        let Some((step, _)) = self.steps.get(index as usize) else {
            return Err(StepError::rejected(format!(
                "saga {} has no step {index}",
                self.name
            )));
        };
        let mut typed: D = decode(data)?;
        step.on_reply(&mut typed, reply).await?;
        *data = encode(&typed)?;
        Ok(())
    }
}
