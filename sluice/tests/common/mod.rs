//! Shared test plumbing: frame builders, the reference model of the verdict
//! logic, network-namespace guards, and the kernel-program harness.
#![allow(
    dead_code,
    reason = "each test crate uses a different part of the plumbing"
)]

pub mod frames;
pub mod kernel;
pub mod model;
pub mod netns;
