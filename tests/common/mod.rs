//! A small world for engine tests: an orchestrator service, three
//! participants, one relay per store, all on in-memory backends, each with
//! the library's default settings (retries, deadlines, leases, delivery
//! limit, consumer retries).
//!
//! The saga has four steps: a local one (`record`, in the orchestrator's own
//! transaction) and three remote ones (`stock`, `payment`, `shipping`). Each
//! saga carries a [`Plan`] that tells the participants how to behave for it.
//! Every effect and compensation is counted in the service's own transaction,
//! so the counts are what a database would hold.

// Each test file uses part of this module.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use saga::memory::{MemoryStore, MemoryTransport, MemoryTx};
use saga::outbox::{Relay, RelayConfig};
use saga::wire::headers;
use saga::{
    CommandHandler, Message, Orchestrator, OrchestratorConfig, Participant, Reply, SagaDefinition,
    SagaId, SagaState, SagaStep, StepConfig, StepContext, StepError, StepOutcome, Store, Transport,
    Worker,
};
use serde::{Deserialize, Serialize};

pub const SAGA: &str = "checkout";
pub const PARTICIPANTS: [&str; 3] = ["stock", "payment", "shipping"];
/// Attempts of a failing action (`StepConfig::default()`).
pub const ACTION_ATTEMPTS: u32 = 3;
/// Attempts of a failing compensation (`StepConfig::default()`).
pub const COMPENSATION_ATTEMPTS: u32 = 10;
/// Reply deadline of the remote steps (`StepConfig::default()`).
pub const DEADLINE: Duration = StepConfig::DEFAULT_DEADLINE;

/// How the services behave for one saga. Steps: 0 local, 1..=3 remote.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Plan {
    /// This remote step refuses (business failure).
    pub reject_at: Option<u32>,
    /// Step -> number of retryable failures before it succeeds.
    pub transient: BTreeMap<u32, u32>,
    /// Step -> number of failing compensation attempts.
    pub compensation_failures: BTreeMap<u32, u32>,
    /// This remote step answers its first attempt after the deadline.
    pub slow_at: Option<u32>,
}

impl Plan {
    /// The step where the saga stops going forward, if any (ignoring slowness).
    pub fn first_failure(&self) -> Option<u32> {
        let exhausted = self
            .transient
            .iter()
            .filter(|(_, n)| **n >= ACTION_ATTEMPTS)
            .map(|(s, _)| *s);
        self.reject_at.into_iter().chain(exhausted).min()
    }

    /// The terminal state this plan must end in; `None` when timing decides
    /// (a slow step may still complete through a retry).
    pub fn expected(&self) -> Option<SagaState> {
        if self.slow_at.is_some() {
            return None;
        }
        let Some(failed) = self.first_failure() else {
            return Some(SagaState::Completed);
        };
        let stuck = (0..failed).any(|s| {
            self.compensation_failures.get(&s).copied().unwrap_or(0) >= COMPENSATION_ATTEMPTS
        });
        Some(if stuck {
            SagaState::Failed
        } else {
            SagaState::Compensated
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckoutData {
    pub plan: Plan,
}

/// What a service recorded for one step of one saga.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Effect {
    pub applied: u32,
    pub compensated: u32,
    /// Global order in which compensations committed.
    pub compensated_seq: u64,
}

pub const EFFECTS: &str = "effects";

fn effect_key(saga: SagaId, step: u32) -> String {
    format!("{saga}:{step}")
}

/// Which planned failures an operator healed, and the order of
/// compensations: state outside the stores, surviving rollbacks and kills.
#[derive(Default)]
pub struct Counters {
    healed: Mutex<std::collections::HashSet<(String, u32, &'static str)>>,
    pub sequence: AtomicU64,
}

impl Counters {
    /// Planned failures of `what` for this step stop (an operator fixed the cause).
    pub fn heal(&self, saga: SagaId, step: u32, what: &'static str) {
        self.healed
            .lock()
            .unwrap()
            .insert((saga.to_string(), step, what));
    }

    /// Whether attempt `attempt` of `what` fails as planned: the first
    /// `planned` attempts do, however often each is delivered (a handler
    /// killed after it failed runs again for the same attempt).
    fn should_fail(
        &self,
        saga: &str,
        step: u32,
        what: &'static str,
        planned: u32,
        attempt: u32,
    ) -> bool {
        attempt <= planned
            && !self
                .healed
                .lock()
                .unwrap()
                .contains(&(saga.to_owned(), step, what))
    }
}

/// The attempt a command belongs to (1 when it does not say).
fn attempt_of(command: &Message) -> u32 {
    command
        .header(headers::SAGA_ATTEMPT)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1)
}

fn apply(
    tx: &mut MemoryTx,
    counters: &Counters,
    saga: SagaId,
    step: u32,
    compensation: bool,
) -> Result<(), StepError> {
    let key = effect_key(saga, step);
    let mut effect: Effect = tx.get(EFFECTS, &key)?.unwrap_or_default();
    if compensation {
        effect.compensated += 1;
        effect.compensated_seq = counters.sequence.fetch_add(1, Ordering::SeqCst) + 1;
    } else {
        effect.applied += 1;
    }
    tx.put(EFFECTS, &key, &effect)?;
    Ok(())
}

fn plan_of(command: &Message) -> Result<(SagaId, u32, Plan), StepError> {
    let saga = command
        .saga_id
        .ok_or_else(|| StepError::rejected("no saga id"))?;
    let step = command
        .header(headers::SAGA_STEP)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| StepError::rejected("no step"))?;
    let data: CheckoutData = command.payload_json()?;
    Ok((saga, step, data.plan))
}

/// The participant's command handler: does what the plan says.
pub struct PlannedHandler {
    pub counters: Arc<Counters>,
    pub compensation: bool,
}

#[async_trait]
impl CommandHandler<MemoryTx> for PlannedHandler {
    async fn handle(&self, tx: &mut MemoryTx, command: &Message) -> Result<Reply, StepError> {
        let (saga, step, plan) = plan_of(command)?;
        let id = saga.to_string();
        if self.compensation {
            let planned = plan.compensation_failures.get(&step).copied().unwrap_or(0);
            if self
                .counters
                .should_fail(&id, step, "compensation", planned, attempt_of(command))
            {
                return Err(StepError::retryable("compensation failed (planned)"));
            }
        } else {
            if plan.reject_at == Some(step) {
                return Err(StepError::rejected("refused (planned)"));
            }
            let planned = plan.transient.get(&step).copied().unwrap_or(0);
            if self
                .counters
                .should_fail(&id, step, "action", planned, attempt_of(command))
            {
                return Err(StepError::retryable("busy (planned)"));
            }
            if plan.slow_at == Some(step) && command.header(headers::SAGA_ATTEMPT) == Some("1") {
                tokio::time::sleep(DEADLINE + Duration::from_secs(1)).await;
            }
        }
        apply(tx, &self.counters, saga, step, self.compensation)?;
        Ok(Reply::empty(format!("{}.ok", command.message_type)))
    }
}

/// The local first step, in the orchestrator's own transaction.
pub struct Record {
    pub counters: Arc<Counters>,
}

#[async_trait]
impl SagaStep<CheckoutData, MemoryTx> for Record {
    fn name(&self) -> &str {
        "record"
    }

    async fn execute(
        &self,
        ctx: &mut StepContext<'_, MemoryTx>,
        _: &mut CheckoutData,
    ) -> Result<StepOutcome, StepError> {
        apply(ctx.tx, &self.counters, ctx.saga_id, 0, false)?;
        Ok(StepOutcome::Done)
    }

    async fn compensate(
        &self,
        ctx: &mut StepContext<'_, MemoryTx>,
        data: &mut CheckoutData,
    ) -> Result<StepOutcome, StepError> {
        let planned = data
            .plan
            .compensation_failures
            .get(&0)
            .copied()
            .unwrap_or(0);
        if self.counters.should_fail(
            &ctx.saga_id.to_string(),
            0,
            "compensation",
            planned,
            ctx.attempt,
        ) {
            return Err(StepError::retryable("local compensation failed (planned)"));
        }
        apply(ctx.tx, &self.counters, ctx.saga_id, 0, true)?;
        Ok(StepOutcome::Done)
    }
}

/// A remote step: one command to a participant, another to undo it.
pub struct Remote {
    pub participant: &'static str,
}

#[async_trait]
impl SagaStep<CheckoutData, MemoryTx> for Remote {
    fn name(&self) -> &str {
        self.participant
    }

    async fn execute(
        &self,
        _: &mut StepContext<'_, MemoryTx>,
        data: &mut CheckoutData,
    ) -> Result<StepOutcome, StepError> {
        StepOutcome::send_json(
            format!("{}.commands", self.participant),
            format!("{}.do", self.participant),
            data,
        )
    }

    async fn compensate(
        &self,
        _: &mut StepContext<'_, MemoryTx>,
        data: &mut CheckoutData,
    ) -> Result<StepOutcome, StepError> {
        StepOutcome::send_json(
            format!("{}.commands", self.participant),
            format!("{}.undo", self.participant),
            data,
        )
    }
}

/// A runtime on tokio's paused clock: deadlines, leases and backoffs cost no real time.
pub fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("a tokio runtime")
}

/// The checkout saga, every step with `StepConfig::default()`.
pub fn definition(counters: &Arc<Counters>) -> SagaDefinition<CheckoutData, MemoryTx> {
    let mut definition = SagaDefinition::new(SAGA).step(Record {
        counters: Arc::clone(counters),
    });
    for participant in PARTICIPANTS {
        definition = definition.step(Remote { participant });
    }
    definition
}

pub fn orchestrator<S: Store<Tx = MemoryTx> + Clone>(
    store: S,
    transport: Arc<dyn Transport>,
    counters: &Arc<Counters>,
) -> Orchestrator<S> {
    Orchestrator::builder(store, transport, OrchestratorConfig::new("checkout"))
        .saga(definition(counters))
        .build()
}

pub fn relay_config() -> RelayConfig {
    RelayConfig::default()
}

/// Participant `name` on `store`: applies and undoes as each saga's plan says.
pub fn participant(
    name: &'static str,
    store: MemoryStore,
    transport: Arc<dyn Transport>,
    counters: &Arc<Counters>,
) -> Participant<MemoryStore> {
    Participant::new(name, format!("{name}.commands"), store, transport)
        .on(
            format!("{name}.do"),
            PlannedHandler {
                counters: Arc::clone(counters),
                compensation: false,
            },
        )
        .on(
            format!("{name}.undo"),
            PlannedHandler {
                counters: Arc::clone(counters),
                compensation: true,
            },
        )
}

/// Every service of the world, with its own store.
pub struct World {
    pub transport: MemoryTransport,
    pub counters: Arc<Counters>,
    pub orchestrator_store: MemoryStore,
    pub participant_stores: Vec<MemoryStore>,
    pub orchestrator: Orchestrator<MemoryStore>,
    pub orchestrator_worker: Option<Worker>,
    /// More orchestrator instances on the same store, running at the same time.
    pub extra_orchestrators: Vec<Worker>,
    pub participant_workers: Vec<Worker>,
    pub relays: Vec<Option<Worker>>,
}

impl World {
    /// Every service running.
    pub async fn start(transport: MemoryTransport) -> Self {
        let mut world = Self::start_without_orchestrator(transport).await;
        world.orchestrator_worker = Some(world.orchestrator.spawn().await.unwrap());
        world
    }

    /// Participants and relays running; the orchestrator built but not running.
    pub async fn start_without_orchestrator(transport: MemoryTransport) -> Self {
        let counters = Arc::new(Counters::default());
        let shared: Arc<dyn Transport> = Arc::new(transport.clone());
        let orchestrator_store = MemoryStore::new();
        let orchestrator = orchestrator(orchestrator_store.clone(), Arc::clone(&shared), &counters);
        let mut participant_stores = Vec::new();
        let mut participant_workers = Vec::new();
        for name in PARTICIPANTS {
            let store = MemoryStore::new();
            participant_workers.push(
                participant(name, store.clone(), Arc::clone(&shared), &counters)
                    .spawn()
                    .await
                    .unwrap(),
            );
            participant_stores.push(store);
        }
        let mut world = Self {
            transport,
            counters,
            orchestrator_store,
            participant_stores,
            orchestrator_worker: None,
            extra_orchestrators: Vec::new(),
            orchestrator,
            participant_workers,
            relays: Vec::new(),
        };
        for index in 0..=PARTICIPANTS.len() {
            let relay = world.relay(index);
            world.relays.push(Some(relay));
        }
        world
    }

    pub fn stores(&self) -> Vec<MemoryStore> {
        std::iter::once(self.orchestrator_store.clone())
            .chain(self.participant_stores.iter().cloned())
            .collect()
    }

    fn relay(&self, index: usize) -> Worker {
        let store = self.stores()[index].clone();
        Relay::new(store, Arc::new(self.transport.clone()), relay_config()).spawn()
    }

    /// Kills the orchestrator (as `kill -9` would) and starts a new instance on the same store.
    pub async fn crash_orchestrator(&mut self) {
        if let Some(worker) = self.orchestrator_worker.take() {
            worker.abort().await;
        }
        let shared: Arc<dyn Transport> = Arc::new(self.transport.clone());
        self.orchestrator = orchestrator(self.orchestrator_store.clone(), shared, &self.counters);
        self.orchestrator_worker = Some(self.orchestrator.spawn().await.unwrap());
    }

    /// Starts one more orchestrator instance on the same store and reply group.
    pub async fn add_orchestrator(&mut self) {
        let shared: Arc<dyn Transport> = Arc::new(self.transport.clone());
        let extra = orchestrator(self.orchestrator_store.clone(), shared, &self.counters);
        self.extra_orchestrators.push(extra.spawn().await.unwrap());
    }

    /// Kills participant `index` (as `kill -9` would: before or after its
    /// commit, wherever it is) and starts it again on the same store.
    pub async fn crash_participant(&mut self, index: usize) {
        let worker = std::mem::replace(
            &mut self.participant_workers[index],
            participant(
                PARTICIPANTS[index],
                self.participant_stores[index].clone(),
                Arc::new(self.transport.clone()),
                &self.counters,
            )
            .spawn()
            .await
            .unwrap(),
        );
        worker.abort().await;
    }

    /// Kills one relay mid-whatever and starts another on the same store.
    pub async fn crash_relay(&mut self, index: usize) {
        if let Some(worker) = self.relays[index].take() {
            worker.abort().await;
        }
        self.relays[index] = Some(self.relay(index));
    }

    pub async fn state(&self, id: SagaId) -> SagaState {
        self.orchestrator
            .saga(id)
            .await
            .unwrap()
            .expect("saga exists")
            .instance
            .state
    }

    /// Waits (in tokio time) until every saga ended; panics after `limit`.
    pub async fn wait_terminal(&self, ids: &[SagaId], limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let mut open = Vec::new();
            for id in ids {
                let state = self.state(*id).await;
                if !state.is_terminal() {
                    open.push((id, state));
                }
            }
            if open.is_empty() {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "sagas still open after {limit:?}: {open:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until every outbox is empty and no delivery is in flight anywhere.
    pub async fn wait_quiet(&self) {
        for store in self.stores() {
            saga::outbox::wait_until_delivered(&store, Duration::from_secs(600))
                .await
                .expect("outbox drains");
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
        for store in self.stores() {
            saga::outbox::wait_until_delivered(&store, Duration::from_secs(600))
                .await
                .expect("outbox drains");
        }
    }

    /// The effect every service recorded for step `step` of saga `id`.
    pub async fn effect(&self, id: SagaId, step: u32) -> Effect {
        let store = if step == 0 {
            &self.orchestrator_store
        } else {
            &self.participant_stores[step as usize - 1]
        };
        store
            .row(EFFECTS, &effect_key(id, step))
            .await
            .unwrap()
            .unwrap_or_default()
    }

    /// Checks what the databases hold for one terminal saga, against its
    /// state; with `exact`, also that the state is the one its plan leads to.
    pub async fn check_saga(&self, id: SagaId, plan: &Plan, exact: bool) -> Result<(), String> {
        let view = self.orchestrator.saga(id).await.unwrap().unwrap();
        let state = view.instance.state;
        if let Some(expected) = plan.expected().filter(|_| exact)
            && state != expected
        {
            return Err(format!(
                "saga {id} ended {state:?}, expected {expected:?}; plan {plan:?}; history {:#?}",
                view.instance.history
            ));
        }
        let mut effects = Vec::new();
        for step in 0..=PARTICIPANTS.len() as u32 {
            effects.push(self.effect(id, step).await);
        }
        for (step, effect) in effects.iter().enumerate() {
            if effect.applied > 1 || effect.compensated > 1 {
                return Err(format!("saga {id} step {step} applied twice: {effect:?}"));
            }
            if effect.compensated > effect.applied {
                return Err(format!(
                    "saga {id} step {step} compensated without being applied: {effect:?}"
                ));
            }
        }
        match state {
            SagaState::Completed => {
                if let Some(step) = effects.iter().position(|e| {
                    *e != Effect {
                        applied: 1,
                        compensated: 0,
                        compensated_seq: 0,
                    }
                }) {
                    return Err(format!(
                        "completed saga {id}: step {step} is {:?}",
                        effects[step]
                    ));
                }
            }
            SagaState::Compensated => {
                if let Some(step) = effects.iter().position(|e| e.applied != e.compensated) {
                    return Err(format!(
                        "compensated saga {id}: step {step} is {:?}",
                        effects[step]
                    ));
                }
            }
            SagaState::Failed => {
                if !view
                    .instance
                    .error
                    .as_deref()
                    .unwrap_or_default()
                    .contains("compensation")
                {
                    return Err(format!(
                        "failed saga {id} does not say which compensation failed: {:?}",
                        view.instance.error
                    ));
                }
            }
            other => return Err(format!("saga {id} is not terminal: {other:?}")),
        }
        // Compensations ran in exact reverse order of the steps.
        let mut order: Vec<(u64, usize)> = effects
            .iter()
            .enumerate()
            .filter(|(_, e)| e.compensated == 1)
            .map(|(step, e)| (e.compensated_seq, step))
            .collect();
        order.sort_unstable();
        let steps: Vec<usize> = order.iter().map(|(_, s)| *s).collect();
        if steps.windows(2).any(|w| w[0] < w[1]) {
            return Err(format!(
                "saga {id} compensated out of reverse order: {steps:?}"
            ));
        }
        Ok(())
    }

    /// No message was given up on: every outbox drained with no dead
    /// message, and every dead letter on the broker is a message its
    /// consumer had already processed. (The transport's delivery limit
    /// dead-letters a message delivered again and again without being
    /// settled, as after repeated crashes right after a commit; a processed
    /// one is not lost.)
    pub async fn check_nothing_lost(&self) -> Result<(), String> {
        use saga::{IdempotencyStore, OutboxStore, Transactional};
        for store in self.stores() {
            let stats = store.stats().await.unwrap();
            if stats.pending != 0 || stats.dead != 0 {
                return Err(format!(
                    "an outbox holds {} pending and {} dead messages",
                    stats.pending, stats.dead
                ));
            }
        }
        let consumers = PARTICIPANTS
            .iter()
            .zip(&self.participant_stores)
            .map(|(p, store)| (format!("{p}.commands"), *p, store))
            .chain([(
                "checkout.replies".to_owned(),
                "checkout",
                &self.orchestrator_store,
            )]);
        for (channel, consumer, store) in consumers {
            for letter in self
                .transport
                .dead_letters(&channel, usize::MAX)
                .await
                .unwrap()
            {
                let now = store.now().await;
                let mut tx = store.begin().await.unwrap();
                let begun = store
                    .begin_processing(&mut tx, consumer, letter.message.id, now)
                    .await
                    .unwrap();
                if matches!(begun, saga::store::Begin::Fresh) {
                    return Err(format!(
                        "{} on {channel} was dead-lettered and never processed: {}",
                        letter.message.message_type, letter.error
                    ));
                }
            }
        }
        Ok(())
    }

    pub async fn shutdown(mut self) {
        if let Some(worker) = self.orchestrator_worker.take() {
            worker.shutdown().await;
        }
        for worker in self.extra_orchestrators.drain(..) {
            worker.shutdown().await;
        }
        for worker in self.participant_workers.drain(..) {
            worker.shutdown().await;
        }
        for worker in self.relays.drain(..).flatten() {
            worker.shutdown().await;
        }
    }
}
