//! sqlx errors mapped to saga-core's, by the database's own codes.

use saga_core::Error;

/// SQLSTATE classes and codes after which a retry can succeed: serialization
/// failure, deadlock, lock not available, too many connections, server
/// shutting down, and every connection exception (class 08).
fn retryable_sqlstate(code: &str) -> bool {
    matches!(
        code,
        "40001" | "40P01" | "55P03" | "53300" | "57P01" | "57P02" | "57P03"
    ) || code.starts_with("08")
}

/// SQLite result codes after which a retry can succeed: `SQLITE_BUSY` and
/// `SQLITE_LOCKED` with their extended codes (the primary code is the low byte).
#[cfg(feature = "sqlite")]
fn retryable_sqlite_code(code: &str) -> bool {
    code.parse::<u32>()
        .is_ok_and(|code| matches!(code & 0xff, 5 | 6))
}

/// Whether retrying after `error` can help.
pub(crate) fn is_retryable(error: &sqlx::Error) -> bool {
    match error {
        #[cfg(feature = "sqlite")]
        sqlx::Error::Database(db)
            if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() =>
        {
            db.code().is_some_and(|code| retryable_sqlite_code(&code))
        }
        sqlx::Error::Database(db) => db.code().is_some_and(|code| retryable_sqlstate(&code)),
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::WorkerCrashed => true,
        _ => false,
    }
}

/// Wraps an error from opening a transaction (taking or opening a
/// connection, then `BEGIN`): retryable unless the pool was closed or its
/// configuration is wrong. A database that refuses connections for a
/// while (restarting, `ALLOW_CONNECTIONS false`: SQLSTATE 55000, or a
/// password being rotated) answers with codes that mean "never" in a
/// query, and nothing in the message being processed can cause them: a
/// consumer must wait for the database, never dead-letter its message.
pub(crate) fn beginning(error: sqlx::Error) -> Error {
    let retryable = !matches!(
        error,
        sqlx::Error::PoolClosed | sqlx::Error::Configuration(_)
    );
    Error::backend("beginning a transaction", retryable, error)
}

/// Wraps a sqlx error with what was being done.
pub(crate) fn db(context: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
    move |error| {
        let retryable = is_retryable(&error);
        Error::backend(context, retryable, error)
    }
}

/// Turns sqlx's errors in your own queries into saga-core's, classified as
/// the stores classify theirs: a deadlock, a serialization failure, a busy
/// SQLite file or a lost connection is retryable; a constraint or syntax
/// error is not. Inside a saga step or a handler, `?` turns the result into
/// a [`StepError`](saga_core::StepError) with the same retryability.
///
/// ```no_run
/// use saga_sqlx::{SqlxResultExt, SqliteStore, sqlx};
/// # async fn run(store: SqliteStore) -> saga_core::Result<()> {
/// sqlx::query("UPDATE wallets SET balance = balance - 5 WHERE id = 'alice'")
///     .execute(store.pool())
///     .await
///     .db_context("debiting alice")?;
/// # Ok(()) }
/// ```
pub trait SqlxResultExt<T> {
    /// The error, if any, as a [`saga_core::Error`] saying what was being
    /// done. (Not `context`: that name is `anyhow::Context`'s, which also
    /// applies to sqlx's errors, and both in scope would be ambiguous.)
    fn db_context(self, what: impl Into<String>) -> saga_core::Result<T>;
}

impl<T> SqlxResultExt<T> for Result<T, sqlx::Error> {
    fn db_context(self, what: impl Into<String>) -> saga_core::Result<T> {
        self.map_err(|error| {
            let retryable = is_retryable(&error);
            Error::backend(what, retryable, error)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::retryable_sqlstate;

    #[cfg(feature = "sqlite")]
    #[test]
    fn busy_and_locked_sqlite_codes_are_retryable() {
        use super::retryable_sqlite_code;
        for code in ["5", "6", "517", "261", "262"] {
            assert!(retryable_sqlite_code(code), "{code}");
        }
        for code in ["19", "2067", "1", "11"] {
            assert!(!retryable_sqlite_code(code), "{code}");
        }
    }

    #[test]
    fn codes_that_can_pass_are_retryable() {
        for code in ["40001", "40P01", "08006", "57P01"] {
            assert!(retryable_sqlstate(code), "{code}");
        }
        for code in ["23505", "42601", "42P01", "22P02"] {
            assert!(!retryable_sqlstate(code), "{code}");
        }
    }
}
