//! Orchestrated sagas: what users implement, how it is stored, and the engine.

mod definition;
mod instance;
mod orchestrator;

pub use definition::{SagaData, SagaDefinition, SagaStep, StepConfig, StepContext, StepOutcome};
pub use instance::{
    LogStatus, Phase, SagaInstance, SagaLogEntry, SagaState, StepEvent, StepStatus,
};
pub use orchestrator::{
    Orchestrator, OrchestratorBuilder, OrchestratorConfig, SagaView, StartOptions,
};
