//! The long-lived agent: owns desired state (config file plus runtime
//! changes), keeps the pins in line with it, and serves the API.

pub mod core;
pub mod store;
