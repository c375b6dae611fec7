//! rdkafka errors mapped to saga-core's, by librdkafka's error code.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use saga_core::Error;

/// librdkafka codes after which a retry can succeed: transport trouble,
/// timeouts, leadership moves and rebalances.
fn retryable_code(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::BrokerTransportFailure
            | C::AllBrokersDown
            | C::MessageTimedOut
            | C::QueueFull
            | C::OperationTimedOut
            | C::RequestTimedOut
            | C::NetworkException
            | C::LeaderNotAvailable
            | C::NotLeaderForPartition
            | C::NotEnoughReplicas
            | C::NotEnoughReplicasAfterAppend
            | C::CoordinatorNotAvailable
            | C::NotCoordinator
            | C::CoordinatorLoadInProgress
            | C::RebalanceInProgress
            | C::UnknownTopicOrPartition
            | C::Retry
            | C::TimedOutQueue
    )
}

/// Whether retrying after `error` can help. (rdkafka gives no code for an
/// admin operation's error, so it is read from the error itself.)
pub(crate) fn is_retryable(error: &KafkaError) -> bool {
    match error {
        KafkaError::AdminOp(code) => retryable_code(*code),
        error => error.rdkafka_error_code().is_some_and(retryable_code),
    }
}

/// Wraps an rdkafka error with what was being done.
pub(crate) fn kafka(context: &'static str) -> impl FnOnce(KafkaError) -> Error {
    move |error| {
        let retryable = is_retryable(&error);
        Error::backend(context, retryable, error)
    }
}

#[cfg(test)]
mod tests {
    use super::{is_retryable, retryable_code};
    use rdkafka::error::{KafkaError, RDKafkaErrorCode as C};

    /// Creating a topic while the broker is away times out: the outbox
    /// message that needed it must be retried, not dead-lettered (the 10k
    /// Kafka campaign saw one dead-lettered on its first attempt).
    #[test]
    fn an_admin_operation_that_timed_out_is_retryable() {
        assert!(is_retryable(&KafkaError::AdminOp(C::OperationTimedOut)));
        assert!(is_retryable(&KafkaError::AdminOp(
            C::BrokerTransportFailure
        )));
        assert!(!is_retryable(&KafkaError::AdminOp(
            C::TopicAuthorizationFailed
        )));
    }

    #[test]
    fn transient_codes_are_retryable() {
        for code in [
            C::AllBrokersDown,
            C::MessageTimedOut,
            C::NotLeaderForPartition,
        ] {
            assert!(retryable_code(code), "{code:?}");
        }
        for code in [
            C::MessageSizeTooLarge,
            C::TopicAuthorizationFailed,
            C::InvalidMessage,
        ] {
            assert!(!retryable_code(code), "{code:?}");
        }
    }
}
