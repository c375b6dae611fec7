//! lapin errors mapped to saga-core's, by the AMQP reply code.

use lapin::ErrorKind;
use saga_core::Error;

/// Whether retrying after `error` can help: a lost connection or channel, a
/// missed heartbeat, or the broker's own "try again" codes (320
/// connection-forced on shutdown, 405 resource-locked, 506 resource-error).
pub(crate) fn is_retryable(error: &lapin::Error) -> bool {
    match error.kind() {
        ErrorKind::IOError(_)
        | ErrorKind::InvalidChannelState(..)
        | ErrorKind::InvalidConnectionState(_)
        | ErrorKind::MissingHeartbeatError
        | ErrorKind::ChannelsLimitReached
        | ErrorKind::InvalidChannel(_) => true,
        ErrorKind::ProtocolError(amqp) => matches!(amqp.get_id(), 320 | 405 | 506),
        _ => false,
    }
}

/// Wraps a lapin error with what was being done.
pub(crate) fn amqp(context: &'static str) -> impl FnOnce(lapin::Error) -> Error {
    move |error| {
        let retryable = is_retryable(&error);
        Error::backend(context, retryable, error)
    }
}
