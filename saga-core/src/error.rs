//! Errors, each of which says whether retrying can help.

use std::fmt;

/// A boxed error from a backend library.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong in the engine, a store or a transport.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A message from the wire, or a payload, is not what it must be. Permanent.
    #[error("invalid message: {0}")]
    InvalidMessage(String),
    /// A value could not be (de)serialized. Permanent.
    #[error("serialization failed: {0}")]
    Serialization(#[from] serde_json::Error),
    /// Someone else changed the saga first (optimistic version check). Retryable.
    #[error("saga {saga_id} was changed concurrently (expected version {expected})")]
    Conflict {
        /// The saga.
        saga_id: crate::SagaId,
        /// The version this writer read.
        expected: u64,
    },
    /// A record that must exist does not. Permanent.
    #[error("not found: {0}")]
    NotFound(String),
    /// The request contradicts the record's state (e.g. retrying a saga that is not FAILED). Permanent.
    #[error("invalid state: {0}")]
    InvalidState(String),
    /// A service (broker, database) cannot be reached right now. Retryable.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// An operation did not finish in time. Retryable.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The configuration is wrong (bad identifier, missing saga definition). Permanent.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The component was shut down. Permanent.
    #[error("closed: {0}")]
    Closed(String),
    /// A saga step failed where the caller must decide (at [`crate::Orchestrator::start`]).
    #[error("step `{step}` failed: {error}")]
    StepFailed {
        /// The step's name.
        step: String,
        /// What the step said.
        error: StepError,
    },
    /// An error from a backend library, classified by the backend from its native code.
    #[error("{context}: {source}")]
    Backend {
        /// What we were doing.
        context: String,
        /// Whether the backend's code says a retry can help.
        retryable: bool,
        /// The backend's own error.
        #[source]
        source: BoxError,
    },
}

impl Error {
    /// Whether trying the same operation again can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Conflict { .. } | Self::Unavailable(_) | Self::Timeout(_) => true,
            Self::Backend { retryable, .. } => *retryable,
            Self::StepFailed { error, .. } => error.retryable,
            Self::InvalidMessage(_)
            | Self::Serialization(_)
            | Self::NotFound(_)
            | Self::InvalidState(_)
            | Self::Config(_)
            | Self::Closed(_) => false,
        }
    }

    /// Wraps a backend error with what was being done and whether a retry can help.
    pub fn backend(
        context: impl Into<String>,
        retryable: bool,
        source: impl Into<BoxError>,
    ) -> Self {
        Self::Backend {
            context: context.into(),
            retryable,
            source: source.into(),
        }
    }
}

/// Why a step, a command handler or an event handler did not succeed.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StepError {
    /// Whether retrying the same step can help (a timeout, a busy database).
    /// A business refusal (out of stock) is not retryable.
    pub retryable: bool,
    /// What happened, in words an operator can act on.
    pub message: String,
}

impl StepError {
    /// A business refusal: the saga compensates without retrying.
    pub fn rejected(message: impl Into<String>) -> Self {
        Self {
            retryable: false,
            message: message.into(),
        }
    }

    /// A transient failure: the step's retry policy applies.
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            retryable: true,
            message: message.into(),
        }
    }
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.retryable {
            "retryable"
        } else {
            "rejected"
        };
        write!(f, "{kind}: {}", self.message)
    }
}

impl std::error::Error for StepError {}

impl From<Error> for StepError {
    fn from(error: Error) -> Self {
        Self {
            retryable: error.is_retryable(),
            message: error.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryability_follows_the_kind() {
        assert!(Error::Unavailable("broker".into()).is_retryable());
        assert!(Error::Timeout("publish".into()).is_retryable());
        assert!(!Error::InvalidMessage("x".into()).is_retryable());
        assert!(Error::backend("insert", true, "deadlock").is_retryable());
        assert!(!Error::backend("insert", false, "syntax").is_retryable());
        let step: StepError = Error::Unavailable("db".into()).into();
        assert!(step.retryable);
        assert_eq!(step.to_string(), "retryable: unavailable: db");
    }
}
