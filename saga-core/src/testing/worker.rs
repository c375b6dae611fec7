//! The [`Worker`] contract every component keeps: dropping the handle stops
//! its tasks (they end, so nothing keeps running or spinning behind it), and
//! a detached worker keeps running.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::saga::{OrchestratorConfig, SagaDefinition};
use crate::{EventConsumer, Orchestrator, Participant, Result, Store, Transport, Worker};

use super::PATIENCE;

/// Starts a component with `start`, lets its loops reach their idle wait,
/// drops its [`Worker`], and checks that every task it spawned has ended:
/// the runtime's count of live tasks comes back to what it was before.
///
/// Run it on a runtime of its own (a `#[tokio::test]`), where nothing else
/// starts or ends tasks meanwhile.
pub async fn ends_when_dropped<F, Fut>(component: &str, start: F)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<Worker>>,
{
    let metrics = tokio::runtime::Handle::current().metrics();
    let before = settled_task_count().await;
    let worker = start()
        .await
        .unwrap_or_else(|e| panic!("starting the {component}: {e}"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let running = metrics.num_alive_tasks();
    assert!(
        running > before,
        "the {component} runs no task of its own: the check would prove nothing"
    );
    drop(worker);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let alive = metrics.num_alive_tasks();
        if alive <= before {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of the {component}'s {} task(s) still run {PATIENCE:?} after its Worker was dropped",
            alive - before,
            running - before
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The runtime's count of live tasks once it stopped changing: a database
/// pool spawns short tasks (returning a connection), which must not count.
async fn settled_task_count() -> usize {
    let metrics = tokio::runtime::Handle::current().metrics();
    let mut last = metrics.num_alive_tasks();
    let mut same = 0;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = metrics.num_alive_tasks();
        same = if now == last { same + 1 } else { 0 };
        last = now;
        if same == 5 {
            break;
        }
    }
    last
}

/// A saga data type for the checks.
#[derive(serde::Serialize, serde::Deserialize)]
struct Nothing;

/// [`ends_when_dropped`] for each engine component on `store` and
/// `transport`: an orchestrator (reply consumer and due-saga poller), a
/// participant and an event consumer. With a broker transport, the tasks of
/// each component's subscription must end too.
///
/// A client library may start a task once for the process at its first
/// connection and keep it (lapin does): one subscription is opened and
/// dropped first, so that such a task runs before the count is taken.
pub async fn engine_workers_end_when_dropped<S: Store + Clone>(
    store: S,
    transport: Arc<dyn Transport>,
) {
    let (channel, group) = (super::unique("warm-up"), super::unique("warm-up"));
    let warm_up = transport
        .subscribe(&group, std::slice::from_ref(&channel))
        .await
        .expect("a first subscription");
    drop(warm_up);
    transport
        .delete_channels(&[channel], &[group])
        .await
        .expect("deleting the warm-up channel");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let orchestrator = Orchestrator::builder(
        store.clone(),
        Arc::clone(&transport),
        OrchestratorConfig::new(super::unique("orders")).poll_interval(Duration::from_millis(20)),
    )
    .saga(SagaDefinition::<Nothing, S::Tx>::new("nothing"))
    .build();
    ends_when_dropped("orchestrator", || orchestrator.spawn()).await;
    let participant = Participant::new(
        super::unique("stock"),
        super::unique("stock.commands"),
        store.clone(),
        Arc::clone(&transport),
    );
    ends_when_dropped("participant", || participant.spawn()).await;
    let consumer = EventConsumer::new(
        super::unique("audit"),
        [super::unique("order.events")],
        store,
        transport,
    );
    ends_when_dropped("event consumer", || consumer.spawn()).await;
}
