//! A saga instance as it is stored, and its history.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::{MessageId, SagaId};

/// Where a saga stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SagaState {
    /// Running its steps forward.
    Running,
    /// Undoing completed steps in reverse order.
    Compensating,
    /// Every step succeeded.
    Completed,
    /// A step failed and every completed step was compensated.
    Compensated,
    /// A compensation kept failing; an operator must look (see
    /// [`crate::Orchestrator::retry`]).
    Failed,
}

impl SagaState {
    /// Whether the saga has ended (an operator may still retry a FAILED one).
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Compensated | Self::Failed)
    }

    /// The state's name as stored (`RUNNING`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "RUNNING",
            Self::Compensating => "COMPENSATING",
            Self::Completed => "COMPLETED",
            Self::Compensated => "COMPENSATED",
            Self::Failed => "FAILED",
        }
    }

    /// Parses [`as_str`](Self::as_str)'s output.
    pub fn parse(text: &str) -> Option<Self> {
        [
            Self::Running,
            Self::Compensating,
            Self::Completed,
            Self::Compensated,
            Self::Failed,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }
}

/// Forward action or compensation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// The step's action.
    Forward,
    /// The step's compensation.
    Compensation,
}

impl Phase {
    /// `forward` or `compensation`, as written in the `saga_phase` header.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Forward => "forward",
            Self::Compensation => "compensation",
        }
    }

    /// Parses [`as_str`](Self::as_str)'s output.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "forward" => Some(Self::Forward),
            "compensation" => Some(Self::Compensation),
            _ => None,
        }
    }
}

/// What happened to a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StepStatus {
    /// A command was written to the outbox; the step waits for its reply.
    Sent,
    /// The step (or its compensation) succeeded.
    Succeeded,
    /// The step (or its compensation) failed.
    Failed,
    /// No reply came before the step's deadline.
    TimedOut,
    /// A reply came that the saga no longer waited for; it changed nothing.
    IgnoredReply,
    /// An operator asked to retry a FAILED saga.
    RetryRequested,
    /// The deadline passed while its command waited in the outbox, or the
    /// transport was unreachable during it: it moved on instead of failing
    /// the attempt. Consecutive postponements of one
    /// attempt share one history line, updated.
    Postponed,
}

/// One line of a saga's history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepEvent {
    /// The step's name.
    pub step: String,
    /// The step's index in the definition.
    pub index: u32,
    /// Action or compensation.
    pub phase: Phase,
    /// What happened.
    pub status: StepStatus,
    /// The attempt (1-based).
    pub attempt: u32,
    /// When.
    pub at: DateTime<Utc>,
    /// The error, for failures and timeouts.
    pub error: Option<String>,
}

/// A saga instance: position, data, pending work and history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SagaInstance {
    /// Its id.
    pub id: SagaId,
    /// The definition's name.
    pub saga_type: String,
    /// Where it stands.
    pub state: SagaState,
    /// The step being run (RUNNING) or compensated (COMPENSATING).
    pub step: u32,
    /// Attempt at the current position (1-based).
    pub attempt: u32,
    /// The saga's data, as JSON.
    pub data: serde_json::Value,
    /// The command whose reply the saga waits for.
    pub awaiting: Option<MessageId>,
    /// When the engine must look at it again: now, a retry time or a deadline.
    pub wake_at: Option<DateTime<Utc>>,
    /// Which engine instance holds it, for how long.
    pub lease_owner: Option<String>,
    /// End of the lease.
    pub lease_until: Option<DateTime<Utc>>,
    /// Why it is compensating, compensated or failed.
    pub error: Option<String>,
    /// Correlation id of every message it sends.
    pub correlation_id: String,
    /// Every step event, oldest first.
    pub history: Vec<StepEvent>,
    /// Optimistic concurrency version.
    pub version: u64,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

impl SagaInstance {
    /// The failure that turned the saga back: the forward step event (failed
    /// or timed out) after which it compensated. An earlier attempt of a
    /// retried step that failed is not it; the attempt that exhausted the
    /// retries, or was refused for good, is. `None` while the saga runs
    /// forward and after it completed.
    pub fn failure(&self) -> Option<&StepEvent> {
        if matches!(self.state, SagaState::Running | SagaState::Completed) {
            return None;
        }
        self.history.iter().rev().find(|event| {
            event.phase == Phase::Forward
                && matches!(event.status, StepStatus::Failed | StepStatus::TimedOut)
        })
    }
}

/// What happened to one event in a choreographed flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogStatus {
    /// A service emitted the event (the flow's first event, published by the caller).
    Emitted,
    /// A consumer handled it (and emitted what it lists).
    Handled,
    /// A consumer rejected it permanently; it went to the dead-letter channel.
    Failed,
}

impl LogStatus {
    /// The status's name as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Emitted => "EMITTED",
            Self::Handled => "HANDLED",
            Self::Failed => "FAILED",
        }
    }

    /// Parses [`as_str`](Self::as_str)'s output.
    pub fn parse(text: &str) -> Option<Self> {
        [Self::Emitted, Self::Handled, Self::Failed]
            .into_iter()
            .find(|s| s.as_str() == text)
    }
}

/// One line of the choreography log, keyed by correlation id.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SagaLogEntry {
    /// The business transaction.
    pub correlation_id: String,
    /// The service (consumer group) that wrote the line.
    pub consumer: String,
    /// The event.
    pub message_id: MessageId,
    /// The event's type.
    pub message_type: String,
    /// What happened.
    pub status: LogStatus,
    /// Types of the events emitted in the same transaction.
    pub emitted: Vec<String>,
    /// The error, when it failed.
    pub error: Option<String>,
    /// When.
    pub at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(step: &str, phase: Phase, status: StepStatus, attempt: u32, error: &str) -> StepEvent {
        StepEvent {
            step: step.into(),
            index: 1,
            phase,
            status,
            attempt,
            at: Utc::now(),
            error: (!error.is_empty()).then(|| error.into()),
        }
    }

    fn saga(state: SagaState, history: Vec<StepEvent>) -> SagaInstance {
        SagaInstance {
            history,
            ..crate::testing::saga_store::saga("place-order", state, None)
        }
    }

    #[test]
    fn the_failure_is_the_attempt_that_turned_the_saga_back() {
        use Phase::{Compensation, Forward};
        use StepStatus::{Failed, IgnoredReply, Sent, Succeeded, TimedOut};
        let history = vec![
            event("pay", Forward, Sent, 1, ""),
            event("pay", Forward, TimedOut, 1, "no reply within the deadline"),
            event("pay", Forward, Sent, 2, ""),
            event("pay", Forward, IgnoredReply, 1, "late"),
            event("pay", Forward, Failed, 2, "insufficient funds"),
            event("reserve", Compensation, Sent, 1, ""),
            event("reserve", Compensation, Failed, 1, "stock service down"),
        ];
        for state in [
            SagaState::Compensating,
            SagaState::Compensated,
            SagaState::Failed,
        ] {
            let saga = saga(state, history.clone());
            let failure = saga.failure().expect("a failure turned it back");
            assert_eq!(failure.error.as_deref(), Some("insufficient funds"));
            assert_eq!(failure.attempt, 2);
        }
        let retried = saga(SagaState::Running, history[..3].to_vec());
        assert_eq!(
            retried.failure(),
            None,
            "a retry is under way: nothing decided yet"
        );
        let mut done = history[..3].to_vec();
        done.push(event("pay", Forward, Succeeded, 2, ""));
        assert_eq!(saga(SagaState::Completed, done).failure(), None);
    }
}
