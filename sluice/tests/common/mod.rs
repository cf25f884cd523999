//! Shared test plumbing: frame builders, the reference model of the verdict
//! logic, network-namespace guards, the kernel-program harness, and a driver
//! for the `sluice` binary.
#![allow(
    dead_code,
    reason = "each test crate uses a different part of the plumbing"
)]

pub mod agent;
pub mod cli;
pub mod frames;
pub mod guest;
pub mod kernel;
pub mod model;
pub mod netns;
pub mod openapi;
pub mod rate;
