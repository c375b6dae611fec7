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

/// Whether retrying after `error` can help.
pub(crate) fn is_retryable(error: &KafkaError) -> bool {
    error.rdkafka_error_code().is_some_and(retryable_code)
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
    use super::retryable_code;
    use rdkafka::error::RDKafkaErrorCode as C;

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
