//! Beginning and committing transactions so that a cancelled caller never
//! leaves a pooled connection inside a transaction.
//!
//! sqlx 0.8 is not cancel-safe there: a `begin` future dropped after the
//! `BEGIN` ran but before the `Transaction` existed returns the connection
//! to the pool still inside that transaction, and nothing rolls it back
//! (sqlx issues 3932 for SQLite, 4385 and 4393 for PostgreSQL). The next
//! user of that connection then writes into a transaction that never
//! commits, and on SQLite holds the write lock for good. A caller's future
//! is dropped whenever a task is aborted, a `select!` takes another branch
//! or a timeout fires, so the stores run `BEGIN` and `COMMIT` on a task of
//! their own: the work finishes whatever happens to the caller, and a
//! transaction nobody takes is dropped there, which rolls it back.

use std::future::Future;

use saga_core::{Error, Result};

/// Runs `work` to its end on a task of its own and returns its output; if
/// the caller goes away first, the output is dropped on that task.
pub(crate) async fn uncancelled<T: Send + 'static>(
    work: impl Future<Output = T> + Send + 'static,
) -> Result<T> {
    match tokio::spawn(work).await {
        Ok(output) => Ok(output),
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(_) => Err(Error::Closed(
            "the runtime is shutting down: no new transaction".into(),
        )),
    }
}
