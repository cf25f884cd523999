//! The model: what the user asks for, as pure data and pure functions (the
//! policy language, desired state and its ops, LB services and Maglev, health
//! check specs, socket workloads, the config file, the user-space evaluator). No aya, no tokio:
//! the engine turns it into map writes, the agent and the CLI carry it.

pub mod explain;
pub mod frame;
pub mod lb;
pub mod policy;
pub mod sock;
pub mod steer;
