//! Engine cases every store runs: an orchestrator and a participant on the
//! store under test, a relay, and the in-memory transport. What a user would
//! notice is checked: how the saga ends, and which effects the participant
//! applied and undid, in which order.
//!
//! The relay lives in another crate (saga-outbox), so each case takes a
//! [`SpawnRelay`] from the caller: [`engine_conformance!`](crate::engine_conformance)
//! passes the one it is given.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::memory::MemoryTransport;
use crate::saga::{
    OrchestratorConfig, Phase, SagaDefinition, SagaState, StepConfig, StepContext, StepOutcome,
    StepStatus,
};
use crate::{
    CommandHandler, Message, Orchestrator, OutboxEntry, Participant, Reply, RetryPolicy, SagaId,
    SagaStep, StepError, Store, Transport, Worker,
};

use super::{PATIENCE, unique};

/// The saga's data: nothing but a label.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Order {
    id: String,
}

/// Starts a relay from a store's outbox to a transport (saga-outbox's
/// `Relay::new(store, transport, config).spawn()`, with a short poll interval).
pub type SpawnRelay<S> = fn(S, Arc<dyn Transport>) -> Worker;

/// What the participant applied and undid, in commit order: `reserve`,
/// `reserve.undo`, ...
#[derive(Clone, Default)]
struct Effects(Arc<Mutex<Vec<String>>>);

impl Effects {
    fn log(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

/// A remote step named `name`: sends `<name>` (and `<name>.undo`) to the
/// participant's channel.
struct Remote {
    name: &'static str,
    channel: String,
    /// Its `on_reply` fails, as after a reply schema changed in a deploy.
    unreadable_reply: bool,
    /// How the participant's action fails before it succeeds.
    refusals: Refusals,
    /// Its policies.
    config: StepConfig,
}

#[async_trait]
impl<Tx: Send + 'static> SagaStep<Order, Tx> for Remote {
    fn name(&self) -> &str {
        self.name
    }

    async fn execute(
        &self,
        _: &mut StepContext<'_, Tx>,
        order: &mut Order,
    ) -> Result<StepOutcome, StepError> {
        StepOutcome::send_json(&self.channel, self.name, order)
    }

    async fn on_reply(&self, _: &mut Order, reply: &Message) -> Result<(), StepError> {
        if self.unreadable_reply {
            return Err(StepError::rejected(format!(
                "reply {} has a schema this version cannot read",
                reply.message_type
            )));
        }
        Ok(())
    }

    async fn compensate(
        &self,
        _: &mut StepContext<'_, Tx>,
        order: &mut Order,
    ) -> Result<StepOutcome, StepError> {
        StepOutcome::send_json(&self.channel, format!("{}.undo", self.name), order)
    }
}

/// The first `times` runs of a step's action fail (`retryable` or for
/// good), as when stock is out until another order gives some back.
#[derive(Clone, Copy, Default)]
struct Refusals {
    times: u32,
    retryable: bool,
}

/// The participant's handler of one command type: logs it as an effect,
/// after the refusals it has left.
struct Apply {
    effects: Effects,
    refusals: Mutex<Refusals>,
}

impl Apply {
    fn new(effects: &Effects, refusals: Refusals) -> Self {
        Self {
            effects: effects.clone(),
            refusals: Mutex::new(refusals),
        }
    }
}

#[async_trait]
impl<Tx: Send + 'static> CommandHandler<Tx> for Apply {
    async fn handle(&self, _: &mut Tx, command: &Message) -> Result<Reply, StepError> {
        {
            let mut refusals = self.refusals.lock().unwrap();
            if refusals.times > 0 {
                refusals.times -= 1;
                let why = format!("{} refused (out of stock)", command.message_type);
                return Err(if refusals.retryable {
                    StepError::retryable(why)
                } else {
                    StepError::rejected(why)
                });
            }
        }
        self.effects
            .0
            .lock()
            .unwrap()
            .push(command.message_type.clone());
        Ok(Reply::empty(format!("{}.done", command.message_type)))
    }
}

/// An orchestrator, a participant and a relay on `store`.
struct Rig<S: Store + Clone> {
    orchestrator: Orchestrator<S>,
    effects: Effects,
    workers: Vec<Worker>,
}

impl<S: Store + Clone> Rig<S> {
    /// Starts everything over an in-memory transport; `steps` get the
    /// participant's channel.
    async fn start(store: S, relay: SpawnRelay<S>, steps: Vec<Remote>) -> Self {
        Self::start_on(store, relay, Arc::new(MemoryTransport::default()), steps).await
    }

    /// Starts everything over `transport`.
    async fn start_on(
        store: S,
        relay: SpawnRelay<S>,
        transport: Arc<dyn Transport>,
        steps: Vec<Remote>,
    ) -> Self {
        let effects = Effects::default();
        let channel = steps.first().map(|s| s.channel.clone()).unwrap_or_default();
        let mut participant = Participant::new(
            unique("stock"),
            channel,
            store.clone(),
            Arc::clone(&transport),
        );
        let mut definition = SagaDefinition::new("order");
        for step in steps {
            participant = participant
                .on(step.name, Apply::new(&effects, step.refusals))
                .on(
                    format!("{}.undo", step.name),
                    Apply::new(&effects, Refusals::default()),
                );
            let config = step.config.clone();
            definition = definition.step_with(step, config);
        }
        let orchestrator = Orchestrator::builder(
            store.clone(),
            Arc::clone(&transport),
            OrchestratorConfig::new(unique("orders")).poll_interval(Duration::from_millis(20)),
        )
        .saga(definition)
        .build();
        let workers = vec![
            relay(store, Arc::clone(&transport)),
            participant.spawn().await.expect("the participant starts"),
            orchestrator.spawn().await.expect("the orchestrator starts"),
        ];
        Self {
            orchestrator,
            effects,
            workers,
        }
    }

    /// One remote step, `reserve`, with a 300 ms deadline and three quick
    /// attempts, over `transport`.
    async fn hurried(store: S, relay: SpawnRelay<S>, transport: Arc<dyn Transport>) -> Self {
        Self::hurried_refusing(store, relay, transport, Refusals::default()).await
    }

    /// [`hurried`](Self::hurried), with the participant refusing first.
    async fn hurried_refusing(
        store: S,
        relay: SpawnRelay<S>,
        transport: Arc<dyn Transport>,
        refusals: Refusals,
    ) -> Self {
        let step = Remote {
            config: hurried(),
            refusals,
            ..remote("reserve", &unique("stock.commands"))
        };
        Self::start_on(store, relay, transport, vec![step]).await
    }

    /// Waits until the saga ignored a reply to attempt `attempt`: the
    /// participant handled that attempt's command.
    async fn ignored_reply_to(&self, id: SagaId, attempt: u32) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let history = self
                .orchestrator
                .saga(id)
                .await
                .unwrap()
                .unwrap()
                .instance
                .history;
            if history
                .iter()
                .any(|e| e.status == StepStatus::IgnoredReply && e.attempt == attempt)
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no reply to attempt {attempt} came after {PATIENCE:?}: {history:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until [`Orchestrator::overdue`] lists the saga with a
    /// postponed deadline as its last history line; returns that line.
    async fn listed_as_overdue(&self, id: SagaId) -> crate::StepEvent {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let overdue = self.orchestrator.overdue(Duration::ZERO).await.unwrap();
            let last = overdue
                .into_iter()
                .find(|view| view.instance.id == id)
                .and_then(|view| view.instance.history.last().cloned());
            if let Some(last) = last.filter(|e| e.status == StepStatus::Postponed) {
                return last;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "saga {id} was not listed as overdue with a postponed deadline within {PATIENCE:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn run(&self) -> SagaId {
        self.orchestrator
            .start_saga(
                "order",
                &Order {
                    id: unique("order"),
                },
            )
            .await
            .expect("the saga starts")
    }

    /// The saga's state once it ended.
    async fn ended(&self, id: SagaId) -> SagaState {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let view = self.orchestrator.saga(id).await.unwrap().unwrap();
            if view.instance.state.is_terminal() {
                return view.instance.state;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "saga {id} is still {} after {PATIENCE:?}: {:#?}",
                view.instance.state.as_str(),
                view.instance.history
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(self) {
        for worker in self.workers {
            worker.shutdown().await;
        }
    }
}

fn remote(name: &'static str, channel: &str) -> Remote {
    Remote {
        name,
        channel: channel.to_owned(),
        unreadable_reply: false,
        refusals: Refusals::default(),
        config: StepConfig::default(),
    }
}

/// A deadline short enough for a test, three attempts, quick retries.
fn hurried() -> StepConfig {
    StepConfig::default()
        .deadline(Duration::from_millis(300))
        .retry(
            RetryPolicy::attempts(3)
                .with_backoff(Duration::from_millis(10), Duration::from_millis(10)),
        )
}

/// What [`Late`] does to a reply.
#[derive(Clone, Copy, Debug)]
enum Fate {
    Deliver,
    Delay(Duration),
    Lose,
}

/// The in-memory broker, delaying or losing replies as `fate` says (by the
/// attempt they answer) and commands as `commands` says (by their
/// attempt), as a congested or partly broken broker would.
struct Late {
    inner: MemoryTransport,
    fate: fn(u32) -> Fate,
    commands: fn(u32) -> Fate,
}

#[async_trait]
impl Transport for Late {
    async fn publish(&self, channel: &str, message: &Message) -> crate::Result<()> {
        let attempt = message
            .header(crate::wire::headers::SAGA_ATTEMPT)
            .and_then(|a| a.parse().ok())
            .unwrap_or(0);
        let is_reply = message.header(crate::wire::headers::SAGA_OUTCOME).is_some();
        match if is_reply {
            (self.fate)(attempt)
        } else {
            (self.commands)(attempt)
        } {
            Fate::Deliver => self.inner.publish(channel, message).await,
            Fate::Lose => Ok(()),
            Fate::Delay(wait) => {
                let (inner, channel, message) =
                    (self.inner.clone(), channel.to_owned(), message.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(wait).await;
                    let _ = inner.publish(&channel, &message).await;
                });
                Ok(())
            }
        }
    }

    async fn subscribe(
        &self,
        group: &str,
        channels: &[String],
    ) -> crate::Result<Box<dyn crate::Subscription>> {
        self.inner.subscribe(group, channels).await
    }

    async fn delete_channels(&self, channels: &[String], groups: &[String]) -> crate::Result<()> {
        self.inner.delete_channels(channels, groups).await
    }

    async fn dead_letters(
        &self,
        channel: &str,
        limit: usize,
    ) -> crate::Result<Vec<crate::DeadLetter>> {
        self.inner.dead_letters(channel, limit).await
    }

    async fn replay_dead_letter(&self, channel: &str, id: crate::MessageId) -> crate::Result<bool> {
        self.inner.replay_dead_letter(channel, id).await
    }

    fn capabilities(&self) -> crate::Capabilities {
        self.inner.capabilities()
    }
}

/// A step whose success reply cannot be read (`on_reply` fails) was applied
/// by the participant: the saga compensates it, then the steps before it.
pub async fn a_step_whose_reply_cannot_be_read_is_compensated<S: Store + Clone>(
    store: S,
    relay: SpawnRelay<S>,
) {
    let channel = unique("stock.commands");
    let rig = Rig::start(
        store,
        relay,
        vec![
            remote("reserve", &channel),
            Remote {
                unreadable_reply: true,
                ..remote("charge", &channel)
            },
        ],
    )
    .await;
    let id = rig.run().await;
    assert_eq!(rig.ended(id).await, SagaState::Compensated);
    assert_eq!(
        rig.effects.log(),
        ["reserve", "charge", "charge.undo", "reserve.undo"],
        "the applied charge is undone, then the reservation"
    );
    rig.stop().await;
}

/// A broker that delivers the first attempt's reply after two deadlines
/// and loses the later ones.
fn first_reply_late() -> Late {
    Late {
        inner: MemoryTransport::default(),
        fate: |attempt| match attempt {
            1 => Fate::Delay(Duration::from_millis(700)),
            _ => Fate::Lose,
        },
        commands: |_| Fate::Deliver,
    }
}

/// A success to an earlier attempt of the step the saga waits on counts: the
/// participant answers every attempt alike. Here the first reply is late
/// (after two deadlines) and the later ones are lost: the saga completes on
/// the first, instead of compensating after its last attempt.
pub async fn a_late_success_of_an_earlier_attempt_completes_the_step<S: Store + Clone>(
    store: S,
    relay: SpawnRelay<S>,
) {
    let late = first_reply_late();
    let rig = Rig::hurried(store, relay, Arc::new(late)).await;
    let id = rig.run().await;
    assert_eq!(rig.ended(id).await, SagaState::Completed);
    assert_eq!(rig.effects.log(), ["reserve"], "applied once, never undone");
    rig.stop().await;
}

/// A refusal to an earlier attempt counts as a success to one does: the
/// participant stores a refusal as the step's final answer and gives it to
/// every attempt. Here the first attempt is refused, its reply comes after
/// two deadlines (a backlog) and the later replies are lost. The saga turns
/// back on that refusal, with it as the reason; before, it ignored the
/// reply while it waited for its retry time, and the step ended on its
/// last deadline, as if the participant might have applied it (the process
/// campaign saw thousands of such replies ignored after a broker outage).
pub async fn a_late_refusal_of_an_earlier_attempt_ends_the_step<S: Store + Clone>(
    store: S,
    relay: SpawnRelay<S>,
) {
    let late = first_reply_late();
    let refused = Refusals {
        times: 1,
        retryable: false,
    };
    let rig = Rig::hurried_refusing(store, relay, Arc::new(late), refused).await;
    let id = rig.run().await;
    assert_eq!(rig.ended(id).await, SagaState::Compensated);
    let history = rig
        .orchestrator
        .saga(id)
        .await
        .unwrap()
        .unwrap()
        .instance
        .history;
    let forward_end = history
        .iter()
        .rfind(|e| e.phase == Phase::Forward && e.status != StepStatus::IgnoredReply)
        .unwrap();
    assert_eq!(
        (forward_end.status, forward_end.error.as_deref()),
        (StepStatus::Failed, Some("reserve refused (out of stock)")),
        "the step ends on the refusal: {history:#?}"
    );
    assert_eq!(rig.effects.log(), Vec::<String>::new(), "nothing applied");
    rig.stop().await;
}

/// A refusal is the step's final answer. The first command is delayed past
/// its deadline; the retry is refused (out of stock) and the saga turns
/// back. When the first command arrives, stock is back: before, it was
/// applied and nothing undid it (found by the process campaign, an order
/// CANCELLED with its stock reserved). The participant answers it with the
/// stored refusal instead.
pub async fn an_earlier_attempt_arriving_after_a_refusal_is_not_applied<S: Store + Clone>(
    store: S,
    relay: SpawnRelay<S>,
) {
    let refused_once = Refusals {
        times: 1,
        retryable: false,
    };
    first_command_late(
        store,
        relay,
        refused_once,
        &[&[]],
        "the late first attempt is refused as the retry was",
    )
    .await;
}

/// A step given up after retryable failures is compensated: its first
/// command, delayed past the deadline, may still arrive and apply it.
/// Before, the saga turned back from the step before, and the late command
/// reserved stock nothing undid. Now the step's compensation runs first;
/// finding nothing applied, it leaves a mark that refuses the late command.
pub async fn a_step_given_up_while_busy_is_compensated_in_case_an_attempt_arrives_late<
    S: Store + Clone,
>(
    store: S,
    relay: SpawnRelay<S>,
) {
    let busy_twice = Refusals {
        times: 2,
        retryable: true,
    };
    first_command_late(
        store,
        relay,
        busy_twice,
        // The compensation usually comes first and the late attempt is
        // refused; on a busy machine the late attempt may come before it,
        // and is then undone.
        &[&[], &["reserve", "reserve.undo"]],
        "nothing stays applied",
    )
    .await;
}

/// The step's first command arrives 1 s late, past its deadline; the
/// participant answers the attempts before it with `refusals`. The saga
/// compensates, its late first attempt is answered with the stored outcome
/// and ignored, and the participant's effects are one of `expected` (`why`
/// says what that means).
async fn first_command_late<S: Store + Clone>(
    store: S,
    relay: SpawnRelay<S>,
    refusals: Refusals,
    expected: &[&[&str]],
    why: &str,
) {
    let late = Late {
        inner: MemoryTransport::default(),
        fate: |_| Fate::Deliver,
        commands: |attempt| match attempt {
            1 => Fate::Delay(Duration::from_secs(1)),
            _ => Fate::Deliver,
        },
    };
    let rig = Rig::hurried_refusing(store, relay, Arc::new(late), refusals).await;
    let id = rig.run().await;
    assert_eq!(rig.ended(id).await, SagaState::Compensated);
    rig.ignored_reply_to(id, 1).await;
    let effects = rig.effects.log();
    assert!(
        expected.iter().any(|e| effects == *e),
        "{why}: {effects:?}, expected one of {expected:?}"
    );
    rig.stop().await;
}

/// While the transport is unreachable, deadlines do not use up attempts:
/// they move on, and the history says why. Meanwhile the operator's query
/// ([`Orchestrator::overdue`]) lists the saga with that reason. After an outage of five
/// deadlines, the saga completes as it would have without it. (An attempt
/// may still time out after the outage, on a machine too busy to answer
/// within the 300 ms deadline; none does during it.)
pub async fn deadlines_wait_while_the_transport_is_unreachable<S: Store + Clone>(
    store: S,
    relay: SpawnRelay<S>,
) {
    let broker = MemoryTransport::default();
    let outage = Duration::from_millis(1500);
    let outage_ends = crate::clock::now() + outage;
    broker.outage(outage);
    let rig = Rig::hurried(store, relay, Arc::new(broker)).await;
    let id = rig.run().await;
    let waiting = rig.listed_as_overdue(id).await;
    assert!(
        waiting.error.as_deref().is_some_and(|why| !why.is_empty()),
        "the operator's query says why it waits: {waiting:?}"
    );
    assert_eq!(rig.ended(id).await, SagaState::Completed);
    assert!(
        !rig.orchestrator
            .overdue(Duration::ZERO)
            .await
            .unwrap()
            .iter()
            .any(|view| view.instance.id == id),
        "a completed saga is no longer overdue"
    );
    assert_eq!(rig.effects.log(), ["reserve"]);
    let history = rig
        .orchestrator
        .saga(id)
        .await
        .unwrap()
        .unwrap()
        .instance
        .history;
    assert!(
        history.iter().any(|e| e.status == StepStatus::Postponed),
        "the history shows the postponed deadline: {history:#?}"
    );
    assert!(
        !history
            .iter()
            .any(|e| e.status == StepStatus::TimedOut && e.at < outage_ends),
        "no attempt timed out during the outage (it ended at {outage_ends}): {history:#?}"
    );
    rig.stop().await;
}

/// A command of `saga` at step 1 in `phase`, as an orchestrator sends it.
fn step_command(message_type: &str, saga: SagaId, phase: crate::Phase) -> Message {
    use crate::wire::headers;
    Message::new(message_type, b"{}".to_vec())
        .with_saga_id(saga)
        .with_reply_to("orders.replies")
        .with_header(headers::SAGA_STEP, "1")
        .with_header(headers::SAGA_PHASE, phase.as_str())
        .with_header(headers::SAGA_ATTEMPT, "1")
}

/// A saga id made `offset` from now (UUIDv7 carries its time).
fn saga_made(offset: chrono::Duration) -> SagaId {
    let at = crate::clock::now() + offset;
    let seconds = u64::try_from(at.timestamp()).expect("a time after 1970");
    let timestamp =
        uuid::Timestamp::from_unix(uuid::NoContext, seconds, at.timestamp_subsec_nanos());
    SagaId::from_uuid(uuid::Uuid::new_v7(timestamp))
}

/// A compensation that comes after its step's mark was purged (an operator
/// retried a saga FAILED for weeks) still undoes the action: for a saga
/// older than the purge, a missing mark is not read as "the action never
/// ran". A compensation that overtakes its command in a saga newer than
/// the purge is still answered without running, and the late command is
/// refused.
pub async fn a_compensation_after_its_mark_was_purged_still_undoes<S: Store + Clone>(
    store: S,
    _relay: SpawnRelay<S>,
) {
    use crate::Phase;
    let effects = Effects::default();
    let apply = || Apply::new(&effects, Refusals::default());
    let participant = Participant::new(
        unique("stock"),
        unique("stock.commands"),
        store.clone(),
        Arc::new(MemoryTransport::default()),
    )
    .on("reserve", apply())
    .on("reserve.undo", apply());

    let weeks_old = saga_made(-chrono::Duration::days(30));
    participant
        .handle(&step_command("reserve", weeks_old, Phase::Forward))
        .await
        .unwrap();
    let purged = store
        .purge_expired(crate::clock::now() + chrono::Duration::seconds(1), 1000)
        .await
        .unwrap();
    assert!(purged > 0, "the step's mark is purged");
    participant
        .handle(&step_command(
            "reserve.undo",
            weeks_old,
            Phase::Compensation,
        ))
        .await
        .unwrap();
    assert_eq!(
        effects.log(),
        ["reserve", "reserve.undo"],
        "the reservation is undone although its mark is gone"
    );

    let fresh = saga_made(chrono::Duration::minutes(1));
    participant
        .handle(&step_command("reserve.undo", fresh, Phase::Compensation))
        .await
        .unwrap();
    participant
        .handle(&step_command("reserve", fresh, Phase::Forward))
        .await
        .unwrap();
    assert_eq!(
        effects.log(),
        ["reserve", "reserve.undo"],
        "an overtaking compensation runs nothing, and the late command is refused"
    );
}

/// A command delivered again after it was handled is answered again with
/// the stored reply through the outbox, never straight to the broker: the
/// answer never overtakes a message of its key still waiting there. Before,
/// the participant published it at once, and the process campaign saw a
/// reply reach the orchestrator ahead of an older reply of the same saga.
pub async fn a_duplicate_command_is_answered_in_its_keys_order<S: Store + Clone>(
    store: S,
    relay: SpawnRelay<S>,
) {
    let broker = MemoryTransport::default();
    let transport: Arc<dyn Transport> = Arc::new(broker.clone());
    let effects = Effects::default();
    let participant = Participant::new(
        unique("stock"),
        unique("stock.commands"),
        store.clone(),
        Arc::clone(&transport),
    )
    .on("reserve", Apply::new(&effects, Refusals::default()));
    let saga = SagaId::new();
    let key = saga.to_string();
    let replies = "orders.replies";
    // An older message of the key waits in the participant's outbox: its
    // relay is behind (the broker was away).
    let older = Message::new("stock.noted", b"{}".to_vec()).with_ordering_key(&key);
    let mut tx = store.begin().await.unwrap();
    store
        .enqueue(&mut tx, &[OutboxEntry::new(replies, older.clone())])
        .await
        .unwrap();
    store.commit(tx).await.unwrap();
    let command = step_command("reserve", saga, crate::Phase::Forward).with_ordering_key(&key);
    participant.handle(&command).await.unwrap();
    participant.handle(&command).await.unwrap();
    assert_eq!(effects.log(), ["reserve"], "applied once");
    assert_eq!(
        broker
            .published(replies)
            .iter()
            .map(|m| m.message_type.as_str())
            .collect::<Vec<_>>(),
        Vec::<&str>::new(),
        "nothing of the key goes out before its relay publishes the older message"
    );
    let relay = relay(store, transport);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while broker.published(replies).len() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the relay published {:?} within {PATIENCE:?}",
            broker.published(replies)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    relay.shutdown().await;
    let published = broker.published(replies);
    assert_eq!(
        published[0].id, older.id,
        "the key's older message goes out first: {published:?}"
    );
}

/// Refuses an event the first time it sees it, then handles it.
struct RefusesOnce {
    seen: Arc<Mutex<u32>>,
}

#[async_trait]
impl<Tx: Send + 'static> crate::EventHandler<Tx> for RefusesOnce {
    async fn handle(
        &self,
        _: &mut crate::EventContext<'_, Tx>,
        _: &Message,
    ) -> Result<(), StepError> {
        let mut seen = self.seen.lock().unwrap();
        *seen += 1;
        if *seen == 1 {
            return Err(StepError::rejected("the stock table was being migrated"));
        }
        Ok(())
    }
}

/// A choreography event rejected for good is logged as failed but not
/// recorded as processed: replayed (from the dead-letter channel, once the
/// cause is fixed), it runs its handler again.
pub async fn a_replayed_failed_event_runs_its_handler_again<S: Store + Clone>(
    store: S,
    _relay: SpawnRelay<S>,
) {
    let seen = Arc::new(Mutex::new(0));
    let consumer = crate::EventConsumer::new(
        unique("stock"),
        [unique("order.events")],
        store.clone(),
        Arc::new(MemoryTransport::default()),
    )
    .on(
        "order.placed",
        RefusesOnce {
            seen: Arc::clone(&seen),
        },
    );
    let correlation = unique("order");
    let event = Message::new("order.placed", b"{}".to_vec()).with_correlation_id(&correlation);
    let refused = consumer.handle(&event).await;
    assert!(
        refused.as_ref().is_err_and(|e| !e.is_retryable()),
        "a rejection is permanent, for the dead-letter channel: {refused:?}"
    );
    consumer
        .handle(&event)
        .await
        .expect("the replayed event is handled");
    assert_eq!(*seen.lock().unwrap(), 2, "the handler ran again");
    let log: Vec<crate::saga::LogStatus> = crate::SagaStore::log(&store, &correlation)
        .await
        .unwrap()
        .iter()
        .map(|e| e.status)
        .collect();
    assert_eq!(
        log,
        [
            crate::saga::LogStatus::Failed,
            crate::saga::LogStatus::Handled
        ]
    );
    consumer
        .handle(&event)
        .await
        .expect("a duplicate of a handled event is skipped");
    assert_eq!(*seen.lock().unwrap(), 2, "once handled, never again");
}

/// An event handler that fails retryably on its first `failures` calls,
/// then succeeds; it records when each call came.
struct FailsAtFirst {
    failures: usize,
    calls: Arc<Mutex<Vec<tokio::time::Instant>>>,
}

#[async_trait]
impl<Tx: Send + 'static> crate::EventHandler<Tx> for FailsAtFirst {
    async fn handle(
        &self,
        _: &mut crate::EventContext<'_, Tx>,
        _: &Message,
    ) -> Result<(), StepError> {
        let mut calls = self.calls.lock().unwrap();
        calls.push(tokio::time::Instant::now());
        if calls.len() <= self.failures {
            return Err(StepError::retryable("the pricing service is restarting"));
        }
        Ok(())
    }
}

/// Waits until `calls` holds `count` calls (or the patience runs out).
async fn calls_reach(calls: &Arc<Mutex<Vec<tokio::time::Instant>>>, count: usize) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while calls.lock().unwrap().len() < count && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The log statuses of `correlation`, in order.
async fn log_of<S: Store>(store: &S, correlation: &str) -> Vec<crate::saga::LogStatus> {
    crate::SagaStore::log(store, correlation)
        .await
        .unwrap()
        .iter()
        .map(|e| e.status)
        .collect()
}

/// A choreography event whose handler fails retryably more often than the
/// transport's delivery limit is retried in place with the consumer's
/// backoff, and handled once the cause passes: never dead-lettered.
pub async fn a_failing_event_is_retried_with_backoff_not_dead_lettered<S: Store + Clone>(
    store: S,
    _relay: SpawnRelay<S>,
) {
    let transport = MemoryTransport::default();
    let channel = unique("order.events");
    let calls = Arc::new(Mutex::new(Vec::new()));
    let backoff = Duration::from_millis(40);
    let consumer = crate::EventConsumer::new(
        unique("pricing"),
        [channel.clone()],
        store.clone(),
        Arc::new(transport.clone()),
    )
    .on(
        "order.placed",
        FailsAtFirst {
            failures: 8,
            calls: Arc::clone(&calls),
        },
    )
    .handling_retry(
        RetryPolicy::forever()
            .with_backoff(backoff, backoff)
            .with_jitter(0.0),
    );
    let _worker = consumer.spawn().await.unwrap();
    let correlation = unique("order");
    let event = Message::new("order.placed", b"{}".to_vec()).with_correlation_id(&correlation);
    transport.publish(&channel, &event).await.unwrap();
    calls_reach(&calls, 9).await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while log_of(&store, &correlation).await.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        transport
            .dead_letters(&channel, 10)
            .await
            .unwrap()
            .is_empty(),
        "a retryable failure is not dead-lettered, whatever the delivery limit (5)"
    );
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 9, "8 failures, then handled once");
    for pair in calls.windows(2) {
        assert!(
            pair[1] - pair[0] >= backoff,
            "each retry waits the backoff: {:?}",
            pair[1] - pair[0]
        );
    }
    assert_eq!(
        log_of(&store, &correlation).await,
        [crate::saga::LogStatus::Handled]
    );
}

/// With a bounded consumer retry policy, an event that keeps failing is
/// dead-lettered with its last error; listed and replayed through the
/// transport once the cause passed, it runs its handler again.
pub async fn an_event_whose_retries_ran_out_is_replayed_through_the_transport<S: Store + Clone>(
    store: S,
    _relay: SpawnRelay<S>,
) {
    let transport = MemoryTransport::default();
    let channel = unique("order.events");
    let calls = Arc::new(Mutex::new(Vec::new()));
    let consumer = crate::EventConsumer::new(
        unique("pricing"),
        [channel.clone()],
        store.clone(),
        Arc::new(transport.clone()),
    )
    .on(
        "order.placed",
        FailsAtFirst {
            failures: 3,
            calls: Arc::clone(&calls),
        },
    )
    .handling_retry(
        RetryPolicy::attempts(3).with_backoff(Duration::from_millis(10), Duration::from_millis(10)),
    );
    let _worker = consumer.spawn().await.unwrap();
    let correlation = unique("order");
    let event = Message::new("order.placed", b"{}".to_vec()).with_correlation_id(&correlation);
    transport.publish(&channel, &event).await.unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut listed = Vec::new();
    while listed.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
        listed = transport.dead_letters(&channel, 10).await.unwrap();
    }
    assert_eq!(listed.len(), 1, "dead-lettered once its 3 attempts failed");
    assert_eq!(listed[0].message.id, event.id);
    assert!(
        listed[0].error.contains("failed 3 times")
            && listed[0]
                .error
                .contains("the pricing service is restarting"),
        "the dead letter says why: {:?}",
        listed[0].error
    );
    assert_eq!(calls.lock().unwrap().len(), 3);
    assert!(
        transport
            .replay_dead_letter(&channel, event.id)
            .await
            .unwrap()
    );
    calls_reach(&calls, 4).await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while log_of(&store, &correlation).await.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(calls.lock().unwrap().len(), 4, "the replay ran the handler");
    assert_eq!(
        log_of(&store, &correlation).await,
        [crate::saga::LogStatus::Handled]
    );
    assert!(
        transport
            .dead_letters(&channel, 10)
            .await
            .unwrap()
            .is_empty()
    );
}
