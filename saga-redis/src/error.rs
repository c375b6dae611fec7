//! Redis errors mapped to saga-core's, by the client's own classification.

use redis::{RedisError, RetryMethod};
use saga_core::Error;

/// Server answers that refuse a command for a while, which the client does
/// not classify itself (it already retries `LOADING`, `TRYAGAIN`,
/// `MASTERDOWN`, `CLUSTERDOWN` and `READONLY`): out of memory, unable to
/// persist, short of replicas, busy with a script.
const REFUSED_FOR_A_WHILE: [&str; 4] = ["OOM", "MISCONF", "NOREPLICAS", "BUSY"];

/// Whether retrying after `error` can help: connection trouble, timeouts and
/// server answers that refuse for a while (the client's own classification
/// and [`REFUSED_FOR_A_WHILE`]).
pub(crate) fn is_retryable(error: &RedisError) -> bool {
    error.is_timeout()
        || error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || !matches!(error.retry_method(), RetryMethod::NoRetry)
        || error
            .code()
            .is_some_and(|code| REFUSED_FOR_A_WHILE.contains(&code))
}

/// Wraps a Redis error with what was being done.
pub(crate) fn redis(context: &'static str) -> impl FnOnce(RedisError) -> Error {
    move |error| {
        let retryable = is_retryable(&error);
        Error::backend(context, retryable, error)
    }
}

/// Whether `error` says a stream or consumer group is gone (`NOGROUP`): the
/// server lost its data (a restart without persistence, a failover to an
/// empty replica) or someone deleted it.
pub(crate) fn is_missing_group(error: &Error) -> bool {
    matches!(error, Error::Backend { source, .. }
        if source.downcast_ref::<RedisError>().is_some_and(|e| e.code() == Some("NOGROUP")))
}
