//! Conformance suites every backend runs against its real service.
//!
//! Each suite is a module of `async fn case(subject)` functions and a macro
//! that turns every case into a `#[tokio::test]` calling a setup function of
//! yours, `async fn setup() -> Option<Subject>`, which builds a fresh subject
//! (its own schema, file, topic prefix) or returns `None` through
//! [`unavailable`] when the service cannot be reached:
//!
//! ```ignore
//! async fn setup() -> Option<MyStore> {
//!     match MyStore::connect(&std::env::var("DATABASE_URL").ok()?).await {
//!         Ok(store) => Some(store),
//!         Err(e) => saga_core::testing::unavailable("PostgreSQL", e),
//!     }
//! }
//! saga_core::outbox_conformance!(setup);
//! saga_core::idempotency_conformance!(setup);
//! saga_core::saga_store_conformance!(setup);
//! ```
//!
//! The generated tests need `tokio` (with `macros` and `rt-multi-thread`) in
//! the calling crate's dev-dependencies.

pub mod chaos;
pub mod engine;
pub mod idempotency;
pub mod outbox;
pub mod saga_store;
pub mod transport;
pub mod worker;

use std::fmt::Display;
use std::time::Duration;

/// Whether tests must fail instead of skipping when a service is unreachable
/// (`SAGA_REQUIRE_SERVICES=1`, set by the project's test command).
pub fn services_required() -> bool {
    std::env::var("SAGA_REQUIRE_SERVICES").is_ok_and(|v| v == "1")
}

/// Reports an unreachable service: panics when services are required,
/// otherwise prints why the test is skipped and returns `None`.
pub fn unavailable<T>(service: &str, error: impl Display) -> Option<T> {
    assert!(
        !services_required(),
        "{service} is unreachable and SAGA_REQUIRE_SERVICES=1: {error}"
    );
    eprintln!(
        "skipping: {service} is unreachable ({error}); set SAGA_REQUIRE_SERVICES=1 to fail instead"
    );
    None
}

/// A name no other test uses (for channels, groups, schemas).
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

/// A TCP port on 127.0.0.1 that nothing listens on right now, for a server
/// a test starts itself.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port on 127.0.0.1")
}

/// A process a test SIGKILLs and starts again the same way (a broker of its
/// own, a service); killed when dropped.
pub struct Process {
    command: Box<dyn Fn() -> std::process::Command + Send + Sync>,
    child: Option<std::process::Child>,
}

impl Process {
    /// Not started yet; `command` makes its command line, alike every time.
    pub fn new(command: impl Fn() -> std::process::Command + Send + Sync + 'static) -> Self {
        Self {
            command: Box::new(command),
            child: None,
        }
    }

    /// Starts it, after killing it if it runs.
    pub fn start(&mut self) {
        self.kill();
        let mut command = (self.command)();
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("{} starts: {e}", command.get_program().display()));
        self.child = Some(child);
    }

    /// SIGKILLs it and waits for it to end (nothing if it does not run).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Asks `probe` every 50 ms until it answers `true`; panics saying that
/// `what` did not come up when `within` has passed.
pub async fn until_up<F, Fut>(what: &str, within: Duration, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !probe().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} did not come up within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How long a suite waits for something that must happen.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Generates one `#[tokio::test]` per case of a suite.
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_cases {
    ($suite:ident, $setup:path, [$($case:ident),+ $(,)?]) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let Some(subject) = $setup().await else { return };
                $crate::testing::$suite::$case(subject).await;
            }
        )+
    };
}

/// Runs the outbox store suite ([`outbox`]) with `setup`.
#[macro_export]
macro_rules! outbox_conformance {
    ($setup:path) => {
        $crate::__conformance_cases!(
            outbox,
            $setup,
            [
                enqueue_commits_with_the_transaction,
                rollback_discards_enqueued_messages,
                claim_respects_limit_and_order,
                claimed_records_are_leased,
                published_records_are_never_claimed_again,
                per_key_order_holds_while_the_head_waits,
                failure_counts_attempts_and_delays,
                dead_letters_leave_the_line_and_can_be_requeued,
                release_returns_records_without_an_attempt,
                purge_deletes_only_old_published_records,
                stats_report_pending_dead_and_oldest,
                concurrent_claims_never_overlap,
                writes_of_a_relay_that_lost_its_lease_are_refused,
                pending_messages_are_found_by_id,
                cancelled_begins_and_commits_leave_the_store_usable,
            ]
        );
    };
}

/// Runs the idempotency store suite ([`idempotency`]) with `setup`.
#[macro_export]
macro_rules! idempotency_conformance {
    ($setup:path) => {
        $crate::__conformance_cases!(
            idempotency,
            $setup,
            [
                first_delivery_is_fresh_then_duplicate,
                rollback_forgets_the_message,
                duplicate_returns_the_stored_reply,
                consumers_are_independent,
                concurrent_deliveries_are_processed_once,
                step_claim_inserts_then_reports_existing,
                step_claim_rolls_back_with_the_transaction,
                purge_removes_only_old_records,
                the_latest_purge_cut_off_is_remembered,
            ]
        );
    };
}

/// Runs the saga store suite ([`saga_store`]) with `setup`.
#[macro_export]
macro_rules! saga_store_conformance {
    ($setup:path) => {
        $crate::__conformance_cases!(
            saga_store,
            $setup,
            [
                create_then_load_and_get,
                rollback_discards_the_saga,
                save_checks_the_version,
                everything_round_trips,
                claim_due_returns_due_unleased_unfinished_sagas,
                expired_leases_are_claimed_again,
                save_clears_the_lease,
                list_filters_by_state_type_and_start,
                log_keeps_order_per_correlation,
                purge_removes_only_old_finished_sagas,
                purge_removes_only_old_log_entries,
            ]
        );
    };
}

/// Runs the engine suite ([`engine`]) with `setup` (a fresh store) and
/// `relay` (an [`engine::SpawnRelay`]).
#[macro_export]
macro_rules! engine_conformance {
    ($setup:path, $relay:path) => {
        $crate::__engine_cases!(
            $setup,
            $relay,
            [
                a_step_whose_reply_cannot_be_read_is_compensated,
                a_late_success_of_an_earlier_attempt_completes_the_step,
                a_late_refusal_of_an_earlier_attempt_ends_the_step,
                an_earlier_attempt_arriving_after_a_refusal_is_not_applied,
                a_step_given_up_while_busy_is_compensated_in_case_an_attempt_arrives_late,
                deadlines_wait_while_the_transport_is_unreachable,
                a_compensation_after_its_mark_was_purged_still_undoes,
                a_duplicate_command_is_answered_in_its_keys_order,
                a_replayed_failed_event_runs_its_handler_again,
                a_failing_event_is_retried_with_backoff_not_dead_lettered,
                an_event_whose_retries_ran_out_is_replayed_through_the_transport,
            ]
        );
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn sagas_under_chaos_end_as_planned() {
            let Some(subject) = $setup().await else {
                return;
            };
            $crate::testing::chaos::sagas_under_chaos_end_as_planned(subject, $relay).await;
        }
    };
}

/// Generates one `#[tokio::test]` per engine case.
#[doc(hidden)]
#[macro_export]
macro_rules! __engine_cases {
    ($setup:path, $relay:path, [$($case:ident),+ $(,)?]) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let Some(subject) = $setup().await else { return };
                $crate::testing::engine::$case(subject, $relay).await;
            }
        )+
    };
}

/// Runs the transport suite ([`transport`]) with `setup`. `claims` says
/// what the transport claims (its [`Capabilities`](crate::Capabilities),
/// written out so the suite knows it when it is compiled): a case about a
/// capability the transport does not claim is an ignored test, so that it
/// shows as not run instead of passing. Each case checks that the
/// transport's `capabilities()` says the same.
///
/// ```ignore
/// saga_core::transport_conformance!(setup, claims: {
///     ordered_per_key: true, replays_history: false, redelivers_unacked: true,
/// });
/// ```
#[macro_export]
macro_rules! transport_conformance {
    ($setup:path, claims: {
        ordered_per_key: $ordered:tt,
        replays_history: $history:tt,
        redelivers_unacked: $redelivers:tt $(,)?
    }) => {
        $crate::__conformance_cases!(
            transport,
            $setup,
            [
                check_passes_while_the_broker_runs,
                published_message_is_delivered,
                envelope_round_trips,
                acked_message_is_not_redelivered,
                nacked_message_is_redelivered,
                group_members_share_the_work,
                every_group_gets_every_message,
                repeated_nacks_end_in_the_dead_letter_channel,
                dead_lettered_message_is_not_redelivered,
                dead_letters_are_listed_and_replayed,
                publish_batch_confirms_each_message,
                deleted_channels_start_afresh,
            ]
        );
        $crate::__capability_case!($ordered, $setup, order_per_key_is_kept, ordered_per_key);
        $crate::__capability_case!(
            $history,
            $setup,
            late_group_receives_history,
            replays_history
        );
        $crate::__capability_case!(
            $redelivers,
            $setup,
            unacked_delivery_goes_to_another_member,
            redelivers_unacked
        );
    };
}

/// One case about a capability: run where it is claimed, ignored (shown as
/// not run) where it is not.
#[doc(hidden)]
#[macro_export]
macro_rules! __capability_case {
    (true, $setup:path, $case:ident, $capability:ident) => {
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $case() {
            let Some(subject) = $setup().await else {
                return;
            };
            $crate::testing::transport::$case(subject).await;
        }
    };
    (false, $setup:path, $case:ident, $capability:ident) => {
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        #[ignore = "not run: the transport does not claim this capability"]
        async fn $case() {
            let Some(subject) = $setup().await else {
                return;
            };
            assert!(
                !$crate::Transport::capabilities(&subject).$capability,
                "the suite was told the transport does not claim `{}`, but it does",
                stringify!($capability)
            );
        }
    };
}
