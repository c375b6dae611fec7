//! Sagas under random faults, on any store: a property test whose cases are
//! drawn from a seeded generator, so that the SQL stores run it with real
//! concurrent transactions (the in-memory store's global lock hides
//! anomalies).
//!
//! A round starts one world on the store under test (an orchestrator, three
//! participants and two relays, all sharing the store as services sharing
//! one database would), runs up to [`SAGAS_PER_ROUND`] sagas with random
//! plans at once, and injects random faults meanwhile: duplicates, lost
//! acks, reordering and delays, publish failures, a broker outage, and kills
//! of the orchestrator, a participant or a relay. Every setting is the
//! library's default except the leases, which would hold a round for 30 s
//! of real time after a kill: the orchestrator's are 2 s, and the relay the
//! caller spawns should have short ones too.
//!
//! Each effect and compensation is written as an outbox message in the
//! service's own transaction, so what a rolled-back or killed handler did
//! leaves no trace, and what committed twice shows twice. The checks, per
//! saga: it ends COMPLETED or COMPENSATED as its plan says, no step applied
//! or compensated twice, compensations in exact reverse order; per round:
//! every outbox drained with nothing dead, and every dead letter on the
//! broker a message its consumer had processed.
//!
//! `SAGA_CHAOS_ROUNDS` sets the number of rounds (default
//! [`DEFAULT_ROUNDS`]); `SAGA_CHAOS_SEED` replays one round.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::memory::{Faults, MemoryTransport, MemoryTransportConfig};
use crate::saga::{OrchestratorConfig, SagaDefinition, SagaState, StepContext, StepOutcome};
use crate::wire::headers;
use crate::{
    CommandHandler, Message, Orchestrator, OutboxEntry, OutboxStore, Participant, Reply, SagaId,
    SagaStep, StepError, Store, Transport, Worker,
};

use super::engine::SpawnRelay;
use super::unique;

/// Rounds of the normal run.
pub const DEFAULT_ROUNDS: u64 = 40;
/// Sagas started in one round, at most.
pub const SAGAS_PER_ROUND: usize = 60;
const PARTICIPANTS: [&str; 3] = ["stock", "payment", "shipping"];

/// How the services behave for one saga. Step 0 is local, 1..=3 remote.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
struct Plan {
    /// This remote step refuses (a business failure).
    reject_at: Option<u32>,
    /// Step -> retryable failures before it succeeds (3 or more exhaust
    /// the default 3 attempts).
    transient: BTreeMap<u32, u32>,
    /// Step -> failing compensation attempts (fewer than the default 10).
    compensation_failures: BTreeMap<u32, u32>,
}

impl Plan {
    fn random(rng: &mut fastrand::Rng) -> Self {
        let mut plan = Self::default();
        if rng.u8(0..5) == 0 {
            plan.reject_at = Some(rng.u32(1..=3));
        }
        for _ in 0..rng.usize(0..=2) {
            plan.transient.insert(rng.u32(1..=3), rng.u32(0..=3));
        }
        for _ in 0..rng.usize(0..=2) {
            plan.compensation_failures
                .insert(rng.u32(0..=2), rng.u32(0..=2));
        }
        plan
    }

    fn expected(&self) -> SagaState {
        let exhausted = self
            .transient
            .iter()
            .filter(|(_, n)| **n >= 3)
            .map(|(s, _)| *s);
        if self.reject_at.into_iter().chain(exhausted).min().is_some() {
            SagaState::Compensated
        } else {
            SagaState::Completed
        }
    }
}

/// What an effect message says.
#[derive(Debug, Serialize, Deserialize)]
struct Effect {
    saga: SagaId,
    step: u32,
    compensation: bool,
    /// Taken while the handler ran: later handlers of one saga take larger
    /// ones, whatever their stores and relays.
    seq: u64,
}

/// What the services share outside their stores: the effect sequence and
/// channel.
#[derive(Default)]
struct Shared {
    seq: AtomicU64,
    effects: String,
}

/// Which run of which step a handler is.
#[derive(Clone, Copy)]
struct Turn {
    saga: SagaId,
    step: u32,
    compensation: bool,
    attempt: u32,
}

impl Turn {
    /// A run of the local first step.
    fn local(saga: SagaId, attempt: u32, compensation: bool) -> Self {
        Self {
            saga,
            step: 0,
            compensation,
            attempt,
        }
    }
}

impl Shared {
    /// Runs the plan for one step; writes the effect through `tx`.
    async fn act<S: OutboxStore>(
        &self,
        store: &S,
        tx: &mut S::Tx,
        turn: Turn,
        plan: &Plan,
    ) -> Result<(), StepError> {
        let Turn {
            saga,
            step,
            compensation,
            attempt,
        } = turn;
        // The first `planned` attempts fail, however often each is
        // delivered (a handler killed after failing runs again).
        if compensation {
            let planned = plan.compensation_failures.get(&step).copied().unwrap_or(0);
            if attempt <= planned {
                return Err(StepError::retryable("compensation failed (planned)"));
            }
        } else {
            if plan.reject_at == Some(step) {
                return Err(StepError::rejected("refused (planned)"));
            }
            let planned = plan.transient.get(&step).copied().unwrap_or(0);
            if attempt <= planned {
                return Err(StepError::retryable("busy (planned)"));
            }
        }
        let effect = Effect {
            saga,
            step,
            compensation,
            seq: self.seq.fetch_add(1, Ordering::SeqCst),
        };
        let message = Message::json("effect", &effect).map_err(StepError::from)?;
        store
            .enqueue(tx, &[OutboxEntry::new(&self.effects, message)])
            .await
            .map_err(|e| StepError::retryable(e.to_string()))
    }
}

/// A participant's handler: does what the saga's plan says.
struct Planned<S> {
    store: S,
    shared: Arc<Shared>,
    compensation: bool,
}

#[async_trait]
impl<S: Store + Clone> CommandHandler<S::Tx> for Planned<S> {
    async fn handle(&self, tx: &mut S::Tx, command: &Message) -> Result<Reply, StepError> {
        let saga = command
            .saga_id
            .ok_or_else(|| StepError::rejected("no saga id"))?;
        let step = command
            .header(headers::SAGA_STEP)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| StepError::rejected("no step"))?;
        let attempt = command
            .header(headers::SAGA_ATTEMPT)
            .and_then(|a| a.parse().ok())
            .unwrap_or(1);
        let plan: Plan = command.payload_json()?;
        self.shared
            .act(
                &self.store,
                tx,
                Turn {
                    saga,
                    step,
                    compensation: self.compensation,
                    attempt,
                },
                &plan,
            )
            .await?;
        Ok(Reply::empty(format!("{}.ok", command.message_type)))
    }
}

/// The local first step, in the orchestrator's transaction.
struct Local<S> {
    store: S,
    shared: Arc<Shared>,
}

#[async_trait]
impl<S: Store + Clone> SagaStep<Plan, S::Tx> for Local<S> {
    fn name(&self) -> &str {
        "record"
    }

    async fn execute(
        &self,
        ctx: &mut StepContext<'_, S::Tx>,
        plan: &mut Plan,
    ) -> Result<StepOutcome, StepError> {
        self.shared
            .act(
                &self.store,
                ctx.tx,
                Turn::local(ctx.saga_id, ctx.attempt, false),
                plan,
            )
            .await?;
        Ok(StepOutcome::Done)
    }

    async fn compensate(
        &self,
        ctx: &mut StepContext<'_, S::Tx>,
        plan: &mut Plan,
    ) -> Result<StepOutcome, StepError> {
        self.shared
            .act(
                &self.store,
                ctx.tx,
                Turn::local(ctx.saga_id, ctx.attempt, true),
                plan,
            )
            .await?;
        Ok(StepOutcome::Done)
    }
}

/// A remote step: a command to participant `name`, another to undo it.
struct RemoteStep {
    name: &'static str,
    channel: String,
}

#[async_trait]
impl<Tx: Send + 'static> SagaStep<Plan, Tx> for RemoteStep {
    fn name(&self) -> &str {
        self.name
    }

    async fn execute(
        &self,
        _: &mut StepContext<'_, Tx>,
        plan: &mut Plan,
    ) -> Result<StepOutcome, StepError> {
        StepOutcome::send_json(&self.channel, format!("{}.do", self.name), plan)
    }

    async fn compensate(
        &self,
        _: &mut StepContext<'_, Tx>,
        plan: &mut Plan,
    ) -> Result<StepOutcome, StepError> {
        StepOutcome::send_json(&self.channel, format!("{}.undo", self.name), plan)
    }
}

/// One fault of a round's schedule.
#[derive(Clone, Copy, Debug)]
enum Fault {
    CrashOrchestrator,
    CrashParticipant(usize),
    CrashRelay(usize),
    Outage(Duration),
}

/// The checkout saga's orchestrator: the local step, then one remote step
/// per participant; default step settings, 2 s leases.
fn orchestrator<S: Store + Clone>(
    store: &S,
    transport: &MemoryTransport,
    shared: &Arc<Shared>,
    prefix: &str,
) -> Orchestrator<S> {
    let mut definition = SagaDefinition::new("checkout").step(Local {
        store: store.clone(),
        shared: Arc::clone(shared),
    });
    for name in PARTICIPANTS {
        definition = definition.step(RemoteStep {
            name,
            channel: format!("{prefix}{name}.commands"),
        });
    }
    Orchestrator::builder(
        store.clone(),
        Arc::new(transport.clone()),
        OrchestratorConfig::new(format!("{prefix}checkout")).lease(Duration::from_secs(2)),
    )
    .saga(definition)
    .build()
}

/// The services of one round.
struct World<S: Store + Clone> {
    store: S,
    transport: MemoryTransport,
    shared: Arc<Shared>,
    relay: SpawnRelay<S>,
    prefix: String,
    orchestrator: Orchestrator<S>,
    orchestrator_worker: Worker,
    participants: Vec<Worker>,
    relays: Vec<Worker>,
}

impl<S: Store + Clone> World<S> {
    fn channel(&self, participant: &str) -> String {
        format!("{}{participant}.commands", self.prefix)
    }

    fn consumer(&self, participant: &str) -> String {
        format!("{}{participant}", self.prefix)
    }

    fn build_orchestrator(&self) -> Orchestrator<S> {
        orchestrator(&self.store, &self.transport, &self.shared, &self.prefix)
    }

    async fn spawn_participant(&self, index: usize) -> Worker {
        let name = PARTICIPANTS[index];
        let mut participant = Participant::new(
            self.consumer(name),
            self.channel(name),
            self.store.clone(),
            Arc::new(self.transport.clone()),
        );
        for (command, compensation) in [
            (format!("{name}.do"), false),
            (format!("{name}.undo"), true),
        ] {
            participant = participant.on(
                command,
                Planned {
                    store: self.store.clone(),
                    shared: Arc::clone(&self.shared),
                    compensation,
                },
            );
        }
        participant.spawn().await.expect("the participant starts")
    }

    async fn start(store: S, relay: SpawnRelay<S>, faults: Faults, seed: u64) -> Self {
        let prefix = format!("{}-", unique("chaos"));
        let transport = MemoryTransport::new(MemoryTransportConfig {
            faults,
            seed,
            ..MemoryTransportConfig::default()
        });
        let shared = Arc::new(Shared {
            effects: format!("{prefix}effects"),
            ..Shared::default()
        });
        let relays = (0..2)
            .map(|_| relay(store.clone(), Arc::new(transport.clone())))
            .collect();
        let orchestrator = orchestrator(&store, &transport, &shared, &prefix);
        let orchestrator_worker = orchestrator.spawn().await.expect("it starts");
        let mut world = Self {
            orchestrator,
            orchestrator_worker,
            store,
            transport,
            shared,
            relay,
            prefix,
            participants: Vec::new(),
            relays,
        };
        for index in 0..PARTICIPANTS.len() {
            let worker = world.spawn_participant(index).await;
            world.participants.push(worker);
        }
        world
    }

    async fn inject(&mut self, fault: Fault) {
        match fault {
            Fault::CrashOrchestrator => {
                let fresh = self.build_orchestrator();
                let worker = fresh.spawn().await.expect("it starts");
                std::mem::replace(&mut self.orchestrator_worker, worker)
                    .abort()
                    .await;
                self.orchestrator = fresh;
            }
            Fault::CrashParticipant(index) => {
                let worker = self.spawn_participant(index).await;
                std::mem::replace(&mut self.participants[index], worker)
                    .abort()
                    .await;
            }
            Fault::CrashRelay(index) => {
                let worker = (self.relay)(self.store.clone(), Arc::new(self.transport.clone()));
                std::mem::replace(&mut self.relays[index], worker)
                    .abort()
                    .await;
            }
            Fault::Outage(duration) => self.transport.outage(duration),
        }
    }

    /// Waits until every saga ended; says which did not.
    async fn wait_terminal(&self, ids: &[SagaId], limit: Duration) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let mut open = Vec::new();
            for id in ids {
                let view = self
                    .orchestrator
                    .saga(*id)
                    .await
                    .map_err(|e| e.to_string())?;
                let state = view.map(|v| v.instance.state);
                if !state.is_some_and(SagaState::is_terminal) {
                    open.push((*id, state));
                }
            }
            if open.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                let first = self
                    .orchestrator
                    .saga(open[0].0)
                    .await
                    .map_err(|e| e.to_string())?;
                return Err(format!(
                    "{} sagas still open after {limit:?}: {open:?}; the first: {first:#?}",
                    open.len()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the outbox holds nothing pending, then for deliveries
    /// still on their way.
    async fn wait_quiet(&self) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        for _ in 0..2 {
            loop {
                let stats = self.store.stats().await.map_err(|e| e.to_string())?;
                if stats.pending == 0 {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    return Err(format!(
                        "{} messages still pending after 60 s",
                        stats.pending
                    ));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        Ok(())
    }

    /// The effects published, once each (the relay may publish twice).
    fn effects(&self) -> HashMap<SagaId, Vec<Effect>> {
        let mut seen = HashSet::new();
        let mut effects: HashMap<SagaId, Vec<Effect>> = HashMap::new();
        for message in self.transport.published(&self.shared.effects) {
            if seen.insert(message.id) {
                let effect: Effect = message.payload_json().expect("an effect");
                effects.entry(effect.saga).or_default().push(effect);
            }
        }
        effects
    }

    /// Every outbox row published, nothing dead; every dead letter on the
    /// broker processed by its consumer before.
    async fn check_nothing_lost(&self) -> Result<(), String> {
        let stats = self.store.stats().await.map_err(|e| e.to_string())?;
        if stats.pending != 0 || stats.dead != 0 {
            return Err(format!(
                "the outbox holds {} pending and {} dead messages",
                stats.pending, stats.dead
            ));
        }
        let consumers = PARTICIPANTS
            .iter()
            .map(|p| (self.channel(p), self.consumer(p)))
            .chain([(
                format!("{}checkout.replies", self.prefix),
                self.consumer("checkout"),
            )]);
        for (channel, consumer) in consumers {
            let letters = self
                .transport
                .dead_letters(&channel, usize::MAX)
                .await
                .map_err(|e| e.to_string())?;
            for letter in letters {
                let now = self.store.now().await;
                let mut tx = self.store.begin().await.map_err(|e| e.to_string())?;
                let begun = self
                    .store
                    .begin_processing(&mut tx, &consumer, letter.message.id, now)
                    .await
                    .map_err(|e| e.to_string())?;
                if matches!(begun, crate::store::Begin::Fresh) {
                    return Err(format!(
                        "{} on {channel} was dead-lettered and never processed: {}",
                        letter.message.message_type, letter.error
                    ));
                }
            }
        }
        Ok(())
    }

    async fn stop(self) {
        self.orchestrator_worker.shutdown().await;
        for worker in self.participants.into_iter().chain(self.relays) {
            worker.shutdown().await;
        }
    }
}

/// Checks one ended saga against its plan and the effects it left.
fn check_saga(id: SagaId, state: SagaState, plan: &Plan, effects: &[Effect]) -> Result<(), String> {
    let expected = plan.expected();
    if state != expected {
        return Err(format!(
            "saga {id} ended {state:?}, expected {expected:?}; plan {plan:?}"
        ));
    }
    let mut applied = [0u32; 4];
    let mut compensated = [0u32; 4];
    let mut undo_order: Vec<(u64, u32)> = Vec::new();
    for effect in effects {
        let step = effect.step as usize;
        if effect.compensation {
            compensated[step] += 1;
            undo_order.push((effect.seq, effect.step));
        } else {
            applied[step] += 1;
        }
    }
    for step in 0..4 {
        if applied[step] > 1 || compensated[step] > 1 {
            return Err(format!(
                "saga {id} step {step} applied {} and compensated {} times; plan {plan:?}",
                applied[step], compensated[step]
            ));
        }
        if compensated[step] > applied[step] {
            return Err(format!(
                "saga {id} step {step} compensated without being applied"
            ));
        }
        let complete = match state {
            SagaState::Completed => applied[step] == 1 && compensated[step] == 0,
            _ => applied[step] == compensated[step],
        };
        if !complete {
            return Err(format!(
                "{state:?} saga {id}: step {step} applied {} and compensated {} times; plan {plan:?}",
                applied[step], compensated[step]
            ));
        }
    }
    undo_order.sort_unstable();
    let steps: Vec<u32> = undo_order.iter().map(|(_, s)| *s).collect();
    if steps.windows(2).any(|w| w[0] < w[1]) {
        return Err(format!(
            "saga {id} compensated out of reverse order: {steps:?}"
        ));
    }
    Ok(())
}

/// One round, drawn from `seed`; returns how many sagas it checked.
///
/// # Errors
/// What went wrong, with the round's faults.
pub async fn round<S: Store + Clone>(
    store: S,
    relay: SpawnRelay<S>,
    seed: u64,
) -> Result<usize, String> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let faults = Faults {
        duplicate: rng.f64() * 0.3,
        lose_ack: rng.f64() * 0.2,
        reorder: rng.bool(),
        delay: Some((Duration::ZERO, Duration::from_millis(rng.u64(0..20)))),
        publish_failure: rng.f64() * 0.2,
    };
    let mut schedule: Vec<(Duration, Fault)> = (0..rng.usize(0..=4))
        .map(|_| {
            let fault = match rng.u8(0..4) {
                0 => Fault::CrashOrchestrator,
                1 => Fault::CrashParticipant(rng.usize(0..PARTICIPANTS.len())),
                2 => Fault::CrashRelay(rng.usize(0..2)),
                _ => Fault::Outage(Duration::from_millis(rng.u64(50..1500))),
            };
            (Duration::from_millis(rng.u64(0..1500)), fault)
        })
        .collect();
    schedule.sort_by_key(|(at, _)| *at);
    let plans: Vec<Plan> = (0..rng.usize(1..=SAGAS_PER_ROUND))
        .map(|_| Plan::random(&mut rng))
        .collect();
    let context = || format!("seed {seed}: faults {faults:?}, schedule {schedule:?}");
    let mut world = World::start(store, relay, faults.clone(), seed).await;
    let started = tokio::time::Instant::now();
    let mut ids = Vec::new();
    for plan in &plans {
        let id = world
            .orchestrator
            .start_saga("checkout", plan)
            .await
            .map_err(|e| format!("{}: start: {e}", context()))?;
        ids.push(id);
    }
    for (at, fault) in &schedule {
        tokio::time::sleep_until(started + *at).await;
        world.inject(*fault).await;
    }
    world.transport.set_faults(Faults::default());
    world
        .wait_terminal(&ids, Duration::from_secs(120))
        .await
        .map_err(|error| format!("{}: {error}", context()))?;
    world
        .wait_quiet()
        .await
        .map_err(|error| format!("{}: {error}", context()))?;
    let effects = world.effects();
    for (id, plan) in ids.iter().zip(&plans) {
        let state = world
            .orchestrator
            .saga(*id)
            .await
            .map_err(|e| e.to_string())?
            .map(|v| v.instance.state)
            .ok_or_else(|| format!("saga {id} vanished"))?;
        let none = Vec::new();
        check_saga(*id, state, plan, effects.get(id).unwrap_or(&none))
            .map_err(|e| format!("{}: {e}", context()))?;
    }
    world
        .check_nothing_lost()
        .await
        .map_err(|e| format!("{}: {e}", context()))?;
    world.stop().await;
    Ok(ids.len())
}

/// Runs `SAGA_CHAOS_ROUNDS` rounds (or the one `SAGA_CHAOS_SEED` names) and
/// panics with the first failure.
pub async fn sagas_under_chaos_end_as_planned<S: Store + Clone>(store: S, relay: SpawnRelay<S>) {
    let seed = std::env::var("SAGA_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok());
    let seeds: Vec<u64> = if let Some(seed) = seed {
        vec![seed]
    } else {
        let rounds = std::env::var("SAGA_CHAOS_ROUNDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_ROUNDS);
        let base = fastrand::u64(..);
        (0..rounds).map(|r| base.wrapping_add(r)).collect()
    };
    let rounds = seeds.len();
    let mut sagas = 0;
    for seed in seeds {
        match round(store.clone(), relay, seed).await {
            Ok(checked) => sagas += checked,
            Err(error) => panic!("{error}\n(replay it with SAGA_CHAOS_SEED={seed})"),
        }
    }
    eprintln!("chaos: {rounds} rounds, {sagas} sagas checked");
}
