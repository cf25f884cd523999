//! sluice user space, in layers that only import downwards (see
//! docs/decisions/008-layers.md): cli > agent > api > engine > {model,
//! dataplane} > {netns, files}.

pub mod agent;
pub mod api;
pub mod cli;
pub mod dataplane;
pub mod engine;
pub mod files;
pub mod model;
pub mod netns;

#[cfg(test)]
mod layering;
