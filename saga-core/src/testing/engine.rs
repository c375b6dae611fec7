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
use crate::saga::{OrchestratorConfig, SagaDefinition, SagaState, StepContext, StepOutcome};
use crate::{
    CommandHandler, Message, Orchestrator, Participant, Reply, SagaId, SagaStep, StepError, Store,
    Transport, Worker,
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

/// The participant's handler of one command type: logs it as an effect.
struct Apply {
    effects: Effects,
}

#[async_trait]
impl<Tx: Send + 'static> CommandHandler<Tx> for Apply {
    async fn handle(&self, _: &mut Tx, command: &Message) -> Result<Reply, StepError> {
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
    /// Starts everything; `steps` get the participant's channel.
    async fn start(store: S, relay: SpawnRelay<S>, steps: Vec<Remote>) -> Self {
        let transport: Arc<dyn Transport> = Arc::new(MemoryTransport::default());
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
            for command in [step.name.to_owned(), format!("{}.undo", step.name)] {
                participant = participant.on(
                    command,
                    Apply {
                        effects: effects.clone(),
                    },
                );
            }
            definition = definition.step(step);
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
